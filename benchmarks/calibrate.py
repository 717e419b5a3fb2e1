"""Calibrating a predictor for another device or settings, against profiling a full table there.

Run on a quiet machine from the repository root:

    python benchmarks/calibrate.py [--models resnet18 mobilenet_v2 cifar_resnet56] [--ks 3 5 10 20]
                                   [--fresh 100] [--full-configs 60] [--cuda]
    python benchmarks/calibrate.py --quick     # smoke run: tiny K, a few configurations, one model

The source is the predictor of each model's ONNX Runtime 1-thread batch-1 table
(``latency_tables/2026-11-30/onnxruntime-cpu-t1-b1``). Each target is a backend and settings
this host runs (:data:`TARGETS`): ONNX Runtime at the source's own settings (only the device
differs, when this host is not the one the source tables were profiled on), ONNX Runtime with graph optimisations disabled, ONNX Runtime
at batch 8, PyTorch eager on the CPU, ONNX Runtime with 2 threads (bimodal on a shared 2-vCPU
host: the measurements' own repeatability is reported beside every target), and with
``--cuda`` PyTorch on the GPU (skipped where CUDA is absent). For every target and model:

1. ``--fresh`` random configurations, drawn with the validation seed offset (no profiling plan
   or calibration draws them), are measured end to end on the target, ``--rounds`` fresh
   sessions each, round-robin;
2. the calibration's configurations (:func:`hwprune.prediction.calibration_plan.choose_configs`,
   nested: the first K of the largest K) are measured the same way, in increments, so that the
   wall time of a calibration with K configurations (exports, sessions and fit) is timed;
3. for each K, the calibrated predictor's predictions of the fresh configurations are scored
   (share within ±5% and ±10%, RMSPE, Spearman's rho), with the source's uncorrected predictions
   beside them;
4. a full table of ``--full-configs`` configurations is profiled on the target (timed) and a
   predictor fitted to it (timed) is scored on the same fresh configurations.

Cells (target, model) are written to the result as they finish; a rerun skips finished cells
(``--redo`` measures them again). Full tables are kept in ``runs/calibrate/`` (``--resume``
continues an interrupted profile). Results: ``benchmarks/results/calibrate.json`` and
``calibrate.md`` (``--quick`` writes to a temporary directory instead).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SOURCE_TABLES = ROOT / "latency_tables" / "2026-11-30" / "onnxruntime-cpu-t1-b1"
QUICK_SOURCE = ROOT / "latency_tables" / "onnxruntime-cpu-t2-b1" / "cifar_resnet20.parquet"
MODELS = ["resnet18", "mobilenet_v2", "cifar_resnet56"]
KS = [3, 5, 10, 20]


@dataclass(frozen=True)
class TargetSpec:
    """A target device setting: a :class:`hwprune.prediction.calibrate.Target` and what it shows."""

    name: str
    backend: str
    device: str = "cpu"
    threads: int | None = 1
    batch: int = 1
    options: dict = field(default_factory=dict)
    what: str = ""

    def target(self):
        from hwprune.prediction.calibrate import Target

        return Target(self.backend, self.device, self.threads, self.batch, dict(self.options))

    def available(self) -> str | None:
        """None when this host can measure the target, else why not."""
        from hwprune.profiling.backends import get_backend_class

        return get_backend_class(self.backend).unavailable_reason(self.device)


TARGETS = {t.name: t for t in [
    TargetSpec("ort-t1", "onnxruntime",
               what="ONNX Runtime, 1 thread, batch 1: the source's own settings, so the device is all that differs "
                    "when the benchmark's CPU is not the one the source tables were profiled on"),
    TargetSpec("ort-noopt", "onnxruntime", options={"graph_optimization": "disabled"},
               what="ONNX Runtime, graph optimisations disabled (no fusions, no NCHWc layout)"),
    TargetSpec("ort-b8", "onnxruntime", batch=8, what="ONNX Runtime, batch 8"),
    TargetSpec("torch-cpu", "torch", what="PyTorch eager, CPU"),
    TargetSpec("ort-t2", "onnxruntime", threads=2, what="ONNX Runtime, 2 threads (bimodal on a shared 2-vCPU host)"),
]}
CUDA = TargetSpec("torch-cuda", "torch", device="cuda", threads=None, what="PyTorch eager, CUDA")


@dataclass
class Settings:
    ks: list
    fresh: int
    full_configs: int
    rounds: int
    seed: int = 0
    quick: bool = False
    results: Path = RESULTS
    work: Path = ROOT / "runs" / "calibrate"
    resume: bool = False
    anchor: bool = False  # sessions anchored to the unpruned model (hwprune.prediction.calibrate.measure_configs)

    def measure(self):
        from hwprune.profiling.measure import MeasureConfig

        return MeasureConfig.quick() if self.quick else MeasureConfig.profile()


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------
def source_for(model: str, st: Settings):
    """The source predictor (the quick run fits one regressor on 12 configurations)."""
    from hwprune.prediction.calibrate import load_source

    if not st.quick:
        return load_source(table=SOURCE_TABLES / f"{model}.parquet")
    from hwprune.prediction.artifact import save_predictor
    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.profiling.table import LatencyTable

    t = LatencyTable.load(QUICK_SOURCE)
    items = sorted(set(t.e2e["item"]))[:12]
    path = LatencyTable(t.rows[t.rows["item"].isin(items)], t.meta).save(st.work / "quick-source.parquet")
    pred = LatencyPredictor(regressor="extra_trees", calibration="measured").fit(LatencyTable.load(path))
    return load_source(save_predictor(pred, st.work / "quick-source.predictor.zip", path))


def fresh_configs(space, n: int, seed: int) -> list:
    from hwprune.prediction.validate import VALIDATION_SEED_OFFSET

    rng = random.Random(seed + VALIDATION_SEED_OFFSET)
    return [(f"v{i:03d}", space.sample(rng)) for i in range(n)]


def timed_increments(backend, space, configs, batch, ks, st: Settings):
    """Sessions of ``configs`` measured in increments at the ``ks`` and the cumulative wall
    time (exports and sessions) when each K was complete."""
    from hwprune.prediction.calibrate import measure_configs

    sessions, seconds, t, done = [], {}, 0.0, 0
    for k in sorted(ks):
        t0 = time.perf_counter()
        sessions += measure_configs(backend, space, configs[done:k], batch, st.rounds, anchor=st.anchor)
        t += time.perf_counter() - t0
        seconds[k], done = t, k
    return sessions, seconds


def scores(model: str, configs, predicted, sessions) -> dict:
    """The validation metrics of ``predicted`` against the measured sessions (and their own
    repeatability), through :func:`hwprune.prediction.validate.score`."""
    from hwprune.prediction.validate import ValidationSample, score

    samples = []
    for (cid, cfg), p, ss in zip(configs, predicted, sessions):
        v = [m.value_ms for m in ss]
        samples.append(ValidationSample(model, dict(cfg.widths), float(p), float(np.median(v)),
                                        float(max(v) / min(v) - 1), False, v))
    s = score(samples, [model])
    return {k: s[k] for k in ("n", "within_5pct", "within_10pct", "rmspe", "spearman", "repeatability")}


def full_table(spec: TargetSpec, model: str, backend, st: Settings) -> tuple:
    """Profile the target's full table (resumable) and fit its predictor: (predictor, profile s, fit s)."""
    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.profiling.profiler import ProfilePlan, Profiler

    out = st.work / spec.name / f"{model}.parquet"
    plan = ProfilePlan(models=(model,), batch=spec.batch, configs=st.full_configs, seed=st.seed,
                       micro_per_config=0 if st.quick else 2)
    table = Profiler(backend, plan, out).run(resume=st.resume and out.exists(), overwrite=not st.resume)
    t0 = time.perf_counter()
    pred = LatencyPredictor(**({"regressor": "extra_trees", "calibration": "measured", "min_rows": 2}
                               if st.quick else {})).fit(table)
    return pred, table.meta.profile_seconds, time.perf_counter() - t0


