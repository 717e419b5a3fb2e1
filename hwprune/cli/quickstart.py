"""``hwprune quickstart``: the whole pipeline on this machine, offline, in a few minutes.

It runs the real commands one after the other, printing each, so that the quickstart is also
the recipe for a user's own model:

1. ``hwprune profile``  - a latency table of this CPU with ONNX Runtime (cifar_resnet20's width space);
2. ``hwprune validate`` - fit the predictor and compare it with fresh end-to-end measurements;
3. ``hwprune eval``     - the shipped cifar_resnet20 checkpoint on the shipped CIFAR-10 test sample;
4. ``hwprune prune``    - GCP-lambda to half the measured latency, corrected on the device, fine-tuned
                          on the shipped training sample;
5. ``hwprune bench``    - base and pruned model interleaved, in fresh sessions;
6. ``hwprune report``   - the HTML and Markdown report.

Everything it needs ships with the package (``hwprune/assets``): a cifar_resnet20 checkpoint
trained by ``tools/train_baselines.sh`` and a 5,000 + 2,000 image sample of CIFAR-10. Re-running
with the same ``--out`` continues: the table resumes, finished steps are redone only with
``--force``. ``--quick`` runs every step with short measurement windows (one validation session
per configuration), and prune without waiting for a shared host's fast state; with a few hundred
images as ``--data`` that is a smoke test of the whole pipeline in a minute or two.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import typer

from hwprune.cli import app, console
from hwprune.errors import HwpruneError

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_CK = ASSETS / "cifar_resnet20.pt"
SAMPLE = ASSETS / "cifar10-sample"
# On a shared host that stays slow, each of prune's device measurements waits at most this long
# for the fast state (the profile's re-measurement is bounded by --gate-budget).
PATIENCE_S = 30.0


def _run(args: list[str], capture: bool = False) -> str:
    console.print(f"\n[bold cyan]$ hwprune {' '.join(shlex.quote(a) for a in args)}[/]", highlight=False)
    r = subprocess.run([sys.executable, "-m", "hwprune", *args], text=True,
                       stdout=subprocess.PIPE if capture else None)
    if r.returncode != 0:
        raise HwpruneError(f"step `hwprune {args[0]}` failed (exit {r.returncode})",
                           "its error is printed above; fix it and re-run the quickstart (finished steps are kept)")
    return r.stdout or ""


@app.command()
def quickstart(
    out: Path = typer.Option(Path("hwprune-quickstart"), "--out", help="Directory for the table, models and report."),
    target: float = typer.Option(0.5, "--target", min=0.05, max=0.95,
                                 help="Fraction of the base model's measured latency to reach."),
    configs: int = typer.Option(40, "--configs", min=5, help="Width configurations to profile."),
    samples: int = typer.Option(20, "--samples", min=2, help="Configurations measured to validate the predictor."),
    finetune_epochs: int = typer.Option(3, "--finetune-epochs", min=0),
    gcp_iters: int = typer.Option(30, "--gcp-iters", min=1, help="GCP iterations per regularise/recover phase."),
    gcp_steps: int = typer.Option(4, "--gcp-steps", min=1, help="GCP regularise/prune/recover rounds."),
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
             "shipped sample of 5,000 training and 2,000 test images).", show_default=False),
    quick: bool = typer.Option(
        False, "--quick",
        help="Short measurements in profile, prune and bench, one validation session per configuration, and "
             "prune does not wait for a shared host's fast state: a smoke test of every step, whose figures are "
             "not worth reporting."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON on stdout."),
) -> None:
    """Profile this CPU, fit and validate the predictor, prune the shipped ResNet-20 to half its
    measured latency with GCP-lambda, verify it, and write a report. Offline; a few minutes on 2 cores."""
    for p in (BASE_CK, *((SAMPLE / "train.tar.gz", SAMPLE / "test.tar.gz") if data == SAMPLE else ())):
        if not p.exists():
            raise HwpruneError(f"the quickstart asset {p} is missing", "reinstall hwprune from a full checkout")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    thr = ["--threads", str(threads)]
    q = ["--quick"] if quick else []
    table, val = _profile_and_validate(out, configs, samples, gate_budget, thr + q, quick, force, steps)
    gcp = ["--steps", str(gcp_steps), "--iters", str(gcp_iters)]
    base, pruned = _eval_and_prune(out, table, data, target, gcp, finetune_epochs, thr + q,
                                   0.0 if quick else PATIENCE_S, force, steps)
    bench_json, report = _bench_and_report(out, table, base, pruned, thr + q, force, steps)
    summary = _summary(table, val, base, pruned, bench_json, report, target, steps, t0)
    _print_summary(summary, target, report)
    from hwprune.atomic import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))


def _profile_and_validate(out: Path, configs: int, samples: int, gate_budget: float, opts: list[str], quick: bool,
                          force: bool, steps: dict) -> tuple[Path, dict]:
    """Steps 1 and 2: the latency table (a table left partial by an interrupted run is resumed), then
    the predictor validated end to end on fresh configurations, in one session each when ``quick``.
    ``opts``: the profile's --threads and --quick."""
    from hwprune.atomic import atomic_write_text
    from hwprune.profiling.table import LatencyTable

    table = out / "cpu_table.parquet"
    t = time.perf_counter()
    if force or not table.exists() or not LatencyTable.load(table).complete:
        _run(["profile", "--model", "cifar_resnet20", "--configs", str(configs), "--micro", "0", "--gate", "0.05",
              "--gate-budget", f"{gate_budget:g}", "--out", str(table), *opts,
              "--resume" if table.exists() and not force else "--overwrite"])
    steps["profile"] = time.perf_counter() - t
    t = time.perf_counter()
    vjson = out / "validation.json"
    if force or not vjson.exists():
        with console.status(f"validating the predictor on {samples} fresh configurations"):
            doc = json.loads(_run(["validate", "--table", str(table), "--model", "cifar_resnet20", "--samples",
                                   str(samples), "--rounds", "1" if quick else "2", "--paired", "--plot",
                                   str(out / "validation.png"), "--json"], capture=True))
        atomic_write_text(vjson, json.dumps(doc, indent=1) + "\n")
    steps["validate"] = time.perf_counter() - t
    return table, json.loads(vjson.read_text())


