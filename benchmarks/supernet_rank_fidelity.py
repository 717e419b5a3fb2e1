"""Rank fidelity of the supernet training modes: does proxy accuracy order subnets as fine-tuning does?

For every training mode (sandwich, parallel, stage) a supernet of the same base model is
trained for the same number of epochs. The same random subnets of the width grid are then
scored twice in each supernet:

* *proxy*: top-1 on the held-out part of the training split after BN recalibration
  (what the search uses);
* *fine-tuned*: the subnet extracted from that supernet, fine-tuned for the same short budget
  (same epochs, schedule and learning rate for every subnet and mode), top-1 on the test split.

The result per mode is Kendall's tau between the two orders (1: the proxy ranks subnets as
fine-tuning does), with the wall time per supernet epoch.

    python benchmarks/supernet_rank_fidelity.py --checkpoint benchmarks/checkpoints/baselines180/cifar_resnet20/cifar_resnet20.pt \\
        --data ../shared/data/cifar10-jpg --epochs 30 --subnets 12 --finetune-epochs 5 --threads 2
    python benchmarks/supernet_rank_fidelity.py --quick --out /tmp/fidelity     # a smoke run of every step

Writes ``<out>/supernet_rank_fidelity.json`` and ``.md``; supernets and fine-tuned subnets go
under ``<out>/runs`` (finished runs are reused).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from hwprune.profiling.fingerprint import cpu_model
from hwprune.search.supernet import Supernet
from hwprune.search.supernet_training import SupernetConfig, train_supernet
from hwprune.training.checkpoint import Checkpoint
from hwprune.training.data import Splits, load_splits
from hwprune.training.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[1]
MODES = {"sandwich": "teacher", "parallel": "teacher", "stage": "stage"}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "hwprune" / "assets" / "cifar_resnet20.pt")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpg")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated training modes")
    ap.add_argument("--epochs", type=int, default=30, help="supernet epochs per mode")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--subnets", type=int, default=12, help="random subnets scored (at least 10 for a result)")
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--holdout", type=int, default=200, help="held-out training images per class")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="tiny data and budgets: proves every step runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.data = ROOT / "hwprune" / "assets" / "cifar10-sample"
        args.epochs, args.batch_size, args.subnets, args.finetune_epochs, args.holdout = 1, 16, 3, 1, 5
    return args


def supernet_for(mode: str, args, splits: Splits, runs: Path) -> tuple[Supernet, float]:
    """The mode's trained supernet and its wall seconds per epoch (a finished run is reused)."""
    cfg = SupernetConfig(epochs=args.epochs, batch_size=args.batch_size, mode=mode, distill=MODES[mode],
                         parallel=args.parallel, seed=args.seed, threads=args.threads, holdout=args.holdout,
                         max_iters=2 if args.quick else None, precision="fp32" if args.quick else "auto")
    out = runs / f"supernet-{mode}.pt"
    sn = Supernet.load(out) if out.exists() else train_supernet(args.checkpoint, splits, cfg, out, progress=False)
    hist = sn.meta.get("history", [])
    return sn, float(np.median([r["seconds"] for r in hist])) if hist else float("nan")


def finetuned_top1(sn: Supernet, widths, name: str, args, rest, test, runs: Path) -> float:
    """Top-1 on ``test`` of the subnet at ``widths`` after the same short fine-tune as every other."""
    out = runs / f"{name}.pt"
    if not out.exists():
        data = rest.subset(np.arange(min(len(rest), 4 * args.batch_size))) if args.quick else rest
        cfg = TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=0.02, warmup_epochs=0,
                          seed=args.seed, threads=args.threads, eval_every=10 ** 6,
                          precision="fp32" if args.quick else "auto")
        train(sn.extract_checkpoint(widths), Splits(data, None), cfg, out, resume=True, progress=False)
    spec = Checkpoint.load(out).build_model()
    return float(evaluate(spec.module, test, batch_size=500)["top1"])


def score_mode(mode: str, args, splits: Splits, test, runs: Path) -> dict:
    sn, sec_per_epoch = supernet_for(mode, args, splits, runs)
    rest, _ = sn.holdout_split(splits.train)
    fit = sn.fitness_data(splits.train, batch_size=args.batch_size, seed=args.seed)
    rng = np.random.default_rng(args.seed)  # the same subnets in every mode: the grids are equal
    subnets = [sn.grid.random(rng) for _ in range(args.subnets)]
    proxy, tuned = [], []
    for i, widths in enumerate(subnets):
        proxy.append(sn.proxy_accuracy(widths, fit))
        tuned.append(finetuned_top1(sn, widths, f"{mode}-subnet{i:02d}", args, rest, test, runs))
        print(f"{mode} subnet {i}: proxy {proxy[-1]:.2f}%  fine-tuned {tuned[-1]:.2f}%", flush=True)
    tau, p = kendalltau(proxy, tuned)
    return {"mode": mode, "distill": MODES[mode], "kendall_tau": None if np.isnan(tau) else round(float(tau), 4),
            "p_value": None if np.isnan(p) else round(float(p), 4), "proxy_top1": proxy, "finetuned_top1": tuned,
            "seconds_per_epoch": round(sec_per_epoch, 2), "supernet_epochs": sn.meta["epochs_trained"],
            "holdout_top1": sn.meta.get("holdout_top1"), "subnets": [s.widths for s in subnets]}


def markdown(doc: dict) -> str:
    lines = [f"# Supernet rank fidelity ({doc['date']})", "", f"Base: `{doc['checkpoint']}`; {doc['subnets']} random "
             f"subnets; supernet {doc['epochs']} epochs per mode; every subnet fine-tuned {doc['finetune_epochs']} "
             f"epochs; proxy on {doc['holdout']} held-out training images per class, fine-tuned top-1 on the test "
             f"split. Host: {doc['host']}, {doc['threads']} threads.", "",
             "| mode | distill | Kendall tau | p | s / supernet epoch | widest / narrowest proxy |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        top = r["holdout_top1"] or {}
        lines.append(f"| {r['mode']} | {r['distill']} | {r['kendall_tau']} | {r['p_value']} | "
                     f"{r['seconds_per_epoch']} | {top.get('widest')} / {top.get('narrowest')} |")
    if doc["quick"]:
        lines += ["", "A `--quick` smoke run: tiny data and budgets; its numbers mean nothing."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    norm = Checkpoint.load(args.checkpoint).meta.get("data", {})
    splits = load_splits(args.data, image_size=32)
    if "mean" in norm:
        splits = Splits(splits.train.with_normalization(norm["mean"], norm["std"]),
                        splits.test.with_normalization(norm["mean"], norm["std"]))
    test = splits.test.subset(np.arange(200)) if args.quick else splits.test
    rows = [score_mode(m, args, splits, test, runs) for m in args.modes.split(",")]
    doc = {"date": time.strftime("%Y-%m-%d"), "checkpoint": str(args.checkpoint), "data": str(args.data),
           "epochs": args.epochs, "subnets": args.subnets, "finetune_epochs": args.finetune_epochs,
           "holdout": args.holdout, "threads": torch.get_num_threads(), "host": cpu_model(),
           "torch": torch.__version__, "quick": args.quick, "rows": rows}
    (args.out / "supernet_rank_fidelity.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "supernet_rank_fidelity.md").write_text(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
