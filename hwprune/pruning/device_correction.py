"""The device correction: meet a latency target as measured on the device, for any method's result.

A pruning method reaches its goal in *predicted* cost; the device may disagree (fixed per-run
overhead, staircases, a predictor's error). :func:`correct_to_measured` measures the pruned
model, then removes channels (lowest score first) or gives them back (most importance per unit of
cost first) and measures again, until the measured latency lies within the tolerance under the
target.

On a shared host one measurement can mislead: a neighbour that left between two measurements
makes a wider configuration measure faster than a narrower one. Every measurement therefore
comes with a confidence interval (a :class:`Reading`), and the correction never decides on one
whose interval reaches across the target by more than ``overlap`` (:meth:`Reading.ambiguous`):
it measures that configuration again (pooling the rounds), and if the interval still reaches
across it counts the configuration as missing the target. A configuration is kept only on an interval that lies under the
target (up to ``overlap``); when no try has one, the narrowest of the ambiguous tries is kept,
the safe side, and its log entry says so (``decision``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from hwprune.profiling.measure import quantile_interval
from hwprune.pruning.gcp import _by_step, _kept, _min_width, _unit_scores
from hwprune.pruning.objectives import _Base as CostBase
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.pruning.widths import DEFAULT_MIN_KEEP, MeasuredTarget

#: How far (a fraction of the target) a measurement's interval may reach across the target before
#: the measurement counts as ambiguous.
OVERLAP = 0.01


@dataclass
class Reading:
    """A measured latency (ms) with its confidence interval, the per-round values it came from (which
    re-measurements pool) and what the measurement says about the host (for the log)."""

    ms: float
    lo: float
    hi: float
    values: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @classmethod
    def of(cls, x: "Reading | float") -> "Reading":
        """A :class:`Reading` as is; a bare number as a reading without uncertainty."""
        return x if isinstance(x, Reading) else cls(float(x), float(x), float(x))

    @classmethod
    def from_values(cls, values: Sequence[float], info: dict | None = None, level: float = 0.95) -> "Reading":
        """The median of per-round ``values`` with its order-statistic interval (their range when few)."""
        v = [float(x) for x in values]
        lo, hi = quantile_interval(v, 0.5, level)
        return cls(float(np.median(v)), lo, hi, v, dict(info or {}))

    def pooled(self, other: "Reading") -> "Reading":
        """This reading and ``other`` (a re-measurement of the same configuration) as one; without
        per-round values, the newer reading alone."""
        if not (self.values and other.values):
            return other
        info = {k: self.info.get(k, 0) + v if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in other.info.items()}
        return Reading.from_values(self.values + other.values, info)

    def ambiguous(self, target_ms: float, overlap: float = OVERLAP) -> bool:
        """Whether the interval reaches across the target, against its estimate, by more than ``overlap``
        of the target: an estimate under the target whose upper end lies over ``target * (1 + overlap)``,
        or one over it whose lower end lies under ``target * (1 - overlap)``. The measurement then cannot
        tell whether the configuration meets the target."""
        if self.ms <= target_ms:
            return self.hi > target_ms * (1 + overlap)
        return self.lo < target_ms * (1 - overlap)


def _add_back_cost(cost: CostBase, cfg: WidthConfig, step: int = 8) -> dict[str, float]:
    """Per group, the cost of one channel given back at ``cfg`` (:meth:`CostBase.add_back` of ``step``
    channels, rounded up to a multiple of the group's step), floored at a hundredth of the mean
    positive value, because a latency staircase can make a few channels free or even cheaper.

    Restoring by importance alone would ignore what a channel costs: the channels of coupled
    groups (a residual stream feeds several layers) are the most expensive to give back.
    """
    per = _by_step(cost.space, step, lambda k: cost.add_back(cfg, k))
    pos = [v for v in per.values() if v > 0]
    floor = 0.01 * float(np.mean(pos)) if pos else 1.0
    return {gid: max(v, floor) for gid, v in per.items()}


def _alive_of(space: PruningSpace, widths: WidthConfig, keep: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Per group, a boolean mask of the channels ``keep`` names (whole units, ``widths`` of them); a
    group ``keep`` lacks keeps its first ``widths`` channels (:meth:`ChannelGroup.keep_units`)."""
    full = space.validate(widths).widths
    alive = {}
    for g in space.groups:
        w = full[g.id]
        a = np.zeros(g.channels, dtype=bool)
        a[g.check_keep(keep[g.id], w) if g.id in keep else g.keep_units(w // g.step)] = True
        alive[g.id] = a
    return alive


def _widths_of(space: PruningSpace, alive: dict[str, np.ndarray]) -> WidthConfig:
    return WidthConfig(space.name, {gid: int(a.sum()) for gid, a in alive.items()})


def _unit_candidates(space: PruningSpace, alive: dict[str, np.ndarray], values: dict[str, np.ndarray],
                     live: bool) -> list[tuple[float, int, int]]:
    """(value, group index, unit) of every live (``live``) or removed unit, by increasing ``values[gid][unit]``."""
    out = []
    for gi, g in enumerate(space.groups):
        on = alive[g.id][g.units()].all(axis=1)
        out += [(float(values[g.id][u]), gi, int(u)) for u in np.nonzero(on if live else ~on)[0]]
    return sorted(out)


def _prune_units(space: PruningSpace, cost: CostBase, alive: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                 goal: float, base_cost: float, floors: Mapping[str, int]) -> None:
    """Remove live units, lowest mean score first, until the cost is at most ``goal`` of ``base_cost``;
    no group goes below its width in ``floors``."""
    values = {g.id: _unit_scores(g, scores[g.id]) for g in space.groups}
    for _, gi, u in _unit_candidates(space, alive, values, live=True):
        g = space.groups[gi]
        if alive[g.id].sum() <= floors[g.id]:
            continue
        alive[g.id][g.units()[u]] = False
        if cost.total([_widths_of(space, alive)])[0] / base_cost <= goal:
            break


def _restore_units(space: PruningSpace, cost: CostBase, alive: dict[str, np.ndarray], prior: dict[str, np.ndarray],
                   goal: float, base_cost: float) -> None:
    """Give back removed units, most mean ``prior`` per unit of cost first (:func:`_add_back_cost`), each
    one that keeps the cost at most ``goal`` of ``base_cost``. A unit that would pass the goal is skipped,
    not the end: on a latency staircase one channel can cost a step (a width off the blocked kernels'
    multiple) while the next candidates of other groups still fit."""
    unit = _add_back_cost(cost, _widths_of(space, alive))
    values = {g.id: -_unit_scores(g, prior[g.id]) / unit[g.id] for g in space.groups}
    for _, gi, u in _unit_candidates(space, alive, values, live=False):
        g = space.groups[gi]
        alive[g.id][g.units()[u]] = True
        if cost.total([_widths_of(space, alive)])[0] / base_cost > goal:
            alive[g.id][g.units()[u]] = False


def _read(measure, cfg: WidthConfig, kept: dict[str, list[int]], target_ms: float, overlap: float,
          remeasure: int) -> tuple[Reading, int]:
    """Measure a configuration; while the interval is ambiguous, measure again (``remeasure`` times at
    most) and pool. Returns the reading and how often it was measured again."""
    reading = Reading.of(measure(cfg, kept))
    n = 0
    while n < remeasure and reading.ambiguous(target_ms, overlap):
        reading = reading.pooled(Reading.of(measure(cfg, kept)))
        n += 1
    return reading, n


def _choose(log: list[dict], steer: MeasuredTarget, tries: list[tuple[float, object]]) -> object:
    """The try to keep: of those that met the target on a decided interval, the widest by predicted cost
    (:class:`MeasuredTarget`); else the narrowest of the
    ambiguous ones (the safe side), saying so in its entry; else the steering's choice (the last)."""
    if steer.best is not None:
        return steer.best[1]
    ambiguous = [(frac, st) for (frac, st), e in zip(tries, log) if e["ambiguous"]]
    if not ambiguous:
        return steer.chosen()
    frac, state = min(ambiguous, key=lambda x: x[0])
    e = log[state[0]]
    e["decision"] = (f"no try met the target on a decided interval; kept the narrowest of the ambiguous ones "
                     f"(the safe side): ratio {e['ratio']:.3f}, interval [{e['ratio_lo']:.3f}, {e['ratio_hi']:.3f}]")
    return state


def correct_to_measured(space: PruningSpace, cost: CostBase, widths: WidthConfig, keep: dict[str, list[int]],
                        scores: dict[str, np.ndarray], prior: dict[str, np.ndarray] | None,
                        measure: Callable[[WidthConfig, dict[str, list[int]]], "Reading | float"], base_ms: float,
                        target: float, tol: float = 0.03, rounds: int = 4, min_keep: float = DEFAULT_MIN_KEEP,
                        overlap: float = OVERLAP, remeasure: int = 1,
                        floors: Mapping[str, int] | None = None) -> tuple[WidthConfig, dict[str, list[int]], list[dict]]:
    """Meet the target on the device, not only in prediction, for the result of any pruning method.

    ``widths``/``keep`` are a method's configuration and surviving channels (whole units of a
    group with a step; a group ``keep`` lacks keeps its first channels). ``scores`` gives, per
    group, one importance score per channel (higher: more important; the method's own criterion,
    e.g. L1 norms, group norms, GCP's final masked BN scales); ``prior`` ranks the removed
    channels to give back, ``None`` meaning ``scores`` (GCP passes its BN scales before pruning,
    since its final scores of removed channels are zero).

    ``measure(widths, keep)`` returns the measured end-to-end latency of that pruned model, a
    :class:`Reading` with its interval (or a bare number, taken as exact). A reading whose
    interval reaches across the target by more than ``overlap`` is measured again (``remeasure``
    times) and, still ambiguous, counts as a miss (its upper end steers the next goal). While the
    measured ratio to ``base_ms`` is above ``target`` (or more than ``tol`` below it), the
    predicted-cost goal is rescaled by ``target / ratio`` (or, once one goal landed under and one
    over the target, bisected between them) and units (one channel, or one position in every conv
    group of a grouped group) are removed (lowest mean score first, no group below ``min_keep`` of
    its channels, or below its width in ``floors`` where the method set its own floors) or given back (highest mean prior per unit of cost first, see
    :func:`_add_back_cost`), then the model is measured again. Of all tries that met the target on a
    decided interval the one with the largest predicted cost is kept, else the narrowest ambiguous one (see the module's
    docstring). Returns the widths, the surviving channels and one log entry per configuration.
    """
    prior = scores if prior is None else prior
    floors = {g.id: _min_width(g, min_keep) for g in space.groups} if floors is None else dict(floors)
    alive = _alive_of(space, widths, keep)
    log, tries = [], []
    base_cost = float(cost.total([space.full()])[0])
    steer = MeasuredTarget(target, tol)
    for r in range(rounds + 1):
        cfg = _widths_of(space, alive)
        reading, again = _read(measure, cfg, _kept(alive), target * base_ms, overlap, remeasure)
        ambiguous = reading.ambiguous(target * base_ms, overlap)
        ratio = reading.ms / base_ms
        frac = float(cost.total([cfg])[0] / base_cost)
        log.append({"round": r, "measured_ms": reading.ms, "ratio": ratio, "ratio_lo": reading.lo / base_ms,
                    "ratio_hi": reading.hi / base_ms, "ambiguous": ambiguous, "remeasured": again,
                    "predicted_fraction": frac, "widths": dict(cfg.widths), **reading.info})
        state = (r, {gid: a.copy() for gid, a in alive.items()})
        tries.append((frac, state))
        decided = max(ratio, reading.hi / base_ms) if ambiguous else ratio  # ambiguous: judged as a miss
        if steer.record(frac, decided, state) or r == rounds:
            break
        goal = steer.next_goal(frac, decided)
        if goal < frac:  # too slow: remove the least important live units
            _prune_units(space, cost, alive, scores, goal, base_cost, floors)
        else:  # well under the target: give back the removed units with the most prior per unit cost
            _restore_units(space, cost, alive, prior, goal, base_cost)
    kept, alive = _choose(log, steer, tries)
    log[kept]["kept"] = True
    return _widths_of(space, alive), _kept(alive), log
