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
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hwprune.errors import BackendUnavailable, HwpruneError
from hwprune.profiling.measure import MeasureConfig, Measurement, Stats, measure
from hwprune.profiling.rows import UnitKey, UnitSpec, onnx_node_to_module
from hwprune.profiling.backends.base import Backend, LayerTiming, ModelArtifact, register_backend

INSTALL_HINT = "TensorRT is not installed: pip install 'hwprune[tensorrt]' on a machine with an NVIDIA GPU"
_PRECISIONS = ("fp32", "fp16", "bf16")


# -----------------------------------------------------------------------------------------
# lazy imports and availability
# -----------------------------------------------------------------------------------------
def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _import_trt():
    import tensorrt as trt  # noqa: PLC0415 - optional dependency, imported lazily

    return trt


def tensorrt_reason() -> str | None:
    """None when the ``tensorrt`` package imports, else one line saying why not."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return INSTALL_HINT
    try:
        _import_trt()
    except ImportError as e:
        return f"TensorRT is installed but cannot be loaded ({_one_line(e)}): reinstall 'hwprune[tensorrt]'"
    except Exception as e:  # noqa: BLE001 - a broken native library raises anything
        return f"TensorRT is installed but cannot be loaded ({_one_line(e)})"
    return None


def cuda_reason(device: str = "cuda") -> str | None:
    """None when torch sees the CUDA ``device`` (``cuda`` / ``cuda:N``), else one line why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (the TensorRT backend uses torch for CUDA buffers and events)"
    if not torch.cuda.is_available():
        built = torch.version.cuda
        build = f"torch {torch.__version__} built for CUDA {built}" if built else \
            f"torch {torch.__version__} built without CUDA"
        return f"no NVIDIA GPU visible to CUDA ({build})"
    idx = _device_index(device)
    if idx >= torch.cuda.device_count():
        return f"CUDA device {idx} requested but {torch.cuda.device_count()} visible"
    return None


def _device_index(device: str) -> int:
    m = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    return int(m.group(1)) if m and m.group(1) else 0


# -----------------------------------------------------------------------------------------
# ONNX node names -> source modules
# -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxNode:
    op_type: str
    module: str


def onnx_node_info(onnx_path: str | Path | None) -> dict[str, OnnxNode]:
    """ONNX node name -> (op type, source module path) for every node of the file.

    The module comes from the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata
    when present, else from the TorchScript exporter's ``/scope/.../Op`` node names.
    Best effort: an unreadable file gives an empty map.
    """
    if onnx_path is None:
        return {}
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001
        return {}
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, OnnxNode] = {}
    for n in model.graph.node:
        module = ""
        # a weight initializer that kept its parameter name ("layer1.0.conv1.weight") names the
        # module best: the dynamo exporter files a Conv with a folded BatchNorm under the BN's scope
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1 \
                and n.input[1] in inits and n.input[1].endswith(".weight"):
            module = n.input[1][: -len(".weight")]
            out[n.name or module] = OnnxNode(n.op_type, module)
            continue
        meta = {p.key: p.value for p in n.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                parts = [str(s) for s in ast.literal_eval(scopes)]
                inner = [p for p in parts[1:-1] if p]  # drop the root ('') and the op itself
                module = inner[-1] if inner else ""
            except (ValueError, SyntaxError):
                module = ""
        if not module:
            module = onnx_node_to_module(n.name)
        if n.name:
            out[n.name] = OnnxNode(n.op_type, module)
    return out


# -----------------------------------------------------------------------------------------
# engine-inspector JSON -> UnitKey
# -----------------------------------------------------------------------------------------
_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer:\s*([^\]]+?)\s*\]")
_REFORMAT_PREFIX = re.compile(r"^Reformatting CopyNode for (?:Input|Output) Tensor \d+ to\s+")
_VECTOR_WORDS = {"two": 2, "four": 4, "eight": 8, "sixteen": 16, "thirty-two": 32}
_ACT_NAMES = {"RELU": "Relu", "CLIP": "Clip", "SIGMOID": "Sigmoid", "TANH": "Tanh", "LEAKY_RELU": "LeakyRelu",
              "ELU": "Elu", "SELU": "Selu", "SOFTSIGN": "Softsign", "SOFTPLUS": "Softplus",
              "HARD_SIGMOID": "HardSigmoid", "SCALED_TANH": "ScaledTanh", "THRESHOLDED_RELU": "ThresholdedRelu",
              "GELU_ERF": "Gelu", "GELU_TANH": "Gelu", "SWISH": "SiLU", "SILU": "SiLU", "HARD_SWISH": "HardSwish"}
