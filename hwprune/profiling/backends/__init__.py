"""Measurement backends: ONNX Runtime (CPU), PyTorch (CPU, CUDA) and TensorRT."""

from hwprune.profiling.backends.base import (Backend, LayerTiming, ModelArtifact, backend_from_settings, backend_names,
                                             backend_options, create_backend, get_backend_class, register_backend)

__all__ = ["Backend", "LayerTiming", "ModelArtifact", "backend_from_settings", "backend_names", "backend_options",
           "create_backend", "get_backend_class", "register_backend"]
