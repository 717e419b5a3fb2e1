"""How well does the predictor know this device? Fresh pruned models, predicted vs measured.

Run on a quiet machine from the repository root, after ``benchmarks/profile_tables.py``:

    python benchmarks/predictor_accuracy.py [--samples 50] [--batches 1 8]

For each batch size the shipped tables of resnet18, resnet50, mobilenet_v2 and
cifar_resnet56 are merged and one predictor is fitted to them (fit time recorded). Then
``samples`` random width configurations per model, drawn with a seed no profiling plan
uses, are built, exported and measured end to end in fresh ONNX Runtime sessions, models
interleaved, and compared with the predictions. The same is done for two model families
that were not used while the features were designed (cifar_vgg16_bn and efficientnet_b0,
batch 1). Prediction speed: 10,000 random resnet50 configurations.

Results: ``benchmarks/results/predictor.json``, ``predictor.md`` and one plot per run.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "cifar_resnet56"]
UNSEEN = ["cifar_vgg16_bn", "efficientnet_b0"]


THREADS = 2  # intra-op threads of the tables validated (--threads)
ROUNDS = 2  # fresh sessions per configuration (--rounds)
PAIRED = False  # time the unpruned model beside every session (--paired)
SEED_OFFSET = 0  # added to the validation seed (--seed-offset): draws configurations no earlier run measured
STEM = None  # result file names (--results), else from the settings
TABLES = ROOT / "latency_tables"  # holds the onnxruntime-cpu-tN-bB folders (--tables)


def stem() -> str:
    """Result files: predictor.* for the 2-thread tables, predictor_t1.* for 1 thread,
    predictor_t1_paired.* for paired runs, ... (or --results NAME)"""
    if STEM:
        return STEM
    return ("predictor" if THREADS == 2 else f"predictor_t{THREADS}") + ("_paired" if PAIRED else "")


def load(models, batch):
    from hwprune.profiling.table import LatencyTable

    tables = [LatencyTable.load(TABLES / f"onnxruntime-cpu-t{THREADS}-b{batch}" / f"{m}.parquet")
              for m in models]
    return functools.reduce(lambda a, b: a.merge(b), tables)


def run(models, batch, samples, tag, gate=None):
    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.progress import item_progress
    from hwprune.prediction.validate import plot_validation, validate

    table = load(models, batch)
    t0 = time.perf_counter()
    pred = LatencyPredictor().fit(table)
    fit_s = time.perf_counter() - t0
    with item_progress(f"validating {tag} batch {batch}") as update:
        res = validate(table, models, samples, seed=batch + SEED_OFFSET, predictor=pred, rounds=ROUNDS,
                       progress=update, gate=gate, paired=PAIRED)
    png = RESULTS / f"{stem()}_{tag.split(':')[0].replace(' ', '_')}_b{batch}.png"
    plot_validation(res, png, title=f"{tag}, batch {batch}: n={res.n}, {100 * res.within_5pct:.0f}% within ±5%, "
                                    f"{100 * res.within_10pct:.0f}% within ±10%")
    d = res.to_dict(with_samples=True)
    d.update({"batch": batch, "models": models, "gate": gate, "seed": batch + SEED_OFFSET, "fit_seconds": fit_s,
              "selection": pred.selection_,
              "plot": str(png.relative_to(ROOT))})
    return d, pred


def repredict(r: dict) -> dict:
    """Predict a run's stored measurements again with the current predictor (no new measurement).

    The tables and the measured configurations stay the same; only the fit and the
    predictions are redone. The first predictions' metrics are kept under ``as_measured``.
    """
    import subprocess

    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.prediction.validate import plot_validation, repredict as rescore

    table = load(r["models"], r["batch"])
    t0 = time.perf_counter()
    pred = LatencyPredictor().fit(table)
    fit_s = time.perf_counter() - t0
    keep = ("within_5pct", "within_10pct", "rmspe", "spearman", "per_model")
    r.setdefault("as_measured", {k: r[k] for k in keep})
    res = rescore(table, r, pred)
    samples = res.samples
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # the drift factors are measurements; the drift-corrected metrics follow the new predictions
    scored = res.to_dict()
    r.update({k: scored[k] for k in ("n", "within_5pct", "within_10pct", "rmspe", "spearman", "worst",
                                     "per_model", "drift_corrected", "repeatability", "relative")})
    r["samples"] = [{**x, "predicted_ms": s.predicted_ms, "extrapolated": s.extrapolated, "error": s.error,
                     **({"predicted_reference_ms": s.predicted_reference_ms, "relative_error": s.relative_error}
                        if s.reference_ms else {})}
                    for x, s in zip(r["samples"], samples)]
    r.update({"fit_seconds": fit_s, "selection": pred.selection_,
              "repredicted": f"predictions re-made on {time.strftime('%Y-%m-%d')} by the predictor of commit {rev} "
                             "(on top of it: uncommitted changes, if any); measurements unchanged"})
    png = RESULTS / f"{stem()}_{r['tag'].split(':')[0].replace(' ', '_')}_b{r['batch']}.png"  # this file's name
    r["plot"] = str(png.relative_to(ROOT))
    plot_validation(res, png,
                    title=f"{r['tag']}, batch {r['batch']}: n={r['n']}, {100 * r['within_5pct']:.0f}% within "
                          f"±5%, {100 * r['within_10pct']:.0f}% within ±10%")
    return r


def speed_configs(n: int = 10_000) -> list:
    """The configurations prediction speed is timed on: ``n`` random resnet50 ones (seed 7)."""
    from hwprune.pruning.space import PruningSpace

    space = PruningSpace.from_name("resnet50")
    rng = random.Random(7)
    return [space.sample(rng) for _ in range(n)]


def speed(pred, configs: list | None = None) -> dict:
    configs = speed_configs() if configs is None else configs
    t0 = time.perf_counter()
    p = pred.predict("resnet50", configs)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred.marginal_costs("resnet50", configs[0])
    mc = time.perf_counter() - t0
    return {"configs": len(configs), "seconds": dt, "per_config_ms": 1000 * dt / len(configs),
            "marginal_costs_seconds": mc, "predicted_ms_range": [float(p.min()), float(p.max())]}


def write(results: dict) -> None:
    from hwprune.prediction.validate import session_deviations

    RESULTS.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(results, default=float))
    (RESULTS / f"{stem()}.json").write_text(json.dumps(slim, indent=1) + "\n")
    rounds = results.get("rounds", 2)
    flags = (f"{'' if THREADS == 2 else f' --threads {THREADS}'}{'' if rounds == 2 else f' --rounds {rounds}'}"
             f"{' --paired' if results.get('paired') else ''}")
    if results.get("seed_offset"):
        flags += f" --seed-offset {results['seed_offset']}"
    if TABLES != ROOT / "latency_tables":
        flags += f" --tables {TABLES.name}"
    if STEM:
        flags += f" --results {STEM}"
    lines = ["# Latency predictor: predicted vs measured end to end", "",
             f"Machine: {results['machine']}. ONNX Runtime CPU, {results.get('threads', 2)} thread(s). Held-out random "
             f"width configurations, each measured in {rounds} fresh sessions (median of the {rounds}), all "
             f"configurations round-robin. Generated by `python benchmarks/predictor_accuracy.py{flags}`.", ""]
    gates = sorted({r.get("gate") for r in results["runs"] if r.get("gate")})
    if gates:
        lines += [f"Measurements gated on the host's state (`--gate {gates[0]:g}`): a short timing of the unpruned "
                  "model precedes every session, and only sessions whose timing was within that fraction of the "
                  "model's fastest count. The tables were profiled gated as well (see profiling.md).", ""]
    lines += ["| run | batch | gated | n | within ±5% | within ±10% | RMSPE | Spearman | fit (s) |", "|---|---|---|---|---|---|---|---|---|"]
    def cells(d: dict) -> str:  # n | within ±5% | within ±10% | RMSPE | Spearman
        return (f"{d['n']} | {100 * d['within_5pct']:.1f}% | {100 * d['within_10pct']:.1f}% | "
                f"{100 * d['rmspe']:.2f}% | {d['spearman']:.3f}")

    for r in results["runs"]:
        lines.append(f"| {r['tag']} | {r['batch']} | {'yes' if r.get('gate') else 'no'} | {cells(r)} | "
                     f"{r['fit_seconds']:.1f} |")
        lines += [f"| &nbsp;&nbsp;{m} | {r['batch']} | | {cells(pm)} | |" for m, pm in r["per_model"].items()]
    paired = [r for r in results["runs"] if r.get("relative")]
    if paired:
        lines += ["", "Paired: every session also timed the unpruned model in the same window (alternating chunks "
                      "of about 50 ms, `hwprune validate --paired`). Here the latency *relative to the unpruned "
                      "model* is predicted (predicted / predicted unpruned) against measured (median over the "
                      "sessions of the configuration's time over the unpruned model's in the same window). A "
                      "neighbour that slows the host for a while slows both alike, and the host running faster or "
                      "slower than when the table was profiled cancels, so what remains is mostly the predictor's "
                      "own error. *Ratios repeat*: one session's ratio against the median of the same "
                      "configuration's other sessions (the ceiling for this column, as above for absolute times).",
                  "", "| run | batch | n | within ±5% | within ±10% | RMSPE | Spearman | ratios repeat within 5% "
                      "| within 10% |", "|---|---|---|---|---|---|---|---|---|"]
        for r in paired:
            c, rr = r["relative"], r["relative"].get("repeatability") or {}
            lines.append(f"| {r['tag']} | {r['batch']} | {cells(c)} | "
                         f"{100 * rr.get('within_5pct', float('nan')):.0f}% | "
                         f"{100 * rr.get('within_10pct', float('nan')):.0f}% |")
            lines += [f"| &nbsp;&nbsp;{m} | {r['batch']} | {cells(pm)} | | |" for m, pm in c["per_model"].items()]
    redone = [r for r in results["runs"] if r.get("as_measured")]
    if redone:
        lines += ["", f"The predictions above were re-made on the stored measurements ({redone[0]['repredicted']}). "
                      "The predictions made when the configurations were measured, by the predictor of that time "
                      f"({results.get('measured_with', 'see the notes')}):", "",
                  "| run | batch | within ±5% | within ±10% | RMSPE | Spearman |", "|---|---|---|---|---|---|"]
        for r in redone:
            a = r["as_measured"]
            lines.append(f"| {r['tag']} | {r['batch']} | {100 * a['within_5pct']:.1f}% | {100 * a['within_10pct']:.1f}% | "
                         f"{100 * a['rmspe']:.2f}% | {a['spearman']:.3f} |")
            for m, pm in a["per_model"].items():
                lines.append(f"| &nbsp;&nbsp;{m} | {r['batch']} | {100 * pm['within_5pct']:.1f}% | "
                             f"{100 * pm['within_10pct']:.1f}% | {100 * pm['rmspe']:.2f}% | {pm['spearman']:.3f} |")
    lines += ["", f"Reproducibility of the measurements themselves: each configuration was measured in {rounds} fresh "
                  "sessions. The spread between them (max/min - 1), how often one session landed within 5% and 10% of "
                  "the median of the configuration's other sessions (measured against measured: the ceiling these "
                  "measurements allow any predictor; older result files do not keep the sessions), and "
                  "the predictor's accuracy where the sessions agreed within 2%:", "",
              "| run | batch | model | median session spread | p90 spread | session vs others within 5% | within 10% "
              "| n (spread < 2%) | within ±5% there | within ±10% there |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        for m in r["per_model"]:
            ss = [x for x in r.get("samples", []) if x["model"] == m]
            if not ss or "session_spread" not in ss[0]:
                continue
            sp = np.array([x["session_spread"] for x in ss])
            err = np.abs(np.array([x["error"] for x in ss]))
            steady = sp < 0.02
            w5 = f"{100 * np.mean(err[steady] <= 0.05):.0f}%" if steady.any() else "-"
            w10 = f"{100 * np.mean(err[steady] <= 0.10):.0f}%" if steady.any() else "-"
            loo = session_deviations(x.get("sessions_ms") or [] for x in ss)
            r5 = f"{100 * np.mean(loo <= 0.05):.0f}%" if len(loo) else "-"
            r10 = f"{100 * np.mean(loo <= 0.10):.0f}%" if len(loo) else "-"
            lines.append(f"| {r['tag']} | {r['batch']} | {m} | {100 * np.median(sp):.1f}% | "
                         f"{100 * np.quantile(sp, 0.9):.1f}% | {r5} | {r10} | {int(steady.sum())} | {w5} | {w10} |")
    drifted = [r for r in results["runs"] if r.get("drift")]
    if drifted:
        lines += ["", "Host drift: the unpruned model timed during validation (gated runs: its probes; paired runs: "
                      "its half of every pair) against the table (gated tables: its probes; paired runs: its "
                      "end-to-end row of the unpruned model), and the accuracy once every prediction is "
                      "multiplied by its model's factor:",
                  "", "| run | batch | model | unpruned when profiled (ms) | unpruned now (ms) | factor |",
                  "|---|---|---|---|---|---|"]
        for r in drifted:
            for m, d in r["drift"].items():
                lines.append(f"| {r['tag']} | {r['batch']} | {m} | {d['table_reference_ms']:.3f} | "
                             f"{d['reference_ms']:.3f} | {d['factor']:.3f} |")
            c = r.get("drift_corrected") or {}
            if c:
                lines.append(f"| {r['tag']} | {r['batch']} | all, drift-corrected | | | {100 * c['within_5pct']:.1f}% "
                             f"within ±5%, {100 * c['within_10pct']:.1f}% within ±10% |")
    s = results.get("speed")
    if s:
        lines += ["", f"Prediction speed: {s['configs']} random resnet50 configurations in {s['seconds']:.2f} s "
                      f"({s['per_config_ms']:.3f} ms each); marginal costs of all groups at one configuration in "
                      f"{1000 * s['marginal_costs_seconds']:.0f} ms"
                      + (f" (timed with {s['timed_with']}; it replaces {s['replaces']['seconds']:.2f} s timed "
                         f"{s['replaces'].get('timed_with', 'with the validation')})" if s.get("replaces") else "")
                      + "."]
    lines += ["", "Targets: at least 99% within ±10% and 90% within ±5% (nn-Meter: 99.0% within ±10% on a "
                  "mobile CPU)."]
    if results.get("notes"):  # hand-written, kept in predictor.json
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    (RESULTS / f"{stem()}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    global THREADS, ROUNDS, PAIRED, SEED_OFFSET, STEM, TABLES
    import warnings

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--skip-unseen", action="store_true")
    ap.add_argument("--unseen-models", nargs="+", default=UNSEEN,
                    help="held-out families validated at batch 1 (samples // 2 configurations each)")
    ap.add_argument("--gate", type=float, default=None,
                    help="gate the measurements on the host's state (hwprune validate --gate F)")
    ap.add_argument("--rewrite", action="store_true", help="only regenerate predictor.md from predictor.json")
    ap.add_argument("--replot", action="store_true", help="only draw the runs' plots again from the stored samples")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="validate the tables in latency_tables/onnxruntime-cpu-tN-bB (results: predictor_tN.*)")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="fresh sessions per configuration")
    ap.add_argument("--repredict", action="store_true",
                    help="fit the predictor again and re-predict the stored measurements (nothing is measured)")
    ap.add_argument("--paired", action="store_true",
                    help="time the unpruned model beside every session (hwprune validate --paired) and report "
                         "the relative accuracy too; results: predictor_tN_paired.*")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="added to the validation seed, to draw configurations no earlier run measured")
    ap.add_argument("--results", default=None,
                    help="name of the result files (default: predictor_tN[_paired]), to keep another run apart")
    ap.add_argument("--speed", action="store_true",
                    help="only time the prediction again (a predictor fitted to the batch-1 tables; nothing is "
                         "measured end to end) and replace the speed in the results")
    ap.add_argument("--tables", default=None,
                    help="validate the tables in latency_tables/DIR/onnxruntime-cpu-tN-bB (another host's, "
                         "profiled with profile_tables.py --tables DIR)")
    args = ap.parse_args()
    if args.tables:
        TABLES = ROOT / "latency_tables" / args.tables
    THREADS, ROUNDS, PAIRED, SEED_OFFSET, STEM = args.threads, args.rounds, args.paired, args.seed_offset, args.results
    if args.speed:
        import subprocess

        from hwprune.prediction.predictor import LatencyPredictor

        results = json.loads((RESULTS / f"{stem()}.json").read_text())
        old = results.get("speed")
        results["speed"] = speed(LatencyPredictor().fit(load(MODELS, 1)))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        results["speed"]["timed_with"] = f"commit {rev}, {time.strftime('%Y-%m-%d %H:%M')}"
        if old:
            results["speed"]["replaces"] = {k: old[k] for k in ("seconds", "marginal_costs_seconds", "timed_with")
                                            if k in old}
        write(results)
        print((RESULTS / f"{stem()}.md").read_text())
        return
    if args.repredict:
        results = json.loads((RESULTS / f"{stem()}.json").read_text())
        results["runs"] = [repredict(r) for r in results["runs"]]
        write(results)
        print((RESULTS / f"{stem()}.md").read_text())
        return
    if args.replot:
        from hwprune.prediction.validate import ValidationResult, ValidationSample, plot_validation

        results = json.loads((RESULTS / f"{stem()}.json").read_text())
        fields = ValidationSample.__dataclass_fields__
        for r in results["runs"]:
            samples = [ValidationSample(**{k: v for k, v in x.items() if k in fields}) for x in r["samples"]]
            res = ValidationResult(**{k: r[k] for k in ("n", "within_5pct", "within_10pct", "rmspe", "spearman",
                                                        "worst", "per_model", "settings", "device",
                                                        "measure_seconds")}, samples=samples)
            plot_validation(res, ROOT / r["plot"],
                            title=f"{r['tag']}, batch {r['batch']}: n={r['n']}, {100 * r['within_5pct']:.0f}% "
                                  f"within ±5%, {100 * r['within_10pct']:.0f}% within ±10%")
            print(r["plot"])
        return
    if args.rewrite:
        write(json.loads((RESULTS / f"{stem()}.json").read_text()))
        print((RESULTS / f"{stem()}.md").read_text())
        return
    from hwprune.profiling.fingerprint import fingerprint

    fp = fingerprint()
    # runs not repeated this time (another batch size, or the unseen families) are kept from the last results
    prev_path = RESULTS / f"{stem()}.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    results = {"machine": f"{fp['cpu_model']}, {fp['cpu_cores']} cores", "threads": THREADS, "rounds": ROUNDS,
               "paired": PAIRED, "seed_offset": SEED_OFFSET, "runs": prev.get("runs", []),
               "notes": prev.get("notes", [])}
    if prev.get("speed"):
        results["speed"] = prev["speed"]
    if prev.get("measured_with"):
        results["measured_with"] = prev["measured_with"]

    def put(d: dict) -> None:
        key = (d["tag"], d["batch"])
        runs = [r for r in results["runs"] if (r["tag"], r["batch"]) != key] + [d]
        order = {"main": 0, "unseen": 1}
        results["runs"] = sorted(runs, key=lambda r: (order.get(r["tag"], 2), r["batch"]))
        write(results)

    first = None
    for batch in args.batches:
        d, pred = run(MODELS, batch, args.samples, "main", args.gate)
        d["tag"] = "main"
        put(d)
        first = first or pred
    if first is not None:
        results["speed"] = speed(first)
    if not args.skip_unseen:
        # the default families were profiled before the features were designed; any other list is
        # reported under its own tag (families that influenced no design choice at all)
        tag = "unseen" if args.unseen_models == UNSEEN else "never used: " + ", ".join(args.unseen_models)
        d, _ = run(args.unseen_models, 1, max(10, args.samples // 2), tag, args.gate)
        d["tag"] = tag
        put(d)
    write(results)
    print((RESULTS / f"{stem()}.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
