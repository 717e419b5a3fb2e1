"""hwprune: make convolutional networks faster on one specific device, by measurement.

The package follows the data: profile -> table -> predict -> cost -> prune/search ->
bench -> report. Importing ``hwprune`` is light: the heavy stages load on first use, so
that the device-side runner (``hwprune.device``) works with only onnxruntime and numpy.
"""

__version__ = "0.1.0"

_LAZY = {
    "HwpruneError": ("hwprune.errors", "HwpruneError"),
    "LatencyTable": ("hwprune.profiling.table", "LatencyTable"),
    "PruningSpace": ("hwprune.pruning.space", "PruningSpace"),
    "WidthConfig": ("hwprune.pruning.space", "WidthConfig"),
    "create_model": ("hwprune.models", "create_model"),
    "list_models": ("hwprune.models", "list_models"),
    "create_backend": ("hwprune.profiling.backends", "create_backend"),
    "MeasureConfig": ("hwprune.profiling.measure", "MeasureConfig"),
    "profile": ("hwprune.profiling.profiler", "profile"),
    "LatencyPredictor": ("hwprune.prediction.predictor", "LatencyPredictor"),
    "Checkpoint": ("hwprune.training.checkpoint", "Checkpoint"),
    "objective": ("hwprune.pruning.objectives", "objective"),
    "gcp": ("hwprune.pruning.gcp", "gcp"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'hwprune' has no attribute {name!r}")
