"""Did information cross? LatentWire's destructive controls, item by item.

For each task and each method that sent a true latent, against the same run's `shuffled` (another
row's latent: same bytes, wrong content) and `zero` rows: the paired difference in held-out gold NLL
(control - latent, nats per answer token, bootstrap interval over items) and in accuracy (points,
with McNemar's p). Information crossed only where the control's NLL is higher with an interval that
excludes 0; a falling training loss alone shows only the answer prior being learned.

And for the `joint` variant, what rescoring bought: its accuracy beside each receiver's alone (the same
latent, the same items) and the oracle's (the better receiver per item, an upper bound).
"""

from __future__ import annotations

from typing import Any

from cross_model.paired import compare, holm_by_line

CONTROLS = ("shuffled", "zero")


def _only(rows: list[dict[str, Any]], key: str) -> str | None:
    kinds = {r.get(key) for r in rows}
    return kinds.pop() if len(kinds) == 1 else None


def control_rows(rows: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One line per (task, latent method, control method) present in `rows` (task -> method -> rows)."""
    out = []
    for task, methods in rows.items():
        variants = {m: _only(r, "variant") for m, r in methods.items()}
        # Gold NLLs of different receivers are in different tokens: a control speaks to its own receiver.
        receivers = {m: _only(r, "receiver") for m, r in methods.items()}
        latents = [m for m, v in variants.items() if v in ("latent", "joint")]
        controls = [m for m, v in variants.items() if v in CONTROLS]
        for m in latents:
            mine = {r["example_id"]: r for r in methods[m] if r.get("gold_nll") is not None}
            for c in (c for c in controls if receivers[c] == receivers[m]):
                theirs = {r["example_id"]: r for r in methods[c] if r.get("gold_nll") is not None}
                shared = sorted(mine.keys() & theirs.keys())
                if not shared:
                    continue
                nll = compare(mine, theirs, "gold_nll").to_dict()  # control - latent
                acc = compare(theirs, mine, "score").to_dict()  # latent - control
                lo = nll["ci95"][0]
                out.append(
                    {
                        "task": task,
                        "method": m,
                        "control": c,
                        "receiver": receivers[m],
                        "control_variant": variants[c],
                        "n": len(shared),
                        "nll": sum(mine[i]["gold_nll"] for i in shared) / len(shared),
                        "control_nll": sum(theirs[i]["gold_nll"] for i in shared) / len(shared),
                        "nll_gap": {k: nll[k] for k in ("diff", "ci95")},
                        "accuracy_gain": acc,
                        "first_token_acc": sum(
                            mine[i].get("first_token_correct", 0) for i in shared
                        )
                        / len(shared),
                        "control_first_token_acc": sum(
                            theirs[i].get("first_token_correct", 0) for i in shared
                        )
                        / len(shared),
                        "payload_bytes": sum(mine[i]["payload_bytes"] for i in shared)
                        / len(shared),
                        "text_bytes": sum(mine[i].get("text_bytes", 0) for i in shared)
                        / len(shared),
                        "information_crossed": lo > 0,
                    }
                )
    return out


def format_controls(lines: list[dict[str, Any]]) -> str:
    if not lines:
        return ""
    table = [
        "| task | latent method | control | n | bytes: latent / context as text | gold NLL latent / control "
        "| control - latent NLL [95% CI] | first token % latent / control "
        "| accuracy latent - control (points) [95% CI], McNemar p (Holm) | information crossed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    adjusted = holm_by_line(lines, "accuracy_gain")  # several controls in one table
    for x, p_holm in zip(lines, adjusted):
        g, a = x["nll_gap"], x["accuracy_gain"]
        table.append(
            f"| {x['task']} | {x['method']} | {x['control']} | {x['n']} | {x['payload_bytes']:,.0f} / {x['text_bytes']:,.0f} "
            f"| {x['nll']:.3f} / {x['control_nll']:.3f} | "
            f"{g['diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | "
            f"{100 * x['first_token_acc']:.0f} / {100 * x['control_first_token_acc']:.0f} | "
            f"{100 * a['diff']:+.1f} [{100 * a['ci95'][0]:+.1f}, {100 * a['ci95'][1]:+.1f}], p={a['mcnemar_p']:.2g} "
            f"({p_holm:.2g}) | "
            f"{'yes' if x['information_crossed'] else 'not shown'} |"
        )
    return "\n".join(table)


def joint_rows(rows: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One line per (task, joint method): accuracy of the kept answer, of each receiver alone, of the
    oracle, and how often each receiver's answer was kept."""
    out = []
    for task, methods in rows.items():
        for m, method_rows in methods.items():
            # Every row counts: one that ended in an error scored 0 for the joint answer, each receiver
            # and the oracle alike (it stays in the denominator, as in every other table).
            joint = [r for r in method_rows if r.get("variant") == "joint"]
            answered = [r for r in joint if not r.get("error")]
            if not answered:
                continue
            names = [k.removeprefix("score_") for k in answered[0] if k.startswith("score_")]
            n = len(joint)
            out.append(
                {
                    "task": task,
                    "method": m,
                    "n": n,
                    "errors": n - len(answered),
                    "accuracy": sum(float(r["score"]) for r in answered) / n,
                    "oracle": sum(float(r["oracle_score"]) for r in answered) / n,
                    "receivers": {
                        x: {
                            "accuracy": sum(float(r[f"score_{x}"]) for r in answered) / n,
                            "kept": sum(r["joint_choice"] == x for r in answered) / n,
                        }
                        for x in names
                    },
                }
            )
    return out


def format_joint(lines: list[dict[str, Any]]) -> str:
    if not lines:
        return ""
    table = [
        "| task | method | n | joint accuracy % | receiver alone: accuracy % (answer kept %) | oracle accuracy % |",
        "|---|---|---|---|---|---|",
    ]
    for x in lines:
        alone = "; ".join(
            f"{name} {100 * v['accuracy']:.1f} ({100 * v['kept']:.0f})"
            for name, v in x["receivers"].items()
        )
        table.append(
            f"| {x['task']} | {x['method']} | {x['n']} | {100 * x['accuracy']:.1f} | {alone} | {100 * x['oracle']:.1f} |"
        )
    return "\n".join(table)