_ONNX_ACTS = {"Relu": "Relu", "Clip": "Clip", "HardSwish": "HardSwish", "HardSigmoid": "HardSigmoid",
              "LeakyRelu": "LeakyRelu", "Tanh": "Tanh", "Gelu": "Gelu", "Elu": "Elu", "Mish": "Mish"}


def read_engine_layers(engine_json: str | dict) -> list[dict]:
    """The ``Layers`` of an engine inspector JSON document, each as a dict.

    Engines built without DETAILED verbosity list bare names: they become ``{"Name": s}``.
    """
    doc = json.loads(engine_json) if isinstance(engine_json, str) else engine_json
    layers = doc.get("Layers", []) if isinstance(doc, dict) else doc
    out = []
    for item in layers or []:
        if isinstance(item, dict):
            out.append(item)
        elif isinstance(item, str):
            try:
                parsed = json.loads(item)
                out.append(parsed if isinstance(parsed, dict) else {"Name": item})
            except ValueError:
                out.append({"Name": item})
    return out


def onnx_names_of_layer(info: dict) -> list[str]:
    """The ONNX nodes an engine layer implements, in order.

    Read from the layer's ``Metadata`` (``[ONNX Layer: a]\\x1e[ONNX Layer: b]``) when
    present, else from its name (``a + b``); a reformat layer names the node it feeds.
    """
    meta = info.get("Metadata")
    if isinstance(meta, str) and meta:
        names = _ONNX_LAYER_RE.findall(meta)
        if names:
            return names
    name = str(info.get("Name", ""))
    if not name:
        return []
    name = _REFORMAT_PREFIX.sub("", name)
    name = re.sub(r"\s*\[profile \d+\]$", "", name)
    return [p.strip() for p in name.split(" + ") if p.strip()]


def _int_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (int, float)):
        return [int(v)]
    if isinstance(v, str):
        return [int(x) for x in re.findall(r"-?\d+", v)]
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            try:
                out.append(int(x))
            except (TypeError, ValueError):
                pass
        return out
    if isinstance(v, dict):  # e.g. {"Dimensions": [...]}
        return _int_list(v.get("Dimensions") or v.get("Dims"))
    return []


def _as_int(v: Any, default: int) -> int:
    vals = _int_list(v)
    return vals[0] if vals else default


def _tensors(v: Any) -> list[dict]:
    if isinstance(v, list):
        return [t for t in v if isinstance(t, dict)]
    if isinstance(v, dict):
        return [v]
    return []