def _eval_and_prune(out: Path, table: Path, data: Path, target: float, gcp: list[str], finetune_epochs: int,
                    opts: list[str], patience: float, force: bool, steps: dict) -> tuple[Path, Path]:
    """Steps 3 and 4: the shipped checkpoint evaluated on the test split of ``data``, then GCP-lambda
    (``gcp``: its --steps and --iters) to the latency target, met on the device and fine-tuned on the
    training split."""
    from hwprune.training.checkpoint import Checkpoint

    base, pruned = out / "cifar_resnet20_base.pt", out / "cifar_resnet20_gcp.pt"
    t = time.perf_counter()
    if force or not base.exists():
        ck = Checkpoint.load(BASE_CK)
        with console.status(f"evaluating the shipped cifar_resnet20 on the test images of {data}"):
            acc = json.loads(_run(["eval", "--checkpoint", str(BASE_CK), "--data", str(data), "--json"],
                                  capture=True))
        ck.meta["full_test_accuracy"] = ck.meta.get("accuracy")
        ck.meta["accuracy"] = acc
        ck.save(base)
    steps["eval"] = time.perf_counter() - t
    t = time.perf_counter()
    if force or not pruned.exists():
        _run(["prune", "--checkpoint", str(base), "--data", str(data), "--table", str(table), "--method", "gcp",
              "--objective", "latency", "--target", f"{target:g}", *gcp, "--finetune-epochs", str(finetune_epochs),
              "--finetune-lr", "0.01", "--patience", f"{patience:g}", *opts, "--chart", str(out / "widths.png"),
              "--out", str(pruned)])
    steps["prune"] = time.perf_counter() - t
    return base, pruned


def _bench_and_report(out: Path, table: Path, base: Path, pruned: Path, opts: list[str], force: bool,
                      steps: dict) -> tuple[Path, Path]:
    """Steps 5 and 6: base and pruned model interleaved in fresh sessions, then the report. Each is
    redone when what it reads is newer than what it wrote."""
    t = time.perf_counter()
    bench_json, report = out / "bench.json", out / "report.html"
    if force or _stale(bench_json, pruned):
        _run(["bench", "--checkpoint", str(base), "--checkpoint", str(pruned), "--batch", "1", *opts,
              "--table", str(table), "--compare", f"{pruned.stem}:{base.stem}", "--json", str(bench_json)])
    steps["bench"] = time.perf_counter() - t
    if force or _stale(report, bench_json, base, pruned):
        _run(["report", "--bench", str(bench_json), "--checkpoints", str(base), "--checkpoints", str(pruned),
              "--out", str(report)])
    return bench_json, report


def _stale(output: Path, *inputs: Path) -> bool:
    """Whether ``output`` is missing or older than any of ``inputs``."""
    return not output.exists() or any(output.stat().st_mtime < p.stat().st_mtime for p in inputs)


def _summary(table: Path, val: dict, base: Path, pruned: Path, bench_json: Path, report: Path, target: float,
             steps: dict, t0: float) -> dict:
    """What the quickstart prints and writes to summary.json."""
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.profiling.table import LatencyTable

    tab = LatencyTable.load(table)
    bdoc = json.loads(bench_json.read_text())
    res = {r["model"]: r for r in bdoc["results"]}
    b, p = res[base.stem], res[pruned.stem]
    bmeta, pmeta = Checkpoint.load(base).meta, Checkpoint.load(pruned).meta
    speedup = bdoc["speedups"][0]["speedup"] if bdoc.get("speedups") else b["latency_ms"]["median"] / p["latency_ms"]["median"]
    return {
        "device": bdoc["device"].get("cpu_model"), "table": str(table), "table_rows": len(tab),
        # configurations profiled while the host stayed slow after the gate budget ran out
        "table_slow_state_configs": len(tab.slow_items()),
        "predictor": {k: val.get(k) for k in ("n", "within_5pct", "within_10pct", "rmspe", "spearman",
                                              "slow_configs_used")},
        # the latency relative to the unpruned model, timed in the same window (validate --paired)
        "predictor_relative": {k: (val.get("relative") or {}).get(k) for k in ("within_5pct", "within_10pct",
                                                                               "rmspe")},
        "base": {"measured_ms": b["latency_ms"]["median"], "predicted_ms": b.get("predicted_ms"),
                 "throughput_ips": b["throughput_ips"], "top1": (bmeta.get("accuracy") or {}).get("top1"),
                 "flops": None, "checkpoint": str(base)},
        "pruned": {"measured_ms": p["latency_ms"]["median"], "predicted_ms": p.get("predicted_ms"),
                   "throughput_ips": p["throughput_ips"], "top1": (pmeta.get("accuracy") or {}).get("top1"),
                   "flops": pmeta.get("flops"), "params": pmeta.get("params"), "checkpoint": str(pruned)},
        "target": target, "measured_speedup": speedup, "report": str(report),
        "seconds": {**{k: round(v, 1) for k, v in steps.items()}, "total": round(time.perf_counter() - t0, 1)},
    }


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
    console.print(f"report: {report} (and {report.with_suffix('.md')}); total {summary['seconds']['total'] / 60:.1f} min")
