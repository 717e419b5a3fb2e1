"""Prune a model to a target that is met on the device: :func:`prune_to_target`.

The loop, the same for every registered method (:mod:`hwprune.pruning.methods`):

1. **Calibrate the goal.** The predictor's cost fraction and the measured latency ratio
   differ (fixed per-run overhead, staircases), so two or three measured uniform
   configurations find the cost fraction that measures as the latency target.
2. **Prune** with the method at that goal.
3. **Correct on the device.** The pruned model is measured, paired with the unpruned model
   in the same rounds; while it misses the target, channels are removed (lowest score first)
   or restored (highest score per unit of cost first) and it is measured again
   (:func:`hwprune.pruning.device_correction.correct_to_measured`). Every measurement carries
   its confidence interval; one whose interval reaches across the target is measured again,
   and a configuration is kept only on a decided interval, else on the safe (narrower) side,
   which the result's meta says (``device_correction_decision``). Both the method's own widths
   and the corrected ones are returned.
4. **Fine-tune** the smaller model (optional) and evaluate it on the test split.

Without a measured target (FLOPs, parameters, memory, or ``measure=False``) steps 1 and 3
are skipped and the method prunes to ``target`` of its objective's cost.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from hwprune.training.checkpoint import Checkpoint
from hwprune.errors import HwpruneError
from hwprune.pruning.space import WidthConfig

ESTIMATOR = ("paired with the unpruned model in rounds of 0.3 s (fresh sessions), each round summarised with the "
             "table's estimator ({estimator}), counting only rounds whose reference ran within 5% of the fastest seen "
             "(hwprune.bench.harness.GatedMeter); the interval is the order-statistic interval of the median ratio")


@dataclass
class Finetune:
    """Fine-tuning of the pruned model with the training recipe (no fine-tuning at 0 epochs)."""

    epochs: int = 0
    lr: float | None = None
    batch_size: int = 128
    teacher: str | None = None  # a checkpoint to distill from (e.g. the base)
    #: torch threads while training: the fine-tuning and the method's own training (GCP's
    #: rounds); measurements keep the threads they were set up with (None: as set)
    threads: int | None = None


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (as set when None), then restore them."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class DeviceOptions:
    """How the measured target is met on the table's backend."""

    measure: bool = True
    patience_s: float = 180.0  # how long one measurement waits for a shared host's fast state
    quick: bool = False  # short measurement windows (smoke tests, never results)


@dataclass
class TargetResult:
    """What :func:`prune_to_target` returns; ``checkpoint`` is the pruned (and fine-tuned) model."""

    checkpoint: Checkpoint
    widths: WidthConfig
    keep: dict[str, list[int]]
    cost_fraction: float
    method_widths: WidthConfig  # the method's own choice, before the device correction
    correction: list[dict] | None
    meta: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.build_model().module

    def save(self, path: str | Path) -> Path:
        self.checkpoint.save(path)
        return Path(path)

    def summary(self) -> dict:
        keys = ("method", "objective", "target", "cost_fraction", "latency_target", "predicted_ms",
                "base_predicted_ms", "measured_ms", "base_measured_ms", "measured_speedup", "flops", "params",
                "accuracy", "prune_seconds")
        return {"widths": dict(self.widths.widths), **{k: self.checkpoint.meta[k] for k in keys
                                                      if k in self.checkpoint.meta}}


