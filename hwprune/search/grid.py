"""The widths a supernet trains and a search may choose: a sorted list per channel group.

A :class:`WidthGrid` gives every channel group of a :class:`~hwprune.pruning.space.PruningSpace`
(coupled layers share one group, so they share one width) a short sorted list of allowed
widths. :meth:`WidthGrid.for_space` builds it from fractions of each group's full width,
rounded to the group's step (grouped convolutions keep their conv groups) and, with a latency
predictor of the target device, moved up the device's latency staircase: a width is replaced
by the widest valid width within a few channels that is predicted no slower, so that the grid
holds no width that costs as much as a wider one. The full width is always on the grid.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.pruning.space import PruningSpace, WidthConfig

DEFAULT_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STAIRCASE_WINDOW = 8  # channels either side of a grid width where a wider, no slower width is looked for


def draw_index(rng, n: int, p: np.ndarray | None = None) -> int:
    """One index in ``range(n)`` (weighted by ``p``) from a :class:`numpy.random.Generator` or a
    :class:`random.Random`."""
    if isinstance(rng, random.Random):
        return rng.choices(range(n), weights=None if p is None else list(p))[0]
    return int(rng.choice(n, p=p))


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fr = tuple(float(f) for f in fractions)
    if not fr or any(not 0.0 < f <= 1.0 for f in fr):
        raise HwpruneError(f"width fractions must lie in (0, 1], got {', '.join(f'{f:g}' for f in fr) or 'none'}")
    return tuple(sorted(set(fr)))


@dataclass
class WidthGrid:
    """Allowed widths per channel group: ``{group_id: [w1 < w2 < ... < full]}``."""

    model: str
    widths: dict[str, list[int]]
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    staircase: bool = False  # whether the widths were moved along a latency predictor's staircase
    _full: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.widths = {str(g): sorted({int(w) for w in ws}) for g, ws in self.widths.items()}
        if not self.widths or any(not ws or ws[0] < 1 for ws in self.widths.values()):
            raise HwpruneError("a width grid needs at least one positive width for every group")
        self._full = {g: ws[-1] for g, ws in self.widths.items()}

    @classmethod
    def for_space(cls, space: PruningSpace, fractions: Sequence[float] = DEFAULT_FRACTIONS, predictor=None,
                  cost=None, window: int = STAIRCASE_WINDOW) -> "WidthGrid":
        """Fractions of every group's full width, rounded to the group's step.

        With ``predictor`` (a fitted latency predictor of the target device) or ``cost`` (any
        cost model with ``total(configs)``, e.g. :class:`~hwprune.pruning.objectives.LatencyCost`)
        each width moves to the widest valid width within ``window`` channels whose
        configuration (the other groups at full width) is predicted no slower.
        """
        fr = check_fractions(fractions)
        if predictor is not None and cost is None:
            from hwprune.pruning.objectives import LatencyCost

            cost = LatencyCost(space, predictor)
        widths = {}
        for g in space.groups:
            ws = {g.round_width(f * g.channels) for f in fr} | {g.channels}
            if cost is not None:
                ws = {_up_the_staircase(space, cost, g.id, w, window) for w in ws}
            widths[g.id] = sorted(ws)
        return cls(space.name, widths, fr, staircase=cost is not None)

    # -- queries -----------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.widths)

    def choices(self, gid: str) -> list[int]:
        if gid not in self.widths:
            raise HwpruneError(f"the width grid has no channel group '{gid}'")
        return list(self.widths[gid])

    def full(self) -> WidthConfig:
        return WidthConfig(self.model, dict(self._full))

    def narrowest(self) -> WidthConfig:
        return WidthConfig(self.model, {g: ws[0] for g, ws in self.widths.items()})

    def random(self, rng) -> WidthConfig:
        """A configuration with every group's width drawn uniformly from its choices."""
        return WidthConfig(self.model, {g: ws[draw_index(rng, len(ws))] for g, ws in self.widths.items()})

    def index(self, widths: WidthConfig | Mapping[str, int]) -> dict[str, int]:
        """The position of each group's width in its choices (one-line error when off the grid)."""
        w = widths.widths if isinstance(widths, WidthConfig) else widths
        out = {}
        for g, ws in self.widths.items():
            v = int(w.get(g, ws[-1]))
            if v not in ws:
                raise HwpruneError(f"width {v} of group '{g}' is not on the width grid ({', '.join(map(str, ws))})")
            out[g] = ws.index(v)
        return out

    def contains(self, widths: WidthConfig | Mapping[str, int]) -> bool:
        try:
            self.index(widths)
        except HwpruneError:
            return False
        return True

    def snap(self, widths: WidthConfig | Mapping[str, int], mode: str = "nearest") -> WidthConfig:
        """Each group's width moved to the nearest grid width ("down"/"up": at most/at least it where one exists)."""
        w = widths.widths if isinstance(widths, WidthConfig) else widths
        out = {}
        for g, ws in self.widths.items():
            v, arr = int(w.get(g, ws[-1])), np.asarray(ws)
            if mode == "down":
                out[g] = int(arr[arr <= v].max()) if (arr <= v).any() else ws[0]
            elif mode == "up":
                out[g] = int(arr[arr >= v].min()) if (arr >= v).any() else ws[-1]
            else:
                out[g] = int(arr[np.argmin(np.abs(arr - v))])
        return WidthConfig(self.model, out)

    def size(self) -> float:
        """How many configurations the grid holds (a float: it overflows integers quickly)."""
        return float(np.prod([float(len(ws)) for ws in self.widths.values()]))

    def check_space(self, space: PruningSpace) -> None:
        """One-line error unless the grid covers exactly ``space``'s groups within their widths."""
        ids = [g.id for g in space.groups]
        if sorted(ids) != sorted(self.widths):
            missing = sorted(set(ids) ^ set(self.widths))
            raise HwpruneError(f"the width grid is for another pruning space of {space.name} "
                               f"(groups differ: {', '.join(missing[:3])})")
        for g in space.groups:
            for w in self.widths[g.id]:
                g.check_width(w)

    # -- files -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"model": self.model, "fractions": list(self.fractions), "staircase": self.staircase,
                "widths": {g: list(ws) for g, ws in self.widths.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping) -> "WidthGrid":
        if not isinstance(d, Mapping) or not isinstance(d.get("widths"), Mapping):
            raise HwpruneError("a width grid must be a JSON object with a 'widths' mapping",
                               'expected {"model": NAME, "widths": {GROUP_ID: [widths]}}')
        return cls(str(d.get("model", "")), {g: list(ws) for g, ws in d["widths"].items()},
                   tuple(d.get("fractions", DEFAULT_FRACTIONS)), bool(d.get("staircase", False)))

    @classmethod
    def from_json(cls, text: str | Mapping) -> "WidthGrid":
        if isinstance(text, Mapping):
            return cls.from_dict(text)
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise HwpruneError(f"a width grid is not valid JSON: {e.msg} at line {e.lineno}") from None


def _up_the_staircase(space: PruningSpace, cost, gid: str, width: int, window: int) -> int:
    """The widest valid width of group ``gid`` within ``window`` of ``width`` whose configuration
    (the other groups at full width) costs no more than ``width``'s."""
    g = space[gid]
    reach = max(window, g.step)
    cands = [c for c in g.valid_widths() if abs(c - width) <= reach]
    full = space.full().widths
    t = np.asarray(cost.total([{**full, gid: c} for c in cands]), dtype=np.float64)
    ref = t[cands.index(width)]
    return int(max(c for c, v in zip(cands, t) if v <= ref * (1 + 1e-6)))
