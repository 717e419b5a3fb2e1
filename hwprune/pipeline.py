"""The whole pipeline on this machine, offline, through the API: :func:`run_quickstart`.

Each step calls the same API as its command, so that the quickstart is also the recipe for a
user's own model:

1. profile   - a latency table of this CPU with ONNX Runtime (cifar_resnet20's width space);
2. validate  - the table's predictor against fresh end-to-end measurements;
3. evaluate  - the shipped cifar_resnet20 checkpoint on the test split of the data;
4. prune     - GCP-lambda to a fraction of the measured latency, corrected on the device, fine-tuned;
5. bench     - base and pruned model interleaved, in fresh sessions;
6. report    - the HTML and Markdown report.

Everything it needs ships with the package (``hwprune/assets``): a cifar_resnet20 checkpoint, the
50,000 CIFAR-10 training images and a 2,000-image test sample. Re-running into the same directory
continues: the table resumes, and a finished step is redone only with ``force`` (bench and report also when what they
read is newer than what they wrote).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hwprune.atomic import atomic_write_text
from hwprune.errors import HwpruneError

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_CK = ASSETS / "cifar_resnet20.pt"
SAMPLE = ASSETS / "cifar10-sample"
MODEL = "cifar_resnet20"
# On a shared host that stays slow, each of prune's device measurements waits at most this long
# for the fast state (the profile's re-measurement is bounded by gate_budget_s).
PATIENCE_S = 30.0
# Below this share of configurations whose repeated sessions agree within 10%, the host was too
# noisy for the predictor's figures to describe the predictor.
NOISY_CEILING = 0.9


@dataclass
class QuickstartConfig:
    """The quickstart's settings. The pruning recipe (GCP's lambda and learning rate, the fine-tuning)
    was chosen on held-out training images of the sample: ``benchmarks/quickstart_recipe.py``."""

    out: Path = Path("hwprune-quickstart")
    target: float = 0.65  # fraction of the base model's measured latency
    configs: int = 40  # width configurations profiled
    samples: int = 20  # configurations measured to validate the predictor
    finetune_epochs: int = 5
    finetune_lr: float = 0.05
    distill: bool = True  # fine-tune against the base model's outputs (knowledge distillation)
    gcp_iters: int = 30  # GCP iterations per regularise/recover phase
    gcp_steps: int = 4  # GCP rounds
    gcp_lam_factor: float = 0.3  # GCP's lambda in units of lambda_0 (hwprune.pruning.gcp)
    gcp_lr: float = 0.01
    gcp_streams: str = "keep"  # the residual streams stay whole, only the blocks' insides are pruned ("prune": both)
    min_keep: float = 0.2  # every other group keeps at least this fraction of its channels
    threads: int = 1
    gate_budget_s: float = 90.0
    data: Path = SAMPLE
    quick: bool = False  # short measurements: a smoke test whose figures are not worth reporting
    force: bool = False

    def __post_init__(self):
        self.out, self.data = Path(self.out), Path(self.data)
        if not 0.05 <= self.target <= 0.95:
            raise HwpruneError(f"target {self.target:g} is outside 0.05-0.95")
        if not 0.0 < self.min_keep <= 1.0:
            raise HwpruneError(f"min_keep {self.min_keep:g} is outside (0, 1]")
        from hwprune.pruning.gcp import STREAM_MODES

        if self.gcp_streams not in STREAM_MODES:
            raise HwpruneError(f"unknown GCP streams mode '{self.gcp_streams}'", f"choose {' or '.join(STREAM_MODES)}")

    @property
    def measure(self):
        from hwprune.profiling.measure import MeasureConfig

        return MeasureConfig.quick() if self.quick else None


@dataclass
class Paths:
    out: Path

    table = property(lambda s: s.out / "cpu_table.parquet")
    validation = property(lambda s: s.out / "validation.json")
    base = property(lambda s: s.out / f"{MODEL}_base.pt")
    pruned = property(lambda s: s.out / f"{MODEL}_gcp.pt")
    bench = property(lambda s: s.out / "bench.json")
    report = property(lambda s: s.out / "report.html")


@dataclass
class _Run:
    cfg: QuickstartConfig
    echo: Callable[[str], None]
    progress: Callable | None = None  # a context manager factory: progress(description) -> update
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def paths(self) -> Paths:
        return Paths(self.cfg.out)

    def step(self, name: str, todo: bool, what: str, fn: Callable[[], None]) -> None:
        t = time.perf_counter()
        if todo:
            self.echo(f"{name}: {what}")
            fn()
        self.seconds[name] = round(time.perf_counter() - t, 1)

    def bar(self, description: str):
        from hwprune.progress import item_progress

        return (self.progress or item_progress)(description)


def run_quickstart(cfg: QuickstartConfig, echo: Callable[[str], None] = print, progress=None) -> dict:
    """Run every step into ``cfg.out`` and return the summary (also written to ``summary.json``)."""
    import torch

    _check_assets(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    run, t0, threads = _Run(cfg, echo, progress), time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        _profile(run)
        _validate(run)
        _evaluate(run)
        _prune(run)
        _bench(run)
        _report(run)
    finally:
        torch.set_num_threads(threads)
    summary = summarise(run.paths, cfg.target, {**run.seconds, "total": round(time.perf_counter() - t0, 1)})
    atomic_write_text(cfg.out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _check_assets(cfg: QuickstartConfig) -> None:
    needed = (BASE_CK, *((SAMPLE / "train.tar.gz", SAMPLE / "test.tar.gz") if cfg.data == SAMPLE else ()))
    for p in needed:
        if not p.exists():
            raise HwpruneError(f"the quickstart asset {p} is missing", "reinstall hwprune from a full checkout")
    if not cfg.data.exists():
        raise HwpruneError(f"no data at {cfg.data}")


def _backend(cfg: QuickstartConfig, measure=None):
    from hwprune.profiling.backends import create_backend
    from hwprune.profiling.measure import MeasureConfig

    return create_backend("onnxruntime", threads=cfg.threads,
                          measure=measure or (MeasureConfig.quick() if cfg.quick else MeasureConfig.profile()))


def _profile(run: _Run) -> None:
    from hwprune.profiling.profiler import profile
    from hwprune.profiling.table import LatencyTable

    cfg, table = run.cfg, run.paths.table
    todo = cfg.force or not table.exists() or not LatencyTable.load(table).complete
    resume = table.exists() and not cfg.force

    def go():
        with run.bar(f"profiling {MODEL}") as update:
            profile([MODEL], table, _backend(cfg), configs=cfg.configs, micro_per_config=0, resume=resume,
                    overwrite=not resume, progress=update, gate=0.05, gate_budget_s=cfg.gate_budget_s)

    run.step("profile", todo, f"{cfg.configs} width configurations of {MODEL} -> {table}", go)


def _validate(run: _Run) -> None:
    from hwprune.prediction.artifact import predictor_for
    from hwprune.prediction.validate import plot_validation, validate
    from hwprune.profiling.table import LatencyTable

    cfg, p = run.cfg, run.paths

    def go():
        tab = LatencyTable.load(p.table)
        with run.bar(f"validating on {cfg.samples} fresh configurations") as update:
            res = validate(tab, [MODEL], cfg.samples, rounds=1 if cfg.quick else 2, paired=True,
                           predictor=predictor_for(p.table, None, tab), measure=cfg.measure, progress=update)
        plot_validation(res, cfg.out / "validation.png")
        atomic_write_text(p.validation, json.dumps(res.to_dict(with_samples=True), indent=1) + "\n")

    run.step("validate", cfg.force or not p.validation.exists(), "the predictor against end-to-end timings", go)


def _evaluate(run: _Run) -> None:
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.training.train import evaluate_checkpoint

    cfg, p = run.cfg, run.paths

    def go():
        ck = Checkpoint.load(BASE_CK)
        ck.meta["full_test_accuracy"] = ck.meta.get("accuracy")
        ck.meta["accuracy"] = evaluate_checkpoint(ck, cfg.data)
        ck.save(p.base)

    run.step("eval", cfg.force or not p.base.exists(), f"the shipped {MODEL} on the test images of {cfg.data}", go)


def _prune(run: _Run) -> None:
    from hwprune.bench.report import width_chart
    from hwprune.prediction.artifact import predictor_for
    from hwprune.pruning.target import DeviceOptions, Finetune, prune_to_target

    cfg, p = run.cfg, run.paths

    def go():
        res = prune_to_target(
            p.base, "gcp", "latency", cfg.target, predictor=predictor_for(p.table, None), table=p.table,
            data=cfg.data, device=DeviceOptions(measure=True, patience_s=0.0 if cfg.quick else PATIENCE_S,
                                                quick=cfg.quick),
            finetune=Finetune(cfg.finetune_epochs, cfg.finetune_lr, 128, str(p.base) if cfg.distill else None,
                              threads=os.cpu_count()),
            options={"steps": cfg.gcp_steps, "iters": cfg.gcp_iters, "lam_factor": cfg.gcp_lam_factor,
                     "lr": cfg.gcp_lr, "streams": cfg.gcp_streams}, min_keep=cfg.min_keep, finetune_path=p.pruned,
            quiet=False)
        res.save(p.pruned)
        width_chart({"gcp-latency": _kept(res)}, cfg.out / "widths.png", title=f"{MODEL}: kept channels per group")

    run.step("prune", cfg.force or not p.pruned.exists(),
             f"GCP-lambda to {cfg.target:g} of the measured latency, fine-tuned {cfg.finetune_epochs} epochs"
             + (" distilled from the base" if cfg.distill else ""), go)


def _kept(res) -> dict:
    from hwprune.pruning.space import PruningSpace

    space = PruningSpace.from_name(res.checkpoint.arch, input_size=res.checkpoint.input_size[1])
    return space.kept_fractions(res.widths)


def _bench(run: _Run) -> None:
    from hwprune.bench.harness import BenchModel, bench, speedups
    from hwprune.prediction.artifact import predictor_for
    from hwprune.profiling.table import command_line

    cfg, p = run.cfg, run.paths

    def go():
        models = [BenchModel.from_checkpoint(p.base), BenchModel.from_checkpoint(p.pruned)]
        with run.bar("bench: base and pruned, interleaved") as update:
            doc = bench(models, "onnxruntime", [1], threads=cfg.threads, measure=cfg.measure,
                        predictor=predictor_for(p.table, None), progress=update)
        doc["speedups"] = speedups(doc, [(p.pruned.stem, p.base.stem)])
        doc["command"] = command_line()
        atomic_write_text(p.bench, json.dumps(doc, indent=1, default=str) + "\n")

    run.step("bench", cfg.force or _stale(p.bench, p.pruned), "real latency and throughput", go)


def _report(run: _Run) -> None:
    from hwprune.bench.report import write_report

    cfg, p = run.cfg, run.paths
    run.step("report", cfg.force or _stale(p.report, p.bench, p.base, p.pruned), f"{p.report}",
             lambda: write_report(p.bench, [p.base, p.pruned], p.report))


def _stale(output: Path, *inputs: Path) -> bool:
    """Whether ``output`` is missing or older than any of ``inputs``."""
    return not output.exists() or any(output.stat().st_mtime < q.stat().st_mtime for q in inputs)


def summarise(paths: Paths, target: float, seconds: dict) -> dict:
    """What the quickstart prints and writes to summary.json, read back from its files."""
    from hwprune.profiling.table import LatencyTable
    from hwprune.training.checkpoint import Checkpoint

    tab, val = LatencyTable.load(paths.table), json.loads(paths.validation.read_text())
    bdoc = json.loads(paths.bench.read_text())
    res = {r["model"]: r for r in bdoc["results"]}
    b, q = res[paths.base.stem], res[paths.pruned.stem]
    bmeta, pmeta = Checkpoint.load(paths.base).meta, Checkpoint.load(paths.pruned).meta
    speedup = (bdoc["speedups"][0]["speedup"] if bdoc.get("speedups")
               else b["latency_ms"]["median"] / q["latency_ms"]["median"])
    summary = {
        "device": bdoc["device"].get("cpu_model"), "table": str(paths.table), "table_rows": len(tab),
        # configurations profiled while the host stayed slow after the gate budget ran out
        "table_slow_state_configs": len(tab.slow_items()), "table_configs": tab.meta.items_done,
        "predictor": {k: val.get(k) for k in ("n", "within_5pct", "within_10pct", "rmspe", "spearman",
                                              "slow_configs_used")},
        # the latency relative to the unpruned model, timed in the same window
        "predictor_relative": {k: (val.get("relative") or {}).get(k) for k in ("within_5pct", "within_10pct", "rmspe")},
        "measured_ceiling": (val.get("repeatability") or {}).get("within_10pct"),
        "base": _model_row(b, bmeta, paths.base), "pruned": _model_row(q, pmeta, paths.pruned),
        "target": target, "measured_speedup": speedup, "report": str(paths.report), "seconds": seconds,
    }
    summary["noisy_host"] = noisy_host_warning(summary)
    return summary


def _model_row(r: dict, meta: dict, path: Path) -> dict:
    return {"measured_ms": r["latency_ms"]["median"], "predicted_ms": r.get("predicted_ms"),
            "throughput_ips": r["throughput_ips"], "top1": (meta.get("accuracy") or {}).get("top1"),
            "flops": meta.get("flops"), "params": meta.get("params"), "checkpoint": str(path)}


def noisy_host_warning(summary: dict) -> str | None:
    """One line when the host was too noisy for the predictor's figures to be the predictor's, else None."""
    slow, n = summary.get("table_slow_state_configs") or 0, summary.get("table_configs") or 0
    ceiling = summary.get("measured_ceiling")
    if n and slow > n / 4:
        return (f"this host was busy while profiling: {slow} of {n} configurations were timed in a slow state; "
                f"profile again when it is quieter (hwprune table check tells when)")
    if ceiling is not None and ceiling < NOISY_CEILING:
        return (f"this host was busy while validating: only {100 * ceiling:.0f}% of repeated timings of one "
                f"configuration agreed within 10%, so the predictor's figures describe the host as much as the predictor")
    return None
