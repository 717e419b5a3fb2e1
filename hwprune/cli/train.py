"""``hwprune train`` and ``hwprune eval``."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch
import typer

from hwprune.training.checkpoint import Checkpoint
from hwprune.cli import app, console
from hwprune.training.data import load_splits
from hwprune.errors import HwpruneError
from hwprune.models import create_model
from hwprune.training.train import PRECISIONS, SCHEDULES, TrainConfig, evaluate_checkpoint, train


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="Directory with train/ and test/ (folders, .tar.gz or .npz), or one .npz/.tar.gz."),
    out: Path = typer.Option(..., "--out", help="Where to write the final checkpoint (state and log go next to it)."),
    model: Optional[str] = typer.Option(None, "--model", help="Architecture to train from scratch (see `hwprune models`)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint to fine-tune instead (e.g. a pruned model)."),
    epochs: int = typer.Option(200, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate [default: 0.1 x batch size / 128]."),
    schedule: str = typer.Option("cosine", "--schedule", help=f"One of {', '.join(SCHEDULES)}."),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", min=0.0),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", min=0.0),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", min=0.0, max=1.0),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Checkpoint to distill from."),
    distill_alpha: float = typer.Option(0.9, "--distill-alpha", min=0.0, max=1.0),
    distill_temperature: float = typer.Option(4.0, "--distill-temperature", min=0.01),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to this square size [default: the model's]."),
    precision: str = typer.Option("auto", "--precision", help=f"One of {', '.join(PRECISIONS)}."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for PyTorch."),
    seed: int = typer.Option(0, "--seed"),
    eval_every: int = typer.Option(5, "--eval-every", min=1),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from <out>.state.pt if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Train a model from scratch, or fine-tune a checkpoint, on an image-classification dataset."""
    if (model is None) == (checkpoint is None):
        raise HwpruneError("pass exactly one of --model and --checkpoint",
                           hint="--model NAME trains from scratch, --checkpoint CK fine-tunes")
    cfg = _train_config(dict(locals()))
    cfg.validate()
    if threads:
        torch.set_num_threads(threads)
    source, splits, size = _source_and_data(model, checkpoint, data, image_size, seed)
    name = source.arch if isinstance(source, Checkpoint) else source.name
    console.print(f"training {name} on {len(splits.train)} images ({len(splits.train.classes)} classes, "
                  f"{size}x{size}), test {len(splits.test) if splits.test is not None else 'none'}; "
                  f"{epochs} epochs, batch {batch_size}, lr {cfg.peak_lr():g}, threads {torch.get_num_threads()}",
                  highlight=False)
    _print_result(train(source, splits, cfg, out, resume=resume, progress=True), as_json)


def _train_config(options: dict) -> TrainConfig:
    """The :class:`TrainConfig` of the command's options (each named as its field; the rest default)."""
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in options.items() if k in names}
    given["teacher"] = str(given["teacher"]) if given.get("teacher") else None
    return TrainConfig(**given)


def _source_and_data(model: Optional[str], checkpoint: Optional[Path], data: Path, image_size: Optional[int],
                     seed: int):
    """(checkpoint or freshly built model, data splits, image size) for ``--model`` or ``--checkpoint``."""
    if checkpoint is not None:
        source = Checkpoint.load(checkpoint)
        size = image_size or source.input_size[1]
        return source, load_splits(data, image_size=size), size
    size = image_size or create_model(model).input_size[1]
    splits = load_splits(data, image_size=size)
    torch.manual_seed(seed)
    return create_model(model, num_classes=len(splits.train.classes), input_size=size), splits, size


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"checkpoint": str(result.checkpoint), "epochs": result.epochs, "top1": result.top1,
                          "top5": result.top5, "seconds": result.seconds}))
        return
    acc = f"top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%" if result.top1 is not None else "no test split"
    console.print(f"wrote {result.checkpoint}: {acc} after {result.epochs} epochs "
                  f"({result.seconds / 60:.1f} min)", highlight=False)


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint to evaluate."),
    data: Path = typer.Option(..., "--data", help="Dataset directory or file, as for `hwprune train`."),
    split: str = typer.Option("test", "--split", help="train, test or val."),
    batch_size: int = typer.Option(500, "--batch-size", min=1),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print {top1, top5, n} as JSON on stdout."),
) -> None:
    """Measure a checkpoint's top-1/top-5 accuracy on a dataset split."""
    if threads:
        torch.set_num_threads(threads)
    result = evaluate_checkpoint(checkpoint, data, split, batch_size=batch_size, device=device)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"{checkpoint} on {split} ({result['n']} images): "
                      f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%", highlight=False)
