"""Benchmarks: real end-to-end latency and throughput, reports, and a reproducible noisy neighbour."""

from hwprune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "bench": "hwprune.bench.harness",
    "BenchResult": "hwprune.bench.harness",
    "write_report": "hwprune.bench.report",
    "NoisyNeighbour": "hwprune.bench.noise",
    "get_pattern": "hwprune.bench.noise",
})
