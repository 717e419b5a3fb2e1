"""Torch backend (CPU here, CUDA where present) and TensorRT backend (skipped without one).

The TensorRT helpers that need no GPU (ONNX names -> modules, inspector JSON -> UnitKey,
the fp16/bf16 ONNX converter) are tested everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from hwprune.profiling.backends.base import LayerTiming, ModelArtifact
from hwprune.profiling.backends.tensorrt_backend import (TensorRTBackend, convert_onnx_precision, layer_info_to_unit,
                                               onnx_names_of_layer, onnx_node_info, onnx_node_to_module,
                                               read_engine_layers, tensor_format)
from hwprune.profiling.backends.torch_backend import (TorchBackend, build_unit_module, unit_key_for_module,
                                            unit_key_for_spec)
from hwprune.errors import BackendUnavailable
from hwprune.profiling.measure import MeasureConfig
from hwprune.profiling.rows import UnitSpec

QUICK = MeasureConfig.quick()
CUDA_REASON = TorchBackend.unavailable_reason("cuda")
TRT_REASON = TensorRTBackend.unavailable_reason("cuda")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.dw(x) + x)  # shared ReLU, functional residual add
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_artifact(batch: int = 2) -> ModelArtifact:
    torch.manual_seed(0)
    return ModelArtifact(input_shape=(batch, 3, 16, 16), module=Tiny(), name="tiny")


# -----------------------------------------------------------------------------------------
# torch backend, CPU
# -----------------------------------------------------------------------------------------
def test_torch_cpu_e2e_stats_and_settings():
    be = TorchBackend(threads=1, device="cpu", measure=QUICK)
    art = tiny_artifact()
    m = be.measure_e2e(art)
    assert m.stats.count >= QUICK.min_iters
    assert m.stats.median > 0 and m.stats.min <= m.stats.median <= max(m.samples_ms)
    assert m.setup_ms is not None and m.setup_ms >= 0
    assert m.first_run_ms is not None and m.first_run_ms > 0
    s = be.settings()
    assert s["backend"] == "torch" and s["threads"] == 1 and torch.get_num_threads() == 1
    assert s["execution_provider"] == "cpu" and s["timing"] == "wall_clock"
    assert s["precision"] == "fp32" and s["cuda_graphs"] is False
    assert not be.needs_onnx()
    # the caller's module is left where it was
    assert next(art.module.parameters()).device.type == "cpu" and art.module.training


def test_torch_cpu_profile_layers_unit_keys():
    be = TorchBackend(threads=1, measure=QUICK)
    rows = be.profile_layers(tiny_artifact(batch=2))
    assert all(isinstance(r, LayerTiming) for r in rows)
    by_node = {r.node: r for r in rows}
    assert {"conv1", "bn1", "relu", "relu#1", "dw", "pool", "fc"} <= set(by_node)
    for r in rows:
        assert r.stats.count >= QUICK.min_iters and r.stats.median >= 0
        assert r.layer == r.node.split("#")[0]

    c = by_node["conv1"].unit
    assert (c.op, c.cin, c.cout, c.kh, c.kw, c.stride, c.groups, c.dilation) == ("Conv", 3, 8, 3, 3, 2, 1, 1)
    assert (c.h, c.w, c.batch, c.layout, c.cin_exec, c.cout_exec) == (16, 16, 2, "nchw", 3, 8)
    d = by_node["dw"].unit
    assert (d.op, d.cin, d.cout, d.groups, d.dilation, d.h, d.w) == ("Conv", 8, 8, 8, 2, 8, 8)
    assert d.kind == "dwconv"
    f = by_node["fc"].unit
    assert (f.op, f.cin, f.cout, f.batch, f.h, f.w) == ("Linear", 8, 4, 2, 1, 1)
    assert by_node["bn1"].unit.op == "BatchNormalization"
    assert by_node["relu"].unit.op == "Relu" and by_node["relu#1"].extra["call_index"] == 1
    p = by_node["pool"].unit
    assert (p.op, p.cin, p.kh, p.h) == ("AdaptiveAvgPool2d", 8, 8, 8)
    summary = be.last_profile_summary
    assert summary["iterations"] >= QUICK.min_iters and summary["profiled_forward_median_ms"] > 0


def test_unit_key_for_module_activations_and_channels_last():
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert unit_key_for_module(nn.ReLU6(), x.shape).op == "Clip"
    assert unit_key_for_module(nn.Hardswish(), x.shape).op == "HardSwish"
    silu = unit_key_for_module(nn.SiLU(), x.shape)
    assert (silu.op, silu.activation, silu.kind) == ("Activation", "SiLU", "elementwise")
    assert unit_key_for_module(nn.MaxPool2d(3, 2), x.shape).key().startswith("MaxPool2d|4>4|k3x3|s2")
    be = TorchBackend(threads=1, measure=QUICK, channels_last=True, precision="bf16")
    rows = be.profile_layers(tiny_artifact(batch=1))
    assert {r.node: r for r in rows}["conv1"].unit.layout == "nhwc"
    assert be.settings()["autocast"] == "bfloat16"


def test_torch_measure_unit_conv():
    be = TorchBackend(threads=1, measure=QUICK)
    spec = UnitSpec("conv", cin=8, cout=16, h=12, w=12, kh=3, kw=3, stride=2, pad=1, groups=2,
                    activation="relu6", fused_add=True)
    rows = be.measure_unit(spec, workdir=None)
    assert len(rows) == 1 and rows[0].stats.count >= QUICK.min_iters and rows[0].stats.median > 0
    u = rows[0].unit
    assert (u.op, u.cin, u.cout, u.kh, u.kw, u.stride, u.groups, u.h, u.w, u.batch) == \
        ("Conv", 8, 16, 3, 3, 2, 2, 12, 12, 1)
    assert u.activation == "Clip" and u.fused_add is True
    assert rows[0].extra["kernels"] == ["conv", "add", "relu6"]


@pytest.mark.parametrize("spec", [
    UnitSpec("linear", cin=32, cout=10, batch=3, activation="silu"),
    UnitSpec("maxpool", cin=8, cout=8, h=8, w=8, kh=2, kw=2, stride=2),
    UnitSpec("avgpool", cin=8, cout=8, h=8, w=8, kh=3, kw=3, stride=1, pad=1, fused_add=True),
    UnitSpec("gap", cin=8, cout=8, h=7, w=7, activation="hardswish"),
])
def test_torch_unit_module_matches_spec_shapes(spec):
    mod = build_unit_module(spec)
    xs = [torch.randn(s) for s in spec.input_shapes().values()]
    y = mod(*xs)
    oh, ow = spec.out_hw
    expect = (spec.batch, spec.cout) if spec.op == "linear" else (spec.batch, spec.cin, oh, ow)
    assert tuple(y.shape) == expect
    key = unit_key_for_spec(spec)
    if spec.op == "gap":
        assert (key.op, key.kh, key.kw, key.stride) == ("AdaptiveAvgPool2d", 7, 7, 1)
    if spec.op == "linear":
        assert (key.op, key.h, key.w, key.kh, key.batch, key.activation) == ("Linear", 1, 1, 1, 3, "SiLU")


@pytest.mark.skipif(CUDA_REASON is None, reason="a CUDA device is present")
def test_torch_cuda_unavailable_is_one_line():
    reason = TorchBackend.unavailable_reason("cuda")
    assert reason.startswith("no CUDA device visible to torch") and "\n" not in reason
    with pytest.raises(BackendUnavailable) as e:
        TorchBackend(device="cuda:0", measure=QUICK)
    assert "\n" not in str(e.value) and "torch" in str(e.value)


def test_torch_rejects_unknown_device():
    assert "cpu" in TorchBackend.unavailable_reason("tpu")


# -----------------------------------------------------------------------------------------
# torch backend, CUDA (skipped without a GPU)
# -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=CUDA_REASON or "")
@pytest.mark.parametrize("graphs", [False, True])
def test_torch_cuda_e2e_and_profile(graphs):
    be = TorchBackend(device="cuda", measure=QUICK, use_cuda_graphs=graphs)
    art = tiny_artifact()
    m = be.measure_e2e(art)
    assert m.stats.count >= QUICK.min_iters and m.stats.median > 0
    s = be.settings()
    assert s["timing"] == "cuda_events" and s["cuda_graphs"] is graphs and s["execution_provider"]
    rows = be.profile_layers(art)
    assert {"conv1", "dw", "fc"} <= {r.node for r in rows}
    unit_rows = be.measure_unit(UnitSpec("conv", 16, 16, 14, 14, 3, 3, 1, 1, activation="relu"), None)
    assert unit_rows[0].stats.median > 0 and unit_rows[0].unit.op == "Conv"


# -----------------------------------------------------------------------------------------
# TensorRT: availability
# -----------------------------------------------------------------------------------------
@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a GPU are present")
def test_tensorrt_unavailable_raises_one_line():
    assert "\n" not in TRT_REASON
    with pytest.raises(BackendUnavailable) as e:
        TensorRTBackend(device="cuda", measure=QUICK)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("backend 'tensorrt' is not available here: ")
    assert TensorRTBackend.unavailable_reason("cpu")  # never on a CPU


# -----------------------------------------------------------------------------------------
# TensorRT helpers that need no GPU
# -----------------------------------------------------------------------------------------
def test_onnx_node_to_module():
    assert onnx_node_to_module("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert onnx_node_to_module("/features/features.0/features.0.0/Conv") == "features.0.0"
    assert onnx_node_to_module("/fc/Gemm") == "fc"
    assert onnx_node_to_module("/layer2/layer2.0/downsample/downsample.0/Conv") == "layer2.0.downsample.0"
    assert onnx_node_to_module("/layer1/layer1.0/Add") == "layer1.0"
    assert onnx_node_to_module("Conv_3") == "" and onnx_node_to_module("") == ""


def _scoped_onnx(path):
    """A Conv -> Add -> Relu graph with TorchScript-style names and a dynamo-style node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "layer1.0.conv2.weight")
    w2 = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "onnx::Conv_9")
    nodes = [
        helper.make_node("Conv", ["x", "layer1.0.conv2.weight"], ["c"], name="node_Conv_12", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "x"], ["a"], name="/layer1/layer1.0/Add"),
        helper.make_node("Relu", ["a"], ["r"], name="/layer1/layer1.0/relu2/Relu"),
        helper.make_node("Conv", ["r", "onnx::Conv_9"], ["y"], name="/layer2/layer2.0/conv1/Conv"),
    ]
    nodes[2].metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'layer1', 'layer1.0', "
                                                                        "'layer1.0.relu2', 'relu_2']")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w, w2])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_node_info_modules(tmp_path):
    info = onnx_node_info(_scoped_onnx(tmp_path / "m.onnx"))
    assert info["node_Conv_12"].module == "layer1.0.conv2"  # from the weight's parameter name
    assert info["/layer1/layer1.0/Add"].module == "layer1.0" and info["/layer1/layer1.0/Add"].op_type == "Add"
    assert info["/layer1/layer1.0/relu2/Relu"].module == "layer1.0.relu2"  # from name scopes
    assert info["/layer2/layer2.0/conv1/Conv"].module == "layer2.0.conv1"  # from the node name
    assert onnx_node_info(tmp_path / "missing.onnx") == {}


