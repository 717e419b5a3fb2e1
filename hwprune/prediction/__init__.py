"""Prediction: a latency predictor fitted to a table, saved, loaded and validated end to end."""

_LAZY = {
    "LatencyPredictor": "hwprune.prediction.predictor",
    "fit_predictor": "hwprune.prediction.predictor",
    "predictor_for": "hwprune.prediction.artifact",
    "save_predictor": "hwprune.prediction.artifact",
    "load_predictor": "hwprune.prediction.artifact",
    "validate": "hwprune.prediction.validate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
