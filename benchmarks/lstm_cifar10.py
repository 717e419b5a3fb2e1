"""LSTM-guided pruning on CIFAR-10: the paper's own claim, and whether the controller learns.

Run from the repository root with nothing else using the CPU (pause trainings first):

    python benchmarks/lstm_cifar10.py paper \\
        --base benchmarks/checkpoints/baselines180/cifar_resnet56/cifar_resnet56.pt
    python benchmarks/lstm_cifar10.py learn --model cifar_resnet20 \\
        --base benchmarks/checkpoints/baselines180/cifar_resnet20/cifar_resnet20.pt --seeds 0,1

* ``paper``: "Where to Prune" reports 47.5% fewer FLOPs on ResNet-56 (CIFAR-10) with comparable
  accuracy. The base is pruned with the FLOPs objective to 0.525 of its FLOPs
  (:func:`hwprune.prune_to_target`, no device target), fine-tuned under the protocol of
  benchmarks/README.md (the compare_cifar10 recipe: the same epochs, learning rate and batch, the
  epochs of the children's recovery subtracted), and evaluated once on the test set. The row says
  whether top-1 is within 1 point of the base's, and gives the latency measured on ONNX Runtime
  (CPU, batch 1, 1 thread, paired with the base model) beside the FLOPs.
* ``learn``: the LSTM controller against a random one (probability 0.5 for every group, never
  updated) under the same settings and seeds; every step runs all its rounds (no early end), so
  both evaluate the same number of children per step. The mean reward of each round, i.e. of each
  REINFORCE update, is the learning curve; the held-out accuracy and the test top-1 (no
  fine-tuning) of the network each one reaches the goal with are the outcome.

The LSTM rows join the method comparison through ``lstm`` in compare_cifar10.py's VARIANTS.

Results: ``benchmarks/results/lstm_cifar10.{json,md}`` and ``lstm_cifar10_learning.png``; LSTM
states and checkpoints under ``benchmarks/checkpoints/lstm_cifar10/``. Finished rows are kept and
skipped on a re-run, and an interrupted LSTM run resumes from its state. ``--quick`` runs
cifar_resnet20 from hwprune/assets on a tiny sample with one recovery iteration and short
measurements, writing under ``runs/lstm_cifar10_quick/``: a smoke run, never results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

from compare_cifar10 import ROOT, _cores, _cpu, _rel, method_epochs

RESULTS = ROOT / "benchmarks" / "results" / "lstm_cifar10"
CKS = ROOT / "benchmarks" / "checkpoints" / "lstm_cifar10"
QUICK = ROOT / "runs" / "lstm_cifar10_quick"
QUICK_OPTIONS = {"children": 2, "beam": 1, "rounds": 2, "recovery_iters": 1, "batch_size": 16, "share": 0.4}


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=("paper", "learn", "both"))
    ap.add_argument("--model", default=None, help="default: cifar_resnet56 (paper), cifar_resnet20 (learn)")
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpg")
    ap.add_argument("--paper-target", type=float, default=0.525, help="FLOPs fraction kept (47.5%% fewer)")
    ap.add_argument("--learn-target", type=float, default=0.5)
    ap.add_argument("--objective", default="flops", help="learn: flops, or latency with --table")
    ap.add_argument("--table", type=Path, default=None)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    ap.add_argument("--finetune-epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--distill", action="store_true", help="distill from the base while fine-tuning")
    ap.add_argument("--min-keep", type=float, default=0.1)
    ap.add_argument("--budget-minutes", type=float, default=None, help="the LSTM method's own budget (its default)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="an lstm setting")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--checkpoints", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run on the shipped assets, not results")
    return ap.parse_args()


def settle(a: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults; ``--quick`` swaps in the shipped model, a tiny sample and tiny settings."""
    if a.quick:
        from hwprune.pipeline import BASE_CK

        a.model, a.base, a.data = "cifar_resnet20", BASE_CK, tiny_sample(QUICK / "data")
        a.finetune_epochs, a.batch = 1, 32
        a.results, a.checkpoints = a.results or QUICK / "lstm_cifar10", a.checkpoints or QUICK / "checkpoints"
    if a.base is None:
        raise SystemExit("--base is required (or --quick)")
    a.results, a.checkpoints = a.results or RESULTS, a.checkpoints or CKS
    a.options = {**(QUICK_OPTIONS if a.quick else {}), **dict(_pair(p) for p in a.option)}
    if a.budget_minutes is not None:
        a.options["budget_minutes"] = a.budget_minutes
    return a


