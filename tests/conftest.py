import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests must never try the network: the hub is unreachable on these machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_llama():
    from cross_model.models import load_model

    return load_model("tiny-llama-64")


@pytest.fixture(scope="session")
def tiny_llama_48():
    from cross_model.models import load_model

    return load_model("tiny-llama-48")


@pytest.fixture(scope="session")
def smollm2():
    from cross_model.models import load_model

    return load_model("smollm2-135m-instruct")
