"""ShuffleNetV2 with its channel shuffle as a module Torch-Pruning can see.

torchvision's ``shufflenet_v2_*`` call a function (``view``, ``transpose``, ``view``) that
interleaves the two branches of every block; Torch-Pruning cannot map channel indices
through that permutation and fails to trace the model. Here the shuffle is a
:class:`ChannelShuffle` module, registered with Torch-Pruning as a layer whose channels
never change (:data:`TP_PRUNERS`), and the pruning space leaves out every channel group
that reaches one (``FIXED_CHANNEL_TYPES``). What stays prunable: the stem, the inner
channels of every block's main branch (1x1 convolution, depthwise 3x3, 1x1 convolution)
and the last 1x1 convolution; the block outputs, which the shuffle interleaves, keep
their widths. The parameters and their names are torchvision's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp
from torchvision.models import shufflenetv2 as tv_shufflenet

from hwprune.models._registry import register_model


class ChannelShuffle(nn.Module):
    """torchvision's ``channel_shuffle`` over ``channels`` channels in ``groups`` groups."""

    def __init__(self, channels: int, groups: int = 2):
        super().__init__()
        self.channels, self.groups = channels, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tv_shufflenet.channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"{self.channels}, groups={self.groups}"


class ShuffleBlock(tv_shufflenet.InvertedResidual):
    """torchvision's ShuffleNetV2 block, shuffling through a :class:`ChannelShuffle` module."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__(inp, oup, stride)
        self.shuffle = ChannelShuffle(oup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


class _FixedChannels(tp.pruner.BasePruningFunc):
    """Torch-Pruning's view of a :class:`ChannelShuffle`: channels in and out, never pruned.

    Input and output pruning are distinct functions, so no pruning group crosses it.
    """

    def prune_out_channels(self, layer: nn.Module, idxs):
        raise RuntimeError(f"the channels of {type(layer).__name__} cannot be pruned")

    def prune_in_channels(self, layer: nn.Module, idxs):
        raise RuntimeError(f"the channels of {type(layer).__name__} cannot be pruned")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.channels


#: Torch-Pruning customized pruners of the modules defined here.
TP_PRUNERS = {ChannelShuffle: _FixedChannels()}


def _shufflenet(name: str):
    builder = getattr(tv_shufflenet, name)

    def fn(num_classes: int = 1000) -> nn.Module:
        return builder(weights=None, num_classes=num_classes, inverted_residual=ShuffleBlock)

    fn.__name__ = name
    return fn


for _name in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"):
    register_model(_name, input_size=(3, 224, 224), num_classes=1000)(_shufflenet(_name))