def _pair(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def tiny_sample(root: Path) -> Path:
    from hwprune.pipeline import SAMPLE
    from hwprune.training.data import load_dataset, save_npz_sample

    for split, per_class in (("train", 20), ("test", 5)):
        if not (root / f"{split}.npz").exists():
            save_npz_sample(load_dataset(SAMPLE, split), root / f"{split}.npz", per_class=per_class)
    return root


def _model(a, experiment: str) -> str:
    return a.model or ("cifar_resnet56" if experiment == "paper" else "cifar_resnet20")


def run_paper(a, seed: int) -> dict:
    """Prune to the paper's FLOPs fraction, fine-tune within the budget, test once, measure the latency."""
    import torch

    from hwprune.pruning.target import DeviceOptions, prune_to_target

    model, label = _model(a, "paper"), f"lstm-flops-s{seed}"
    torch.manual_seed(seed)
    work = a.checkpoints / f"{model}_{label}.lstm"
    res = prune_to_target(a.base, "lstm", "flops", a.paper_target, data=a.data, min_keep=a.min_keep,
                          options={**a.options, "seed": seed, "work_dir": str(work)}, quiet=False,
                          device=DeviceOptions(measure=False))
    meta = res.checkpoint.meta
    tuned, epochs, inside = finetune(a, res, a.checkpoints / f"{model}_{label}.pt", seed)
    from hwprune.training.checkpoint import Checkpoint

    base = Checkpoint.load(a.base)
    base_top1, top1 = base.meta.get("accuracy", {}).get("top1"), tuned["top1"]
    lat = latency(base.build_model().module, tuned["module"], tuple(base.input_size), a.quick)
    return {"experiment": "paper", "model": model, "seed": seed, "objective": "flops", "target": a.paper_target,
            "flops": meta["flops"], "flops_reduction": 1 - meta["cost_fraction"], "params": meta["params"],
            **lat, "base_top1": base_top1, "top1": top1,
            "within_1_point": None if base_top1 is None else bool(top1 >= base_top1 - 1.0),
            "finetune_epochs": epochs, "method_epochs": round(inside, 2), **_lstm_facts(meta),
            "checkpoint": _rel(a.checkpoints / f"{model}_{label}.pt")}


def finetune(a, res, ck: Path, seed: int) -> tuple[dict, int, float]:
    """The compare_cifar10 fine-tuning: ``--finetune-epochs`` less the method's own epochs, then one test."""
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.training.data import load_splits
    from hwprune.training.train import TrainConfig, evaluate, train

    splits = load_splits(a.data)
    inside = method_epochs(res.checkpoint.meta, len(splits.train), a.batch)
    epochs = max(1, a.finetune_epochs - math.ceil(inside))
    start = res.save(ck.with_name(ck.stem + ".pruned.pt"))
    cfg = TrainConfig(epochs=epochs, lr=a.lr, batch_size=a.batch, seed=seed, teacher=str(a.base) if a.distill else None)
    train(Checkpoint.load(start), splits, cfg, ck, progress=True)
    module = Checkpoint.load(ck).build_model().module
    return {"module": module, "top1": evaluate(module, splits.test)["top1"]}, epochs, inside


def latency(base, pruned, chw: tuple, quick: bool) -> dict:
    """The pruned model's latency paired with the base's: ONNX Runtime CPU, batch 1, 1 thread."""
    from hwprune.pruning.target import DeviceOptions, _final_measure, _meter

    meter = _meter({"backend": "onnxruntime", "batch": 1, "threads": 1}, base, chw,
                   DeviceOptions(patience_s=0 if quick else 180, quick=quick))
    try:
        m = _final_measure(meter, pruned)
    finally:
        meter.close()
    return {"base_ms": m["base_measured_ms"], "measured_ms": m["measured_ms"], "speedup": m["measured_speedup"],
            "measured_settled": m["measured_rounds"]["settled"]}


def run_learn(a, seed: int, controller: str) -> dict:
    """One search with the LSTM or the random controller, every round of every step run."""
    import torch

    from hwprune.pruning.target import DeviceOptions, prune_to_target

    model = _model(a, "learn")
    rounds = int(a.options.get("rounds", 3))
    opts = {**a.options, "controller": controller, "rounds": rounds, "patience": rounds, "seed": seed,
            "work_dir": str(a.checkpoints / f"{model}_learn-{controller}-s{seed}.lstm")}
    torch.manual_seed(seed)
    res = prune_to_target(a.base, "lstm", a.objective, a.learn_target, table=a.table, data=a.data, min_keep=a.min_keep,
                          options=opts, quiet=False, device=DeviceOptions(measure=False))
    meta = res.checkpoint.meta
    return {"experiment": "learn", "model": model, "seed": seed, "controller": controller, "objective": a.objective,
            "target": a.learn_target, "cost_fraction": meta["cost_fraction"], "flops": meta["flops"],
            "holdout_accuracy": meta["lstm_accuracy"], "top1_no_finetune": (meta.get("accuracy") or {}).get("top1"),
            "rewards": reward_curve(meta["lstm_log"]), **_lstm_facts(meta)}


def reward_curve(log: list[dict]) -> list[float]:
    """The mean reward of every round (one controller update each), in order."""
    return [r["mean_reward"] for s in log for r in s.get("rounds", [])]


def _lstm_facts(meta: dict) -> dict:
    return {k: meta[f"lstm_{k}"] for k in ("children", "controller_updates", "train_iters", "train_epochs", "seconds",
                                           "finished_by", "base_accuracy", "accuracy")}


def save(rows: list[dict], a) -> None:
    from hwprune.atomic import atomic_write_text

    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
           "machine": {"platform": platform.platform(), "processor": _cpu(), "cores": _cores()},
           "protocol": "benchmarks/README.md#the-pruning-comparison-protocol-compare_cifar10",
           "quick": a.quick, "settings": {"finetune_epochs": a.finetune_epochs, "lr": a.lr, "batch": a.batch,
                                          "distill": a.distill, "min_keep": a.min_keep, "lstm": a.options},
           "rows": rows}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.results.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
    atomic_write_text(a.results.with_suffix(".md"), markdown(rows, doc))
    learning_plot([r for r in rows if r["experiment"] == "learn"], a.results.with_name(a.results.name + "_learning.png"))


