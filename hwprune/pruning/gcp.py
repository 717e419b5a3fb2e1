"""GCP: Global Channel Pruning (the PruneNet paper), against any cost objective.

The algorithm, as the paper defines it:

* **Masks**: every channel group gets one mask parameter per channel, multiplied into the
  output of all its normalisation layers, so coupled channels (residual stages, a depthwise
  convolution and its producer) share it. The mask is what is regularised and ranked, for
  single and coupled groups alike (the paper regularises the shared mask of coupled layers).
* **Importance** is the BN scale, normalised per group: ``s_i = |m_i| * g_i`` with ``g_i``
  the summed ``|gamma|`` of the channel's BN layers divided by its mean over the group's
  live channels. A channel's score therefore does not grow with the number of BN layers of
  its group (a residual stream feeding four BNs competes with an inner convolution on one
  scale), and across groups the ranking is set by the masks, i.e. by the regulariser and
  its costs. The scales are recomputed from the current ``gamma`` after every recover step.
* **Regularised step** (eq. 6): convolution weights frozen, BN normalising with its
  global running statistics (BN "off", so the regulariser is not cancelled by the batch
  normalisation), only the masks, the BN shifts and the classifier train, under
  ``loss + lambda * sum_i c_i * |m_i|`` with ``c_i`` the channel's marginal cost (normalised
  to mean 1 over the groups, so one ``lambda`` scale serves every objective). The L1 term
  is applied by proximal gradient steps (soft-thresholding ``m_i`` by ``lr * lambda * c_i``),
  except on each group's ``min_keep`` highest-scored channels, which no prune step may remove,
  so that no group is zeroed whole.
  With ``streams="keep"`` the residual streams are held whole and only the groups inside the
  blocks compete (short fine-tuning recovers inner convolutions far better than a stream that
  feeds every layer of its stage).
* **Prune step**: rank the live channels by ``s_i`` (masks the proximal step zeroed first,
  the most expensive of them first), remove the least important until the cost falls by
  ``(1 - alpha) / T`` of the original cost. A group with grouped convolutions (a step, see
  :mod:`hwprune.pruning.space`) is ranked, protected and removed in whole units, one position in
  every conv group, scored by the mean ``s_i`` of their channels; masks stay per channel.
* **Recover step** (eq. 7): no regulariser, BN in training mode (mini-batch statistics,
  refreshing the running statistics). The paper trains the same parameters as in the
  regularised step (``recover="paper"``). The default, ``recover="all"``, also trains the
  convolution weights: on CIFAR-size networks at latency targets that remove most channels,
  the masks, shifts and classifier alone left the held-out loss above 2 after the first step,
  and the BN-scale ranking of the next step was then made on a broken network.
* Repeat ``T`` times, re-evaluating the marginal costs at the current widths after every
  prune step: latency is not additive per channel (staircases, fusions), so the cost of a
  channel changes as its neighbours go.
* Physically remove the pruned channels (Torch-Pruning surgery), fold the masks into the
  BN affine parameters, and fine-tune the smaller network (:func:`hwprune.training.train.train`).

``lambda`` is sized from the costs, the learning rate and the iterations: at
``lambda_0 = 1 / (lr * iters * median(c))`` the proximal step alone would take a mask of median
cost from 1 to 0 over one regularised phase. ``lambda`` (as a multiple of ``lambda_0``) and the
learning rate are chosen, as the paper does, by the held-out loss after a complete but shorter
``T``-round run per candidate.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from hwprune.pruning.objectives import _Base as CostBase
from hwprune.errors import HwpruneError
from hwprune.pruning.widths import DEFAULT_MIN_KEEP, first_prefix_within
from hwprune.pruning.space import ChannelGroup, PruningSpace, WidthConfig


@dataclass
class GCPConfig:
    target: float = 0.5  # alpha: keep this fraction of the base cost
    steps: int = 4  # T: regularise / prune / recover rounds
    lam: float | None = None  # lambda of the full-length run; None: choose by validation from lam_factors
    lr: float | None = None  # learning rate of the regularised and recover steps; None: choose
    iters_per_phase: int | None = None  # None: one epoch of the training loader
    lam_factors: tuple[float, ...] = (0.1, 0.3, 1.0)  # lambda candidates, in units of lambda_0 (module docstring)
    lr_grid: tuple[float, ...] = (1e-2, 1e-3)
    search_iters: int = 20  # iterations per phase of each candidate's T-round run
    min_keep: float = DEFAULT_MIN_KEEP  # every group keeps at least this fraction of its channels
    momentum: float = 0.9
    seed: int = 0
    recover: str = "all"  # "all": the recover step trains every weight; "paper": masks, BN shifts, classifier
    streams: str = "prune"  # "prune": residual streams compete with every group; "keep": they stay whole
    precision: str = "auto"  # "auto": bf16 autocast and channels_last where the CPU/GPU runs them fast; "fp32"


@dataclass
class GCPResult:
    widths: WidthConfig
    keep: dict[str, list[int]]
    cost_fraction: float
    history: list[dict] = field(default_factory=list)
    lam: float = 0.0
    lr: float = 0.0
    lam_factor: float = 0.0  # lam in units of lambda_0: the median-cost mask's proximal shrinkage per phase
    search: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # final importance scores s_i
    prior: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # normalised BN scales before pruning
    trained: nn.Module | None = field(default=None, repr=False)  # full architecture after the last recovery
    mask_values: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def bn_scales(space: PruningSpace, model: nn.Module,
              alive: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per group, each channel's summed ``|gamma|`` over the group's BN layers divided by its mean
    over the group's ``alive`` channels (all of them by default); all ones for a group without BN."""
    mods = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for g in space.groups:
            s = torch.zeros(g.channels) if g.norms else torch.ones(g.channels)
            for n in g.norms:
                w = mods[n].weight
                s += w.detach().abs().float().cpu() if w is not None else 1.0
            live = s if alive is None else s[alive[g.id]]
            mean = float(live.mean()) if len(live) else 0.0
            out[g.id] = s / mean if mean > 0 else torch.ones(g.channels)
    return out


