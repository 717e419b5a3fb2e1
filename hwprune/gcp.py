"""GCP: Global Channel Pruning (the PruneNet paper), against any cost objective.

The algorithm, as the paper defines it:

* **Importance** is the BN scale. Every channel group gets one mask parameter per channel,
  multiplied into the output of all its normalisation layers, so coupled channels
  (residual stages, a depthwise convolution and its producer) share it. The effective
  scale of channel ``i`` is ``s_i = |m_i| * g_i`` with ``g_i`` the summed ``|gamma|`` of
  its BN layers: for a group with one BN layer this is exactly the BN scale.
* **Regularised step** (eq. 6): convolution weights frozen, BN normalising with its
  global running statistics (BN "off", so the regulariser is not cancelled by the batch
  normalisation), only the masks, the BN shifts and the classifier train, under
  ``loss + lambda * sum_i c_i * s_i`` with ``c_i`` the channel's marginal cost. The L1
  term is applied by proximal gradient steps (soft-thresholding ``m_i`` by
  ``lr * lambda * c_i * g_i``).
* **Prune step**: rank the live channels by ``s_i``, remove the least important until the
  cost falls by ``(1 - alpha) / T`` of the original cost.
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
  BN affine parameters, and fine-tune the smaller network (:func:`hwprune.train.train`).

``lambda`` and the learning rate are chosen by the recover step's loss on a held-out split,
as the paper does, from a small grid around defaults that work at CIFAR and ImageNet scale.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .cost import _Base as CostBase
from .errors import HwpruneError
from .prune import DEFAULT_MIN_KEEP, MeasuredTarget, first_prefix_within
from .space import PruningSpace, WidthConfig


@dataclass
class GCPConfig:
    target: float = 0.5  # alpha: keep this fraction of the base cost
    steps: int = 4  # T: regularise / prune / recover rounds
    lam: float | None = None  # lambda; None: choose by validation
    lr: float | None = None  # learning rate of the regularised and recover steps; None: choose
    iters_per_phase: int | None = None  # None: one epoch of the training loader
    lam_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    lr_grid: tuple[float, ...] = (1e-2, 1e-3)
    search_iters: int = 50  # iterations per phase while choosing lambda and lr
    min_keep: float = DEFAULT_MIN_KEEP  # every group keeps at least this fraction of its channels
    momentum: float = 0.9
    seed: int = 0
    recover: str = "all"  # "all": the recover step trains every weight; "paper": masks, BN shifts, classifier
    precision: str = "auto"  # "auto": bf16 autocast and channels_last where the CPU/GPU runs them fast; "fp32"


@dataclass
class GCPResult:
    widths: WidthConfig
    keep: dict[str, list[int]]
    cost_fraction: float
    history: list[dict] = field(default_factory=list)
    lam: float = 0.0
    lr: float = 0.0
    search: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # final effective BN scales
    prior: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # summed |gamma| before pruning
    trained: nn.Module | None = field(default=None, repr=False)  # full architecture after the last recovery
    mask_values: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class _Masks:
    """One mask vector per channel group, applied after the group's BN layers."""

    def __init__(self, model: nn.Module, space: PruningSpace):
        self.model = model
        self.space = space
        mods = dict(model.named_modules())
        self.params: dict[str, nn.Parameter] = {}
        self.alive: dict[str, torch.Tensor] = {}
        self.gscale: dict[str, torch.Tensor] = {}
        self.hooks = []
        for g in space.groups:
            m = nn.Parameter(torch.ones(g.channels))
            self.params[g.id] = m
            self.alive[g.id] = torch.ones(g.channels, dtype=torch.bool)
            targets = [mods[n] for n in g.norms] or [mods[n] for n in g.modules]
            with torch.no_grad():
                gs = torch.zeros(g.channels)
                for n in g.norms:
                    gs += mods[n].weight.detach().abs() if mods[n].weight is not None else 1.0
                self.gscale[g.id] = gs if g.norms else torch.ones(g.channels)
            for t in targets:
                self.hooks.append(t.register_forward_hook(self._hook(m)))

    @staticmethod
    def _hook(m: nn.Parameter):
        def fn(mod, inp, out):
            shape = (1, -1) + (1,) * (out.dim() - 2)
            return out * m.view(shape)
        return fn

    def scores(self) -> dict[str, np.ndarray]:
        return {gid: (m.detach().abs() * self.gscale[gid] * self.alive[gid]).numpy() for gid, m in self.params.items()}

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