def markdown(rows: list[dict], doc: dict) -> str:
    lines = ["# LSTM-guided pruning on CIFAR-10", "",
             f"Generated by `python benchmarks/lstm_cifar10.py` on {doc['machine']['processor']} "
             f"({doc['machine']['cores']} cores), {doc['date']}{' (--quick: a smoke run, not results)' if doc['quick'] else ''}.",
             "", "## The paper's claim: 47.5% fewer FLOPs, comparable accuracy", "",
             "| model | seed | FLOPs kept | MFLOPs | base ms | ms | speed-up | base top-1 | top-1 | within 1 point "
             "| fine-tune epochs (+ inside) | children | updates |", "|" + "---|" * 13]
    for r in (r for r in rows if r["experiment"] == "paper"):
        lines.append(f"| {r['model']} | {r['seed']} | {1 - r['flops_reduction']:.3f} | {r['flops'] / 1e6:.1f} | "
                     f"{r['base_ms']:.3f} | {r['measured_ms']:.3f} | {r['speedup']:.2f}x | {r['base_top1']} | "
                     f"{r['top1']:.2f} | {r['within_1_point']} | {r['finetune_epochs']} (+{r['method_epochs']}) | "
                     f"{r['children']} | {r['controller_updates']} |")
    lines += ["", "## Does the controller learn? LSTM against a random controller", "",
              "| model | seed | controller | cost kept | held-out acc. | top-1 (no fine-tune) | children | "
              "mean reward, first / last third of updates |", "|" + "---|" * 8]
    for r in (r for r in rows if r["experiment"] == "learn"):
        rw = r["rewards"]
        k = max(1, len(rw) // 3)
        lines.append(f"| {r['model']} | {r['seed']} | {r['controller']} | {r['cost_fraction']:.3f} | "
                     f"{r['holdout_accuracy']:.3f} | {r['top1_no_finetune']} | {r['children']} | "
                     f"{sum(rw[:k]) / k:.3f} / {sum(rw[-k:]) / k:.3f} |")
    return "\n".join(lines) + "\n"


def learning_plot(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hwprune.atomic import atomic_write_bytes
    from hwprune.bench.report import _png

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], marker=".", ls="-" if r["controller"] == "lstm" else "--",
                label=f"{r['controller']} seed {r['seed']}")
    ax.set(xlabel="controller update (one round of children)", ylabel="mean reward of the round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(out, _png(fig))


def main() -> None:
    a = settle(args())
    import torch

    torch.set_num_threads(2)
    path = a.results.with_suffix(".json")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["experiment"], r["model"], r["seed"], r.get("controller")) for r in rows}
    todo = [("paper", None)] if a.experiment in ("paper", "both") else []
    todo += [("learn", c) for c in ("lstm", "random")] if a.experiment in ("learn", "both") else []
    for seed in a.seeds:
        for experiment, controller in todo:
            if (experiment, _model(a, experiment), seed, controller) in done:
                continue
            rows.append(run_paper(a, seed) if experiment == "paper" else run_learn(a, seed, controller))
            save(rows, a)  # commit every finished row


if __name__ == "__main__":
    main()
