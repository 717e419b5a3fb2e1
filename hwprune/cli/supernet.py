"""``hwprune supernet train|info|extract``: weight-sharing supernets for the search."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer

from hwprune.cli import app, console
from hwprune.errors import HwpruneError

supernet_app = typer.Typer(help="Train and inspect weight-sharing supernets (PSE-Net, SP).", no_args_is_help=True)
app.add_typer(supernet_app, name="supernet")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise HwpruneError(f"--fractions must be comma-separated numbers, got '{text}'") from None


@supernet_app.command("train")
def train_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="The trained, unpruned base model."),
    data: Path = typer.Option(..., "--data", help="Training data (as for `hwprune train`); a held-out part is kept for the search."),
    out: Path = typer.Option(..., "--out", help="Where to write the supernet (state and log go next to it)."),
    epochs: int = typer.Option(30, "--epochs", min=1),
    mode: str = typer.Option("sandwich", "--mode", help="sandwich, parallel (PSE-Net) or stage (SP)."),
    parallel: int = typer.Option(4, "--parallel", help="Subnets per batch in the parallel mode (K)."),
    distill: Optional[str] = typer.Option(None, "--distill", help="teacher, inplace or stage [default: stage for --mode stage, else teacher]."),
    random_per_step: int = typer.Option(2, "--random-per-step", help="Random subnets per step besides the widest and narrowest."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per step (per process under torchrun)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate [default: 0.05 x batch size / 128]."),
    fractions: str = typer.Option("0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", "--fractions", help="Grid widths as fractions of each group's width."),
    table: Optional[Path] = typer.Option(None, "--table", help="Latency table of the target device: grid widths move up its staircase."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="Predictor artifact fitted on --table."),
    holdout: int = typer.Option(200, "--holdout", min=0, help="Training images per class held out for the search."),
    execution: str = typer.Option("auto", "--execution", help="masked, sliced or auto (masked on CUDA, sliced on a CPU)."),
    precision: str = typer.Option("auto", "--precision", help="auto, bf16, fp16 or fp32."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for PyTorch."),
    seed: int = typer.Option(0, "--seed"),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", min=1, help="Cap the steps of every epoch (smoke tests)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from <out>.state.pt if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Train a supernet of a base model; `torchrun --nproc-per-node N -m hwprune supernet train ...` scales out."""
    sn = _train(SimpleNamespace(**locals()))
    _print_trained(sn, out, as_json)


def _train(a: SimpleNamespace):
    """Check the settings and the data, then run :func:`~hwprune.search.supernet_training.train_supernet`."""
    from hwprune.prediction.artifact import predictor_for
    from hwprune.search.supernet_training import SupernetConfig, train_supernet

    cfg = SupernetConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, mode=a.mode, parallel=a.parallel,
                         random_per_step=a.random_per_step,
                         distill=a.distill or ("stage" if a.mode == "stage" else "teacher"),
                         fractions=_fractions(a.fractions), seed=a.seed, threads=a.threads, max_iters=a.max_iters,
                         holdout=a.holdout, execution=a.execution, precision=a.precision, device=a.device)
    cfg.validate()
    if not a.data.exists():
        raise HwpruneError(f"data path {a.data} does not exist", hint="pass the training data of the base model")
    pred = predictor_for(a.table, a.predictor)
    return train_supernet(a.checkpoint, a.data, cfg, a.out, progress=not a.as_json, resume=a.resume, predictor=pred)


def _print_trained(sn, out: Path, as_json: bool) -> None:
    """The trained supernet's summary, printed by the main process only (torchrun starts several)."""
    from hwprune.search.distributed import is_main_process

    if not is_main_process():
        return
    doc = _summary(sn, out)
    if as_json:
        print(json.dumps(doc))
    else:
        top = doc.get("holdout_top1") or {}
        acc = f"; held-out top-1 widest {top['widest']:.2f}%, narrowest {top['narrowest']:.2f}%" if top else ""
        console.print(f"wrote {out}: {sn.arch} supernet, {doc['epochs_trained']} epochs, {doc['mode']} / "
                      f"{doc['distill']}{acc}", highlight=False)


@supernet_app.command("info")
def info_cmd(
    supernet: Path = typer.Argument(..., help="A supernet file."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout."),
) -> None:
    """Architecture, width grid, training and learned prior of a supernet."""
    from hwprune.search.supernet import Supernet

    sn = Supernet.load(supernet)
    doc = _summary(sn, supernet)
    if as_json:
        doc["grid"] = sn.grid.to_dict()["widths"]
        doc["prior"] = {g: [round(float(p), 4) for p in sn.prior.probs(g)] for g in sn.grid.groups}
        print(json.dumps(doc))
        return
    console.print(f"{supernet}: {sn.arch} supernet, {len(sn.grid.groups)} groups, {sn.grid.size():.3g} grid "
                  f"configurations, {doc['epochs_trained']} epochs ({doc['mode']} / {doc['distill']}), prior from "
                  f"{sn.prior.updates} subnets", highlight=False)
    for g in sn.grid.groups:
        probs = " ".join(f"{w}:{p:.2f}" for w, p in zip(sn.grid.choices(g), sn.prior.probs(g)))
        console.print(f"  {g}: {probs}", highlight=False)


@supernet_app.command("extract")
def extract_cmd(
    supernet: Path = typer.Argument(..., help="A supernet file."),
    widths: Path = typer.Option(..., "--widths", help="A width configuration (JSON, as `hwprune widths` writes)."),
    out: Path = typer.Option(..., "--out", help="Where to write the subnet's checkpoint."),
) -> None:
    """Cut one subnet out of a supernet as a checkpoint (fine-tune it with `hwprune train --checkpoint`)."""
    from hwprune.atomic import check_writable
    from hwprune.pruning.space import WidthConfig
    from hwprune.search.supernet import Supernet

    check_writable(out)
    cfg = WidthConfig.load(widths)
    sn = Supernet.load(supernet)
    ck = sn.extract_checkpoint(cfg, meta={"parent": {"supernet": str(supernet), "base_hash": sn.base_hash}})
    ck.save(out)
    console.print(f"wrote {out}: {sn.arch} subnet of {supernet}", highlight=False)


def _summary(sn, path: Path) -> dict:
    t = sn.meta.get("training", {})
    return {"supernet": str(path), "arch": sn.arch, "epochs_trained": sn.meta.get("epochs_trained", 0),
            "mode": t.get("mode"), "distill": t.get("distill"), "parallel": t.get("parallel"),
            "holdout": sn.meta.get("holdout"), "holdout_top1": sn.meta.get("holdout_top1"),
            "groups": len(sn.grid.groups), "grid_size": sn.grid.size(), "prior_updates": sn.prior.updates,
            "base_hash": sn.base_hash}