def tensor_format(t: dict) -> tuple[str, int, str]:
    """(layout, channel vector width, data type) of an inspector tensor description.

    Reads TensorRT 10's ``Format/Datatype`` text and TensorRT 11's ``Format`` (with its
    ``(kHWC8)``-style token) plus ``DataType``. Unknown formats give ``("", 1, "")``.
    """
    text = str(t.get("Format/Datatype") or t.get("Format") or "")
    dtype = str(t.get("DataType") or "")
    low = text.lower()
    if not dtype:
        for tok, name in (("bfloat16", "bf16"), ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32"),
                          ("float", "fp32"), ("int8", "int8"), ("fp8", "fp8"), ("int32", "int32"),
                          ("int64", "int64"), ("bool", "bool")):
            if tok in low:
                dtype = name
                break
    else:
        dtype = {"float": "fp32", "half": "fp16", "bfloat16": "bf16"}.get(dtype.lower(), dtype.lower())
    m = re.search(r"\(k([A-Z0-9_]+)\)", text)
    if m:
        tok = m.group(1).lower()
        if tok == "linear":
            return "nchw", 1, dtype
        if tok in ("hwc", "dhwc"):
            return "n" + tok, 1, dtype
        vm = re.search(r"(\d+)$", tok)
        return tok, int(vm.group(1)) if vm else 1, dtype
    if not low or "n/a" in low or "unknown" in low:
        return "", 1, dtype
    if "channel major" in low:
        cm = re.search(r"channel\s*%\s*(\d+)\s*==\s*0", low) or re.search(r"channel\s*==\s*(\d+)", low)
        v = int(cm.group(1)) if cm else 1
        return ("nhwc" if v == 1 else f"hwc{v}"), v, dtype
    vm = re.search(r"(two|four|eight|sixteen|thirty-two) wide channel vectorized", low)
    if vm:
        v = _VECTOR_WORDS[vm.group(1)]
        return f"chw{v}", v, dtype
    if "row major" in low or "linear" in low:
        return "nchw", 1, dtype
    return "", 1, dtype