_ENGINE_JSON = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to node_Conv_12 + /layer1/layer1.0/Add",
         "LayerType": "Reformat", "ParameterType": "Reformat", "Origin": "REFORMAT",
         "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [1, 4, 8, 8],
                     "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "x'", "Location": "Device", "Dimensions": [1, 4, 8, 8],
                      "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "node_Conv_12 + /layer1/layer1.0/Add + /layer1/layer1.0/relu2/Relu", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x'", "Dimensions": [1, 4, 8, 8],
                     "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"},
                    {"Name": "x", "Dimensions": [1, 4, 8, 8], "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "r", "Dimensions": [1, 4, 8, 8],
                      "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "ParameterType": "Convolution", "Kernel": [3, 3], "PaddingMode": "kEXPLICIT_ROUND_DOWN",
         "PrePadding": [1, 1], "PostPadding": [1, 1], "Stride": [1, 1], "Dilation": [1, 1], "OutMaps": 4,
         "Groups": 1, "Weights": {"Type": "Half", "Count": 144}, "Activation": "RELU", "HasReLU": 1,
         "TacticName": "sm90_xmma_fprop_implicit_gemm",
         "Metadata": "[ONNX Layer: node_Conv_12]\x1e[ONNX Layer: /layer1/layer1.0/Add]\x1e"
                     "[ONNX Layer: /layer1/layer1.0/relu2/Relu]"},
        {"Name": "/layer2/layer2.0/conv1/Conv", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "r", "Dimensions": [2, 4, 8, 8], "Format": "Row major linear FP32 format (kLINEAR)",
                     "DataType": "Float"}],
         "Outputs": [{"Name": "y", "Dimensions": [2, 4, 8, 8], "Format": "Thirty-two wide (kCHW32)",
                      "DataType": "Half"}],
         "Kernel": [1, 1], "Strides": [2, 2], "NbGroups": 2, "Activation": "NONE"},
        "__myl_Bare_0",
    ],
    "I/O Tensors": [],
}


