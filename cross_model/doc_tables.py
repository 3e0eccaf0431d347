"""Tables in README.md and docs/*.md are written from results files, never by hand.

A table is a block that names what renders it and the file it reads:

    <!-- table: summary docs/quickstart/results.json -->
    | task | method | ... |
    <!-- /table -->

    python -m cross_model.doc_tables --write   # rewrite every block from its file
    python -m cross_model.doc_tables --check   # exit 1 naming every stale block (tests/test_doc_tables.py)
    python -m cross_model.doc_tables --publish runs/quickstart docs/quickstart
        # a run's results.json without its per-item rows (summary, paired differences, config, versions,
        # timings) and its plots, into a docs folder (what `make demo` and `make pareto` do)

Renderers: `summary` (the report's table), `paired [REFERENCE]` (paired differences, from the report's
`paired` rows or recomputed against REFERENCE when the file keeps its rows), `timings` (the run's
stages, one line), `bench MODEL` (a `make bench` JSON's table for one model), `qkvcomm REFERENCE` (the
Q-KVComm rows of a Pareto run: first-named, same answers as REFERENCE, paired difference, bytes),
`scheme` (`make qkvcomm-scheme`'s KL per Q-KVComm scheme), `controls` (LatentWire's destructive controls),
`history` (the interlingua's held-out losses during training), `joint` (LatentWire's joint rescoring),
`ridge` (`make projection-ridge`'s held-out R^2 per ridge), `projections` (a run's trained W and its fit).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from cross_model.interlingua.controls import format_controls, format_joint
from cross_model.paired import format_paired, holm, paired_rows
from cross_model.progress import format_duration
from cross_model.report_files import format_table
from cross_model.runinfo import check_committed
from cross_model.seed_spread import format_spread

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; the command that writes it is named next to the table"
        )
    return json.loads(path.read_text())


def render_summary(data: dict, *args: str) -> str:
    return format_table(data["summary"])


def render_paired(data: dict, *args: str) -> str:
    """The paired rows against one reference: `args[0]`, else the report's (the first row's); rows a
    publish added for another reference (`--pair`) render in their own block."""
    lines = data["paired"]
    reference = args[0] if args else (lines[0]["reference"] if lines else None)
    lines = [p for p in lines if p["reference"] == reference]
    if not lines:
        raise MissingResults(
            f"no paired rows against {reference!r}; publish the run with --pair METHOD:{reference}"
        )
    return format_paired(lines)


def render_timings(data: dict, *args: str) -> str:
    t = data["timings"]
    stages = ", ".join(f"{name} {format_duration(s)}" for name, s in t["stages"].items())
    n = t["world_size"]
    return (
        f"{format_duration(t['total_s'])} in all ({stages}), {n} process{'' if n == 1 else 'es'}."
    )


def render_bench(data: dict, model: str, *args: str) -> str:
    return bench_table(data["results"][model])


def bench_table(rows: list[dict]) -> str:
    """`make bench`'s table for one model: ours against the reference, per method."""
    lines = [
        "| method | ours ex/s | reference ex/s | speed-up | same answers | peak RSS MB | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = f"{r['ref_ex_per_s']:.3g}" if r["ref_ex_per_s"] else "-"
        up = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        mem = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['ours_ex_per_s']:.3g} | {ref} | {up} | {r['same_answers'] or '-'} | {mem} | {r['errors']} |"
        )
    return "\n".join(lines)