def _round_up(c: int, v: int) -> int:
    return c if v <= 1 or c <= 0 else -(-c // v) * v


def _op_of(node_name: str, nodes: dict[str, OnnxNode]) -> str:
    if node_name in nodes:
        return nodes[node_name].op_type
    tail = node_name.rsplit("/", 1)[-1]
    return re.sub(r"_\d+$", "", tail)  # "/layer1/Add_1" -> "Add"


def _module_of(node_name: str, nodes: dict[str, OnnxNode]) -> str:
    if node_name in nodes:
        return nodes[node_name].module
    return onnx_node_to_module(node_name)


def layer_info_to_unit(info: dict, nodes: dict[str, OnnxNode] | None = None,
                       default_batch: int = 1) -> tuple[UnitKey, str, dict]:
    """(UnitKey, source module path, extra) of one engine layer's inspector description.

    Defensive: every key may be missing (LAYER_NAMES_ONLY engines, new TensorRT fields);
    what cannot be read keeps the UnitKey default.
    """
    nodes = nodes or {}
    name = str(info.get("Name", ""))
    ptype = str(info.get("ParameterType") or "")
    impl = str(info.get("LayerType") or "")
    is_reformat = ptype == "Reformat" or impl == "Reformat" or name.startswith("Reformatting CopyNode")
    kind = "Reformat" if is_reformat else (ptype or impl or "Unknown")
    onnx_names = onnx_names_of_layer(info)
    ops = [_op_of(n, nodes) for n in onnx_names]

    ins, outs = _tensors(info.get("Inputs")), _tensors(info.get("Outputs"))
    x = _int_list(ins[0].get("Dimensions")) if ins else []
    y = _int_list(outs[0].get("Dimensions")) if outs else []
    batch = x[0] if x else (y[0] if y else default_batch)
    cin = x[1] if len(x) >= 2 else 0
    cout = y[1] if len(y) >= 2 else cin
    h, w = (x[-2], x[-1]) if len(x) >= 4 else (1, 1)

    kernel = _int_list(info.get("Kernel") or info.get("KernelSize") or info.get("WindowSize")
                       or info.get("WindowDimensions"))
    kh, kw = (kernel[0], kernel[-1]) if kernel else (1, 1)
    stride = _as_int(info.get("Stride", info.get("Strides")), 1)
    dilation = _as_int(info.get("Dilation", info.get("Dilations")), 1)
    groups = _as_int(info.get("Groups", info.get("NbGroups")), 1)
    if "OutMaps" in info:
        cout = _as_int(info.get("OutMaps"), cout)

    activation = ""
    act = info.get("Activation")
    if isinstance(act, str) and act.upper() not in ("", "NONE"):
        activation = _ACT_NAMES.get(act.upper(), act.title())
    elif _as_int(info.get("HasReLU"), 0):
        activation = "Relu"
    primary = ops[0] if ops else ""
    rest = ops[1:]
    if not activation and rest:
        if "Sigmoid" in rest and "Mul" in rest:
            activation = "SiLU"
        else:
            for op in rest:
                if op in _ONNX_ACTS:
                    activation = _ONNX_ACTS[op]
                elif op == "Sigmoid":
                    activation = "Sigmoid"
    fused_add = primary not in ("Add", "Sum", "") and any(op in ("Add", "Sum") for op in rest)
    if is_reformat:  # a copy between layouts/types: it fuses nothing of the layer it feeds
        activation, fused_add = "", False

    layout, vin, dtype_in = tensor_format(ins[0]) if ins else ("", 1, "")
    out_layout, vout, dtype_out = tensor_format(outs[0]) if outs else ("", 1, "")
    layer = _module_of(onnx_names[0], nodes) if onnx_names else ""
    key = UnitKey(op=f"trt.{kind}", cin=cin, cout=cout, kh=kh, kw=kw, stride=stride, groups=groups,
                  dilation=dilation, h=h, w=w, batch=batch, activation=activation, fused_add=fused_add,
                  layout=layout or "nchw", cin_exec=_round_up(cin, vin), cout_exec=_round_up(cout, vout))
    extra = {"trt_layer_type": impl, "trt_parameter_type": ptype, "onnx_nodes": onnx_names,
             "onnx_ops": ops, "out_layout": out_layout, "dtype_in": dtype_in, "dtype_out": dtype_out}
    if info.get("TacticName"):
        extra["tactic"] = str(info["TacticName"])
    if is_reformat:
        extra["reformat_for"] = onnx_names[0] if onnx_names else ""
    return key, layer, extra


# -----------------------------------------------------------------------------------------
# fp16 / bf16 ONNX conversion (TensorRT 11 is strongly typed)
# -----------------------------------------------------------------------------------------
# (op, input index) that must stay float32 whatever the compute precision
_KEEP_FP32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _bf16_tensor(arr, name: str):
    import numpy as np
    from onnx import TensorProto

    a = np.ascontiguousarray(arr, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.BFLOAT16
    t.dims.extend(a.shape)
    t.raw_data = rounded.tobytes()
    return t


def _low_tensor(tensor, precision: str):
    import numpy as np
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    if precision == "fp16":
        return numpy_helper.from_array(np.clip(arr, -65504, 65504).astype(np.float16), tensor.name)
    return _bf16_tensor(arr, tensor.name)


def convert_onnx_precision(src: str | Path, dst: str | Path, precision: str, use_modelopt: bool = True) -> str:
    """Write ``src`` converted to ``fp16``/``bf16`` compute with fp32 inputs and outputs.

    Uses NVIDIA ModelOpt AutoCast (``modelopt.onnx.autocast``) when installed, else a
    plain converter fit for CNN graphs: float initializers and constants are cast, ``Cast``
    nodes to float retarget the low type, each float graph input gets a ``Cast`` to the low
    type and each float output a ``Cast`` back. Returns which converter ran.
    """
    import onnx
    from onnx import TensorProto, helper

    if precision not in ("fp16", "bf16"):
        raise HwpruneError(f"cannot convert an ONNX model to '{precision}'", "use fp16 or bf16")
    if use_modelopt:
        try:
            import modelopt.onnx.autocast as autocast  # type: ignore[import-not-found]

            converted = autocast.convert_to_mixed_precision(onnx_path=str(src), low_precision_type=precision,
                                                            keep_io_types=True)
            onnx.save(converted, str(dst))
            return "modelopt.autocast"
        except ImportError:
            pass
    target = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    model = onnx.load(str(src))
    g = model.graph
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise HwpruneError(f"the built-in {precision} converter does not handle control flow ({n.op_type})",
                               "pip install nvidia-modelopt[onnx] for ModelOpt AutoCast")
    keep = {n.input[i] for n in g.node for i in range(len(n.input))
            if (n.op_type, i) in _KEEP_FP32_INPUTS and n.input[i]}
    inits = {t.name for t in g.initializer}
    for i, t in enumerate(list(g.initializer)):
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            g.initializer[i].CopyFrom(_low_tensor(t, precision))
    for n in g.node:
        if n.op_type == "Constant" and not (set(n.output) & keep):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_low_tensor(a.t, precision))
        elif n.op_type == "Cast" and not (set(n.output) & keep):
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = target
    new_nodes = []
    suffix = f"__{precision}"
    for inp in g.input:
        if inp.name in inits or inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        low = inp.name + suffix
        for n in g.node:
            for i, v in enumerate(n.input):
                if v == inp.name and (n.op_type, i) not in _KEEP_FP32_INPUTS:
                    n.input[i] = low
        new_nodes.append(helper.make_node("Cast", [inp.name], [low], name=f"hwprune/cast_in/{inp.name}", to=target))
    tail_nodes = []
    for out in g.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        low = out.name + suffix
        for n in g.node:
            for i, v in enumerate(n.output):
                if v == out.name:
                    n.output[i] = low
            for i, v in enumerate(n.input):
                if v == out.name:
                    n.input[i] = low
        tail_nodes.append(helper.make_node("Cast", [low], [out.name], name=f"hwprune/cast_out/{out.name}",
                                           to=TensorProto.FLOAT))
    nodes = new_nodes + list(g.node) + tail_nodes
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    big = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(dst), save_as_external_data=big)
    return "hwprune.builtin"


