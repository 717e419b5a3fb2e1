"""The controller's input: one token per prunable channel group, in network order.

A token describes a group at the current widths (coupled layers, a residual stream or a
depthwise convolution with its producer, are one group and so one token):

* its kind (one-hot: conv, residual, depthwise, grouped, linear) and its width (kept fraction
  and ``log2`` of the channel count);
* its next layer, the first layer that reads its channels: kind (conv, depthwise, grouped,
  linear) and output width at the current widths;
* its position in the network (0 for the first group, 1 for the last);
* its marginal cost per channel, a finite difference of the cost fraction at the current
  widths: the fraction with the group narrowed by the channels one pruning step would remove,
  subtracted from the current fraction, per channel removed. For a latency cost this is the
  device's predicted time, so it changes with the widths (staircases, fusions). Two features
  come from it: the group's cost density (per-channel cost times its full channel count,
  relative to the mean over groups) and the step saving (what pruning this group alone would
  save, as a share of the way left to the goal);
* whether one more step can prune it (it is above its ``min_keep`` width), and the progress
  made so far, ``(1 - cost) / (1 - goal)``, the same in every token.

All finite differences come from one call of the cost model (every shifted configuration in
one width matrix), divided by the unpruned model's cost as :meth:`fraction` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from hwprune.pruning.objectives import _Base as CostBase
from hwprune.pruning.space import ChannelGroup, PruningSpace, is_depthwise, is_grouped

KINDS = ("conv", "residual", "depthwise", "grouped", "linear")
NEXT_KINDS = ("conv", "depthwise", "grouped", "linear", "none")
FEATURES = (*(f"kind={k}" for k in KINDS), "width_fraction", "log2_width",
            *(f"next={k}" for k in NEXT_KINDS), "next_width_fraction", "next_log2_width",
            "position", "cost_density", "step_saving", "prunable", "progress")
N_FEATURES = len(FEATURES)


@dataclass(frozen=True)
class NextLayer:
    """The first layer reading a group's channels: its kind, the group holding its output
    channels (None for a layer outside the space, e.g. the classifier) and its full output width."""

    kind: str
    group: str | None
    channels: int


def min_width(g: ChannelGroup, min_keep: float) -> int:
    """The narrowest width ``g`` may be pruned to: ``min_keep`` of its channels, rounded up to its step."""
    return g.round_width(max(1, math.ceil(min_keep * g.channels)), "up")


def step_width(g: ChannelGroup, width: int, share: float, min_keep: float) -> int:
    """``g``'s width after one step removes ``share`` of its ``width`` channels (at least one unit of
    ``g.step`` channels, never below :func:`min_width`)."""
    units = max(1, round(width * share / g.step))
    return max(min(width, min_width(g, min_keep)), width - units * g.step)


def next_layers(space: PruningSpace) -> dict[str, NextLayer]:
    """Per group, the first of its consumers in network order (kind ``none`` when it has none)."""
    mods = dict(space.model.named_modules())
    owner = {m: g.id for g in space.groups for m in g.modules}
    out = {}
    for g in space.groups:
        if not g.consumers:
            out[g.id] = NextLayer("none", None, 0)
            continue
        name = g.consumers[0]
        m = mods[name]
        if isinstance(m, nn.Linear):
            kind, channels = "linear", m.out_features
        else:
            kind = "depthwise" if is_depthwise(m) else "grouped" if is_grouped(m) else "conv"
            channels = m.out_channels
        out[g.id] = NextLayer(kind, owner.get(name), int(channels))
    return out


def marginal_costs(space: PruningSpace, cost: CostBase, widths: Mapping[str, int], share: float,
                   min_keep: float) -> tuple[float, np.ndarray, np.ndarray]:
    """The cost fraction at ``widths``, and per group (network order) the cost fraction saved per
    channel and the channels one step would remove (one unit where the group is at its floor, so
    that its cost is still probed)."""
    ids = [g.id for g in space.groups]
    base = np.array([widths[i] for i in ids], dtype=np.int64)
    removed = np.array([base[k] - step_width(g, int(base[k]), share, min_keep) for k, g in enumerate(space.groups)])
    probe = np.where(removed > 0, removed, [min(g.step, int(b) - 1) for g, b in zip(space.groups, base)])
    rows = np.repeat(base[None, :], len(ids) + 2, axis=0)
    rows[0] = [g.channels for g in space.groups]
    for k in range(len(ids)):
        rows[2 + k, k] -= max(0, int(probe[k]))
    totals = cost.total(rows).astype(np.float64)
    frac = totals[1:] / totals[0]
    per_channel = np.where(probe > 0, (frac[0] - frac[1:]) / np.maximum(probe, 1), 0.0)
    return float(frac[0]), per_channel, removed


def encode(space: PruningSpace, cost: CostBase, widths: Mapping[str, int], goal: float, share: float,
           min_keep: float, nexts: Mapping[str, NextLayer] | None = None) -> torch.Tensor:
    """The token sequence [groups, :data:`N_FEATURES`] of the network at ``widths``."""
    nexts = nexts if nexts is not None else next_layers(space)
    frac, per_channel, removed = marginal_costs(space, cost, widths, share, min_keep)
    n = len(space.groups)
    density = per_channel * np.array([g.channels for g in space.groups])
    mean = float(np.mean(np.abs(density))) or 1.0
    left = max(frac - goal, 1e-6)
    progress = float(np.clip((1.0 - frac) / max(1.0 - goal, 1e-6), 0.0, 1.0))
    rows = []
    for k, g in enumerate(space.groups):
        w, nxt = widths[g.id], nexts[g.id]
        nw = widths[nxt.group] if nxt.group is not None else nxt.channels
        nfull = space[nxt.group].channels if nxt.group is not None else max(nxt.channels, 1)
        rows.append([*(float(g.kind == c) for c in KINDS), w / g.channels, math.log2(max(w, 1)) / 10,
                     *(float(nxt.kind == c) for c in NEXT_KINDS), nw / nfull, math.log2(max(nw, 1)) / 10,
                     k / max(n - 1, 1), float(np.clip(density[k] / mean, -4, 4)),
                     float(np.clip(per_channel[k] * removed[k] / left, -2, 2)), float(removed[k] > 0), progress])
    return torch.tensor(rows, dtype=torch.float32)
