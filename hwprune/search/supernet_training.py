"""Training a supernet: which subnets each step trains, and what they learn from.

A *mode* (:data:`MODES`) decides which subnets a step trains:

* ``sandwich`` (universally slimmable networks): the widest, the narrowest and
  ``random_per_step`` random subnets, one pass each over the whole batch, gradients summed
  before one optimizer step;
* ``parallel`` (PSE-Net): the batch is split into ``parallel`` = K slices, each with its own
  configuration (the widest, the narrowest and K - 2 random ones), in one forward and backward
  pass; every slice is batch-normalised on its own;
* ``stage`` (SP): the sandwich schedule with stage-wise distillation (``distill="stage"``,
  which it requires).

A *distillation* (:data:`DISTILLERS`) decides the loss of a subnet:

* ``teacher``: the frozen base model's logits on the whole batch,
  ``alpha * T^2 * KL(teacher/T || subnet/T) + (1 - alpha) * cross-entropy``;
* ``inplace``: the widest subnet learns from the labels (cross-entropy), the others from its
  detached logits as above (in the parallel mode the widest logits over the whole batch come
  from an extra pass without gradients);
* ``stage``: every stage (:mod:`hwprune.search.stages`) of the subnet reads the base model's
  output of the previous stage and learns to reproduce the base model's output of its own
  stage (mean squared error over the channels the subnet keeps; the head learns the
  teacher's logits as above). Where a stage's output width is pruned, the subnet's first
  ``w`` channels are compared with the teacher's first ``w``: the channels were sorted by
  importance, so those are the channels the subnet keeps, and no adapter has to be trained
  and thrown away.

Random subnets come from the grid (uniform) until the sampling prior has seen
``prior_warmup`` subnets, then from the prior with probability ``prior_share``. Every trained
subnet teaches the prior its loss (with stage-wise distillation each group its stages' loss)
and its FLOPs fraction.

The held-out split of the training set (``holdout`` images per class) is never trained on:
the search scores subnets on it. Training resumes from ``<out>.state.pt`` (written after every
epoch), logs one JSON line per epoch to ``<out>.log.jsonl``, runs under bf16 autocast where the
CPU supports it (AMP on CUDA) and scales out with torchrun (:mod:`hwprune.search.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hwprune.atomic import check_writable
from hwprune.errors import HwpruneError
from hwprune.pruning.objectives import FlopsCost
from hwprune.pruning.space import WidthConfig
from hwprune.registry import Registry
from hwprune.search import distributed as dist_
from hwprune.search.elastic import MODES as EXECUTIONS
from hwprune.search.grid import DEFAULT_FRACTIONS, check_fractions
from hwprune.search.stages import model_stages
from hwprune.search.supernet import FitnessData, Supernet, space_signature
from hwprune.training.checkpoint import Checkpoint, atomic_torch_save, safe_torch_load
from hwprune.training.data import ImageDataset, Splits, holdout_split, load_dataset
from hwprune.training.train import (PRECISIONS, _amp_dtype, _autocast, _device, _lr_at, _progress_bar, log_path_for,
                                    state_path_for)

STATE_FORMAT = "hwprune.supernetstate/1"
MODES: Registry = Registry("supernet training mode")
DISTILLERS: Registry = Registry("distillation")


@dataclass
class SupernetConfig:
    """Supernet training recipe (see the module docstring for ``mode`` and ``distill``).

    ``lr`` is the peak learning rate (default 0.05 scaled with the batch size, a fine-tuning
    rate: the supernet starts from trained weights), cosine-decayed after ``warmup_epochs``.
    ``execution`` "auto" runs masked on CUDA and sliced on a CPU. ``max_iters`` caps the steps
    of each epoch (smoke tests). ``holdout`` images per class (seed ``holdout_seed``) are held
    out of the training split for the search.
    """

    epochs: int = 30
    lr: float | None = None
    batch_size: int = 128
    mode: str = "sandwich"
    parallel: int = 4
    random_per_step: int = 2
    distill: str = "teacher"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    seed: int = 0
    threads: int | None = None
    max_iters: int | None = None
    holdout: int = 200
    holdout_seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    temperature: float = 4.0
    alpha: float = 0.9
    execution: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    criterion: str = "l1"
    prior_share: float = 0.5
    prior_warmup: int = 20
    dist_timeout: float = 120.0  # seconds the processes of a torchrun world wait for each other

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 0.05 * self.batch_size / 128

    def validate(self) -> None:
        """One-line errors for every setting out of range, before any work."""
        mode = MODES.get(self.mode)
        DISTILLERS.get(self.distill)
        if self.epochs < 1 or self.batch_size < 1:
            raise HwpruneError(f"epochs and batch size must be positive (got {self.epochs}, {self.batch_size})")
        if self.random_per_step < 0:
            raise HwpruneError(f"random subnets per step must be 0 or more, got {self.random_per_step}")
        mode.check(self)
        if getattr(mode, "distill", None) and self.distill != mode.distill:
            raise HwpruneError(f"mode '{self.mode}' trains with --distill {mode.distill}, not {self.distill}")
        if self.execution not in (*EXECUTIONS, "auto"):
            raise HwpruneError(f"unknown supernet execution '{self.execution}'", hint="use auto, masked or sliced")
        if self.precision not in PRECISIONS:
            raise HwpruneError(f"unknown precision '{self.precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
        if self.holdout < 0 or not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise HwpruneError("holdout must be >= 0, alpha in [0, 1] and the temperature positive")
        if self.max_iters is not None and self.max_iters < 1:
            raise HwpruneError(f"max iterations must be positive, got {self.max_iters}")
        self.fractions = check_fractions(self.fractions)

    def identity(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        keys = ("mode", "parallel", "random_per_step", "distill", "fractions", "seed", "holdout", "holdout_seed",
                "batch_size", "criterion")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}


# ----------------------------------------------------------------------------- subnets per step


class Sampler:
    """Draws the subnets of a step: the grid's extremes, and random ones from the grid or the prior."""

    def __init__(self, sn: Supernet, cfg: SupernetConfig):
        self.sn, self.cfg = sn, cfg

    def random(self, rng: np.random.Generator) -> WidthConfig:
        prior = self.sn.prior
        if prior.has_data(self.cfg.prior_warmup) and rng.random() < self.cfg.prior_share:
            return prior.sample(rng)
        return self.sn.grid.random(rng)

    def sandwich(self, n_random: int, rng: np.random.Generator) -> list[WidthConfig]:
        return [self.sn.grid.full(), self.sn.grid.narrowest(), *(self.random(rng) for _ in range(n_random))]


