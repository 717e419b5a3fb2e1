"""Profiling: time a device's layers and whole models, and keep the rows in a table.

This package imports nothing heavy at first: the device-side runner uses its measurement
protocol with only onnxruntime and numpy."""

from hwprune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "profile": "hwprune.profiling.profiler",
    "Profiler": "hwprune.profiling.profiler",
    "ProfilePlan": "hwprune.profiling.profiler",
    "MeasureConfig": "hwprune.profiling.measure",
    "Stats": "hwprune.profiling.measure",
    "LatencyTable": "hwprune.profiling.table",
    "TableMeta": "hwprune.profiling.table",
    "fingerprint": "hwprune.profiling.fingerprint",
    "create_backend": "hwprune.profiling.backends",
    "export_onnx": "hwprune.profiling.onnx_export",
})
