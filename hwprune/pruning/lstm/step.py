"""One pruning step of the LSTM-guided method: selection, importance, energy rescaling, recovery.

Every network on the search's path is a :class:`Net`: its widths, its surviving channels (indices
into the unpruned model's channels) and its weights in the coordinates of the *unpruned*
architecture (the trained values at the surviving positions, the last values they had
elsewhere), so that a channel the device correction gives back returns with real weights. A
:class:`Surgeon` moves between the two forms: it builds the physically smaller model of a
:class:`Net` (Torch-Pruning surgery, :meth:`PruningSpace.apply`) and writes a trained small model
back, through index maps found by running the same surgery on a copy of the model whose every
tensor holds its own element indices.

A step, given the groups the controller selected:

* **Importance** of a channel is the summed squared weight of the next layers' filters that read
  it (over every layer that reads it: a residual stream is read by every block of its stage and
  by the classifier), counting only the output filters those layers still have. Readers and the
  input channels they read are Torch-Pruning's in-channel dependencies of the group, so
  concatenations and grouped convolutions map right.
* **Selection**: each selected group loses ``share`` of its current channels (whole units of
  ``step`` channels for a group with grouped convolutions; never below its ``min_keep`` width),
  the lowest importance first. When the removals would pass the cost goal, they are applied in
  increasing importance (normalised by each group's mean) only until the goal is met.
* **Energy rescaling**: every layer that read a removed channel has its remaining weights scaled
  so that their Frobenius norm (over the output filters it keeps) is what it was before.
* **Accelerated recovery**: a few SGD iterations (Nesterov momentum, cosine-decayed learning
  rate) on ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy``, the teacher
  being the unpruned model.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from hwprune.errors import HwpruneError
from hwprune.pruning.gcp import _cycle, _forward
from hwprune.pruning.lstm.tokens import min_width, step_width
from hwprune.pruning.objectives import _Base as CostBase
from hwprune.pruning.space import PruningSpace
from hwprune.pruning.widths import first_prefix_within

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
_EXACT = 2 ** 24  # float32 holds every integer up to here exactly: the largest tensor an index map can cover


@dataclass
class Net:
    """A network on the search's path (see the module docstring)."""

    widths: dict[str, int]
    keep: dict[str, list[int]]
    state: dict[str, torch.Tensor] = field(repr=False)
    prior: dict[str, np.ndarray] = field(repr=False)  # per channel: normalised importance when last scored
    cost: float = 1.0  # cost fraction under the search's objective
    accuracy: float | None = None  # on the held-out split
    reward: float | None = None

    def key(self) -> str:
        return ",".join(str(self.widths[g]) for g in self.widths)

    def payload(self) -> dict:
        return {"widths": dict(self.widths), "keep": {g: list(k) for g, k in self.keep.items()}, "state": self.state,
                "prior": {g: torch.from_numpy(np.asarray(p, dtype=np.float64)) for g, p in self.prior.items()},
                "cost": self.cost, "accuracy": self.accuracy, "reward": self.reward}

    @classmethod
    def from_payload(cls, d: Mapping) -> "Net":
        return cls(dict(d["widths"]), {g: list(k) for g, k in d["keep"].items()}, dict(d["state"]),
                   {g: p.numpy() for g, p in d["prior"].items()}, d["cost"], d["accuracy"], d["reward"])


@dataclass(frozen=True)
class _Reader:
    """A layer reading a group's channels: input positions ``idxs`` hold the group's channels ``root``."""

    layer: str
    groups: int
    out_group: str | None  # the group holding its output filters (None: a layer outside the space)
    idxs: torch.Tensor
    root: torch.Tensor


