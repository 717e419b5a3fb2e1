"""Prior-distributed sampling against uniform sampling in the evolutionary search (PSE-Net).

Run from the repository root with nothing else using the CPU (pause trainings first):

    python benchmarks/search_prior.py \\
        --checkpoint benchmarks/checkpoints/baselines180/cifar_resnet20/cifar_resnet20.pt \\
        --data ../shared/data/cifar10-jpg --table TABLE --seeds 0,1,2
    python benchmarks/search_prior.py --supernet SUPERNET --data ../shared/data/cifar10-jpg --table TABLE

On a cifar_resnet20 supernet (trained here with ``hwprune.search.supernet_training.train_supernet``
at its defaults and ``--supernet-epochs``, or given with ``--supernet``), the search of
:func:`hwprune.search.supernet_search.search_supernet` runs at the targets 0.5 and 0.35 of the
base model's cost (predicted latency with ``--table``, else FLOPs), once drawing its initial
population, top-up samples and mutations from the prior the supernet learned while it trained
and once uniformly over the width grid, with the same seeds, settings (MetaPruning's: population
50, 10 parents, 25 mutations and 25 crossovers, 20 generations) and proxy fitness (top-1 on the
supernet's held-out training split after BN recalibration; one fitness shared by every run, so
that both samplers are scored on the same images). Reported per target and sampler:

* the share of the initial population's first draws inside the budget window (5% under the
  target) before any repair, and the same share over ``--draws`` draws, a tighter estimate;
* the best proxy fitness of every generation, and the best seen so far, averaged over the seeds;
* fitness evaluations, cost-model calls and repairs.

Results: ``benchmarks/results/search_prior.{json,md}`` and ``search_prior.png``; the supernet and
the resumable search states under ``benchmarks/checkpoints/search_prior/``. Finished rows are kept
and skipped on a re-run. ``--quick`` trains a one-step supernet of the shipped cifar_resnet20 on a
tiny sample and runs two tiny generations, writing under ``runs/search_prior_quick/``: a smoke
run, never results.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_cifar10 import ROOT, _cores, _cpu, _rel  # noqa: E402
from lstm_cifar10 import tiny_sample  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "search_prior"
CKS = ROOT / "benchmarks" / "checkpoints" / "search_prior"
QUICK = ROOT / "runs" / "search_prior_quick"
PRIORS = ("learned", "uniform")
QUICK_SUPERNET = {"epochs": 1, "max_iters": 2, "batch_size": 32, "holdout": 4, "fractions": (0.5, 0.75, 1.0)}
QUICK_SEARCH = {"population": 6, "parents": 2, "mutations": 2, "crossovers": 2, "generations": 2}


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--supernet", type=Path, default=None, help="a trained cifar_resnet20 supernet")
    ap.add_argument("--checkpoint", type=Path, default=None, help="base checkpoint to train a supernet from")
    ap.add_argument("--supernet-epochs", type=int, default=30)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpg")
    ap.add_argument("--table", type=Path, default=None, help="latency table of cifar_resnet20 (else FLOPs)")
    ap.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.35])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--population", type=int, default=50)
    ap.add_argument("--draws", type=int, default=2000, help="draws for the tighter inside-budget estimate")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--checkpoints", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run on the shipped assets, not results")
    a = ap.parse_args()
    if a.quick:
        from hwprune.pipeline import BASE_CK

        a.checkpoint, a.data, a.supernet, a.draws, a.seeds = BASE_CK, tiny_sample(QUICK / "data"), None, 200, [0]
        a.results, a.checkpoints = a.results or QUICK / "search_prior", a.checkpoints or QUICK / "checkpoints"
    elif a.supernet is None and a.checkpoint is None:
        raise SystemExit("give --supernet, or --checkpoint to train one (or --quick)")
    a.results, a.checkpoints = a.results or RESULTS, a.checkpoints or CKS
    return a


def supernet_path(a) -> Path:
    """The supernet to search: ``--supernet``, or one trained (resumably) from ``--checkpoint``."""
    if a.supernet is not None:
        return a.supernet
    from hwprune.search.supernet_training import SupernetConfig, train_supernet

    path = a.checkpoints / "supernet.pt"
    if not path.exists():
        cfg = SupernetConfig(**QUICK_SUPERNET) if a.quick else SupernetConfig(epochs=a.supernet_epochs)
        train_supernet(a.checkpoint, a.data, cfg, path, progress=not a.quick)
    return path


def search_config(a):
    from hwprune.search.evolution import EvolutionConfig

    if a.quick:
        return EvolutionConfig(**QUICK_SEARCH)
    return EvolutionConfig(population=a.population, generations=a.generations)


def run_one(a, sn, cost, fitness, target: float, prior: str, seed: int) -> dict:
    """One search: its inside-budget shares, its fitness per generation, its counts."""
    from hwprune.search.evolution import CostFraction, inside_share
    from hwprune.search.supernet_search import SearchOptions, search_supernet

    state = a.checkpoints / f"state-{target:g}-{prior}-{seed}.json"
    opts = SearchOptions(prior=prior, config=search_config(a), seed=seed, state_path=state)
    res, _ = search_supernet(sn, cost, target, a.data, opts, quiet=a.quick, fitness=fitness)
    draws = inside_share(sn.grid, CostFraction(cost), target, sn.prior if prior == "learned" else "uniform",
                         n=a.draws, seed=seed)
    g = res.generations
    return {"target": target, "prior": prior, "seed": seed, "initial_inside_share": res.initial_inside_share,
            "draws_inside_share": draws, "draws": a.draws, "best": [h["best"] for h in g],
            "mean": [h["mean"] for h in g], "best_so_far": [h["best_so_far"] for h in g],
            "final_best": res.best.fitness, "final_cost": res.best.cost, "final_widths": res.best.widths,
            "fitness_evaluations": res.fitness_evaluations, "predictor_calls": res.predictor_calls,
            "predicted_configs": res.predicted_configs, "repairs": res.repairs, "seconds": round(res.seconds, 1)}


def load_rows(a) -> list[dict]:
    path = a.results.with_suffix(".json")
    return json.loads(path.read_text())["rows"] if path.exists() else []


def main() -> None:
    from hwprune.atomic import atomic_write_text
    from hwprune.pruning.objectives import objective
    from hwprune.search.fitness import ProxyFitness
    from hwprune.search.supernet import Supernet

    a = args()
    a.checkpoints.mkdir(parents=True, exist_ok=True)
    sn = Supernet.load(supernet_path(a))
    pred = None
    if a.table is not None:
        from hwprune.prediction.artifact import predictor_for

        pred = predictor_for(a.table)
    cost = objective("latency" if pred is not None else "flops", sn.space, pred)
    fitness = ProxyFitness(sn, a.data)
    rows = load_rows(a)
    done = {(r["target"], r["prior"], r["seed"]) for r in rows}
    for target in a.targets:
        for seed in a.seeds:
            for prior in PRIORS:
                if (target, prior, seed) not in done:
                    rows.append(run_one(a, sn, cost, fitness, target, prior, seed))
                    doc = document(a, sn, cost, fitness, rows)
                    a.results.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(a.results.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
                    atomic_write_text(a.results.with_suffix(".md"), markdown(doc))
    plot(rows, a.results.with_name(a.results.name + ".png"))
    print(f"wrote {_rel(a.results.with_suffix('.md'))}")


def document(a, sn, cost, fitness, rows: list[dict]) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "quick": a.quick,
            "machine": {"cpu": _cpu(), "cores": _cores()}, "model": sn.arch, "objective": cost.name,
            "table": None if a.table is None else _rel(a.table), "supernet": _rel(Path(supernet_path(a))),
            "supernet_epochs": sn.meta.get("epochs_trained"), "supernet_training": sn.meta.get("training"),
            "grid": sn.grid.to_dict(), "search": search_config(a).__dict__, "fitness": fitness.info(),
            "summary": summary(rows), "rows": rows}


def summary(rows: list[dict]) -> list[dict]:
    """Per target and prior, the means over the seeds."""
    out = []
    for target in sorted({r["target"] for r in rows}, reverse=True):
        for prior in PRIORS:
            rs = [r for r in rows if r["target"] == target and r["prior"] == prior]
            if not rs:
                continue
            curve = np.mean([r["best_so_far"] for r in rs if len(r["best_so_far"]) == len(rs[0]["best_so_far"])], 0)
            out.append({"target": target, "prior": prior, "seeds": len(rs),
                        "initial_inside_share": float(np.mean([r["initial_inside_share"] for r in rs])),
                        "draws_inside_share": float(np.mean([r["draws_inside_share"] for r in rs])),
                        "best_so_far": [round(float(v), 3) for v in curve],
                        "final_best": float(np.mean([r["final_best"] for r in rs])),
                        "fitness_evaluations": float(np.mean([r["fitness_evaluations"] for r in rs])),
                        "predictor_calls": float(np.mean([r["predictor_calls"] for r in rs]))})
    return out


def markdown(doc: dict) -> str:
    quick = " (--quick: a smoke run, not results)" if doc["quick"] else ""
    s = doc["search"]
    lines = ["# Prior-distributed sampling against uniform sampling in the search", "",
             f"{doc['model']} supernet ({doc['supernet_epochs']} epochs), {doc['objective']} objective"
             f"{' from ' + doc['table'] if doc['table'] else ''}, budget window 5% under the target; "
             f"population {s['population']}, {s['parents']} parents, {s['mutations']} mutations, {s['crossovers']} "
             f"crossovers, {s['generations']} generations; fitness: proxy top-1 on "
             f"{doc['fitness']['held_out_images']} held-out training images after BN recalibration. "
             f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores), {doc['date']}{quick}.", "",
             "| target | sampler | seeds | inside budget, first draws | inside budget, all draws | best fitness, "
             "generation 1 | best fitness, last | evaluations | cost calls |", "|" + "---|" * 9]
    for r in doc["summary"]:
        lines.append(f"| {r['target']:g} | {r['prior']} | {r['seeds']} | {r['initial_inside_share']:.1%} | "
                     f"{r['draws_inside_share']:.1%} | {r['best_so_far'][0]:.2f} | {r['final_best']:.2f} | "
                     f"{r['fitness_evaluations']:.0f} | {r['predictor_calls']:.0f} |")
    lines += ["", "Best fitness seen so far, per generation (mean over the seeds):", "",
              "| target | sampler | " + " | ".join(str(i + 1) for i in range(s["generations"])) + " |",
              "|" + "---|" * (2 + s["generations"])]
    for r in doc["summary"]:
        lines.append(f"| {r['target']:g} | {r['prior']} | " + " | ".join(f"{v:.2f}" for v in r["best_so_far"]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for prior in PRIORS:
            for r in (r for r in rows if r["target"] == target and r["prior"] == prior):
                ax.plot(range(1, len(r["best_so_far"]) + 1), r["best_so_far"], color="C0" if prior == "learned"
                        else "C1", alpha=0.8, label=prior if r["seed"] == min(x["seed"] for x in rows) else None)
        ax.set(title=f"target {target:g}", xlabel="generation", ylabel="best proxy top-1 so far (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
