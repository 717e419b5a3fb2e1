"""``hwprune widths | fit | predict | validate``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import typer

from hwprune.cli import app, console
from hwprune.errors import HwpruneError
from hwprune.atomic import read_json

#: help of the ``--predictor`` option of every command that takes ``--table``
PREDICTOR_HELP = ("Predictor of the --table saved by `hwprune fit`: loaded, not fitted again. Default: the one cached "
                  "beside the table (TABLE.predictor.zip), fitted and written when missing or stale.")


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


@app.command()
def widths(model: str = typer.Option(..., "--model"),
           random_n: int = typer.Option(..., "--random", min=1, help="How many random configurations."),
           seed: int = typer.Option(0, "--seed"),
           out: Path = typer.Option(..., "--out", help="Directory for the JSON files."),
           input_size: Optional[int] = typer.Option(None, "--input-size")) -> None:
    """Write random valid width configurations as JSON files."""
    from hwprune.pruning.space import PruningSpace

    space = PruningSpace.from_name(model, input_size=input_size)
    rng = random.Random(seed)
    for i in range(random_n):
        space.sample(rng).save(out / f"{model}-{i:04d}.json")
    console.print(f"wrote {random_n} width configurations of {model} ({len(space)} groups) to {out}")


@app.command()
def fit(table: Path = typer.Option(..., "--table"),
        out: Path = typer.Option(..., "--out", help="Predictor file to write, e.g. resnet50.predictor.zip."),
        regressor: str = typer.Option("auto", "--regressor",
                                      help="auto (chosen per unit kind by cross-validation), hgb, hgb_deep or "
                                           "extra_trees."),
        as_json: bool = typer.Option(False, "--json")) -> None:
    """Fit the table's predictor once and save it, without pickles, for --predictor."""
    from hwprune.prediction.artifact import save_predictor, table_digest
    from hwprune.atomic import check_writable
    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.profiling.table import LatencyTable

    check_writable(out)
    digest = table_digest(table)  # of the bytes about to be fitted on
    pred = LatencyPredictor(regressor=regressor).fit(LatencyTable.load(table))
    path = save_predictor(pred, out, table, digest=digest)
    doc = {"predictor": str(path), "bytes": path.stat().st_size, "table": str(table), "table_sha256": digest,
           "models": sorted(pred.models_), "fit_seconds": round(pred.fit_seconds_, 2),
           "regressors": {k: v["chosen"] for k, v in pred.selection_.items() if "chosen" in v}}
    if as_json:
        _echo_json(doc)
        return
    console.print(f"fitted the predictor of {table} ({', '.join(doc['models'])}) in {doc['fit_seconds']:.1f} s; "
                  f"wrote {path} ({doc['bytes'] / 1e6:.1f} MB): pass it with --predictor")


