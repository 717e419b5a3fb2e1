"""Cost objectives behind one interface: parameters, FLOPs, activation memory, latency.

Each objective gives a model's total cost for any number of width configurations at once,
and each channel group's *marginal* cost: what removing ``step`` channels of that group
saves at the current widths. Pruning methods consume the marginal costs; for latency they
come from the device's predictor and change with the widths (staircases, fusions), so
methods must ask again after every pruning step.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.profiling.layer_shapes import ModelTemplate

OBJECTIVES = ("params", "flops", "memory", "latency")


class CostModel(Protocol):
    name: str
    unit: str

    def total(self, configs: Sequence[WidthConfig | Mapping[str, int]] | np.ndarray) -> np.ndarray: ...

    def marginal(self, config: WidthConfig | Mapping[str, int], step: int = 1) -> dict[str, float]: ...


def _shifted_totals(cost, config, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Costs of ``config`` and of ``config`` with each group in turn moved by ``step`` channels
    (clamped to 1..full), and the number of channels each group really moved."""
    base = cost.template.width_matrix([config])[0]
    full = cost.template.width_matrix([cost.space.full()])[0]
    rows = [base]
    for i in range(len(base)):
        r = base.copy()
        r[i] = min(full[i], max(1, r[i] + step))
        rows.append(r)
    rows = np.stack(rows)
    return cost.total(rows).astype(np.float64), np.abs(rows[1:] - base).diagonal()


class _Base:
    name = "base"
    unit = ""

    def __init__(self, space: PruningSpace):
        self.space = space
        self.template = ModelTemplate(space)

    def _matrix(self, configs) -> np.ndarray:
        return configs if isinstance(configs, np.ndarray) else self.template.width_matrix(list(configs))

    def total(self, configs) -> np.ndarray:
        raise NotImplementedError

    def marginal(self, config, step: int = 1) -> dict[str, float]:
        t, _ = _shifted_totals(self, config, -step)
        return {gid: float(t[0] - t[1 + i]) for i, gid in enumerate(self.template.group_ids)}

    def add_back(self, config, step: int = 8) -> dict[str, float]:
        """Per group, the cost of one more channel at ``config``: the cost of ``step`` more
        (fewer where the group is nearly whole) divided by their number."""
        t, moved = _shifted_totals(self, config, step)
        return {gid: float((t[1 + i] - t[0]) / max(1, moved[i])) for i, gid in enumerate(self.template.group_ids)}

    def fraction(self, config) -> float:
        """Cost of ``config`` relative to the unpruned model."""
        t = self.total(np.stack([self.template.width_matrix([config])[0],
                                 self.template.width_matrix([self.space.full()])[0]]))
        return float(t[0] / t[1])


class ParamsCost(_Base):
    name, unit = "params", "parameters"

    def total(self, configs) -> np.ndarray:
        return self.template.params(self._matrix(configs))


class FlopsCost(_Base):
    name, unit = "flops", "MACs"

    def total(self, configs) -> np.ndarray:
        return self.template.macs(self._matrix(configs))


class MemoryCost(_Base):
    name, unit = "memory", "activation elements"

    def total(self, configs) -> np.ndarray:
        return self.template.activations(self._matrix(configs))


class LatencyCost(_Base):
    """Latency (ms) at the table's batch size, from a fitted :class:`LatencyPredictor`.

    ``throughput=True`` turns it into the cost of 1/throughput at that batch (ms per
    image), which orders configurations the same way but reads as GCP-λ's throughput form.
    """

    name, unit = "latency", "ms"

    def __init__(self, space: PruningSpace, predictor, throughput: bool = False):
        super().__init__(space)
        predictor.check_model(space.name)
        self.predictor = predictor
        self.per_image = throughput
        self.batch = int(predictor.settings_.get("batch") or 1)

    def total(self, configs) -> np.ndarray:
        t = self.predictor.predict(self.space.name, self._matrix(configs))
        return t / self.batch if self.per_image else t


def objective(name: str, space: PruningSpace, predictor=None) -> _Base:
    """The cost model called ``name`` for ``space`` (latency needs a fitted predictor)."""
    if name == "params":
        return ParamsCost(space)
    if name == "flops":
        return FlopsCost(space)
    if name == "memory":
        return MemoryCost(space)
    if name in ("latency", "throughput"):
        if predictor is None:
            raise HwpruneError(f"the {name} objective needs a latency table of the target device", "pass --table")
        return LatencyCost(space, predictor, throughput=name == "throughput")
    raise HwpruneError(f"unknown objective '{name}'", f"choose one of {', '.join(OBJECTIVES)} or throughput")
