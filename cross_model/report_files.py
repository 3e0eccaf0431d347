"""Results a researcher can publish: results.json (every number, with the config, versions and commit),
results.md and results.csv (per task x method: accuracy with its Wilson 95% interval, the lenient
first-named match, token F1, mean payload bytes, tokens, wall time) and two plots (accuracy per method
per task; accuracy against payload bytes, log scale). Read from the per-rank result files, so
`--stages [report]` can run on its own after an evaluation."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from cross_model.interlingua.controls import control_rows, format_controls, format_joint, joint_rows
from cross_model.metrics import wilson_interval
from cross_model.paired import format_paired, paired_rows

log = logging.getLogger(__name__)

COLUMNS = (
    ("task", "task"),
    ("method", "method"),
    ("n", "n"),
    ("accuracy", "accuracy"),
    ("ci95_low", "CI low"),
    ("ci95_high", "CI high"),
    ("first_named", "first-named"),
    ("first_named_ci95_low", "first-named CI low"),
    ("first_named_ci95_high", "first-named CI high"),
    ("token_f1", "token F1"),
    ("payload_bytes", "payload B"),
    ("sender_tokens", "A tokens"),
    ("receiver_tokens", "B tokens"),
    ("seconds_per_example", "s/example"),
    ("errors", "errors"),
)


CONTROLS_NOTE = (
    "Gold NLL: mean -log p per gold answer token (EOS included) over the same prefix the answer was "
    "decoded from. The control keeps the bytes and destroys the content (shuffled: another row's latent; "
    "zero: a zero latent); information crossed only where the control's NLL is higher with a paired "
    "95% interval excluding 0."
)


RATIOS = ("compression_vs_bf16", "compression_vs_full_cache", "payload_vs_text")


def summarize(task: str, method: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One task x method line from its per-example rows (failed examples included, scored 0)."""
    n = len(rows)

    def mean(key: str) -> float:
        return sum(float(r.get(key) or 0) for r in rows) / n if n else 0.0

    correct = sum(float(r["score"]) for r in rows)
    lo, hi = wilson_interval(correct, n)
    named_lo, named_hi = wilson_interval(sum(float(r["first_named"]) for r in rows), n)
    return {
        "task": task,
        "method": method,
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "ci95_low": lo,
        "ci95_high": hi,
        "first_named": mean("first_named"),
        "first_named_ci95_low": named_lo,
        "first_named_ci95_high": named_hi,
        "token_f1": mean("token_f1"),
        # A failed row sent nothing it finished: bytes are a mean over the rows that did (counted beside).
        "payload_bytes": (sum(float(r.get("payload_bytes") or 0) for r in ok) / len(ok))
        if (ok := [r for r in rows if not r.get("error")])
        else 0.0,
        "payload_rows": len(ok),
        "sender_tokens": mean("sender_prefill_tokens") + mean("sender_generated_tokens"),
        "receiver_tokens": mean("receiver_prefill_tokens") + mean("receiver_generated_tokens"),
        "seconds_per_example": mean("seconds"),
        "seconds_total": sum(float(r.get("seconds") or 0) for r in rows),
        "errors": sum(1 for r in rows if r.get("error")),
        # Items that failed in an earlier start and were answered again when the run resumed.
        **({"rerun": rerun} if (rerun := sum(1 for r in rows if r.get("failed_attempts"))) else {}),
        **(
            {"gold_nll": mean("gold_nll"), "first_token_acc": mean("first_token_correct")}
            if rows and all(r.get("gold_nll") is not None for r in rows)
            else {}
        ),
        # Where the KV methods record them: how many times fewer bytes than bf16 and than A's whole
        # cache, and how many times the context's own UTF-8 bytes the payload is.
        **{key: mean(key) for key in RATIOS if rows and all(r.get(key) for r in rows)},
        # c2c: the share of B's context tokens without exactly one A token of the same characters.
        **(
            {"alignment_mismatch": mean("alignment_mismatch")}
            if rows and all("alignment_mismatch" in r for r in rows)
            else {}
        ),
    }


def _cell(key: str, value: Any) -> str:
    if key in ("accuracy", "first_named", "token_f1", "ci95_low", "ci95_high"):
        return f"{100 * value:.1f}"
    if key == "payload_bytes":
        return f"{value:,.0f}"
    if key in ("sender_tokens", "receiver_tokens"):
        return f"{value:.0f}"
    if key == "seconds_per_example":
        return f"{value:.2f}"
    return str(value)


