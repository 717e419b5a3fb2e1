"""Build the shipped latency tables and measure what profiling costs.

Run on a quiet machine (nothing else using the CPU), from the repository root:

    python benchmarks/profile_tables.py            # all shipped tables, then the stability check
    python benchmarks/profile_tables.py --only resnet18 --batches 1

Each table is made by the real CLI in a fresh process (``hwprune profile ... --resume``,
so an interrupted run continues). Results: ``benchmarks/results/profiling.json`` and
``profiling.md`` (wall time and measurement count per table; the CoV of resnet18's
end-to-end median over 5 fresh processes), and the tables in ``latency_tables/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "latency_tables"
RESULTS = ROOT / "benchmarks" / "results"
# model -> width configurations per table
PLAN = {"resnet18": 100, "resnet50": 100, "mobilenet_v2": 100, "cifar_resnet56": 150,
        # families kept out of the predictor's design, to test that it generalises (batch 1 only)
        "cifar_vgg16_bn": 80, "efficientnet_b0": 80,
        # a family that influenced no design choice at all (1 thread)
        "mobilenet_v3_small": 40,
        # the model the GCP benchmark and the quickstart prune (batch 1)
        "cifar_resnet20": 100}
SHIPPED = ["resnet18", "resnet50", "mobilenet_v2", "cifar_resnet56"]
# tables profiled with --gate (re-measure configurations timed while another tenant held a vCPU; see
# hwprune/profiling/profiler.py): the sub-millisecond models, whose 2-thread latency that state changes most
GATE = {"cifar_resnet20": 0.05}
THREADS = 2  # default intra-op threads (--threads changes it)
TABLES_ROOT = TABLES  # where the tN-bB folders go (--tables: another host's tables, kept apart)


def table_path(model: str, batch: int) -> Path:
    return TABLES_ROOT / f"onnxruntime-cpu-t{THREADS}-b{batch}" / f"{model}.parquet"


def build(model: str, batch: int, configs: int, overwrite: bool = False, gate: float | None = None) -> dict:
    out = table_path(model, batch)
    cmd = ["hwprune", "profile", "--model", model, "--backend", "onnxruntime", "--batch", str(batch),
           "--threads", str(THREADS), "--configs", str(configs), "--out", str(out.relative_to(ROOT)), "--json"]
    gate = gate if gate is not None else GATE.get(model)
    if gate:
        cmd[-1:-1] = ["--gate", f"{gate:g}"]
    if out.exists():
        cmd.append("--overwrite" if overwrite else "--resume")
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1]}")
    summary = json.loads(r.stdout)
    return {"model": model, "batch": batch, "threads": THREADS, "configs": configs, "table": str(out.relative_to(ROOT)),
            "command": " ".join(cmd[:-1] if cmd[-1] in ("--resume", "--overwrite") else cmd),
            "wall_seconds_this_run": round(time.time() - t0, 1), "profile_seconds": summary["profile_seconds"],
            "measurements": summary["rows"], "e2e": summary["e2e_rows"], "insitu": summary["insitu_rows"],
            "micro": summary["micro_rows"], "distinct_units": summary["distinct_units"],
            "unstable_rows": summary["unstable_rows"], "complete": summary["complete"],
            "e2e_ms_range": [summary["e2e_ms_min"], summary["e2e_ms_max"]]}


STABILITY = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from hwprune.profiling.backends import ModelArtifact, create_backend
from hwprune.profiling.measure import MeasureConfig
be = create_backend("onnxruntime", threads=%d, measure=MeasureConfig(warmup_s=0.2, min_time_s=1.0))
m = be.measure_e2e(ModelArtifact((1, 3, 224, 224), onnx_path=sys.argv[1]))
print(json.dumps({"median": m.stats.median, "cov": m.stats.cov, "rcov": m.stats.rcov, "count": m.stats.count}))
"""


def stability(runs: int = 5) -> dict:
    """CoV of resnet18's end-to-end median (batch 1) across fresh processes."""
    import warnings

    warnings.filterwarnings("ignore")
    from hwprune.profiling.onnx_export import export_onnx
    from hwprune.models import create_model

    path = RESULTS / "_resnet18.onnx"
    export_onnx(create_model("resnet18").module, (1, 3, 224, 224), path)
    out = []
    try:
        for _ in range(runs):
            r = subprocess.run([sys.executable, "-c", STABILITY % THREADS, str(path)], capture_output=True, text=True,
                               check=True)
            out.append(json.loads(r.stdout))
    finally:
        path.unlink(missing_ok=True)
    med = np.array([o["median"] for o in out])
    return {"model": "resnet18", "batch": 1, "threads": THREADS, "processes": runs,
            "medians_ms": [round(float(x), 4) for x in med],
            "cov_of_median": float(med.std(ddof=1) / med.mean()),
            "within_run_cov": [round(o["cov"], 4) for o in out], "within_run_rcov": [round(o["rcov"], 4) for o in out]}


def machine() -> dict:
    from hwprune.profiling.fingerprint import fingerprint

    fp = fingerprint()
    return {k: fp[k] for k in ("cpu_model", "cpu_cores", "cpu_flags", "machine")}