def _floor(channels: int, min_keep: float) -> int:
    """The channels a group of ``channels`` keeps at least."""
    return max(1, math.ceil(min_keep * channels))


def _min_width(g: ChannelGroup, min_keep: float) -> int:
    """The narrowest width group ``g`` may be pruned to: ``min_keep`` of its channels, rounded up
    to a multiple of its step."""
    return g.round_width(_floor(g.channels, min_keep), "up")


STREAM_MODES = ("prune", "keep")


def width_floors(space: PruningSpace, min_keep: float, streams: str = "prune") -> dict[str, int]:
    """Per group, the narrowest width GCP may leave: :func:`_min_width`, or the full width of a
    residual stream when ``streams`` is ``"keep"`` (only the convolutions inside the blocks are pruned)."""
    if streams not in STREAM_MODES:
        raise HwpruneError(f"unknown GCP streams mode '{streams}'", "choose prune or keep")
    keep = streams == "keep"
    return {g.id: g.channels if keep and g.kind == "residual" else _min_width(g, min_keep) for g in space.groups}


def _unit_scores(g: ChannelGroup, scores: np.ndarray) -> np.ndarray:
    """One score per unit of ``g`` (:meth:`ChannelGroup.units`): the mean of its channels' scores."""
    return np.asarray(scores, dtype=np.float64)[g.units()].mean(axis=1)


def _kept(alive: dict[str, np.ndarray | torch.Tensor]) -> dict[str, list[int]]:
    """The indices of the live channels of every group."""
    return {gid: [int(i) for i in np.nonzero(np.asarray(a))[0]] for gid, a in alive.items()}


