"""Prediction: a latency predictor fitted to a table, saved, loaded and validated end to end."""

from hwprune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "LatencyPredictor": "hwprune.prediction.predictor",
    "fit_predictor": "hwprune.prediction.predictor",
    "predictor_for": "hwprune.prediction.artifact",
    "save_predictor": "hwprune.prediction.artifact",
    "load_predictor": "hwprune.prediction.artifact",
    "validate": "hwprune.prediction.validate",
})
