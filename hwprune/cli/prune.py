"""``hwprune prune`` and ``hwprune export``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer

from hwprune.cli import app, console
from hwprune.cli.predict import PREDICTOR_HELP
from hwprune.errors import HwpruneError


_HELP = {
    "recover": "GCP recover step: all (every weight trains) or paper (masks, BN shifts, classifier).",
    "latency_target": "Meet this fraction of the base model's measured latency on the table's backend, whatever "
                      "the objective (e.g. GCP-f at the FLOPs fraction that gives 0.5 latency). Default: --target "
                      "for the latency and throughput objectives.",
    "patience": "Seconds one device measurement may wait for a shared host's fast state before it settles for "
                "what it has (logged as settled=false).",
    "measure": "Measure base and pruned model end to end on the table's backend.",
    "min_keep": "Every channel group keeps at least this fraction of its channels.",
    "budget_minutes": "search, lstm: wall-time budget of the method itself.",
    "option": "A method setting (repeatable); `hwprune methods` lists each method's.",
}


@app.command()
def prune(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Unpruned checkpoint to prune."),
    out: Path = typer.Option(..., "--out", help="Pruned checkpoint to write."),
    method: str = typer.Option("l1", "--method", help="A registered method (see `hwprune methods`)."),
    objective: str = typer.Option("flops", "--objective", help="latency | throughput | flops | params | memory"),
    target: float = typer.Option(..., "--target", help="Fraction of the base model's cost to keep, e.g. 0.5."),
    table: Optional[Path] = typer.Option(None, "--table", help="Latency table of the target device."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help=PREDICTOR_HELP),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset for fine-tuning and evaluation."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", min=0),
    round_hw: bool = typer.Option(False, "--round-hw", help="Round widths to the device's latency staircase."),
    steps: int = typer.Option(4, "--steps", min=1, help="GCP: regularise/prune/recover rounds (T)."),
    iters: Optional[int] = typer.Option(None, "--iters", min=1, help="GCP: iterations per phase (default: an epoch)."),
    recover: str = typer.Option("all", "--recover", help=_HELP["recover"]),
    measure: bool = typer.Option(True, "--measure/--no-measure", help=_HELP["measure"]),
    latency_target: Optional[float] = typer.Option(None, "--latency-target", min=0.01, max=1.0, help=_HELP["latency_target"]),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr", min=0.0, help="Peak fine-tuning lr."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Fine-tuning batch size."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Distill from this checkpoint while fine-tuning."),
    min_keep: float = typer.Option(0.2, "--min-keep", min=0.0, max=1.0, help=_HELP["min_keep"]),
    chart: Optional[Path] = typer.Option(None, "--chart", help="Write the per-layer width chart (PNG) here."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    patience: float = typer.Option(180.0, "--patience", min=0.0, help=_HELP["patience"]),
    quick: bool = typer.Option(False, "--quick", help="Short device measurements (smoke tests, not for results)."),
    supernet: Optional[Path] = typer.Option(None, "--supernet", help="search: reuse this trained supernet."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", min=0.0, help=_HELP["budget_minutes"]),
    option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE", help=_HELP["option"]),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Prune a checkpoint to a cost target met on the device, optionally fine-tune, and save the smaller model."""
    res = _prune_to_target(SimpleNamespace(**locals()))
    res.save(out)
    if chart is not None:
        _chart(res, method, objective, chart)
    _print_result(res, out, as_json)


def _prune_to_target(a: SimpleNamespace):
    """Check the paths, then run :func:`~hwprune.pruning.target.prune_to_target` with the command's options."""
    from hwprune.atomic import check_writable
    from hwprune.pruning.target import DeviceOptions, Finetune, prune_to_target

    if a.out.resolve() == a.checkpoint.resolve():
        raise HwpruneError("--out must differ from --checkpoint: the base checkpoint is never overwritten")
    check_writable(a.out)
    _set_threads(a.threads)
    return prune_to_target(
        a.checkpoint, a.method, a.objective, a.target, predictor=_predictor(a.table, a.predictor), table=a.table,
        data=a.data, latency_target=a.latency_target, min_keep=a.min_keep, round_hw=a.round_hw,
        device=DeviceOptions(measure=a.measure, patience_s=a.patience, quick=a.quick),
        finetune=Finetune(a.finetune_epochs, a.finetune_lr, a.batch_size, str(a.teacher) if a.teacher else None),
        options=_method_options(a.option, steps=a.steps, iters=a.iters, recover=a.recover, supernet=a.supernet,
                                budget_minutes=a.budget_minutes),
        finetune_path=a.out, quiet=a.as_json)