HW_STEP = 8  # channels removed at once when probing a staircase-shaped (latency) cost


def _channel_costs(space: PruningSpace, cost: CostBase, masks: _Masks) -> dict[str, float]:
    """Cost of one channel of each group at the current widths, normalised to mean 1.

    Latency is a staircase: at a full width of 16, removing one channel can make a layer
    *slower* (it leaves the blocked NCHWc kernel), so the one-channel marginal cost is
    often zero or negative. Each group's per-channel cost is therefore the larger of the
    one-channel saving and the per-channel saving of removing ``HW_STEP`` channels; values
    that stay non-positive get a tenth of the smallest positive cost (all 1 if none is).
    """
    widths = masks.widths()
    m1 = cost.marginal(widths, step=1)
    mk = cost.marginal(widths, step=HW_STEP)
    vals = []
    for gid in m1:
        w = widths.widths[gid]
        k = w - max(1, w - HW_STEP)
        vals.append(max(m1[gid], mk[gid] / k if k > 0 else 0.0))
    vals = np.array(vals, dtype=np.float64)
    pos = vals[vals > 0]
    if len(pos) == 0:
        return {g: 1.0 for g in m1}
    vals = np.maximum(vals, pos.min() * 0.1)
    return {g: float(v / vals.mean()) for g, v in zip(m1, vals)}


def _amp(precision: str) -> torch.dtype | None:
    from .train import _amp_dtype

    return _amp_dtype(precision, torch.device("cpu"))