@MODES.register("sandwich", "widest, narrowest and random subnets, one pass each, gradients summed")
class SandwichMode:
    @staticmethod
    def check(cfg: SupernetConfig) -> None:
        pass

    @staticmethod
    def passes(sampler: Sampler, cfg: SupernetConfig, rng) -> list[list[WidthConfig]]:
        return [[c] for c in sampler.sandwich(cfg.random_per_step, rng)]


@MODES.register("parallel", "PSE-Net: K subnets on K slices of the batch in one pass")
class ParallelMode:
    @staticmethod
    def check(cfg: SupernetConfig) -> None:
        k = cfg.parallel
        if k < 2:
            raise HwpruneError(f"--parallel must be at least 2 (the widest and the narrowest subnet), got {k}")
        if cfg.batch_size % k:
            raise HwpruneError(f"the batch size {cfg.batch_size} does not split into {k} equal slices",
                               hint="choose a batch size that is a multiple of --parallel")

    @staticmethod
    def passes(sampler: Sampler, cfg: SupernetConfig, rng) -> list[list[WidthConfig]]:
        return [sampler.sandwich(cfg.parallel - 2, rng)]


@MODES.register("stage", "SP: the sandwich schedule with every stage distilled from the base model's stages")
class StageMode(SandwichMode):
    distill = "stage"


