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

from hwprune.errors import HwpruneError
from hwprune.registry import Registry
from hwprune.pruning.space import PruningSpace, WidthConfig, top_units

CRITERIA: Registry = Registry("importance criterion")
CRITERIA.add("bn", lambda: tp.importance.BNScaleImportance(normalizer=None), "BatchNorm scale |gamma| (Network Slimming, GCP)")
CRITERIA.add("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="first"),
             "L1 norm of the group's first filter (Li et al.)")
CRITERIA.add("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None, group_reduction="mean"),
             "L2 norm over every coupled layer of the group")
CRITERIA.add("groupnorm", CRITERIA.get("l2"), "Torch-Pruning's group-norm criterion (the same as l2)")
CRITERIA.add("taylor", lambda: tp.importance.GroupTaylorImportance(normalizer=None),
             "first-order Taylor |w * grad| over a few batches of data")
CRITERIA.add("random", lambda: tp.importance.RandomImportance(), "random scores, a control")


def _scorer(criterion: str):
    return CRITERIA.get(criterion)()


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


def keep_indices(scores: Mapping[str, np.ndarray], widths: WidthConfig,
                 space: PruningSpace | None = None) -> dict[str, list[int]]:
    """The ``width`` highest-scoring channels of each group (ties broken by index).

    With ``space``, a group with a step (grouped convolutions) keeps whole units, the same
    positions in every conv group, ranked by their mean score (:meth:`ChannelGroup.keep_top`).
    """
    keep = {}
    for gid, w in widths.widths.items():
        if space is not None:
            keep[gid] = space[gid].keep_top(scores[gid], w)
        else:
            keep[gid] = top_units(scores[gid], np.arange(len(scores[gid]))[:, None], w)
    return keep
