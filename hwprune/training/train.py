"""Training, fine-tuning and evaluation of image classifiers.

:func:`train` runs SGD (Nesterov momentum, label smoothing, cosine or one-cycle learning
rate, optional knowledge distillation from a teacher checkpoint) and is resumable: after
every epoch it writes ``<out>.state.pt`` (weights, optimizer, epoch, RNG state; plain
tensors and numbers, readable with ``weights_only=True``) and appends one JSON line to
``<out>.log.jsonl``. The final weights go to ``<out>`` as a :class:`~hwprune.training.checkpoint.Checkpoint`.
Fine-tuning a pruned model is the same call with a checkpoint as input: its widths and
meta carry over.

On a CPU with bfloat16 support (AVX-512 BF16 / AMX) training runs under
``torch.autocast("cpu", dtype=torch.bfloat16)``, in channels-last or NCHW tensors, whichever
a short probe finds faster for the model (:mod:`hwprune.training.memory_format`: a pruned
network's odd widths can make channels-last several times slower); on CUDA under automatic
mixed precision (bf16 where supported, else fp16 with loss scaling) with channels-last.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hwprune.training.checkpoint import Checkpoint, atomic_torch_save, safe_torch_load
from hwprune.training.data import BatchLoader, ImageDataset, Splits
from hwprune.training.memory_format import fastest_format
from hwprune.errors import HwpruneError
from hwprune.models import ModelSpec

STATE_FORMAT = "hwprune.trainstate/1"
SCHEDULES = ("cosine", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

_console = Console(stderr=True)


@dataclass
class TrainConfig:
    """Training recipe.

    ``lr`` is the peak learning rate; ``None`` means 0.1 scaled linearly with the batch
    size (0.1 at 128). ``schedule`` "cosine" warms up linearly for ``warmup_epochs`` then
    decays to zero; "onecycle" ramps from lr/25 over the first 30% of steps, then anneals
    to lr/1e4. With ``teacher`` (a checkpoint path) the loss is
    ``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy``.
    ``precision`` "auto" picks bf16 autocast where the device supports it.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    teacher: str | None = None
    distill_temperature: float = 4.0
    distill_alpha: float = 0.9
    seed: int = 0
    threads: int | None = None
    precision: str = "auto"
    device: str = "auto"
    eval_every: int = 5

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 0.1 * self.batch_size / 128

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise HwpruneError(f"epochs and batch size must be positive (got {self.epochs}, {self.batch_size})")
        if self.schedule not in SCHEDULES:
            raise HwpruneError(f"unknown schedule '{self.schedule}'", hint=f"use one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise HwpruneError(f"unknown precision '{self.precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise HwpruneError(f"distillation alpha must lie in [0, 1], got {self.distill_alpha}")


@dataclass
class TrainResult:
    """Where a training run left its files and how well the final model does on the test split."""

    checkpoint: Path
    state_path: Path
    log_path: Path
    epochs: int
    top1: float | None
    top5: float | None
    seconds: float


def state_path_for(out: str | Path) -> Path:
    """``runs/x.pt`` -> ``runs/x.state.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".state.pt") if out.suffix else out.with_name(out.name + ".state.pt")


def log_path_for(out: str | Path) -> Path:
    """``runs/x.pt`` -> ``runs/x.log.jsonl``."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix else out.name) + ".log.jsonl")


def train(model: ModelSpec | Checkpoint, data: Splits, cfg: TrainConfig, out_path: str | Path,
          resume: bool = True, progress: bool = True) -> TrainResult:
    """Train ``model`` on ``data.train`` and write the final checkpoint to ``out_path``.

    ``model`` is a freshly built :class:`ModelSpec` or a :class:`Checkpoint` to fine-tune.
    With ``resume`` an existing ``<out>.state.pt`` from the same model continues where it
    stopped. Accuracy on ``data.test`` (if any) is measured every ``cfg.eval_every``
    epochs, after the first epoch and at the end.
    """
    cfg.validate()
    out_path, state_path, log_path = Path(out_path), state_path_for(out_path), log_path_for(out_path)
    spec, widths, parent_meta, data = _unpack_model(model, data)
    _check_fit(spec, data.train)
    loop = _setup_loop(spec, widths, data.train, cfg)
    start_epoch, seconds = _start_or_resume(loop, out_path, state_path, log_path, resume, progress)
    top1 = top5 = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        record = _train_epoch(loop, epoch, progress)
        last = epoch + 1 == cfg.epochs
        if data.test is not None and (epoch == 0 or last or (epoch + 1) % max(1, cfg.eval_every) == 0):
            top1, top5 = _test_accuracy(loop, data.test)
            record.update(test_top1=top1, test_top5=top5)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        seconds += record["seconds"]
        _save_state(state_path, loop.identity, spec, loop.net, loop.optimizer, loop.scaler, epoch + 1, seconds, cfg)
        _log_epoch(log_path, record, cfg, progress)

    if top1 is None and data.test is not None:  # resumed after the last epoch: measure again
        top1, top5 = _test_accuracy(loop, data.test)
    meta = _final_meta(parent_meta, data.train, cfg, top1, top5, seconds, loop.device, loop.amp_dtype)
    Checkpoint.from_model(ModelSpec(spec.name, loop.net, spec.input_size, spec.num_classes), widths, meta).save(out_path)
    return TrainResult(checkpoint=out_path, state_path=state_path, log_path=log_path, epochs=cfg.epochs,
                       top1=top1, top5=top5, seconds=round(seconds, 2))


@dataclass
class _Loop:
    """What every epoch of one training run uses."""

    cfg: TrainConfig
    net: torch.nn.Module
    teacher: torch.nn.Module | None
    loader: BatchLoader
    optimizer: torch.optim.Optimizer
    scaler: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    identity: dict  # what a saved state must match to be resumed

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total_steps(self) -> int:
        return len(self.loader) * self.cfg.epochs

    @property
    def warmup_steps(self) -> int:
        return int(round(self.cfg.warmup_epochs * len(self.loader)))


def _unpack_model(model: ModelSpec | Checkpoint, data: Splits) -> tuple[ModelSpec, dict | None, dict, Splits]:
    """(spec, widths, parent meta, data): a checkpoint's data keeps the normalisation it was trained with."""
    if not isinstance(model, Checkpoint):
        return model, None, {}, data
    spec, widths, parent_meta = model.build_model(), model.widths, dict(model.meta)
    norm = parent_meta.get("data", {})
    if "mean" in norm and "std" in norm:
        data = Splits(data.train.with_normalization(norm["mean"], norm["std"]),
                      data.test.with_normalization(norm["mean"], norm["std"]) if data.test is not None else None)
    return spec, widths, parent_meta, data


def _setup_loop(spec: ModelSpec, widths: dict | None, train_set: ImageDataset, cfg: TrainConfig) -> _Loop:
    """Seed, place the model (and teacher) on the device, build the loader, optimizer and loss scaler."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    amp_dtype = _amp_dtype(cfg.precision, device)
    memory_format = fastest_format(spec.module, spec.input_size, device, amp_dtype)
    channels_last = memory_format == torch.channels_last
    net = spec.module.to(device=device, memory_format=memory_format)
    teacher = _load_teacher(cfg, spec, device, amp_dtype)

    loader = BatchLoader(train_set, cfg.batch_size, shuffle=True, augment=True, seed=cfg.seed, drop_last=True,
                         device=device, channels_last=channels_last)
    if len(loader) == 0:
        raise HwpruneError(f"the training split has {len(train_set)} images, fewer than one batch of {cfg.batch_size}",
                           hint="lower --batch-size")
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.peak_lr(), momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    identity = {"arch": spec.name, "widths": widths, "num_classes": spec.num_classes}
    return _Loop(cfg=cfg, net=net, teacher=teacher, loader=loader, optimizer=optimizer, scaler=scaler,
                 device=device, amp_dtype=amp_dtype, identity=identity)


def _start_or_resume(loop: _Loop, out_path: Path, state_path: Path, log_path: Path, resume: bool,
                     progress: bool) -> tuple[int, float]:
    """(first epoch, seconds already spent): restored from ``state_path``, or 0 with an empty log."""
    if resume and state_path.exists():
        start_epoch, seconds = _restore(state_path, loop.identity, loop.net, loop.optimizer, loop.scaler,
                                        loop.device)
        if progress:
            _console.print(f"resuming {out_path} from epoch {start_epoch} ({state_path})")
        return start_epoch, seconds
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    return 0, 0.0


def _train_epoch(loop: _Loop, epoch: int, progress: bool) -> dict[str, Any]:
    """One pass over the training split; the epoch's log record (test accuracy not yet measured)."""
    cfg, net, optimizer, scaler = loop.cfg, loop.net, loop.optimizer, loop.scaler
    steps_per_epoch, total_steps, warmup_steps = loop.steps_per_epoch, loop.total_steps, loop.warmup_steps
    loop.loader.set_epoch(epoch)
    net.train()
    loss_sum = torch.zeros((), device=loop.device)
    correct = torch.zeros((), device=loop.device, dtype=torch.long)
    seen = 0
    with _progress_bar(progress, f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch) as advance:
        for i, (x, y) in enumerate(loop.loader):
            lr = _lr_at(epoch * steps_per_epoch + i, total_steps, warmup_steps, cfg.peak_lr(), cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(loop.device, loop.amp_dtype):
                logits = net(x)
                t_logits = loop.teacher(x) if loop.teacher is not None else None
            loss = _loss(logits.float(), y, cfg, None if t_logits is None else t_logits.float())
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
            advance()
    return {"epoch": epoch + 1, "train_loss": round(loss_sum.item() / seen, 5),
            "train_acc": round(100.0 * correct.item() / seen, 3), "test_top1": None, "test_top5": None, "lr": lr}


def _test_accuracy(loop: _Loop, test: ImageDataset) -> tuple[float, float]:
    acc = evaluate(loop.net, test, batch_size=max(loop.cfg.batch_size, 256), device=loop.device)
    return acc["top1"], acc["top5"]


def _log_epoch(log_path: Path, record: dict[str, Any], cfg: TrainConfig, progress: bool) -> None:
    """Append the epoch's record to the JSON-lines log and print one line."""
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if progress:
        test = f"  test {record['test_top1']:.2f}%" if record["test_top1"] is not None else ""
        _console.print(f"epoch {record['epoch']}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                       f"acc {record['train_acc']:.2f}%{test}  lr {record['lr']:.4g}  {record['seconds']:.1f}s",
                       highlight=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ImageDataset, batch_size: int = 500,
             device: str | torch.device | None = None) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``dataset``, in float32.

    Runs on ``device`` (default: where the model's parameters are) and restores the
    model's train/eval mode afterwards.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    channels_last = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                        for p in model.parameters())
    top1 = top5 = 0
    k = min(5, len(dataset.classes))
    try:
        for x, y in BatchLoader(dataset, batch_size, device=device, channels_last=channels_last):
            pred = model(x).topk(k, dim=1).indices
            hit = pred == y[:, None]
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(1).sum())
    finally:
        model.train(was_training)
    n = len(dataset)
    return {"top1": round(100.0 * top1 / n, 3), "top5": round(100.0 * top5 / n, 3), "n": n}


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast is fast on ``device`` (CPU: oneDNN bf16 kernels, CUDA: Ampere or newer)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HwpruneError("CUDA was requested but no CUDA device is available", hint="use --device cpu")
    return device


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise HwpruneError("fp16 training needs a CUDA device", hint="use bf16 or fp32 on the CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _lr_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if schedule == "onecycle":
        ramp = max(1, int(0.3 * total))
        start, end = peak / 25, peak / 1e4
        if step < ramp:
            return start + (peak - start) * (1 - math.cos(math.pi * step / ramp)) / 2
        return end + (peak - end) * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp))) / 2
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) / 2


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return ce
    t = cfg.distill_temperature
    kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                  reduction="batchmean", log_target=True) * t * t
    return cfg.distill_alpha * kd + (1 - cfg.distill_alpha) * ce


