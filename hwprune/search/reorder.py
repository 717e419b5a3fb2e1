"""Sort every channel group's channels by importance, so that the first ``w`` are the best ``w``.

A supernet runs a width ``w`` of a group on the group's first ``w`` channels (slimmable
networks, OFA). Before training, each group's channels are therefore permuted, most important
first, by an importance criterion of :mod:`hwprune.pruning.importance` (L1 norm by default,
BN scale as an option). The permutation moves every layer the group touches: the output rows
of its producers, its normalisation layers, and the input columns of its consumers, so the
permuted network computes exactly the same function. A group with a step (grouped
convolutions) permutes whole units: the same local positions in every conv group.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from hwprune.errors import HwpruneError
from hwprune.pruning.importance import channel_importance
from hwprune.pruning.space import ChannelGroup, PruningSpace, is_depthwise


def importance_order(space: PruningSpace, model: nn.Module, criterion: str = "l1") -> dict[str, list[int]]:
    """Per group, the permutation ``perm`` (new channel ``i`` is old channel ``perm[i]``) that puts
    the best-scoring units first (ties kept in their original order)."""
    scores = channel_importance(space, model, criterion)
    return {g.id: _unit_permutation(g, scores[g.id]) for g in space.groups}


def _unit_permutation(g: ChannelGroup, scores: np.ndarray) -> list[int]:
    units = g.units()
    s = np.asarray(scores, dtype=np.float64)[units].mean(axis=1)
    order = np.lexsort((np.arange(len(s)), -s))
    perm = np.empty(g.channels, dtype=np.int64)
    perm[units.ravel()] = units[order].ravel()
    return perm.tolist()


@torch.no_grad()
def apply_order(model: nn.Module, space: PruningSpace, order: Mapping[str, list[int]]) -> nn.Module:
    """Permute ``model``'s channels in place by ``order`` (from :func:`importance_order`)."""
    mods = dict(model.named_modules())
    for g in space.groups:
        perm = torch.as_tensor(order[g.id], dtype=torch.long)
        if sorted(perm.tolist()) != list(range(g.channels)):
            raise HwpruneError(f"the channel order of group '{g.id}' is not a permutation of its {g.channels} channels")
        for n in (*g.modules, *g.norms):
            m = mods[n]
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.dim() >= 1:
                    t.copy_(t.index_select(0, perm))
        for n in g.consumers:
            m = mods[n]
            if isinstance(m, nn.Conv2d) and is_depthwise(m):
                continue  # its input channels are its output channels, moved above
            m.weight.copy_(m.weight.index_select(1, _input_permutation(m, g, perm)))
    return model


def _input_permutation(m: nn.Module, g: ChannelGroup, perm: torch.Tensor) -> torch.Tensor:
    """The permutation of ``m``'s weight columns that follows the group's channel permutation."""
    if isinstance(m, nn.Linear):
        r = m.in_features // g.channels  # input features per channel (after a flatten)
        return (perm[:, None] * r + torch.arange(r)).reshape(-1)
    if m.groups > 1:  # grouped: the same local permutation in every conv group
        per = g.channels // m.groups
        return perm[:per]
    return perm


def check_same_function(a: nn.Module, b: nn.Module, input_shape, what: str, tol: float = 1e-4) -> None:
    """One-line error unless ``a`` and ``b`` (in eval mode) give the same output on a random input."""
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    err = float((ya - yb).abs().max() / (ya.abs().max() + 1e-12))
    if not err <= tol:
        raise HwpruneError(f"{what} changed the network's output (relative error {err:.2g})",
                           hint="the model has layers whose channels the pruning space does not follow")
