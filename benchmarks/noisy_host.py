"""Tables and predictions while the host is busy: profiling and validation under a known noisy neighbour.

Run on a quiet machine from the repository root (the script brings its own noise):

    python benchmarks/noisy_host.py [--models resnet18 mobilenet_v2 cifar_resnet56] [--configs 60]
                                    [--fresh 100] [--rounds 2] [--patterns none cpu bursts membw cpu-full]
                                    [--modes before after] [--pin 0]
    python benchmarks/noisy_host.py --quick     # smoke run: one small model, a few configurations, short

For every noise pattern (``none`` and the patterns of :mod:`hwprune.bench.noise`, the neighbour
pinned to the CPU the measurement runs on, ``--pin``) and every mode, and for every model (batch 1,
1 ONNX Runtime thread):

1. a table of ``--configs`` configurations is profiled while the neighbour runs (timed);
2. a predictor is fitted to it (neighbour stopped; timed);
3. ``--fresh`` random configurations, drawn with the validation seed offset (held out of every
   profiling plan), are measured end to end while the neighbour runs, ``--rounds`` fresh sessions
   each, paired with the unpruned model (timed), and scored: the share within ±5% and ±10% of the
   absolute latency and of the latency relative to the unpruned model, the same against the
   measurements normalised to the table's host state (anchored mode), and for each the ceiling
   (measured against measured, one session against the others) and the gap's split between host
   and predictor.

Modes: ``before`` profiles and validates as tables were made before anchoring (no reference windows,
the median of a fixed window, ``hwprune profile --no-anchor``, ``validate --no-anchor``); ``after``
is the default protocol (reference windows, normalisation, the estimator chosen on the reference,
windows repeated until the estimate is known within ±2%, anchored validation).

Targets checked in the result: under ``cpu`` and ``bursts``, after: at least 95% within ±10% and
within 3 points of the ceiling; under ``none``, after no worse than before.

The process is pinned to one CPU, so the tables it profiles describe a one-CPU device: validate or use
them pinned the same way (``taskset -c 0``). Cells (pattern, mode, model) are written to the result as they finish; a rerun skips finished cells
(``--redo`` measures them again). Tables are kept in ``runs/noisy_host/`` (an interrupted profile
resumes). Results: ``benchmarks/results/noisy_host.json`` and ``noisy_host.md`` (``--quick`` writes
to a temporary directory instead, never into the repository).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "noisy_host"
MODELS = ["resnet18", "mobilenet_v2", "cifar_resnet56"]
PATTERNS = ["none", "cpu", "bursts", "membw", "cpu-full"]
MODES = ["before", "after"]
TARGET_PATTERNS = ("cpu", "bursts")
VIEWS = ("absolute", "relative", "normalised")


def measure_config(mode: str, quick: bool):
    """The end-to-end protocol of ``mode``: fixed windows before, adaptive ones after."""
    from hwprune.profiling.measure import MeasureConfig

    if not quick:
        return MeasureConfig.profile(adaptive=mode == "after")
    cfg = MeasureConfig.quick()
    return replace(cfg, ci_target=0.02, ci_max_time_s=0.2) if mode == "after" else cfg


@contextlib.contextmanager
def neighbour(pattern: str, cpu: int | None):
    """The noisy neighbour of ``pattern`` while the block runs (nothing for ``none``); yields a dict
    that receives the duty cycle it held."""
    held: dict = {}
    if pattern == "none":
        yield held
        return
    from hwprune.bench.noise import NoisyNeighbour

    with NoisyNeighbour(pattern, cpu=cpu) as hog:
        try:
            yield held
        finally:
            held.update({"pid": hog.pid, "duty": round(hog.duty(), 4), "held_duty": round(hog.held_duty(), 4),
                         "expected_duty": hog.pattern.expected_duty()})


def profile_cell(model: str, mode: str, pattern: str, args, tables: Path) -> tuple[Path, dict]:
    """Profile ``model``'s table under ``pattern``; returns its path and what the profile cost."""
    from hwprune.profiling.backends import create_backend
    from hwprune.profiling.profiler import AnchorConfig, profile
    from hwprune.profiling.table import LatencyTable

    out = tables / f"{pattern}-{mode}" / f"{model}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    resume = out.exists()
    if resume and LatencyTable.load(out, allow_empty=True).complete:
        t = LatencyTable.load(out)
        return out, {"profile_seconds": t.meta.profile_seconds, "noise": t.noise_summary(), "reused": True}
    be = create_backend("onnxruntime", threads=1, measure=measure_config(mode, args.quick))
    with neighbour(pattern, args.noise_cpu) as held:
        t0 = time.perf_counter()
        table = profile(model, out, be, batch=1, configs=args.configs, micro_per_config=args.micro, seed=0,
                        resume=resume, anchor=AnchorConfig() if mode == "after" else None)
        seconds = time.perf_counter() - t0
    return out, {"profile_seconds": seconds, "noise": table.noise_summary(), "neighbour": held}


