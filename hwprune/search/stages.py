"""The stages of a network, for stage-wise distillation (SP, DNA).

A stage is a run of the model's top-level modules whose output is a feature map the next stage
reads: for the CIFAR and torchvision ResNets the stem, each ``layerN`` and the head (pooling and
classifier); for MobileNetV2 and the VGGs the blocks of ``features`` between resolution changes,
and the head. The layout of a model family is registered against its class
(:func:`stage_layout`); a model without one gets a one-line error. :func:`model_stages` checks
that running the stages one after another reproduces the model's own forward pass.

Each stage knows the channel group of its input and output (``None`` where the channels are
not prunable: the image, the logits), which is how a subnet's stage is compared with the full
network's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torchvision.models import VGG, MobileNetV2, ResNet

from hwprune.errors import HwpruneError
from hwprune.models.cifar import CifarResNet, CifarVGG
from hwprune.pruning.space import PruningSpace

FLATTEN, GLOBAL_POOL = "<flatten>", "<global-pool>"  # steps that are functions, not modules
_LAYOUTS: list[tuple[type, Callable[[nn.Module, tuple], list[tuple[str, tuple[str, ...]]]]]] = []


@dataclass(frozen=True)
class Stage:
    name: str
    steps: tuple[str, ...]  # module names run in order, or FLATTEN / GLOBAL_POOL
    in_gid: str | None  # channel group of the stage's input (None: the image)
    out_gid: str | None  # channel group of its output (None: not prunable, e.g. the logits)

    def run(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            if step == FLATTEN:
                x = torch.flatten(x, 1)
            elif step == GLOBAL_POOL:
                x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            else:
                x = net.get_submodule(step)(x)
        return x

    def modules(self, net: nn.Module) -> list[str]:
        """Names of every module inside the stage."""
        mods = [s for s in self.steps if s not in (FLATTEN, GLOBAL_POOL)]
        return [n for n, _ in net.named_modules() if any(n == s or n.startswith(s + ".") for s in mods)]


def stage_layout(*classes: type):
    """Decorator: register ``fn(model, input_shape) -> [(stage name, steps)]`` for models of ``classes``."""

    def deco(fn):
        _LAYOUTS.extend((c, fn) for c in classes)
        return fn

    return deco


@stage_layout(CifarResNet)
def _cifar_resnet(model, input_shape):
    return [("stem", ("conv1", "bn1", "relu")), ("layer1", ("layer1",)), ("layer2", ("layer2",)),
            ("layer3", ("layer3",)), ("head", ("avgpool", FLATTEN, "fc"))]


@stage_layout(ResNet)
def _resnet(model, input_shape):
    return [("stem", ("conv1", "bn1", "relu", "maxpool")), *[(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)],
            ("head", ("avgpool", FLATTEN, "fc"))]


@stage_layout(MobileNetV2)
def _mobilenet_v2(model, input_shape):
    return [*split_by_resolution(model, "features", input_shape), ("head", (GLOBAL_POOL, "classifier"))]


@stage_layout(CifarVGG, VGG)
def _vgg(model, input_shape):
    return [*split_by_resolution(model, "features", input_shape), ("head", ("avgpool", FLATTEN, "classifier"))]


def split_by_resolution(model: nn.Module, seq: str, input_shape: Sequence[int]) -> list[tuple[str, tuple[str, ...]]]:
    """The children of the sequential ``seq`` grouped into stages; a child that changes the
    spatial resolution starts a new stage."""
    children = list(model.get_submodule(seq).named_children())
    sizes, hooks = {}, []
    for name, m in children:
        hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: sizes.__setitem__(name, (i[0].shape[-1],
                                                                                               o.shape[-1]))))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(tuple(input_shape), device=_device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    stages, current = [], []
    for name, _ in children:
        if current and sizes[name][0] != sizes[name][1]:
            stages.append(current)
            current = []
        current.append(name)
    stages.append(current)
    return [(f"{seq}.{s[0]}" if len(s) == 1 else f"{seq}.{s[0]}-{s[-1]}", tuple(f"{seq}.{n}" for n in s))
            for s in stages]


def model_stages(model: nn.Module, space: PruningSpace, input_shape: Sequence[int]) -> list[Stage]:
    """The stages of ``model`` (a plain model of ``space``'s architecture), checked against its forward pass."""
    layout = next((fn for cls, fn in _LAYOUTS if isinstance(model, cls)), None)
    if layout is None:
        known = sorted({c.__name__ for c, _ in _LAYOUTS})
        raise HwpruneError(f"stage-wise distillation does not know the stages of {space.name} "
                           f"({type(model).__name__})", hint=f"supported model families: {', '.join(known)}")
    out_of = {n: g.id for g in space.groups for n in g.modules}
    stages, prev = [], None
    for name, steps in layout(model, tuple(input_shape)):
        st = Stage(name, tuple(steps), prev, None)
        layers = [n for n in st.modules(model) if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear))]
        out_gid = out_of.get(layers[-1]) if layers else prev
        st = Stage(name, tuple(steps), prev, out_gid)
        stages.append(st)
        prev = out_gid
    _check_chain(model, space, stages, input_shape)
    return stages


@torch.no_grad()
def _check_chain(model: nn.Module, space: PruningSpace, stages: list[Stage], input_shape) -> None:
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(_device_of(model))
    model.eval()
    h = x
    for st in stages:
        h = st.run(model, h)
        if st.out_gid is not None and h.shape[1] != space[st.out_gid].channels:
            raise HwpruneError(f"stage {st.name} of {space.name} outputs {h.shape[1]} channels, not the "
                               f"{space[st.out_gid].channels} of its channel group {st.out_gid}")
    ref = model(x)
    if h.shape != ref.shape or not torch.allclose(h, ref, rtol=1e-4, atol=1e-5):
        raise HwpruneError(f"the stages of {space.name} do not reproduce its forward pass")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