def results_stem() -> str:
    """profiling.* for the tables in latency_tables/, profiling_<folder>.* for a --tables folder."""
    return "profiling" if TABLES_ROOT == TABLES else f"profiling_{TABLES_ROOT.name}"


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{results_stem()}.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Profiling cost and stability", "",
             "Tables marked *gated* were profiled with `--gate`: every configuration is bracketed by short timings "
             "of the unpruned model and measured again while another tenant of the VM holds a vCPU.", "",
             f"Machine: {results['machine']['cpu_model']}, {results['machine']['cpu_cores']} cores; "
             f"ONNX Runtime CPU; tN = N intra-op threads. Generated by `python benchmarks/profile_tables.py`.", "",
             "| table | configs | wall time (s) | measurements (rows) | e2e | in-situ | micro | distinct units | unstable rows | complete |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in results["tables"]:
        lines.append(f"| {t['model']} b{t['batch']} t{t.get('threads', 2)}{' (gated)' if '--gate' in t['command'] else ''} | {t['configs']} | {t['profile_seconds']:.0f} | {t['measurements']} | "
                     f"{t['e2e']} | {t['insitu']} | {t['micro']} | {t['distinct_units']} | {t['unstable_rows']} | {t['complete']} |")
    notes = [f"- {t['model']} b{t['batch']}: {t['note']}" for t in results["tables"] if t.get("note")]
    if notes:
        lines += [""] + notes
    s = results.get("stability")
    if s:
        lines += ["", f"Stability: resnet18 batch 1, end-to-end median over {s['processes']} fresh processes: "
                      f"{', '.join(f'{m:.3f}' for m in s['medians_ms'])} ms; CoV of the median "
                      f"**{100 * s['cov_of_median']:.2f}%** (target 2.5%)."]
    (RESULTS / f"{results_stem()}.md").write_text("\n".join(lines) + "\n")


def _short(command: str) -> str:
    head, _, rest = command.partition(" ")
    return f"{Path(head).name} {rest}"


def write_tables_readme() -> None:
    """latency_tables/README.md: every shipped table and how it was made (from its own metadata)."""
    from hwprune.profiling.table import LatencyTable

    lines = ["# Shipped latency tables", "",
             "Each table is a Parquet file written by `hwprune profile` (format: see the main README). Its metadata",
             "holds the device fingerprint, the settings, the plan and the exact command; this list is generated",
             "from that metadata by `python benchmarks/profile_tables.py`. Load one with",
             "`hwprune.LatencyTable.load(path)` or inspect it with `hwprune table info PATH`.", "",
             "Only use a table for the device and settings it was measured with: hwprune refuses to merge or",
             "validate tables across devices or settings. Profile your own device with the same command.", "",
             "*Profiler overhead*: what the layer profiler adds to each node it times (`TableMeta.node_overhead_ms`,",
             "measured with two chains of tiny nodes; the predictor takes it off every node). The tables written",
             "before the probe existed got it from `hwprune profile ... --resume` on the same VM on 2026-11-22.", "",
             "*Dated folders* (`2026-11-30/`): the same VM under the same fingerprint, profiled again on a day it",
             "ran 1.5-1.9x slower than when the tables at the top level were taken (2026-11-21/22). Use the tables",
             "of the state the host is in: `hwprune table check TABLE` times the unpruned models now against the",
             "table and says by how much they differ.", "",
             "| table | model | batch | threads | configs | rows | device | backend | profiled (s) "
             "| profiler overhead (us/node) | date | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(TABLES.glob("**/*.parquet")):
        t = LatencyTable.load(path)
        s, fp = t.settings, t.meta.fingerprint
        ov = "-" if t.meta.node_overhead_ms is None else f"{t.meta.node_overhead_ms * 1000:.2f}"
        lines.append(f"| `{path.relative_to(TABLES)}` | {', '.join(t.meta.models)} | {s.get('batch')} | {s.get('threads')} | "
                     f"{t.meta.items_done}/{t.meta.items_planned} | {len(t)} | {fp.get('cpu_model')} "
                     f"({fp.get('cpu_cores')} cores, {' '.join(fp.get('cpu_flags') or [])}) | "
                     f"{s.get('backend')} {s.get('backend_version')} {s.get('execution_provider')} | "
                     f"{t.meta.profile_seconds:.0f} | {ov} | {t.meta.created[:10]} | `{_short(t.meta.command)}` |")
    lines += ["", "No GPU tables yet: no NVIDIA GPU was available when these were made. On a GPU machine:",
              "`hwprune profile --model resnet50 --backend torch --device cuda --batch 64 --out ...` and",
              "`pip install -e '.[tensorrt]'` then `--backend tensorrt --device cuda`."]
    (TABLES / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    global THREADS, TABLES_ROOT
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=SHIPPED)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--skip-stability", action="store_true")
    ap.add_argument("--configs", type=int, default=None, help="override the plan's configurations per table")
    ap.add_argument("--overwrite", action="store_true", help="measure the listed tables again from scratch")
    ap.add_argument("--gate", type=float, default=None,
                    help="profile every listed table with --gate F (default: only the models in GATE)")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="intra-op threads; tables go to latency_tables/onnxruntime-cpu-tN-bB")
    ap.add_argument("--tables", default=None,
                    help="a folder under latency_tables/ for this host's tables (DIR/onnxruntime-cpu-tN-bB), kept "
                         "apart from the shipped ones; results: benchmarks/results/profiling_DIR.*")
    args = ap.parse_args()
    THREADS = args.threads
    if args.tables:
        TABLES_ROOT = TABLES / args.tables
    prev_path = RESULTS / f"{results_stem()}.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    tables = {(t["model"], t["batch"], t.get("threads", 2)): t for t in prev.get("tables", [])}
    for batch in args.batches:
        for model in args.only:
            print(f"profiling {model} batch {batch} ...", file=sys.stderr, flush=True)
            tables[(model, batch, THREADS)] = build(model, batch, args.configs or PLAN[model], args.overwrite, args.gate)
            write({"machine": machine(), "tables": list(tables.values()), "stability": prev.get("stability")})
    results = {"machine": machine(), "tables": list(tables.values()), "stability": prev.get("stability")}
    if not args.skip_stability:
        results["stability"] = stability()
    write(results)
    write_tables_readme()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