def test_layer_info_to_unit_from_inspector_json(tmp_path):
    nodes = onnx_node_info(_scoped_onnx(tmp_path / "m.onnx"))
    layers = read_engine_layers(json.dumps(_ENGINE_JSON))
    assert len(layers) == 4 and layers[3] == {"Name": "__myl_Bare_0"}

    ref, ref_layer, ref_extra = layer_info_to_unit(layers[0], nodes)
    assert ref.op == "trt.Reformat" and ref.activation == "" and not ref.fused_add
    assert (ref.cin, ref.cout, ref.layout, ref.cout_exec) == (4, 4, "nchw", 8)
    assert ref_layer == "layer1.0.conv2" and ref_extra["reformat_for"] == "node_Conv_12"

    conv, layer, extra = layer_info_to_unit(layers[1], nodes)
    assert (conv.op, conv.cin, conv.cout, conv.kh, conv.kw, conv.stride, conv.groups) == \
        ("trt.Convolution", 4, 4, 3, 3, 1, 1)
    assert (conv.h, conv.w, conv.batch, conv.activation, conv.fused_add) == (8, 8, 1, "Relu", True)
    assert (conv.layout, conv.cin_exec, conv.cout_exec) == ("hwc8", 8, 8)
    assert layer == "layer1.0.conv2" and extra["onnx_ops"] == ["Conv", "Add", "Relu"]
    assert extra["dtype_in"] == "fp16" and extra["tactic"].startswith("sm90")

    c2, layer2, extra2 = layer_info_to_unit(layers[2], nodes)  # TensorRT 11 field names
    assert (c2.stride, c2.groups, c2.batch, c2.activation, c2.fused_add) == (2, 2, 2, "", False)
    assert (c2.layout, extra2["out_layout"], extra2["dtype_out"], c2.cout_exec) == ("nchw", "chw32", "fp16", 32)
    assert layer2 == "layer2.0.conv1"

    bare, bare_layer, _ = layer_info_to_unit(layers[3], nodes)
    assert bare.op == "trt.Unknown" and bare_layer == ""


