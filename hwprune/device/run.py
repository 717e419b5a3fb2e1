"""Run a bundle on the device (``hwprune-device run BUNDLE``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hwprune.profiling.fingerprint import fingerprint
from hwprune.atomic import atomic_write_text
from hwprune.profiling.measure import REFERENCE_SESSIONS, MeasureConfig, median_session
from hwprune.device.ort_runner import OrtSettings, node_overhead_ms, ort_version, profile_model, time_model

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "hwprune.bundle/1"


class BundleError(Exception):
    pass


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"'{bundle}' is not a bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e.msg}") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} has format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    return manifest


def result_path(bundle: Path, item_id: str) -> Path:
    return Path(bundle) / "results" / (item_id.replace("/", "__") + ".json")


def run_bundle(bundle: str | Path, threads: int | None = None, max_minutes: float | None = None,
               log=print) -> tuple[int, int]:
    """Measure every item not measured yet; returns (done, total). Safe to interrupt and rerun."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    threads = threads or manifest.get("threads") or len(os.sched_getaffinity(0))
    settings = OrtSettings(intra_op_threads=int(threads), inter_op_threads=1)
    cfg = MeasureConfig(**manifest.get("measure", {}))
    results = bundle / "results"
    results.mkdir(exist_ok=True)
    device = {"format": BUNDLE_FORMAT, "fingerprint": fingerprint(), "backend": "onnxruntime",
              "backend_version": ort_version(), "ort_settings": settings.to_dict(), "measure": cfg.to_dict(),
              "command": " ".join(sys.argv)}
    dev_path = results / "device.json"
    if dev_path.exists():
        prev = json.loads(dev_path.read_text())
        if prev.get("ort_settings") != device["ort_settings"] or prev.get("backend_version") != device["backend_version"]:
            raise BundleError(f"results in {results} were taken with other settings "
                              f"({prev.get('ort_settings')}, onnxruntime {prev.get('backend_version')}): "
                              "remove them or use the same --threads")
    else:
        atomic_write_text(dev_path, json.dumps(device, indent=1))
    items = manifest["items"]
    t0 = time.perf_counter()
    done = 0
    probe, probe_out = manifest.get("probe"), results / "probe.json"
    if probe and not probe_out.exists():  # what this device's profiler adds to each node it times
        ov = node_overhead_ms(bundle / probe["short"], bundle / probe["long"], probe["n_short"], probe["n_long"],
                              settings, cfg)
        atomic_write_text(probe_out, json.dumps({"node_overhead_ms": ov}))
        log(f"profiler overhead: {ov * 1000:.2f} us per node")
    for k, item in enumerate(items):
        out = result_path(bundle, item["id"])
        if out.exists():
            done += 1
            continue
        if max_minutes is not None and time.perf_counter() - t0 >= max_minutes * 60:
            break
        onnx = bundle / item["onnx"]
        res = {"id": item["id"]}
        if item.get("e2e", True):
            sessions = REFERENCE_SESSIONS if item.get("config") == "full" else 1
            res["e2e"] = median_session(lambda: time_model(onnx, settings, cfg), sessions).to_dict()
        opt = out.with_suffix(".opt.onnx")
        res["nodes"] = [n.to_dict() for n in profile_model(onnx, settings, cfg, optimized_path=opt)]
        res["optimized"] = opt.name
        atomic_write_text(out, json.dumps(res))
        done += 1
        log(f"[{k + 1}/{len(items)}] {item['id']}" + (f": {res['e2e']['stats']['median']:.3f} ms" if "e2e" in res else ""))
    return done, len(items)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hwprune-device", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure a bundle written by `hwprune bundle`")
    r.add_argument("bundle", type=Path)
    r.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the bundle's, else all cores)")
    r.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this long; rerun to continue")
    args = ap.parse_args(argv)
    try:
        done, total = run_bundle(args.bundle, args.threads, args.max_minutes,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
    except (BundleError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError as e:
        print(f"error: {e} (the device needs onnxruntime and numpy: pip install onnxruntime numpy)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished items are kept; run again to continue", file=sys.stderr)
        sys.exit(130)
    print(json.dumps({"done": done, "total": total, "complete": done == total}))