def _check_fit(spec: ModelSpec, train: ImageDataset) -> None:
    if spec.num_classes != len(train.classes):
        raise HwpruneError(f"{spec.name} has {spec.num_classes} outputs but the data has {len(train.classes)} classes",
                           hint="build the model with the data's number of classes")
    if tuple(spec.input_size) != train.input_size:
        raise HwpruneError(f"{spec.name} expects {spec.input_size[1]}x{spec.input_size[2]} inputs but the images are "
                           f"{train.input_size[1]}x{train.input_size[2]}", hint="pass --image-size to resize the images")


def _load_teacher(cfg: TrainConfig, spec: ModelSpec, device: torch.device, amp_dtype) -> torch.nn.Module | None:
    """The frozen teacher, in the memory format it runs fastest in (its widths are not the student's)."""
    if not cfg.teacher:
        return None
    teacher = Checkpoint.load(cfg.teacher).build_model()
    if teacher.num_classes != spec.num_classes:
        raise HwpruneError(f"teacher {cfg.teacher} has {teacher.num_classes} classes, the student {spec.num_classes}")
    for p in teacher.module.parameters():
        p.requires_grad_(False)
    fmt = fastest_format(teacher.module.eval(), spec.input_size, device, amp_dtype, train=False)
    return _InFormat(teacher.module.to(device=device, memory_format=fmt), fmt).eval()


