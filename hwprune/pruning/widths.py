"""Turn a target into a width configuration, and a width configuration into a smaller model.

Baseline pruners, each driven to the same kind of target (a fraction of the base model's
cost under an objective: parameters, FLOPs, activation memory or predicted latency):

* ``uniform``: the same fraction of channels in every group (survivors chosen by L1);
* ``l1``: L1-norm filter pruning, channels ranked globally by their group-normalised L1 norm;
* ``groupnorm``: Torch-Pruning's group-norm criterion, ranked globally the same way.

``round_to_staircase`` moves each group's width to where the device's latency staircase
makes it cheapest, using the predictor rather than a fixed multiple.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch.nn as nn

from hwprune.pruning.objectives import _Base as CostBase
from hwprune.errors import HwpruneError
from hwprune.pruning.importance import channel_importance, keep_indices
from hwprune.pruning.space import PruningSpace, WidthConfig

METHODS = ("uniform", "l1", "groupnorm")


@dataclass
class PruneResult:
    widths: WidthConfig
    keep: dict[str, list[int]]
    cost_fraction: float
    objective: str
    target: float
    method: str
    info: dict = field(default_factory=dict)


def _check_target(cost: CostBase, target: float, floor: WidthConfig) -> None:
    if not 0 < target <= 1:
        raise HwpruneError(f"target must be a fraction in (0, 1], got {target}")
    least = cost.fraction(floor)
    if target < least:
        raise HwpruneError(f"target {target:.3f} of the base {cost.name} is below what the narrowest configuration "
                           f"reaches ({least:.3f})", "choose a larger target")


def search_uniform(space: PruningSpace, cost: CostBase, target: float, multiple: int = 1,
                   min_fraction: float = 0.05) -> WidthConfig:
    """The widest uniform shrink whose cost is at most ``target`` of the base cost."""
    floor = space.uniform(min_fraction)
    _check_target(cost, target, floor)
    fractions = np.linspace(min_fraction, 1.0, 400)
    cfgs = [space.uniform(f, multiple=multiple) for f in fractions]
    base = float(cost.total([space.full()])[0])
    fr = cost.total(cfgs) / base
    ok = np.nonzero(fr <= target + 1e-12)[0]
    return cfgs[int(ok[-1])] if len(ok) else floor


DEFAULT_MIN_KEEP = 0.2  # every group keeps at least this fraction of its channels unless told otherwise


def removal_order(space: PruningSpace, scores: Mapping[str, np.ndarray], min_keep: float = DEFAULT_MIN_KEEP) -> list[int]:
    """Group index of each removal in global removal order (least important first).

    A removal takes one unit of its group: one channel, or ``step`` channels (one position
    in every conv group) of a group with grouped convolutions, scored by their mean.
    Scores are normalised by their group's mean so that groups compare fairly (as
    Torch-Pruning's global pruning does); every group keeps ``min_keep`` of its channels.
    """
    entries = []
    for gi, g in enumerate(space.groups):
        s = np.asarray(scores[g.id], dtype=np.float64)
        s = (s / (s.mean() + 1e-12))[g.units()].mean(axis=1)
        keep = max(1, math.ceil(min_keep * len(s)))
        removable = np.sort(s)[: len(s) - keep]
        entries += [(float(v), gi) for v in removable]
    entries.sort()
    return [gi for _, gi in entries]


def first_prefix_within(cost: CostBase, widths: np.ndarray, order: list[int], budget: float,
                        stride: int = 16, unit: Sequence[int] | None = None) -> tuple[np.ndarray, int]:
    """Apply removals one at a time (group index ``order[k]`` at step ``k``) to ``widths``; a
    removal takes ``unit[g]`` channels of group ``g`` (1 by default; the groups' steps for the
    order :func:`removal_order` gives).

    Returns the width matrix of every prefix of removals and the length of the shortest
    prefix whose cost is at most ``budget`` (all of them when none is). Costs are taken on
    every ``stride``-th prefix first, then exactly inside the first bracket that meets the
    budget, so a long removal order costs few predictions.
    """
    steps = np.zeros((len(order) + 1, len(widths)), dtype=np.int64)
    if order:
        steps[np.arange(1, len(order) + 1), order] = 1 if unit is None else np.asarray(unit)[order]
    W = np.asarray(widths)[None, :] - np.cumsum(steps, axis=0)
    coarse = np.arange(0, len(W), stride)
    hit = np.nonzero(cost.total(W[coarse]) <= budget * (1 + 1e-12))[0]
    end = int(coarse[hit[0]]) if len(hit) else len(W) - 1
    fine = np.arange(max(0, end - stride), end + 1)
    ok = np.nonzero(cost.total(W[fine]) <= budget * (1 + 1e-12))[0]
    return W, int(fine[ok[0]]) if len(ok) else len(W) - 1


def search_global(space: PruningSpace, scores: Mapping[str, np.ndarray], cost: CostBase, target: float,
                  min_keep: float = DEFAULT_MIN_KEEP) -> WidthConfig:
    """Remove the globally least important channels until the cost is at most ``target``."""
    order = removal_order(space, scores, min_keep)
    caps = np.array([g.channels for g in space.groups])
    unit = np.array([g.step for g in space.groups])
    floor = caps.copy()
    np.subtract.at(floor, order, unit[order])
    _check_target(cost, target, WidthConfig(space.name, dict(zip([g.id for g in space.groups], floor.tolist()))))
    W, n = first_prefix_within(cost, caps, order, target * float(cost.total(caps[None, :])[0]), unit=unit)
    return WidthConfig(space.name, dict(zip([g.id for g in space.groups], W[n].tolist())))


def round_to_staircase(space: PruningSpace, latency: CostBase, widths: WidthConfig, window: int = 8) -> WidthConfig:
    """Move each group to the widest width within ±``window`` that is predicted no slower.

    Latency on real hardware is a staircase in the channel count (SIMD blocks, kernel
    selection, layout reorders), so a few more channels are often free and a few fewer
    may not save anything. Groups are visited in order, each with the others fixed. Only
    a group's valid widths are candidates; a group whose step exceeds ``window`` (grouped
    convolutions) looks one step either way.
    """
    cur = dict(space.validate(widths).widths)
    for g in space.groups:
        w = cur[g.id]
        reach = max(window, g.step)
        cands = [c for c in g.valid_widths() if abs(c - w) <= reach]
        cfgs = [{**cur, g.id: c} for c in cands]
        t = latency.total(cfgs)
        ref = t[cands.index(w)]
        ok = [c for c, v in zip(cands, t) if v <= ref * (1 + 1e-6)]
        cur[g.id] = max(ok)
    return WidthConfig(space.name, cur)


class MeasuredTarget:
    """Steers a predicted-cost goal until a measured latency ratio lands in ``[target - tol, target]``.

    Latency is a staircase, not a line: the next goal scales the last one by the miss until one
    goal has landed under and one over the target, then bisects between them. Of all tries that
    met the target, the one with the largest predicted fraction is kept (the measured ratio breaks
    ties), else the last one: between two configurations that both measured under the target, a
    noisy host can make the wider one measure faster, and the cost model orders them more
    reliably than two readings a few per cent apart.
    """

    def __init__(self, target: float, tol: float = 0.03):
        self.target, self.tol = target, tol
        self.lo: float | None = None  # largest predicted fraction measured under the target
        self.hi: float | None = None  # smallest predicted fraction measured over it
        self.best: tuple[tuple[float, float], object] | None = None  # ((fraction, ratio), state) of the kept try
        self.last: object = None

    def record(self, fraction: float, ratio: float, state: object) -> bool:
        """Record one measured try; True when it met the target within the tolerance."""
        self.last = state
        if ratio <= self.target:
            self.lo = fraction if self.lo is None else max(self.lo, fraction)
            if self.best is None or (fraction, ratio) > self.best[0]:
                self.best = ((fraction, ratio), state)
        else:
            self.hi = fraction if self.hi is None else min(self.hi, fraction)
        return self.target - self.tol <= ratio <= self.target

    def next_goal(self, fraction: float, ratio: float) -> float:
        if self.lo is not None and self.hi is not None:
            return 0.5 * (self.lo + self.hi)
        return fraction * self.target / ratio

    def chosen(self) -> object:
        return self.best[1] if self.best is not None else self.last


def prune_widths(space: PruningSpace, method: str, cost: CostBase, target: float, model: nn.Module | None = None,
                 criterion: str | None = None, min_keep: float = DEFAULT_MIN_KEEP) -> PruneResult:
    """A baseline method's width configuration and surviving channels for ``target``."""
    if method not in METHODS:
        raise HwpruneError(f"unknown pruning method '{method}'", f"choose one of {', '.join(METHODS)} (or gcp)")
    crit = criterion or {"uniform": "l1", "l1": "l1", "groupnorm": "groupnorm"}[method]
    scores = channel_importance(space, model, crit)
    if method == "uniform":
        cfg = search_uniform(space, cost, target)
    else:
        cfg = search_global(space, scores, cost, target, min_keep=min_keep)
    return PruneResult(widths=cfg, keep=keep_indices(scores, cfg, space), cost_fraction=cost.fraction(cfg),
                       objective=cost.name, target=target, method=method, info={"criterion": crit})