# ----------------------------------------------------------------------------- losses


def kd_per_sample(logits: torch.Tensor, target: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 * KL(softmax(target/T) || softmax(logits/T))`` per sample."""
    lt = F.log_softmax(target.float() / t, 1)
    return (lt.exp() * (lt - F.log_softmax(logits.float() / t, 1))).sum(1) * t * t


class Distiller:
    """What a subnet learns from: per-sample loss terms, and which groups each term credits."""

    needs_teacher = True

    def __init__(self, trainer: "SupernetTrainer"):
        self.tr, self.cfg = trainer, trainer.cfg

    def start_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Compute what every pass of the step shares (the teacher's outputs)."""

    def extras(self, configs: Sequence[WidthConfig]) -> tuple[torch.Tensor, ...]:
        return ()

    def terms(self, sn: Supernet, x: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def credits(self, sn: Supernet) -> dict[str, list[int]]:
        """Per group, the loss terms that credit it (all terms by default)."""
        return {g: [0] for g in sn.grid.groups}

    def mixed(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing, reduction="none")
        return self.cfg.alpha * kd_per_sample(logits, target, self.cfg.temperature) + (1 - self.cfg.alpha) * ce


@DISTILLERS.register("teacher", "knowledge distillation from the frozen base model's logits")
class TeacherDistiller(Distiller):
    def start_step(self, x, y):
        with torch.no_grad(), self.tr.autocast():
            self.target = self.tr.teacher(x).float()

    def extras(self, configs):
        return (self.target,)

    def terms(self, sn, x, y, *extra):
        return self.mixed(sn.net(x), y, extra[0])[:, None]


@DISTILLERS.register("inplace", "in-place distillation: the widest subnet teaches the others")
class InPlaceDistiller(Distiller):
    needs_teacher = False

    def start_step(self, x, y):
        self.target, self.x = None, x

    def extras(self, configs):
        full = self.tr.sn.grid.full().widths
        if len(configs) == 1 and configs[0].widths == full and self.target is None:
            return ()  # this pass is the widest subnet over the whole batch: it makes the target
        if self.target is None:
            sn = self.tr.sn
            keep = sn.widths
            sn.set_widths(full)
            with torch.no_grad(), self.tr.autocast():
                self.target = sn(self.x).float()
            sn.set_widths(keep)
        return (self.target,)

    def terms(self, sn, x, y, *extra):
        logits = sn.net(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing, reduction="none")
        if not extra:
            self.target = logits.detach().float()
            return ce[:, None]
        widest = torch.tensor([c == sn.grid.full().widths for c in sn._active.configs], device=x.device)
        return torch.where(widest[sn.slice_index(x)], ce, self.mixed(logits, y, extra[0]))[:, None]


@DISTILLERS.register("stage", "SP stage-wise distillation: each stage reproduces the base model's stage")
class StageDistiller(Distiller):
    def __init__(self, trainer):
        super().__init__(trainer)
        self.stages = model_stages(trainer.teacher, trainer.sn.space, (2, *trainer.sn.input_size))

    def start_step(self, x, y):
        outs, h = [], x
        with torch.no_grad(), self.tr.autocast():
            for st in self.stages:
                h = st.run(self.tr.teacher, h)
                outs.append(h.float())
        self.target = tuple(outs)  # every stage's output; the last is the logits

    def extras(self, configs):
        return self.target

    def terms(self, sn, x, y, *extra):
        cols, last = [], len(self.stages) - 1
        for s, st in enumerate(self.stages):
            h = st.run(sn.net, x if s == 0 else sn.restrict(extra[s - 1], st.in_gid)).float()
            if s == last:
                cols.append(self.mixed(h, y, extra[s]))
                continue
            diff = (h - sn.restrict(extra[s], st.out_gid)).square().flatten(1).sum(1)
            cols.append(diff / (sn.kept_channels(st.out_gid, h) * h[0, 0].numel()))
        return torch.stack(cols, 1)

    def credits(self, sn):
        owners = [set(st.modules(sn.net)) for st in self.stages]
        return {g.id: [s for s, mods in enumerate(owners) if mods & set(g.modules)] or [len(self.stages) - 1]
                for g in sn.space.groups}


# ----------------------------------------------------------------------------- the run


@dataclass
class _Progress:
    epoch: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class SupernetTrainer:
    """One supernet training run; :func:`train_supernet` is its entry point."""

    def __init__(self, ck: Checkpoint, splits: Splits, cfg: SupernetConfig, out: Path, world: dist_.World,
                 progress: bool, predictor=None):
        self.cfg, self.out, self.world, self.progress = cfg, out, world, progress
        self.device = world.device(_device(cfg.device))
        self.amp = _amp_dtype(cfg.precision, self.device)
        self.channels_last = self.amp is not None or self.device.type == "cuda"
        execution = cfg.execution if cfg.execution != "auto" else ("masked" if self.device.type == "cuda" else "sliced")
        sn = Supernet(ck, mode=execution, criterion=cfg.criterion, fractions=cfg.fractions, predictor=predictor)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.sn = sn.to(device=self.device, memory_format=fmt)
        self.teacher = sn.teacher(ck).to(device=self.device, memory_format=fmt)
        self.distiller: Distiller = DISTILLERS.get(cfg.distill)(self)
        self.mode, self.sampler = MODES.get(cfg.mode), Sampler(self.sn, cfg)
        self.flops = FlopsCost(sn.space)
        self.rest, self.held = holdout_split(splits.train, cfg.holdout, cfg.holdout_seed) if cfg.holdout else (
            splits.train, None)
        self.loader = dist_.ShardedBatchLoader(self.rest, cfg.batch_size, world, shuffle=True, augment=True,
                                               seed=cfg.seed, drop_last=True, device=self.device,
                                               channels_last=self.channels_last)
        if len(self.loader) == 0:
            raise HwpruneError(f"the training split has {len(self.rest)} images after the hold-out, fewer than one "
                               f"batch of {cfg.batch_size} per process", hint="lower --batch-size or --holdout")
        self.model = world.wrap(self.sn, self.device)
        self.optimizer = torch.optim.SGD(self.sn.parameters(), lr=cfg.peak_lr(), momentum=cfg.momentum,
                                         nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.credits = self.distiller.credits(self.sn)
        self.state = _Progress()
        self.identity = {"arch": ck.arch, "base_hash": sn.base_hash, "space": space_signature(sn.space),
                         "world": world.size, "config": cfg.identity()}

    def autocast(self):
        return _autocast(self.device, self.amp)

    # -- one step ------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> list[tuple[WidthConfig, np.ndarray]]:
        """Train the step's subnets; returns each subnet's configuration and its mean loss terms."""
        plan = self._agree(self.mode.passes(self.sampler, self.cfg, rng))
        self.distiller.start_step(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        trained = []
        for i, configs in enumerate(plan):
            extra = self.distiller.extras(configs)
            self.sn.set_widths(configs)
            with (self.world.no_sync(self.model) if i < len(plan) - 1 else contextlib.nullcontext()):
                with self.autocast():
                    terms = self.model(x, y, *extra, fn=self.distiller.terms).float()
                means = torch.stack([terms[s:e].mean(0) for s, e in self.sn._active.bounds])
                loss = means.sum()
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            trained += list(zip(configs, means.detach()))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return self._teach_prior(trained)

    def _agree(self, plan: list[list[WidthConfig]]) -> list[list[WidthConfig]]:
        """Rank 0's plan on every rank (each rank drew the same one from the same seed)."""
        if not self.world.distributed:
            return plan
        groups = self.sn.grid.groups
        flat = [c.widths for p in plan for c in p]
        t = self.world.broadcast(dist_.encode_configs(flat, groups, self.device))
        it = iter(dist_.decode_configs(t, groups))
        return [[WidthConfig(self.sn.arch, next(it)) for _ in p] for p in plan]

    def _teach_prior(self, trained):
        means = self.world.mean(torch.stack([m for _, m in trained])).cpu().numpy()
        sizes = self.flops.total([c for c, _ in trained]) / float(self.flops.total([self.sn.grid.full()])[0])
        for (cfg, _), m, size in zip(trained, means, sizes):
            if self.sn.grid.contains(cfg):
                loss = {g: float(m[idx].sum()) for g, idx in self.credits.items()}
                self.sn.prior.update(cfg, loss, size=float(size))
        return [(cfg, m) for (cfg, _), m in zip(trained, means)]

    # -- epochs ----------------------------------------------------------------------------
    def run(self) -> Supernet:
        cfg = self.cfg
        steps = min(len(self.loader), cfg.max_iters or len(self.loader))
        total, warmup = steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))
        for epoch in range(self.state.epoch, cfg.epochs):
            t0, losses = time.perf_counter(), []
            self.loader.set_epoch(epoch)
            self.sn.train()
            with _progress_bar(self.progress and self.world.main, f"supernet epoch {epoch + 1}/{cfg.epochs}",
                               steps) as advance:
                for i, (x, y) in enumerate(self.loader):
                    if i >= steps:
                        break
                    lr = _lr_at(epoch * steps + i, total, warmup, cfg.peak_lr(), "cosine")
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    losses.append(self.step(x, y, np.random.default_rng([cfg.seed, epoch, i])))
                    advance()
            self._end_epoch(epoch, losses, lr, time.perf_counter() - t0)
        return self.sn

    def _end_epoch(self, epoch: int, losses: list, lr: float, seconds: float) -> None:
        per_subnet = [[float(m.sum()) for _, m in step] for step in losses]
        record = {"epoch": epoch + 1, "loss": round(float(np.mean([sum(s) / len(s) for s in per_subnet])), 5),
                  "loss_widest": round(float(np.mean([s[0] for s in per_subnet])), 5),
                  "loss_narrowest": round(float(np.mean([s[1] for s in per_subnet])), 5),
                  "steps": len(losses), "lr": lr, "seconds": round(seconds, 2)}
        self.state.epoch, self.state.seconds = epoch + 1, self.state.seconds + seconds
        self.state.history.append(record)
        if self.world.main:
            self.save_state()
            with log_path_for(self.out).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.progress:
                from hwprune.training.train import _console

                _console.print(f"supernet epoch {epoch + 1}/{self.cfg.epochs}  loss {record['loss']:.4f}  widest "
                               f"{record['loss_widest']:.4f}  narrowest {record['loss_narrowest']:.4f}  lr {lr:.4g}  "
                               f"{seconds:.1f}s", highlight=False)
        self.world.barrier()

    # -- state -------------------------------------------------------------------------------
    def save_state(self) -> None:
        state = {"format": STATE_FORMAT, **self.identity, "epoch": self.state.epoch, "seconds": self.state.seconds,
                 "history": self.state.history,
                 "supernet": {k: v.detach().cpu().contiguous() for k, v in self.sn.net.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "prior": json.loads(self.sn.prior.to_json()),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        atomic_torch_save(state, state_path_for(self.out))

    def restore(self, path: Path) -> None:
        state = safe_torch_load(path, "supernet training state")
        hint = f"delete {path} or pass --no-resume to start over"
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise HwpruneError(f"{path} is not an hwprune supernet training state", hint=hint)
        for key, value in self.identity.items():
            if state.get(key) != value:
                raise HwpruneError(f"{path} belongs to another supernet run ({key} differs)", hint=hint)
        from hwprune.search.prior import SamplingPrior

        try:
            self.sn.net.load_state_dict(state["supernet"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.sn.prior = SamplingPrior.from_dict(state["prior"], self.sn.grid)
            self.state = _Progress(int(state["epoch"]), float(state["seconds"]), list(state.get("history", [])))
        except (KeyError, RuntimeError, ValueError) as e:
            raise HwpruneError(f"cannot resume from {path}: {str(e).splitlines()[0]}", hint=hint) from None
        self.sampler = Sampler(self.sn, self.cfg)

    def finish(self) -> Supernet:
        """Record the run in the supernet, score the widest and narrowest subnets on the held-out
        split, and (rank 0) write the supernet file."""
        sn, cfg = self.sn, self.cfg
        sn.meta.update({"epochs_trained": self.state.epoch, "training": {**asdict(cfg), "peak_lr": cfg.peak_lr(),
                        "world": self.world.size, "device": str(self.device), "seconds": round(self.state.seconds, 2),
                        "precision": "fp32" if self.amp is None else str(self.amp).removeprefix("torch.")},
                        "holdout": {"per_class": cfg.holdout, "seed": cfg.holdout_seed,
                                    "size": 0 if self.held is None else len(self.held)},
                        "history": self.state.history})
        if self.world.main:
            top1 = self._score_extremes()
            if top1:
                sn.meta["holdout_top1"] = top1
            sn.save(self.out)
        self.world.barrier()
        return sn

    def _score_extremes(self) -> dict[str, float]:
        """Held-out top-1 of the narrowest and the widest subnet (none without a held-out split); the
        widest is recalibrated last either way, so that the saved running statistics are its own."""
        from hwprune.search.supernet import BN_BATCHES, calibration_batches, recalibrate_bn

        sn = self.sn
        batches = calibration_batches(self.rest, self.cfg.batch_size, BN_BATCHES, self.cfg.seed, device=self.device)
        if self.held is None:
            sn.set_widths(sn.grid.full())
            recalibrate_bn(sn, batches, len(batches))
            return {}
        fit = FitnessData(batches, self.held)
        out = {name: sn.proxy_accuracy(c, fit) for name, c in (("narrowest", sn.grid.narrowest()),
                                                                ("widest", sn.grid.full()))}
        return {"widest": out["widest"], "narrowest": out["narrowest"]}


def train_supernet(checkpoint: Checkpoint | str | Path, data: str | Path | Splits | ImageDataset, config: SupernetConfig,
                   out: str | Path, progress: bool = True, resume: bool = True, predictor=None) -> Supernet:
    """Train a supernet of the unpruned ``checkpoint`` on the training split of ``data`` and write it to ``out``.

    ``predictor`` (a latency predictor of the target device) moves the width grid along the
    device's staircase. With ``resume`` an existing ``<out>.state.pt`` of the same run
    continues. Under torchrun every rank trains its shard; rank 0 writes the files.
    """
    config.validate()
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
    out = Path(out)
    check_writable(out)
    train = data.train if isinstance(data, Splits) else data if isinstance(data, ImageDataset) else load_dataset(
        data, "train", image_size=ck.input_size[1])
    splits = _normalised(train, ck)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    world = dist_.world_from_env(_device(config.device), timeout_s=config.dist_timeout)
    try:
        tr = SupernetTrainer(ck, splits, config, out, world, progress, predictor)
        state = state_path_for(out)
        if resume and state.exists():
            tr.restore(state)
        elif world.main:
            log_path_for(out).write_text("")
        tr.run()
        return tr.finish()
    finally:
        dist_.close(world)


def _normalised(train: ImageDataset, ck: Checkpoint) -> Splits:
    """The training split with the normalisation the base model was trained with."""
    norm = ck.meta.get("data", {})
    if "classes" in norm and list(norm["classes"]) != list(train.classes):
        raise HwpruneError(f"the {ck.arch} checkpoint was trained on other classes than the data's",
                           hint="train the supernet on the data the base model was trained on")
    if "mean" in norm and "std" in norm:
        train = train.with_normalization(norm["mean"], norm["std"])
    return Splits(train, None)


__all__ = ["DISTILLERS", "MODES", "SupernetConfig", "SupernetTrainer", "train_supernet"]
