"""A learned sampling distribution over a width grid (PSE-Net's prior-distributed sampling).

Configurations that meet a tight budget are rare under uniform sampling, so the search draws
its population and mutations from per-group distributions learned while the supernet trains.

The formula. For each group ``g`` and each width ``c`` on its grid, a score ``s[g, c]`` is an
exponential moving average (factor ``momentum``, the first observation taken as is) of the
*credited loss* of the subnets that used width ``c`` for group ``g``:

* ``update(widths, loss)`` credits ``loss`` itself;
* ``update(widths, loss, size=f)`` (``f``: the subnet's cost as a fraction of the full
  network's, e.g. its FLOPs) credits the loss *in excess of* what subnets of that size reach:
  ``loss - (a + b * f)``, with ``a + b * f`` a least-squares line of loss on size fitted to the
  past updates (exponentially weighted, factor ``trend_momentum``). Without it the widest width
  of every group always scores best, because wider subnets always have lower loss;
* ``loss`` may be a mapping ``{group_id: loss}`` (and ``size`` one as well), so that each group
  is credited with the loss of the part of the network it lives in (stage-wise distillation).

Widths never used score the mean of the group's used widths. Probabilities are a softmax of
the negated scores with temperature ``temperature`` times the typical loss ``L`` (an
exponential moving average of the losses seen), mixed with the uniform distribution::

    p[g, c] = (1 - uniform_mix) * softmax_c(-(s[g, c] - min_c s[g, c]) / (temperature * L)) + uniform_mix / n_g

so a width whose subnets lose ``temperature * L`` more than the best width's is ``e`` times
less likely, and no width ever becomes impossible.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.pruning.space import WidthConfig
from hwprune.search.grid import WidthGrid, draw_index

_TREND_KEYS = ("w", "s", "ss", "l", "sl")  # weighted sums: 1, size, size^2, loss, size*loss


class SamplingPrior:
    """Per-group probabilities over a :class:`WidthGrid`, learned from training losses."""

    def __init__(self, grid: WidthGrid, temperature: float = 0.05, momentum: float = 0.1,
                 uniform_mix: float = 0.2, trend_momentum: float = 0.02):
        if temperature <= 0 or not 0 < momentum <= 1 or not 0 <= uniform_mix <= 1 or not 0 < trend_momentum <= 1:
            raise HwpruneError("prior settings out of range: temperature > 0, momentum and trend momentum in (0, 1], "
                               "uniform mix in [0, 1]")
        self.grid = grid
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.uniform_mix = float(uniform_mix)
        self.trend_momentum = float(trend_momentum)
        self.scores = {g: np.full(len(grid.choices(g)), np.nan) for g in grid.groups}
        self.counts = {g: np.zeros(len(grid.choices(g)), dtype=np.int64) for g in grid.groups}
        self.trends = {g: dict.fromkeys(_TREND_KEYS, 0.0) for g in grid.groups}
        self.loss_scale: float | None = None
        self.updates = 0
        self.sized: bool | None = None  # whether updates carry subnet sizes (decided by the first update)

    @classmethod
    def uniform(cls, grid: WidthGrid, **kw) -> "SamplingPrior":
        """A prior that has seen nothing: uniform over every group's grid widths."""
        return cls(grid, **kw)

    # -- learning ------------------------------------------------------------------------
    def update(self, widths: WidthConfig | Mapping[str, int], loss: float | Mapping[str, float],
               size: float | Mapping[str, float] | None = None) -> None:
        """Credit the subnet ``widths`` (on the grid) with ``loss``; see the module docstring."""
        if self.sized is not None and self.sized != (size is not None):
            raise HwpruneError("a sampling prior's updates must all carry a subnet size, or none")
        self.sized = size is not None
        pos = self.grid.index(widths)
        losses = {g: float(loss[g] if isinstance(loss, Mapping) else loss) for g in self.grid.groups}
        if not all(np.isfinite(v) for v in losses.values()):
            return  # a diverged step teaches nothing
        sizes = {g: float(size[g] if isinstance(size, Mapping) else size) for g in self.grid.groups} if self.sized else {}
        mean_loss = float(np.mean(list(losses.values())))
        self.loss_scale = abs(mean_loss) if self.loss_scale is None else (
            (1 - self.momentum) * self.loss_scale + self.momentum * abs(mean_loss))
        for g, i in pos.items():
            if self.sized:  # the line includes this update, so that the first credits are residuals too
                self._fit_trend(g, sizes[g], losses[g])
            credit = losses[g] - self._trend(g, sizes[g]) if self.sized else losses[g]
            s = self.scores[g]
            s[i] = credit if self.counts[g][i] == 0 else (1 - self.momentum) * s[i] + self.momentum * credit
            self.counts[g][i] += 1
        self.updates += 1

    def _trend(self, gid: str, size: float) -> float:
        """The loss the fitted line expects at ``size`` (the running mean loss until two sizes were seen)."""
        t = self.trends[gid]
        ms, ml = t["s"] / t["w"], t["l"] / t["w"]
        var = t["ss"] / t["w"] - ms * ms
        if var <= 1e-12:
            return ml
        slope = (t["sl"] / t["w"] - ms * ml) / var
        return ml + slope * (size - ms)

    def _fit_trend(self, gid: str, size: float, loss: float) -> None:
        t, a = self.trends[gid], self.trend_momentum
        for k, v in zip(_TREND_KEYS, (1.0, size, size * size, loss, size * loss)):
            t[k] = (1 - a) * t[k] + a * v

    # -- sampling ------------------------------------------------------------------------
    def probs(self, gid: str) -> np.ndarray:
        """Probabilities over ``grid.choices(gid)`` (they sum to 1)."""
        n = len(self.grid.choices(gid))
        s, seen = self.scores[gid], self.counts[gid] > 0
        if not seen.any() or self.loss_scale is None:
            return np.full(n, 1.0 / n)
        filled = np.where(seen, s, s[seen].mean())
        z = -(filled - filled.min()) / (self.temperature * max(self.loss_scale, 1e-8))
        p = np.exp(z - z.max())
        p = (1 - self.uniform_mix) * p / p.sum() + self.uniform_mix / n
        return p / p.sum()

    def sample(self, rng) -> WidthConfig:
        """One configuration, each group's width drawn from :meth:`probs` (numpy Generator or random.Random)."""
        return WidthConfig(self.grid.model, {g: self.grid.choices(g)[draw_index(rng, len(self.grid.choices(g)),
                                                                                  self.probs(g))]
                                             for g in self.grid.groups})

    def has_data(self, min_updates: int = 1) -> bool:
        return self.updates >= min_updates

    # -- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"grid": self.grid.to_dict(), "temperature": self.temperature, "momentum": self.momentum,
                "uniform_mix": self.uniform_mix, "trend_momentum": self.trend_momentum,
                "loss_scale": self.loss_scale, "updates": self.updates, "sized": self.sized,
                "scores": {g: [None if np.isnan(v) else float(v) for v in s] for g, s in self.scores.items()},
                "counts": {g: c.tolist() for g, c in self.counts.items()},
                "trends": {g: dict(t) for g, t in self.trends.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping, grid: WidthGrid | None = None) -> "SamplingPrior":
        try:
            grid = grid or WidthGrid.from_dict(d["grid"])
            p = cls(grid, d["temperature"], d["momentum"], d["uniform_mix"], d["trend_momentum"])
            for g in grid.groups:
                n = len(grid.choices(g))
                scores, counts = d["scores"][g], d["counts"][g]
                if len(scores) != n or len(counts) != n:
                    raise ValueError(f"group {g} has {len(scores)} scores for {n} grid widths")
                p.scores[g] = np.array([np.nan if v is None else float(v) for v in scores])
                p.counts[g] = np.asarray(counts, dtype=np.int64)
                p.trends[g] = {k: float(d["trends"][g][k]) for k in _TREND_KEYS}
        except (KeyError, TypeError, ValueError) as e:
            raise HwpruneError(f"a sampling prior is incomplete or does not fit its width grid: {e}") from None
        p.loss_scale = None if d.get("loss_scale") is None else float(d["loss_scale"])
        p.updates, p.sized = int(d.get("updates", 0)), d.get("sized")
        return p

    @classmethod
    def from_json(cls, text: str | Mapping, grid: WidthGrid | None = None) -> "SamplingPrior":
        if isinstance(text, Mapping):
            return cls.from_dict(text, grid)
        try:
            return cls.from_dict(json.loads(text), grid)
        except json.JSONDecodeError as e:
            raise HwpruneError(f"a sampling prior is not valid JSON: {e.msg} at line {e.lineno}") from None