def prune_to_target(checkpoint: Checkpoint | str | Path, method: str, objective: str, target: float, *,
                    predictor=None, table: str | Path | None = None, data: str | Path | None = None,
                    latency_target: float | None = None, min_keep: float = 0.2, round_hw: bool = False,
                    device: DeviceOptions | None = None, finetune: Finetune | None = None,
                    options: dict[str, Any] | None = None, finetune_path: str | Path | None = None,
                    quiet: bool = True) -> TargetResult:
    """Prune ``checkpoint`` with ``method`` to ``target`` of its ``objective``'s cost, met on the device.

    ``predictor`` (a fitted :class:`~hwprune.prediction.predictor.LatencyPredictor`) or ``table`` (fitted,
    or loaded from its cache) gives the latency costs and the backend the target is measured
    on. With the ``latency`` or ``throughput`` objective, or with ``latency_target`` for any
    objective, the result measures within 3% under that fraction of the base model's latency
    when the correction can reach it. ``options`` are the method's own settings (GCP:
    ``steps``, ``iters``, ``recover``). ``finetune_path``: where fine-tuning writes its checkpoint
    and resumable state, so that an interrupted run continues (default: a temporary directory).
    """
    from hwprune.pruning.objectives import objective as make_objective
    from hwprune.pruning.methods import METHODS, PruneJob

    pruner = METHODS.get(method)()
    pruner.validate(dict(options or {}))
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
    parent = None if isinstance(checkpoint, Checkpoint) else str(checkpoint)
    job, pred = _job(ck, objective, predictor, table, data, min_keep, quiet, options, make_objective, PruneJob)
    device = device or DeviceOptions()
    meet = _measured_goal(objective, target, latency_target, pred, device)
    if round_hw and pred is None:
        raise HwpruneError("--round-hw needs the device's latency table", "pass --table")
    if pruner.needs_data and data is None:
        raise HwpruneError(f"the {method} method trains on data: it needs --data")
    from hwprune.profiling.table import table_estimator

    t0 = time.perf_counter()
    meter = (_meter(pred.settings_, job.model, tuple(job.space.input_shape[1:]), device, table_estimator(table))
             if meet else None)
    try:
        out, correction, calibration, base_ms = _prune_and_correct(job, pruner, target, meet, meter,
                                                                   (finetune or Finetune()).threads)
        if round_hw:
            out = _round_hw(job, pred, out)
        meta = _meta(ck, parent, job, method, objective, target, out, pred, table, t0)
        meta.update(out.info)
        if meet is not None:
            meta.update({"latency_target": meet, "device_correction": correction, "goal_calibration": calibration,
                         "method_widths": dict(out.info.get("method_widths", out.widths.widths))})
            decision = next((e["decision"] for e in correction or [] if e.get("decision")), None)
            if decision:
                meta["device_correction_decision"] = decision
        model = out.build(out.widths, out.keep)
        if meter is not None:
            meta.update(_final_measure(meter, model))
    finally:
        if meter is not None:
            meter.close()
    new = _finetuned(ck, job, model, out.widths, meta, data, finetune or Finetune(), finetune_path, quiet)
    return TargetResult(new, out.widths, out.keep, job.cost.fraction(out.widths),
                        WidthConfig(job.space.name, meta.get("method_widths", dict(out.widths.widths))),
                        meta.get("device_correction"), meta)


def _job(ck, objective, predictor, table, data, min_keep, quiet, options, make_objective, PruneJob):
    from hwprune.pruning.space import PruningSpace

    if ck.widths:
        raise HwpruneError("the checkpoint is already pruned", "prune its unpruned base checkpoint instead")
    spec = ck.build_model()
    space = PruningSpace(spec.module, (1, *spec.input_size), name=ck.arch)
    pred = predictor
    if pred is None and table is not None:
        from hwprune.prediction.artifact import predictor_for

        pred = predictor_for(Path(table), None)
    if pred is not None:
        pred.check_model(ck.arch)
    cost = make_objective(objective, space, pred)
    job = PruneJob(space, spec.module, cost, ck, min_keep=min_keep, data=Path(data) if data else None, quiet=quiet,
                   options=dict(options or {}))
    return job, pred


def _measured_goal(objective, target, latency_target, pred, device: DeviceOptions) -> float | None:
    """The fraction of the base model's measured latency to meet, or None when nothing is measured."""
    if latency_target is not None and (pred is None or not device.measure):
        raise HwpruneError("--latency-target is met by measuring on the table's backend", "pass --table and --measure")
    if pred is None or not device.measure:
        return None
    if latency_target is not None:
        return latency_target
    return target if objective in ("latency", "throughput") else None


