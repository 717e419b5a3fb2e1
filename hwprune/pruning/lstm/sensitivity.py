"""The layer-sensitivity picture of an LSTM-guided run: which groups the controller pruned, when, how often.

Left: a map of groups (rows, network order) by steps (columns); a cell's shade is the share of the
step's children whose action selected the group (what the controller proposed), and a dot marks
the groups that lost channels on the path the search kept (the best child, or the finishing
step). Right: per group, in how many kept steps it lost channels. Groups the controller learns to
leave alone are the sensitive ones ("the learning results seem to reveal the sensitivity of each
network layer").

:func:`sensitivity_figure` draws it from a step log (the method's ``lstm_log``), :func:`save_sensitivity`
writes the PNG, and :func:`report_png` draws it for the LSTM checkpoints among a report's checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hwprune.bench.figures import figure_png

import numpy as np


def selections(log: Sequence[dict], groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(share of children selecting each group per step [groups, steps], kept-path pruning [groups, steps] as
    0/1, step labels) from a step log; steps without children (a goal change) are left out."""
    index = {g: i for i, g in enumerate(groups)}
    share, kept, labels = [], [], []
    for step in log:
        children = [c for r in step.get("rounds", []) for c in r["children"]] or step.get("children", [])
        if not children:
            continue
        col = np.zeros(len(groups))
        for c in children:
            for g in c.get("tokens", []):
                col[index[g]] += 1
        share.append(col / len(children))
        path = np.zeros(len(groups))
        for g in (step.get("beam") or [{}])[0].get("pruned", {}):
            path[index[g]] = 1
        kept.append(path)
        labels.append(f"{step['step']}" + ("f" if step.get("kind") == "finish" else ""))
    n = len(groups)
    return (np.stack(share, 1) if share else np.zeros((n, 0)), np.stack(kept, 1) if kept else np.zeros((n, 0)),
            labels)


def sensitivity_figure(log: Sequence[dict], groups: Sequence[str], title: str | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    share, kept, labels = selections(log, groups)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(6.0, 3.5 + 0.45 * len(labels)), max(3.0, 0.28 * len(groups) + 1.2)),
                                 gridspec_kw={"width_ratios": [max(2, len(labels)), 2]}, sharey=True)
    im = ax.imshow(share, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="upper")
    ys, xs = np.nonzero(kept)
    ax.scatter(xs, ys, s=14, c="crimson", label="pruned on the kept path")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups, fontsize=6)
    ax.set_xlabel("step (f: finishing step)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01).set_label("share of children selecting", fontsize=7)
    if len(xs):
        ax.legend(fontsize=6, loc="lower right")
    bx.barh(range(len(groups)), kept.sum(1), color="crimson")
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.set_xlabel("steps pruned")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_sensitivity(log: Sequence[dict], groups: Sequence[str], out: str | Path, title: str | None = None) -> Path:
    """Write the picture as a PNG (atomically)."""
    from hwprune.atomic import atomic_write_bytes

    return atomic_write_bytes(Path(out), figure_png(sensitivity_figure(log, groups, title)))


def report_png(checkpoints: Sequence[str | Path]) -> bytes | None:
    """The picture of the first checkpoint whose meta says it was pruned by the LSTM method, or None."""
    from hwprune.training.checkpoint import Checkpoint

    for path in checkpoints:
        meta = Checkpoint.load(path).meta
        if meta.get("method") == "lstm" and meta.get("lstm_log"):
            return figure_png(sensitivity_figure(meta["lstm_log"], meta["lstm_groups"],
                                                 title=f"{Path(path).stem}: groups the LSTM controller pruned"))
    return None
