"""Which width configurations a calibration measures.

A calibration measures few configurations, so they must cover the width space and the
latency range: the unpruned model, the uniform shrinks predicted (by the source predictor)
to run at 1/2 and 1/3 of its latency, then configurations chosen by greedy k-centre on the
groups' kept fractions (``width / channels`` per group): each next one is the candidate
farthest, in Euclidean distance, from every configuration chosen so far. Candidates are
random configurations of the space (:meth:`PruningSpace.sample`, a fixed seed) and a ladder
of uniform shrinks. Where the source's latency cannot reach 1/2 or 1/3 of the unpruned
model's with a uniform shrink (a model dominated by fixed costs), the uniform shrink keeping
that fraction of the FLOPs stands in for it.

The choice is deterministic (same space, predictor, count and seed: same configurations), and
the first ``k`` configurations of a larger calibration are those of a smaller one.
"""

from __future__ import annotations

import random

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.pruning.space import PruningSpace, WidthConfig

#: random candidates the k-centre choice picks from
POOL = 400
#: uniform shrinks among the candidates
LADDER = tuple(np.round(np.linspace(0.15, 0.95, 17), 3))


#: uniform shrinks the 1/2 and 1/3 anchors are picked from
ANCHOR_GRID = tuple(np.round(np.linspace(0.05, 1.0, 96), 4))


def _widest_within(cfgs: list[WidthConfig], cost: np.ndarray, fraction: float) -> WidthConfig | None:
    """The widest of ``cfgs`` (ordered narrow to wide) whose cost is at most ``fraction`` of the
    last one's, or None when none is."""
    ok = np.nonzero(cost / cost[-1] <= fraction + 1e-12)[0]
    return cfgs[int(ok[-1])] if len(ok) else None


def anchors(space: PruningSpace, predictor) -> list[tuple[str, WidthConfig]]:
    """The unpruned model and the uniform shrinks at 1/2 and 1/3 of its predicted latency (of its
    FLOPs where the predicted latency of no uniform shrink is that low)."""
    from hwprune.pruning.objectives import FlopsCost

    grid = [space.uniform(float(f)) for f in ANCHOR_GRID]
    latency = np.asarray(predictor.predict(space.name, grid), dtype=np.float64)
    flops = np.asarray(FlopsCost(space).total(grid), dtype=np.float64)
    out = [("full", space.full())]
    for name, frac in (("uniform_x2", 1 / 2), ("uniform_x3", 1 / 3)):
        out.append((name, _widest_within(grid, latency, frac) or _widest_within(grid, flops, frac) or grid[0]))
    return out


def _fractions(space: PruningSpace, cfgs: list[WidthConfig]) -> np.ndarray:
    channels = np.array([g.channels for g in space.groups], dtype=np.float64)
    return np.array([[c.widths[g.id] for g in space.groups] for c in cfgs], dtype=np.float64) / channels


def candidates(space: PruningSpace, seed: int = 0, pool: int = POOL) -> list[WidthConfig]:
    """The configurations the k-centre choice picks from (deterministic in ``seed``)."""
    rng = random.Random(seed)
    return [space.uniform(float(f)) for f in LADDER] + [space.sample(rng) for _ in range(pool)]


def choose_configs(space: PruningSpace, predictor, k: int, seed: int = 0,
                   pool: int = POOL) -> list[tuple[str, WidthConfig]]:
    """``k`` (id, configuration) pairs: :func:`anchors` first, then greedy k-centre."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise HwpruneError(f"a calibration measures at least one configuration, got {k!r}", "pass --samples 1 or more")
    chosen: list[tuple[str, WidthConfig]] = []
    for cid, cfg in anchors(space, predictor):
        if all(cfg.widths != c.widths for _, c in chosen):
            chosen.append((cid, cfg))
    chosen = chosen[:k]
    pool_cfgs = candidates(space, seed, pool)
    P = _fractions(space, pool_cfgs)
    dist = np.min([np.linalg.norm(P - x, axis=1) for x in _fractions(space, [c for _, c in chosen])], axis=0)
    while len(chosen) < k:
        i = int(np.argmax(dist))  # the first of equally far candidates
        if dist[i] <= 0:
            break  # the space holds fewer distinct configurations than asked for
        chosen.append((f"c{len(chosen):03d}", pool_cfgs[i]))
        dist = np.minimum(dist, np.linalg.norm(P - P[i], axis=1))
    return chosen
