"""hwprune: make convolutional networks faster on one specific device, by measurement.

The package follows the data: profile -> table -> predict -> cost -> prune/search ->
bench -> report. Importing ``hwprune`` is light: the heavy stages load on first use, so
that the device-side runner (``hwprune.device``) works with only onnxruntime and numpy.
"""

from hwprune.lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, _exported = lazy_exports(__name__, {
    "HwpruneError": "hwprune.errors",
    "LatencyTable": "hwprune.profiling.table",
    "PruningSpace": "hwprune.pruning.space",
    "WidthConfig": "hwprune.pruning.space",
    "create_model": "hwprune.models",
    "list_models": "hwprune.models",
    "create_backend": "hwprune.profiling.backends",
    "MeasureConfig": "hwprune.profiling.measure",
    "profile": "hwprune.profiling.profiler",
    "LatencyPredictor": "hwprune.prediction.predictor",
    "Checkpoint": "hwprune.training.checkpoint",
    "objective": "hwprune.pruning.objectives",
    "gcp": "hwprune.pruning.gcp",
})
__all__ = ["__version__", *_exported]
