"""Every pruning method at equal measured latency on CIFAR-10 ResNets, under the protocol of
benchmarks/README.md ("The pruning comparison protocol").

Run from the repository root with nothing else using the CPU (pause trainings first):

    python benchmarks/compare_cifar10.py --model cifar_resnet56 \\
        --base benchmarks/checkpoints/baselines180/cifar_resnet56/cifar_resnet56.pt \\
        --targets 0.5,0.35 --seeds 0,1 --finetune-epochs 40

For each target, method and seed it calls :func:`hwprune.prune_to_target` (ONNX Runtime CPU,
batch 1, 1 thread; the same goal calibration and device correction for every method), then
fine-tunes the pruned model with the same recipe and budget for every method, GCP's own
training epochs counted against its budget, and evaluates it once on the test set. The
1-thread batch-1 table is profiled on this host first unless ``--table`` is given. Finished
rows are kept in the results file and skipped on a re-run, and a row's pruned checkpoint and
fine-tuning state (``<row>.pruned.pt``, ``<row>.state.pt``) are reused, so the script resumes
mid-row. Run it in the background with its process group recorded, to pause it around timings:

    nohup setsid nice -n 10 python benchmarks/compare_cifar10.py ... > /tmp/compare.log 2>&1 &
    echo $! > benchmarks/checkpoints/compare_cifar10/run.pid   # kill -STOP/-CONT -- -$(cat ...)

Results: ``benchmarks/results/compare_cifar10.{json,md}``, ``compare_cifar10_pareto.png`` (top-1
against measured latency, every method, the Pareto front) and
``compare_cifar10_<model>_widths.png`` (GCP-lambda, GCP-f, GCP-p); pruned checkpoints under
``benchmarks/checkpoints/compare_cifar10/``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CKS = ROOT / "benchmarks" / "checkpoints" / "compare_cifar10"

VARIANTS = {  # row label: (registered method, objective, meet the latency target whatever the objective)
    "uniform": ("uniform", "latency", False),
    "l1": ("l1", "latency", False),
    "groupnorm": ("groupnorm", "latency", False),
    "tp-global": ("tp-global", "latency", False),
    "gcp-f": ("gcp", "flops", True),
    "gcp-p": ("gcp", "params", True),
    "gcp-lambda": ("gcp", "latency", False),
    "gcp-lambda-keep": ("gcp", "latency", False),  # residual streams whole (GCP option streams=keep)
    "lstm": ("lstm", "latency", False),
    "search": ("search", "latency", False),
}
VARIANT_OPTIONS = {"gcp-lambda-keep": {"streams": "keep"}}  # method options a row label adds


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpg")
    ap.add_argument("--table", type=Path, default=None, help="default: profile one here (1 thread, batch 1)")
    ap.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.35])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(VARIANTS))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    ap.add_argument("--finetune-epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05, help="peak fine-tuning lr, the same for every method")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--distill", action="store_true", help="distill from the base, for every method")
    ap.add_argument("--steps", type=int, default=4, help="GCP rounds T")
    ap.add_argument("--iters", type=int, default=None, help="GCP iterations per phase (default: an epoch)")
    ap.add_argument("--min-keep", type=float, default=0.1)
    ap.add_argument("--supernet-epochs", type=int, default=20, help="search: supernet training epochs (counted against the fine-tuning budget)")
    ap.add_argument("--supernet-mode", default="parallel", help="search: sandwich, parallel or stage")
    ap.add_argument("--results", type=Path, default=RESULTS / "compare_cifar10",
                    help="results path prefix (.json, .md, _pareto.png are added)")
    ap.add_argument("--checkpoints", type=Path, default=CKS)
    ap.add_argument("--quick", action="store_true", help="short device measurements: a smoke run, not results")
    return ap.parse_args()


def table_for(a) -> Path:
    """The given table, or a 1-thread batch-1 table of the model profiled on this host."""
    if a.table is not None:
        return a.table
    import hwprune

    path = a.checkpoints / f"{a.model}-t1-b1.parquet"  # kept with the rows it was used for
    if not path.exists() or not hwprune.LatencyTable.load(path).complete:
        path.parent.mkdir(parents=True, exist_ok=True)
        hwprune.profile(a.model, path, threads=1, configs=60, resume=path.exists())
    return path


def method_epochs(meta: dict, train_images: int, batch: int = 128) -> float:
    """Training epochs a method spent inside itself (GCP: regularise and recover phases, and the search;
    LSTM: its children's recovery iterations; search: the supernet's training epochs, which the method
    records as ``method_epochs``)."""
    if "method_epochs" in meta:
        return float(meta["method_epochs"])
    if meta.get("method") == "lstm":
        return meta["lstm_train_images"] / train_images
    if meta.get("method") != "gcp":
        return 0.0
    per_epoch = max(1, train_images // batch)
    iters = meta.get("gcp_iters") or per_epoch
    run = 2 * meta["gcp_steps"] * iters
    search = sum(2 * meta["gcp_steps"] * s.get("iters", 0) for s in meta.get("gcp_search", []))
    return (run + search) / per_epoch


def run_one(a, table: Path, label: str, target: float, seed: int) -> dict:
    """Prune (or reuse this row's pruned checkpoint), fine-tune within the budget (resuming an
    interrupted fine-tuning from its state file), evaluate once: one results row."""
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.training.data import load_splits
    from hwprune.training.train import TrainConfig, evaluate, train

    ck = a.checkpoints / f"{a.model}_{label}_{target:g}_s{seed}.pt"
    start, prune_s = prune_row(a, table, label, target, seed, ck)
    pruned = Checkpoint.load(start)
    meta = pruned.meta
    splits = load_splits(a.data)
    inside = method_epochs({**meta, "gcp_iters": a.iters}, len(splits.train), a.batch)
    epochs = max(1, a.finetune_epochs - math.ceil(inside))
    cfg = TrainConfig(epochs=epochs, lr=a.lr, batch_size=a.batch, seed=seed,
                      teacher=str(a.base) if a.distill else None)
    train(pruned, splits, cfg, ck, resume=True, progress=True)
    tuned = Checkpoint.load(ck)
    top1 = evaluate(tuned.build_model().module, splits.test)["top1"]
    base = Checkpoint.load(a.base)
    return {"model": a.model, "method": label, "objective": VARIANTS[label][1], "target": target, "seed": seed,
            "base_ms": meta["base_measured_ms"], "measured_ms": meta["measured_ms"],
            "speedup": meta["measured_speedup"], "flops": meta["flops"], "params": meta["params"],
            "base_top1": base.meta.get("accuracy", {}).get("top1", base.meta.get("top1")), "top1": top1,
            "finetune_epochs": epochs, "method_epochs": round(inside, 2), "checkpoint": _rel(ck),
            "prune_seconds": round(prune_s, 1), "method_widths": meta.get("method_widths"),
            "widths": pruned.widths, "device_correction": meta.get("device_correction"),
            "gcp_history": meta.get("gcp_history")}


def prune_row(a, table: Path, label: str, target: float, seed: int, ck: Path) -> tuple[Path, float]:
    """(pruned checkpoint, seconds the method took): this row's ``.pruned.pt`` when an earlier run
    wrote it, else a fresh :func:`hwprune.prune_to_target` at the measured target."""
    import torch

    from hwprune.atomic import atomic_write_text
    from hwprune.pruning.target import DeviceOptions, prune_to_target

    start, timing = ck.with_name(ck.stem + ".pruned.pt"), ck.with_name(ck.stem + ".pruned.json")
    if start.exists() and timing.exists():
        return start, json.loads(timing.read_text())["prune_seconds"]
    method, objective, meet = VARIANTS[label]
    torch.manual_seed(seed)
    options = {"steps": a.steps, "iters": a.iters, **VARIANT_OPTIONS.get(label, {})}
    if method == "lstm":  # its own seed, and its resumable state beside the row's checkpoint
        options.update(seed=seed, work_dir=str(a.checkpoints / f"{a.model}_{label}_{target:g}_s{seed}.lstm"))
    if method == "search":  # one supernet per model and seed, kept (and resumed) beside the checkpoints
        options = {"seed": seed, "supernet_epochs": a.supernet_epochs, "mode": a.supernet_mode,
                   "supernet_out": str(a.checkpoints / f"{a.model}_supernet_{a.supernet_mode}_s{seed}.pt")}
    t0 = time.perf_counter()
    res = prune_to_target(a.base, method, objective, target, table=table, data=a.data,
                          latency_target=target if meet else None, min_keep=a.min_keep,
                          options=options, quiet=False,
                          device=DeviceOptions(patience_s=0 if a.quick else 180, quick=a.quick))
    prune_s = time.perf_counter() - t0
    ck.parent.mkdir(parents=True, exist_ok=True)
    res.save(start)
    atomic_write_text(timing, json.dumps({"prune_seconds": prune_s}))
    return start, prune_s


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_rows(a) -> list[dict]:
    path = a.results.with_suffix(".json")
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save(rows: list[dict], a, table: Path) -> None:
    from hwprune.atomic import atomic_write_text
    from hwprune.profiling.table import LatencyTable

    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
           "machine": {"platform": platform.platform(), "processor": _cpu(), "cores": _cores()},
           "protocol": "benchmarks/README.md#the-pruning-comparison-protocol-compare_cifar10",
           "table": _rel(table), "device_settings": LatencyTable.load(table).settings,
           "settings": {"finetune_epochs": a.finetune_epochs, "lr": a.lr, "batch": a.batch, "distill": a.distill,
                        "gcp_steps": a.steps, "gcp_iters": a.iters, "min_keep": a.min_keep},
           "rows": rows}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.results.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
    atomic_write_text(a.results.with_suffix(".md"), markdown(rows, doc))
    pareto_plot(rows, a.results.with_name(a.results.name + "_pareto.png"))


def markdown(rows: list[dict], doc: dict) -> str:
    lines = ["# Pruning methods at equal measured latency: CIFAR-10", "",
             f"Generated by `python benchmarks/compare_cifar10.py` on {doc['machine']['processor']} "
             f"({doc['machine']['cores']} cores), {doc['date']}, under the protocol of "
             "[benchmarks/README.md](../README.md#the-pruning-comparison-protocol-compare_cifar10): "
             f"{_settings(doc['device_settings'])}; latency paired with the base model.", "",
             "| model | method | target | seed | base ms | ms | speed-up | MFLOPs | params (k) | base top-1 | top-1 "
             "| Δ | fine-tune epochs (+ inside) |", "|" + "---|" * 13]
    for r in sorted(rows, key=lambda r: (r["model"], r["target"], r["method"], r["seed"])):
        lines.append(f"| {r['model']} | {r['method']} | {r['target']:g} | {r['seed']} | {r['base_ms']:.3f} | "
                     f"{r['measured_ms']:.3f} | {r['speedup']:.2f}x | {r['flops'] / 1e6:.1f} | {r['params'] / 1e3:.0f} | "
                     f"{r['base_top1']} | {r['top1']:.2f} | {r['top1'] - (r['base_top1'] or 0):+.2f} | "
                     f"{r['finetune_epochs']} (+{r['method_epochs']}) |")
    return "\n".join(lines) + "\n"


def _settings(s: dict) -> str:
    return f"{s.get('backend')} {s.get('device', 'cpu')}, batch {s.get('batch')}, {s.get('threads')} thread(s)"


def pareto_plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted({r["method"] for r in rows}):
        pts = [(r["measured_ms"] / r["base_ms"], r["top1"]) for r in rows if r["method"] == label]
        ax.scatter(*zip(*pts), label=label, s=22)
    pts = sorted((r["measured_ms"] / r["base_ms"], r["top1"]) for r in rows)
    front, best = [], -1.0
    for x, y in pts:  # fastest first: a point is on the front when nothing faster is as accurate
        if y > best:
            front.append((x, y))
            best = y
    ax.plot(*zip(*front), color="black", lw=1, label="Pareto front")
    ax.set_xlabel("measured latency / base latency")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    a = args()
    import torch

    torch.set_num_threads(2)
    table = table_for(a)
    rows = load_rows(a)
    done = {(r["model"], r["method"], r["target"], r["seed"]) for r in rows}
    for target in a.targets:
        for label in a.methods:
            for seed in a.seeds:
                if (a.model, label, target, seed) in done:
                    continue
                rows.append(run_one(a, table, label, target, seed))
                save(rows, a, table)  # commit every finished row
    save(rows, a, table)


if __name__ == "__main__":
    main()
