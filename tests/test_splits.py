"""An item's split is a property of the item: over every registered task and several (n_test, n_calib)
pairs, no calibration or training row of any call is, by content (A's text plus B's question), a test
row of any call. Hub and file tasks read sources of 60+ rows made here from the fixtures' formats
(a source of fewer than 50 rows keeps no reserve, and is disjoint only within one call)."""

import json
from pathlib import Path

import pytest

from cross_model.data import load_task_examples
from cross_model.data.base import (
    SMALL_SOURCE,
    available_tasks,
    calibration_reserve,
    front_and_back,
    get_task,
    training_region,
)
from cross_model.data.training_rows import task_rows
from tests.helpers import distinct_copies

FIX = Path(__file__).resolve().parent / "fixtures"
SIZES = [(1, 0), (5, 2), (20, 8), (40, 1), (3, 8)]
# task -> fixture file in its source's format (hub copies as JSONL; `path` reads them like the hub's rows)
SOURCES = {
    "hotpotqa": "hotpotqa",
    "hotpotqa_ms": "hotpotqa",
    "musique": "musique",
    "musique_ms": "musique",
    "hotpotqa_public": "hotpotqa",
    "hotpotqa_ms_public": "hotpotqa",
    "musique_public": "musique",
    "qasper": "qasper",
    "multifieldqa_en": "qasper",
    "twowikimqa": "qasper",
    "twowikimqa_ms": "twowikimqa",
    "squad": "squad",
    "gsm8k": "gsm8k",
    "repobench": "repobench",
    "repobench_full": "repobench",
    "samsum": "samsum",
    "samsum_full": "samsum",
    "jsonl": "custom",
    "tmath": "tmath",
    "musique_ms_public": "musique",
    "twowikimqa_ms_public": "twowikimqa_longbench",
    "hotpotqa_full": "hotpotqa",
    "musique_full": "musique",
    "multifieldqa_en_public": "qasper",
    "twowikimqa_public": "qasper",
    "qasper_public": "scrolls_qasper",
    "qasper_full": "scrolls_qasper",
    "sst2": "sst2",
    "ag_news": "ag_news",
    "trec": "trec",
    "mmlu_redux": "mmlu_redux",
    "arc_challenge": "arc_challenge",
    "openbookqa": "openbookqa",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    out = {}
    tmp = tmp_path_factory.mktemp("sources")
    for name, file in SOURCES.items():
        if file == "tmath":
            continue  # a directory format; its reader goes through the same `front_and_back`
        rows = [
            json.loads(line)
            for line in (FIX / f"{file}.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if name in (
            "musique_ms",
            "musique_ms_public",
        ):  # the fixture's rows have one supporting paragraph; the task keeps two or more
            file = "musique_ms"
            for row in rows:
                for paragraph in row["paragraphs"]:
                    paragraph["is_supporting"] = True
        path = tmp / f"{file}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in distinct_copies(rows, 90)))
        out[name] = str(path)
    return out


def _content(e) -> tuple:
    return (e.contexts, e.prompt_B)


@pytest.mark.parametrize("task", [t for t in available_tasks() if t != "tmath"])
def test_no_calibration_row_of_any_call_is_a_test_row_of_any_call(task, sources):
    tests, calibs = set(), set()
    for n_test, n_calib in SIZES:
        try:
            test, calib = load_task_examples(task, n_test, n_calib, seed=0, path=sources.get(task))
        except (
            ValueError
        ) as err:  # a size the source cannot give is refused, never served otherwise
            assert "exceeds" in str(err), err
            continue
        per = (
            2 if task.startswith("countries_tipsheets") else 1
        )  # the mixed tasks: n_test of each source
        # every-row tasks (`_full`, the multiple-choice benchmarks) give what they have
        assert (
            len(test) == per * n_test
            or task.endswith("_full")
            or get_task(task).default_n_test >= 10**9
        )
        assert len(calib) == per * n_calib
        tests |= {_content(e) for e in test}
        calibs |= {_content(e) for e in calib}
    assert tests and (calibs or all(c == 0 for _, c in SIZES))
    assert not tests & calibs, (
        f"{task}: {len(tests & calibs)} items are test items in one call and calibration in another"
    )


def test_the_reserve_is_fixed_by_the_source_not_the_request():
    items = list(range(200))
    assert calibration_reserve(200) == 8 and calibration_reserve(SMALL_SOURCE - 1) == 0
    backs = {tuple(front_and_back(items, t, c, "x")[1]) for t in (1, 100, 192) for c in (1, 8)}
    assert set().union(*backs) <= set(items[192:])
    with pytest.raises(
        ValueError, match="exceeds the 192 test items of its 200 .*the last 8 are kept"
    ):
        front_and_back(items, 193, 0, "x")
    with pytest.raises(ValueError, match="n_calib .9. exceeds the 8 items kept for calibration"):
        front_and_back(items, 1, 9, "x")


TRAIN_SIZES = [(1, 0), (100, 8), (120, 29), (1000, 64)]


@pytest.mark.parametrize("task", [t for t in available_tasks() if get_task(t).train is not None])
def test_no_training_row_is_a_test_or_calibration_row_of_any_call(task, sources, tmp_path):
    """LatentWire's and C2C's training rows (`task_rows`): a split of their own, so no run's test or
    calibration item is a training row, whatever its sizes (they were the rows after the run's test
    rows, and moved with n_test). Checked by content over several calls, and the rows handed out do
    not change with the run's sizes."""
    source = sources.get(task)
    if source:  # a hub source with a training region: 2000 rows (fewer where the task filters), 1000 of them test rows
        rows = [json.loads(line) for line in Path(source).read_text().splitlines()]
        source = str(tmp_path / "big.jsonl")
        Path(source).write_text("".join(json.dumps(r) + "\n" for r in distinct_copies(rows, 2000)))
    train = task_rows(task, 200, 0, source)
    assert len(train) == 200 and len({_content(e) for e in train}) == 200
    seen = set()
    for n_test, n_calib in TRAIN_SIZES:
        try:
            test, calib = load_task_examples(task, n_test, n_calib, seed=0, path=source)
        except ValueError as err:
            assert "exceeds" in str(err), err
            continue
        seen |= {_content(e) for e in test + calib}
    assert seen, f"{task}: no size was served"
    assert not seen & {_content(e) for e in train}, (
        f"{task}: a training row is a test or calibration row"
    )
    assert [_content(e) for e in task_rows(task, 200, 0, source)] == [_content(e) for e in train]


def test_the_published_ladder_sizes_fit_the_ladders_regions():
    """configs/latentwire_*.yaml: 100 test items and 512 + 64 training rows of secret_word."""
    assert len(task_rows("secret_word", 576, 0, None)) == 576
    with pytest.raises(ValueError, match="580 training items asked, the source keeps 579"):
        task_rows("secret_word", 580, 0, None)
    with pytest.raises(ValueError, match="n_test .121. exceeds the 120 test items"):
        load_task_examples("secret_word", 121, 8, seed=0)


def test_test_items_stay_inside_the_test_region_and_training_rows_are_refused_where_none_are_kept():
    items = list(range(1200))
    with pytest.raises(
        ValueError,
        match="n_test .1001. exceeds the 1000 test items of its 1200 .the items after "
        "them are kept for training, the last 48",
    ):
        front_and_back(items, 1001, 0, "x", test_region=1000)
    assert training_region(items, 152, "x", 1000) == items[1000:1152]
    with pytest.raises(ValueError, match="153 training items asked, the source keeps 152"):
        training_region(items, 153, "x", 1000)
    with pytest.raises(
        ValueError,
        match="task 'qasper' keeps no rows for training; train on one that does: "
        "ag_news, countries, fact_lookup",
    ):
        task_rows("qasper", 1, 0, None)
    with pytest.raises(
        ValueError, match="training rows come from our generator, not from the public file"
    ):
        task_rows("countries", 1, 0, str(FIX / "public" / "countries.jsonl"))


def test_tip_sheets_calibration_items_do_not_move_with_n_test():
    """The defect this fixes: calibration items were items[n_test:], test items of a larger run."""
    _, calib_small = load_task_examples("tipsheets", 1, 40, seed=0)
    test_big, calib_big = load_task_examples("tipsheets", 500, 40, seed=0)
    assert [e.prompt_A for e in calib_small] == [e.prompt_A for e in calib_big]
    assert not {e.prompt_A for e in calib_small} & {e.prompt_A for e in test_big}