def cell(spec: TargetSpec, model: str, st: Settings) -> dict:
    """Everything measured for one target and one model."""
    from hwprune.prediction.calibrate import Measured, calibrate, measure_configs, renormalised
    from hwprune.prediction.calibration_plan import choose_configs
    from hwprune.profiling.fingerprint import fingerprint, machine_line

    source = source_for(model, st)
    space, backend = source.space(model), spec.target().create(st.measure())
    plan = choose_configs(space, source.predictor, max(st.ks), st.seed)
    fresh = fresh_configs(space, st.fresh, st.seed)
    t0 = time.perf_counter()
    fresh_sessions = measure_configs(backend, space, fresh, spec.batch, st.rounds, anchor=st.anchor)
    fp = fingerprint()
    out = {"target": spec.name, "model": model, "date": time.strftime("%Y-%m-%d"), "machine": machine_line(fp),
           "anchored": st.anchor,
           "fingerprint": fp, "fresh_measure_seconds": time.perf_counter() - t0,
           "source": scores(model, fresh, source.predictor.predict(model, [c for _, c in fresh]), fresh_sessions),
           "calibrated": {}}
    sessions, seconds = timed_increments(backend, space, plan, spec.batch, st.ks, st)
    settings = {**backend.settings(), "batch": spec.batch, "input_size": source.input_size}
    for k in sorted(st.ks):
        t1 = time.perf_counter()
        own = renormalised(sessions[:k])  # to the host state of these K, as `hwprune calibrate --samples K` does
        pred = calibrate(source, Measured(model, plan[:k], own, settings, fingerprint(), seconds[k]))
        fit_s = time.perf_counter() - t1
        out["calibrated"][str(k)] = {**scores(model, fresh, pred.predict(model, [c for _, c in fresh]), fresh_sessions),
                                     "seconds": seconds[k] + fit_s, "fit_seconds": fit_s,
                                     "correction": pred.corrections_[model].to_dict()}
    full, prof_s, fit_s = full_table(spec, model, backend, st)
    out["full"] = {**scores(model, fresh, full.predict(model, [c for _, c in fresh]), fresh_sessions),
                   "configs": st.full_configs, "profile_seconds": prof_s, "fit_seconds": fit_s,
                   "seconds": prof_s + fit_s}
    return out


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------
def source_machine(st: Settings) -> str:
    from hwprune.profiling.fingerprint import machine_line
    from hwprune.profiling.table import LatencyTable

    path = QUICK_SOURCE if st.quick else SOURCE_TABLES / f"{MODELS[0]}.parquet"
    return machine_line(LatencyTable.load(path).meta.fingerprint) if path.exists() else "unknown"


