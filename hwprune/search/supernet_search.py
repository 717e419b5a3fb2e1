"""Search a trained supernet under a cost budget, and meet the target on the device.

:func:`search_supernet` runs the evolutionary search (:func:`hwprune.search.evolution.evolve`)
over the supernet's width grid: costs from an objective (predicted latency, throughput, FLOPs...),
fitness from the supernet's proxy accuracy (:class:`hwprune.search.fitness.ProxyFitness`), the
population and mutations drawn from the prior the supernet learned (or uniformly).

:func:`find` is what ``hwprune search`` runs: it loads the supernet and the predictor, refuses a
target no configuration reaches or a predictor of another model before any work, searches, then
measures the best few candidates end to end on the table's backend, paired with the unpruned
model in the same rounds (the meter :func:`hwprune.pruning.target.prune_to_target` measures
with), and keeps the fittest one whose measured latency meets the target. :class:`FoundWidths`
holds the outcome; its file is also a width file (``{"model", "widths", ...}``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.pruning.space import WidthConfig
from hwprune.search.evolution import CostFraction, EvolutionConfig, SearchResult, budget_window, check_budget, evolve

FORMAT = "hwprune.search/1"
PRIORS = ("learned", "uniform")
MEASURED_OBJECTIVES = ("latency", "throughput")


@dataclass
class SearchOptions:
    """How :func:`search_supernet` searches."""

    prior: str = "learned"  # the supernet's learned prior, or "uniform"
    config: EvolutionConfig = field(default_factory=EvolutionConfig)
    window: tuple[float, float] | None = None  # budget window of cost fractions (default: 5% under the target)
    bn_batches: int = 20
    bn_batch_size: int = 128
    seed: int = 0
    state_path: str | Path | None = None  # resumable search state
    measure_top: int = 3  # candidates measured on the device

    def validate(self) -> None:
        if self.prior not in PRIORS:
            raise HwpruneError(f"unknown prior '{self.prior}'", f"choose one of {', '.join(PRIORS)}")
        if self.measure_top < 1 or self.bn_batches < 1 or self.bn_batch_size < 1:
            raise HwpruneError("measure_top, bn_batches and bn_batch_size must be at least 1")
        self.config.validate()

    def settings(self) -> dict:
        d = asdict(self)
        d["state_path"] = None if self.state_path is None else str(self.state_path)
        return d


@dataclass
class FoundWidths:
    """The outcome of :func:`find`: the winning widths, the candidates measured, the search."""

    widths: WidthConfig
    candidates: list[dict]
    search: SearchResult
    meta: dict

    def to_dict(self) -> dict:
        s = self.search
        return {"format": FORMAT, "model": self.widths.model, "widths": dict(self.widths.widths), **self.meta,
                "candidates": self.candidates, "top": [c.to_dict() for c in s.candidates],
                "generations": s.generations, "initial_inside_share": s.initial_inside_share,
                "predictor_calls": s.predictor_calls, "predicted_configs": s.predicted_configs,
                "fitness_evaluations": s.fitness_evaluations, "search_seconds": s.seconds, "repairs": s.repairs,
                "evolution": s.settings}

    def save(self, path: str | Path) -> Path:
        from hwprune.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=float) + "\n")


def search_supernet(supernet, cost, target: float, data, options: SearchOptions | None = None,
                    quiet: bool = True, fitness=None) -> tuple[SearchResult, Any]:
    """Evolve width configurations of ``supernet`` within the budget window of ``target`` under
    ``cost`` (a cost objective of the supernet's space). Returns the :class:`SearchResult` and the
    :class:`ProxyFitness` it scored with (``data``: the training data; ``fitness``: a
    :class:`ProxyFitness` of this supernet to score with instead, e.g. one shared by several searches)."""
    from hwprune.progress import item_progress
    from hwprune.search.fitness import ProxyFitness

    opts = options or SearchOptions()
    opts.validate()
    cost_fn = CostFraction(cost)
    check_budget(supernet.grid, cost_fn, target, opts.window)
    if fitness is None:
        fitness = ProxyFitness(supernet, data, n_batches=opts.bn_batches, batch_size=opts.bn_batch_size,
                               seed=opts.seed)
    prior = supernet.prior if opts.prior == "learned" else "uniform"
    with item_progress("search", enabled=not quiet) as update:
        res = evolve(supernet.grid, cost_fn, fitness, target, window=opts.window, prior=prior, config=opts.config,
                     seed=opts.seed, progress=update, state_path=opts.state_path)
    res.settings["prior"] = opts.prior
    return res, fitness


def load_predictor(table: str | Path | None, predictor):
    """The latency predictor of ``table`` (``predictor``: its saved artifact), or of the artifact
    alone, or ``predictor`` itself when it is a fitted predictor object; None without either."""
    from hwprune.prediction.artifact import load_predictor as load_artifact, predictor_for

    if predictor is not None and not isinstance(predictor, (str, Path)):
        return predictor
    if table is not None:
        return predictor_for(Path(table), predictor)
    return load_artifact(predictor) if predictor is not None else None


def check_predictor(pred, supernet) -> None:
    """One-line error when the predictor's table never covered the supernet's architecture."""
    try:
        pred.check_model(supernet.arch)
    except HwpruneError:
        models = ", ".join(getattr(pred, "models_", None) or []) or "another model"
        raise HwpruneError(f"the predictor is for {models}, not for the supernet's {supernet.arch}",
                           f"pass the latency table of {supernet.arch} on the target device") from None


def find(supernet: str | Path, objective: str, target: float, *, table: str | Path | None = None,
         predictor=None, data: str | Path | None = None, checkpoint: str | Path | None = None,
         options: SearchOptions | None = None, device=None, quiet: bool = True) -> FoundWidths:
    """Search ``supernet`` (a file) at ``target`` of ``objective``'s cost and measure the best
    ``options.measure_top`` candidates on the table's backend (``device``: a
    :class:`~hwprune.pruning.target.DeviceOptions`; ``measure=False`` measures nothing).
    ``predictor``: the artifact of ``table``'s predictor, an artifact alone, or a fitted predictor.
    With ``checkpoint`` the supernet must have been built from that base model."""
    from hwprune.pruning.objectives import objective as make_objective
    from hwprune.pruning.target import DeviceOptions
    from hwprune.search.fitness import training_data
    from hwprune.search.supernet import Supernet

    opts = options or SearchOptions()
    opts.validate()
    budget_window(target, opts.window)
    data = training_data(data)
    device = device or DeviceOptions()
    sn = Supernet.load(supernet, checkpoint=checkpoint)
    pred = load_predictor(table, predictor)
    if pred is not None:
        check_predictor(pred, sn)
    cost = make_objective(objective, sn.space, pred)
    check_budget(sn.grid, CostFraction(cost), target, opts.window)
    meet = target if objective in MEASURED_OBJECTIVES and pred is not None and device.measure else None
    res, fitness = search_supernet(sn, cost, target, data, opts, quiet=quiet)
    rows = candidate_rows(sn, res, pred, opts.measure_top)
    measured = measure_candidates(sn, rows, pred, device, meet) if pred is not None and device.measure else {}
    win = winner(rows)
    meta = {"supernet": str(supernet), "objective": objective, "target": float(target),
            "window": res.settings["window"], "prior": opts.prior, "latency_target": meet,
            "table": None if table is None else str(table), "winner": win, "fitness": fitness.info(),
            "supernet_epochs": sn.meta.get("epochs_trained"), "options": opts.settings(), **measured}
    return FoundWidths(WidthConfig(sn.arch, dict(rows[win]["widths"])), rows, res, meta)


def candidate_rows(supernet, res: SearchResult, pred, n: int) -> list[dict]:
    """The best ``n`` candidates with their predicted cost (and predicted latency with a predictor)."""
    rows = []
    for c in res.candidates[:n]:
        row = {"widths": dict(c.widths), "fitness": c.fitness, "predicted_fraction": c.cost,
               "generation": c.generation, "origin": c.origin}
        if pred is not None:
            row["predicted_ms"] = float(pred.predict(supernet.arch, [WidthConfig(supernet.arch, c.widths)])[0])
        rows.append(row)
    return rows


def measure_candidates(supernet, rows: list[dict], pred, device, meet: float | None) -> dict:
    """Measure every row's model end to end, paired with the unpruned model in the same rounds,
    on the predictor's backend and settings; each row gets its measured latency, ratio and whether
    it meets ``meet``. Returns what the measurement was made of."""
    from hwprune.pruning.target import ESTIMATOR, _meter

    meter = _meter(pred.settings_, supernet.plain_model(), tuple(supernet.input_size), device)
    try:
        g = meter({f"candidate{i}": supernet.extract(r["widths"]) for i, r in enumerate(rows)})
    finally:
        meter.close()
    for i, r in enumerate(rows):
        ratio = g.ratios[f"candidate{i}"]
        r.update(measured_ms=g.ms[f"candidate{i}"], measured_ratio=ratio, meets=meet is None or ratio <= meet)
    return {"base_measured_ms": g.reference_ms, "base_predicted_ms": float(pred.predict(supernet.arch,
                                                                                          [supernet.grid.full()])[0]),
            "measured_rounds": {"rounds": g.rounds, "gated": g.gated_rounds, "settled": g.settled},
            "measured_estimator": ESTIMATOR}


def winner(rows: list[dict]) -> int:
    """The fittest row that meets the measured target (rows come fittest first); where none does,
    the one measured fastest."""
    for i, r in enumerate(rows):
        if r.get("meets", True):
            return i
    return min(range(len(rows)), key=lambda i: rows[i]["measured_ratio"])