def test_onnx_names_and_formats():
    assert onnx_names_of_layer({"Name": "a + b [profile 0]"}) == ["a", "b"]
    assert onnx_names_of_layer({"Name": "x", "Metadata": "[ONNX Layer: p]\x1f[ONNX Layer: q]"}) == ["p", "q"]
    assert tensor_format({"Format/Datatype": "Channel major FP32 format"}) == ("nhwc", 1, "fp32")
    assert tensor_format({"Format/Datatype": "Four wide channel vectorized row major FP32 format"}) == \
        ("chw4", 4, "fp32")
    assert tensor_format({"Format/Datatype": "N/A due to dynamic shapes"})[0] == ""
    assert tensor_format({}) == ("", 1, "")


def test_convert_onnx_precision_fp16_runs_and_matches(tmp_path):
    import onnx
    import onnxruntime as ort

    spec = UnitSpec("conv", cin=8, cout=16, h=10, w=10, kh=3, kw=3, pad=1, activation="relu6", fused_add=True)
    src = spec.to_onnx(tmp_path / "u.onnx")
    dst = tmp_path / "u16.onnx"
    assert convert_onnx_precision(src, dst, "fp16", use_modelopt=False) == "hwprune.builtin"
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in spec.input_shapes().items()}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert out.dtype == np.float32 and np.allclose(out, ref, rtol=1e-2, atol=1e-2)

    bf = tmp_path / "ubf.onnx"
    convert_onnx_precision(src, bf, "bf16", use_modelopt=False)
    assert {t.data_type for t in onnx.load(str(bf)).graph.initializer} == {onnx.TensorProto.BFLOAT16}


# -----------------------------------------------------------------------------------------
# TensorRT on a GPU (skipped here)
# -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_tensorrt_e2e_profile_and_unit(tmp_path):
    art = tiny_artifact()
    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(art.module.eval(), (torch.randn(art.input_shape),), str(onnx_path), dynamo=False,
                      input_names=["x"], output_names=["y"])
    art.onnx_path = onnx_path
    be = TensorRTBackend(device="cuda", measure=QUICK)
    m = be.measure_e2e(art)
    assert m.stats.count >= QUICK.min_iters and m.stats.median > 0
    assert m.setup_ms and m.setup_ms > 0 and m.first_run_ms is not None
    rows = be.profile_layers(art)
    assert rows and all(r.stats.count >= 1 for r in rows)
    convs = [r for r in rows if r.unit.op == "trt.Convolution"]
    assert convs and {"conv1", "dw"} & {r.layer for r in convs}
    s = be.settings()
    assert s["builder"]["profiling_verbosity"] == "DETAILED" and s["backend_version"] != "unavailable"
    unit_rows = be.measure_unit(UnitSpec("conv", 16, 32, 14, 14, 3, 3, 1, 1, activation="relu"), tmp_path)
    assert unit_rows and unit_rows[0].stats.median > 0
    info = be.export_engine(onnx_path, tmp_path / "tiny.plan", input_shape=art.input_shape)
    assert (tmp_path / "tiny.plan").stat().st_size == info["engine_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_tensorrt_fp16(tmp_path):
    spec = UnitSpec("conv", 32, 32, 28, 28, 3, 3, 1, 1, activation="relu", fused_add=True)
    be = TensorRTBackend(device="cuda", precision="fp16", measure=QUICK)
    rows = be.measure_unit(spec, tmp_path)
    assert rows and rows[0].stats.median > 0
    assert be.settings()["builder"]["precision_mode"] != "fp32"
