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
    measure: bool = typer.Option(True, "--measure/--no-measure",
                                 help="Measure base and pruned model end to end on the table's backend."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
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
    if method == "gcp":
        pruned, res = _run_gcp(space, spec.module, cost, target, data, steps, iters, ck, as_json)
        if objective in ("latency", "throughput") and measure:
            pruned = _meet_on_device(space, spec.module, cost, target, table, res, pruned)
    else:
        res = prune_widths(space, method, cost, target, model=spec.module)
    if round_hw:
        from .cost import LatencyCost

        res.widths = round_to_staircase(space, LatencyCost(space, pred), res.widths)
        res.keep = keep_indices(channel_importance(space, spec.module, res.info["criterion"]), res.widths)
        res.cost_fraction = cost.fraction(res.widths)
    if method != "gcp" or round_hw:
        pruned = space.apply(res.widths, keep=res.keep)
    meta = {"parent": str(checkpoint), "method": method, "objective": objective, "target": target,
            "cost_fraction": res.cost_fraction, "criterion": res.info.get("criterion", "bn"), "round_hw": round_hw,
            "data": ck.meta.get("data", {}), **res.info.get("gcp", {})}
    from .cost import FlopsCost, ParamsCost

    meta["flops"] = int(FlopsCost(space).total([res.widths])[0])
    meta["params"] = int(ParamsCost(space).total([res.widths])[0])
    if pred is not None:
        meta["predicted_ms"] = float(pred.predict(ck.arch, [res.widths])[0])
        meta["base_predicted_ms"] = float(pred.predict(ck.arch, [space.full()])[0])
        meta["table"] = str(table)
        if measure:
            ms = _measure(table, {"base": spec.module, "pruned": pruned}, tuple(spec.input_size))
            meta.update({"base_measured_ms": ms["base"], "measured_ms": ms["pruned"],
                         "measured_speedup": ms["base"] / ms["pruned"]})
    new = Checkpoint.from_model(ModelSpec(ck.arch, pruned, spec.input_size, spec.num_classes),
                                widths=res.widths.widths, meta=meta)
    if data is not None:
        from .data import load_splits
        from .train import TrainConfig, evaluate, train

        splits = load_splits(data)
        if finetune_epochs > 0:
            tmp = out.with_name(out.stem + ".pre-finetune.pt")
            new.save(tmp)
            result = train(Checkpoint.load(tmp), splits, TrainConfig(epochs=finetune_epochs, threads=threads), out,
                           progress=not as_json)
            tmp.unlink(missing_ok=True)
            new = Checkpoint.load(result.checkpoint)
            new.meta.update({k: v for k, v in meta.items() if k not in new.meta})
        if splits.test is not None:
            new.meta["accuracy"] = evaluate(new.build_model().module, splits.test)
    new.save(out)
    summary = {"checkpoint": str(out), "widths": res.widths.widths,
               **{k: v for k, v in new.meta.items() if k not in ("data", "history", "train")}}
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
    else:
        console.print(f"pruned {ck.arch} with {method} to {100 * res.cost_fraction:.1f}% of its {objective} "
                      f"(target {100 * target:.1f}%) -> {out}")


def _run_gcp(space, model, cost, target, data, steps, iters, ck, quiet):
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
                        GCPConfig(target=target, steps=steps, iters_per_phase=iters), progress=update)
    info = {"criterion": "bn", "gcp": {"gcp_lambda": r.lam, "gcp_lr": r.lr, "gcp_steps": steps,
                                       "gcp_history": r.history, "gcp_search": r.search,
                                       "prune_seconds": r.seconds}}
    info["gcp_result"] = r
    return pruned, PruneResult(widths=r.widths, keep=r.keep, cost_fraction=r.cost_fraction, objective=cost.name,
                               target=target, method="gcp", info=info)


def _meet_on_device(space, base, cost, target, table, res, pruned):
    """Measure the GCP result on the table's backend; prune or restore channels until the target is met."""
    from .gcp import correct_to_measured, materialize

    r = res.info.pop("gcp_result")
    chw = tuple(space.input_shape[1:])
    base_ms = _measure(table, {"base": base}, chw)["base"]

    def measure(widths, keep):
        return _measure(table, {"pruned": materialize(space, r, widths, keep)}, chw, rounds=1)["pruned"]

    widths, keep, log = correct_to_measured(space, cost, r.widths, r.keep, r.scores, r.prior, measure, base_ms, target)
    res.widths, res.keep, res.cost_fraction = widths, keep, cost.fraction(widths)
    res.info["gcp"]["gcp_device_correction"] = log
    return materialize(space, r, widths, keep)


def _measure(table, modules: dict, chw: tuple, rounds: int = 3) -> dict[str, float]:
    """End-to-end latency (ms) of ``modules`` on the table's backend and settings, by the bench harness."""
    from .bench import BenchModel, bench
    from .table import LatencyTable

    s = LatencyTable.load(table).settings
    models = [BenchModel(label, module=m.eval(), input_size=chw) for label, m in modules.items()]
    doc = bench(models, s["backend"], [int(s.get("batch") or 1)], threads=s.get("threads"),
                device=s.get("device") or "cpu", rounds=rounds)
    failed = [r for r in doc["results"] if r.get("error")]
    if failed:
        raise HwpruneError(f"measuring '{failed[0]['model']}' failed: {failed[0]['error']}")
    return {r["model"]: r["latency_ms"]["median"] for r in doc["results"]}


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
