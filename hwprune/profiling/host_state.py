"""Short timings of the unpruned model: what state a shared host is in right now.

On a VM whose neighbours take a vCPU for seconds or minutes at a time, a 2-thread session
runs at 1-thread speed while they do. Every profiled configuration is therefore tied to the
unpruned model (the *reference*) timed in the same window: a :class:`HostProbe` times it
before the configuration, between its end-to-end timing and its layer profile, and after, and
a :class:`ReferenceWindow` holds those timings. The table's rows are then normalised to one
host state, the table's reference (the fast-state reference), by the ratio of the two
references; a window whose reference moved by more than a tolerance is measured again.
(:func:`~hwprune.profiling.measure.fast_state_reference` lives with the measurement protocol,
which needs nothing but numpy.)

Gated profiling and validation (``--gate``) use the same probe to keep only measurements
taken while the unpruned model ran within the gate of its fastest timing.
(:class:`hwprune.bench.harness.GatedMeter` pairs the reference with every candidate in each
round instead.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hwprune.profiling.backends.base import Backend, ModelArtifact
from hwprune.profiling.onnx_export import export_onnx
from hwprune.profiling.measure import MeasureConfig
from hwprune.pruning.space import PruningSpace

#: One probe: long enough for a stable median of a sub-millisecond model, short enough to repeat often.
PROBE = MeasureConfig(warmup_s=0.05, min_iters=5, min_time_s=0.2, retries=0)


def probe_config(cfg: MeasureConfig) -> MeasureConfig:
    """:data:`PROBE` with ``cfg``'s estimator, and no longer than ``cfg``'s own windows (quick runs)."""
    return replace(PROBE, estimator=cfg.estimator, warmup_s=min(PROBE.warmup_s, cfg.warmup_s),
                   min_time_s=min(PROBE.min_time_s, cfg.min_time_s), min_iters=min(PROBE.min_iters, cfg.min_iters))


class HostProbe:
    """Times each model's unpruned network on ``backend`` and remembers the fastest timing per model.

    A probe summarises its window with the backend's own estimator, so that probes and the
    measurements they anchor are the same kind of number."""

    def __init__(self, backend: Backend, batch: int, directory: str | Path):
        self.backend, self.batch, self.dir = backend, batch, Path(directory)
        self.best: dict[str, float] = {}
        self._refs: dict[str, ModelArtifact] = {}

    def reference(self, model: str, space: PruningSpace) -> ModelArtifact:
        """The unpruned model, ready for the backend (exported once, then reused)."""
        if model not in self._refs:
            shape = (self.batch, *space.input_shape[1:])
            art = ModelArtifact(input_shape=shape, module=space.model.eval(), name=f"{model}/reference")
            if self.backend.needs_onnx():
                art.onnx_path = export_onnx(space.model.eval(), shape, self.dir / f"reference-{model}.onnx")
            self._refs[model] = art
        return self._refs[model]

    def __call__(self, model: str, space: PruningSpace) -> float:
        ref = self.reference(model, space)
        keep = self.backend.measure_cfg
        self.backend.measure_cfg = probe_config(keep)
        try:
            ms = self.backend.measure_e2e(ref).value_ms
        finally:
            self.backend.measure_cfg = keep
        self.best[model] = min(self.best.get(model, ms), ms)
        return ms

    def fast(self, model: str, ms: float, gate: float) -> bool:
        """Whether a probe of ``ms`` lies within ``gate`` of the fastest timing of ``model``."""
        return ms <= (1 + gate) * self.best[model]


@dataclass
class ReferenceWindow:
    """The reference's timings around one configuration, in order: before its end-to-end timing,
    between that and its layer profile, after the layer profile."""

    timings_ms: list[float] = field(default_factory=list)

    @property
    def moved(self) -> float:
        """How far the reference moved within the window: ``max / min - 1`` of its timings."""
        t = self.timings_ms
        return max(t) / min(t) - 1 if len(t) > 1 else 0.0

    def steady(self, tolerance: float) -> bool:
        return self.moved <= tolerance

    def e2e_ms(self) -> float:
        """The reference of the end-to-end timing: the mean of the timings before and after it."""
        return float(np.mean(self.timings_ms[:2]))

    def layers_ms(self) -> float:
        """The reference of the layer profile (and isolated units): the mean of the last two timings."""
        return float(np.mean(self.timings_ms[-2:]))
