"""Summarise the baseline training runs of ``tools/train_baselines.sh``.

Reads ``runs/baselines/<model>.log.jsonl`` or ``<runs>/<model>/<model>.log.jsonl`` (and
``<model>.pt`` once a run has finished)
and writes ``benchmarks/results/baselines.json`` and ``baselines.md``: accuracy, epochs,
training wall time and the machine it ran on. Unfinished runs are listed with their
latest test accuracy.

    python benchmarks/train_baselines.py [--runs runs/baselines] [--out benchmarks/results]
    python benchmarks/train_baselines.py --runs benchmarks/checkpoints/baselines180

The train time sums the logged epochs, so an epoch that ran while the training was paused
(``kill -STOP``) counts its paused time; the median seconds per epoch does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from hwprune.training.checkpoint import Checkpoint

MODELS = ("cifar_resnet20", "cifar_resnet56")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarise(runs: Path, model: str) -> dict | None:
    if (runs / model).is_dir():  # one folder per model (benchmarks/checkpoints/baselines180/<model>/)
        runs = runs / model
    log = runs / f"{model}.log.jsonl"
    if not log.exists():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not records:
        return None
    tested = [r for r in records if r.get("test_top1") is not None]
    row = {
        "model": model,
        "status": "unfinished",
        "epochs_done": records[-1]["epoch"],
        "train_seconds": round(sum(r["seconds"] for r in records), 1),
        "seconds_per_epoch": round(statistics.median(r["seconds"] for r in records), 1),
        "top1": tested[-1]["test_top1"] if tested else None,
        "top5": tested[-1].get("test_top5") if tested else None,
    }
    ck_path = runs / f"{model}.pt"
    if ck_path.exists():
        ck = Checkpoint.load(ck_path)
        recipe = ck.meta.get("train", {})
        row.update(status="done", checkpoint=str(ck_path), top1=ck.meta.get("top1"), top5=ck.meta.get("top5"),
                   epochs=recipe.get("epochs"), params=sum(v.numel() for k, v in ck.state_dict.items()
                                                           if not k.endswith(("running_mean", "running_var",
                                                                              "num_batches_tracked"))),
                   recipe={k: recipe.get(k) for k in ("batch_size", "peak_lr", "schedule", "warmup_epochs",
                                                       "weight_decay", "label_smoothing", "nesterov",
                                                       "precision", "threads", "seed")})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/baselines"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--note", action="append", default=[], help="A line to add under the table (repeatable).")
    args = parser.parse_args()
    rows = [r for r in (summarise(args.runs, m) for m in MODELS) if r is not None]
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": str(torch.__version__),
               "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baselines.json").write_text(json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n")
    lines = ["# CIFAR-10 baselines", "",
             "Trained with `tools/train_baselines.sh` (SGD + Nesterov, cosine, label smoothing 0.1, wd 5e-4, bf16 "
             "autocast where the CPU runs it fast, else fp32) on 2-core CPU VMs, resumed across machines from the "
             f"committed state; summarised on {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}. "
             "Test split: the 10,000 CIFAR-10 test images (JPEG re-encoded).", "",
             "| model | status | top-1 % | top-5 % | epochs | params | s/epoch | train time (h) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['status']} | {r['top1']} | {r['top5']} | "
                     f"{r.get('epochs') or r['epochs_done']} | {r.get('params', '')} | {r['seconds_per_epoch']} | "
                     f"{r['train_seconds'] / 3600:.2f} |")
    if args.note:
        lines += [""] + [f"- {n}" for n in args.note]
    (args.out / "baselines.json").write_text(json.dumps({"machine": machine, "runs": rows, "notes": args.note},
                                                        indent=2) + "\n")
    (args.out / "baselines.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