def _method_options(pairs: list[str], **given) -> dict:
    """The named options plus ``--option KEY=VALUE`` pairs (values parsed as JSON where they parse)."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HwpruneError(f"--option '{pair}' is not KEY=VALUE")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return options


def _predictor(table: Optional[Path], predictor: Optional[Path]):
    if table is None and predictor is None:
        return None
    from hwprune.prediction.artifact import predictor_for

    return predictor_for(table, predictor)


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _chart(res, method: str, objective: str, chart: Path) -> None:
    from hwprune.bench.report import width_chart
    from hwprune.pruning.space import PruningSpace

    space = PruningSpace.from_name(res.checkpoint.arch, input_size=res.checkpoint.input_size[1])
    width_chart({f"{method}-{objective}": space.kept_fractions(res.widths)}, chart,
                title=f"{res.checkpoint.arch}: kept channels per group")


def _print_result(res, out: Path, as_json: bool) -> None:
    meta = res.checkpoint.meta
    if as_json:
        summary = {"checkpoint": str(out), "widths": res.widths.widths,
                   **{k: v for k, v in meta.items() if k not in ("data", "history", "train")}}
        typer.echo(json.dumps(summary, indent=1, default=str))
        return
    console.print(f"pruned {res.checkpoint.arch} with {meta['method']} to {100 * res.cost_fraction:.1f}% of its "
                  f"{meta['objective']} (target {100 * meta['target']:.1f}%) -> {out}", highlight=False)
    if "measured_speedup" in meta:
        console.print(f"  measured {meta['measured_ms']:.3f} ms against {meta['base_measured_ms']:.3f} ms: "
                      f"{meta['measured_speedup']:.2f}x", highlight=False)
    for h in meta.get("gcp_history", []):
        console.print(f"  GCP round {h['step']}: cost {100 * h['cost_fraction']:.1f}%, the proximal step zeroed "
                      f"{100 * h['zeroed_share']:.1f}% of the live masks "
                      f"({', '.join(f'{g}: {n}' for g, n in h['zeroed'].items()) or 'none'})", highlight=False)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json")) -> None:
    """The registered pruning methods, one line each."""
    from hwprune.pruning.methods import METHODS

    rows = METHODS.rows()
    if as_json:
        typer.echo(json.dumps([{"name": n, "summary": s} for n, s in rows]))
        return
    for name, summary in rows:
        typer.echo(f"{name:12s} {summary}")


@app.command()
def export(
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (random weights, for latency work)."),
    widths_file: Optional[Path] = typer.Option(None, "--widths", help="Width configuration JSON (with --model)."),
    batch: int = typer.Option(1, "--batch", min=1),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=8),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Also build a TensorRT engine (needs TensorRT)."),
) -> None:
    """Export a checkpoint, or a model with a width configuration, to ONNX (and a TensorRT engine)."""
    from hwprune.profiling.onnx_export import export_onnx
    from hwprune.pruning.space import PruningSpace, WidthConfig

    if (checkpoint is None) == (model is None):
        raise HwpruneError("give exactly one of --checkpoint or --model")
    if checkpoint is not None:
        from hwprune.training.checkpoint import Checkpoint

        spec = Checkpoint.load(checkpoint).build_model()
        module, chw = spec.module, spec.input_size
    else:
        space = PruningSpace.from_name(model, input_size=input_size)
        cfg = WidthConfig.load(widths_file) if widths_file else space.full()
        if cfg.model and cfg.model != model:
            raise HwpruneError(f"width file '{widths_file}' is for model '{cfg.model}', not '{model}'")
        module, chw = space.apply(WidthConfig(model, cfg.widths)), space.input_shape[1:]
    path = export_onnx(module, (batch, *chw), onnx)
    console.print(f"wrote {path}")
    if engine is not None:
        from hwprune.profiling.backends.tensorrt_backend import TensorRTBackend, export_engine

        reason = TensorRTBackend.unavailable_reason("cuda")
        if reason:
            raise HwpruneError(f"cannot build a TensorRT engine here: {reason}")
        info = export_engine(path, engine, input_shape=(batch, *chw))
        console.print(f"wrote {engine} ({info.get('engine_bytes', 0)} bytes)")
