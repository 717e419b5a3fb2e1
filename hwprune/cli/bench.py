"""``hwprune bench`` and ``hwprune report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from hwprune.cli import app, console
from hwprune.cli.predict import PREDICTOR_HELP
from hwprune.errors import HwpruneError


def _batches(text: str) -> list[int]:
    try:
        out = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise HwpruneError(f"--batch takes comma-separated integers, got '{text}'") from None
    if not out or min(out) < 1:
        raise HwpruneError(f"batch sizes must be positive, got '{text}'")
    return out


@app.command()
def bench(
    model: List[str] = typer.Option([], "--model", help="NAME or NAME=WIDTHS.json (repeatable)."),
    widths_file: Optional[Path] = typer.Option(None, "--widths", help="Widths for a single --model."),
    checkpoint: List[Path] = typer.Option([], "--checkpoint", help="Checkpoint (repeatable)."),
    onnx: List[Path] = typer.Option([], "--onnx", help="ONNX file (repeatable)."),
    backend: str = typer.Option("onnxruntime", "--backend"),
    device: str = typer.Option("cpu", "--device"),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, e.g. 1,8,64."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Fresh sessions per model and batch, interleaved."),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=8),
    table: Optional[Path] = typer.Option(None, "--table", help="Latency table: adds predicted_ms."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help=PREDICTOR_HELP),
    compare: List[str] = typer.Option([], "--compare", help="A:B pairs: speed-up of A over B."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results JSON here."),
    quick: bool = typer.Option(False, "--quick", help="Short measurements (smoke tests)."),
    min_time: Optional[float] = typer.Option(
        None, "--min-time", min=0.01,
        help="Seconds timed per model and round (default 1.0). Many short rounds (e.g. --rounds 15 --min-time 0.3) "
             "make the fastest-round estimator steady on a shared host."),
    estimator: Optional[str] = typer.Option(
        None, "--estimator", help="median | p10 | min-round: the number that summarises each round "
                                  "(default: the --table's, else the median)."),
) -> None:
    """Measure end-to-end latency and throughput of models, interleaved, in fresh sessions."""
    from hwprune.atomic import atomic_write_text
    from hwprune.bench.harness import bench as run_bench, speedups
    from hwprune.profiling.table import command_line
    from hwprune.progress import item_progress

    if widths_file is not None and len(model) != 1:
        raise HwpruneError("--widths goes with exactly one --model (or write NAME=WIDTHS.json)")
    measure, pairs, batches = _measure_config(quick, min_time), _pairs(compare), _batches(batch)
    models, fitted = _models_and_predictor(model, widths_file, checkpoint, onnx, input_size, table, predictor, json_out)
    with item_progress(f"bench on {backend}") as update:
        doc = run_bench(models, backend, batches, threads=threads, device=device, rounds=rounds,
                        measure=measure, predictor=fitted, progress=update,
                        estimator=_estimator(estimator, table))
    doc.update(speedups=speedups(doc, pairs), command=command_line())
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(doc, indent=1, default=str) + "\n")
    _print_results(doc, json_out)
    if any(r.get("error") for r in doc["results"]):
        raise typer.Exit(1)


def _measure_config(quick: bool, min_time: float | None):
    """The measurement protocol of ``--quick`` / ``--min-time`` (None: the harness default)."""
    from hwprune.profiling.measure import MeasureConfig

    if quick and min_time is not None:
        raise HwpruneError("give --quick or --min-time, not both")
    if min_time is not None:
        return MeasureConfig(warmup_s=min(0.2, min_time / 2), min_time_s=min_time)
    return MeasureConfig.quick() if quick else None


def _estimator(name: str | None, table: Path | None) -> str | None:
    """The estimator asked for, else the one the table was profiled with (one-line error for an unknown name)."""
    from hwprune.profiling.measure import ESTIMATORS
    from hwprune.profiling.table import table_estimator

    if name is not None:
        ESTIMATORS.get(name)
    return name or table_estimator(table)


def _pairs(compare: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for c in compare:
        a, sep, b = c.partition(":")
        if not sep:
            raise HwpruneError(f"--compare takes A:B, got '{c}'")
        pairs.append((a, b))
    return pairs


def _models_and_predictor(model, widths_file, checkpoint, onnx, input_size, table, predictor, json_out):
    """The models to bench and the fitted predictor (or None), after checking the JSON path is writable."""
    from hwprune.atomic import check_writable
    from hwprune.bench.models import bench_models
    from hwprune.prediction.artifact import predictor_for

    if json_out is not None:
        check_writable(json_out)
    models = bench_models(model, widths_file, checkpoint, onnx, input_size=input_size)
    return models, predictor_for(table, predictor)


def _print_results(doc: dict, json_out: Path | None) -> None:
    from rich.table import Table

    t = Table("model", "batch", "median ms", "fastest round ms", "p90 ms", "CoV", "img/s", "predicted ms", "status")
    for r in doc["results"]:
        lat = r.get("latency_ms") or {}
        t.add_row(r["model"], str(r["batch"]), f"{lat.get('median', float('nan')):.3f}",
                  f"{lat.get('fastest_round', float('nan')):.3f}",
                  f"{lat.get('p90', float('nan')):.3f}", f"{100 * lat.get('between_session_cov', 0):.1f}%",
                  f"{r.get('throughput_ips', 0):.1f}",
                  f"{r['predicted_ms']:.3f}" if r.get("predicted_ms") else "-",
                  "[red]failed: " + r["error"] + "[/]" if r.get("error") else "ok")
    console.print(t)
    for s in doc["speedups"]:
        fast = f", {s['speedup_fastest']:.2f}x between fastest rounds" if s.get("speedup_fastest") else ""
        console.print(f"{s['model']} vs {s['baseline']} (batch {s['batch']}): {s['speedup']:.2f}x "
                      f"(median of per-round ratios{fast})")
    if json_out is not None:
        console.print(f"wrote {json_out}")


@app.command()
def report(
    bench_json: Path = typer.Option(..., "--bench", help="JSON written by hwprune bench --json."),
    checkpoints: List[Path] = typer.Option([], "--checkpoints", help="Checkpoints with accuracy metadata."),
    out: Path = typer.Option(..., "--out", help="HTML report (a Markdown twin is written beside it)."),
) -> None:
    """One self-contained HTML page (and Markdown) from bench results and checkpoints."""
    from hwprune.bench.report import write_report

    html, md = write_report(bench_json, checkpoints, out)
    console.print(f"wrote {html} and {md}")
