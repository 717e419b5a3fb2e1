"""Calibrate for a device that has only the torch-free runner, through a bundle.

On the host, :func:`write_calibration_bundle` (``hwprune calibrate ... --bundle B``) exports the
calibration's configurations to ONNX with a manifest in the device bundle format; on the
device, ``python -m hwprune.device run B`` times each of them in fresh sessions; back on the
host, :func:`read_calibration_bundle` (``hwprune calibrate ... --bundle-results B --out P2``)
reads those timings, stamped with the device's fingerprint and ONNX Runtime settings, for
:func:`hwprune.prediction.calibrate.calibrate`. The manifest records the source predictor's
identity, and the results are read only with the same source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from hwprune.errors import HwpruneError
from hwprune.prediction.calibrate import Measured, ProgressFn, Source
from hwprune.pruning.space import WidthConfig

#: the manifest's section that makes a bundle a calibration bundle
SECTION = "calibration"


def _identity(source: Source) -> dict:
    """What must match between the bundle's source and the source its results are read with."""
    return {"table": source.info.get("table"), "params": source.info.get("params")}


def write_calibration_bundle(source: Source, plans: dict[str, list[tuple[str, WidthConfig]]], out: str | Path,
                             batch: int | None = None, threads: int | None = None, measure=None,
                             progress: ProgressFn | None = None) -> int:
    """Export the configurations of ``plans`` (per model, as
    :func:`~hwprune.prediction.calibration_plan.choose_configs` gives them) into a bundle at
    ``out``; returns the number of items. The manifest is written last: a directory without
    it is no bundle."""
    from hwprune.atomic import atomic_write_text
    from hwprune.device.run import BUNDLE_FORMAT, MANIFEST
    from hwprune.profiling.measure import MeasureConfig
    from hwprune.profiling.onnx_export import export_onnx

    out = Path(out)
    if (out / MANIFEST).exists():
        raise HwpruneError(f"'{out}' already holds a bundle", "choose another --bundle directory")
    batch = int(batch or source.predictor.settings_.get("batch") or 1)
    items, total = [], sum(len(v) for v in plans.values())
    for model, configs in plans.items():
        space = source.space(model)
        shape = (batch, *space.input_shape[1:])
        for cid, cfg in configs:
            if progress:
                progress(f"{model}/{cid}", len(items), total)
            path = export_onnx(space.apply(cfg).eval(), shape, out / "models" / f"{len(items):05d}.onnx")
            items.append({"id": f"{model}/{cid}", "kind": "model", "model": model, "config": cid,
                          "onnx": str(path.relative_to(out)), "input_shape": list(shape), "widths": cfg.widths,
                          "e2e": True})
    if progress:
        progress("", total, total)
    manifest = {"format": BUNDLE_FORMAT, "threads": threads, "items": items,
                "measure": (measure or MeasureConfig.profile()).to_dict(),
                SECTION: {"source": _identity(source), "batch": batch, "input_size": source.input_size,
                          "models": {m: len(c) for m, c in plans.items()}}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return len(items)


def _manifest(bundle: Path, source: Source) -> dict:
    from hwprune.device.run import BundleError, read_manifest

    try:
        manifest = read_manifest(bundle)
    except BundleError as e:
        raise HwpruneError(str(e)) from None
    section = manifest.get(SECTION)
    if not isinstance(section, dict):
        raise HwpruneError(f"'{bundle}' is a profiling bundle, not a calibration bundle",
                           "import it with `hwprune import`, or write one with `hwprune calibrate --bundle`")
    if section.get("source") != json.loads(json.dumps(_identity(source), default=str)):
        sha = str(((section.get("source") or {}).get("table") or {}).get("sha256"))[:12]
        raise HwpruneError(f"the bundle was written for another source predictor (its table sha256 {sha})",
                           "read its results with the --predictor/--table it was written with")
    return manifest


def _settings(device: dict, section: dict) -> dict:
    """The settings the device measured with (as :func:`hwprune.profiling.bundle.import_results` records them)."""
    ort = device["ort_settings"]
    return {"backend": "onnxruntime", "backend_version": device["backend_version"],
            "execution_provider": ort["execution_provider"], "device": "cpu", "threads": ort["intra_op_threads"],
            "precision": "fp32", "inter_op_threads": ort["inter_op_threads"],
            "graph_optimization": ort["graph_optimization"], "spinning": ort["spinning"],
            "batch": section["batch"], "input_size": section["input_size"]}


def read_calibration_bundle(bundle: str | Path, source: Source) -> list[Measured]:
    """The device's timings of a calibration bundle, one :class:`Measured` per model; a one-line
    error when the device has not measured every configuration."""
    from hwprune.device.run import result_path
    from hwprune.profiling.measure import Measurement, Stats

    bundle = Path(bundle)
    manifest = _manifest(bundle, source)
    dev = bundle / "results" / "device.json"
    if not dev.is_file():
        raise HwpruneError(f"no results in '{bundle}'", f"run `python -m hwprune.device run {bundle}` on the device")
    device = json.loads(dev.read_text())
    items: Sequence[dict] = manifest["items"]
    missing = [i["id"] for i in items if not result_path(bundle, i["id"]).is_file()]
    if missing:
        raise HwpruneError(f"the device measured {len(items) - len(missing)} of {len(items)} configurations "
                           f"(missing {missing[0]})", f"run `python -m hwprune.device run {bundle}` again to finish")
    section, runs = manifest[SECTION], {}
    for item in items:
        e = json.loads(result_path(bundle, item["id"]).read_text())["e2e"]
        m = Measurement(stats=Stats(**e["stats"]), setup_ms=e.get("setup_ms"), first_run_ms=e.get("first_run_ms"),
                        attempts=e.get("attempts", 1))
        run = runs.setdefault(item["model"], Measured(item["model"], [], [], _settings(device, section),
                                                      device["fingerprint"], 0.0, tuple(item["input_shape"])))
        run.configs.append((item["config"], WidthConfig(item["model"], item["widths"])))
        run.sessions.append([m])
    for run in runs.values():
        source.predictor.check_model(run.model)
    return list(runs.values())
