"""Pruning methods behind one small protocol, registered by name.

A method turns a cost goal (a fraction of the base model's cost under an objective) into a
:class:`MethodOutput`: the widths and surviving channels it chose, its per-channel scores
(which the device correction uses to remove or restore channels the same way for every
method) and a function that builds the physically smaller model. What a method needs is in
a :class:`PruneJob`.

Registered here: ``uniform``, ``l1``, ``groupnorm`` (the baselines of :mod:`hwprune.pruning.widths`)
and ``gcp`` (:mod:`hwprune.pruning.gcp`). ``hwprune methods`` lists them. A new method registers
itself with ``@METHODS.register(name, summary)`` on a class whose instances implement
:class:`Pruner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch.nn as nn

from hwprune.training.checkpoint import Checkpoint
from hwprune.pruning.objectives import _Base as CostBase
from hwprune.errors import HwpruneError
from hwprune.registry import Registry
from hwprune.pruning.space import PruningSpace, WidthConfig


@dataclass
class PruneJob:
    """Everything a method may use: the space, the trained model, the cost and the data."""

    space: PruningSpace
    model: nn.Module
    cost: CostBase
    checkpoint: Checkpoint
    min_keep: float = 0.2
    data: Path | None = None
    quiet: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # method-specific settings (GCP: steps, iters, recover)


@dataclass
class MethodOutput:
    """A method's choice at one cost goal."""

    widths: WidthConfig
    keep: dict[str, list[int]]
    scores: dict[str, np.ndarray]  # per channel, normalised per group: the correction's order
    build: Callable[[WidthConfig, dict[str, list[int]]], nn.Module]  # the smaller model for widths/keep
    criterion: str
    info: dict = field(default_factory=dict)
    prior: dict[str, np.ndarray] | None = None  # order for restoring channels (default: scores)
    #: per group, the narrowest width the device correction may prune it to (default: ``min_keep``)
    floors: dict[str, int] | None = None


class Pruner(Protocol):
    needs_data: ClassVar[bool]

    def validate(self, options: dict[str, Any]) -> None:
        """Raise a one-line :class:`HwpruneError` for bad method settings, before any work."""

    def __call__(self, job: PruneJob, goal: float) -> MethodOutput: ...


METHODS: Registry = Registry("pruning method")


