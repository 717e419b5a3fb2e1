"""Export modules to ONNX the way the profiler and the bench harness need them."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from hwprune.errors import HwpruneError


def export_onnx(module: nn.Module, input_shape: Sequence[int], path: str | Path, opset: int = 17) -> Path:
    """Static-shape ONNX export in eval mode (BatchNorm folded into Conv by the exporter).

    Uses the TorchScript-based exporter: it is several times faster than the dynamo
    exporter for the hundreds of subnets a profiling run writes, and names nodes after
    module paths (``/layer1/layer1.0/conv1/Conv``), which ties runtime nodes to layers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    x = torch.randn(*input_shape)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], do_constant_folding=True)
    except Exception as e:
        raise HwpruneError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        module.train(was_training)
    return path
