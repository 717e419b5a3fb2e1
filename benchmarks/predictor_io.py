"""A saved predictor against a refit: fit, save, load and prediction times.

Run from the repository root:

    python benchmarks/predictor_io.py [--table TABLE] [--results NAME]

On the shipped resnet50 table (1 thread, batch 1, the 2026-11-30 host) a predictor is
fitted (as every command given ``--table`` did before artifacts), saved as an artifact
(:mod:`hwprune.prediction.artifact`) and loaded back, in this process and in a fresh one. Both the
loaded and the fitted predictor then predict the 10,000 random resnet50 configurations
of ``predictor_accuracy.py --speed``, timed the same way, and their predictions are
compared bit for bit. The comparison predicts on one thread: a bulk prediction lets the
forest regressor sum its trees on every core, in the order the threads finish, which moves
the last bits from one call to the next even for one and the same predictor. Aims: a load
under 1 s, 10,000 configurations under 2 s.

Results: ``benchmarks/results/predictor_io.json`` and ``predictor_io.md``, with the date,
the machine, the library versions and the load average: timings taken while other
processes held the CPU say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLE = ROOT / "latency_tables" / "2026-11-30" / "onnxruntime-cpu-t1-b1" / "resnet50.parquet"
LOAD_AIM_S, PREDICT_AIM_S = 1.0, 2.0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predictor_accuracy import speed, speed_configs  # noqa: E402  (prediction speed, timed as there)

# a load in a fresh process, after the imports every hwprune command makes anyway (torch, scikit-learn)
FRESH = """import json, sys, time
t0 = time.perf_counter()
import skops.io, sklearn.ensemble, hwprune.prediction.predictor
from hwprune.prediction.artifact import load_predictor
t1 = time.perf_counter()
load_predictor(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_seconds": t1 - t0, "load_seconds": t2 - t1}))
"""


def machine() -> dict:
    from hwprune.prediction.artifact import library_versions
    from hwprune.profiling.fingerprint import cpu_model

    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return {"cpu": cpu_model(), "cores": cores, "python": sys.version.split()[0], "versions": library_versions(),
            "loadavg_1min": round(load, 2), "under_load": load >= 0.5 * cores}


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """(fastest of ``repeat`` wall times, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def identical(a, b, configs: list) -> bool:
    """Whether ``a`` and ``b`` predict ``configs`` bit for bit the same, each on one thread."""
    import hwprune.prediction.predictor as hp

    bulk, hp.BULK_ROWS = hp.BULK_ROWS, float("inf")
    try:
        return bool(np.array_equal(a.predict("resnet50", configs), b.predict("resnet50", configs)))
    finally:
        hp.BULK_ROWS = bulk


def run(table_path: Path) -> dict:
    from hwprune.prediction.artifact import load_predictor, save_predictor
    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.profiling.table import LatencyTable

    before = machine()
    table = LatencyTable.load(table_path)
    fit_s, fitted = timed(lambda: LatencyPredictor().fit(table))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "resnet50.predictor.zip"
        save_s, _ = timed(lambda: save_predictor(fitted, path, table_path))
        size = path.stat().st_size
        load_s, loaded = timed(lambda: load_predictor(path, table_path), repeat=3)
        fresh = json.loads(subprocess.run([sys.executable, "-c", FRESH, str(path), str(table_path)], check=True,
                                          capture_output=True, text=True, cwd=ROOT).stdout)
    configs = speed_configs()
    speeds = {"loaded": speed(loaded, configs), "fitted": speed(fitted, configs)}
    same = identical(loaded, fitted, configs)
    after = machine()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "table": str(table_path.relative_to(ROOT)),
            "machine": {**before, "loadavg_1min_after": after["loadavg_1min"],
                        "under_load": before["under_load"] or after["under_load"]},
            "regressors": {k: v["chosen"] for k, v in fitted.selection_.items() if "chosen" in v},
            "fit_seconds": fit_s, "save_seconds": save_s, "artifact_bytes": size, "load_seconds": load_s,
            "fresh_process": fresh, "predict": speeds, "identical_predictions": same,
            "aims": {"load_under_s": LOAD_AIM_S, "predict_10000_under_s": PREDICT_AIM_S,
                     "load_met": load_s < LOAD_AIM_S and fresh["load_seconds"] < LOAD_AIM_S,
                     "predict_met": speeds["loaded"]["seconds"] < PREDICT_AIM_S}}


def markdown(r: dict) -> str:
    m, p = r["machine"], r["predict"]
    load_note = (f"**Taken under load**: other processes held the CPU (load average {m['loadavg_1min']} before, "
                 f"{m['loadavg_1min_after']} after, on {m['cores']} cores); on a quiet CPU every time is lower."
                 if m["under_load"] else f"Load average {m['loadavg_1min']} before, {m['loadavg_1min_after']} after.")
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    rows = [("fit (what a command given --table did every time)", r["fit_seconds"]),
            ("save the artifact", r["save_seconds"]),
            ("load the artifact (fastest of 3, in process)", r["load_seconds"]),
            ("load in a fresh process (after the import below)", r["fresh_process"]["load_seconds"]),
            ("imports before it (torch, scikit-learn, skops: any command makes them)",
             r["fresh_process"]["import_seconds"]),
            (f"predict {p['loaded']['configs']:,} configurations, loaded predictor", p["loaded"]["seconds"]),
            (f"predict {p['fitted']['configs']:,} configurations, fitted predictor", p["fitted"]["seconds"]),
            ("marginal costs of one configuration, loaded predictor", p["loaded"]["marginal_costs_seconds"])]
    lines = ["# A saved predictor against a refit", "",
             f"{r['date']}, {m['cpu']} ({m['cores']} cores), Python {m['python']}; {v}. Table "
             f"`{r['table']}` (regressors: {', '.join(f'{k} {c}' for k, c in r['regressors'].items())}). "
             "Generated by `python benchmarks/predictor_io.py`.", "", load_note, "",
             "| step | seconds |", "|---|---|", *[f"| {name} | {s:.3f} |" for name, s in rows], "",
             f"Artifact: {r['artifact_bytes'] / 1e6:.1f} MB. Predictions of the loaded predictor identical to the "
             f"fitted one's, bit for bit (on one thread; see the script's docstring): "
             f"{'yes' if r['identical_predictions'] else '**no**'}.", "",
             f"Aims: load under {r['aims']['load_under_s']:.0f} s: {'met' if r['aims']['load_met'] else 'not met'}; "
             f"{p['loaded']['configs']:,} configurations under {r['aims']['predict_10000_under_s']:.0f} s: "
             f"{'met' if r['aims']['predict_met'] else 'not met'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", type=Path, default=TABLE, help="latency table (default: resnet50, 1 thread, batch 1)")
    ap.add_argument("--results", default="predictor_io", help="name of the result files")
    args = ap.parse_args()
    r = run(args.table.resolve())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(r, indent=1) + "\n")
    (RESULTS / f"{args.results}.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
