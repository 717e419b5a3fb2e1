"""The quickstart's pruning recipe, chosen on a held-out split of its training sample.

Run from the repository root with nothing else using the CPU:

    python benchmarks/quickstart_recipe.py [--target 0.6] [--table TABLE]

For a table like the one the quickstart profiles (1 thread, 40 configurations, no isolated unit
benchmarks): ``hwprune profile --model cifar_resnet20 --threads 1 --configs 40 --micro 0 --out T``.

The quickstart prunes the shipped cifar_resnet20 with GCP on the shipped CIFAR-10 images (the 50,000
training images and a 2,000-image test sample) and fine-tunes it on the same training images. Its recipe (GCP's lambda and
learning rate, the fine-tuning epochs, learning rate and distillation) is chosen here without the
sample's test images: GCP and fine-tuning train on the sample's training images, as in the
quickstart, and are scored on 2,000 other CIFAR-10 test images (200 per class, from ``--data``; a
split of the training sample would not do, as the base trained on it). The base is pruned once per
GCP setting to the predicted latency target (no device measurement: the widths, not the timings,
are what the recipe changes), and every fine-tuning variant of that pruned model is scored on the
held-out images. The quickstart then uses the best variant and touches the test sample once, in
its own run.

Results: ``benchmarks/results/quickstart_recipe.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLE = ROOT / "latency_tables" / "onnxruntime-cpu-t2-b1" / "cifar_resnet20.parquet"

GCP_SETTINGS = {  # label: GCP options (the quickstart's 4 rounds of 30 iterations)
    "lam0.01": {"lam_factor": 0.01, "lr": 0.01},
    "lam0.03": {"lam_factor": 0.03, "lr": 0.01},
    "lam0.1": {"lam_factor": 0.1, "lr": 0.01},
    "lam0.3": {"lam_factor": 0.3, "lr": 0.01},
    "lam1": {"lam_factor": 1.0, "lr": 0.01},
    "lam0.3-keep": {"lam_factor": 0.3, "lr": 0.01, "streams": "keep"},  # residual streams whole
    "lam0.1-keep": {"lam_factor": 0.1, "lr": 0.01, "streams": "keep"},
    "lam1-keep": {"lam_factor": 1.0, "lr": 0.01, "streams": "keep"},
    # streams whole and every other group kept at 0.5 / 0.4 of its channels at least (--min-keep)
    "lam0.3-keep-floor0.5": {"lam_factor": 0.3, "lr": 0.01, "streams": "keep", "min_keep": 0.5},
    "lam0.3-keep-floor0.4": {"lam_factor": 0.3, "lr": 0.01, "streams": "keep", "min_keep": 0.4},
    "lam0.3-floor0.5": {"lam_factor": 0.3, "lr": 0.01, "min_keep": 0.5},  # every group, streams too, >= 0.5
    # GCP's widths and surviving channels, with the base model's weights instead of GCP's trained ones
    "lam0.3-keep-base-weights": {"lam_factor": 0.3, "lr": 0.01, "streams": "keep", "weights": "base"},
    "lam0.3-keep-floor0.5-base-weights": {"lam_factor": 0.3, "lr": 0.01, "streams": "keep", "min_keep": 0.5,
                                          "weights": "base"},
    "lam0.3-paper": {"lam_factor": 0.3, "lr": 0.01, "recover": "paper"},  # recovery leaves the convolutions alone
    "lam1-paper": {"lam_factor": 1.0, "lr": 0.01, "recover": "paper"},
    "l1": {"method": "l1"},  # references: the same fine-tuning after a method that does not train
    "uniform": {"method": "uniform"},
    "inner-half": {"method": "inner-half"},  # every inner convolution halved, residual streams whole, L1-kept
}
FINETUNES = {  # label: (epochs, peak lr, distil from the base)
    "ce-3ep": (3, 0.01, False),
    "kd-10ep": (10, 0.01, True),
    "kd-20ep": (20, 0.01, True),
    "kd-20ep-lr0.03": (20, 0.03, True),
    "kd-20ep-lr0.003": (20, 0.003, True),
    "kd-20ep-lr0.001": (20, 0.001, True),
    "kd-20ep-lr0.1": (20, 0.1, True),
    "kd-30ep-lr0.05": (30, 0.05, True),
    "kd-8ep-lr0.05": (8, 0.05, True),
    "kd-12ep-lr0.05": (12, 0.05, True),
    "kd-5ep-lr0.05": (5, 0.05, True),
    "kd-3ep-lr0.05": (3, 0.05, True),
}


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=0.6, help="fraction of the base's predicted latency")
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpg",
                    help="the full CIFAR-10 JPEG tarballs (the held-out images come from its test split)")
    ap.add_argument("--gcp", type=lambda s: s.split(","), default=list(GCP_SETTINGS))
    ap.add_argument("--finetunes", type=lambda s: s.split(","), default=list(FINETUNES))
    ap.add_argument("--train-per-class", type=int, default=None,
                    help="train on this many training images per class of --data instead of the sample's")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for training")
    ap.add_argument("--results", type=Path, default=RESULTS / "quickstart_recipe")
    return ap.parse_args()


def _first(tar: tarfile.TarFile, per_class: int, skip: set[str] = frozenset()) -> list[tarfile.TarInfo]:
    """The first ``per_class`` files (by name) of every class folder of ``tar``, less ``skip``."""
    by_class: dict[str, list] = {}
    for m in sorted((m for m in tar.getmembers() if m.isfile() and m.name not in skip), key=lambda m: m.name):
        by_class.setdefault(str(Path(m.name).parent), []).append(m)
    return [m for c in sorted(by_class) for m in by_class[c][:per_class]]


def tuning_split(sample: Path, cifar: Path, out: Path, per_class: int = 200, train_per_class: int | None = None) -> Path:
    """``out`` with ``train/`` (the sample's training images, as the quickstart trains on; with
    ``train_per_class``, that many of the full training set's per class, the sample's first) and ``test/``
    (held out: ``per_class`` CIFAR-10 test images per class that follow the sample's own test images,
    which are the first of every class). The base never trained on either test set."""
    if train_per_class:
        with tarfile.open(cifar / "train.tar.gz") as t:
            t.extractall(out, members=_first(t, train_per_class), filter="data")
    else:
        with tarfile.open(sample / "train.tar.gz") as t:
            t.extractall(out, filter="data")
    with tarfile.open(sample / "test.tar.gz") as t:
        shipped = {m.name for m in t.getmembers() if m.isfile()}
    with tarfile.open(cifar / "test.tar.gz") as t:
        t.extractall(out, members=_first(t, per_class, shipped), filter="data")
    return out


def inner_half(base: Path, data: Path, table: Path, out: Path) -> dict:
    """The hand-set reference: every inner convolution of each block halved, the residual streams
    whole, the L1-largest channels kept; not fine-tuned; its checkpoint at ``out``."""
    from hwprune.prediction.artifact import predictor_for
    from hwprune.pruning.importance import channel_importance, keep_indices
    from hwprune.pruning.space import PruningSpace, WidthConfig
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.training.train import evaluate_checkpoint

    ck = Checkpoint.load(base)
    spec = ck.build_model()
    space = PruningSpace(spec.module, (1, *spec.input_size), name=spec.name)
    full = {g.id: g.channels for g in space.groups}
    widths = WidthConfig(spec.name, {g: c // 2 if g.endswith(".conv1") else c for g, c in full.items()})
    _from_base(base, widths, keep_indices(channel_importance(space, criterion="l1"), widths, space), ck.meta, out)
    pred = predictor_for(table)
    p, p0 = pred.predict(spec.name, [widths, WidthConfig(spec.name, full)])
    return {"gcp": {"method": "inner-half"}, "cost_fraction": float(p / p0), "predicted_ms": float(p),
            "base_predicted_ms": float(p0), "held_top1_before_finetune": evaluate_checkpoint(out, data)["top1"],
            "widths": dict(widths.widths), "prune_seconds": 0.0}


def _from_base(base: Path, widths, keep: dict, meta: dict, out: Path) -> None:
    """Write to ``out`` the base model cut to ``widths``, keeping the channels ``keep``."""
    from hwprune.models import ModelSpec
    from hwprune.pruning.space import PruningSpace
    from hwprune.training.checkpoint import Checkpoint

    spec = Checkpoint.load(base).build_model()
    space = PruningSpace(spec.module, (1, *spec.input_size), name=spec.name)
    small = ModelSpec(spec.name, space.apply(widths, keep=keep), spec.input_size, spec.num_classes)
    Checkpoint.from_model(small, widths=dict(widths.widths), meta=dict(meta)).save(out)


def pruned(base: Path, data: Path, table: Path, target: float, options: dict, out: Path) -> dict:
    """GCP to ``target`` of the predicted latency, not fine-tuned; its checkpoint at ``out``."""
    from hwprune.prediction.artifact import predictor_for
    from hwprune.pruning.target import DeviceOptions, prune_to_target
    from hwprune.training.train import evaluate_checkpoint

    method = options.get("method", "gcp")
    if method == "inner-half":
        return inner_half(base, data, table, out)
    t0 = time.perf_counter()
    opts = {"steps": 4, "iters": 30, **options} if method == "gcp" else {}
    min_keep, weights = opts.pop("min_keep", 0.2), opts.pop("weights", "method")
    res = prune_to_target(base, method, "latency", target, predictor=predictor_for(table), table=table, data=data,
                          device=DeviceOptions(measure=False), options=opts, quiet=True, min_keep=min_keep)
    res.save(out)
    if weights == "base":  # the same channels, cut from the base model's weights
        _from_base(base, res.widths, res.keep, res.checkpoint.meta, out)
    m = res.checkpoint.meta
    before = m["accuracy"]["top1"] if weights != "base" else evaluate_checkpoint(out, data)["top1"]
    return {"gcp": options, "cost_fraction": res.cost_fraction, "predicted_ms": m.get("predicted_ms"),
            "base_predicted_ms": m.get("base_predicted_ms"), "held_top1_before_finetune": before,
            "widths": dict(res.widths.widths), "prune_seconds": round(time.perf_counter() - t0, 1)}


def finetuned(pruned_ck: Path, base: Path, data: Path, recipe: tuple, threads: int, out: Path) -> dict:
    """Fine-tune ``pruned_ck`` with ``recipe`` and score it on the held-out images."""
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.training.data import load_splits
    from hwprune.training.train import TrainConfig, evaluate, train

    epochs, lr, kd = recipe
    splits = load_splits(data)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=128, teacher=str(base) if kd else None, threads=threads,
                      eval_every=10 ** 6)
    t0 = time.perf_counter()
    result = train(Checkpoint.load(pruned_ck), splits, cfg, out, resume=False, progress=False)
    seconds = time.perf_counter() - t0
    ck = Checkpoint.load(result.checkpoint)
    return {"epochs": epochs, "lr": lr, "distill": kd, "finetune_seconds": round(seconds, 1),
            "held_top1": evaluate(ck.build_model().module, splits.test)["top1"]}


def main() -> None:
    a = args()
    from hwprune.pipeline import BASE_CK, SAMPLE
    from hwprune.training.train import evaluate_checkpoint

    a.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hwprune-recipe-") as d:
        data = tuning_split(SAMPLE, a.data, Path(d) / "data", train_per_class=a.train_per_class)
        base_held = evaluate_checkpoint(BASE_CK, data)["top1"]
        train_images = sum(1 for f in (data / "train").rglob("*") if f.is_file())
        for g in a.gcp:
            ck = Path(d) / f"{g}.pt"
            p = pruned(BASE_CK, data, a.table, a.target, GCP_SETTINGS[g], ck)
            for f in a.finetunes:
                r = finetuned(ck, BASE_CK, data, FINETUNES[f], a.threads, Path(d) / f"{g}-{f}.pt")
                rows.append({"gcp_setting": g, "finetune": f, **p, **r, "drop": round(base_held - r["held_top1"], 2)})
                print(json.dumps({k: rows[-1][k] for k in ("gcp_setting", "finetune", "held_top1", "drop",
                                                           "held_top1_before_finetune", "cost_fraction",
                                                           "prune_seconds", "finetune_seconds")}), flush=True)
    write(a, base_held, rows, train_images)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write(a, base_held: float, rows: list[dict], train_images: int) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    load = os.getloadavg()[0]
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "commit": commit,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "loadavg_1min_at_end": round(load, 2), "target": a.target, "train_images": train_images, "table": _shown(a.table),
           "base_held_top1": base_held, "rows": rows}
    best = min(rows, key=lambda r: (r["drop"], r["finetune_seconds"]))
    doc["best"] = {"gcp_setting": best["gcp_setting"], "finetune": best["finetune"]}
    Path(f"{a.results}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# The quickstart's recipe, chosen on held-out training images", "",
             f"{doc['date']}, commit {commit}, {doc['machine']}. Shipped cifar_resnet20 pruned with GCP to "
             f"{a.target:g} of its predicted latency (table `{doc['table']}`, no device measurement), 4 rounds of 30 "
             f"iterations, and fine-tuned on {train_images:,} training images "
             f"({'the sample' if not a.train_per_class else 'the first of each class of the training set'}); scored on 2,000 other CIFAR-10 test "
             f"images (the base: {base_held:.2f}%). Generated by `python benchmarks/quickstart_recipe.py`.", "",
             "| GCP | fine-tuning | epochs | lr | distilled | held-out top-1 | drop (points) | before fine-tuning | "
             "GCP s | fine-tuning s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gcp_setting']} | {r['finetune']} | {r['epochs']} | {r['lr']:g} | "
                     f"{'yes' if r['distill'] else 'no'} | {r['held_top1']:.2f}% | {r['drop']:.2f} | "
                     f"{r['held_top1_before_finetune']:.2f}% | {r['prune_seconds']:.0f} | {r['finetune_seconds']:.0f} |")
    lines += ["", f"Best: GCP `{best['gcp_setting']}`, fine-tuning `{best['finetune']}`.", ""]
    if load >= 0.5 * (os.cpu_count() or 1):
        lines += [f"Timed under load (load average {load:.2f}): the seconds are upper bounds.", ""]
    Path(f"{a.results}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
