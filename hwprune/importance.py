"""Which channels survive: pluggable importance criteria, computed per channel group.

The criteria are Torch-Pruning's (scored on its dependency-graph groups, so coupled
layers are scored together):

* ``bn``: BatchNorm scale |gamma| (Network Slimming, GCP);
* ``l1``: L1 norm of the group's first filter (Li et al., "Pruning Filters for Efficient ConvNets");
* ``l2`` / ``groupnorm``: group L2 norm over every coupled layer (Torch-Pruning's group-norm);
* ``taylor``: first-order Taylor |w * grad| (needs a few batches of data);
* ``random``: a control.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import HwpruneError
from .space import PruningSpace, WidthConfig

CRITERIA = ("bn", "l1", "l2", "groupnorm", "taylor", "random")


def _scorer(criterion: str):
    if criterion == "bn":
        return tp.importance.BNScaleImportance(normalizer=None)
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="first")
    if criterion in ("l2", "groupnorm"):
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None, group_reduction="mean")
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise HwpruneError(f"unknown importance criterion '{criterion}'", f"choose one of {', '.join(CRITERIA)}")


def channel_importance(space: PruningSpace, model: nn.Module | None = None, criterion: str = "l1",
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """A score per channel of every group of ``model`` (default: the space's own model).

    ``model`` must have the unpruned architecture of ``space``. ``taylor`` accumulates
    gradients of the cross-entropy over ``batches`` first.
    """
    model = model if model is not None else space.model
    scorer = _scorer(criterion)
    torch.manual_seed(seed)
    if criterion == "taylor":
        if batches is None:
            raise HwpruneError("the taylor criterion needs data", "pass --data")
        model.zero_grad()
        was = model.training
        model.eval()
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y).backward()
        model.train(was)
    dg, _ = space._dependency_graph(model)
    mods = dict(model.named_modules())
    out = {}
    for g in space.groups:
        root = mods[g.id]
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        group = dg.get_pruning_group(root, fn, idxs=list(range(g.channels)))
        with torch.no_grad():
            scores = scorer(group)
        if scores is None:
            raise HwpruneError(f"criterion '{criterion}' cannot score group '{g.id}'")
        out[g.id] = scores.detach().float().cpu().numpy().reshape(-1)[: g.channels]
    if criterion == "taylor":
        model.zero_grad()
    return out


def keep_indices(scores: Mapping[str, np.ndarray], widths: WidthConfig) -> dict[str, list[int]]:
    """The ``width`` highest-scoring channels of each group (ties broken by index)."""
    keep = {}
    for gid, w in widths.widths.items():
        s = np.asarray(scores[gid])
        order = np.lexsort((np.arange(len(s)), -s))
        keep[gid] = sorted(int(i) for i in order[:w])
    return keep