# -----------------------------------------------------------------------------------------
# building engines
# -----------------------------------------------------------------------------------------
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
    trt = _import_trt()
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise HwpruneError(f"ONNX file not found: {onnx_path}")
    info: dict = {"tensorrt": trt.__version__, "onnx": str(onnx_path), **opts.to_dict()}
    logger = _logger(trt, opts.log_level)
    builder = trt.Builder(logger)
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

    tmpdir = None
    src = onnx_path
    t0 = time.perf_counter_ns()
    try:
        if opts.precision == "fp32":
            info["precision_mode"] = "fp32"
        elif opts.precision in ("fp16", "bf16"):
            flag = getattr(trt.BuilderFlag, opts.precision.upper(), None)
            if flag is not None:  # TensorRT 10: weak typing
                config.set_flag(flag)
                info["precision_mode"] = f"builder_flag:{opts.precision.upper()}"
            else:  # TensorRT 11: strongly typed, the ONNX file carries the types
                tmpdir = tempfile.mkdtemp(prefix="hwprune-trt-")
                src = Path(tmpdir) / f"{onnx_path.stem}.{opts.precision}.onnx"
                conv = convert_onnx_precision(onnx_path, src, opts.precision)
                info["precision_mode"] = f"strongly_typed:{conv}"
        else:
            raise HwpruneError(f"tensorrt backend: unknown precision '{opts.precision}'",
                               f"choose one of: {', '.join(_PRECISIONS)}")

        network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(src)):
            errs = [parser.get_error(i) for i in range(parser.num_errors)]
            errors = "; ".join(_one_line(e.desc() if hasattr(e, "desc") else e) for e in errs)
            raise HwpruneError(f"TensorRT could not parse {onnx_path.name}: {errors or 'unknown error'}")
        dynamic: dict[str, tuple[int, ...]] = {}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = tuple(int(d) for d in t.shape)
            if all(d >= 0 for d in shape):
                continue
            if i == 0 and input_shape is not None and len(input_shape) == len(shape):
                dynamic[t.name] = tuple(int(d) for d in input_shape)
            else:
                raise HwpruneError(f"input '{t.name}' of {onnx_path.name} has a dynamic shape {shape}",
                                   "export the model with static shapes")
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


