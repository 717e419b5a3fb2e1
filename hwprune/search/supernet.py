"""A weight-sharing supernet over a model's pruning space.

:class:`Supernet` wraps a copy of a trained, unpruned model. Every width configuration of its
:class:`~hwprune.pruning.space.PruningSpace` is a subnet that uses the first ``w`` channels of
each channel group; the channels were sorted by importance when the supernet was built
(:mod:`hwprune.search.reorder`). ``set_widths`` selects one configuration for the batch, or one
per slice of the batch (PSE-Net's parallel subnets); ``mode`` chooses masked or sliced
execution (:mod:`hwprune.search.elastic`), which give the same outputs and gradients.
``extract`` cuts a physically smaller model out of it by Torch-Pruning surgery, which
reproduces the supernet's output at that configuration.

A subnet's BN statistics are recomputed by :func:`recalibrate_bn` before it is evaluated
(cumulative average over ~20 batches); :meth:`Supernet.proxy_accuracy` does both on the
held-out split the supernet never trained on.

File format (``torch.save``, readable with ``weights_only=True``)::

    {"format": "hwprune.supernet/1", "arch", "num_classes", "input_size",
     "space": [[group_id, channels, step], ...], "grid": {...}, "prior": {...},
     "order": {group_id: permutation}, "state_dict": {...}, "meta": {...}}

``meta`` records the base checkpoint's hash, its data normalisation, the training settings,
the epochs trained and the held-out split (per-class count, seed, size).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from hwprune.errors import HwpruneError
from hwprune.models import ModelSpec, create_model
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.search.elastic import MODES, ActiveWidths, check_sliceable, check_supported, make_elastic
from hwprune.search.grid import DEFAULT_FRACTIONS, WidthGrid
from hwprune.search.prior import SamplingPrior
from hwprune.search.reorder import apply_order, check_same_function, importance_order
from hwprune.training.checkpoint import Checkpoint, atomic_torch_save, load_format

FORMAT = "hwprune.supernet/1"
BN_BATCHES = 20  # batches of ~128 images that recompute a subnet's BN statistics

__all__ = ["BN_BATCHES", "FitnessData", "SamplingPrior", "Supernet", "WidthGrid", "calibration_batches",
           "checkpoint_hash", "recalibrate_bn"]


def checkpoint_hash(ck: Checkpoint) -> str:
    """A digest of a checkpoint's architecture, widths and weights (not of its meta)."""
    h = hashlib.sha256(json.dumps([ck.arch, ck.num_classes, list(ck.input_size), ck.widths]).encode())
    for k in sorted(ck.state_dict):
        t = ck.state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def space_signature(space: PruningSpace) -> list[list]:
    return [[g.id, g.channels, g.step] for g in space.groups]


@dataclass
class FitnessData:
    """What scoring a subnet needs: BN calibration batches from the training images and the held-out split."""

    calibration: list[torch.Tensor]
    holdout: Any  # an ImageDataset


