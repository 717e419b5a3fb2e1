"""Benchmarks: real end-to-end latency and throughput, reports, and a reproducible noisy neighbour."""

_LAZY = {
    "bench": "hwprune.bench.harness",
    "BenchResult": "hwprune.bench.harness",
    "write_report": "hwprune.bench.report",
    "NoisyNeighbour": "hwprune.bench.noise",
    "get_pattern": "hwprune.bench.noise",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
