"""A predictor's training data from a table: per unit kind, layer features and in-situ times."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: unit kinds, which are also the table row kinds of a layer's own kernel (every other row
#: charged to a layer is one of its extras)
KINDS = ("conv", "dwconv", "linear")


def _attribute(rows: pd.DataFrame, layer_names: set[str]) -> pd.Series:
    """Give every in-situ node the template layer it belongs to (execution order kept).

    Conv/linear kernels and reorders already name their layer. Every other node the
    runtime executed (an activation or residual Add it did not fuse, a fused activation of
    its own such as QuickGelu for SiLU, a pooling, a reorder, a reshape) is charged to the
    closest preceding template layer of the same run: its input is that layer's output, so
    that layer's shape features describe its cost. Nodes before the first layer are left out.
    """
    out = []
    current = None
    for layer in rows["layer"]:
        if layer in layer_names:
            current = layer
        out.append(current)
    return pd.Series(out, index=rows.index)


@dataclass
class TrainingSet:
    X: dict[str, np.ndarray]
    y: dict[str, np.ndarray]  # milliseconds: the layer's own kernel
    groups: dict[str, np.ndarray]  # configuration of each row (for grouped validation)
    ranges: dict[str, tuple[np.ndarray, np.ndarray]]  # per-feature min/max per kind
    #: milliseconds of the other nodes charged to the layer (reorders, unfused Adds, poolings)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_lists(cls, acc: dict[str, dict[str, list]]) -> "TrainingSet":
        """The arrays of the lists ``acc[field][kind]`` (fields X, y, extra, groups) of every
        kind that has rows, with each kind's feature ranges."""
        ts = cls({}, {}, {}, {})
        for k in KINDS:
            if acc["y"][k]:
                ts.X[k] = np.asarray(acc["X"][k])
                ts.y[k] = np.asarray(acc["y"][k])
                ts.extra[k] = np.asarray(acc["extra"][k])
                ts.groups[k] = np.asarray(acc["groups"][k])
                ts.ranges[k] = (ts.X[k].min(axis=0), ts.X[k].max(axis=0))
        return ts


def empty_lists() -> dict[str, dict[str, list]]:
    """What :meth:`TrainingSet.from_lists` reads: per field, one list per unit kind."""
    return {f: {k: [] for k in KINDS} for f in ("X", "y", "extra", "groups")}


def add_layer_rows(acc: dict[str, dict[str, list]], tpl, names: set[str], nodes: pd.DataFrame, widths,
                   batch: int, group: str, node_overhead_ms: float) -> None:
    """Append one configuration's layer rows to ``acc``, per unit kind: features, the
    kernel's time, the extras' time and the configuration (``group``). ``node_overhead_ms``,
    what the profiler added to each node, is taken off every node first."""
    attributed = _attribute(nodes, names)
    time_ms = (nodes["median_ms"] - node_overhead_ms).clip(lower=1e-4)
    per_layer = time_ms.groupby(attributed).sum()
    own = nodes["kind"].isin(KINDS).to_numpy() & (nodes["layer"] == attributed).to_numpy()
    kernel = time_ms[own].groupby(attributed[own]).sum()
    cin, cout = tpl.channels(tpl.width_matrix([widths]))
    for kind in KINDS:
        js = [j for j, s in enumerate(tpl.slots) if s.kind == kind and s.name in kernel.index]
        if not js:
            continue
        layers = [tpl.slots[j].name for j in js]
        acc["X"][kind].extend(tpl.features(kind, js, batch, cin[0], cout[0]))
        acc["y"][kind].extend(float(kernel[n]) for n in layers)
        acc["extra"][kind].extend(max(float(per_layer[n] - kernel[n]), 0.0) for n in layers)
        acc["groups"][kind].extend([group] * len(js))
