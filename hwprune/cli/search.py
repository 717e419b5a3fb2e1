"""``hwprune search``: evolutionary search of a trained supernet under a cost budget."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer

from hwprune.cli import app, console
from hwprune.cli.predict import PREDICTOR_HELP


@app.command()
def search(
    supernet: Path = typer.Option(..., "--supernet", help="Trained supernet (`hwprune supernet train`)."),
    out: Path = typer.Option(..., "--out", help="Result JSON to write (also a width file of the winner)."),
    target: float = typer.Option(..., "--target", help="Fraction of the base model's cost to meet, e.g. 0.5."),
    table: Optional[Path] = typer.Option(None, "--table", help="Latency table of the target device."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help=PREDICTOR_HELP + " Alone: that artifact."),
    objective: str = typer.Option("latency", "--objective", help="latency | throughput | flops | params | memory"),
    data: Optional[Path] = typer.Option(None, "--data", help="The training data the supernet was trained on."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Check the supernet was built from it."),
    prior: str = typer.Option("learned", "--prior", help="learned (the supernet's sampling prior) | uniform"),
    generations: int = typer.Option(20, "--generations", min=1),
    population: int = typer.Option(50, "--population", min=1),
    parents: int = typer.Option(10, "--parents", min=1, help="Best candidates children are bred from."),
    mutations: int = typer.Option(25, "--mutations", min=0, help="Mutations per generation."),
    crossovers: int = typer.Option(25, "--crossovers", min=0, help="Crossovers per generation."),
    mutation_prob: float = typer.Option(0.1, "--mutation-prob", min=0.0, max=1.0),
    window: float = typer.Option(0.05, "--window", min=0.0, max=1.0,
                                 help="Budget window: costs from (1 - WINDOW) * target up to the target."),
    bn_batches: int = typer.Option(20, "--bn-batches", min=1, help="Training batches that recalibrate BN."),
    measure: bool = typer.Option(True, "--measure/--no-measure",
                                 help="Measure the best candidates end to end on the table's backend."),
    measure_top: int = typer.Option(3, "--measure-top", min=1, help="How many of the best are measured."),
    seed: int = typer.Option(0, "--seed"),
    state: Optional[Path] = typer.Option(None, "--state", help="Keep the search state here; resume from it."),
    patience: float = typer.Option(180.0, "--patience", min=0.0,
                                   help="Seconds a measurement may wait for a shared host's fast state."),
    quick: bool = typer.Option(False, "--quick", help="Short device measurements (smoke tests, not for results)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Search a supernet for the fittest widths within a cost budget; the best few are measured on the device."""
    found = _find(SimpleNamespace(**locals()))
    found.save(out)
    _print(found, out, as_json)


def _find(a: SimpleNamespace):
    """Check the output path, then run :func:`~hwprune.search.supernet_search.find` with the command's options."""
    from hwprune.atomic import check_writable
    from hwprune.cli.prune import _set_threads
    from hwprune.pruning.target import DeviceOptions
    from hwprune.search.evolution import EvolutionConfig
    from hwprune.search.supernet_search import SearchOptions, find

    check_writable(a.out)
    _set_threads(a.threads)
    cfg = EvolutionConfig(population=a.population, parents=a.parents, mutations=a.mutations, crossovers=a.crossovers,
                          mutation_prob=a.mutation_prob, generations=a.generations)
    opts = SearchOptions(prior=a.prior, config=cfg, window=(a.target * (1 - a.window), a.target),
                         bn_batches=a.bn_batches, seed=a.seed, state_path=a.state, measure_top=a.measure_top)
    return find(a.supernet, a.objective, a.target, table=a.table, predictor=a.predictor, data=a.data,
                checkpoint=a.checkpoint, options=opts,
                device=DeviceOptions(measure=a.measure, patience_s=a.patience, quick=a.quick), quiet=a.as_json)


def _print(found, out: Path, as_json: bool) -> None:
    d = found.to_dict()
    if as_json:
        typer.echo(json.dumps({k: v for k, v in d.items() if k != "top"}, indent=1, default=float))
        return
    for h in d["generations"]:
        best = "-" if h["best"] is None else f"{h['best']:.2f}"
        mean = "-" if h["mean"] is None else f"{h['mean']:.2f}"
        console.print(f"  generation {h['generation'] + 1}: best {best}, mean {mean}, best so far "
                      f"{h['best_so_far']:.2f} ({h['evaluated']} evaluated)", highlight=False)
    for i, c in enumerate(d["candidates"]):
        measured = f", measured {c['measured_ratio']:.3f} of the base" if "measured_ratio" in c else ""
        mark = " <- winner" if i == d["winner"] else ""
        console.print(f"  candidate {i}: fitness {c['fitness']:.2f}, predicted {c['predicted_fraction']:.3f} of the "
                      f"base {d['objective']}{measured}{mark}", highlight=False)
    console.print(f"searched {d['model']} at {d['target']:.3f} of its {d['objective']} with the {d['prior']} prior "
                  f"({d['fitness_evaluations']} candidates scored, {d['initial_inside_share']:.1%} of the first "
                  f"draws inside the budget) -> {out}", highlight=False)