class Supernet(nn.Module):
    """Every width configuration of a model's pruning space, sharing one set of weights.

    Build one from an unpruned checkpoint: ``Supernet(checkpoint)``; channels are sorted by
    ``criterion`` importance first. ``grid`` defaults to :meth:`WidthGrid.for_space` with
    ``fractions`` (and ``predictor``'s staircase), ``prior`` to the uniform prior.
    """

    def __init__(self, base: Checkpoint | str | Path, grid: WidthGrid | None = None,
                 prior: SamplingPrior | None = None, mode: str = "masked", criterion: str | None = "l1",
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, predictor=None,
                 _sorted: Mapping[str, list[int]] | None = None):
        super().__init__()
        ck = base if isinstance(base, Checkpoint) else Checkpoint.load(base)
        if ck.widths:
            raise HwpruneError(f"a supernet is built from an unpruned model; this {ck.arch} checkpoint is pruned",
                               hint="pass the checkpoint of the unpruned base model")
        spec = ck.build_model()
        check_supported(spec.module)
        self.arch, self.num_classes, self.input_size = ck.arch, ck.num_classes, tuple(ck.input_size)
        self.space = PruningSpace(copy.deepcopy(spec.module), spec.input_shape(1), name=ck.arch)
        self.base_hash = checkpoint_hash(ck)
        if _sorted is not None:  # the weights come sorted already (a saved supernet); record the order
            self.order = {g: list(p) for g, p in _sorted.items()}
        else:
            self.order = importance_order(self.space, spec.module, criterion) if criterion else {
                g.id: list(range(g.channels)) for g in self.space.groups}
            apply_order(spec.module, self.space, self.order)
            check_same_function(self.space.model, spec.module, spec.input_shape(2), "sorting channels by importance")
        self.criterion = criterion
        self.grid = grid or WidthGrid.for_space(self.space, fractions, predictor=predictor)
        self.grid.check_space(self.space)
        self.prior = prior or SamplingPrior.uniform(self.grid)
        self.meta: dict[str, Any] = {"base_hash": self.base_hash, "data": dict(ck.meta.get("data", {})),
                                     "criterion": criterion, "epochs_trained": 0}
        self._active = ActiveWidths(self.space.groups)
        self.net = spec.module
        make_elastic(self.net, self.space, self._active)
        self.mode = mode

    # -- configuration ---------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._active.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise HwpruneError(f"unknown supernet execution '{mode}'", hint=f"use one of {', '.join(MODES)}")
        if mode == "sliced":
            check_sliceable(self.net, self.space)
        self._active.mode = mode

    def set_widths(self, widths: WidthConfig | Mapping[str, int] | Sequence[WidthConfig | Mapping[str, int]]) -> None:
        """Run one configuration on the whole batch, or (a sequence) one per equal slice of it.

        Widths are any valid widths of the space (missing groups: full); they need not lie on the grid.
        """
        many = isinstance(widths, Sequence) and not isinstance(widths, (str, bytes))
        configs = list(widths) if many else [widths]
        if not configs:
            raise HwpruneError("set_widths needs at least one configuration")
        self._active.set([self.space.validate(c).widths for c in configs])

    @property
    def widths(self) -> list[WidthConfig]:
        """The active configuration of each slice."""
        return [WidthConfig(self.arch, dict(c)) for c in self._active.configs]

    # -- running ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *extra: torch.Tensor, fn=None) -> torch.Tensor:
        """The logits of the active configuration(s); with ``fn``, ``fn(self, x, *extra)`` run on
        every slice (all at once in masked execution) and concatenated along the batch.

        ``fn`` is how a training loss that needs more than the logits (stage-wise distillation)
        runs inside one forward call, as DistributedDataParallel requires.
        """
        a = self._active
        a.begin(x.shape[0])
        fn = fn or (lambda sn, xs, *_: sn.net(xs))
        if not a.sliced or len(a.configs) == 1:
            a.slice = None if not a.sliced else 0
            try:
                return fn(self, x, *extra)
            finally:
                a.slice = None
        outs = []
        try:
            for k, (s, e) in enumerate(a.bounds):
                a.slice = k
                outs.append(fn(self, x[s:e], *(t[s:e] for t in extra)))
        finally:
            a.slice = None
        return torch.cat(outs)

    def restrict(self, t: torch.Tensor, gid: str | None) -> torch.Tensor:
        """A full-width feature map of group ``gid`` as the current subnet holds it: masked beyond
        the width (masked execution) or cut to the kept channels (sliced)."""
        a = self._active
        if gid is None:
            return t
        if not a.sliced:
            return t * a.mask(gid, t)
        idx = a.kept(gid, a.current(), t.device)
        return t[:, idx] if isinstance(idx, slice) else t.index_select(1, idx)

    def kept_channels(self, gid: str | None, like: torch.Tensor) -> torch.Tensor:
        """Per sample of the current pass, how many channels of group ``gid`` the subnet keeps."""
        a = self._active
        if gid is None:
            return torch.full((like.shape[0],), float(like.shape[1]), device=like.device)
        if a.sliced:
            return torch.full((like.shape[0],), float(a.width(gid, a.current())), device=like.device)
        return a.mask(gid, like).reshape(like.shape[0], -1).sum(1)

    def slice_index(self, like: torch.Tensor) -> torch.Tensor:
        """Per sample of the current pass, the index of its slice (its configuration)."""
        a = self._active
        if a.sliced:
            return torch.full((like.shape[0],), a.current(), dtype=torch.long, device=like.device)
        ids = torch.empty(like.shape[0], dtype=torch.long, device=like.device)
        for k, (s, e) in enumerate(a.bounds):
            ids[s:e] = k
        return ids

    @contextlib.contextmanager
    def tracking_bn(self):
        """Let batch norms update their running statistics (what :func:`recalibrate_bn` needs)."""
        self._active.track_stats = True
        try:
            yield
        finally:
            self._active.track_stats = False

    # -- subnets -----------------------------------------------------------------------------
    def plain_model(self) -> nn.Module:
        """A plain (non-elastic) full-width copy of the current weights, in eval mode."""
        module = create_model(self.arch, num_classes=self.num_classes, input_size=self.input_size[1]).module
        module.load_state_dict(self.net.state_dict())
        return module.eval()

    def extract(self, widths: WidthConfig | Mapping[str, int]) -> nn.Module:
        """A physically smaller model at ``widths`` (the first channels of every group), in eval
        mode; it computes what the supernet computes at that configuration."""
        cfg = self.space.validate(widths)
        return self.space.apply(cfg, model=self.plain_model(), inplace=True).eval()

    def extract_checkpoint(self, widths: WidthConfig | Mapping[str, int], meta: Mapping | None = None) -> Checkpoint:
        """:meth:`extract` as a checkpoint (``hwprune train --checkpoint`` fine-tunes it)."""
        cfg = self.space.validate(widths)
        spec = ModelSpec(self.arch, self.extract(cfg), self.input_size, self.num_classes)
        info = {"data": self.meta.get("data", {}), "parent": {"supernet": self.base_hash}, **dict(meta or {})}
        return Checkpoint.from_model(spec, cfg.widths, info)

    def teacher(self, base: Checkpoint) -> nn.Module:
        """The frozen base model ``base`` with this supernet's channel order, in eval mode: the
        distillation teacher, whose feature maps line up channel for channel with the supernet's."""
        if checkpoint_hash(base) != self.base_hash:
            raise HwpruneError(f"the teacher checkpoint is not the base model this {self.arch} supernet was built from")
        t = apply_order(base.build_model().module, self.space, self.order).eval()
        for p in t.parameters():
            p.requires_grad_(False)
        return t

    # -- search --------------------------------------------------------------------------------
    def holdout_split(self, train):
        """(rest, held-out) of a training split, as recorded when the supernet was trained."""
        from hwprune.training.data import holdout_split

        h = self.meta.get("holdout") or {}
        if not h.get("per_class"):
            raise HwpruneError("this supernet records no held-out split", hint="train it with `hwprune supernet train`")
        return holdout_split(train, int(h["per_class"]), int(h.get("seed", 0)))

    def fitness_data(self, data, batch_size: int = 128, n_batches: int = BN_BATCHES, seed: int = 0,
                     device: str | torch.device | None = None) -> FitnessData:
        """Calibration batches (on ``device``, default the supernet's) and the held-out split of
        ``data`` (a path, or a training ImageDataset), normalised as the base model was trained."""
        from hwprune.training.data import ImageDataset, load_dataset

        train = data if isinstance(data, ImageDataset) else load_dataset(data, "train", image_size=self.input_size[1])
        norm = self.meta.get("data", {})
        if "mean" in norm and "std" in norm:
            train = train.with_normalization(norm["mean"], norm["std"])
        rest, held = self.holdout_split(train)
        device = device if device is not None else next(self.net.parameters()).device
        return FitnessData(calibration_batches(rest, batch_size, n_batches, seed, device=device), held)

    def proxy_accuracy(self, widths: WidthConfig | Mapping[str, int], fitness: FitnessData,
                       batch_size: int = 500) -> float:
        """Top-1 (percent) of the subnet ``widths`` on the held-out split, after recalibrating its BN."""
        from hwprune.training.train import evaluate

        self.set_widths(widths)
        recalibrate_bn(self, fitness.calibration, len(fitness.calibration))
        device = next(self.net.parameters()).device
        return float(evaluate(self, fitness.holdout, batch_size=batch_size, device=device)["top1"])

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the supernet atomically (see the module docstring for what it records)."""
        payload = {"format": FORMAT, "arch": self.arch, "num_classes": int(self.num_classes),
                   "input_size": [int(d) for d in self.input_size], "space": space_signature(self.space),
                   "grid": self.grid.to_dict(), "prior": json.loads(self.prior.to_json()), "order": self.order,
                   "mode": self.mode, "state_dict": {k: v.detach().cpu().contiguous()
                                                     for k, v in self.net.state_dict().items()},
                   "meta": json.loads(json.dumps(self.meta))}
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path, checkpoint: Checkpoint | str | Path | None = None,
             mode: str | None = None) -> "Supernet":
        """Read a supernet; with ``checkpoint``, check it was built from that base model."""
        raw = load_format(path, FORMAT, "supernet", "create one with `hwprune supernet train`")
        try:
            ck = Checkpoint(arch=str(raw["arch"]), state_dict=dict(raw["state_dict"]),
                            num_classes=int(raw["num_classes"]), input_size=tuple(raw["input_size"]),
                            meta={"data": raw["meta"].get("data", {})})
            grid, prior_doc, order = WidthGrid.from_dict(raw["grid"]), raw["prior"], raw["order"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HwpruneError(f"supernet {path} is incomplete: {e}", hint="the file is damaged; train it again") from None
        if checkpoint is not None:
            _check_base(path, raw, checkpoint)
        sn = cls(ck, grid=grid, prior=None, mode=mode or str(raw.get("mode", "masked")), criterion=None,
                 _sorted=order)
        if space_signature(sn.space) != raw["space"]:
            raise HwpruneError(f"supernet {path} was built over another pruning space of {sn.arch}",
                               hint="its channel groups differ from this version's; train it again")
        sn.prior = SamplingPrior.from_dict(prior_doc, grid)
        sn.criterion = raw["meta"].get("criterion")
        sn.meta = dict(raw["meta"])
        sn.base_hash = str(sn.meta.get("base_hash", ""))
        return sn


def _check_base(path, raw: dict, checkpoint: Checkpoint | str | Path) -> None:
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
    if ck.arch != raw["arch"]:
        raise HwpruneError(f"supernet {path} is a supernet of {raw['arch']}, not of {ck.arch}",
                           hint="pass the base checkpoint it was trained from")
    if checkpoint_hash(ck) != raw["meta"].get("base_hash"):
        raise HwpruneError(f"supernet {path} was trained from another {ck.arch} checkpoint (hash "
                           f"{raw['meta'].get('base_hash')}, not {checkpoint_hash(ck)})",
                           hint="pass the base checkpoint it was trained from")


def calibration_batches(dataset, batch_size: int = 128, n_batches: int = BN_BATCHES, seed: int = 0,
                        device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """``n_batches`` shuffled, un-augmented batches of ``dataset`` images, drawn once so that every
    subnet is recalibrated on the same images."""
    from hwprune.training.data import BatchLoader

    loader = BatchLoader(dataset, min(batch_size, len(dataset)), shuffle=True, seed=seed, drop_last=True,
                         device=device)
    out = []
    for x, _ in loader:
        if len(out) >= n_batches:
            break
        out.append(x)
    if not out:
        raise HwpruneError(f"no calibration batch of {batch_size} images in a split of {len(dataset)}")
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, n_batches: int = BN_BATCHES) -> int:
    """Reset and recompute the BN running statistics of ``model`` (a :class:`Supernet` at its
    current configuration, or any model) as the cumulative average over ``n_batches`` batches,
    with every other layer in eval mode. ``batches`` yields input tensors or ``(x, y)`` pairs.
    Returns the number of batches used; the model's train/eval modes are restored."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    track = model.tracking_bn() if isinstance(model, Supernet) else contextlib.nullcontext()
    try:
        with track:
            for batch in batches:
                if used >= n_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                used += 1
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, was in modes.items():
            m.train(was)
    if used == 0:
        raise HwpruneError("no batches to recalibrate the BN statistics with")
    return used
