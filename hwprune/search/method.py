"""The ``search`` pruning method: train a supernet, search it under the budget, extract the winner.

``hwprune prune --method search`` (or :func:`hwprune.prune_to_target` with ``method="search"``)
trains a weight-sharing supernet of the base checkpoint (:func:`hwprune.search.supernet_training.train_supernet`),
or reuses one (``--supernet`` / ``options["supernet"]``), runs the evolutionary search at the
cost goal the measured-target loop gives it (:func:`hwprune.search.supernet_search.search_supernet`)
and cuts the winner out of the supernet. The supernet sorted every group's channels by importance
and every subnet keeps a group's first channels, so the scores it hands the device correction
rank channels in that order (first channels most important): the correction removes a group's
last channels and gives back its first removed ones, and the model stays a subnet of the
supernet. The supernet's training epochs are recorded (``method_epochs``) since they count
against a comparison's training budget.

Settings (``--option KEY=VALUE``), each checked before any work by :meth:`Search.validate`:

* ``supernet``: a trained supernet file to reuse; ``supernet_out``: where a trained one is written
  (and resumed from; default: a temporary directory);
* ``supernet_epochs`` and ``supernet_<setting>`` / ``mode``: the supernet's training recipe
  (:class:`~hwprune.search.supernet_training.SupernetConfig`, e.g. ``supernet_epochs=30``,
  ``mode=parallel``, ``supernet_holdout=200``);
* ``prior`` (learned | uniform), ``generations``, ``population``, ``parents``, ``mutations``,
  ``crossovers``, ``mutation_prob``, ``window`` (the budget window's width under the goal, a
  fraction of it), ``bn_batches``, ``seed``, ``search_state`` (a resumable search state file);
* ``budget_minutes`` (``--budget-minutes``): the search stops after the generation that ends past
  it (supernet training included).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch.nn as nn

from hwprune.errors import HwpruneError
from hwprune.pruning.methods import METHODS, MethodOutput, PruneJob, normalised
from hwprune.pruning.space import WidthConfig

#: settings the evolution takes, and their types
EVOLUTION_KEYS = {"generations": int, "population": int, "parents": int, "mutations": int, "crossovers": int,
                  "mutation_prob": float, "top_k": int, "sample_tries": int}
SEARCH_KEYS = {"prior": str, "window": float, "bn_batches": int, "bn_batch_size": int, "seed": int,
               "search_state": str, "supernet": str, "supernet_out": str, "budget_minutes": float, "mode": str}
#: settings ``hwprune prune`` passes to every method (those of other methods): ignored here
OTHER_METHODS_KEYS = ("steps", "iters", "recover")


def supernet_settings(options: dict[str, Any]):
    """The :class:`SupernetConfig` the options describe (``supernet_<field>``, ``mode``), validated."""
    from hwprune.search.supernet_training import SupernetConfig

    names = {f.name for f in dataclasses.fields(SupernetConfig)}
    given = {k.removeprefix("supernet_"): v for k, v in options.items()
             if k.startswith("supernet_") and k not in ("supernet_out",)}
    if "mode" in options:
        given["mode"] = options["mode"]
    unknown = sorted(set(given) - names)
    if unknown:
        raise HwpruneError(f"unknown supernet setting '{unknown[0]}'",
                           f"supernet_ settings: {', '.join(sorted(names))}")
    if "fractions" in given and not isinstance(given["fractions"], (list, tuple)):
        raise HwpruneError("supernet_fractions must be a JSON list of width fractions, e.g. [0.25,0.5,0.75,1]")
    cfg = SupernetConfig(**{k: tuple(v) if k == "fractions" else v for k, v in given.items()})
    cfg.validate()
    return cfg


def search_options(options: dict[str, Any]):
    """The :class:`SearchOptions` the options describe, validated."""
    from hwprune.search.evolution import EvolutionConfig
    from hwprune.search.supernet_search import SearchOptions

    cfg = EvolutionConfig(**{k: options[k] for k in EVOLUTION_KEYS if k in options})
    minutes = options.get("budget_minutes")
    if minutes is not None:
        cfg.max_seconds = 60.0 * float(minutes)
    width = float(options.get("window", 0.05))
    if not 0.0 < width < 1.0:
        raise HwpruneError(f"the budget window's width must lie in (0, 1), got {width}")
    opts = SearchOptions(prior=options.get("prior", "learned"), config=cfg, bn_batches=options.get("bn_batches", 20),
                         bn_batch_size=options.get("bn_batch_size", 128), seed=options.get("seed", 0),
                         state_path=options.get("search_state"))
    opts.validate()
    return opts, width


def _check_types(options: dict[str, Any]) -> None:
    types = {**EVOLUTION_KEYS, **SEARCH_KEYS}
    for key, value in options.items():
        if key in OTHER_METHODS_KEYS or key.startswith("supernet_") and key not in types:
            continue
        if key not in types:
            raise HwpruneError(f"unknown search setting '{key}'", f"choose from {', '.join(sorted(types))} or "
                                                                    "supernet_<setting>")
        want = types[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else \
            isinstance(value, want) and not isinstance(value, bool)
        if value is not None and not ok:
            raise HwpruneError(f"search setting {key} must be {want.__name__}, got {value!r}")


@METHODS.register("search", "supernet + evolutionary search under the budget, prior-distributed sampling (PSE-Net)")
class Search:
    needs_data: ClassVar[bool] = True

    def validate(self, options: dict[str, Any]) -> None:
        _check_types(options)
        search_options(options)
        if options.get("supernet") is not None:
            if not Path(options["supernet"]).is_file():
                raise HwpruneError(f"supernet {options['supernet']} does not exist",
                                   "train one with `hwprune supernet train`, or leave --supernet out")
            recipe = sorted(k for k in options if k.startswith("supernet_") or k == "mode")
            if recipe:
                raise HwpruneError(f"{recipe[0]} is a supernet training setting, but --supernet reuses a trained "
                                   "supernet", "leave out one or the other")
        else:
            supernet_settings(options)

    def __call__(self, job: PruneJob, goal: float) -> MethodOutput:
        from hwprune.search.supernet_search import search_supernet

        if job.data is None:
            raise HwpruneError("the search method trains a supernet and scores subnets on data: it needs --data")
        t0 = time.perf_counter()
        opts, width = search_options(job.options)
        sn, trained = _supernet(job)
        spent = time.perf_counter() - t0
        if opts.config.max_seconds is not None:
            opts.config.max_seconds = max(1.0, opts.config.max_seconds - spent)
        opts.window = (goal * (1.0 - width), goal)
        res, fitness = search_supernet(sn, job.cost, goal, job.data, opts, quiet=job.quiet)
        widths = WidthConfig(job.space.name, dict(res.best.widths))
        keep = {g.id: g.keep_units(widths.widths[g.id] // g.step) for g in job.space.groups}
        info = _info(sn, trained, spent, res, fitness)
        return MethodOutput(widths, keep, supernet_order_scores(job.space), _builder(job, sn, fitness), "supernet",
                            info)


def supernet_order_scores(space) -> dict[str, np.ndarray]:
    """Per group, scores falling with the channel's position in its conv group (the first channels
    score highest), normalised per group: the order every subnet of the supernet keeps channels in."""
    scores = {}
    for g in space.groups:
        per = g.channels // g.step
        scores[g.id] = (per - np.arange(g.channels) % per) / per
    return normalised(scores)


def _supernet(job: PruneJob):
    """(the supernet, whether it was trained here): loaded from ``options["supernet"]`` (checked
    against the base checkpoint), or trained on the job's data."""
    from hwprune.search.supernet import Supernet

    path = job.options.get("supernet")
    if path is not None:
        return Supernet.load(path, checkpoint=job.checkpoint).cpu(), False
    cfg = supernet_settings(job.options)
    out = job.options.get("supernet_out")
    if out is not None:
        return Supernet.load(_trained(job, cfg, Path(out))).cpu(), True
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hwprune-supernet-") as tmp:
        return Supernet.load(_trained(job, cfg, Path(tmp) / "supernet.pt")).cpu(), True


