from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from hwprune.errors import HwpruneError

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int], int]] = {}


@dataclass
class ModelSpec:
    """A model with the input it expects: ``input_size`` is (channels, height, width)."""

    name: str
    module: nn.Module
    input_size: tuple[int, int, int]
    num_classes: int

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, *self.input_size)


def register_model(name: str, input_size=(3, 32, 32), num_classes: int = 10):
    """Decorator that registers a model factory under ``name`` (timm style)."""

    def deco(fn):
        _REGISTRY[name] = (fn, tuple(input_size), num_classes)
        return fn

    return deco


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return list(tvm.list_models(module=tvm))


def list_models() -> list[str]:
    """All names ``create_model`` accepts, sorted."""
    return sorted(set(_REGISTRY) | set(_torchvision_names()))


def is_model(name: str) -> bool:
    return name in _REGISTRY or name in _torchvision_names()


def create_model(name: str, num_classes: int | None = None, input_size: int | None = None) -> ModelSpec:
    """Build ``name`` with random weights.

    ``input_size`` overrides the spatial size (square); ``num_classes`` the classifier.
    """
    if name in _REGISTRY:
        fn, size, nc = _REGISTRY[name]
        nc = num_classes or nc
        module = fn(num_classes=nc)
    elif name in _torchvision_names():
        from torchvision import models as tvm

        nc = num_classes or 1000
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
        kwargs = {"weights": None, "num_classes": nc}
        if name in ("inception_v3", "googlenet"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = False
        module = tvm.get_model(name, **kwargs)
    else:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `hwprune models` to list them"
        raise HwpruneError(f"unknown model '{name}'", hint)
    if input_size is not None:
        size = (size[0], int(input_size), int(input_size))
    module.eval()
    return ModelSpec(name=name, module=module, input_size=tuple(size), num_classes=nc)
