"""Short timings of the unpruned model: what state a shared host is in right now.

On a VM whose neighbours take a vCPU for seconds or minutes at a time, a 2-thread session
runs at 1-thread speed while they do. Gated profiling (``hwprune profile --gate``) and
gated validation (``hwprune validate --gate``) bracket their measurements with a
:class:`HostProbe` and keep only those taken while the unpruned model ran within the gate
of its fastest timing. (:class:`hwprune.bench.harness.GatedMeter` pairs the reference with every
candidate in each round instead.)
"""

from __future__ import annotations

from pathlib import Path

from hwprune.profiling.backends.base import Backend, ModelArtifact
from hwprune.profiling.onnx_export import export_onnx
from hwprune.profiling.measure import MeasureConfig
from hwprune.pruning.space import PruningSpace

#: One probe: long enough for a stable median of a sub-millisecond model, short enough to repeat often.
PROBE = MeasureConfig(warmup_s=0.05, min_iters=5, min_time_s=0.2, retries=0)


class HostProbe:
    """Times each model's unpruned network on ``backend`` and remembers the fastest timing per model."""

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
        keep, self.backend.measure_cfg = self.backend.measure_cfg, PROBE
        try:
            ms = self.backend.measure_e2e(ref).stats.median
        finally:
            self.backend.measure_cfg = keep
        self.best[model] = min(self.best.get(model, ms), ms)
        return ms

    def fast(self, model: str, ms: float, gate: float) -> bool:
        """Whether a probe of ``ms`` lies within ``gate`` of the fastest timing of ``model``."""
        return ms <= (1 + gate) * self.best[model]