def validate_cell(path: Path, model: str, mode: str, pattern: str, args) -> dict:
    """Fit the table's predictor (neighbour stopped), then validate it under ``pattern``."""
    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.prediction.validate import validate
    from hwprune.profiling.table import LatencyTable

    table = LatencyTable.load(path)
    t0 = time.perf_counter()
    quick = {"regressor": "hgb", "calibration": "measured"} if args.quick else {}  # no selection by CV
    pred = LatencyPredictor(**quick).fit(table)
    fit_s = time.perf_counter() - t0
    with neighbour(pattern, args.noise_cpu) as held:
        t0 = time.perf_counter()
        res = validate(table, [model], args.fresh, seed=0, predictor=pred, measure=measure_config(mode, args.quick),
                       rounds=args.rounds, paired=True, anchor=mode == "after")
        seconds = time.perf_counter() - t0
    return {"fit_seconds": fit_s, "validate_seconds": seconds, "neighbour_validate": held,
            "scores": scores(res), "verdict": res.ceiling.get("verdict"),
            "samples": res.to_dict(with_samples=True)["samples"]}


def scores(res) -> dict:
    """Per view: the predictor's share within ±5%/±10%, the ceiling's, the gap's split at ±10%."""
    out = {}
    for view in VIEWS:
        met = {"absolute": {"within_5pct": res.within_5pct, "within_10pct": res.within_10pct, "rmspe": res.rmspe},
               "relative": res.relative, "normalised": res.normalised}[view]
        if not met:
            continue
        split = (res.ceiling.get("views") or {}).get(view, {})
        out[view] = {"within_5pct": met["within_5pct"], "within_10pct": met["within_10pct"], "rmspe": met["rmspe"],
                     "ceiling_5pct": (split.get("within_5pct") or {}).get("ceiling"),
                     "ceiling_10pct": (split.get("within_10pct") or {}).get("ceiling"),
                     "host_share_10pct": (split.get("within_10pct") or {}).get("host_share")}
    return out


def targets(cells: dict) -> list[dict]:
    """The targets per model and view: under cpu and bursts (after) 95% within ±10% and within 3
    points of the ceiling; under none, after no worse than before at ±10% (on one machine)."""
    out = []
    models = sorted({k.split("/")[2] for k in cells})
    for model, view in ((m, v) for m in models for v in VIEWS):
        for pattern in TARGET_PATTERNS:
            c = (cells.get(f"{pattern}/after/{model}") or {}).get("scores", {}).get(view)
            if c and c["ceiling_10pct"] is not None:
                ok = c["within_10pct"] >= 0.95 and c["ceiling_10pct"] - c["within_10pct"] <= 0.03
                out.append({"model": model, "view": view, "pattern": pattern, "met": ok,
                            "what": f"{100 * c['within_10pct']:.1f}% within ±10%, ceiling {100 * c['ceiling_10pct']:.1f}%"})
        a = (cells.get(f"none/after/{model}") or {}).get("scores", {}).get(view)
        b = (cells.get(f"none/before/{model}") or {}).get("scores", {}).get(view)
        same = (cells.get(f"none/after/{model}") or {}).get("machine") == (cells.get(f"none/before/{model}") or {}).get("machine")
        if a and b and same:
            out.append({"model": model, "view": view, "pattern": "none", "met": a["within_10pct"] >= b["within_10pct"],
                        "what": f"after {100 * a['within_10pct']:.1f}%, before {100 * b['within_10pct']:.1f}% within ±10%"})
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def machines(doc: dict) -> list[str]:
    """The machines the cells ran on, in order of first appearance (a cell's number in the table)."""
    return list(dict.fromkeys(f"{c.get('machine', 'unknown')}, {c.get('date', '?')}" for c in doc["cells"].values()))


def _header(doc: dict) -> list[str]:
    s = doc["settings"]
    legend = [f"{i + 1}. {m}" for i, m in enumerate(machines(doc))]
    return [f"# Profiling and validation under a noisy neighbour ({s['date']})", "",
            f"Command: `{s['command']}`. ONNX Runtime {s['ort']}, batch 1, 1 thread, measurement "
            f"pinned to CPU {s['pin']}, neighbour on CPU {s['noise_cpu']}. {s['configs']} profiled and {s['fresh']} "
            f"fresh configurations per model, {s['rounds']} paired sessions each. `before`: no reference windows, "
            f"fixed windows, median; `after`: the default protocol (docs/noisy-host.md). Each cell profiles and "
            f"validates on one machine (its number below); before and after are compared only on one machine.", "",
            "Machines:", "", *legend, "",
            "Shares in percent: predictor / ceiling (measured against measured), within ±5% and ±10%.", "",
            "| model | noise | mode | machine | profile s | validate s | absolute ±5 | absolute ±10 | relative ±5 "
            "| relative ±10 | normalised ±5 | normalised ±10 | estimator | re-measured |",
            "|---|---|---|---:|---:|---:|---|---|---|---|---|---|---|---:|"]