def build_engine(onnx_path: str | Path, opts: BuildOptions, input_shape: tuple[int, ...] | None = None,
                 device: str = "cuda") -> BuiltEngine:
    """Build and deserialise an engine on ``device``; ``setup_ms`` covers parse + build + load."""
    import torch

    trt = _import_trt()
    with torch.cuda.device(_device_index(device)):
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
        info["inspector_error"] = _one_line(e)
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
    with torch.cuda.device(_device_index(device)):
        torch.cuda.init()
        blob, info = build_serialized(onnx_path, opts, input_shape)
        info["gpu"] = torch.cuda.get_device_name(_device_index(device))
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(blob)
    info["engine_path"] = str(engine_path)
    info["engine_bytes"] = len(blob)
    return info


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
        if precision not in _PRECISIONS:
            raise HwpruneError(f"tensorrt backend: unknown precision '{precision}'",
                               f"choose one of: {', '.join(_PRECISIONS)}")
        self.threads = None
        self.device_index = _device_index(device)
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
            return str(_import_trt().__version__)
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

        trt = _import_trt()
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

        trt = _import_trt()
        cfg = self.measure_cfg
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
                run = self._runner(ctx, stream)
                forward_ms: list[float] = []

                def once() -> float:
                    t = time.perf_counter_ns()
                    run()
                    stream.synchronize()
                    return (time.perf_counter_ns() - t) / 1e6

                once()  # first run, not recorded
                t_end = time.perf_counter() + cfg.warmup_s
                while time.perf_counter() < t_end:
                    once()
                profiler.recording = True
                t0 = time.perf_counter()
                n = 0
                while True:
                    forward_ms.append(once())
                    n += 1
                    if n >= cfg.max_iters:
                        break
                    if n >= cfg.min_iters and time.perf_counter() - t0 >= cfg.min_time_s:
                        break
                stream.synchronize()
                profiler.recording = False
        del bufs, ctx

        by_name = {str(layer.get("Name", "")): layer for layer in built.layers}
        batch = int(model.input_shape[0]) if model.input_shape else 1
        rows: list[LayerTiming] = []
        total = 0.0
        for name in profiler.order:
            samples = profiler.samples[name]
            if not samples:
                continue
            info = by_name.get(name) or by_name.get(re.sub(r"\s*\[profile \d+\]$", "", name)) or {"Name": name}
            unit, layer, extra = layer_info_to_unit(info, built.nodes, batch)
            extra["inspector"] = name in by_name
            stats = Stats.from_samples(samples, cfg.cov_threshold)
            total += stats.median
            rows.append(LayerTiming(unit=unit, stats=stats, node=name, layer=layer, extra=extra))
        if forward_ms:
            fwd = Stats.from_samples(forward_ms, cfg.cov_threshold)
            self.last_profile_summary = {
                "profiled_wall_median_ms": fwd.median, "sum_of_layer_medians_ms": total,
                "iterations": len(forward_ms), "layers_reported": len(rows),
                "note": "profiled runs synchronise after every layer; use measure_e2e for latency",
            }
        return rows

    def measure_unit(self, spec: UnitSpec, workdir: Path) -> list[LayerTiming]:
        path = spec.to_onnx(Path(workdir) / "unit.onnx")
        art = ModelArtifact(input_shape=spec.input_shapes()["x"], onnx_path=path, name=spec.key())
        try:
            return self.profile_layers(art)
        finally:  # the file may be rewritten for the next unit: drop its engine
            self._engines = {k: v for k, v in self._engines.items() if k[0] != str(Path(path).resolve())}
