"""``hwprune calibrate``: carry a fitted predictor to this device with a few end-to-end timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hwprune.cli import app, console
from hwprune.errors import HwpruneError


def _models(model: str) -> list[str]:
    names = [m.strip() for m in model.split(",") if m.strip()]
    if not names:
        raise HwpruneError("no model to calibrate", "give --model NAME[,NAME...]")
    return names


def _doc(pred, paths: tuple[Path, Path]) -> dict:
    return {"predictor": str(paths[0]), "table": str(paths[1]), "settings": pred.settings_,
            "source": pred.source_,
            "models": {m: {**c.to_dict(), "configs": pred.calibration_[m]["configs"],
                           "measured_ms": pred.calibration_[m]["measured_ms"],
                           "measure_seconds": pred.calibration_[m]["measure_seconds"]}
                       for m, c in pred.corrections_.items()}}


def _print(doc: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(doc, indent=1, default=str))
        return
    for m, c in doc["models"].items():
        loo = "n/a (one configuration)" if c["loo_rmspe"] is None else f"{100 * c['loo_rmspe']:.2f}%"
        parts = ", ".join(f"{k} x{v:.3f}" for k, v in c["factors"].items())
        console.print(f"{m}: {c['samples']} configurations, leave-one-out RMSPE {loo} (source uncorrected "
                      f"{100 * c['loo']['source']:.2f}%); {parts}, {1000 * c['overhead_ms_per_node']:.2f} us per node",
                      highlight=False)
    console.print(f"wrote {doc['predictor']} and its measurements {doc['table']}; validate with: hwprune validate "
                  f"--table {doc['table']} --predictor {doc['predictor']} --model {','.join(doc['models'])}",
                  highlight=False)


def _write_bundle(source, names, samples, seed, bundle: Path, batch, threads) -> None:
    from hwprune.prediction.calibrate import check_request
    from hwprune.prediction.calibration_bundle import write_calibration_bundle
    from hwprune.prediction.calibration_plan import choose_configs
    from hwprune.progress import item_progress

    for m in names:
        check_request(source, m, samples, batch=batch)
    plans = {m: choose_configs(source.space(m), source.predictor, samples, seed) for m in names}
    with item_progress(f"bundling the calibration of {','.join(names)}") as update:
        n = write_calibration_bundle(source, plans, bundle, batch=batch, threads=threads, progress=update)
    console.print(f"wrote {n} configurations to {bundle}; on the device run: python -m hwprune.device run {bundle}; "
                  f"then: hwprune calibrate --predictor P --bundle-results {bundle} --out P2", highlight=False)


_HELP = {
    "graph_optimization": "onnxruntime: disabled | basic | extended | all (default all).",
    "table_out": "Where the measurements go (default: beside --out).",
    "bundle": "Write the configurations into a device bundle instead of measuring here.",
    "bundle_results": "Calibrate on a calibration bundle the device has run.",
    "anchor": "Time the unpruned model between sessions and bring every session to the host's fast state.",
}


@app.command()
def calibrate(
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="Source predictor (from `hwprune fit`)."),
    table: Optional[Path] = typer.Option(None, "--table", help="Source table (its predictor is cached beside it)."),
    model: str = typer.Option("", "--model", help="Model(s) to calibrate, comma separated."),
    samples: int = typer.Option(10, "--samples", help="Configurations measured per model (at least 1)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime | torch | tensorrt"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (torch, tensorrt)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: all cores)."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Batch size (default: the source's)."),
    graph_optimization: Optional[str] = typer.Option(None, "--graph-optimization", help=_HELP["graph_optimization"]),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Fresh sessions per configuration."),
    anchor: bool = typer.Option(False, "--anchor/--no-anchor", help=_HELP["anchor"]),
    seed: int = typer.Option(0, "--seed", help="Seed of the candidate configurations."),
    quick: bool = typer.Option(False, "--quick", help="Short measurements (smoke tests, not for results)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Calibrated predictor to write (X.predictor.zip)."),
    table_out: Optional[Path] = typer.Option(None, "--table-out", help=_HELP["table_out"]),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help=_HELP["bundle"]),
    bundle_results: Optional[Path] = typer.Option(None, "--bundle-results", help=_HELP["bundle_results"]),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Calibrate a fitted predictor for this device (or other settings) from a few end-to-end timings."""
    from hwprune.prediction import calibrate as cal
    from hwprune.profiling.backends.base import get_backend_class

    if bundle is not None and bundle_results is not None:
        raise HwpruneError("--bundle writes a calibration bundle, --bundle-results reads one: give one of them")
    if bundle is None and out is None:
        raise HwpruneError("no --out for the calibrated predictor", "give --out X.predictor.zip")
    if out is not None:
        cal.check_outputs(out, table_out)
    if bundle is None and bundle_results is None:
        get_backend_class(backend).check_available(device)  # before the source predictor is loaded or fitted
    source = cal.load_source(predictor, table)
    if bundle is not None:
        return _write_bundle(source, _models(model), samples, seed, bundle, batch, threads)
    runs = (_from_bundle(source, bundle_results) if bundle_results is not None else
            _measure(source, _models(model), samples, seed, (rounds, anchor), quick, as_json,
                     cal.Target(backend, device, threads, batch,
                                {"graph_optimization": graph_optimization} if graph_optimization else {})))
    pred = cal.calibrate(source, runs)
    _print(_doc(pred, cal.save_calibration(pred, runs, out, table_out)), as_json)


def _from_bundle(source, bundle: Path):
    from hwprune.prediction.calibration_bundle import read_calibration_bundle

    return read_calibration_bundle(bundle, source)


def _measure(source, names, samples, seed, sessions: tuple[int, bool], quick, as_json, target):
    """Measure every model here: ``sessions`` is (rounds per configuration, whether anchored)."""
    from hwprune.prediction.calibrate import check_request, measure_here
    from hwprune.profiling.measure import MeasureConfig
    from hwprune.progress import item_progress

    rounds, anchor = sessions
    for m in names:
        check_request(source, m, samples, rounds, target.batch)
    target.create()  # refuses an unavailable backend or an unknown option before any export
    runs = []
    for m in names:
        with item_progress(f"calibrating {m} on {target.backend}", enabled=not as_json) as update:
            runs.append(measure_here(source, m, samples, target, seed, rounds,
                                     MeasureConfig.quick() if quick else None, update, anchor=anchor))
    return runs