def _cell_row(key: str, c: dict, number: int) -> str:
    pattern, mode, model = key.split("/")
    sc = c.get("scores", {})

    def pair(v, b):
        d = sc.get(v)
        return "-" if not d else f"{_pct(d[f'within_{b}pct'])} / {_pct(d[f'ceiling_{b}pct'])}"

    noise = c.get("noise") or {}
    est = (noise.get("estimator") or {}).get("name", "median")
    return (f"| {model} | {pattern} | {mode} | {number} | {c['profile_seconds']:.0f} | {c.get('validate_seconds', 0):.0f} "
            f"| {pair('absolute', 5)} | {pair('absolute', 10)} | {pair('relative', 5)} | {pair('relative', 10)} "
            f"| {pair('normalised', 5)} | {pair('normalised', 10)} | {est} | {noise.get('remeasured', '-')} |")


def markdown(doc: dict) -> str:
    number = {m: i + 1 for i, m in enumerate(machines(doc))}
    lines = _header(doc)
    for key, c in doc["cells"].items():
        lines.append(_cell_row(key, c, number[f"{c.get('machine', 'unknown')}, {c.get('date', '?')}"]))
    verdicts = [(k, c["verdict"]) for k, c in doc["cells"].items() if c.get("verdict")]
    if verdicts:
        lines += ["", "Where the host was too noisy for the claim:", ""] + [f"- {k}: {v}" for k, v in verdicts]
    lines += ["", "## Targets", "", "| model | view | noise | met | result |", "|---|---|---|---|---|"]
    lines += [f"| {t['model']} | {t['view']} | {t['pattern']} | {'yes' if t['met'] else 'no'} | {t['what']} |"
              for t in doc["targets"]]
    return "\n".join(lines) + "\n"


def settings(args) -> dict:
    import datetime as dt

    from hwprune.device.ort_runner import ort_version
    from hwprune.profiling.fingerprint import fingerprint, machine_line

    fp = fingerprint()
    return {"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
            "host": machine_line(fp), "ort": ort_version(), "pin": args.pin,
            "noise_cpu": args.noise_cpu, "configs": args.configs, "fresh": args.fresh, "rounds": args.rounds,
            "models": args.models, "patterns": args.patterns, "modes": args.modes, "quick": args.quick}


def write(doc: dict, results: Path) -> None:
    from hwprune.atomic import atomic_write_text

    doc["targets"] = targets(doc["cells"])
    atomic_write_text(results / "noisy_host.json", json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write_text(results / "noisy_host.md", markdown(doc))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--configs", type=int, default=60, help="profiled configurations per model")
    ap.add_argument("--micro", type=int, default=2, help="isolated unit benchmarks per profiled configuration")
    ap.add_argument("--fresh", type=int, default=100, help="validation configurations per model")
    ap.add_argument("--rounds", type=int, default=2, help="fresh sessions per validation configuration")
    ap.add_argument("--patterns", nargs="+", default=PATTERNS, choices=PATTERNS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--pin", type=int, default=0, help="CPU this process (and so the measurement) runs on")
    ap.add_argument("--noise-cpu", type=int, default=None, help="CPU of the neighbour (default: --pin)")
    ap.add_argument("--results", type=Path, default=None, help="result directory (default benchmarks/results)")
    ap.add_argument("--redo", action="store_true", help="measure finished cells again")
    ap.add_argument("--quick", action="store_true", help="smoke run: cifar_resnet20, few configurations, short")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.configs, args.micro, args.fresh = ["cifar_resnet20"], 10, 0, 4
        if args.patterns == PATTERNS:
            args.patterns = ["none", "bursts"]
    args.noise_cpu = args.pin if args.noise_cpu is None else args.noise_cpu
    return args


def main(argv=None) -> None:
    args = parse(argv)
    scratch = Path(tempfile.mkdtemp(prefix="hwprune-noisy-host-")) if args.quick else None
    results = args.results or (scratch if args.quick else RESULTS)
    tables = scratch / "tables" if args.quick else RUNS
    results.mkdir(parents=True, exist_ok=True)
    path = results / "noisy_host.json"
    doc = json.loads(path.read_text()) if path.exists() and not args.redo else {"cells": {}}
    doc["settings"] = settings(args)  # the host's fingerprint before this process is pinned to one CPU
    if args.pin is not None and args.pin in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {args.pin})
    for pattern in args.patterns:
        for mode in args.modes:
            for model in args.models:
                key = f"{pattern}/{mode}/{model}"
                if key in doc["cells"] and not args.redo:
                    continue
                print(f"[{key}] profiling", file=sys.stderr, flush=True)
                table, cell = profile_cell(model, mode, pattern, args, tables)
                print(f"[{key}] validating", file=sys.stderr, flush=True)
                cell.update(validate_cell(table, model, mode, pattern, args))
                cell.update({"machine": doc["settings"]["host"], "date": doc["settings"]["date"]})
                doc["cells"][key] = cell
                write(doc, results)
    write(doc, results)
    print(f"wrote {results / 'noisy_host.json'} and {results / 'noisy_host.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