def _prune_and_correct(job, pruner, target, meet, meter, threads: int | None = None):
    """Steps 1-3 of the loop: calibrate the goal, prune with the method (its training on
    ``threads``), correct on the device."""
    from hwprune.pruning.device_correction import correct_to_measured

    if meet is None:
        with torch_threads(threads):
            return pruner(job, target), None, None, None
    base_ms = meter({}).reference_ms
    goal, calibration = calibrate_goal(job, target, meter, meet, base_ms)
    with torch_threads(threads):
        out = pruner(job, goal)
    out.info["method_widths"] = dict(out.widths.widths)
    out.info["goal"] = goal
    widths, keep, log = correct_to_measured(job.space, job.cost, out.widths, out.keep, out.scores, out.prior,
                                            _reader(meter, out, base_ms), base_ms, meet, min_keep=job.min_keep,
                                            floors=out.floors)
    out.widths, out.keep = widths, keep
    return out, log, calibration, base_ms


def _reader(meter, out, base_ms: float):
    """The correction's ``measure``: a :class:`~hwprune.pruning.device_correction.Reading` of the pruned
    model from the meter's gated rounds; measuring the same widths again asks for twice the rounds."""
    from hwprune.pruning.device_correction import Reading

    last: dict = {}

    def measure(widths, keep):
        key = tuple(sorted(widths.widths.items()))
        need = 2 * meter.need if last.get("key") == key else None
        last["key"] = key
        g = meter({"pruned": out.build(widths, keep)}, need=need)
        values = [base_ms * r for r in g.round_ratios.get("pruned") or [g.ratios["pruned"]]]
        return Reading.from_values(values, {**g.host_state(), "estimator": g.estimator})

    return measure


def calibrate_goal(job, target: float, meter, meet: float, base_ms: float) -> tuple[float, list[dict]]:
    """The objective's cost fraction at which uniform pruning measures ``meet`` of the base latency.

    Each try is logged with its ratio's interval; a try whose interval reaches across the target
    (:meth:`~hwprune.pruning.device_correction.Reading.ambiguous`) is steered on its upper end, as a
    miss, so that an ambiguous measurement never ends the calibration as met."""
    from hwprune.pruning.device_correction import Reading
    from hwprune.pruning.widths import MeasuredTarget, prune_widths

    goal, log, steer = target, [], MeasuredTarget(meet, 0.05)
    for r in range(3):
        try:
            res = prune_widths(job.space, "uniform", job.cost, goal, model=job.model, min_keep=job.min_keep)
        except HwpruneError as e:  # the re-planned goal fell below the narrowest configuration
            log.append({"round": r, "goal": goal, "error": str(e)})
            break
        g = meter({"pruned": job.space.apply(res.widths, model=job.model, keep=res.keep)})
        ratio = g.ratios["pruned"]
        lo, hi = g.interval("pruned")
        ambiguous = Reading(ratio, lo, hi).ambiguous(meet)
        log.append({"round": r, "goal": goal, "measured_ms": base_ms * ratio, "ratio": ratio, "ratio_lo": lo,
                    "ratio_hi": hi, "ambiguous": ambiguous, "predicted_fraction": res.cost_fraction,
                    **g.host_state()})
        decided = max(ratio, hi) if ambiguous else ratio
        if steer.record(res.cost_fraction, decided, res.cost_fraction):
            break
        goal = min(1.0, steer.next_goal(res.cost_fraction, decided))
    if steer.last is None:
        return target, log
    return float(min(0.99, max(steer.chosen(), 1e-3))), log


def _round_hw(job, pred, out):
    from hwprune.pruning.objectives import LatencyCost
    from hwprune.pruning.importance import keep_indices
    from hwprune.pruning.widths import round_to_staircase

    out.widths = round_to_staircase(job.space, LatencyCost(job.space, pred), out.widths)
    out.keep = keep_indices(out.scores, out.widths, job.space)
    return out


