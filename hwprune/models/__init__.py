"""Model zoo: resolve a name to an ``nn.Module`` and its input shape.

Every torchvision classification model is available under its torchvision name
(``resnet18``, ``mobilenet_v2``, ...), and the CIFAR models torchvision lacks under
``cifar_*`` names. Models are built with random weights: nothing is downloaded.
``shufflenet_v2_*`` are torchvision's with the channel shuffle as a module
(:mod:`hwprune.models.shufflenet`), so that Torch-Pruning can trace them.

>>> spec = create_model("cifar_resnet20")
>>> spec.input_size
(3, 32, 32)
"""

from __future__ import annotations

from hwprune.models._registry import ModelSpec, create_model, is_model, list_models, register_model
from hwprune.models import cifar  # noqa: F401  (registers the cifar_* models)
from hwprune.models.shufflenet import TP_PRUNERS as _SHUFFLE_PRUNERS, ChannelShuffle

#: Modules whose channels no pruning may change: channel groups that reach one stay whole.
FIXED_CHANNEL_TYPES = (ChannelShuffle,)


def tp_customized_pruners() -> dict:
    """Torch-Pruning pruners of the zoo's own module types (``customized_pruners=``)."""
    return dict(_SHUFFLE_PRUNERS)


__all__ = ["FIXED_CHANNEL_TYPES", "ModelSpec", "create_model", "is_model", "list_models", "register_model",
           "tp_customized_pruners"]