def render_qkvcomm(data: dict, reference: str, *args: str) -> str:
    """Per task and KV method: first-named [Wilson], same answers as `reference`, the paired difference
    in first-named to it, mean bytes and the compression against bfloat16."""
    summary = {(s["task"], s["method"]): s for s in data["summary"]}
    agreement = {(a["task"], a["method"]): a for a in data["agreement"]}
    kv = [p for p in data["paired_kv"] if p["method"].startswith(("kvcomm", "qkvcomm"))]
    paired = {(p["task"], p["method"]): p for p in kv}
    adjusted = dict(zip(((p["task"], p["method"]) for p in kv), holm([p["mcnemar_p"] for p in kv])))
    lines = [
        "| task | method | first-named % [95% CI] | same answer as "
        + reference
        + " % | first-named - "
        + reference
        + " (points) [95% CI], McNemar p (Holm) | payload B | x fewer bytes than bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (task, method), s in summary.items():
        if not (method.startswith("kvcomm") or method.startswith("qkvcomm")):
            continue
        a, p = agreement.get((task, method)), paired.get((task, method))
        same = f"{a['same_pct']:.0f}" if a else "-"
        if p:
            lo, hi = p["ci95"]
            diff = (
                f"{100 * p['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], p={p['mcnemar_p']:.2g} "
                f"({adjusted[(task, method)]:.2g}): {p['verdict']}"
            )
        else:
            diff = "(reference)" if method == reference else "-"
        ratio = s.get("compression_vs_bf16")
        lines.append(
            f"| {task} | {method} | {100 * s['first_named']:.0f} [{100 * s['first_named_ci95_low']:.0f}, "
            f"{100 * s['first_named_ci95_high']:.0f}] | {same} | {diff} | {s['payload_bytes']:,.0f} | "
            f"{f'{ratio:.1f}' if ratio else '-'} |"
        )
    return "\n".join(lines)


def render_scheme(data: dict, *args: str) -> str:
    """`make qkvcomm-scheme`'s table: mean KL from unquantized KVComm per scheme and width."""
    bits = data["bits"]
    lines = [
        "| scheme | "
        + " | ".join(f"{b} bits: KL, bytes" for b in bits)
        + " | mean KL | within the byte budget |",
        "|---|" + "---|" * (len(bits) + 2),
    ]
    for r in sorted(data["rows"], key=lambda r: r["mean_kl"]):
        name = f"**{r['scheme']}**" if r["scheme"] == data["best"] else r["scheme"]
        cells = " | ".join(f"{r['kl'][str(b)]:.4f}, {r['bytes'][str(b)]:,.0f}" for b in bits)
        lines.append(
            f"| {name} | {cells} | {r['mean_kl']:.4f} | {'yes' if r['within_budget'] else 'no'} |"
        )
    return "\n".join(lines)


def render_ridge(data: dict, *args: str) -> str:
    """`make projection-ridge`'s table: held-out R^2 (cosine) of the least-squares W per ridge and size."""
    sizes = [str(n) for n in data["sizes"]]
    lines = [
        "| ridge | " + " | ".join(f"{n} sentences: R^2 (cosine)" for n in sizes) + " | mean R^2 |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for r in data["rows"]:
        name = f"**{r['ridge']:g}**" if r["ridge"] == data["best"] else f"{r['ridge']:g}"
        cells = " | ".join(
            f"{r['fits'][n]['r2']:.3f} ({r['fits'][n]['cosine']:.4f})" for n in sizes
        )
        lines.append(f"| {name} | {cells} | {r['mean_r2']:.3f} |")
    return "\n".join(lines)


def render_legacy(data: dict, *args: str) -> str:
    """`make legacy-transformers`: the packaged models' directories read in ours and in 4.53."""
    ours, legacy = data["transformers"]
    lines = [
        f"| model | tokenizer class (transformers {ours} / {legacy}) | same token ids | max abs logit difference "
        "| same greedy answers |",
        "|---|---|---|---|---|",
    ]
    for name, m in data["models"].items():
        lines.append(
            f"| {name} | {' / '.join(m['tokenizer_class'])} | {'yes' if m['same_ids'] else 'no'} | "
            f"{m['max_abs_logit_difference']:.3g} | {'yes' if m['same_answers'] else 'no'} |"
        )
    return "\n".join(lines)


def render_projections(data: dict, *args: str) -> str:
    """The run's trained projections and their held-out fit (`projections`, from projections.json)."""
    lines = [
        "| method | pair (k -> j) | widths | solver | sentences | held-out R^2 | held-out cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in data["projections"].items():
        solver = p.get("solver") or "adam"
        how = (
            f"lstsq, ridge {p['ridge']:g}"
            if solver == "lstsq"
            else f"adam, {p.get('epochs')} epochs"
        )
        lines.append(
            f"| {name} | {p['sender']} ({p['k']}) -> {p['receiver']} ({p['j']}) | {p['d_in']} -> {p['d_out']} "
            f"| {how} | {p.get('n_sentences')} {p.get('corpus')} | {p['fit'].get('r2', float('nan')):.3f} "
            f"| {p['fit'].get('cosine', float('nan')):.4f} |"
        )
    return "\n".join(lines)


def render_controls(data: dict, *args: str) -> str:
    """LatentWire's destructive controls (the report's `latentwire_controls`)."""
    return format_controls(data["latentwire_controls"])


def render_seeds(data: dict, *args: str) -> str:
    """One config at several seeds: mean and spread (`seed_spread`)."""
    return format_spread(data)


def render_joint(data: dict, *args: str) -> str:
    """LatentWire's joint rescoring against each receiver alone and the oracle (`latentwire_joint`)."""
    return format_joint(data["latentwire_joint"])


def render_history(data: dict, *args: str) -> str:
    """The interlingua's held-out losses during training (`interlingua_history`)."""
    lines = [
        "| step | held-out loss | gold NLL, true latent | gold NLL, another row's latent |",
        "|---|---|---|---|",
    ]
    for h in data["interlingua_history"]:
        lines.append(
            f"| {h['step']} | {h['heldout_loss']:.3f} | {h['heldout_nll']:.3f} | {h['heldout_nll_shuffled']:.3f} |"
        )
    return "\n".join(lines)


def render_c2c(data: dict, *args: str) -> str:
    """Each learned cache module's held-out losses during training and its open layers (C2C's fusers from
    c2c.json, the KV translators' projectors from kv_translate.json)."""
    lines = [
        "| method | step | held-out loss | every gate closed (B without A) | open layers |",
        "|---|---|---|---|---|",
    ]
    for name, fit in {**data.get("c2c", {}), **data.get("kv_translate", {})}.items():
        for h in fit["history"]:
            lines.append(
                f"| {name} | {h['step']} | {h['heldout_loss']:.3f} | {h['heldout_loss_closed']:.3f} "
                f"| {h['open_layers']} |"
            )
    return "\n".join(lines)


def render_sweep(data: dict, *args: str) -> str:
    """A sweep in sentences, from its report: per task, the reference's first-named match and every
    instance whose paired difference to it is shown (with its interval, McNemar p and Holm-adjusted p
    over the task's comparisons); the rest are named by count."""
    summary = {(s["task"], s["method"]): s for s in data["summary"]}
    reference = data["paired"][0][
        "reference"
    ]  # the report's; `--pair` rows render in their own block
    paired = [p for p in data["paired"] if p["reference"] == reference]
    out = []
    for task in dict.fromkeys(p["task"] for p in paired):
        lines = [p for p in paired if p["task"] == task and p.get("first_named")]
        ref = lines[0]["reference"]
        adjusted = holm([p["first_named"]["mcnemar_p"] for p in lines])
        shown = []
        for p, h in zip(lines, adjusted):
            r = p["first_named"]
            if r["verdict"] != "no difference shown":
                lo, hi = r["ci95"]
                held = "" if h < 0.05 else ", not after Holm's adjustment"
                shown.append(
                    f"{p['method']} {r['verdict']} ({100 * r['diff']:+.0f} points [{100 * lo:+.0f}, "
                    f"{100 * hi:+.0f}], p = {r['mcnemar_p']:.2g}, Holm {h:.2g}{held})"
                )
        head = (
            f"- {task}: {ref} {100 * summary[(task, ref)]['first_named']:.0f}% first-named; "
            f"{len(lines) - len(shown)} of {len(lines)} instances show no difference from it"
        )
        out.append(head + (": " + "; ".join(shown) + "." if shown else "."))
    return "\n".join(out)


RENDERERS: dict[str, Callable[..., str]] = {
    "summary": render_summary,
    "paired": render_paired,
    "timings": render_timings,
    "bench": render_bench,
    "qkvcomm": render_qkvcomm,
    "scheme": render_scheme,
    "controls": render_controls,
    "history": render_history,
    "c2c": render_c2c,
    "joint": render_joint,
    "ridge": render_ridge,
    "legacy": render_legacy,
    "projections": render_projections,
    "sweep": render_sweep,
    "seeds": render_seeds,
}


class MissingResults(FileNotFoundError):
    """A results file lacks what a table renders: the table is stale, never rendered empty."""


def render(spec: str) -> str:
    kind, path, *args = spec.split()
    if kind not in RENDERERS:
        raise ValueError(f"table '{spec}': no renderer {kind!r}; known: {', '.join(RENDERERS)}")
    try:
        text = RENDERERS[kind](_load(ROOT / path), *args)
    except KeyError as err:
        raise MissingResults(
            f"{path} has no {err} for table '{spec}'; rerun the command named beside it"
        ) from err
    if not text.strip() or len(text.strip().splitlines()) < 3 and text.lstrip().startswith("|"):
        raise MissingResults(
            f"table '{spec}' renders no row from {path}; rerun the command named beside it"
        )
    return text


def documents() -> list[Path]:
    return sorted({p for pattern in DOCUMENTS for p in ROOT.glob(pattern)})


def stale_blocks(write: bool = False) -> list[str]:
    """Blocks whose text differs from what their file renders (rewritten when `write`)."""
    stale = []
    for doc in documents():
        text = doc.read_text()

        def fix(m: re.Match) -> str:
            try:
                fresh = render(m.group("spec")).rstrip("\n") + "\n"
            except FileNotFoundError as err:
                stale.append(f"{doc.relative_to(ROOT)}: table '{m.group('spec')}': {err}")
                return m.group(0)
            if fresh != m.group("body"):
                stale.append(f"{doc.relative_to(ROOT)}: table '{m.group('spec')}'")
            return m.group(1) + fresh + m.group(4)

        new = BLOCK.sub(fix, text)
        if write and new != text:
            doc.write_text(new)
    return stale


def publish(
    run_dir: Path, target: Path, reference: str | None = None, pairs: list[tuple[str, str]] = ()
) -> Path:
    """A run's report without its per-item rows (plus, with `reference`, each method's agreement with
    it and the paired difference of KV methods to it; with `pairs`, the paired difference of each
    (method, other reference) on the same items, for claims between two methods that are not the
    report's reference), and its plots, into `target`."""
    data = _load(run_dir / "results.json")
    check_committed(data, run_dir)
    rows = data.pop("examples")
    for method, other in pairs:
        missing = [m for m in (method, other) if not any(m in methods for methods in rows.values())]
        if missing:
            raise ValueError(
                f"--pair {method}:{other}: {run_dir} has no rows of {', '.join(missing)}"
            )
        chosen = {
            task: {m: methods[m] for m in (other, method)}
            for task, methods in rows.items()
            if method in methods and other in methods
        }
        data["paired"] = data.get("paired", []) + paired_rows(chosen, other)
    if reference:
        data["agreement"] = []
        for task, methods in rows.items():
            ref = {r["example_id"]: r for r in methods.get(reference, [])}
            for method, method_rows in methods.items():
                got = {r["example_id"]: r for r in method_rows}
                shared = [i for i in ref if i in got]
                same = sum(got[i]["answer"] == ref[i]["answer"] for i in shared)
                data["agreement"].append(
                    {
                        "task": task,
                        "method": method,
                        "n": len(shared),
                        "same_pct": 100 * same / len(shared) if shared else 0.0,
                    }
                )
        data["paired_kv"] = [
            {"task": p["task"], "method": p["method"], **p["first_named"]}
            for p in paired_rows(rows, reference, ("first_named",))
            if p["n"]
        ]
        for s in data["summary"]:
            ratios = [
                r.get("compression_vs_bf16")
                for r in rows[s["task"]][s["method"]]
                if r.get("compression_vs_bf16")
            ]
            if ratios:
                s["compression_vs_bf16"] = sum(ratios) / len(ratios)
    interlingua = run_dir / "interlingua.json"
    if interlingua.exists():
        data["interlingua_history"] = json.loads(interlingua.read_text()).get("history", [])
    for key in (
        "projections",
        "c2c",
        "kv_translate",
    ):  # what the train stage wrote about its learned maps
        path = run_dir / f"{key}.json"
        if path.exists():
            data[key] = json.loads(path.read_text())
    timings = run_dir / "timings.json"
    if timings.exists():
        data["timings"] = json.loads(timings.read_text())
    target.mkdir(parents=True, exist_ok=True)
    out = target / "results.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    for name in (
        "results.md",
        "results.csv",
        "accuracy.png",
        "accuracy_vs_bytes.png",
        "layer_sweep.png",
    ):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, target / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cross_model.doc_tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--write", action="store_true", help="rewrite every table from its file")
    ap.add_argument("--check", action="store_true", help="exit 1 if a table differs from its file")
    ap.add_argument(
        "--publish", nargs=2, metavar=("RUN_DIR", "DOCS_DIR"), help="copy a run's report into docs"
    )
    ap.add_argument(
        "--reference", help="with --publish: the method others are compared with item by item"
    )
    ap.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="METHOD:OTHER",
        help="with --publish: also the paired difference of METHOD against OTHER (repeatable)",
    )
    args = ap.parse_args(argv)
    if args.publish:
        try:
            pairs = [tuple(p.split(":", 1)) for p in args.pair]
            if any(len(p) != 2 or not all(p) for p in pairs):
                raise ValueError(f"--pair takes METHOD:OTHER, got {args.pair}")
            print(publish(Path(args.publish[0]), Path(args.publish[1]), args.reference, pairs))
        except (ValueError, FileNotFoundError) as err:
            print(f"publish refused: {err}", file=sys.stderr)
            return 2
    if args.write or args.check:
        stale = stale_blocks(write=args.write)
        if stale and args.check:
            print(
                "stale tables (run `python -m cross_model.doc_tables --write` after the command that feeds them):\n  "
                + "\n  ".join(stale),
                file=sys.stderr,
            )
            return 1
        if args.write:
            missing = [x for x in stale if "does not exist" in x or "rerun the command" in x]
            print(
                f"{len(stale) - len(missing)} table(s) rewritten"
                if stale
                else "every table is up to date"
            )
            for line in missing:
                print(f"not rendered: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
