"""What a table row describes.

Two descriptions of a layer live side by side:

* :class:`UnitSpec` is a *source-level* layer as the user's model defines it: a
  convolution (with the batch norm the runtime folds into it, an optional activation
  and an optional residual add), a linear layer or a pooling layer. Micro-benchmarks
  build one in isolation.
* :class:`UnitKey` is what the runtime *really executes* after its own graph
  optimisations, read from the runtime itself: the kernel kind (``nchwc.Conv``,
  ``FusedConv``, ``Conv``, ``ReorderInput``...), the executed shapes, the fused
  activation and whether a residual Add was fused in. It is the key of a table row.

This module needs neither torch nor onnx at import time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Coarse families, used by the predictor to pick a regressor.
KIND_OF_OP = {
    "Conv": "conv", "FusedConv": "conv", "nchwc.Conv": "conv", "QLinearConv": "conv",
    "Gemm": "linear", "MatMul": "linear", "FusedGemm": "linear", "Linear": "linear",
    "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool", "GlobalMaxPool": "pool",
    "nchwc.MaxPool": "pool", "nchwc.AveragePool": "pool", "nchwc.GlobalAveragePool": "pool",
    "nchwc.GlobalMaxPool": "pool", "ReduceMean": "pool", "AdaptiveAvgPool2d": "pool", "MaxPool2d": "pool",
    "AvgPool2d": "pool", "Pooling": "pool",
    "nchwc.ReorderInput": "reorder", "nchwc.ReorderOutput": "reorder", "Reformat": "reorder",
    "Transpose": "reorder", "Reshape": "reshape", "Flatten": "reshape",
    "Add": "elementwise", "Mul": "elementwise", "Relu": "elementwise", "Clip": "elementwise",
    "Sigmoid": "elementwise", "HardSigmoid": "elementwise", "HardSwish": "elementwise",
    "BatchNormalization": "elementwise", "ElementWise": "elementwise", "Activation": "elementwise",
    "Concat": "concat",
    # TensorRT layer types (ParameterType of the engine inspector)
    "trt.Convolution": "conv", "trt.Deconvolution": "conv", "trt.Pooling": "pool", "trt.Reduce": "pool",
    "trt.MatrixMultiply": "linear", "trt.FullyConnected": "linear", "trt.Reformat": "reorder",
    "trt.Shuffle": "reshape", "trt.ElementWise": "elementwise", "trt.Activation": "elementwise",
    "trt.Scale": "elementwise", "trt.PointWise": "elementwise", "trt.Concatenation": "concat",
}


def onnx_node_to_module(name: str) -> str:
    """``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1`` (scope names of torch.onnx export).

    The last part is the operator. Each scope part is a child's name relative to the
    previous scope, which the exporter sometimes writes with its parent's local name as a
    prefix (``layer1`` / ``layer1.0``, ``downsample`` / ``downsample.0``). Names without
    scopes (``Conv_3``, ``node_Conv_12``) give ``""``.
    """
    parts = [p for p in str(name).split("/") if p]
    if len(parts) <= 1:
        return ""
    full, last = "", ""
    for p in parts[:-1]:
        if last and p.startswith(last + "."):
            full = full[: len(full) - len(last)] + p
        else:
            full = f"{full}.{p}" if full else p
        last = p
    return full


def op_kind(op: str, groups: int = 1, cin: int = 0) -> str:
    kind = KIND_OF_OP.get(op, "other")
    if kind == "conv" and groups > 1 and groups == cin:
        return "dwconv"
    return kind


@dataclass(frozen=True)
class UnitKey:
    """Shape signature of one executed unit. ``h``/``w`` are the *input* spatial size."""

    op: str
    cin: int = 0
    cout: int = 0
    kh: int = 1
    kw: int = 1
    stride: int = 1
    groups: int = 1
    dilation: int = 1
    h: int = 1
    w: int = 1
    batch: int = 1
    activation: str = ""
    fused_add: bool = False
    layout: str = "nchw"
    cin_exec: int = 0  # channels as executed (blocked layouts pad them)
    cout_exec: int = 0

    @property
    def kind(self) -> str:
        return op_kind(self.op, self.groups, self.cin)

    def key(self) -> str:
        s = (f"{self.op}|{self.cin}>{self.cout}|k{self.kh}x{self.kw}|s{self.stride}|g{self.groups}"
             f"|d{self.dilation}|{self.h}x{self.w}|b{self.batch}|{self.layout}")
        if self.activation:
            s += f"|{self.activation}"
        if self.fused_add:
            s += "|+add"
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class UnitSpec:
    """A source-level layer to benchmark in isolation (``h``/``w``: input size)."""

    op: str  # "conv" | "linear" | "maxpool" | "avgpool" | "gap"
    cin: int
    cout: int
    h: int = 1
    w: int = 1
    kh: int = 1
    kw: int = 1
    stride: int = 1
    pad: int = 0
    groups: int = 1
    dilation: int = 1
    batch: int = 1
    activation: str = ""  # "", "relu", "relu6", "hardswish", "silu", "sigmoid"
    fused_add: bool = False  # a residual added before the activation

    def key(self) -> str:
        return (f"{self.op}|{self.cin}>{self.cout}|k{self.kh}x{self.kw}|s{self.stride}|p{self.pad}|g{self.groups}"
                f"|d{self.dilation}|{self.h}x{self.w}|b{self.batch}|{self.activation}|{'add' if self.fused_add else ''}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UnitSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.op in ("linear", "gap"):
            return 1, 1
        oh = (self.h + 2 * self.pad - self.dilation * (self.kh - 1) - 1) // self.stride + 1
        ow = (self.w + 2 * self.pad - self.dilation * (self.kw - 1) - 1) // self.stride + 1
        return oh, ow

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        x = (self.batch, self.cin) if self.op == "linear" else (self.batch, self.cin, self.h, self.w)
        shapes = {"x": x}
        if self.fused_add:
            oh, ow = self.out_hw
            shapes["z"] = (self.batch, self.cout) if self.op == "linear" else (self.batch, self.cout, oh, ow)
        return shapes

    def to_onnx(self, path: str | Path, opset: int = 17) -> Path:
        """Write this unit as a small ONNX model (needs the ``onnx`` package, not torch)."""
        import onnx
        from onnx import TensorProto, helper

        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in self.input_shapes().items()]
        nodes, inits, cur = self._onnx_layer()
        cur = self._onnx_epilogue(nodes, inits, cur)
        nodes.append(helper.make_node("Identity", [cur], ["y"], name="unit/Out"))
        oh, ow = self.out_hw
        yshape = [self.batch, self.cout] if self.op == "linear" else [self.batch, self.cout, oh, ow]
        if self.op in ("maxpool", "avgpool", "gap"):
            yshape[1] = self.cin
        graph = helper.make_graph(nodes, "unit", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="hwprune")
        model.ir_version = 8
        path = Path(path)
        onnx.save(model, str(path))
        return path

    def _onnx_layer(self) -> tuple[list, list, str]:
        """(nodes, initializers, output tensor) of the unit's main operation on input ``x``."""
        import numpy as np
        from onnx import helper, numpy_helper

        rng = np.random.default_rng(0)
        nodes, inits = [], []
        if self.op in ("conv", "linear"):
            wshape = (self.cout, self.cin // self.groups, self.kh, self.kw) if self.op == "conv" else \
                (self.cout, self.cin)
            inits.append(numpy_helper.from_array(rng.standard_normal(wshape).astype(np.float32) * 0.1, "W"))
            inits.append(numpy_helper.from_array(rng.standard_normal(self.cout).astype(np.float32) * 0.1, "B"))
        if self.op == "conv":
            nodes.append(helper.make_node(
                "Conv", ["x", "W", "B"], ["conv_out"], name="unit/Conv", group=self.groups,
                kernel_shape=[self.kh, self.kw], strides=[self.stride] * 2, pads=[self.pad] * 4,
                dilations=[self.dilation] * 2))
            return nodes, inits, "conv_out"
        if self.op == "linear":
            nodes.append(helper.make_node("Gemm", ["x", "W", "B"], ["fc_out"], name="unit/Gemm", transB=1))
            return nodes, inits, "fc_out"
        if self.op in ("maxpool", "avgpool"):
            nodes.append(helper.make_node(
                "MaxPool" if self.op == "maxpool" else "AveragePool", ["x"], ["pool_out"], name="unit/Pool",
                kernel_shape=[self.kh, self.kw], strides=[self.stride] * 2, pads=[self.pad] * 4))
            return nodes, inits, "pool_out"
        if self.op == "gap":
            nodes.append(helper.make_node("GlobalAveragePool", ["x"], ["pool_out"], name="unit/GlobalAveragePool"))
            return nodes, inits, "pool_out"
        raise ValueError(f"unknown unit op '{self.op}'")

    def _onnx_epilogue(self, nodes: list, inits: list, cur: str) -> str:
        """Append the residual Add and the activation after tensor ``cur``; returns the new output tensor."""
        import numpy as np
        from onnx import helper, numpy_helper

        if self.fused_add:
            nodes.append(helper.make_node("Add", [cur, "z"], ["add_out"], name="unit/Add"))
            cur = "add_out"
        act = {"relu": "Relu", "sigmoid": "Sigmoid", "hardswish": "HardSwish"}.get(self.activation)
        if act:
            nodes.append(helper.make_node(act, [cur], ["act_out"], name=f"unit/{act}"))
        elif self.activation == "relu6":
            inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                      numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
            nodes.append(helper.make_node("Clip", [cur, "lo", "hi"], ["act_out"], name="unit/Clip"))
        elif self.activation == "silu":
            nodes.append(helper.make_node("Sigmoid", [cur], ["sig"], name="unit/Sigmoid"))
            nodes.append(helper.make_node("Mul", [cur, "sig"], ["act_out"], name="unit/Mul"))
        elif self.activation:
            raise ValueError(f"unknown activation '{self.activation}'")
        else:
            return cur
        return "act_out"


#: Shape of the tensor the probe chains pass along: about a microsecond per node on a CPU.
CHAIN_SHAPE = (1, 64, 14, 14)
#: Lengths of the short and the long probe chain.
CHAIN_LENGTHS = (20, 220)


def chain_onnx(path: str | Path, n: int, shape: tuple[int, ...] = CHAIN_SHAPE, opset: int = 17) -> Path:
    """A chain of ``n`` alternating Neg and Abs nodes (nothing for the runtime to fuse away):
    the probe that measures what a profiler adds to each node it times."""
    import onnx
    from onnx import TensorProto, helper

    nodes, cur = [], "x"
    for i in range(n):
        out = "y" if i == n - 1 else f"t{i}"
        nodes.append(helper.make_node("Neg" if i % 2 == 0 else "Abs", [cur], [out], name=f"chain/{i}"))
        cur = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hwprune")
    model.ir_version = 8
    path = Path(path)
    onnx.save(model, str(path))
    return path