class _Masks:
    """One mask vector per channel group, applied after the group's BN layers; every group keeps
    at least its :func:`width_floors` width, whole units of a group with a step."""

    def __init__(self, model: nn.Module, space: PruningSpace, min_keep: float = 0.0, streams: str = "prune"):
        self.model = model
        self.space = space
        self.floor = width_floors(space, min_keep, streams)
        self.units = {g.id: torch.as_tensor(g.units()) for g in space.groups}
        mods = dict(model.named_modules())
        self.params: dict[str, nn.Parameter] = {}
        self.alive: dict[str, torch.Tensor] = {}
        self.hooks = []
        for g in space.groups:
            m = nn.Parameter(torch.ones(g.channels))
            self.params[g.id] = m
            self.alive[g.id] = torch.ones(g.channels, dtype=torch.bool)
            for t in [mods[n] for n in g.norms] or [mods[n] for n in g.modules]:
                self.hooks.append(t.register_forward_hook(self._hook(m)))
        self.gscale: dict[str, torch.Tensor] = {}
        self.refresh_scales()

    @staticmethod
    def _hook(m: nn.Parameter):
        def fn(mod, inp, out):
            shape = (1, -1) + (1,) * (out.dim() - 2)
            return out * m.view(shape)
        return fn

    def refresh_scales(self) -> None:
        """Recompute the normalised BN scales ``g_i`` from the model's current ``gamma``."""
        self.gscale = bn_scales(self.space, self.model, self.alive)

    def scores(self) -> dict[str, np.ndarray]:
        return {gid: (m.detach().abs() * self.gscale[gid] * self.alive[gid]).numpy() for gid, m in self.params.items()}

    @torch.no_grad()
    def shrink(self, thr: dict[str, float]) -> None:
        """Proximal L1 step: soft-threshold each group's masks by ``thr[gid]``, except the channels of
        the group's ``floor`` highest-scored live channels (whole units, ranked by their mean score),
        which no prune step may remove."""
        for gid, m in self.params.items():
            new = torch.sign(m) * torch.clamp(m.abs() - thr[gid], min=0.0)
            units = self.units[gid]
            s = (m.abs() * self.gscale[gid] * self.alive[gid])[units].mean(dim=1)
            top = units[torch.topk(s, self.floor[gid] // units.shape[1]).indices].ravel()
            new[top] = m[top]
            m.copy_(new)

    def zeroed(self) -> dict[str, int]:
        """Per group, the number of live channels whose mask is exactly zero."""
        return {gid: int(((m.detach() == 0) & self.alive[gid]).sum()) for gid, m in self.params.items()}

    def live(self) -> int:
        return sum(int(a.sum()) for a in self.alive.values())

    def widths(self) -> WidthConfig:
        return WidthConfig(self.space.name, {g: int(a.sum()) for g, a in self.alive.items()})

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def fold_into(self, pruned: nn.Module, keep: dict[str, list[int]]) -> None:
        """Multiply the surviving masks into the pruned model's BN affine parameters."""
        fold_masks(self.space, {gid: p.detach() for gid, p in self.params.items()}, pruned, keep)


def fold_masks(space: PruningSpace, values: dict[str, torch.Tensor], pruned: nn.Module,
               keep: dict[str, list[int]]) -> None:
    """Multiply mask ``values`` of the kept channels into ``pruned``'s BN affine parameters."""
    mods = dict(pruned.named_modules())
    with torch.no_grad():
        for g in space.groups:
            m = values[g.id][keep[g.id]]
            if g.norms:
                for n in g.norms:
                    mods[n].weight.mul_(m)
                    mods[n].bias.mul_(m)
            else:  # no BN: scale the producing layers' outputs
                for n in g.modules:
                    layer = mods[n]
                    layer.weight.mul_(m.view(-1, *([1] * (layer.weight.dim() - 1))))
                    if layer.bias is not None:
                        layer.bias.mul_(m)


def _trainables(model: nn.Module, masks: _Masks) -> list[nn.Parameter]:
    """Masks, BN shifts and the classifier; everything else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(masks.params.values())
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.bias is not None:
            mod.bias.requires_grad_(True)
            params.append(mod.bias)
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if lin:
        for p in lin[-1].parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _recover_trainables(model: nn.Module, masks: _Masks, mode: str) -> list[nn.Parameter]:
    """The recover step's parameters: the regularised step's (``"paper"``) or every weight (``"all"``)."""
    params = _trainables(model, masks)
    if mode == "paper":
        return params
    if mode != "all":
        raise HwpruneError(f"unknown GCP recover mode '{mode}' (choose all or paper)")
    for p in model.parameters():
        p.requires_grad_(True)
    return list(masks.params.values()) + list(model.parameters())


def _set_bn_mode(model: nn.Module, train_stats: bool) -> None:
    model.train()
    if not train_stats:  # BN "off": normalise with the global statistics, never update them
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()


def _cycle(batches: Batches) -> Iterator:
    while True:
        yield from batches()


#: channels removed at once when probing a staircase-shaped (latency) cost, besides one unit: the
#: widths of the blocks that runtimes' blocked kernels use (NCHW8c with AVX2, NCHW16c with AVX-512) and twice that
HW_STEP, HW_STEPS = 8, (16, 32)


def _channel_costs(space: PruningSpace, cost: CostBase, widths: WidthConfig) -> dict[str, float]:
    """Cost of one channel of each group at ``widths``, normalised to mean 1.

    Latency is a staircase: at a full width of 64, removing one channel can make a layer
    *slower* (it leaves the blocked NCHWc kernel), and with 16-channel blocks removing 8 saves
    nothing either, so a one-step marginal cost is often zero or negative. Each group's
    per-channel cost is therefore the largest per-channel saving of removing one unit, of
    removing ``HW_STEP`` channels, and of removing each of ``HW_STEPS`` where that keeps at
    least half of the group's channels (all rounded up to a multiple of the group's step,
    :func:`_unit_step`): the slope to the next step of the staircase. Values that stay
    non-positive get a tenth of the smallest positive cost (all 1 if none is).
    """
    ids = [g.id for g in space.groups]
    m1, mk = _saving(space, cost, widths, 1), _saving(space, cost, widths, HW_STEP)
    best = {gid: max(m1[gid], mk[gid]) for gid in ids}
    for n in HW_STEPS:
        sv = _saving(space, cost, widths, n)
        for g in space.groups:
            if 2 * _unit_step(g, n) <= widths.widths[g.id]:
                best[g.id] = max(best[g.id], sv[g.id])
    vals = np.array([best[gid] for gid in ids], dtype=np.float64)
    pos = vals[vals > 0]
    if len(pos) == 0:
        return {g: 1.0 for g in ids}
    vals = np.maximum(vals, pos.min() * 0.1)
    return {g: float(v / vals.mean()) for g, v in zip(ids, vals)}


def _unit_step(g: ChannelGroup, n: int) -> int:
    """The smallest multiple of ``g``'s step that is at least ``n`` channels."""
    return g.step * math.ceil(n / g.step)


def _by_step(space: PruningSpace, n: int, fn: Callable[[int], dict[str, float]]) -> dict[str, float]:
    """``fn(step)[gid]`` of every group at its ``step = _unit_step(group, n)``, one call per distinct step."""
    steps = {g.id: _unit_step(g, n) for g in space.groups}
    got = {k: fn(k) for k in sorted(set(steps.values()))}
    return {gid: got[k][gid] for gid, k in steps.items()}


def _saving(space: PruningSpace, cost: CostBase, widths: WidthConfig, n: int) -> dict[str, float]:
    """Per group, the per-channel saving of removing ``_unit_step(group, n)`` channels at ``widths``
    (fewer where that would leave under one channel; 0 at one channel)."""
    m = _by_step(space, n, lambda k: cost.marginal(widths, step=k))
    out = {}
    for g in space.groups:
        w = widths.widths[g.id]
        k = w - max(1, w - _unit_step(g, n))
        out[g.id] = m[g.id] / k if k > 0 else 0.0
    return out


def lambda_unit(space: PruningSpace, cost: CostBase, lr: float, iters: int) -> float:
    """``lambda_0 = 1 / (lr * iters * median(c))`` at full width: the ``lambda`` at which the proximal
    step alone takes a mask of median cost from 1 to 0 in one phase of ``iters`` steps."""
    c = np.array(list(_channel_costs(space, cost, space.full()).values()))
    return 1.0 / (lr * iters * float(np.median(c)))


def _amp(precision: str) -> torch.dtype | None:
    from hwprune.training.train import _amp_dtype

    return _amp_dtype(precision, torch.device("cpu"))


def _forward(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    if amp is None:
        return model(x)
    with torch.autocast("cpu", dtype=amp):
        return model(x.contiguous(memory_format=torch.channels_last)).float()


def _phase(model, masks, params, it, n_iters, lr, momentum, lam=0.0, costs=None, train_stats=False,
           amp=None) -> float:
    """``n_iters`` SGD steps; with ``lam > 0`` each step is followed by the proximal L1 step on the masks."""
    _set_bn_mode(model, train_stats)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    total, n = 0.0, 0
    for _ in range(n_iters):
        x, y = next(it)
        loss = nn.functional.cross_entropy(_forward(model, x, amp), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if lam > 0:
            masks.shrink({gid: lr * lam * c for gid, c in costs.items()})
        with torch.no_grad():
            for gid, m in masks.params.items():
                m.mul_(masks.alive[gid])  # pruned channels stay at zero
        total += loss.item()
        n += 1
    return total / max(n, 1)


@torch.no_grad()
def _eval_loss(model: nn.Module, batches: Batches, amp=None) -> float:
    model.eval()
    tot, n = 0.0, 0
    for x, y in batches():
        tot += float(nn.functional.cross_entropy(_forward(model, x, amp), y, reduction="sum"))
        n += len(y)
    return tot / max(n, 1)


#: how many of the last removals :func:`_give_back` reconsiders
GIVE_BACK = 64


def _give_back(space: PruningSpace, cost: CostBase, widths: np.ndarray, groups: list[int], budget: float) -> set[int]:
    """Of the removals ``groups`` (group indices, in removal order) that brought the widths to
    ``widths``, the positions to undo while the cost stays within ``budget``.

    Latency is a staircase in the channel count: the removal that crosses the budget can be the one
    that puts a layer back on a fast kernel, and so undercut the budget by far (one channel off a
    stream of 17 took a quickstart round from 0.65 to 0.53 of the base latency). The last
    :data:`GIVE_BACK` removals, the most important ones, are reconsidered from the last: each is undone
    when the cost with it undone is still within the budget."""
    w = np.array(widths, dtype=np.int64)
    kept: set[int] = set()
    for k in range(len(groups) - 1, max(-1, len(groups) - 1 - GIVE_BACK), -1):
        gi = groups[k]
        w[gi] += space.groups[gi].step
        if float(cost.total(w[None, :])[0]) <= budget * (1 + 1e-12):
            kept.add(k)
        else:
            w[gi] -= space.groups[gi].step
    return kept


def _prune_to(space: PruningSpace, cost: CostBase, masks: _Masks, fraction: float, base_cost: float,
              costs: dict[str, float] | None = None) -> None:
    """Remove the least important live units until the cost is at most ``fraction`` of the base,
    then give back those of the last removals that still fit (:func:`_give_back`).

    A unit is one channel, or one position in every conv group of a group with a step, scored by
    the mean of its channels' scores. Equal scores (masks the proximal step zeroed) go in order of
    decreasing channel cost ``costs``.
    """
    scores = masks.scores()
    entries = []
    for gi, g in enumerate(space.groups):
        alive = masks.alive[g.id].numpy()[g.units()].all(axis=1)
        removable = int(alive.sum()) - masks.floor[g.id] // g.step
        if removable <= 0:
            continue
        s = _unit_scores(g, scores[g.id])
        idx = np.nonzero(alive)[0]
        order = idx[np.argsort(s[idx], kind="stable")][:removable]
        c = -costs[g.id] if costs else 0.0
        entries += [(float(s[u]), c, gi, int(u)) for u in order]
    entries.sort()
    caps = np.array([int(masks.alive[g.id].sum()) for g in space.groups])
    W, n = first_prefix_within(cost, caps, [e[2] for e in entries], fraction * base_cost,
                               unit=[g.step for g in space.groups])
    kept = _give_back(space, cost, W[n], [e[2] for e in entries[:n]], fraction * base_cost)
    for k, (_, _, gi, u) in enumerate(entries[:n]):
        if k in kept:
            continue
        g = space.groups[gi]
        idx = torch.as_tensor(g.units()[u])
        masks.alive[g.id][idx] = False
        with torch.no_grad():
            masks.params[g.id][idx] = 0.0


def _run(model: nn.Module, space: PruningSpace, cost: CostBase, cfg: GCPConfig, train: Batches,
         lam: float, lr: float, iters: int, steps: int, progress=None) -> tuple[_Masks, list[dict]]:
    """``steps`` regularise / prune / recover rounds on ``model`` (masked in place)."""
    masks = _Masks(model, space, cfg.min_keep, cfg.streams)
    _recover_trainables(model, masks, cfg.recover)  # reject a bad mode before any work
    amp = _amp(cfg.precision)
    if amp is not None:
        model.to(memory_format=torch.channels_last)
    base = float(cost.total([space.full()])[0])
    it = _cycle(train)
    history = []
    try:
        for t in range(1, steps + 1):
            costs = _channel_costs(space, cost, masks.widths())
            live = masks.live()
            reg = _phase(model, masks, _trainables(model, masks), it, iters, lr, cfg.momentum, lam=lam, costs=costs,
                         train_stats=False, amp=amp)  # convolutions frozen
            zeroed = masks.zeroed()
            goal = 1.0 - t * (1.0 - cfg.target) / steps
            _prune_to(space, cost, masks, goal, base, costs)
            rec = _phase(model, masks, _recover_trainables(model, masks, cfg.recover), it, iters, lr, cfg.momentum,
                         train_stats=True, amp=amp)
            masks.refresh_scales()  # the recover step may have trained gamma
            frac = float(cost.total([masks.widths()])[0] / base)
            share = sum(zeroed.values()) / max(live, 1)  # of the round's live masks, left at exactly 0
            history.append({"step": t, "goal": goal, "cost_fraction": frac, "reg_loss": reg, "recover_loss": rec,
                            "zeroed_share": share, "zeroed": {g: n for g, n in zeroed.items() if n},
                            "widths": dict(masks.widths().widths)})
            if progress:
                progress(f"GCP step {t}/{steps}: cost {100 * frac:.1f}%, {100 * share:.1f}% of masks zeroed", t, steps)
    except BaseException:
        masks.remove()
        raise
    return masks, history


def _candidates(space: PruningSpace, cost: CostBase, cfg: GCPConfig, iters: int) -> list[tuple[float, float]]:
    """(lambda of a run with ``iters`` iterations per phase, lr) pairs to choose from."""
    lrs = cfg.lr_grid if cfg.lr is None else (cfg.lr,)
    if cfg.lam is not None:
        return [(cfg.lam, lr) for lr in lrs]
    return [(f * lambda_unit(space, cost, lr, iters), lr) for f, lr in itertools.product(cfg.lam_factors, lrs)]


def _choose(model: nn.Module, space: PruningSpace, cost: CostBase, cfg: GCPConfig, train: Batches,
            holdout: Batches, iters: int, grid: list[tuple[float, float]], progress=None) -> list[dict]:
    """Score each (lambda, lr) of ``grid`` by the held-out loss its complete ``T``-round run leaves, the run
    shortened to ``cfg.search_iters`` iterations per phase (lambda scaled so that the proximal shrinkage
    per phase is unchanged)."""
    n = max(1, min(iters, cfg.search_iters))
    search = []
    for k, (lam, lr) in enumerate(grid):
        torch.manual_seed(cfg.seed)
        trial = copy.deepcopy(model)
        masks, hist = _run(trial, space, cost, cfg, train, lam * iters / n, lr, n, cfg.steps)
        loss = _eval_loss(trial, holdout, _amp(cfg.precision))
        masks.remove()
        search.append({"lambda": lam, "lambda_factor": lam / lambda_unit(space, cost, lr, iters), "lr": lr,
                       "iters": n, "holdout_loss": loss, "zeroed_share": [h["zeroed_share"] for h in hist]})
        if progress:
            progress(f"choosing lambda/lr {k + 1}/{len(grid)}", k + 1, len(grid))
    return search


def gcp(model: nn.Module, space: PruningSpace, cost: CostBase, train: Batches, holdout: Batches,
        cfg: GCPConfig = GCPConfig(), progress=None) -> tuple[nn.Module, GCPResult]:
    """Prune ``model`` (the space's architecture, trained) to ``cfg.target`` of its cost.

    ``train`` and ``holdout`` return iterables of (images, labels) batches; ``holdout`` (a split of
    the training data, never the test set) only scores the lambda/lr candidates. Returns the
    physically smaller model (masks folded in, BN statistics recovered) before fine-tuning.
    """
    if not 0 < cfg.target < 1:
        raise HwpruneError(f"GCP target must be a fraction in (0, 1), got {cfg.target}")
    t0 = time.perf_counter()
    iters = cfg.iters_per_phase or max(1, sum(1 for _ in train()))
    grid = _candidates(space, cost, cfg, iters)
    search = _choose(model, space, cost, cfg, train, holdout, iters, grid, progress) if len(grid) > 1 else []
    best = min(search, key=lambda s: s["holdout_loss"]) if search else {"lambda": grid[0][0], "lr": grid[0][1]}
    lam, lr = best["lambda"], best["lr"]
    torch.manual_seed(cfg.seed)
    work = copy.deepcopy(model)
    masks, history = _run(work, space, cost, cfg, train, lam, lr, iters, cfg.steps, progress)
    widths = masks.widths()
    keep = _kept(masks.alive)
    scores = masks.scores()
    values = {gid: p.detach().clone() for gid, p in masks.params.items()}
    masks.remove()
    work.to(memory_format=torch.contiguous_format)
    for p in work.parameters():
        p.requires_grad_(True)
    prior = {gid: s.numpy() for gid, s in bn_scales(space, model).items()}
    res = GCPResult(widths=widths, keep=keep, cost_fraction=float(cost.fraction(widths)), history=history,
                    lam=float(lam), lr=float(lr), lam_factor=float(lam / lambda_unit(space, cost, lr, iters)),
                    search=search, seconds=time.perf_counter() - t0, scores=scores, prior=prior, trained=work,
                    mask_values=values)
    return materialize(space, res, widths, keep), res


def materialize(space: PruningSpace, res: GCPResult, widths: WidthConfig, keep: dict[str, list[int]]) -> nn.Module:
    """The physically smaller model for ``widths``/``keep`` from GCP's trained masks and shifts."""
    pruned = space.apply(widths, model=res.trained, keep=keep)
    # channels the device correction gave back were pruned (mask 0) during GCP: they return with a mask of 1,
    # i.e. with the BN scale and shift they had when they were pruned, not as dead channels
    values = {gid: torch.where(m == 0, torch.ones_like(m), m) for gid, m in res.mask_values.items()}
    fold_masks(space, values, pruned, keep)
    return pruned.eval()