def _row(label: str, d: dict, seconds: str) -> str:
    return (f"| {label} | {100 * d['within_5pct']:.0f}% | {100 * d['within_10pct']:.0f}% | "
            f"{100 * d['rmspe']:.1f}% | {d['spearman']:.3f} | {seconds} |")


def markdown(doc: dict) -> str:
    lines = ["# Calibration for other devices and settings, against full profiling", "",
             f"Generated by `{doc['command']}`; each section names the machine and the date it was measured on.", "",
             f"Source: the predictor of each model's table in `{doc['source']}` (ONNX Runtime CPU, profiled on "
             f"{doc.get('source_machine', 'the source machine')}). Scored on "
             f"{doc['fresh']} fresh random configurations per model and target, each measured in {doc['rounds']} "
             "fresh session(s) (median). *Calibrated*: `hwprune calibrate` with K configurations measured on the "
             "target; its time is the measurement (exports and sessions) and the fit. *Full table*: a table "
             f"profiled on the target ({doc['full_configs']} configurations) and a predictor fitted to it.", ""]
    for c in doc["cells"]:
        rep = c["source"].get("repeatability") or {}
        noise = (f"Measurements against themselves (one session vs the others): {100 * rep['within_5pct']:.0f}% "
                 f"within ±5%, {100 * rep['within_10pct']:.0f}% within ±10%." if rep else
                 "One session per configuration: no repeatability measured.")
        where = (f"Measured on {c.get('machine', doc.get('machine'))}, {c.get('date', doc.get('date'))}, sessions "
                 + ("anchored to the unpruned model." if c.get("anchored") else "as timed (not anchored)."))
        lines += [f"## {c['target']}: {c['model']}{', anchored' if c.get('anchored') else ''}", "", f"{TARGETS.get(c['target'], CUDA).what}. {where} {noise}", "",
                  "| predictor | within ±5% | within ±10% | RMSPE | Spearman | wall time (s) |",
                  "|---|---|---|---|---|---|", _row("source, uncorrected", c["source"], "-")]
        for k, d in c["calibrated"].items():
            lines.append(_row(f"calibrated, K={k}", d, f"{d['seconds']:.0f}"))
        f = c["full"]
        lines += [_row(f"full table ({f['configs']} configurations)", f, f"{f['seconds']:.0f}"), ""]
    for s in doc.get("skipped", []):
        lines.append(f"Skipped {s['target']}: {s['why']}.")
    return "\n".join(lines) + "\n"