def normalised(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores divided by their group's mean, so that groups compare on one scale."""
    return {gid: np.asarray(s, dtype=np.float64) / (float(np.mean(s)) + 1e-12) for gid, s in scores.items()}


class _Baseline:
    """uniform, l1 and groupnorm: a width search on the channel scores of one criterion."""

    needs_data: ClassVar[bool] = False
    method: ClassVar[str]

    def validate(self, options: dict[str, Any]) -> None:
        return None

    def __call__(self, job: PruneJob, goal: float) -> MethodOutput:
        from hwprune.pruning.importance import channel_importance
        from hwprune.pruning.widths import prune_widths

        res = prune_widths(job.space, self.method, job.cost, goal, model=job.model, min_keep=job.min_keep)
        crit = res.info["criterion"]
        scores = channel_importance(job.space, job.model, crit)

        def build(widths: WidthConfig, keep: dict[str, list[int]]) -> nn.Module:
            return job.space.apply(widths, model=job.model, keep=keep)

        return MethodOutput(res.widths, res.keep, normalised(scores), build, crit)


@METHODS.register("uniform", "the same fraction of channels in every group, survivors by L1 norm")
class Uniform(_Baseline):
    method = "uniform"


@METHODS.register("l1", "L1-norm filter pruning, channels ranked globally (Li et al.)")
class L1(_Baseline):
    method = "l1"


@METHODS.register("groupnorm", "Torch-Pruning's group-norm criterion, channels ranked globally")
class GroupNorm(_Baseline):
    method = "groupnorm"


@METHODS.register("gcp", "Global Channel Pruning (PruneNet): cost-weighted L1 on shared BN masks, T rounds "
                         "(-o steps, iters, recover, streams, lam_factor, lr, search_iters)")
class GCP:
    needs_data: ClassVar[bool] = True

    #: the ``--option`` settings GCP reads, all positive numbers: ``lam_factor`` and ``lr`` fix lambda (in
    #: units of lambda_0) and the learning rate instead of choosing them on the held-out split
    NUMBERS: ClassVar[tuple[str, ...]] = ("steps", "iters", "lam_factor", "lr", "search_iters")

    def validate(self, options: dict[str, Any]) -> None:
        if options.get("recover", "all") not in ("all", "paper"):
            raise HwpruneError(f"unknown --recover '{options['recover']}'", "choose all or paper")
        from hwprune.pruning.gcp import STREAM_MODES

        if options.get("streams", "prune") not in STREAM_MODES:
            raise HwpruneError(f"unknown GCP option streams='{options['streams']}'", "choose prune or keep")
        for k in self.NUMBERS:
            v = options.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise HwpruneError(f"GCP option {k} must be a positive number, got {v!r}")

    def __call__(self, job: PruneJob, goal: float) -> MethodOutput:
        from hwprune.pruning.gcp import gcp, materialize, width_floors

        if job.data is None:
            raise HwpruneError("GCP trains masks and BN shifts: it needs --data")
        from hwprune.progress import item_progress

        train_batches, held_batches = _gcp_loaders(job)

        cfg = _gcp_config(goal, job)
        with item_progress("GCP", enabled=not job.quiet) as update:
            _, r = gcp(job.model, job.space, job.cost, train_batches, held_batches, cfg, progress=update)
        info = {"gcp_lambda": r.lam, "gcp_lambda_factor": r.lam_factor, "gcp_lr": r.lr, "gcp_steps": cfg.steps,
                "gcp_recover": cfg.recover, "gcp_streams": cfg.streams, "gcp_history": r.history, "gcp_search": r.search,
                "gcp_seconds": r.seconds, "gcp_widths": dict(r.widths.widths)}
        return MethodOutput(r.widths, r.keep, r.scores, lambda w, k: materialize(job.space, r, w, k), "bn", info,
                            prior=r.prior, floors=width_floors(job.space, cfg.min_keep, cfg.streams))


def _gcp_config(goal: float, job: PruneJob):
    """The GCP settings of ``job``'s options (see :attr:`GCP.NUMBERS`)."""
    from hwprune.pruning.gcp import GCPConfig

    o = job.options
    fixed = {"lam_factors": (float(o["lam_factor"]),) if o.get("lam_factor") else None,
             "lr": float(o["lr"]) if o.get("lr") else None,
             "search_iters": int(o["search_iters"]) if o.get("search_iters") else None,
             "iters_per_phase": int(o["iters"]) if o.get("iters") else None}
    return GCPConfig(target=goal, steps=int(o.get("steps", 4)), min_keep=job.min_keep, recover=o.get("recover", "all"),
                     streams=o.get("streams", "prune"), **{k: v for k, v in fixed.items() if v is not None})


def _gcp_loaders(job: PruneJob):
    """Training batches (one epoch per call, reshuffled) and held-out batches, both from the training split."""
    from hwprune.training.data import BatchLoader, holdout_split, load_splits

    splits = load_splits(job.data)
    norm = job.checkpoint.meta.get("data", {})
    train_set = splits.train.with_normalization(norm["mean"], norm["std"]) if "mean" in norm else splits.train
    per_class = max(1, min(200, len(train_set) // (10 * len(train_set.classes))))
    rest, held = holdout_split(train_set, per_class=per_class)
    loader = BatchLoader(rest, 128, shuffle=True, augment=True, drop_last=True)
    held_loader = BatchLoader(held, 256)
    epoch = {"n": 0}

    def train_batches():
        loader.set_epoch(epoch["n"])
        epoch["n"] += 1
        return iter(loader)

    return train_batches, lambda: iter(held_loader)


def get_method(name: str) -> Pruner:
    """An instance of the method registered as ``name`` (one-line error for an unknown one)."""
    return METHODS.get(name)()


@METHODS.register("tp-global", "Torch-Pruning's MetaPruner, global group-norm pruning at its defaults (a reference)")
class TorchPruningGlobal:
    """Torch-Pruning's own pruner as an outside reference: ``MetaPruner(global_pruning=True)`` with
    its default group-norm importance and no per-layer floor. Its pruning ratio is bisected until
    the objective's cost meets the goal; the surviving channels are the top group-norm ones, which
    is the channel order MetaPruner's global ranking uses."""

    needs_data: ClassVar[bool] = False

    def validate(self, options: dict[str, Any]) -> None:
        return None

    def __call__(self, job: PruneJob, goal: float) -> MethodOutput:
        from hwprune.pruning.importance import channel_importance, keep_indices

        lo, hi, best = 0.0, 0.999, None
        for _ in range(14):  # the smallest pruning ratio whose widths meet the goal
            mid = 0.5 * (lo + hi)
            widths = _metapruner_widths(job, mid)
            if job.cost.fraction(widths) <= goal:
                hi, best = mid, widths
            else:
                lo = mid
        if best is None:
            raise HwpruneError(f"Torch-Pruning's global pruner cannot reach {goal:.3f} of the base cost")
        scores = normalised(channel_importance(job.space, job.model, "groupnorm"))
        keep = keep_indices(scores, best, job.space)

        def build(widths: WidthConfig, keep: dict[str, list[int]]) -> nn.Module:
            return job.space.apply(widths, model=job.model, keep=keep)

        return MethodOutput(best, keep, scores, build, "groupnorm", {"tp_pruning_ratio": hi})


def _metapruner_widths(job: PruneJob, ratio: float) -> WidthConfig:
    """The widths ``MetaPruner(global_pruning=True, pruning_ratio=ratio)`` leaves in each of the space's groups."""
    import copy

    import torch
    import torch_pruning as tp

    model = copy.deepcopy(job.model).eval()
    mods = dict(model.named_modules())
    ignored = [mods[n] for n in job.space._ignored_names if n in mods]
    pruner = tp.pruner.MetaPruner(model, torch.randn(*job.space.input_shape),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=True,
                                  pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    mods = dict(model.named_modules())
    widths = {}
    for g in job.space.groups:
        m = mods[g.id]
        widths[g.id] = int(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
    return WidthConfig(job.space.name, widths)


#: Modules that register further methods when imported. They import ``METHODS`` from here, and
#: keep their heavy imports inside the methods, so that listing the methods stays fast.
PLUGINS: tuple[str, ...] = ("hwprune.search.method", "hwprune.pruning.lstm.method")


def _load_plugins() -> None:
    import importlib

    for module in PLUGINS:
        importlib.import_module(module)


_load_plugins()