def _trained(job: PruneJob, cfg, out: Path) -> Path:
    from hwprune.search.supernet_training import train_supernet

    train_supernet(job.checkpoint, job.data, cfg, out, progress=not job.quiet)
    return out


def _info(sn, trained: bool, train_seconds: float, res, fitness) -> dict:
    epochs = int(sn.meta.get("epochs_trained") or 0)
    return {"method_epochs": epochs, "supernet_epochs": epochs, "supernet_trained": trained,
            "supernet_seconds": round(train_seconds, 2), "supernet_training": sn.meta.get("training"),
            "supernet_holdout_top1": sn.meta.get("holdout_top1"), "search_history": res.generations,
            "search_settings": res.settings, "search_initial_inside_share": res.initial_inside_share,
            "search_predictor_calls": res.predictor_calls, "search_fitness_evaluations": res.fitness_evaluations,
            "search_seconds": round(res.seconds, 2), "search_repairs": res.repairs, "search_fitness": fitness.info(),
            "search_top": [c.to_dict() for c in res.candidates], "search_widths": dict(res.best.widths)}


def _builder(job: PruneJob, sn, fitness):
    """The smaller model at ``widths``/``keep`` with the supernet's weights and BN statistics
    recomputed at that configuration on the fitness's calibration batches."""
    from hwprune.search.supernet import recalibrate_bn

    def build(widths: WidthConfig, keep: dict[str, list[int]]) -> nn.Module:
        prefix = all(sorted(keep.get(g.id, [])) == g.keep_units(widths.widths[g.id] // g.step)
                     for g in job.space.groups if g.id in keep)
        model = sn.extract(widths) if prefix else job.space.apply(widths, model=sn.plain_model(), keep=keep)
        recalibrate_bn(model, fitness.fitness_data.calibration, len(fitness.fitness_data.calibration))
        return model.eval()

    return build
