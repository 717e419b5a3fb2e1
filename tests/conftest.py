"""Shared fixtures and helpers.

Logic that consumes timings (gating, drift, overhead subtraction, device correction) is tested
with *scripted* timings: :func:`script_e2e`, :func:`scripted_ort` and :func:`script_the_meter`
make a backend return chosen milliseconds, so that a test's outcome never depends on how fast the
host is. Tests that
time for real assert only what holds on any host (positive, finite, physically ordered).
"""

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def quick():
    from hwprune.profiling.measure import MeasureConfig

    return MeasureConfig.quick()


def run_cli(*args: str, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Run the real ``hwprune`` entry point in a subprocess."""
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hwprune", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """Run ``hwprune`` in this process (so that a test's monkeypatches apply); the result reads
    like :func:`run_cli`'s. torch's thread count is restored afterwards."""
    import torch

    from hwprune.cli import main

    out, err, rc, threads = io.StringIO(), io.StringIO(), 0, torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["hwprune", *args], rc, out.getvalue(), err.getvalue())


def measured(ms: float, count: int = 5):
    """A :class:`~hwprune.profiling.measure.Measurement` whose every sample took ``ms``."""
    from hwprune.profiling.measure import Measurement, Stats

    return Measurement(stats=Stats.from_samples([ms] * count), setup_ms=1.0, first_run_ms=ms,
                       samples_ms=[ms] * count)


#: The scripted device of :func:`scripted_ort`: every executed node costs a fixed time plus a time
#: per multiply-accumulate, the profiler adds a fixed overhead to each node it reports, and the
#: end-to-end time is the nodes' own times times a factor plus a fixed per-run cost.
NODE_MS, MAC_MS, OVERHEAD_MS, E2E_FACTOR, RUN_MS = 0.003, 2e-8, 0.001, 1.05, 0.02


def script_e2e(backend, timing, overhead_ms: float = OVERHEAD_MS):
    """Make ``backend`` time every model end to end at ``timing(artifact)`` ms (single timings and
    pairs alike) and report ``overhead_ms`` as its profiler's per-node overhead, running nothing."""
    backend.measure_e2e = lambda art: measured(timing(art))
    backend.measure_pair = lambda art, ref: (measured(timing(art)), measured(timing(ref)))
    backend.node_overhead_ms = lambda workdir: overhead_ms
    return backend


def scripted_node_ms(unit) -> float:
    """The scripted device's time of one executed node (profiler overhead included)."""
    macs = 0.0
    if unit.kind in ("conv", "dwconv", "linear"):
        oh, ow = -(-unit.h // unit.stride), -(-unit.w // unit.stride)
        macs = unit.batch * unit.cout * oh * ow * unit.cin / max(1, unit.groups) * unit.kh * unit.kw
    return NODE_MS + OVERHEAD_MS + MAC_MS * macs


def scripted_ort(threads: int = 1, measure=None):
    """A real ONNX Runtime backend (its fusions and executed shapes are read from the runtime)
    whose every timing comes from :func:`scripted_node_ms` instead of the clock: a table it
    profiles is the same on every host."""
    from hwprune.profiling.backends import create_backend
    from hwprune.profiling.measure import Stats

    be = create_backend("onnxruntime", threads=threads, measure=measure)
    real, memo = be.profile_layers, {}

    def profile_layers(art):
        p = Path(art.onnx_path)
        key = (str(p), p.stat().st_mtime_ns, p.stat().st_size)
        if key not in memo:
            memo[key] = real(art)
            for r in memo[key]:
                r.stats = Stats.from_samples([scripted_node_ms(r.unit)] * 5)
        return memo[key]

    def e2e_ms(art):
        nodes = profile_layers(art)
        return RUN_MS + E2E_FACTOR * sum(r.stats.median - OVERHEAD_MS for r in nodes)

    be.profile_layers = profile_layers
    return script_e2e(be, e2e_ms)


def params_ms(art) -> float:
    """A scripted device for whole models: 0.2 ms per run plus 1 ms per 100,000 parameters of
    ``art.module``."""
    return 0.2 + 1e-5 * sum(p.numel() for p in art.module.parameters())


def script_the_meter(monkeypatch, timing=params_ms):
    """Make every :class:`hwprune.bench.harness.GatedMeter` (prune's device measurements) time each model at
    ``timing(artifact)`` ms, without exporting or running it."""
    import hwprune.bench.harness as hb
    from hwprune.profiling.backends import create_backend as real_create

    def create(*a, **k):
        be = script_e2e(real_create(*a, **k), timing)
        be.needs_onnx = lambda: False  # the scripted device times the module itself: nothing to export
        return be

    monkeypatch.setattr(hb, "create_backend", create)