class Surgeon:
    """Surgery, scoring and write-back between :class:`Net` and physically smaller models."""

    def __init__(self, space: PruningSpace, model: nn.Module, cache: int = 8):
        self.space = space
        self.template = copy.deepcopy(model).eval()
        self.readers = _readers(space, self.template)
        self._encoded = _index_encoded(self.template)
        self._maps: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._cache = cache

    def base_net(self) -> Net:
        state = {k: v.detach().clone() for k, v in self.template.state_dict().items()}
        net = Net({g.id: g.channels for g in self.space.groups},
                  {g.id: list(range(g.channels)) for g in self.space.groups}, state, {})
        net.prior = self.normalised(net)
        return net

    def alive(self, net: Net) -> dict[str, np.ndarray]:
        out = {}
        for g in self.space.groups:
            a = np.zeros(g.channels, dtype=bool)
            a[net.keep[g.id]] = True
            out[g.id] = a
        return out

    def build(self, widths: Mapping[str, int], keep: Mapping[str, list[int]], state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The physically smaller model at ``widths``/``keep`` with the full-architecture weights ``state``."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(state)
        return self.space.apply(dict(widths), model=model, keep=dict(keep), inplace=True)

    def maps(self, widths: Mapping[str, int], keep: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
        """Per floating-point tensor of the smaller model, the flat indices of its elements in the full one."""
        key = tuple((g, tuple(keep[g])) for g in sorted(keep))
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        small = self.space.apply(dict(widths), model=self._encoded, keep=dict(keep))
        maps = {n: t.detach().round().long().reshape(-1) for n, t in small.state_dict().items() if t.is_floating_point()}
        self._maps[key] = maps
        if len(self._maps) > self._cache:
            self._maps.popitem(last=False)
        return maps

    def write_back(self, state: Mapping[str, torch.Tensor], small: nn.Module,
                   maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the smaller model's tensors written at their positions."""
        out = {k: v.clone() for k, v in state.items()}
        for n, t in small.state_dict().items():
            if n in maps:
                out[n].view(-1)[maps[n]] = t.detach().reshape(-1).to(out[n].dtype)
            else:
                out[n] = t.detach().clone()
        return out

    def importance(self, net: Net) -> dict[str, np.ndarray]:
        """Per group and channel: the summed squared weight of the live filters of the layers reading it."""
        alive = self.alive(net)
        out = {}
        for g in self.space.groups:
            imp = torch.zeros(g.channels, dtype=torch.float64)
            for r in self.readers[g.id]:
                w = net.state[r.layer + ".weight"].detach().double()
                e = w.pow(2).reshape(w.shape[0], w.shape[1], -1).sum(-1)  # [out, in per conv group]
                if r.out_group is not None:
                    e = e * torch.from_numpy(alive[r.out_group])[:, None]
                per_in = e.reshape(r.groups, w.shape[0] // r.groups, w.shape[1]).sum(1).reshape(-1)
                imp.index_add_(0, r.root, per_in[r.idxs])
            out[g.id] = imp.numpy()
        return out

    def normalised(self, net: Net, imp: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Importance divided by its mean over each group's live channels; removed channels keep their prior."""
        imp = self.importance(net) if imp is None else imp
        out = {}
        for gid, a in self.alive(net).items():
            s = imp[gid] / (float(imp[gid][a].mean()) + 1e-12)
            prev = net.prior.get(gid)
            out[gid] = np.where(a, s, prev if prev is not None else 0.0)
        return out

    def rescale(self, parent: Net, child_widths: Mapping[str, int], child_keep: Mapping[str, list[int]],
                small: nn.Module, groups: Iterable[str]) -> dict[str, float]:
        """Restore the Frobenius norm of every layer reading a removed channel of ``groups`` (in ``small``,
        which holds ``parent``'s weights at the child's positions); returns the factor per layer."""
        pm, cm = self.maps(parent.widths, parent.keep), self.maps(child_widths, child_keep)
        mods = dict(small.named_modules())
        factors = {}
        for layer in dict.fromkeys(r.layer for g in groups for r in self.readers[g]):
            key = layer + ".weight"
            full = parent.state[key].reshape(-1).double()
            inner = parent.state[key][0].numel()
            rows = torch.unique(cm[key] // inner)
            before = float(full[pm[key][torch.isin(pm[key] // inner, rows)]].pow(2).sum())
            after = float(full[cm[key]].pow(2).sum())
            f = math.sqrt(before / after) if after > 0 else 1.0
            with torch.no_grad():
                mods[layer].weight.mul_(f)
            factors[layer] = f
        return factors


def _readers(space: PruningSpace, model: nn.Module) -> dict[str, list[_Reader]]:
    """Per group, the conv/linear layers whose input channels it prunes (Torch-Pruning's dependencies)."""
    dg, _ = space._dependency_graph(model)
    mods = dict(model.named_modules())
    names = {m: n for n, m in mods.items()}
    owner = {m: g.id for g in space.groups for m in g.modules}
    out = {}
    for g in space.groups:
        root = mods[g.id]
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        found: dict[str, _Reader] = {}
        for item in dg.get_pruning_group(root, fn, idxs=list(range(g.channels))):
            m = item.dep.target.module
            if (not isinstance(m, (nn.Conv2d, nn.Linear)) or m not in names or dg.is_out_channel_pruning_fn(item.dep.handler)
                    or any(r is None for r in item.root_idxs) or names[m] in found):
                continue
            n = names[m]
            found[n] = _Reader(n, int(getattr(m, "groups", 1)), owner.get(n), torch.as_tensor(list(item.idxs)),
                               torch.as_tensor(list(item.root_idxs)))
        out[g.id] = list(found.values())
    return out


def _index_encoded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every floating-point tensor holds its own flat element indices."""
    enc = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in enc.state_dict().items():
            if not t.is_floating_point():
                continue
            if t.numel() > _EXACT:
                raise HwpruneError(f"tensor '{name}' has {t.numel()} elements, more than the LSTM method's "
                                   f"surgery maps cover ({_EXACT})")
            t.copy_(torch.arange(t.numel(), dtype=t.dtype).view_as(t))
    return enc


def plan_removal(space: PruningSpace, cost: CostBase, net: Net, scores: Mapping[str, np.ndarray],
                 selected: Iterable[str], share: float, min_keep: float, goal: float,
                 finish: bool = False) -> dict[str, list[int]]:
    """Channels to remove from ``net`` (see the module docstring); ``scores`` are normalised importances.

    ``finish``: every group may go down to its ``min_keep`` width, the ``selected`` ones first, until
    the goal is met (how a search whose budget has run out still reaches the goal).
    """
    selected = set(selected)
    alive = {g.id: np.isin(np.arange(g.channels), net.keep[g.id]) for g in space.groups}
    entries = []
    for gi, g in enumerate(space.groups):
        w = net.widths[g.id]
        if finish or g.id in selected:
            floor = min_width(g, min_keep) if finish else step_width(g, w, share, min_keep)
            n_units = max(0, (w - floor) // g.step)
        else:
            n_units = 0
        units = g.units()
        live = np.nonzero(alive[g.id][units].all(axis=1))[0]
        s = np.asarray(scores[g.id], dtype=np.float64)[units].mean(axis=1)
        order = live[np.argsort(s[live], kind="stable")][:n_units]
        entries += [(int(g.id not in selected), float(s[u]), gi, int(u)) for u in order]
    entries.sort()
    caps = np.array([net.widths[g.id] for g in space.groups])
    budget = goal * float(cost.total([space.full()])[0])
    _, n = first_prefix_within(cost, caps, [e[2] for e in entries], budget, unit=[g.step for g in space.groups])
    removal: dict[str, list[int]] = {}
    for _, _, gi, u in entries[:n]:
        g = space.groups[gi]
        removal.setdefault(g.id, []).extend(int(i) for i in g.units()[u])
    return removal


def child_of(net: Net, removal: Mapping[str, list[int]]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Widths and surviving channels of ``net`` after ``removal``."""
    gone = {g: set(r) for g, r in removal.items()}
    keep = {g: [i for i in k if i not in gone.get(g, ())] for g, k in net.keep.items()}
    return {g: len(k) for g, k in keep.items()}, keep


def recover(model: nn.Module, teacher: nn.Module, batches: Batches, iters: int, lr: float,
            amp: torch.dtype | None = None, temperature: float = 4.0, alpha: float = 0.9) -> float:
    """``iters`` SGD steps of distillation from ``teacher`` plus cross-entropy; the mean loss (0 without steps)."""
    from hwprune.training.train import TrainConfig, _loss

    if iters <= 0:
        return 0.0
    cfg = TrainConfig(label_smoothing=0.0, distill_temperature=temperature, distill_alpha=alpha)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    teacher.eval()
    it, total = _cycle(batches), 0.0
    for i in range(iters):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / iters))
        x, y = next(it)
        with torch.no_grad():
            t_logits = _forward(teacher, x, amp)
        loss = _loss(_forward(model, x, amp), y, cfg, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    model.eval()
    return total / iters


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches, amp: torch.dtype | None = None) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``batches``, in eval mode."""
    model.eval()
    hit = n = 0
    for x, y in batches():
        hit += int((_forward(model, x, amp).argmax(1) == y).sum())
        n += len(y)
    if n == 0:
        raise HwpruneError("the held-out split is empty", "pass more training data")
    return hit / n


@dataclass(frozen=True)
class Recovery:
    """How a child recovers: SGD steps, peak learning rate, autocast dtype and distillation settings."""

    iters: int = 100
    lr: float = 0.01
    amp: torch.dtype | None = None
    temperature: float = 4.0
    alpha: float = 0.9


def make_child(surgeon: Surgeon, parent: Net, removal: Mapping[str, list[int]], scores: Mapping[str, np.ndarray],
               teacher: nn.Module, train: Batches, held: Batches, rec: Recovery) -> tuple[Net, dict]:
    """``parent`` after ``removal``: surgery, energy rescaling, recovery, held-out accuracy.

    ``scores`` (the parent's normalised importances) become the child's prior, so that every
    removed channel remembers how important it was when it went.
    """
    widths, keep = child_of(parent, removal)
    small = surgeon.build(widths, keep, parent.state)
    factors = surgeon.rescale(parent, widths, keep, small, removal)
    loss = recover(small, teacher, train, rec.iters, rec.lr, rec.amp, rec.temperature, rec.alpha)
    acc = accuracy(small, held, rec.amp)
    state = surgeon.write_back(parent.state, small, surgeon.maps(widths, keep))
    child = Net(widths, keep, state, {g: np.asarray(s, dtype=np.float64).copy() for g, s in scores.items()},
                accuracy=acc)
    return child, {"recovery_loss": loss, "rescale": factors}
