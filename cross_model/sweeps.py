"""Layer sweeps: one config entry that stands for many method instances, and the plot that reads them.

The AC paper chose k = j = 26 by sweeping the layer; a sweep entry does that in one run:

    methods:
      ac_layers: {method: ac, sweep: {k: "1..29", j: k}}          # k = j over layers 1..29
      ac_grid: {method: ac, sender: gemma3-270m, sweep: {k: "2..16..2", j: "4..28..4"}}   # a k x j grid

Each value is a list of integers, "a..b" or "a..b..step" (inclusive), or the name of another swept
key (tied to it). The entry expands, when the config is loaded (`config.expand_sweeps`), into
instances named `<entry>_<key><value>...` (`ac_layers_k12_j12`) carrying `group: <entry>`, which the
report uses to draw `layer_sweep.png`: the metric against the layer (one swept key) or a k x j heat
map (two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cross_model.report_files import METRICS, _subplots, plotted_metrics


def sweep_groups(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """group -> {"keys": the swept parameters that vary (keys always equal to an earlier one folded
    into it), "label": the x axis' name, "instances": {instance: {key: value}}}, read back from the
    resolved config's methods."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for name, params in methods.items():
        if isinstance(params, dict) and params.get("group"):
            groups.setdefault(params["group"], {})[name] = params
    out = {}
    for group, members in groups.items():
        names = list(
            dict.fromkeys(k for p in members.values() for k in p)
        )  # the sweep's own key order
        varying = [
            k for k in names if k != "group" and len({str(p.get(k)) for p in members.values()}) > 1
        ]
        keys, labels = [], {}
        for k in varying:
            twin = next(
                (x for x in keys if all(p.get(x) == p.get(k) for p in members.values())), None
            )
            if twin is None:
                keys.append(k)
                labels[k] = k
            else:
                labels[twin] += f" = {k}"
        out[group] = {
            "keys": keys,
            "label": " x ".join(labels[k] for k in keys),
            "instances": {m: {k: p.get(k) for k in keys} for m, p in members.items()},
        }
    return out


def plot_layer_sweep(
    path: Path,
    summary: list[dict[str, Any]],
    methods: dict[str, dict[str, Any]],
    reference: str | None = "baseline",
) -> bool:
    """The metric against the swept parameter (one) or a heat map (two), per group and task; False
    (nothing drawn) without a sweep."""
    groups = {g: v for g, v in sweep_groups(methods).items() if 1 <= len(v["keys"]) <= 2}
    if not groups:
        return False
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    by = {(s["task"], s["method"]): s for s in summary}
    metric = plotted_metrics(summary)[-1]  # first-named where scored, else the task metric
    key, lo, hi, label = metric if metric in METRICS else METRICS[0]
    plt, fig, axes = _subplots(len(groups), len(tasks), 5.5, 4.2)
    for row, (group, info) in enumerate(groups.items()):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            points = [
                (inst, vals) for inst, vals in info["instances"].items() if (task, inst) in by
            ]
            if len(info["keys"]) == 1:
                k = info["keys"][0]
                pts = sorted((vals[k], by[(task, inst)]) for inst, vals in points)
                xs = [x for x, _ in pts]
                ax.plot(xs, [100 * s[key] for _, s in pts], marker="o", label=group)
                ax.fill_between(
                    xs, [100 * s[lo] for _, s in pts], [100 * s[hi] for _, s in pts], alpha=0.2
                )
                if reference and (task, reference) in by:
                    ax.axhline(
                        100 * by[(task, reference)][key], color="grey", ls="--", label=reference
                    )
                ax.set_xlabel(info["label"])
                ax.set_ylabel(f"{label} (%), Wilson 95% CI")
                ax.set_ylim(0, 100)
                ax.legend(fontsize=7)
            else:
                kx, ky = info["keys"]
                xs = sorted({vals[kx] for _, vals in points})
                ys = sorted({vals[ky] for _, vals in points})
                grid = [[float("nan")] * len(xs) for _ in ys]
                for inst, vals in points:
                    grid[ys.index(vals[ky])][xs.index(vals[kx])] = 100 * by[(task, inst)][key]
                im = ax.imshow(
                    grid, origin="lower", aspect="auto", vmin=0, vmax=100, cmap="viridis"
                )
                ax.set_xticks(range(len(xs)), xs)
                ax.set_yticks(range(len(ys)), ys)
                ax.set_xlabel(kx)
                ax.set_ylabel(ky)
                fig.colorbar(im, ax=ax, label=f"{label} (%)")
            ax.set_title(f"{task}: {group}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