def _forward(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    if amp is None:
        return model(x)
    with torch.autocast("cpu", dtype=amp):
        return model(x.contiguous(memory_format=torch.channels_last)).float()


def _phase(model, masks, params, it, n_iters, lr, momentum, lam=0.0, costs=None, train_stats=False,
           amp=None) -> float:
    """``n_iters`` SGD steps; with ``lam > 0`` each step is followed by the proximal L1 step."""
    _set_bn_mode(model, train_stats)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    total, n = 0.0, 0
    for _ in range(n_iters):
        x, y = next(it)
        loss = nn.functional.cross_entropy(_forward(model, x, amp), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for gid, m in masks.params.items():
                if lam > 0:
                    thr = lr * lam * costs[gid] * masks.gscale[gid]
                    m.copy_(torch.sign(m) * torch.clamp(m.abs() - thr, min=0.0))
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


def _prune_to(space: PruningSpace, cost: CostBase, masks: _Masks, fraction: float, min_keep: float,
              base_cost: float) -> None:
    """Remove the least important live channels until the cost is at most ``fraction`` of the base."""
    scores = masks.scores()
    entries = []
    for gi, g in enumerate(space.groups):
        alive = masks.alive[g.id].numpy()
        keep_min = max(1, math.ceil(min_keep * g.channels))
        removable = int(alive.sum()) - keep_min
        if removable <= 0:
            continue
        idx = np.nonzero(alive)[0]
        order = idx[np.argsort(scores[g.id][idx], kind="stable")][:removable]
        entries += [(float(scores[g.id][i]), gi, int(i)) for i in order]
    entries.sort()
    caps = np.array([int(masks.alive[g.id].sum()) for g in space.groups])
    _, n = first_prefix_within(cost, caps, [gi for _, gi, _ in entries], fraction * base_cost)
    for _, gi, i in entries[:n]:
        gid = space.groups[gi].id
        masks.alive[gid][i] = False
        with torch.no_grad():
            masks.params[gid][i] = 0.0


def _run(model: nn.Module, space: PruningSpace, cost: CostBase, cfg: GCPConfig, train: Batches,
         lam: float, lr: float, iters: int, steps: int, progress=None) -> tuple[_Masks, list[dict]]:
    masks = _Masks(model, space)
    _recover_trainables(model, masks, cfg.recover)  # reject a bad mode before any work
    amp = _amp(cfg.precision)
    if amp is not None:
        model.to(memory_format=torch.channels_last)
    base = float(cost.total([space.full()])[0])
    it = _cycle(train)
    history = []
    try:
        for t in range(1, steps + 1):
            costs = _channel_costs(space, cost, masks)
            params = _trainables(model, masks)  # convolutions frozen
            reg = _phase(model, masks, params, it, iters, lr, cfg.momentum, lam=lam, costs=costs, train_stats=False,
                         amp=amp)
            goal = 1.0 - t * (1.0 - cfg.target) / steps
            _prune_to(space, cost, masks, goal, cfg.min_keep, base)
            rec = _phase(model, masks, _recover_trainables(model, masks, cfg.recover), it, iters, lr, cfg.momentum, train_stats=True, amp=amp)
            frac = float(cost.total([masks.widths()])[0] / base)
            history.append({"step": t, "goal": goal, "cost_fraction": frac, "reg_loss": reg, "recover_loss": rec,
                            "widths": dict(masks.widths().widths)})
            if progress:
                progress(f"GCP step {t}/{steps}: cost {100 * frac:.1f}%", t, steps)
    except BaseException:
        masks.remove()
        raise
    return masks, history


def gcp(model: nn.Module, space: PruningSpace, cost: CostBase, train: Batches, holdout: Batches,
        cfg: GCPConfig = GCPConfig(), progress=None) -> tuple[nn.Module, GCPResult]:
    """Prune ``model`` (the space's architecture, trained) to ``cfg.target`` of its cost.

    ``train`` and ``holdout`` return iterables of (images, labels) batches. Returns the
    physically smaller model (masks folded in, BN statistics recovered) before fine-tuning.
    """
    if not 0 < cfg.target < 1:
        raise HwpruneError(f"GCP target must be a fraction in (0, 1), got {cfg.target}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    iters = cfg.iters_per_phase or max(1, sum(1 for _ in train()))
    import copy

    search = []
    lam, lr = cfg.lam, cfg.lr
    if lam is None or lr is None:
        grid = list(itertools.product(cfg.lam_grid if lam is None else [lam], cfg.lr_grid if lr is None else [lr]))
        best = None
        for k, (la, le) in enumerate(grid):
            trial = copy.deepcopy(model)
            masks, _ = _run(trial, space, cost, cfg, train, la, le, min(iters, cfg.search_iters), steps=1)
            loss = _eval_loss(trial, holdout, _amp(cfg.precision))
            masks.remove()
            search.append({"lambda": la, "lr": le, "holdout_loss": loss})
            if progress:
                progress(f"choosing lambda/lr {k + 1}/{len(grid)}", k + 1, len(grid))
            if best is None or loss < best[0]:
                best = (loss, la, le)
        _, lam, lr = best
    work = copy.deepcopy(model)
    masks, history = _run(work, space, cost, cfg, train, lam, lr, iters, cfg.steps, progress)
    widths = masks.widths()
    keep = {gid: [int(i) for i in np.nonzero(a.numpy())[0]] for gid, a in masks.alive.items()}
    scores = masks.scores()
    prior = {gid: g.numpy().copy() for gid, g in masks.gscale.items()}
    values = {gid: p.detach().clone() for gid, p in masks.params.items()}
    masks.remove()
    work.to(memory_format=torch.contiguous_format)
    for p in work.parameters():
        p.requires_grad_(True)
    res = GCPResult(widths=widths, keep=keep, cost_fraction=float(cost.fraction(widths)), history=history,
                    lam=float(lam), lr=float(lr), search=search, seconds=time.perf_counter() - t0, scores=scores,
                    prior=prior, trained=work, mask_values=values)
    return materialize(space, res, widths, keep), res


def materialize(space: PruningSpace, res: GCPResult, widths: WidthConfig, keep: dict[str, list[int]]) -> nn.Module:
    """The physically smaller model for ``widths``/``keep`` from GCP's trained masks and shifts."""
    pruned = space.apply(widths, model=res.trained, keep=keep)
    # channels the device correction gave back were pruned (mask 0) during GCP: they return with a mask of 1,
    # i.e. with the BN scale and shift they had when they were pruned, not as dead channels
    values = {gid: torch.where(m == 0, torch.ones_like(m), m) for gid, m in res.mask_values.items()}
    fold_masks(space, values, pruned, keep)
    return pruned.eval()


def _add_back_cost(cost: CostBase, cfg: WidthConfig, step: int = 8) -> dict[str, float]:
    """Per group, the cost of one channel given back at ``cfg`` (:meth:`CostBase.add_back`), floored
    at a hundredth of the mean positive value, because a latency staircase can make a few channels
    free or even cheaper.

    Restoring by BN scale alone favours coupled groups (a residual stream sums the scales of
    every BN it feeds), which are also the most expensive channels to give back.
    """
    per = cost.add_back(cfg, step)
    pos = [v for v in per.values() if v > 0]
    floor = 0.01 * float(np.mean(pos)) if pos else 1.0
    return {gid: max(v, floor) for gid, v in per.items()}


def correct_to_measured(space: PruningSpace, cost: CostBase, widths: WidthConfig, keep: dict[str, list[int]],
                        scores: dict[str, np.ndarray], prior: dict[str, np.ndarray],
                        measure: Callable[[WidthConfig, dict[str, list[int]]], float], base_ms: float,
                        target: float, tol: float = 0.03, rounds: int = 4,
                        min_keep: float = DEFAULT_MIN_KEEP) -> tuple[WidthConfig, dict[str, list[int]], list[dict]]:
    """Meet the target on the device, not only in prediction.

    ``measure(widths, keep)`` returns the measured end-to-end latency of that pruned
    model. While the measured ratio to ``base_ms`` is above ``target`` (or more than
    ``tol`` below it), the predicted-cost goal is rescaled by ``target / ratio`` (or,
    once one goal landed under and one over the target, bisected between them) and
    channels are pruned further (lowest effective BN scale first) or restored (highest
    prior BN scale per unit of cost first, see :func:`_add_back_cost`), then the model is
    measured again. If the last try misses,
    the slowest configuration that met the target is returned.
    """
    alive = {g.id: np.zeros(g.channels, dtype=bool) for g in space.groups}
    for gid, idx in keep.items():
        alive[gid][idx] = True
    log = []

    def current() -> WidthConfig:
        return WidthConfig(space.name, {gid: int(a.sum()) for gid, a in alive.items()})

    base_cost = float(cost.total([space.full()])[0])
    steer = MeasuredTarget(target, tol)
    for r in range(rounds + 1):
        cfg = current()
        ms = measure(cfg, {gid: [int(i) for i in np.nonzero(a)[0]] for gid, a in alive.items()})
        ratio = ms / base_ms
        frac = float(cost.total([cfg])[0] / base_cost)
        log.append({"round": r, "measured_ms": ms, "ratio": ratio, "predicted_fraction": frac,
                    "widths": dict(cfg.widths)})
        if steer.record(frac, ratio, (r, {gid: a.copy() for gid, a in alive.items()})) or r == rounds:
            break
        goal = steer.next_goal(frac, ratio)
        if goal < frac:  # too slow: prune the least important live channels
            cands = sorted((float(scores[g.id][i]), gi, int(i)) for gi, g in enumerate(space.groups)
                           for i in np.nonzero(alive[g.id])[0])
            for _, gi, i in cands:
                g = space.groups[gi]
                if alive[g.id].sum() <= max(1, math.ceil(min_keep * g.channels)):
                    continue
                alive[g.id][i] = False
                if cost.total([current()])[0] / base_cost <= goal:
                    break
        else:  # well under the target: give back the pruned channels with the most BN scale per unit cost
            unit = _add_back_cost(cost, current())
            cands = sorted(((-float(prior[g.id][i]) / unit[g.id], gi, int(i)) for gi, g in enumerate(space.groups)
                            for i in np.nonzero(~alive[g.id])[0]))
            for _, gi, i in cands:
                g = space.groups[gi]
                alive[g.id][i] = True
                if cost.total([current()])[0] / base_cost > goal:
                    alive[g.id][i] = False
                    break
    kept, alive = steer.chosen()
    log[kept]["kept"] = True
    cfg = current()
    return cfg, {gid: [int(i) for i in np.nonzero(a)[0]] for gid, a in alive.items()}, log
