"""``hwprune devices | models | groups | profile | table`` and the device bundle commands."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer
from rich.table import Table

from hwprune.cli import app, console
from hwprune.errors import HwpruneError

table_app = typer.Typer(help="Inspect and merge latency tables.", no_args_is_help=True)
app.add_typer(table_app, name="table")


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


@app.command()
def devices(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Backends and hardware available on this machine."""
    from hwprune.profiling.backends import backend_names, get_backend_class
    from hwprune.profiling.fingerprint import fingerprint

    fp = fingerprint()
    backends = []
    for name in backend_names():
        cls = get_backend_class(name)
        for dev in (["cpu", "cuda"] if name == "torch" else ["cuda"] if name == "tensorrt" else ["cpu"]):
            reason = cls.unavailable_reason(dev)
            version = cls.version() if reason is None else None
            backends.append({"backend": name, "device": dev, "available": reason is None, "version": version,
                             "reason": reason})
    if as_json:
        _print_json({"device": fp, "backends": backends})
        return
    ident = f", {fp['cpu_id']}" if fp.get("cpu_id") else ""
    l3 = f", L3 {fp['cpu_l3']}" if fp.get("cpu_l3") else ""
    console.print(f"[bold]CPU[/] {fp['cpu_model']} ({fp['cpu_cores']} cores, "
                  f"{', '.join(fp['cpu_flags']) or 'no SIMD flags read'}{ident}{l3})")
    for g in fp["gpus"] or [{"name": "none", "driver": "-", "memory": "-"}]:
        console.print(f"[bold]GPU[/] {g['name']} (driver {g['driver']}, {g['memory']})")
    t = Table("backend", "device", "available", "version / reason")
    for b in backends:
        t.add_row(b["backend"], b["device"], "[green]yes[/]" if b["available"] else "[red]no[/]",
                  b["version"] or b["reason"])
    console.print(t)


@app.command()
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """Model names hwprune can build."""
    from hwprune.models import list_models

    names = list_models()
    if as_json:
        _print_json(names)
    else:
        typer.echo("\n".join(names))


