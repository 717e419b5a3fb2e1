"""Bundles: profile a device that cannot run the host's Python stack.

``write_bundle`` exports the profiling plan's subnets and isolated units to ONNX with a
manifest; ``python -m hwprune.device run BUNDLE`` measures them on the device with only
onnxruntime and numpy; ``import_results`` reads the optimised graphs and per-node
profiles the device wrote and builds the same table rows a local run would, stamped with
the *device's* fingerprint and settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from hwprune.profiling.backends.ort_graph import OrtGraphReader
from hwprune.device.ort_runner import NodeRecord
from hwprune.device.run import BUNDLE_FORMAT, MANIFEST, BundleError, read_manifest, result_path
from hwprune.errors import HwpruneError
from hwprune.profiling.onnx_export import export_onnx
from hwprune.atomic import atomic_write_text
from hwprune.profiling.measure import MeasureConfig, Measurement, Stats
from hwprune.profiling.profiler import ProfilePlan, item_rows, pick_micro, plan_items
from hwprune.pruning.space import WidthConfig
from hwprune.profiling.table import LatencyTable, TableMeta
from hwprune.profiling.rows import CHAIN_LENGTHS, chain_onnx


def write_bundle(plan: ProfilePlan, out: str | Path, threads: int | None = None,
                 measure: MeasureConfig | None = None, progress=None) -> int:
    out = Path(out)
    if (out / MANIFEST).exists():
        raise HwpruneError(f"'{out}' already holds a bundle", "choose another --out directory")
    (out / "models").mkdir(parents=True, exist_ok=True)
    spaces, configs = plan_items(plan)
    items, seen = [], set()
    for k, (model, cid, cfg) in enumerate(configs):
        item = f"{model}/{cid}"
        if progress:
            progress(item, k, len(configs))
        space = spaces[model]
        module = space.apply(cfg).eval()
        shape = (plan.batch, *space.input_shape[1:])
        path = export_onnx(module, shape, out / "models" / f"{k:05d}.onnx")
        items.append({"id": item, "kind": "model", "model": model, "config": cid, "onnx": str(path.relative_to(out)),
                      "input_shape": list(shape), "widths": cfg.widths, "e2e": True})
        for j, (name, spec) in enumerate(pick_micro(module, shape, plan, item, seen)):
            upath = spec.to_onnx(out / "models" / f"{k:05d}_u{j}.onnx")
            items.append({"id": f"{item}#micro{j}", "kind": "unit", "parent": item, "model": model, "config": cid,
                          "layer": name, "spec": spec.to_dict(), "onnx": str(upath.relative_to(out)), "e2e": False})
    if progress:
        progress("", len(configs), len(configs))
    probe = dict(zip(("n_short", "n_long"), CHAIN_LENGTHS))  # what the device's profiler adds per node
    for key in ("short", "long"):
        probe[key] = str(chain_onnx(out / "models" / f"chain{probe['n_' + key]}.onnx", probe["n_" + key])
                         .relative_to(out))
    manifest = {"format": BUNDLE_FORMAT, "plan": plan.to_dict(), "threads": threads,
                "measure": (measure or MeasureConfig.profile()).to_dict(), "items": items,
                "probe": probe}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return len(items)


def import_results(bundle: str | Path, out: str | Path) -> LatencyTable:
    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle)
    except BundleError as e:
        raise HwpruneError(str(e)) from None
    dev_path = bundle / "results" / "device.json"
    if not dev_path.exists():
        raise HwpruneError(f"no results in '{bundle}'", "run `python -m hwprune.device run BUNDLE` on the device first")
    device = json.loads(dev_path.read_text())
    plan = manifest["plan"]
    ort = device["ort_settings"]
    settings = {"backend": "onnxruntime", "backend_version": device["backend_version"],
                "execution_provider": ort["execution_provider"], "device": "cpu", "threads": ort["intra_op_threads"],
                "precision": "fp32", "inter_op_threads": ort["inter_op_threads"],
                "graph_optimization": ort["graph_optimization"], "spinning": ort["spinning"],
                "batch": plan["batch"], "input_size": plan["input_size"]}
    probe = bundle / "results" / "probe.json"
    meta = TableMeta(settings=settings, fingerprint=device["fingerprint"], models=list(plan["models"]), plan=plan,
                     command=device.get("command", ""),
                     node_overhead_ms=json.loads(probe.read_text())["node_overhead_ms"] if probe.exists() else None)
    rows: list[dict] = []
    parents = [i for i in manifest["items"] if i["kind"] == "model"]
    done = 0
    results: dict[str, dict] = {}
    for item in manifest["items"]:
        rp = result_path(bundle, item["id"])
        if rp.exists():
            results[item["id"]] = json.loads(rp.read_text())
    for item in parents:
        res = results.get(item["id"])
        if res is None:
            continue
        done += 1
        layers = _layers(bundle, item, res)
        e2e = Measurement(stats=Stats(**res["e2e"]["stats"]), setup_ms=res["e2e"]["setup_ms"],
                          first_run_ms=res["e2e"]["first_run_ms"], attempts=res["e2e"]["attempts"])
        micro = []
        for u in manifest["items"]:
            if u.get("parent") == item["id"] and u["id"] in results:
                from hwprune.profiling.rows import UnitSpec

                spec = UnitSpec.from_dict(u["spec"])
                micro.append((u["layer"], spec, _layers(bundle, u, results[u["id"]])))
        cfg = WidthConfig(item["model"], item["widths"])
        rows += item_rows(item["model"], item["config"], item["id"], cfg, item["input_shape"], e2e, layers, micro)
    meta.items_done, meta.items_planned = done, len(parents)
    meta.complete = done == len(parents)
    table = LatencyTable(rows, meta)
    table.save(out)
    return table


def _layers(bundle: Path, item: dict, res: dict):
    records = [NodeRecord.from_dict(n) for n in res["nodes"]]
    opt = result_path(bundle, item["id"]).parent / res["optimized"]
    return OrtGraphReader(bundle / item["onnx"], opt).units(records)
