"""Model zoo: resolve a name to an ``nn.Module`` and its input shape.

Every torchvision classification model is available under its torchvision name
(``resnet18``, ``mobilenet_v2``, ...), and the CIFAR models torchvision lacks under
``cifar_*`` names. Models are built with random weights: nothing is downloaded.

>>> spec = create_model("cifar_resnet20")
>>> spec.input_size
(3, 32, 32)
"""

from __future__ import annotations

from ._registry import ModelSpec, create_model, is_model, list_models, register_model
from . import cifar  # noqa: F401  (registers the cifar_* models)

__all__ = ["ModelSpec", "create_model", "is_model", "list_models", "register_model"]
