"""TensorRT backend: an engine built from the ONNX file, run on an NVIDIA GPU.

This module imports without TensorRT or a GPU: ``tensorrt`` and CUDA are touched only
once a backend is created (``unavailable_reason`` says in one line why it cannot be).

What is measured
----------------
* The engine is built from the ONNX file with explicit batch and static shapes (those of
  the ONNX inputs; a dynamic input gets a single-shape optimisation profile from the
  artifact's ``input_shape``) and ``profiling_verbosity = DETAILED``. ONNX parsing, the
  build and deserialisation are timed as ``setup_ms`` (with the execution context and
  buffer creation of the measuring call).
* ``measure_e2e``: I/O buffers are torch CUDA tensors bound with ``set_tensor_address``;
  each sample is CUDA-event time around one ``execute_async_v3`` on a dedicated stream,
  synchronised on the end event. The first run is timed apart.
* ``profile_layers``: a *separate* execution context with an ``IProfiler`` attached, run
  for the protocol's ``min_iters``/``min_time_s`` after a time warm-up; per-layer samples
  become :class:`Stats`. Each engine layer is described from the engine inspector's JSON
  (fused ONNX nodes, kernel, strides, groups, fused activation, tensor formats), which is
  what TensorRT really executes after its fusions (Conv+BN+ReLU(+Add) become one layer,
  reformat layers appear between layouts).

Precision
---------
``fp32`` builds the ONNX graph as is (TF32 follows TensorRT's default, recorded). For
``fp16``/``bf16``: TensorRT 10 takes the weak-typing builder flag (``BuilderFlag.FP16``/
``BF16``); TensorRT 11 removed those flags (networks are always strongly typed), so the
ONNX file is first converted to the low precision with I/O kept in fp32 (NVIDIA
ModelOpt AutoCast when installed, else :func:`convert_onnx_precision`). The mode used is
recorded in the settings.

The pieces live in sibling modules: ``trt_env`` (availability), ``trt_engine`` (engine
building), ``trt_precision`` (fp16/bf16 ONNX conversion) and ``trt_layer_info`` (inspector
JSON -> table rows). This module holds the backend and its timing.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from hwprune.errors import HwpruneError
from hwprune.profiling.measure import MeasureConfig, Measurement, Stats, collect, measure
from hwprune.profiling.rows import UnitSpec, onnx_node_to_module
from hwprune.profiling.backends.base import Backend, LayerTiming, ModelArtifact, register_backend
from hwprune.profiling.backends.trt_engine import BuildOptions, BuiltEngine, build_engine, build_serialized, \
    export_engine
from hwprune.profiling.backends.trt_env import INSTALL_HINT, PRECISIONS, cuda_reason, device_index, import_trt, \
    tensorrt_reason
from hwprune.profiling.backends.trt_layer_info import (OnnxNode, layer_info_to_unit, onnx_names_of_layer,
                                                       onnx_node_info, read_engine_layers, tensor_format)
from hwprune.profiling.backends.trt_precision import convert_onnx_precision

__all__ = ["INSTALL_HINT", "BuildOptions", "BuiltEngine", "OnnxNode", "TensorRTBackend", "build_engine",
           "build_serialized", "convert_onnx_precision", "cuda_reason", "export_engine", "layer_info_to_unit",
           "onnx_names_of_layer", "onnx_node_info", "onnx_node_to_module", "read_engine_layers", "tensor_format",
           "tensorrt_reason"]


def _torch_dtype(trt_dtype: Any):
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    if name not in table:
        raise HwpruneError(f"TensorRT I/O tensor of type {name} is not supported by hwprune")
    return table[name]


def _make_profiler(trt):
    """An ``IProfiler`` that keeps every reported layer time while ``recording`` is set."""

    class LayerTimeCollector(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.recording = False
            self.samples: dict[str, list[float]] = defaultdict(list)
            self.order: list[str] = []

        def report_layer_time(self, layer_name, ms):
            if not self.recording:
                return
            if layer_name not in self.samples:
                self.order.append(layer_name)
            self.samples[layer_name].append(float(ms))

    return LayerTimeCollector()


# -----------------------------------------------------------------------------------------
# the backend
# -----------------------------------------------------------------------------------------
@register_backend
class TensorRTBackend(Backend):
    """TensorRT on ``cuda``/``cuda:N`` from an ONNX file.

    ``precision``: ``fp32`` (default), ``fp16`` or ``bf16`` (see the module notes).
    ``workspace_mb``: builder workspace pool limit (TensorRT's default when None).
    ``builder_optimization_level``: 0-5 (TensorRT's default, 3, when None).
    ``threads`` is meaningless on a GPU and recorded as None.
    """

    name = "tensorrt"

    def __init__(self, *, threads: int | None = None, device: str = "cuda", precision: str = "fp32",
                 measure: MeasureConfig | None = None, workspace_mb: int | None = None,
                 builder_optimization_level: int | None = None):
        super().__init__(threads=threads, device=device, precision=precision, measure=measure)
        if precision not in PRECISIONS:
            raise HwpruneError(f"tensorrt backend: unknown precision '{precision}'",
                               f"choose one of: {', '.join(PRECISIONS)}")
        self.threads = None
        self.device_index = device_index(device)
        self.device = f"cuda:{self.device_index}"
        self.build_opts = BuildOptions(precision=precision, workspace_mb=workspace_mb,
                                       builder_optimization_level=builder_optimization_level)
        self._engines: dict[tuple, BuiltEngine] = {}
        self._last_build_info: dict = {}
        self._keepalive: list = []
        self.last_profile_summary: dict = {}

    # -- availability ------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls, device: str = "cuda") -> str | None:
        reason = tensorrt_reason()
        if reason:
            return reason
        if not re.fullmatch(r"cuda(?::\d+)?", str(device)):
            return f"TensorRT runs on NVIDIA GPUs only: use device 'cuda' or 'cuda:N', not '{device}'"
        return cuda_reason(device)

    @classmethod
    def version(cls) -> str:
        try:
            return str(import_trt().__version__)
        except Exception:  # noqa: BLE001
            return "unavailable"

    def execution_provider(self) -> str:
        import torch

        return torch.cuda.get_device_name(self.device_index)

    def settings(self) -> dict:
        import torch

        from hwprune.profiling.backends.torch_backend import gpu_driver_version

        s = super().settings()
        props = torch.cuda.get_device_properties(self.device_index)
        s.update({
            "threads": None,
            "gpu_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": gpu_driver_version(),
            "cuda_runtime_torch": torch.version.cuda,
            "builder": {**self.build_opts.to_dict(), "profiling_verbosity": "DETAILED", "explicit_batch": True,
                        "static_shapes": True,
                        **{k: self._last_build_info[k] for k in ("precision_mode", "tf32", "builder_optimization_level")
                           if k in self._last_build_info}},
            "timing": "cuda_events",
            "stream": "dedicated torch.cuda.Stream",
        })
        return s

    # -- engines ---------------------------------------------------------------------------
    def _engine_for(self, model: ModelArtifact) -> BuiltEngine:
        if model.onnx_path is None:
            raise HwpruneError(f"the tensorrt backend needs an ONNX file for '{model.name}'")
        path = Path(model.onnx_path).resolve()
        if not path.exists():
            raise HwpruneError(f"ONNX file not found: {path}")
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, tuple(model.input_shape))
        if key not in self._engines:
            built = build_engine(path, self.build_opts, tuple(model.input_shape), self.device)
            self._engines[key] = built
            self._last_build_info = built.info
        return self._engines[key]

    def export_engine(self, onnx_path: str | Path, engine_path: str | Path,
                      input_shape: tuple[int, ...] | None = None) -> dict:
        """Write the engine this backend would measure (same precision and builder settings)."""
        return export_engine(onnx_path, engine_path, precision=self.build_opts.precision, input_shape=input_shape,
                             device=self.device, workspace_mb=self.build_opts.workspace_mb,
                             builder_optimization_level=self.build_opts.builder_optimization_level)

    def _bind(self, built: BuiltEngine, ctx) -> dict:
        """Allocate every I/O tensor once (torch CUDA tensors) and bind it to ``ctx``."""
        import torch

        trt = import_trt()
        eng = built.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        for n in names:
            if n in built.input_shapes and eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                if not ctx.set_input_shape(n, built.input_shapes[n]):
                    raise HwpruneError(f"TensorRT rejected input shape {built.input_shapes[n]} for '{n}'")
        gen = torch.Generator(device="cpu").manual_seed(0)
        bufs = {}
        for n in names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise HwpruneError(f"TensorRT tensor '{n}' has an unresolved shape {shape}")
            dtype = _torch_dtype(eng.get_tensor_dtype(n))
            if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                host = torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.zeros(shape)
                t = host.to(dtype=dtype).to(f"cuda:{self.device_index}")
            else:
                t = torch.empty(shape, dtype=dtype, device=f"cuda:{self.device_index}")
            if ctx.set_tensor_address(n, t.data_ptr()) is False:
                raise HwpruneError(f"TensorRT rejected the buffer of '{n}'")
            bufs[n] = t
        torch.cuda.synchronize(self.device_index)
        return bufs

    def _runner(self, ctx, stream) -> Callable[[], None]:
        handle = stream.cuda_stream

        def run() -> None:
            if not ctx.execute_async_v3(handle):
                raise HwpruneError("TensorRT execute_async_v3 failed", "see the TensorRT log above")

        return run

    # -- measurements ------------------------------------------------------------------------
    def measure_e2e(self, model: ModelArtifact) -> Measurement:
        import torch

        built = self._engine_for(model)
        with torch.cuda.device(self.device_index):
            stream = torch.cuda.Stream(device=self.device_index)
            with torch.cuda.stream(stream):
                t = time.perf_counter_ns()
                ctx = built.engine.create_execution_context()
                if ctx is None:
                    raise HwpruneError("TensorRT could not create an execution context (out of GPU memory?)")
                bufs = self._bind(built, ctx)
                ctx_ms = (time.perf_counter_ns() - t) / 1e6
                run = self._runner(ctx, stream)

                t = time.perf_counter_ns()
                run()
                stream.synchronize()
                first_ms = (time.perf_counter_ns() - t) / 1e6

                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)

                def step() -> float:
                    start.record(stream)
                    run()
                    end.record(stream)
                    end.synchronize()
                    return float(start.elapsed_time(end))

                m = measure(step, self.measure_cfg)
                stream.synchronize()
        del bufs, ctx
        m.setup_ms = built.setup_ms + ctx_ms
        m.first_run_ms = first_ms
        return m

    def profile_layers(self, model: ModelArtifact) -> list[LayerTiming]:
        import torch

        trt = import_trt()
        built = self._engine_for(model)
        with torch.cuda.device(self.device_index):
            stream = torch.cuda.Stream(device=self.device_index)
            with torch.cuda.stream(stream):
                ctx = built.engine.create_execution_context()  # separate from the timed context
                if ctx is None:
                    raise HwpruneError("TensorRT could not create an execution context (out of GPU memory?)")
                bufs = self._bind(built, ctx)
                profiler = _make_profiler(trt)
                self._keepalive = [profiler]  # TensorRT holds a raw pointer to it
                ctx.profiler = profiler
                forward_ms = self._profiled_runs(self._runner(ctx, stream), stream, profiler)
        del bufs, ctx
        batch = int(model.input_shape[0]) if model.input_shape else 1
        rows = self._layer_rows(built, profiler, batch)
        if forward_ms:
            fwd = Stats.from_samples(forward_ms, self.measure_cfg.cov_threshold)
            self.last_profile_summary = {
                "profiled_wall_median_ms": fwd.median,
                "sum_of_layer_medians_ms": sum(r.stats.median for r in rows),
                "iterations": len(forward_ms), "layers_reported": len(rows),
                "note": "profiled runs synchronise after every layer; use measure_e2e for latency",
            }
        return rows

    def _profiled_runs(self, run: Callable[[], None], stream, profiler) -> list[float]:
        """The timing loop of ``profile_layers``: wall ms of each recorded forward pass.

        One first run and a ``warmup_s`` time warm-up are not recorded; then the profiler
        records for at least ``min_iters`` runs and ``min_time_s`` (at most ``max_iters``).
        """
        def once() -> float:
            t = time.perf_counter_ns()
            run()
            stream.synchronize()
            return (time.perf_counter_ns() - t) / 1e6

        once()  # first run, not recorded
        # the protocol's one timing loop: once() synchronises, the profiler records after the warm-up
        forward_ms = collect(once, self.measure_cfg, on_start=lambda: setattr(profiler, "recording", True))
        stream.synchronize()
        profiler.recording = False
        return forward_ms

    def _layer_rows(self, built: BuiltEngine, profiler, batch: int) -> list[LayerTiming]:
        """One :class:`LayerTiming` per layer the profiler reported, described from the inspector."""
        by_name = {str(layer.get("Name", "")): layer for layer in built.layers}
        rows: list[LayerTiming] = []
        for name in profiler.order:
            samples = profiler.samples[name]
            if not samples:
                continue
            info = by_name.get(name) or by_name.get(re.sub(r"\s*\[profile \d+\]$", "", name)) or {"Name": name}
            unit, layer, extra = layer_info_to_unit(info, built.nodes, batch)
            extra["inspector"] = name in by_name
            stats = Stats.from_samples(samples, self.measure_cfg.cov_threshold)
            rows.append(LayerTiming(unit=unit, stats=stats, node=name, layer=layer, extra=extra))
        return rows

    def measure_unit(self, spec: UnitSpec, workdir: Path) -> list[LayerTiming]:
        path = spec.to_onnx(Path(workdir) / "unit.onnx")
        art = ModelArtifact(input_shape=spec.input_shapes()["x"], onnx_path=path, name=spec.key())
        try:
            return self.profile_layers(art)
        finally:  # the file may be rewritten for the next unit: drop its engine
            self._engines = {k: v for k, v in self._engines.items() if k[0] != str(Path(path).resolve())}
