"""ONNX Runtime backend (CPU execution provider, explicit thread counts).

The main backend for CPUs, including edge and mobile ones: the same measuring code runs
on the host and, through a bundle, on a device that has only onnxruntime and numpy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hwprune.device.ort_runner import (GRAPH_OPTIMIZATIONS, OrtSettings, node_overhead_ms, ort_version, profile_model,
                                       time_model, time_pair)
from hwprune.profiling.measure import Measurement
from hwprune.profiling.rows import CHAIN_LENGTHS, UnitSpec, chain_onnx
from hwprune.profiling.backends.base import Backend, LayerTiming, ModelArtifact, register_backend


@register_backend
class OnnxRuntimeBackend(Backend):
    """``threads`` is the intra-op thread count (inter-op is 1, sequential execution)."""

    name = "onnxruntime"

    def __init__(self, *, threads: int | None = None, device: str = "cpu", precision: str = "fp32",
                 measure=None, graph_optimization: str = "all", spinning: bool = True):
        super().__init__(threads=threads, device=device, precision=precision, measure=measure)
        from hwprune.errors import HwpruneError

        if graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise HwpruneError(f"unknown ONNX Runtime graph optimisation level '{graph_optimization}'",
                               f"choose one of {', '.join(GRAPH_OPTIMIZATIONS)}")
        if precision != "fp32":
            raise HwpruneError(f"onnxruntime backend measures fp32 models; precision '{precision}' is not supported")
        import os
        self.threads = threads or len(os.sched_getaffinity(0))
        self.ort = OrtSettings(intra_op_threads=self.threads, inter_op_threads=1,
                               graph_optimization=graph_optimization, spinning=spinning)

    @classmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime)"
        if device != "cpu":
            return f"only the CPU execution provider is supported, not '{device}'"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CPUExecutionProvider"
        return None

    @classmethod
    def version(cls) -> str:
        return ort_version()

    def execution_provider(self) -> str:
        return self.ort.provider

    def settings(self) -> dict:
        s = super().settings()
        s.update({"inter_op_threads": self.ort.inter_op_threads, "graph_optimization": self.ort.graph_optimization,
                  "spinning": self.ort.spinning})
        return s

    def _onnx(self, model: ModelArtifact) -> Path:
        if model.onnx_path is None:
            raise ValueError("the onnxruntime backend needs an ONNX file")
        return Path(model.onnx_path)

    def measure_e2e(self, model: ModelArtifact) -> Measurement:
        return time_model(self._onnx(model), self.ort, self.measure_cfg)

    def measure_pair(self, model: ModelArtifact, reference: ModelArtifact) -> tuple[Measurement, Measurement]:
        return time_pair(self._onnx(model), self._onnx(reference), self.ort, self.measure_cfg)

    def profile_layers(self, model: ModelArtifact) -> list[LayerTiming]:
        from hwprune.profiling.backends.ort_graph import OrtGraphReader

        src = self._onnx(model)
        with tempfile.TemporaryDirectory(prefix="hwprune-opt-") as d:
            opt = Path(d) / "optimized.onnx"
            nodes = profile_model(src, self.ort, self.measure_cfg, optimized_path=opt)
            return OrtGraphReader(src, opt).units(nodes)

    def node_overhead_ms(self, workdir: Path) -> float:
        """Per-node profiler overhead, from two chains of tiny nodes (``units.CHAIN_LENGTHS``)."""
        short, long = (chain_onnx(Path(workdir) / f"chain{n}.onnx", n) for n in CHAIN_LENGTHS)
        return node_overhead_ms(short, long, *CHAIN_LENGTHS, self.ort, self.measure_cfg)

    def measure_unit(self, spec: UnitSpec, workdir: Path) -> list[LayerTiming]:
        """The unit's executed nodes, timed by the runtime's profiler in an isolated model."""
        path = spec.to_onnx(Path(workdir) / "unit.onnx")
        art = ModelArtifact(input_shape=spec.input_shapes()["x"], onnx_path=path, name=spec.key())
        return self.profile_layers(art)
