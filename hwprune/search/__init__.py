"""Search over a weight-sharing supernet: width grids, the supernet, its training, the learned prior."""

_LAZY = {
    "WidthGrid": "hwprune.search.grid",
    "SamplingPrior": "hwprune.search.prior",
    "Supernet": "hwprune.search.supernet",
    "FitnessData": "hwprune.search.supernet",
    "recalibrate_bn": "hwprune.search.supernet",
    "calibration_batches": "hwprune.search.supernet",
    "SupernetConfig": "hwprune.search.supernet_training",
    "train_supernet": "hwprune.search.supernet_training",
    "model_stages": "hwprune.search.stages",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
