"""Building TensorRT engines from ONNX files: builder settings, parsing, build, deserialisation."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwprune.atomic import atomic_write_bytes
from hwprune.errors import BackendUnavailable, HwpruneError
from hwprune.profiling.backends.trt_env import PRECISIONS, cuda_reason, device_index, import_trt, one_line, \
    tensorrt_reason
from hwprune.profiling.backends.trt_layer_info import OnnxNode, onnx_node_info, read_engine_layers
from hwprune.profiling.backends.trt_precision import convert_onnx_precision


@dataclass
class BuildOptions:
    precision: str = "fp32"
    workspace_mb: int | None = None
    builder_optimization_level: int | None = None
    log_level: str = "WARNING"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "workspace_mb": self.workspace_mb,
                "builder_optimization_level": self.builder_optimization_level}


@dataclass
class BuiltEngine:
    """A deserialised engine and what its build recorded."""

    engine: Any
    runtime: Any
    setup_ms: float
    info: dict
    layers: list[dict] = field(default_factory=list)
    nodes: dict[str, OnnxNode] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # set on contexts when dynamic


def _logger(trt, level: str):
    return trt.Logger(getattr(trt.Logger, level.upper(), trt.Logger.WARNING))


def build_serialized(onnx_path: str | Path, opts: BuildOptions,
                     input_shape: tuple[int, ...] | None = None) -> tuple[bytes, dict]:
    """Parse ``onnx_path`` and build a serialised engine; returns (bytes, build info).

    Explicit batch (the only mode of TensorRT 10+), static shapes, DETAILED profiling
    verbosity. A dynamic ONNX input gets a one-shape optimisation profile: the first
    input from ``input_shape``; any other dynamic input is an error.
    """
    trt = import_trt()
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise HwpruneError(f"ONNX file not found: {onnx_path}")
    info: dict = {"tensorrt": trt.__version__, "onnx": str(onnx_path), **opts.to_dict()}
    logger = _logger(trt, opts.log_level)
    builder = trt.Builder(logger)
    config = _builder_config(trt, builder, opts, info)

    tmpdir = None
    t0 = time.perf_counter_ns()
    try:
        src, tmpdir = _precision_source(trt, config, onnx_path, opts.precision, info)
        network, parser = _parse_network(trt, builder, logger, src, onnx_path.name)  # noqa: F841 - kept alive
        dynamic = _dynamic_inputs(network, input_shape, onnx_path.name)
        if dynamic:
            profile = builder.create_optimization_profile()
            for n, s in dynamic.items():
                profile.set_shape(n, s, s, s)
            config.add_optimization_profile(profile)
        info["dynamic_inputs"] = {k: list(v) for k, v in dynamic.items()}
        info["parse_ms"] = (time.perf_counter_ns() - t0) / 1e6
        t1 = time.perf_counter_ns()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise HwpruneError(f"TensorRT failed to build an engine for {onnx_path.name}",
                               "see the TensorRT log above")
        info["build_ms"] = (time.perf_counter_ns() - t1) / 1e6
        return bytes(serialized), info
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _builder_config(trt, builder, opts: BuildOptions, info: dict):
    """A builder config with DETAILED verbosity and ``opts``' limits; records what it set in ``info``."""
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    info["profiling_verbosity"] = "DETAILED"
    if opts.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
    if opts.builder_optimization_level is not None:
        config.builder_optimization_level = int(opts.builder_optimization_level)
    info["builder_optimization_level"] = int(getattr(config, "builder_optimization_level", -1))
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    info["tf32"] = bool(config.get_flag(tf32)) if tf32 is not None else None
    return config


