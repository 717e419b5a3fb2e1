"""TensorRT engine layers as table rows: ONNX node names -> source modules, and the engine
inspector's JSON description of each layer -> :class:`UnitKey`.

Everything here is plain parsing: it needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune.profiling.rows import UnitKey, onnx_node_to_module


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


def _io_geometry(ins: list[dict], outs: list[dict], default_batch: int) -> tuple[int, int, int, int, int]:
    """(batch, cin, cout, h, w) from the first input and output tensor dimensions."""
    x = _int_list(ins[0].get("Dimensions")) if ins else []
    y = _int_list(outs[0].get("Dimensions")) if outs else []
    batch = x[0] if x else (y[0] if y else default_batch)
    cin = x[1] if len(x) >= 2 else 0
    cout = y[1] if len(y) >= 2 else cin
    h, w = (x[-2], x[-1]) if len(x) >= 4 else (1, 1)
    return batch, cin, cout, h, w


def _window(info: dict) -> dict[str, int]:
    """Kernel, stride, dilation and groups of a layer (1 where the inspector says nothing)."""
    kernel = _int_list(info.get("Kernel") or info.get("KernelSize") or info.get("WindowSize")
                       or info.get("WindowDimensions"))
    kh, kw = (kernel[0], kernel[-1]) if kernel else (1, 1)
    return {"kh": kh, "kw": kw,
            "stride": _as_int(info.get("Stride", info.get("Strides")), 1),
            "dilation": _as_int(info.get("Dilation", info.get("Dilations")), 1),
            "groups": _as_int(info.get("Groups", info.get("NbGroups")), 1)}


def _fusions(info: dict, ops: list[str]) -> tuple[str, bool]:
    """(fused activation, fused residual add) of a layer from its fields and its ONNX ops."""
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
    return activation, fused_add


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
    batch, cin, cout, h, w = _io_geometry(ins, outs, default_batch)
    if "OutMaps" in info:
        cout = _as_int(info.get("OutMaps"), cout)
    # a reformat layer is a copy between layouts/types: it fuses nothing of the layer it feeds
    activation, fused_add = ("", False) if is_reformat else _fusions(info, ops)

    layout, vin, dtype_in = tensor_format(ins[0]) if ins else ("", 1, "")
    out_layout, vout, dtype_out = tensor_format(outs[0]) if outs else ("", 1, "")
    layer = _module_of(onnx_names[0], nodes) if onnx_names else ""
    key = UnitKey(op=f"trt.{kind}", cin=cin, cout=cout, **_window(info), h=h, w=w, batch=batch,
                  activation=activation, fused_add=fused_add, layout=layout or "nchw",
                  cin_exec=_round_up(cin, vin), cout_exec=_round_up(cout, vout))
    extra = {"trt_layer_type": impl, "trt_parameter_type": ptype, "onnx_nodes": onnx_names,
             "onnx_ops": ops, "out_layout": out_layout, "dtype_in": dtype_in, "dtype_out": dtype_out}
    if info.get("TacticName"):
        extra["tactic"] = str(info["TacticName"])
    if is_reformat:
        extra["reformat_for"] = onnx_names[0] if onnx_names else ""
    return key, layer, extra
