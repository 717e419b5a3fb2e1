"""A model's layers with their shapes written as functions of the width configuration.

Costs (parameters, FLOPs, activation memory) and latency predictions of thousands of
width configurations are computed from a :class:`ModelTemplate` with numpy, without
building a single pruned module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from hwprune.prediction.features import NCHWC_BLOCK, layer_features, unblocked
from hwprune.pruning.space import PruningSpace, WidthConfig, is_depthwise

__all__ = ["NCHWC_BLOCK", "LayerSlot", "ModelTemplate", "unblocked"]


@dataclass(frozen=True)
class LayerSlot:
    name: str
    kind: str  # conv | dwconv | linear
    kh: int
    kw: int
    stride: int
    h: int  # input spatial size
    w: int
    in_group: int  # index into the space's groups, -1 when fixed
    in_fixed: int
    out_group: int
    out_fixed: int
    bias: bool = False
    groups: int = 1  # conv groups of a grouped convolution (pruning keeps them); 1 otherwise, depthwise included


def _input_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The input shape of every conv and linear layer, read in one forward of a random input."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []

    def record(name):
        def hook(mod, inp, out):
            shapes.setdefault(name, tuple(inp[0].shape))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model.eval()(torch.randn(input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _layer_slots(space: PruningSpace) -> list[LayerSlot]:
    """The conv and linear layers that run in a forward, in module order, tied to their channel groups."""
    gidx = {g.id: i for i, g in enumerate(space.groups)}
    out_of = {m: gidx[g.id] for g in space.groups for m in g.modules}
    in_of = {m: gidx[g.id] for g in space.groups for m in g.consumers}
    shapes = _input_shapes(space.model, space.input_shape)
    slots = []
    for name, m in space.model.named_modules():
        if name not in shapes:
            continue
        x = shapes[name]
        if isinstance(m, nn.Conv2d):
            dw = is_depthwise(m)
            og = out_of.get(name, -1)
            ig = og if dw else in_of.get(name, -1)
            slots.append(LayerSlot(name, "dwconv" if dw else "conv", m.kernel_size[0], m.kernel_size[1],
                                   m.stride[0], int(x[2]), int(x[3]), ig, m.in_channels, og, m.out_channels,
                                   m.bias is not None, 1 if dw else m.groups))
        elif len(x) == 2:
            slots.append(LayerSlot(name, "linear", 1, 1, 1, 1, 1, in_of.get(name, -1), m.in_features,
                                   out_of.get(name, -1), m.out_features, m.bias is not None))
    return slots


def _producers(slots: Sequence[LayerSlot]) -> list[list[int]]:
    """Per slot, the other slots whose output is its input group."""
    producers: list[list[int]] = []
    for j, s in enumerate(slots):
        g = s.in_group
        producers.append([i for i, p in enumerate(slots) if g >= 0 and p.out_group == g and i != j])
    return producers


def _peers(slots: Sequence[LayerSlot]) -> list[list[int]]:
    """Per slot, the other slots writing its output group."""
    return [[i for i, p in enumerate(slots) if s.out_group >= 0 and p.out_group == s.out_group and i != j]
            for j, s in enumerate(slots)]


class ModelTemplate:
    """The conv/linear layers of a model, with channels tied to its channel groups."""

    def __init__(self, space: PruningSpace):
        self.space = space
        self.group_ids = [g.id for g in space.groups]
        slots = _layer_slots(space)
        self.slots = slots
        self.layer_names = [s.name for s in slots]
        kinds = {g.id: g.kind for g in space.groups}
        self.residual = [int(s.out_group >= 0 and kinds[self.group_ids[s.out_group]] == "residual") for s in slots]
        # affine parameters per channel of each group's normalisation layers (weight + bias)
        mods = dict(space.model.named_modules())
        self.norm_params = np.array([sum(2 if getattr(mods[n], "affine", True) else 0 for n in g.norms)
                                     for g in space.groups], dtype=np.int64)
        full = self.width_matrix([space.full()])
        self.fixed_params = int(sum(p.numel() for p in space.model.parameters()) - self.params(full)[0])
        # The layers whose output feeds each layer: their input layout decides whether the
        # runtime has to reorder this layer's input.
        self.producers: list[list[int]] = _producers(slots)
        # The other layers writing the same channel group (the convolutions summed into one
        # residual stream, or a depthwise layer and its expansion): the stream's layout is
        # blocked only when every one of them runs blocked.
        self.peers: list[list[int]] = _peers(slots)
        self._dw = np.array([s.kind == "dwconv" for s in slots])
        self._conv = np.array([s.kind != "linear" for s in slots])
        self._groups = np.array([s.groups for s in slots], dtype=np.int64)

    def width_matrix(self, configs: Sequence[WidthConfig | Mapping[str, int]]) -> np.ndarray:
        """Validated widths as an [N, groups] integer matrix."""
        return self.space.width_array(configs)

    def producer_channels(self, cin: np.ndarray) -> np.ndarray:
        """Input channels of each layer's first producer ([N, layers]; 0 for network inputs)."""
        out = np.zeros_like(cin)
        for j, prods in enumerate(self.producers):
            if prods:
                out[:, j] = cin[:, prods[0]]
        return out

    def unblocked(self, cin: np.ndarray, cout: np.ndarray | None = None) -> np.ndarray:
        """[N, layers] booleans: the layer falls back from the blocked kernels (:func:`unblocked`;
        grouped convolutions are judged on ``cin`` alone without ``cout``)."""
        cin = np.atleast_2d(cin)
        return self._conv & unblocked(self._dw, cin, self._groups, None if cout is None else np.atleast_2d(cout))

    def layout_context(self, cin: np.ndarray, cols: Sequence[int] | None = None,
                       cout: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per layer (all, or ``cols``), how many of its input's producers and of its output's
        other writers run unblocked ([N, layers] each). A single unblocked writer keeps a whole
        residual stream in NCHW: every layer on it then pays reorders and an unfused Add."""
        nb = self.unblocked(cin, cout).astype(np.int64)
        cols = range(len(self.slots)) if cols is None else cols
        prod = np.zeros((nb.shape[0], len(cols)), dtype=np.int64)
        peer = np.zeros_like(prod)
        for c, j in enumerate(cols):
            if self.producers[j]:
                prod[:, c] = nb[:, self.producers[j]].sum(axis=1)
            if self.peers[j]:
                peer[:, c] = nb[:, self.peers[j]].sum(axis=1)
        return prod, peer

    def features(self, kind: str, cols: list[int], batch: int, cin: np.ndarray, cout: np.ndarray) -> np.ndarray:
        """Predictor features of slots ``cols`` for every configuration (rows: config-major).

        Grouped convolutions among them pass their conv groups as ``groups``."""
        cin, cout = np.atleast_2d(cin), np.atleast_2d(cout)
        n = cin.shape[0]
        sl = [self.slots[j] for j in cols]
        pcin = self.producer_channels(cin)
        prod, peer = self.layout_context(cin, cols, cout)

        def rep(a):
            return np.tile(np.asarray(a), n)

        grouped = {"groups": rep([s.groups for s in sl])} if any(s.groups > 1 for s in sl) else {}
        return layer_features(kind, batch, cin[:, cols].ravel(), cout[:, cols].ravel(), rep([s.kh for s in sl]),
                              rep([s.kw for s in sl]), rep([s.stride for s in sl]), rep([s.h for s in sl]),
                              rep([s.w for s in sl]), pcin[:, cols].ravel(), rep([self.residual[j] for j in cols]),
                              prod.ravel(), peer.ravel(), **grouped)

    def channels(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input and output channels of every slot: two [N, layers] matrices."""
        n = W.shape[0]
        cin = np.empty((n, len(self.slots)), dtype=np.int64)
        cout = np.empty_like(cin)
        for j, s in enumerate(self.slots):
            cin[:, j] = W[:, s.in_group] if s.in_group >= 0 else s.in_fixed
            cout[:, j] = W[:, s.out_group] if s.out_group >= 0 else s.out_fixed
        return cin, cout


    def out_hw(self) -> tuple[np.ndarray, np.ndarray]:
        """Output spatial size of every slot (convolutions pad to keep ``ceil(h / stride)``)."""
        oh = np.array([(s.h - 1) // s.stride + 1 for s in self.slots])
        ow = np.array([(s.w - 1) // s.stride + 1 for s in self.slots])
        return oh, ow

    # -- costs ----------------------------------------------------------------------------
    @staticmethod
    def _weights(s: LayerSlot, cin: np.ndarray, cout: np.ndarray) -> np.ndarray:
        """Weights of slot ``s`` (each output channel sees ``cin / groups`` inputs; one, depthwise)."""
        if s.kind == "dwconv":
            return cout * s.kh * s.kw
        return cout * cin * s.kh * s.kw // s.groups

    def params(self, W: np.ndarray) -> np.ndarray:
        """Parameters of conv, linear and normalisation layers per configuration (plus fixed ones)."""
        cin, cout = self.channels(W)
        per = np.zeros(cin.shape, dtype=np.int64)
        for j, s in enumerate(self.slots):
            per[:, j] = self._weights(s, cin[:, j], cout[:, j]) + (cout[:, j] if s.bias else 0)
        return per.sum(axis=1) + W @ self.norm_params + getattr(self, "fixed_params", 0)

    def macs(self, W: np.ndarray) -> np.ndarray:
        """Multiply-accumulates of conv and linear layers per configuration (batch 1)."""
        cin, cout = self.channels(W)
        oh, ow = self.out_hw()
        per = np.zeros(cin.shape, dtype=np.int64)
        for j, s in enumerate(self.slots):
            per[:, j] = self._weights(s, cin[:, j], cout[:, j]) * oh[j] * ow[j]
        return per.sum(axis=1)

    def activations(self, W: np.ndarray) -> np.ndarray:
        """Output elements of conv and linear layers per configuration (batch 1)."""
        _, cout = self.channels(W)
        oh, ow = self.out_hw()
        return (cout * (oh * ow)[None, :]).sum(axis=1)
