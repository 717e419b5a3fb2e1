"""Read what ONNX Runtime really executes.

ONNX Runtime rewrites the exported graph before running it: it folds BatchNorm into
Conv, fuses activations (``FusedConv``, NCHWc ``Conv`` with an ``activation``
attribute), fuses residual Adds into the convolution (a fourth ``Sum``/``Z`` input),
switches convolutions to the blocked NCHWc layout when their channel counts allow it and
inserts ``ReorderInput``/``ReorderOutput`` nodes around them. None of this is assumed
here: it is read from the optimised graph the runtime wrote (``optimized_model_filepath``)
and from the shapes in its per-node profile.

Each executed node is tied back to the source layer (the module path) it implements, so
that a table row can say which layer of which width configuration it timed.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, shape_inference

from hwprune.device.ort_runner import NodeRecord
from hwprune.profiling.rows import UnitKey, onnx_node_to_module
from hwprune.profiling.backends.base import LayerTiming

_PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization",
                 "Add", "Mul", "Identity"}


def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = {n.name: n for n in g.node}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: tuple(t.dims) for t in g.initializer}
        self.shapes: dict[str, list[int]] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            if dims and all(d > 0 for d in dims):
                self.shapes[vi.name] = dims


class OrtGraphReader:
    """Maps the nodes of an ONNX Runtime profile to :class:`UnitKey` rows."""

    def __init__(self, original_onnx: str | Path, optimized_onnx: str | Path):
        orig = onnx.load(str(original_onnx), load_external_data=False)
        try:
            orig = shape_inference.infer_shapes(orig)
        except Exception:  # shape inference is best effort: logical shapes fall back to executed ones
            pass
        self.src = _Graph(orig)
        self.opt = _Graph(onnx.load(str(optimized_onnx), load_external_data=False))

    # -- source mapping ------------------------------------------------------------
    def _walk_to_conv(self, tensor: str, want_kernel: tuple | None):
        seen = 0
        node = self.src.producer.get(tensor)
        while node is not None and seen < 8:
            seen += 1
            if node.op_type in ("Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "GlobalAveragePool",
                                "GlobalMaxPool", "ReduceMean"):
                return node
            if node.op_type not in _PASS_THROUGH:
                return node
            if node.op_type in ("Add", "Mul") and len(node.input) > 1:
                cands = [self.src.producer.get(i) for i in node.input]
                convs = [c for c in cands if c is not None and c.op_type == "Conv"]
                if want_kernel is not None:
                    match = [c for c in convs if tuple(_attrs(c).get("kernel_shape", ())) == want_kernel]
                    convs = match or convs
                if convs:
                    # The Add is fused into the conv whose output has no other consumer.
                    single = [c for c in convs if len(self.src.consumers.get(c.output[0], [])) == 1]
                    return (single or convs)[-1]
                node = cands[0]
                continue
            node = self.src.producer.get(node.input[0])
        return node

    def source_node(self, exec_name: str, want_kernel: tuple | None = None):
        if exec_name in self.src.nodes:
            return self.src.nodes[exec_name]
        if exec_name.endswith("_nchwc"):
            return self._walk_to_conv(exec_name[: -len("_nchwc")], want_kernel)
        return None

    # -- rows ----------------------------------------------------------------------
    def units(self, samples: list[NodeRecord]) -> list[LayerTiming]:
        rows: list[LayerTiming] = []
        layer_of_exec: dict[str, str] = {}
        pending_reorders = []
        for ns in samples:
            node = self.opt.nodes.get(ns.name)
            lt = self._row(ns, node)
            rows.append(lt)
            layer_of_exec[ns.name] = lt.layer
            if ns.op in ("ReorderInput", "ReorderOutput") and node is not None:
                pending_reorders.append((lt, node))
        for lt, node in pending_reorders:
            self._attach_reorder(lt, node, layer_of_exec)
        return rows

    def _row(self, ns: NodeRecord, node) -> LayerTiming:
        """The row of one executed node: executed shapes from the profile, logical channels from the source."""
        nchwc = node is not None and node.domain == "com.microsoft.nchwc"
        attrs = _attrs(node) if node is not None else {}
        geo = _executed_geometry(ns, attrs)
        fused_add = (node is not None and ns.op in ("Conv", "FusedConv") and len(node.input) >= 4
                     and bool(node.input[3]))
        kernel = tuple(attrs.get("kernel_shape", ()))
        src = self.source_node(ns.name, kernel or None)
        layer = onnx_node_to_module(src.name) if src is not None else ""
        cin, cout, groups = self._logical_channels(src, geo["cin_exec"], geo["cout_exec"], geo.pop("groups"))
        key = UnitKey(op=f"nchwc.{ns.op}" if nchwc else ns.op, cin=cin, cout=cout, groups=groups, **geo,
                      activation=str(attrs.get("activation", "")), fused_add=fused_add,
                      layout="nchwc" if nchwc else "nchw")
        return LayerTiming(unit=key, stats=ns.stats, node=ns.name, layer=layer)

    def _logical_channels(self, src, cin: int, cout: int, groups: int) -> tuple[int, int, int]:
        """(cin, cout, groups) of the source layer: from its weights, else its input shape, else as executed."""
        if src is None:
            return cin, cout, groups
        if src.op_type == "Conv" and src.input[1] in self.src.inits:
            wshape = self.src.inits[src.input[1]]
            g = int(_attrs(src).get("group", 1))
            return int(wshape[1]) * g, int(wshape[0]), g
        if src.op_type == "Gemm" and src.input[1] in self.src.inits:
            wshape = self.src.inits[src.input[1]]
            trans_b = int(_attrs(src).get("transB", 0))
            cout, cin = (int(wshape[0]), int(wshape[1])) if trans_b else (int(wshape[1]), int(wshape[0]))
            return cin, cout, groups
        if src.input and src.input[0] in self.src.shapes:
            shp = self.src.shapes[src.input[0]]
            cin = cout = int(shp[1]) if len(shp) >= 2 else cin
        return cin, cout, groups

    def _attach_reorder(self, lt: LayerTiming, node, layer_of_exec: dict[str, str]) -> None:
        """A reorder belongs to the layer it feeds (ReorderInput) or drains (ReorderOutput), at its logical width."""
        layer = ""
        if node.op_type == "ReorderInput":
            logical = self.src.shapes.get(node.input[0])
            for c in self.opt.consumers.get(node.output[0], []):
                layer = layer_of_exec.get(c.name, "") or layer
        else:
            logical = self.src.shapes.get(node.output[0])
            p = self.opt.producer.get(node.input[0])
            if p is not None:
                layer = layer_of_exec.get(p.name, "")
        lt.layer = layer
        if logical and len(logical) >= 2:
            u = lt.unit
            lt.unit = UnitKey(**{**u.to_dict(), "cin": int(logical[1]), "cout": int(logical[1])})


def _executed_geometry(ns: NodeRecord, attrs: dict) -> dict[str, int]:
    """Batch, spatial size, executed channels, kernel, stride, dilation and groups of a profiled node."""
    ins = ns.input_shapes
    x = ins[0] if ins else []
    cin_exec = int(x[1]) if len(x) >= 2 else 0
    outs = ns.output_shapes
    cout_exec = int(outs[0][1]) if outs and len(outs[0]) >= 2 else cin_exec
    if ns.op in ("Conv", "FusedConv") and len(ins) >= 2 and len(ins[1]) == 4:
        cout_exec = int(ins[1][0])
    kernel = tuple(attrs.get("kernel_shape", ()))
    kh, kw = (int(kernel[0]), int(kernel[-1])) if kernel else (1, 1)
    h, w = (int(x[2]), int(x[3])) if len(x) == 4 else (1, 1)
    return {"batch": int(x[0]) if x else 1, "h": h, "w": w, "cin_exec": cin_exec, "cout_exec": cout_exec,
            "kh": kh, "kw": kw, "stride": int(attrs["strides"][0]) if attrs.get("strides") else 1,
            "dilation": int(attrs["dilations"][0]) if attrs.get("dilations") else 1,
            "groups": int(attrs.get("group", 1))}