def _meta(ck, parent, job, method, objective, target, out, pred, table, t0) -> dict:
    from hwprune.pruning.objectives import FlopsCost, ParamsCost

    meta = {"parent": parent or ck.meta.get("parent"), "method": method, "objective": objective, "target": target,
            "min_keep": job.min_keep, "cost_fraction": job.cost.fraction(out.widths), "criterion": out.criterion,
            "data": ck.meta.get("data", {}), "prune_seconds": time.perf_counter() - t0,
            "flops": int(FlopsCost(job.space).total([out.widths])[0]),
            "params": int(ParamsCost(job.space).total([out.widths])[0])}
    if pred is not None:
        meta["predicted_ms"] = float(pred.predict(ck.arch, [out.widths])[0])
        meta["base_predicted_ms"] = float(pred.predict(ck.arch, [job.space.full()])[0])
        meta["table"] = str(table) if table is not None else None
    return meta


def _final_measure(meter, model: nn.Module) -> dict:
    g = meter({"pruned": model})
    lo, hi = g.interval("pruned")
    return {"base_measured_ms": g.reference_ms, "measured_ms": g.ms["pruned"],
            "measured_speedup": 1.0 / g.ratios["pruned"], "measured_ratio_ci": [lo, hi],
            "measured_speedup_ci": [1.0 / hi, 1.0 / lo],
            "measured_rounds": {"rounds": g.rounds, "gated": g.gated_rounds, "settled": g.settled},
            "measured_estimator": ESTIMATOR.format(estimator=g.estimator)}


def _meter(settings: dict, base: nn.Module, chw: tuple, device: DeviceOptions, estimator: str | None = None):
    """A :class:`hwprune.bench.harness.GatedMeter` on the table's backend and settings, the unpruned model as
    reference, every round summarised with ``estimator`` (the table's)."""
    from dataclasses import replace

    from hwprune.bench.harness import BenchModel, GatedMeter
    from hwprune.profiling.backends import backend_options
    from hwprune.profiling.measure import MeasureConfig

    return GatedMeter(BenchModel("base", module=base, input_size=chw), settings["backend"],
                      int(settings.get("batch") or 1), patience_s=device.patience_s,
                      measure=replace(MeasureConfig.quick(), retries=0) if device.quick else None, estimator=estimator,
                      options=backend_options(settings))


def _finetuned(ck, job, model, widths, meta, data, ft: Finetune, path, quiet) -> Checkpoint:
    """The pruned checkpoint, fine-tuned for ``ft.epochs`` and evaluated on the test split when data is given."""
    from hwprune.models import ModelSpec

    new = Checkpoint.from_model(ModelSpec(ck.arch, model, tuple(job.space.input_shape[1:]), ck.num_classes),
                                widths=widths.widths, meta=meta)
    if data is None:
        return new
    from hwprune.training.data import load_splits
    from hwprune.training.train import evaluate

    splits = load_splits(data)
    if ft.epochs > 0:
        if path is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                new = _train(new, splits, ft, Path(tmp) / "finetuned.pt", quiet)
        else:
            new = _train(new, splits, ft, Path(path), quiet)
    if splits.test is not None:
        new.meta["accuracy"] = evaluate(new.build_model().module, splits.test)
    return new


def _train(new: Checkpoint, splits, ft: Finetune, path: Path, quiet: bool) -> Checkpoint:
    """Fine-tune ``new`` into ``path`` (resuming from its state when interrupted) and clean up after."""
    from hwprune.training.train import TrainConfig, train

    start = path.with_name(path.stem + ".pre-finetune.pt")
    if not start.exists():
        new.save(start)
    cfg = TrainConfig(epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size, teacher=ft.teacher, threads=ft.threads)
    with torch_threads(None):  # the measurements that follow run on the threads they had
        result = train(Checkpoint.load(start), splits, cfg, path, progress=not quiet)
    tuned = Checkpoint.load(result.checkpoint)
    start.unlink(missing_ok=True)
    result.state_path.unlink(missing_ok=True)  # finished: the resumable state is no longer needed
    tuned.meta.update({k: v for k, v in new.meta.items() if k not in tuned.meta})
    tuned.meta["finetune"] = {"epochs": ft.epochs, "lr": cfg.peak_lr(), "batch_size": ft.batch_size,
                              "teacher": ft.teacher, "seconds": result.seconds}
    return tuned
