"""fp16 / bf16 conversion of an ONNX file for TensorRT 11, whose networks are strongly typed."""

from __future__ import annotations

from pathlib import Path

from hwprune.errors import HwpruneError

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
    from onnx import TensorProto

    if precision not in ("fp16", "bf16"):
        raise HwpruneError(f"cannot convert an ONNX model to '{precision}'", "use fp16 or bf16")
    if use_modelopt and _convert_with_modelopt(src, dst, precision):
        return "modelopt.autocast"
    target = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    model = onnx.load(str(src))
    g = model.graph
    _check_no_control_flow(g, precision)
    keep = {n.input[i] for n in g.node for i in range(len(n.input))
            if (n.op_type, i) in _KEEP_FP32_INPUTS and n.input[i]}
    _cast_weights(g, precision, target, keep)
    suffix = f"__{precision}"
    nodes = _cast_inputs(g, target, suffix) + list(g.node) + _cast_outputs(g, suffix)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    big = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(dst), save_as_external_data=big)
    return "hwprune.builtin"


def _convert_with_modelopt(src: str | Path, dst: str | Path, precision: str) -> bool:
    """Convert with ModelOpt AutoCast; False when ModelOpt is not installed."""
    import onnx

    try:
        import modelopt.onnx.autocast as autocast  # type: ignore[import-not-found]

        converted = autocast.convert_to_mixed_precision(onnx_path=str(src), low_precision_type=precision,
                                                        keep_io_types=True)
        onnx.save(converted, str(dst))
    except ImportError:
        return False
    return True


def _check_no_control_flow(g, precision: str) -> None:
    import onnx

    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise HwpruneError(f"the built-in {precision} converter does not handle control flow ({n.op_type})",
                               "pip install nvidia-modelopt[onnx] for ModelOpt AutoCast")


def _cast_weights(g, precision: str, target: int, keep: set[str]) -> None:
    """Cast float initializers and constants to the low type, and retarget ``Cast`` nodes to float."""
    from onnx import TensorProto

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


def _cast_inputs(g, target: int, suffix: str) -> list:
    """Rewire the consumers of each float graph input to a low-type copy; the ``Cast`` nodes to prepend."""
    from onnx import TensorProto, helper

    inits = {t.name for t in g.initializer}
    new_nodes = []
    for inp in g.input:
        if inp.name in inits or inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        low = inp.name + suffix
        for n in g.node:
            for i, v in enumerate(n.input):
                if v == inp.name and (n.op_type, i) not in _KEEP_FP32_INPUTS:
                    n.input[i] = low
        new_nodes.append(helper.make_node("Cast", [inp.name], [low], name=f"hwprune/cast_in/{inp.name}", to=target))
    return new_nodes


def _cast_outputs(g, suffix: str) -> list:
    """Rename each float graph output's producer to a low-type tensor; the ``Cast`` nodes back to append."""
    from onnx import TensorProto, helper

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
    return tail_nodes