def save(doc: dict, st: Settings, stem: str = "calibrate") -> None:
    from hwprune.atomic import atomic_write_text

    atomic_write_text(st.results / f"{stem}.json", json.dumps(doc, indent=1, default=str))
    atomic_write_text(st.results / f"{stem}.md", markdown(doc))


def run(models: list, specs: list, st: Settings, redo: bool = False) -> dict:
    from hwprune.profiling.fingerprint import fingerprint, machine_line

    path = st.results / "calibrate.json"
    doc = json.loads(path.read_text()) if path.exists() and not redo else {"cells": []}
    fp = fingerprint()
    doc.update({"machine": machine_line(fp), "date": time.strftime("%Y-%m-%d"), "source_machine": source_machine(st),
                "command": " ".join(["python", "benchmarks/calibrate.py", *sys.argv[1:]]), "source": str(
                    (QUICK_SOURCE if st.quick else SOURCE_TABLES).relative_to(ROOT)), "fresh": st.fresh,
                "rounds": st.rounds, "full_configs": st.full_configs, "ks": st.ks, "skipped": []})
    done = {(c["target"], c["model"], c.get("anchored", False)) for c in doc["cells"]}
    for spec in specs:
        why = spec.available()
        if why:
            doc["skipped"].append({"target": spec.name, "why": why})
            continue
        for model in models:
            if (spec.name, model, st.anchor) in done:
                continue
            print(f"{spec.name} / {model} ...", file=sys.stderr, flush=True)
            doc["cells"].append(cell(spec, model, st))
            save(doc, st)
    save(doc, st)
    return doc


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS),
                    help="CPU targets (none: only --cuda)")
    ap.add_argument("--ks", type=int, nargs="+", default=KS, help="calibration sizes K")
    ap.add_argument("--fresh", type=int, default=100, help="fresh configurations scored per model and target")
    ap.add_argument("--full-configs", type=int, default=60, help="configurations of the full table on the target")
    ap.add_argument("--rounds", type=int, default=2, help="fresh sessions per configuration")
    ap.add_argument("--cuda", action="store_true", help="also PyTorch on CUDA (skipped without CUDA)")
    ap.add_argument("--redo", action="store_true", help="measure finished cells again")
    ap.add_argument("--anchor", action="store_true",
                    help="anchor the sessions to the unpruned model's probes between them (hwprune calibrate --anchor)")
    ap.add_argument("--resume", action="store_true", help="continue interrupted full-table profiles")
    ap.add_argument("--quick", action="store_true", help="smoke run (tiny K, few configurations, one model), "
                                                         "results in a temporary directory")
    args = ap.parse_args()
    st = Settings(args.ks, args.fresh, args.full_configs, args.rounds, resume=args.resume, anchor=args.anchor)
    models = args.models
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="hwprune-calibrate-bench-"))
        st = replace(st, ks=[1, 3], fresh=4, full_configs=4, rounds=1, quick=True, results=tmp, work=tmp)
        models = ["cifar_resnet20"]
    st.work.mkdir(parents=True, exist_ok=True)
    specs = [TARGETS[t] for t in args.targets] + ([CUDA] if args.cuda else [])
    run(models, specs, st, redo=args.redo or args.quick)
    print(f"results: {st.results / 'calibrate.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