class _InFormat(torch.nn.Module):
    """``module`` fed its inputs in ``memory_format``, whatever layout the batches come in."""

    def __init__(self, module: torch.nn.Module, memory_format: torch.memory_format):
        super().__init__()
        self.module, self.memory_format = module, memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=self.memory_format))


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int):
    """Yield an ``advance()`` callable; draws a bar only on an interactive terminal."""
    if not (enabled and _console.is_terminal):
        yield lambda: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _save_state(path: Path, identity: dict, spec: ModelSpec, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler, epoch: int, seconds: float, cfg: TrainConfig) -> None:
    state = {
        "format": STATE_FORMAT,
        **identity,
        "input_size": list(spec.input_size),
        "epoch": epoch,
        "seconds": seconds,
        "config": asdict(cfg),
        "model": {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    atomic_torch_save(state, path)


def _restore(path: Path, identity: dict, net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler,
             device: torch.device) -> tuple[int, float]:
    state = safe_torch_load(path, "training state")
    hint = f"delete {path} or pass --no-resume to start over"
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise HwpruneError(f"{path} is not an hwprune training state", hint=hint)
    for key, value in identity.items():
        if state.get(key) != value:
            raise HwpruneError(f"{path} belongs to another model ({key} {state.get(key)!r}, not {value!r})", hint=hint)
    try:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return int(state["epoch"]), float(state["seconds"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise HwpruneError(f"cannot resume from {path}: {str(e).splitlines()[0]}", hint=hint) from e


def _final_meta(parent: dict, train_set: ImageDataset, cfg: TrainConfig, top1, top5, seconds: float,
                device: torch.device, amp_dtype) -> dict[str, Any]:
    meta = dict(parent)
    if "train" in parent:
        meta["history"] = [*parent.get("history", []), parent["train"]]
    meta["data"] = {"classes": list(train_set.classes), "mean": list(train_set.mean), "std": list(train_set.std),
                    "train_images": len(train_set)}
    meta["train"] = {**asdict(cfg), "peak_lr": cfg.peak_lr(), "device": str(device),
                     "precision": "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
                     "seconds": round(seconds, 2), "torch": str(torch.__version__)}
    meta["top1"], meta["top5"] = top1, top5
    return meta


def evaluate_checkpoint(checkpoint: Checkpoint | str | Path, data: str | Path, split: str = "test",
                        batch_size: int = 500, device: str = "cpu") -> dict[str, float | int]:
    """Top-1 and top-5 accuracy of a checkpoint on a split of ``data``, normalised as it was trained."""
    from hwprune.training.data import load_dataset

    if split not in ("train", "test", "val"):
        raise HwpruneError(f"unknown split '{split}'", hint="use train, test or val")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HwpruneError("CUDA was requested but no CUDA device is available", hint="use --device cpu")
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
    spec = ck.build_model()
    dataset = load_dataset(data, split, image_size=ck.input_size[1])
    norm = ck.meta.get("data", {})
    if "mean" in norm and "std" in norm:
        dataset = dataset.with_normalization(norm["mean"], norm["std"])
    if "classes" in norm and list(norm["classes"]) != dataset.classes:
        raise HwpruneError(f"the checkpoint was trained on other classes than those in {data}",
                           hint="evaluate on the dataset the model was trained on")
    if len(dataset.classes) > spec.num_classes:
        raise HwpruneError(f"the data has {len(dataset.classes)} classes, the model only {spec.num_classes} outputs")
    return evaluate(spec.module.to(device), dataset, batch_size=batch_size, device=device)
