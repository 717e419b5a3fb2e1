"""Profiling: time a device's layers and whole models, and keep the rows in a table.

This package imports nothing heavy at first: the device-side runner uses its measurement
protocol with only onnxruntime and numpy."""

_LAZY = {
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
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
