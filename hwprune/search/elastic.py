"""Layers that run at a chosen width: the execution engine of the supernet.

A supernet keeps the full-width weights of a model and runs any width configuration of its
pruning space by using the *first* ``w`` channels of every channel group (for a group with a
step, the first ``w / step`` positions of every conv group, as Torch-Pruning's surgery keeps
them). Every ``Conv2d``, ``Linear`` and ``BatchNorm2d`` of the model becomes its elastic
subclass (same parameters, same state-dict keys) that reads the active configuration from one
shared :class:`ActiveWidths`. Two interchangeable ways to run, with the same outputs and
gradients:

* ``masked``: one full-width pass; the output channels of every group beyond its width are
  multiplied by zero right after the group's normalisation layers (or, for a group without
  them, its producing layers). Masks are per sample, so a batch split into K slices runs K
  configurations in one pass (PSE-Net's parallel subnets). It costs a full-width pass and
  suits GPUs.
* ``sliced``: weights are sliced to the subnet's width (``W[:c_out, :c_in]``), so a pass costs
  about the subnet's own FLOPs, which matters on a CPU. K slices run one after another.

Batch normalisation: in training every slice is normalised with its own batch statistics (a
slice's statistics never mix with another subnet's) and running statistics are left alone;
:func:`hwprune.search.supernet.recalibrate_bn` recomputes them for one configuration. In
evaluation the running statistics are used.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwprune.errors import HwpruneError
from hwprune.pruning.space import ChannelGroup, PruningSpace, is_depthwise, is_grouped

MODES = ("masked", "sliced")


class ActiveWidths:
    """The configuration(s) the elastic layers of one supernet run at.

    ``configs`` holds one ``{group_id: width}`` per slice of the batch. During a forward pass
    :meth:`begin` fixes the slice bounds; in sliced execution ``slice`` names the slice being
    computed (None in masked execution: all at once).
    """

    def __init__(self, groups: Sequence[ChannelGroup], mode: str = "masked"):
        self.groups = {g.id: g for g in groups}
        self.mode = mode
        self.configs: list[dict[str, int]] = [{g.id: g.channels for g in groups}]
        self.narrowed: set[str] = set()  # groups that some slice runs narrower than full
        self.slice: int | None = None
        self.bounds: list[tuple[int, int]] = []
        self.track_stats = False
        self._kept: dict[tuple[str, int, str], slice | torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    @property
    def sliced(self) -> bool:
        return self.mode == "sliced"

    def set(self, configs: Sequence[Mapping[str, int]]) -> None:
        self.configs = [dict(c) for c in configs]
        self.narrowed = {g for g, grp in self.groups.items() if any(c[g] < grp.channels for c in self.configs)}
        self._masks.clear()

    def begin(self, batch: int) -> None:
        k = len(self.configs)
        if batch < k:
            raise HwpruneError(f"a batch of {batch} cannot hold {k} subnet slices")
        edges = [round(i * batch / k) for i in range(k + 1)]
        self.bounds = [(edges[i], edges[i + 1]) for i in range(k)]
        self._masks.clear()

    # -- channels --------------------------------------------------------------------------
    def width(self, gid: str, k: int) -> int:
        return self.configs[k][gid]

    def kept(self, gid: str, k: int, device: torch.device) -> slice | torch.Tensor:
        """Index of the channels slice ``k`` keeps of group ``gid``: a ``slice`` (step 1) or an index tensor."""
        g, w = self.groups[gid], self.configs[k][gid]
        key = (gid, w, str(device))
        if key not in self._kept:
            self._kept[key] = slice(0, w) if g.step == 1 else torch.as_tensor(g.keep_units(w // g.step),
                                                                               device=device)
        return self._kept[key]

    def mask(self, gid: str, like: torch.Tensor) -> torch.Tensor:
        """Per-sample channel mask of group ``gid`` shaped to broadcast over ``like`` ((B, C, 1, 1) or (B, C))."""
        key = (gid, like.device, like.dtype, like.dim())
        if key not in self._masks:
            g = self.groups[gid]
            m = torch.zeros(like.shape[0], g.channels, device=like.device, dtype=like.dtype)
            for k, (a, b) in enumerate(self._bounds_for(like.shape[0])):
                m[a:b, self.kept(gid, k, like.device)] = 1
            self._masks[key] = m.view(*m.shape, *([1] * (like.dim() - 2)))
        return self._masks[key]

    def _bounds_for(self, batch: int) -> list[tuple[int, int]]:
        if not self.bounds or self.bounds[-1][1] != batch:
            self.begin(batch)
        return self.bounds

    def current(self) -> int:
        """The slice a sliced layer computes (only one configuration outside a slice loop)."""
        if self.slice is not None:
            return self.slice
        if len(self.configs) != 1:
            raise RuntimeError("sliced execution of several configurations must go through the supernet")
        return 0


class _Elastic:
    """What every elastic layer knows: the shared state and the groups of its channels."""

    active: ActiveWidths
    out_gid: str | None  # group whose channels are this layer's outputs
    in_gid: str | None  # group whose channels are this layer's inputs (conv / linear)
    mask_out: bool  # masked execution zeroes this layer's outputs beyond the width
    in_repeat: int = 1  # input features per input channel (a linear layer after a flatten)

    def _out_index(self, device):
        return None if self.out_gid is None else self.active.kept(self.out_gid, self.active.current(), device)

    def _in_index(self, device):
        if self.in_gid is None:
            return None
        idx = self.active.kept(self.in_gid, self.active.current(), device)
        if self.in_repeat == 1:
            return idx
        r = self.in_repeat
        if isinstance(idx, slice):
            return slice(0, idx.stop * r)
        return (idx[:, None] * r + torch.arange(r, device=device)).reshape(-1)

    def _masked(self, y: torch.Tensor) -> torch.Tensor:
        if not self.mask_out or self.out_gid not in self.active.narrowed:
            return y
        return y * self.active.mask(self.out_gid, y)


def _take(t: torch.Tensor | None, idx, dim: int = 0) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    if isinstance(idx, slice):
        return t[idx] if dim == 0 else t[:, idx]
    return t.index_select(dim, idx)


class ElasticConv2d(_Elastic, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active.sliced:
            return self._masked(super().forward(x))
        out, inp = self._out_index(x.device), self._in_index(x.device)
        w, b, groups = self.weight, self.bias, self.groups
        if groups == 1:
            w = _take(_take(w, out), inp, 1)
        elif groups == self.out_channels == self.in_channels:  # depthwise: width channels, one filter each
            w, groups = _take(w, out), x.shape[1]
        else:  # grouped: the same kept positions in every conv group
            w = _take(w, out)[:, : x.shape[1] // groups]
        return F.conv2d(x, w, _take(b, out), self.stride, self.padding, self.dilation, groups)


class ElasticLinear(_Elastic, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active.sliced:
            return self._masked(super().forward(x))
        out, inp = self._out_index(x.device), self._in_index(x.device)
        return F.linear(x, _take(_take(self.weight, out), inp, 1), _take(self.bias, out))


class ElasticBatchNorm2d(_Elastic, nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.active
        if not a.sliced:
            if self.training and not a.track_stats:
                parts = [F.batch_norm(x[s:e], None, None, self.weight, self.bias, True, 0.0, self.eps)
                         for s, e in a._bounds_for(x.shape[0])]
                y = parts[0] if len(parts) == 1 else torch.cat(parts)
            else:
                if self.training and len(a.configs) > 1:
                    raise HwpruneError("BN statistics are recalibrated for one configuration at a time")
                y = super().forward(x)
            return self._masked(y)
        idx = self._out_index(x.device)
        w, b = _take(self.weight, idx), _take(self.bias, idx)
        if not self.training:
            return F.batch_norm(x, _take(self.running_mean, idx), _take(self.running_var, idx), w, b, False, 0.0,
                                self.eps)
        if not a.track_stats:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        rm, rv = _take(self.running_mean, idx).clone(), _take(self.running_var, idx).clone()
        y = F.batch_norm(x, rm, rv, w, b, True, factor, self.eps)
        self.running_mean[idx], self.running_var[idx] = rm, rv
        return y


_ELASTIC = {nn.Conv2d: ElasticConv2d, nn.Linear: ElasticLinear, nn.BatchNorm2d: ElasticBatchNorm2d}


def make_elastic(model: nn.Module, space: PruningSpace, active: ActiveWidths) -> None:
    """Turn every Conv2d, Linear and BatchNorm2d of ``model`` into its elastic subclass, in place
    (parameters and state-dict keys unchanged), wired to the groups of ``space``."""
    out_of, in_of, masked = _channel_roles(space)
    for name, m in model.named_modules():
        cls = _ELASTIC.get(type(m))
        if cls is None:
            continue
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise HwpruneError(f"the supernet supports zero-padded convolutions only ({name}: {m.padding_mode})")
        if isinstance(m, nn.BatchNorm2d) and not (m.affine and m.track_running_stats):
            raise HwpruneError(f"the supernet needs affine batch norms with running statistics ({name})")
        m.__class__ = cls  # same object, same parameters: only the forward pass changes
        m.active, m.out_gid, m.mask_out = active, out_of.get(name), name in masked
        m.in_gid = in_of.get(name)
        if isinstance(m, nn.Conv2d) and is_depthwise(m):
            m.in_gid = m.out_gid
        if isinstance(m, nn.Linear) and m.in_gid is not None:
            m.in_repeat = m.in_features // space[m.in_gid].channels


def _channel_roles(space: PruningSpace) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """Per module name: the group of its output channels, the group of its input channels, and
    whether masked execution masks its output."""
    out_of, in_of, masked = {}, {}, set()
    for g in space.groups:
        for n in (*g.modules, *g.norms):
            out_of[n] = g.id
        masked.update(g.norms)
        if len(g.norms) < len(g.modules):  # some producer has no normalisation layer of its own
            masked.update(g.modules)
        for n in g.consumers:
            in_of.setdefault(n, []).append(g.id)
    return out_of, {n: ids[0] for n, ids in in_of.items() if len(ids) == 1}, masked


def check_supported(model: nn.Module) -> None:
    """One-line error when ``model`` has parameterised layers other than Conv2d, Linear and
    BatchNorm2d: their channels would not follow the widths (a LayerNorm or GroupNorm mixes them)."""
    known = (*_ELASTIC, *_ELASTIC.values())
    for n, m in model.named_modules():
        if type(m) not in known and any(True for _ in m.parameters(recurse=False)):
            raise HwpruneError(f"the supernet supports Conv2d, Linear and BatchNorm2d layers only; {n} is a "
                               f"{type(m).__name__}")


def check_sliceable(model: nn.Module, space: PruningSpace) -> None:
    """One-line error when sliced execution cannot follow ``model``'s channels: a layer reading a
    concatenation of groups, or a grouped convolution whose groups' steps differ from its own."""
    reads: dict[str, list[str]] = {}
    for g in space.groups:
        for n in g.consumers:
            reads.setdefault(n, []).append(g.id)
    mods = dict(model.named_modules())
    for n, ids in reads.items():
        m, g = mods[n], space[ids[0]]
        width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        if len(ids) > 1 or width % g.channels or (isinstance(m, nn.Conv2d) and width != g.channels):
            raise HwpruneError(f"sliced execution cannot follow {n}: it reads a concatenation of channel groups",
                               hint="use masked execution")
        if isinstance(m, nn.Conv2d) and is_grouped(m) and g.step != m.groups:
            raise HwpruneError(f"sliced execution cannot follow the grouped convolution {n}", hint="use masked execution")
    for g in space.groups:
        for n in g.modules:
            m = mods[n]
            if isinstance(m, nn.Conv2d) and is_grouped(m) and g.step != m.groups:
                raise HwpruneError(f"sliced execution cannot follow the grouped convolution {n}",
                                   hint="use masked execution")
