"""``hwprune prune`` and ``hwprune export``."""

from __future__ import annotations

import json
from pathlib import Path

from typing import Optional

import typer

from .cli import app, console
from .errors import HwpruneError


def _predictor(table: Optional[Path], arch: str):
    if table is None:
        return None
    from .predict import LatencyPredictor
    from .table import LatencyTable

    pred = LatencyPredictor().fit(LatencyTable.load(table))
    pred._check(arch)
    return pred


@app.command()
def prune(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Unpruned checkpoint to prune."),
    out: Path = typer.Option(..., "--out", help="Pruned checkpoint to write."),
    method: str = typer.Option("l1", "--method", help="gcp | uniform | l1 | groupnorm"),
    objective: str = typer.Option("flops", "--objective", help="latency | throughput | flops | params | memory"),
    target: float = typer.Option(..., "--target", help="Fraction of the base model's cost to keep, e.g. 0.5."),
    table: Optional[Path] = typer.Option(None, "--table", help="Latency table of the target device."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset for fine-tuning and evaluation."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", min=0),
    round_hw: bool = typer.Option(False, "--round-hw", help="Round widths to the device's latency staircase."),
    steps: int = typer.Option(4, "--steps", min=1, help="GCP: regularise/prune/recover rounds (T)."),
    iters: Optional[int] = typer.Option(None, "--iters", min=1, help="GCP: iterations per phase (default: an epoch)."),
    recover: str = typer.Option("all", "--recover",
                                help="GCP recover step: all (every weight trains) or paper (masks, BN shifts, "
                                     "classifier)."),
    measure: bool = typer.Option(True, "--measure/--no-measure",
                                 help="Measure base and pruned model end to end on the table's backend."),
    latency_target: Optional[float] = typer.Option(
        None, "--latency-target", min=0.01, max=1.0,
        help="Meet this fraction of the base model's measured latency on the table's backend, whatever the "
             "objective (e.g. GCP-f at the FLOPs fraction that gives 0.5 latency). Default: --target for the "
             "latency and throughput objectives."),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr", min=0.0, help="Peak fine-tuning lr."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Fine-tuning batch size."),
    min_keep: float = typer.Option(0.2, "--min-keep", min=0.0, max=1.0,
                                   help="Every channel group keeps at least this fraction of its channels."),
    chart: Optional[Path] = typer.Option(None, "--chart", help="Write the per-layer width chart (PNG) here."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    patience: float = typer.Option(
        180.0, "--patience", min=0.0,
        help="Seconds one device measurement may wait for a shared host's fast state before it settles for "
             "what it has (logged as settled=false)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Prune a checkpoint to a cost target, optionally fine-tune, and save the smaller model."""
    from .checkpoint import Checkpoint
    from .cost import objective as make_objective
    from .io import check_writable
    from .models import ModelSpec
    from .prune import prune_widths, round_to_staircase
    from .importance import channel_importance, keep_indices
    from .space import PruningSpace

    if out.resolve() == checkpoint.resolve():
        raise HwpruneError("--out must differ from --checkpoint: the base checkpoint is never overwritten")
    if recover not in ("all", "paper"):
        raise HwpruneError(f"unknown --recover '{recover}'", "choose all or paper")
    check_writable(out)
    ck = Checkpoint.load(checkpoint)
    if ck.widths:
        raise HwpruneError(f"'{checkpoint}' is already pruned", "prune its unpruned base checkpoint instead")
    spec = ck.build_model()
    space = PruningSpace(spec.module, (1, *spec.input_size), name=ck.arch)
    pred = _predictor(table, ck.arch)
    if round_hw and pred is None:
        raise HwpruneError("--round-hw needs the device's latency table", "pass --table")
    cost = make_objective(objective, space, pred)
    meet = latency_target if latency_target is not None else (
        target if objective in ("latency", "throughput") else None)
    if latency_target is not None and (pred is None or not measure):
        raise HwpruneError("--latency-target is met by measuring on the table's backend", "pass --table and --measure")
    if threads:
        import torch

        torch.set_num_threads(threads)
    chw = tuple(spec.input_size)
    meter = _meter(pred.settings_, spec.module, chw, patience) if (pred is not None and measure) else None
    base_ms = meter({}).reference_ms if (meet is not None and meter is not None) else None
    correction = None
    import time

    t0 = time.perf_counter()
    if method == "gcp":
        goal, calibration = target, None
        if base_ms is not None:  # aim GCP's schedule at the cost fraction that measures as the target
            goal, calibration = _calibrate_goal(space, cost, target, spec.module, meter, meet, base_ms, min_keep)
        pruned, res = _run_gcp(space, spec.module, cost, goal, data, steps, iters, ck, as_json, min_keep, recover)
        if calibration is not None:
            res.info["gcp"].update({"gcp_goal": goal, "gcp_calibration": calibration})
        if base_ms is not None:
            pruned = _meet_on_device(space, cost, meet, meter, res, base_ms, min_keep)
            correction = res.info["gcp"].pop("gcp_device_correction")
    elif base_ms is not None:
        res, correction = _meet_baseline(space, method, cost, target, spec.module, meter, meet, base_ms, min_keep)
    else:
        res = prune_widths(space, method, cost, target, model=spec.module, min_keep=min_keep)
    if round_hw:
        from .cost import LatencyCost

        res.widths = round_to_staircase(space, LatencyCost(space, pred), res.widths)
        res.keep = keep_indices(channel_importance(space, spec.module, res.info["criterion"]), res.widths)
        res.cost_fraction = cost.fraction(res.widths)
    if method != "gcp" or round_hw:
        pruned = space.apply(res.widths, keep=res.keep)
    prune_seconds = time.perf_counter() - t0
    meta = {"parent": str(checkpoint), "method": method, "objective": objective, "target": target,
            "min_keep": min_keep,
            "cost_fraction": res.cost_fraction, "criterion": res.info.get("criterion", "bn"), "round_hw": round_hw,
            "data": ck.meta.get("data", {}), **res.info.get("gcp", {}), "prune_seconds": prune_seconds}
    if meet is not None and base_ms is not None:
        meta.update({"latency_target": meet, "device_correction": correction})
    from .cost import FlopsCost, ParamsCost

    meta["flops"] = int(FlopsCost(space).total([res.widths])[0])
    meta["params"] = int(ParamsCost(space).total([res.widths])[0])
    if pred is not None:
        meta["predicted_ms"] = float(pred.predict(ck.arch, [res.widths])[0])
        meta["base_predicted_ms"] = float(pred.predict(ck.arch, [space.full()])[0])
        meta["table"] = str(table)
        if meter is not None:
            g = meter({"pruned": pruned})
            meter.close()
            meta.update({"base_measured_ms": g.reference_ms, "measured_ms": g.ms["pruned"],
                         "measured_speedup": 1.0 / g.ratios["pruned"],
                         "measured_rounds": {"rounds": g.rounds, "gated": g.gated_rounds, "settled": g.settled},
                         "measured_estimator": _ESTIMATOR})
    new = Checkpoint.from_model(ModelSpec(ck.arch, pruned, spec.input_size, spec.num_classes),
                                widths=res.widths.widths, meta=meta)
    if data is not None:
        from .data import load_splits
        from .train import TrainConfig, evaluate, train

        splits = load_splits(data)
        if finetune_epochs > 0:
            tmp = out.with_name(out.stem + ".pre-finetune.pt")
            new.save(tmp)
            tcfg = TrainConfig(epochs=finetune_epochs, threads=threads, lr=finetune_lr, batch_size=batch_size)
            result = train(Checkpoint.load(tmp), splits, tcfg, out, progress=not as_json)
            tmp.unlink(missing_ok=True)
            result.state_path.unlink(missing_ok=True)  # finished: the resumable state is no longer needed
            new = Checkpoint.load(result.checkpoint)
            new.meta.update({k: v for k, v in meta.items() if k not in new.meta})
            new.meta["finetune"] = {"epochs": finetune_epochs, "lr": tcfg.peak_lr(), "batch_size": batch_size,
                                    "seconds": result.seconds}
        if splits.test is not None:
            new.meta["accuracy"] = evaluate(new.build_model().module, splits.test)
    new.save(out)
    if chart is not None:
        from .report import width_chart

        width_chart({f"{method}-{objective}": space.kept_fractions(res.widths)}, chart,
                    title=f"{ck.arch}: kept channels per group")
    summary = {"checkpoint": str(out), "widths": res.widths.widths,
               **{k: v for k, v in new.meta.items() if k not in ("data", "history", "train")}}
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
    else:
        console.print(f"pruned {ck.arch} with {method} to {100 * res.cost_fraction:.1f}% of its {objective} "
                      f"(target {100 * target:.1f}%) -> {out}")


def _run_gcp(space, model, cost, target, data, steps, iters, ck, quiet, min_keep, recover="all"):
    """GCP on the checkpoint's training data, with a held-out split for choosing lambda and lr."""
    from .data import BatchLoader, holdout_split, load_splits
    from .gcp import GCPConfig, gcp
    from .progress import item_progress
    from .prune import PruneResult

    if data is None:
        raise HwpruneError("GCP trains masks and BN shifts: it needs --data")
    splits = load_splits(data)
    norm = ck.meta.get("data", {})
    train_set = splits.train.with_normalization(norm["mean"], norm["std"]) if "mean" in norm else splits.train
    rest, held = holdout_split(train_set, per_class=max(1, min(200, len(train_set) // (10 * len(train_set.classes)))))
    loader = BatchLoader(rest, 128, shuffle=True, augment=True, drop_last=True)
    epoch = {"n": 0}

    def train_batches():
        loader.set_epoch(epoch["n"])
        epoch["n"] += 1
        return iter(loader)

    held_loader = BatchLoader(held, 256)
    with item_progress("GCP", enabled=not quiet) as update:
        pruned, r = gcp(model, space, cost, train_batches, lambda: iter(held_loader),
                        GCPConfig(target=target, steps=steps, iters_per_phase=iters, min_keep=min_keep,
                                  recover=recover), progress=update)
    info = {"criterion": "bn", "gcp": {"gcp_lambda": r.lam, "gcp_lr": r.lr, "gcp_steps": steps, "gcp_recover": recover,
                                       "gcp_history": r.history, "gcp_search": r.search,
                                       "gcp_seconds": r.seconds}}
    info["gcp_result"] = r
    return pruned, PruneResult(widths=r.widths, keep=r.keep, cost_fraction=r.cost_fraction, objective=cost.name,
                               target=target, method="gcp", info=info)


def _meet_on_device(space, cost, meet, meter, res, base_ms, min_keep):
    """Measure the GCP result on the table's backend; prune or restore channels until ``meet`` is met."""
    from .gcp import correct_to_measured, materialize

    r = res.info.pop("gcp_result")

    states = []

    def measure(widths, keep):
        g = meter({"pruned": materialize(space, r, widths, keep)})
        states.append(g.host_state())
        return base_ms * g.ratios["pruned"]

    widths, keep, log = correct_to_measured(space, cost, r.widths, r.keep, r.scores, r.prior, measure, base_ms, meet,
                                            min_keep=min_keep)
    for entry, st in zip(log, states):  # one measurement per logged round
        entry.update(st)
    res.widths, res.keep, res.cost_fraction = widths, keep, cost.fraction(widths)
    res.info["gcp"]["gcp_device_correction"] = log
    return materialize(space, r, widths, keep)


def _calibrate_goal(space, cost, target, model, meter, meet, base_ms, min_keep) -> tuple[float, list[dict]]:
    """The objective's cost fraction at which uniform pruning measures ``meet`` of the base latency.

    The predictor's cost fraction and the measured latency ratio differ (fixed per-run overhead,
    staircases), so GCP aimed at ``target`` in prediction would land far from the target on the
    device and the correction would have to prune or restore many channels. Two or three
    measured uniform configurations find the goal GCP's schedule should aim at instead.
    """
    try:
        res, log = _meet_baseline(space, "uniform", cost, target, model, meter, meet, base_ms, min_keep, rounds=2,
                                  tol=0.05)
    except HwpruneError as e:
        return target, [{"error": str(e)}]
    return float(min(0.99, max(res.cost_fraction, 1e-3))), log


def _meet_baseline(space, method, cost, target, model, meter, meet, base_ms, min_keep, rounds: int = 4,
                   tol: float = 0.03):
    """Drive a baseline method to ``meet`` of the measured base latency: re-plan its cost target by the
    measured ratio until the measured latency lies in ``[meet - tol, meet]`` (or ``rounds`` run out).
    Keeps the slowest configuration that met the target, else the last one."""
    from .prune import MeasuredTarget, prune_widths

    goal, log, steer = target, [], MeasuredTarget(meet, tol)
    for r in range(rounds + 1):
        try:
            res = prune_widths(space, method, cost, goal, model=model, min_keep=min_keep)
        except HwpruneError as e:  # the re-planned goal fell below the narrowest configuration
            log.append({"round": r, "goal": goal, "error": str(e)})
            break
        g = meter({"pruned": space.apply(res.widths, keep=res.keep)})
        ms = base_ms * g.ratios["pruned"]
        ratio = ms / base_ms
        log.append({"round": r, "goal": goal, "measured_ms": ms, "ratio": ratio, "predicted_fraction": res.cost_fraction,
                    **g.host_state()})
        if steer.record(res.cost_fraction, ratio, (r, res)):
            break
        goal = min(1.0, steer.next_goal(res.cost_fraction, ratio))
    if steer.last is None:
        raise HwpruneError(log[-1]["error"])
    kept, res = steer.chosen()
    log[kept]["kept"] = True
    return res, log


_ESTIMATOR = ("paired with the unpruned model in rounds of 0.3 s (fresh sessions), counting only rounds whose "
              "reference ran within 5% of the fastest seen (hwprune.bench.GatedMeter)")


def _meter(settings: dict, base, chw: tuple, patience_s: float):
    """A :class:`hwprune.bench.GatedMeter` on the table's backend and settings, the unpruned model as reference.

    ``patience_s``: how long one measurement waits for a shared host's fast state to come back
    before it settles for slow-state ratios (a neighbour holding a vCPU for minutes squeezes
    every speed-up).
    """
    from .bench import BenchModel, GatedMeter

    return GatedMeter(BenchModel("base", module=base, input_size=chw), settings["backend"],
                      int(settings.get("batch") or 1), threads=settings.get("threads"),
                      device=settings.get("device") or "cpu", patience_s=patience_s)


@app.command()
def export(
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (random weights, for latency work)."),
    widths_file: Optional[Path] = typer.Option(None, "--widths", help="Width configuration JSON (with --model)."),
    batch: int = typer.Option(1, "--batch", min=1),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=8),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Also build a TensorRT engine (needs TensorRT)."),
) -> None:
    """Export a checkpoint, or a model with a width configuration, to ONNX (and a TensorRT engine)."""
    from .export import export_onnx
    from .space import PruningSpace, WidthConfig

    if (checkpoint is None) == (model is None):
        raise HwpruneError("give exactly one of --checkpoint or --model")
    if checkpoint is not None:
        from .checkpoint import Checkpoint

        spec = Checkpoint.load(checkpoint).build_model()
        module, chw = spec.module, spec.input_size
    else:
        space = PruningSpace.from_name(model, input_size=input_size)
        cfg = WidthConfig.load(widths_file) if widths_file else space.full()
        if cfg.model and cfg.model != model:
            raise HwpruneError(f"width file '{widths_file}' is for model '{cfg.model}', not '{model}'")
        module, chw = space.apply(WidthConfig(model, cfg.widths)), space.input_shape[1:]
    path = export_onnx(module, (batch, *chw), onnx)
    console.print(f"wrote {path}")
    if engine is not None:
        from .backends.tensorrt_backend import TensorRTBackend, export_engine

        reason = TensorRTBackend.unavailable_reason("cuda")
        if reason:
            raise HwpruneError(f"cannot build a TensorRT engine here: {reason}")
        info = export_engine(path, engine, input_shape=(batch, *chw))
        console.print(f"wrote {engine} ({info.get('engine_bytes', 0)} bytes)")