@app.command()
def predict(table: Path = typer.Option(..., "--table"),
            model: str = typer.Option(..., "--model"),
            widths_file: Optional[Path] = typer.Option(None, "--widths", help="Width JSON (default: unpruned)."),
            predictor: Optional[Path] = typer.Option(None, "--predictor", help=PREDICTOR_HELP),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Predicted latency of a model (and per layer) on the table's device and settings."""
    from rich.table import Table

    from hwprune.prediction.artifact import predictor_for
    from hwprune.pruning.space import WidthConfig
    from hwprune.profiling.table import LatencyTable

    t = LatencyTable.load(table)
    pred = predictor_for(table, predictor, t)
    space = pred.check_model(model).template.space  # the channel groups the predictor was fitted with
    cfg = WidthConfig.load(widths_file) if widths_file else space.full()
    if widths_file and cfg.model and cfg.model != model:
        raise HwpruneError(f"width file '{widths_file}' is for model '{cfg.model}', not '{model}'")
    cfg = space.validate(WidthConfig(model, cfg.widths))
    total, layers = pred.predict_layers(model, cfg)
    extrapolated = [l.layer for l in layers if l.extrapolated]
    doc = {"model": model, "predicted_ms": total, "extrapolated": bool(extrapolated),
           "extrapolated_layers": extrapolated, "layers": [l.to_dict() for l in layers],
           "settings": {k: t.settings.get(k) for k in ("backend", "threads", "batch", "precision")},
           "fit_seconds": round(pred.fit_seconds_, 2), "slow_configs_used": pred.slow_configs_used_}
    if as_json:
        _echo_json(doc)
        return
    tab = Table("layer", "kind", "cin", "cout", "hw", "ms", "extras",
                title=f"{model}: predicted {total:.3f} ms")
    for l in layers:
        tab.add_row(l.layer, l.kind, str(l.cin), str(l.cout), f"{l.h}x{l.w}",
                    f"{l.predicted_ms:.4f}" + (" *" if l.extrapolated else ""), f"{l.extra_ms:.4f}")
    console.print(tab)
    console.print("extras: the part of a layer's ms spent around its kernel (layout reorders, unfused Adds, "
                  "poolings), set by its neighbours' widths")
    if extrapolated:
        console.print(f"[yellow]* extrapolated beyond the table's range[/] ({len(extrapolated)} layers)")


_VALIDATE_HELP = {
    "gate": "Shared hosts: time the unpruned model before every session and count only sessions within this "
            "fraction of its fastest timing (e.g. 0.05).",
    "paired": "Shared hosts: time the unpruned model in the same window as every session and also report the "
              "accuracy of the latency relative to it, which the host's drift cannot move.",
    "measured": "Time nothing: re-predict the configurations of an earlier `validate --json` output with this "
                "table's predictor and score them against the measurements stored there.",
    "anchor": "Tie every session to the unpruned model timed in its window (paired, or probes before and after) "
              "and also score the measurements normalised to the table's host state.",
    "claim": "Share of predictions within ±10% the run checks; when even measured against measured fewer "
             "sessions agree that well, the report says the host is too noisy for it.",
}


@app.command()
def validate(table: Path = typer.Option(..., "--table"),
             model: Optional[str] = typer.Option(None, "--model", help="Model name(s), comma separated."),
             samples: int = typer.Option(20, "--samples", min=1, help="Random configurations per model."),
             seed: int = typer.Option(0, "--seed"),
             rounds: int = typer.Option(2, "--rounds", min=1, help="Fresh sessions per configuration."),
             plot: Optional[Path] = typer.Option(None, "--plot", help="PNG (default: beside the table)."),
             gate: Optional[float] = typer.Option(None, "--gate", min=0.0, max=0.99, help=_VALIDATE_HELP["gate"]),
             paired: bool = typer.Option(False, "--paired", help=_VALIDATE_HELP["paired"]),
             measured: Optional[Path] = typer.Option(None, "--measured", help=_VALIDATE_HELP["measured"]),
             anchor: bool = typer.Option(True, "--anchor/--no-anchor", help=_VALIDATE_HELP["anchor"]),
             claim: float = typer.Option(0.95, "--claim", min=0.01, max=1.0, help=_VALIDATE_HELP["claim"]),
             predictor: Optional[Path] = typer.Option(None, "--predictor", help=PREDICTOR_HELP),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Measure random pruned models end to end and compare them with the predictions."""
    from hwprune.prediction.validate import plot_validation

    res = _validation(table, model, measured, predictor, as_json, samples=samples, seed=seed, rounds=rounds,
                      gate=gate, paired=paired, anchor=anchor, claim=claim)
    png = plot or table.with_suffix(".validation.png")
    plot_validation(res, png)
    # every configuration with its widths and session timings, so that the measurements can be
    # re-predicted later (another predictor, another table) without timing them again
    doc = {**res.to_dict(with_samples=True), "plot": str(png)}
    if as_json:
        _echo_json(doc)
        return
    _print_validation(res, png)


def _validation(table: Path, model: Optional[str], measured: Optional[Path], predictor: Optional[Path],
                as_json: bool, **options):
    """Re-predict the ``--measured`` file, or time new configurations of the models with the run's options."""
    from hwprune.prediction.artifact import predictor_for
    from hwprune.progress import item_progress
    from hwprune.profiling.table import LatencyTable
    from hwprune.prediction.validate import repredict, validate as run_validate

    t = LatencyTable.load(table)
    if measured is not None:
        return repredict(t, read_json(measured, "validation"), predictor_for(table, predictor, t))
    names = [m.strip() for m in (model or "").split(",") if m.strip()]
    if not names:
        raise HwpruneError("no model to validate", "give --model NAME[,NAME...] (or --measured FILE)")
    pred = predictor_for(table, predictor, t)
    with item_progress(f"validating on {t.settings.get('backend')}", enabled=not as_json) as update:
        return run_validate(t, names, progress=update, predictor=pred, **options)


def _shares(c: dict) -> str:
    return f"{100 * c['within_5pct']:.1f}% within ±5%, {100 * c['within_10pct']:.1f}% within ±10%"


def _print_validation(res, png: Path) -> None:
    console.print(f"n={res.n}: {100 * res.within_5pct:.1f}% within ±5%, {100 * res.within_10pct:.1f}% within ±10%, "
                  f"RMSPE {100 * res.rmspe:.2f}%, Spearman {res.spearman:.3f}; plot {png}")
    for m, d in res.drift.items():
        console.print(f"host drift {m}: the unpruned model probes at {d['reference_ms']:.3f} ms now, "
                      f"{d['table_reference_ms']:.3f} ms when profiled (x{d['factor']:.3f})")
    if res.drift_corrected:
        c = res.drift_corrected
        console.print(f"with predictions scaled by the drift: {_shares(c)}")
    if res.relative:
        c = res.relative
        console.print(f"relative to the unpruned model, timed in the same window: "
                      f"{_shares(c)}, RMSPE {100 * c['rmspe']:.2f}%")
    if res.repeatability:
        r = res.repeatability
        console.print(f"measured against measured (one session vs the median of the others): "
                      f"{_shares(r)} (the ceiling these measurements allow)")
        rr = res.relative.get("repeatability")
        if rr:
            console.print(f"the same for the paired ratios: {_shares(rr)}")
    if res.normalised:
        c = res.normalised
        console.print(f"against the measurements normalised to the table's host state: "
                      f"{_shares(c)}, RMSPE {100 * c['rmspe']:.2f}%")
    _print_ceiling(res.ceiling)


def _print_ceiling(ceiling: dict) -> None:
    """The predictor against the ceiling per view, the gap's split, and the verdict when the host is too noisy."""
    for name, v in (ceiling.get("views") or {}).items():
        b = v["within_10pct"]
        split = ("at the ceiling: no gap" if b["host_share"] is None else
                 f"of the {100 * b['gap']:.1f}% outside, the host explains {100 * b['host_share']:.0f}%, "
                 f"the predictor {100 * b['predictor_share']:.0f}%")
        console.print(f"{name}, ±10%: predictor {100 * b['predictor']:.1f}%, ceiling {100 * b['ceiling']:.1f}%; {split}")
    if ceiling.get("verdict"):
        console.print(f"[yellow]{ceiling['verdict']}[/]", highlight=False)
