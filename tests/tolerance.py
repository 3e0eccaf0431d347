"""How close two floating-point computations of the same quantity must be, on any CPU or GPU.

Two computations that differ only in the order of their sums (a batch against one item, an assembled
cache against one concatenated forward, another SIMD kernel, another thread count) do not give the same
bits. The rule every such comparison in tests/ uses:

- A sum of n terms accumulated in a dtype of machine epsilon eps_acc rounds by about sqrt(n) * eps_acc
  times the magnitude of what it sums (rounding errors of random sign), and storing the result in the
  compared dtype rounds once more by eps. One step therefore errs by sqrt(eps^2 + n * eps_acc^2) of its
  magnitude: sqrt(n) * eps in float32, about eps in bfloat16 (whose matmuls accumulate in float32).
- A network of `depth` such steps in sequence adds their errors, again as a random walk: sqrt(depth).
- The error of one element scales with the magnitude of the sums that produced it, which the tensor's
  largest value measures, not with the element itself (a logit near 0 comes out of sums of large terms).
  So the tolerance is absolute, with no rtol:

      atol = SLACK * max|ref| * sqrt(eps^2 + terms * eps_acc^2) * sqrt(depth)

SLACK = 8 covers the constant of the random-walk estimate and the largest of many elements (the maximum
of 10^5 Gaussian errors is about 4.5 standard deviations). A defect these tests look for (a wrong layer,
position, mask or rotation) moves values by 1e-2 or more of their magnitude, orders above this bound.

For a transformer forward, `terms` is its longest reduction (hidden, MLP or attention length) and `depth`
its layers plus the head: `forward_budget` reads both from the model.
"""

from __future__ import annotations

import json
import math
import os

import torch

SLACK = 8.0


def reorder_atol(
    ref: torch.Tensor, *, terms: int, depth: int = 1, dtype: torch.dtype | None = None
) -> float:
    """The absolute tolerance above for `ref` computed in `dtype` (default: ref's own)."""
    dtype = dtype or ref.dtype
    eps = torch.finfo(dtype).eps
    # float64 and float32 accumulate in themselves; half types accumulate in float32 on every backend we use
    eps_acc = eps if dtype in (torch.float64, torch.float32) else torch.finfo(torch.float32).eps
    per_step = math.sqrt(eps**2 + terms * eps_acc**2)
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    return SLACK * scale * per_step * math.sqrt(depth)


def forward_budget(lm, seq_len: int = 1, layers: int | None = None) -> dict[str, int]:
    """`terms` and `depth` of a forward of a loaded model (`models.LoadedModel`) over seq_len tokens:
    through every layer and the head, or through its first `layers` blocks."""
    cfg = lm.model.config
    cfg = getattr(cfg, "text_config", cfg)
    widths = [cfg.hidden_size, getattr(cfg, "intermediate_size", 0) or 0, seq_len]
    return {
        "terms": max(widths),
        "depth": (cfg.num_hidden_layers if layers is None else layers) + 1,
    }


def assert_reordered_close(
    got: torch.Tensor,
    ref: torch.Tensor,
    *,
    terms: int,
    depth: int = 1,
    dtype: torch.dtype | None = None,
    msg: str = "",
) -> None:
    """got equals ref up to the rounding of reordered sums (the module docstring's rule)."""
    atol = reorder_atol(ref, terms=terms, depth=depth, dtype=dtype)
    _record(got, ref, atol)
    torch.testing.assert_close(
        got,
        ref,
        atol=atol,
        rtol=0,
        msg=lambda m: f"{msg}{': ' if msg else ''}{m}\n(tolerance {atol:.3g}: tests/tolerance.py)",
    )


def assert_forward_close(
    got: torch.Tensor,
    ref: torch.Tensor,
    lm,
    seq_len: int = 1,
    *,
    dtype: torch.dtype | None = None,
    msg: str = "",
) -> None:
    """Two computations of one forward of `lm` agree to the rounding of reordered sums."""
    assert_reordered_close(got, ref, **forward_budget(lm, seq_len), dtype=dtype, msg=msg)


def _record(got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    # CROSS_MODEL_TOLERANCE_LOG=file appends each comparison's largest error against its tolerance, so the
    # margin this rule leaves can be read off a run under other kernels or thread counts.
    path = os.environ.get("CROSS_MODEL_TOLERANCE_LOG")
    if not path or got.shape != ref.shape:
        return
    err = float((got.detach().double() - ref.detach().double()).abs().max()) if ref.numel() else 0.0
    with open(path, "a") as f:
        f.write(
            json.dumps(
                {
                    "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                    "err": err,
                    "atol": atol,
                    "ratio": err / atol if atol else None,
                }
            )
            + "\n"
        )