@app.command()
def groups(model: str = typer.Option(..., "--model", help="Model name."),
           input_size: Optional[int] = typer.Option(None, "--input-size"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """The prunable channel groups of a model (ids used by width configurations).

    A group next to a grouped convolution shows "step G": its convolutions keep their G conv
    groups and become narrower, so its width is a multiple of G.
    """
    from hwprune.pruning.space import PruningSpace

    space = PruningSpace.from_name(model, input_size=input_size)
    if as_json:
        _print_json([{"id": g.id, "channels": g.channels, "kind": g.kind, "modules": list(g.modules),
                      "step": g.step, "constraint": g.constraint} for g in space.groups])
        return
    t = Table("group id", "channels", "kind", "coupled modules", "constraint",
              title=f"{model}: {len(space)} channel groups")
    for g in space.groups:
        t.add_row(g.id, str(g.channels), g.kind, str(len(g.modules)), f"step {g.step}" if g.step > 1 else "-")
    if any(g.step > 1 for g in space.groups):
        t.caption = ("step G: the width is a multiple of G, the conv groups of the grouped convolution the group "
                     "feeds or comes out of (it keeps its G groups and each gets narrower; --json names it)")
    console.print(t)


def _summary_table(summary: dict) -> Table:
    t = Table("field", "value", title="latency table")
    for k in ("models", "rows", "e2e_rows", "insitu_rows", "micro_rows", "distinct_units", "unstable_rows",
              "slow_state_configs", "e2e_ms_min", "e2e_ms_max", "items", "complete", "profile_seconds", "node_overhead_us"):
        v = summary.get(k)
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    for k, v in _noise_rows(summary.get("noise") or {}):
        t.add_row(k, v)
    s = summary["settings"]
    t.add_row("settings", f"{s.get('backend')} {s.get('backend_version')} {s.get('execution_provider')}, "
                          f"threads {s.get('threads')}, batch {s.get('batch')}, {s.get('precision')}")
    d = summary["device"]
    t.add_row("device", f"{d.get('cpu_model')} ({d.get('cpu_cores')} cores)")
    return t


def _pct(d: dict | None, shift: float = 0.0) -> str:
    """``median / p90 / max`` of a spread, in percent (minus ``shift`` first)."""
    if not d:
        return "-"
    return " / ".join(f"{100 * (d[k] - shift):.1f}%" for k in ("median", "p90", "max"))


def _noise_rows(noise: dict) -> list[tuple[str, str]]:
    """How noisy the table's windows were, as (field, value) rows of ``hwprune table info``."""
    if not noise.get("anchored"):
        ci = noise.get("ci_rel")
        return [("noise", "no reference windows (profiled with --no-anchor or before anchoring)"
                          + (f"; estimate CI +-{_pct(ci)} (median / p90 / max)" if ci else ""))]
    est = noise.get("estimator") or {}
    spreads = ", ".join(f"{k} {100 * v:.1f}%" for k, v in (est.get("spreads") or {}).items())
    refs = ", ".join(f"{m} {v:.3f} ms" for m, v in (noise.get("reference_ms") or {}).items())
    return [("estimator", f"{est.get('name')} ({est.get('chosen_by', '')}" + (f"; session spreads {spreads})" if spreads else ")")),
            ("reference", refs or "-"),
            ("window ref / table ref", _pct(noise.get("reference_ratio"), 1.0) + " above (median / p90 / max)"),
            ("reference moved in window", _pct(noise.get("moved")) + f" (tolerance {100 * (noise.get('tolerance') or 0):.0f}%)"),
            ("estimate CI half-width", _pct(noise.get("ci_rel")) + f"; cap hit {noise.get('cap_hits', 0)}x"),
            ("re-measured / unsteady", f"{noise.get('remeasured', 0)} / {noise.get('unsteady_configs', 0)} configurations")]


_PROFILE_HELP = {
    "gate": "Shared hosts: time the unpruned model before and after every configuration and re-measure the "
            "configuration when it ran more than this fraction slower than its fastest timing (e.g. 0.05).",
    "gate_budget": "Seconds this run may spend re-measuring configurations whose reference moved within their "
                   "window (or, with --gate, ran slow); after that each is kept once (default: no limit).",
    "anchor": "Time the unpruned model before, within and after every configuration, re-measure when it moved, "
              "normalise the rows to one host state, choose the estimator on data and repeat each window until "
              "its estimate is known within +-2%. --no-anchor profiles as earlier tables were (median, fixed "
              "windows).",
    "anchor_tolerance": "How far the reference may move within a window before the configuration is measured again.",
    "estimator": "median | p10 | min-round (default: chosen on the reference's sessions).",
}


@app.command()
def profile(
    model: str = typer.Option("cifar_resnet20", "--model", help="Model name, or several separated by commas."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime | torch | tensorrt"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (torch, tensorrt)."),
    batch: int = typer.Option(1, "--batch", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: all cores)."),
    out: Path = typer.Option(..., "--out", help="Parquet table to write."),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=8, help="Square input size override."),
    configs: int = typer.Option(100, "--configs", min=1, help="Width configurations per model."),
    micro: int = typer.Option(2, "--micro", min=0, help="Isolated unit benchmarks per configuration."),
    seed: int = typer.Option(0, "--seed"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop cleanly after this long."),
    resume: bool = typer.Option(False, "--resume", help="Continue a partial table."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing table."),
    quick: bool = typer.Option(False, "--quick", help="Short measurements (smoke tests, not for real tables)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    gate: Optional[float] = typer.Option(None, "--gate", min=0.0, max=0.99, help=_PROFILE_HELP["gate"]),
    gate_budget: Optional[float] = typer.Option(None, "--gate-budget", min=0.0, help=_PROFILE_HELP["gate_budget"]),
    anchor: bool = typer.Option(True, "--anchor/--no-anchor", help=_PROFILE_HELP["anchor"]),
    anchor_tolerance: float = typer.Option(0.05, "--anchor-tolerance", min=0.001, max=0.99,
                                           help=_PROFILE_HELP["anchor_tolerance"]),
    estimator: Optional[str] = typer.Option(None, "--estimator", help=_PROFILE_HELP["estimator"]),
) -> None:
    """Profile this machine: sample width configurations, measure, write a latency table."""
    table = _run_profile(SimpleNamespace(**locals()))
    summary = table.summary()
    summary["path"] = str(out)
    if as_json:
        _print_json(summary)
        return
    console.print(_summary_table(summary))
    if not table.complete:
        console.print(f"[yellow]partial table[/]: {table.meta.items_done}/{table.meta.items_planned} configurations; "
                      f"continue with the same command and --resume")
    console.print(f"wrote {out}")


def _run_profile(a: SimpleNamespace):
    """Check the models and the anchoring options, then run :func:`~hwprune.profiling.profiler.profile`."""
    from hwprune.profiling.backends import create_backend
    from hwprune.profiling.measure import MeasureConfig
    from hwprune.models import create_model, is_model
    from hwprune.profiling.profiler import AnchorConfig, check_anchor, profile as run_profile
    from hwprune.progress import item_progress

    names = [m.strip() for m in a.model.split(",") if m.strip()]
    for n in names:
        if not is_model(n):
            create_model(n)
    if a.estimator and not a.anchor:
        raise HwpruneError("--estimator goes with anchored profiling", "drop --no-anchor or --estimator")
    windows = AnchorConfig(tolerance=a.anchor_tolerance, estimator=a.estimator) if a.anchor else None
    check_anchor(windows)
    measure = MeasureConfig.quick() if a.quick else MeasureConfig.profile(adaptive=a.anchor)
    be = create_backend(a.backend, threads=a.threads, device=a.device, measure=measure)
    with item_progress(f"profiling {a.model} ({a.backend}, batch {a.batch})", enabled=not a.as_json) as update:
        return run_profile(names, a.out, be, batch=a.batch, input_size=a.input_size, configs=a.configs, seed=a.seed,
                           micro_per_config=a.micro, resume=a.resume, overwrite=a.overwrite,
                           max_minutes=a.max_minutes, progress=update, gate=a.gate, gate_budget_s=a.gate_budget,
                           anchor=windows)


@table_app.command("info")
def table_info(path: Path = typer.Argument(..., help="Table file."),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Summary, device and settings of a table."""
    from hwprune.profiling.table import LatencyTable

    t = LatencyTable.load(path)
    s = t.summary()
    if as_json:
        _print_json({**s, "fingerprint": t.meta.fingerprint, "plan": t.meta.plan, "command": t.meta.command,
                     "created": t.meta.created, "hwprune_version": t.meta.hwprune_version})
    else:
        console.print(_summary_table(s))
        if not t.complete:
            console.print("[yellow]this table is partial[/]")


@table_app.command("check")
def table_check(path: Path = typer.Argument(..., help="Table file."),
                model: Optional[str] = typer.Option(None, "--model", help="Models to time (default: the table's), "
                                                    "separated by commas."),
                sessions: int = typer.Option(3, "--sessions", min=1, help="Fresh sessions per model."),
                tolerance: float = typer.Option(0.05, "--tolerance", min=0.0, help="Largest drift that still "
                                                "counts as a match (0.05: 5%)."),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Does the table still describe this host? Times the unpruned models now against the table.

    Exit code 0 when every model runs within the tolerance of the table's time, 1 when not
    (the host is faster or slower than when the table was profiled, or another device)."""
    from hwprune.profiling.table_check import check_host
    from hwprune.progress import item_progress
    from hwprune.profiling.table import LatencyTable

    t = LatencyTable.load(path)
    names = [m.strip() for m in model.split(",") if m.strip()] if model else None
    with item_progress("timing the unpruned models", enabled=not as_json) as update:
        res = check_host(t, names, sessions=sessions, tolerance=tolerance, progress=update)
    if as_json:
        _print_json(res.to_dict())
    else:
        tab = Table("model", "table (ms)", "now (ms)", "now / table")
        for m in res.models:
            tab.add_row(m.model, f"{m.table_ms:.3f}", f"{m.now_ms:.3f}", f"{m.factor:.3f}")
        console.print(tab)
        console.print(("[green]" if res.matches else "[yellow]") + res.verdict() + "[/]", highlight=False)
    raise typer.Exit(0 if res.matches else 1)


@table_app.command("merge")
def table_merge(paths: list[Path] = typer.Argument(..., help="Tables to merge."),
                out: Path = typer.Option(..., "--out")) -> None:
    """Merge tables of the same device and settings (anything else is an error)."""
    from hwprune.profiling.table import LatencyTable

    if len(paths) < 2:
        raise HwpruneError("give at least two tables to merge")
    merged = LatencyTable.load(paths[0])
    for p in paths[1:]:
        merged = merged.merge(LatencyTable.load(p))
    merged.save(out)
    console.print(f"merged {len(paths)} tables ({len(merged)} rows) into {out}")


@app.command()
def bundle(
    model: str = typer.Option(..., "--model", help="Model name, or several separated by commas."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
    batch: int = typer.Option(1, "--batch", min=1),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=8),
    configs: int = typer.Option(50, "--configs", min=1),
    micro: int = typer.Option(2, "--micro", min=0),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads the device should use."),
) -> None:
    """Write a bundle (ONNX models + manifest) for a device that has only onnxruntime and numpy."""
    from hwprune.profiling.bundle import write_bundle
    from hwprune.profiling.profiler import ProfilePlan
    from hwprune.progress import item_progress

    plan = ProfilePlan(models=tuple(m.strip() for m in model.split(",") if m.strip()), batch=batch,
                       input_size=input_size, configs=configs, seed=seed, micro_per_config=micro)
    with item_progress(f"bundling {model}") as update:
        n = write_bundle(plan, out, threads=threads, progress=update)
    console.print(f"wrote {n} items to {out}; on the device run: python -m hwprune.device run {out}")


@app.command("import")
def import_bundle(bundle_dir: Path = typer.Argument(..., help="Bundle directory the device has run."),
                  out: Path = typer.Option(..., "--out", help="Table to write."),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Import a device's bundle results into a latency table."""
    from hwprune.profiling.bundle import import_results

    table = import_results(bundle_dir, out)
    summary = table.summary()
    if as_json:
        _print_json(summary)
    else:
        console.print(_summary_table(summary))
        console.print(f"wrote {out}")
