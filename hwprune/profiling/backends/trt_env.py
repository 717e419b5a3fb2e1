"""TensorRT availability: the lazy ``tensorrt`` import and one-line reasons why it cannot run."""

from __future__ import annotations

import re

INSTALL_HINT = "TensorRT is not installed: pip install 'hwprune[tensorrt]' on a machine with an NVIDIA GPU"
PRECISIONS = ("fp32", "fp16", "bf16")


def one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def import_trt():
    import tensorrt as trt  # noqa: PLC0415 - optional dependency, imported lazily

    return trt


def tensorrt_reason() -> str | None:
    """None when the ``tensorrt`` package imports, else one line saying why not."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return INSTALL_HINT
    try:
        import_trt()
    except ImportError as e:
        return f"TensorRT is installed but cannot be loaded ({one_line(e)}): reinstall 'hwprune[tensorrt]'"
    except Exception as e:  # noqa: BLE001 - a broken native library raises anything
        return f"TensorRT is installed but cannot be loaded ({one_line(e)})"
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
    idx = device_index(device)
    if idx >= torch.cuda.device_count():
        return f"CUDA device {idx} requested but {torch.cuda.device_count()} visible"
    return None


def device_index(device: str) -> int:
    m = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    return int(m.group(1)) if m and m.group(1) else 0

