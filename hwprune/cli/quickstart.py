"""``hwprune quickstart``: the whole pipeline on this machine, offline.

A thin layer over :func:`hwprune.pipeline.run_quickstart`: profile this CPU, validate the
predictor, evaluate the shipped cifar_resnet20, prune it with GCP-lambda to a fraction of its
measured latency (met on the device, fine-tuned), bench base and pruned model, write the report.
``--quick`` runs every step with short measurement windows: with a few hundred images as
``--data`` that is a smoke test of the whole pipeline in about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hwprune.cli import app, console
from hwprune.pipeline import SAMPLE, QuickstartConfig, run_quickstart


@app.command()
def quickstart(
    out: Path = typer.Option(Path("hwprune-quickstart"), "--out", help="Directory for the table, models and report."),
    target: float = typer.Option(QuickstartConfig.target, "--target", min=0.05, max=0.95,
                                 help="Fraction of the base model's measured latency to reach."),
    configs: int = typer.Option(QuickstartConfig.configs, "--configs", min=5, help="Width configurations to profile."),
    samples: int = typer.Option(QuickstartConfig.samples, "--samples", min=2, help="Configurations measured to validate the predictor."),
    finetune_epochs: int = typer.Option(QuickstartConfig.finetune_epochs, "--finetune-epochs", min=0),
    distill: bool = typer.Option(QuickstartConfig.distill, "--distill/--no-distill",
                                 help="Fine-tune against the base model's outputs."),
    gcp_iters: int = typer.Option(QuickstartConfig.gcp_iters, "--gcp-iters", min=1, help="GCP iterations per regularise/recover phase."),
    gcp_steps: int = typer.Option(QuickstartConfig.gcp_steps, "--gcp-steps", min=1, help="GCP regularise/prune/recover rounds."),
    gcp_streams: str = typer.Option(QuickstartConfig.gcp_streams, "--gcp-streams",
                                    help="keep: the residual streams stay whole; prune: they compete with every group."),
    min_keep: float = typer.Option(QuickstartConfig.min_keep, "--min-keep", min=0.01, max=1.0,
                                   help="Every pruned group keeps at least this fraction of its channels."),
    threads: int = typer.Option(
        1, "--threads", min=1,
        help="Intra-op threads of every step. 1 by default: on shared hosts 1-thread timings repeat far better "
             "than 2-thread ones (README); give the count you deploy with."),
    gate_budget: float = typer.Option(
        90.0, "--gate-budget", min=0.0,
        help="Seconds the profile may spend re-measuring configurations timed while a shared host was slow; "
             "after that they are kept once, marked."),
    force: bool = typer.Option(False, "--force", help="Redo finished steps."),
    data: Path = typer.Option(
        SAMPLE, "--data",
        help="32x32 CIFAR-10 images to evaluate and fine-tune on, laid out as for hwprune train (default: the "
             "shipped CIFAR-10 training set of 50,000 images and a 2,000-image test sample).", show_default=False),
    quick: bool = typer.Option(
        False, "--quick",
        help="Short measurements in every step and one validation session per configuration: a smoke test "
             "of every step, whose figures are not worth reporting."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON on stdout."),
) -> None:
    """Profile this CPU, fit and validate the predictor, prune the shipped ResNet-20 to 0.65 of its
    measured latency with GCP-lambda, distil it from the base, verify it, and write a report. Offline."""
    cfg = QuickstartConfig(out=out, target=target, configs=configs, samples=samples, finetune_epochs=finetune_epochs,
                           distill=distill, gcp_iters=gcp_iters, gcp_steps=gcp_steps, gcp_streams=gcp_streams,
                           min_keep=min_keep, threads=threads, gate_budget_s=gate_budget,
                           data=data, quick=quick, force=force)
    summary = run_quickstart(cfg, echo=lambda line: console.print(f"\n[bold cyan]{line}[/]", highlight=False))
    _print_summary(summary, target, Path(summary["report"]))
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))


def _print_summary(summary: dict, target: float, report: Path) -> None:
    from rich.table import Table

    speedup = summary["measured_speedup"]
    tbl = Table(title=f"hwprune quickstart on {summary['device']}")
    tbl.add_column("")
    tbl.add_column("base cifar_resnet20", justify="right")
    tbl.add_column(f"GCP-λ @ {target:g} latency", justify="right")
    for name, key, fmt in (("measured latency (ms)", "measured_ms", "{:.3f}"), ("predicted latency (ms)", "predicted_ms", "{:.3f}"),
                           ("throughput (img/s)", "throughput_ips", "{:.0f}"), ("top-1 on the test sample (%)", "top1", "{}")):
        vals = [summary[m][key] for m in ("base", "pruned")]
        tbl.add_row(name, *["-" if v is None else fmt.format(v) for v in vals])
    tbl.add_row("measured speed-up", "1.00x", f"{speedup:.2f}x")
    console.print()
    console.print(tbl)
    pv = summary["predictor"]
    if pv.get("n"):
        console.print(f"predictor: {100 * pv['within_5pct']:.0f}% of {pv['n']} fresh configurations within ±5%, "
                      f"{100 * pv['within_10pct']:.0f}% within ±10%, Spearman {pv['spearman']:.3f}")
        rel = summary["predictor_relative"]
        if rel.get("within_5pct") is not None:
            console.print(f"relative to the unpruned model, timed in the same window: {100 * rel['within_5pct']:.0f}% "
                          f"within ±5%, {100 * rel['within_10pct']:.0f}% within ±10%")
    if pv.get("slow_configs_used"):
        console.print(f"[yellow]the predictor was fitted on {pv['slow_configs_used']} configurations profiled while "
                      f"this host was slow[/] (too few others): expect it to predict high")
    if summary.get("noisy_host"):
        console.print(f"[yellow]warning:[/] {summary['noisy_host']}", highlight=False)
    console.print(f"report: {report} (and {report.with_suffix('.md')}); total {summary['seconds']['total'] / 60:.1f} min")