def format_table(summary: list[dict[str, Any]]) -> str:
    """A markdown table: accuracy as `acc [lo, hi]` (%), then the other columns."""
    head = [
        "task",
        "method",
        "n",
        "accuracy % [95% CI]",
        "first-named % [95% CI]",
        "token F1 %",
        "payload B",
        "A tokens",
        "B tokens",
        "s/example",
        "errors",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        acc = f"{100 * s['accuracy']:.1f} [{100 * s['ci95_low']:.1f}, {100 * s['ci95_high']:.1f}]"
        named = f"{100 * s['first_named']:.1f} [{100 * s['first_named_ci95_low']:.1f}, {100 * s['first_named_ci95_high']:.1f}]"
        cells = [s["task"], s["method"], str(s["n"]), acc, named] + [
            _cell(k, s[k])
            for k in (
                "token_f1",
                "payload_bytes",
                "sender_tokens",
                "receiver_tokens",
                "seconds_per_example",
                "errors",
            )
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, summary: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([key for key, _ in COLUMNS])
        for s in summary:
            writer.writerow([s[key] for key, _ in COLUMNS])


METRICS = (
    ("accuracy", "ci95_low", "ci95_high", "accuracy"),
    ("first_named", "first_named_ci95_low", "first_named_ci95_high", "first-named"),
)


def plotted_metrics(summary: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """The task metric, and the lenient first-named match where any method scored on it."""
    return [m for m in METRICS if m[0] == "accuracy" or any(s.get(m[0]) for s in summary)]


def _below(s: dict | None, metric=METRICS[0]) -> float:
    """Error-bar lengths in points (rounding can put the interval a hair past the estimate)."""
    return max(0.0, 100 * (s[metric[0]] - s[metric[1]])) if s else 0.0


def _above(s: dict | None, metric=METRICS[0]) -> float:
    return max(0.0, 100 * (s[metric[2]] - s[metric[0]])) if s else 0.0


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (bytes, accuracy, method) points no other point beats: none sends fewer or as many bytes
    with higher accuracy, or fewer bytes with the same. Sorted by bytes."""
    front: list[tuple[float, float, str]] = []
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y, name))
    return front


def _subplots(n_rows: int, n_cols: int, width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False
    )
    return plt, fig, axes


def plot_accuracy(path: Path, summary: list[dict[str, Any]]) -> None:
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    by = {(s["task"], s["method"]): s for s in summary}
    width = 0.8 / len(methods)
    metrics = plotted_metrics(summary)
    plt, fig, axes = _subplots(
        len(metrics), 1, max(6, 1.2 * len(tasks) * len(methods) ** 0.5 + 3), 4
    )
    for ax, metric in zip(axes[:, 0], metrics):
        key, _, _, label = metric
        for i, m in enumerate(methods):
            xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
            acc = [100 * by[(t, m)][key] if (t, m) in by else 0 for t in tasks]
            err = [
                [_below(by.get((t, m)), metric) for t in tasks],
                [_above(by.get((t, m)), metric) for t in tasks],
            ]
            ax.bar(xs, acc, width, yerr=err, capsize=2, label=m)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(f"{label} (%), Wilson 95% CI")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"{label} per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_bytes(path: Path, summary: list[dict[str, Any]]) -> None:
    """Accuracy against mean payload bytes (log x), with the Pareto front (the fewest bytes for each
    level of accuracy) as a dashed line; methods that send nothing sit at 1 byte."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    metrics = plotted_metrics(summary)
    plt, fig, axes = _subplots(len(metrics), len(tasks), 5.5, 4.2)
    # One colour and marker per method, the same in every panel, named once in a shared legend:
    # labels written next to the points collide when methods send similar byte counts.
    cmap = plt.get_cmap("tab20")
    style = {m: (cmap(i % 20), "osD^vPX*<>"[i % 10]) for i, m in enumerate(methods)}
    handles = {}
    for row, metric in enumerate(metrics):
        key, _, _, label = metric
        for ax, task in zip(axes[row], tasks):
            rows = [s for s in summary if s["task"] == task]
            points = []
            for s in rows:
                x, y = max(s["payload_bytes"], 1.0), 100 * s[key]
                points.append((x, y, s["method"]))
                color, marker = style[s["method"]]
                handles[s["method"]] = ax.errorbar(
                    [x],
                    [y],
                    yerr=[[_below(s, metric)], [_above(s, metric)]],
                    fmt=marker,
                    color=color,
                    capsize=2,
                )
            front = pareto_front(points)
            handles["Pareto front"] = ax.step(
                [p[0] for p in front],
                [p[1] for p in front],
                where="post",
                ls="--",
                color="grey",
                lw=1,
            )[0]
            ax.set_xscale("log")
            ax.set_xlabel("payload bytes per example, A -> B (log; 0 B shown at 1)")
            ax.set_ylabel(f"{label} (%)")
            ax.set_ylim(0, 100)
            ax.set_title(f"{task}: {label}")
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_reports(
    run_dir: Path, summary: list[dict[str, Any]], rows: dict[str, Any], context: dict[str, Any]
) -> list[Path]:
    """results.json / .md / .csv and the two plots in `run_dir`; returns the paths written."""
    run_dir = Path(run_dir)
    table = format_table(summary)
    # Every method against the first configured one (usually the baseline), item by item.
    reference = summary[0]["method"] if summary else None
    paired = paired_rows(rows, reference) if reference else []
    out = {
        "results.json": run_dir / "results.json",
        "results.md": run_dir / "results.md",
        "results.csv": run_dir / "results.csv",
        "accuracy.png": run_dir / "accuracy.png",
        "accuracy_vs_bytes.png": run_dir / "accuracy_vs_bytes.png",
    }
    controls, joint = control_rows(rows), joint_rows(rows)
    extra = {
        **({"latentwire_controls": controls} if controls else {}),
        **({"latentwire_joint": joint} if joint else {}),
    }
    out["results.json"].write_text(
        json.dumps(
            {**context, "summary": summary, "paired": paired, **extra, "examples": rows}, indent=2
        )
    )
    paired_md = (
        f"\n\n## Paired differences against {reference}\n\nOn the same items: the mean difference in points "
        f"with a 95% bootstrap interval over items, McNemar's exact p on the items only one of the two got "
        f"right, and the verdict (better / worse only when the interval excludes 0 and p < 0.05).\n\n{format_paired(paired)}"
        if paired
        else ""
    )
    reruns = [f"{s['task']}/{s['method']}: {s['rerun']}" for s in summary if s.get("rerun")]
    if reruns:  # the items that failed in an earlier start and were answered when the run resumed
        paired_md = (
            f"\n\nRe-run after failing in an earlier start (their first attempts' errors are in the rank "
            f"files): {', '.join(reruns)}."
        ) + paired_md
    on_test = sorted({s["task"] for s in summary if s.get("calibrated_on_test_item")})
    if on_test:
        paired_md = (
            f"\n\n**Calibrated on a test item** ({', '.join(on_test)}): these tasks calibrate on their first "
            f"test item, as the public KVComm runs do (`calibrate_on: test_item_0`), not on held-out items; "
            f"methods that calibrate chose their layers on an item they are scored on."
        ) + paired_md
    controls_md = (
        f"\n\n## LatentWire's controls\n\n{CONTROLS_NOTE}\n\n{format_controls(controls)}"
        if controls
        else ""
    )
    if joint:
        controls_md += (
            "\n\n## LatentWire's joint rescoring\n\nEvery receiver answers from the same latent and the "
            "answer with the higher length-normalised log-probability is kept; the oracle keeps the right "
            f"one whenever either is right (an upper bound).\n\n{format_joint(joint)}"
        )
    out["results.md"].write_text(
        f"# Results: {context.get('name', run_dir.name)}\n\n{table}{paired_md}{controls_md}\n\n"
        "accuracy: the task's metric (countries/tipsheets: the paper's f1_match); first-named: the gold answer is "
        "the first candidate named in the answer's first sentence; payload B: mean bytes crossing from A to B per "
        "example; A/B tokens: mean tokens each model processed (prompt + generated); s/example: wall time per "
        "example on one rank.\n\n![accuracy](accuracy.png)\n\n![accuracy vs bytes](accuracy_vs_bytes.png)\n"
    )
    write_csv(out["results.csv"], summary)
    plot_accuracy(out["accuracy.png"], summary)
    plot_accuracy_vs_bytes(out["accuracy_vs_bytes.png"], summary)
    return list(out.values())