def _precision_source(trt, config, onnx_path: Path, precision: str, info: dict) -> tuple[Path, str | None]:
    """(ONNX file to parse, temporary directory to remove or None) for ``precision``.

    TensorRT 10 gets the weak-typing builder flag; TensorRT 11 (strongly typed, no such
    flag) gets a converted copy of the ONNX file. Records ``precision_mode`` in ``info``.
    """
    if precision == "fp32":
        info["precision_mode"] = "fp32"
        return onnx_path, None
    if precision not in ("fp16", "bf16"):
        raise HwpruneError(f"tensorrt backend: unknown precision '{precision}'",
                           f"choose one of: {', '.join(PRECISIONS)}")
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    if flag is not None:  # TensorRT 10: weak typing
        config.set_flag(flag)
        info["precision_mode"] = f"builder_flag:{precision.upper()}"
        return onnx_path, None
    tmpdir = tempfile.mkdtemp(prefix="hwprune-trt-")
    try:
        src = Path(tmpdir) / f"{onnx_path.stem}.{precision}.onnx"
        conv = convert_onnx_precision(onnx_path, src, precision)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    info["precision_mode"] = f"strongly_typed:{conv}"
    return src, tmpdir


def _parse_network(trt, builder, logger, src: Path, shown_name: str):
    """(network, parser) parsed from ``src``; the parser owns the weights and must outlive the build."""
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        errors = "; ".join(one_line(e.desc() if hasattr(e, "desc") else e) for e in errs)
        raise HwpruneError(f"TensorRT could not parse {shown_name}: {errors or 'unknown error'}")
    return network, parser


def _dynamic_inputs(network, input_shape: tuple[int, ...] | None, shown_name: str) -> dict[str, tuple[int, ...]]:
    """Input name -> static shape for each dynamic network input (only the first may be dynamic)."""
    dynamic: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(int(d) for d in t.shape)
        if all(d >= 0 for d in shape):
            continue
        if i == 0 and input_shape is not None and len(input_shape) == len(shape):
            dynamic[t.name] = tuple(int(d) for d in input_shape)
        else:
            raise HwpruneError(f"input '{t.name}' of {shown_name} has a dynamic shape {shape}",
                               "export the model with static shapes")
    return dynamic


def build_engine(onnx_path: str | Path, opts: BuildOptions, input_shape: tuple[int, ...] | None = None,
                 device: str = "cuda") -> BuiltEngine:
    """Build and deserialise an engine on ``device``; ``setup_ms`` covers parse + build + load."""
    import torch

    trt = import_trt()
    with torch.cuda.device(device_index(device)):
        torch.cuda.init()
        t = time.perf_counter_ns()
        blob, info = build_serialized(onnx_path, opts, input_shape)
        t_load = time.perf_counter_ns()
        runtime = trt.Runtime(_logger(trt, opts.log_level))
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise HwpruneError(f"TensorRT could not deserialise the engine built from {Path(onnx_path).name}")
        end = time.perf_counter_ns()
    info["deserialize_ms"] = (end - t_load) / 1e6
    info["engine_bytes"] = len(blob)
    layers: list[dict] = []
    try:
        inspector = engine.create_engine_inspector()
        layers = read_engine_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as e:  # noqa: BLE001 - the inspector is descriptive only
        info["inspector_error"] = one_line(e)
    info["num_layers"] = int(getattr(engine, "num_layers", len(layers)))
    return BuiltEngine(engine=engine, runtime=runtime, setup_ms=(end - t) / 1e6, info=info, layers=layers,
                       nodes=onnx_node_info(onnx_path),
                       input_shapes={k: tuple(v) for k, v in info.get("dynamic_inputs", {}).items()})


def export_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp32",
                  input_shape: tuple[int, ...] | None = None, device: str = "cuda",
                  workspace_mb: int | None = None, builder_optimization_level: int | None = None) -> dict:
    """Build a TensorRT engine from ``onnx_path`` and write it to ``engine_path``.

    For ``hwprune export``: the plan file runs only on the GPU model and TensorRT version
    that built it. Returns the build info (TensorRT version, times, precision mode, GPU).
    """
    reason = tensorrt_reason() or cuda_reason(device)
    if reason:
        raise BackendUnavailable(f"cannot build a TensorRT engine here: {reason}")
    import torch

    opts = BuildOptions(precision=precision, workspace_mb=workspace_mb,
                        builder_optimization_level=builder_optimization_level)
    with torch.cuda.device(device_index(device)):
        torch.cuda.init()
        blob, info = build_serialized(onnx_path, opts, input_shape)
        info["gpu"] = torch.cuda.get_device_name(device_index(device))
    engine_path = atomic_write_bytes(engine_path, blob)
    info["engine_path"] = str(engine_path)
    info["engine_bytes"] = len(blob)
    return info

