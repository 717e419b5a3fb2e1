"""Training: data, training and evaluation loops, and module-free checkpoints."""

_LAZY = {
    "Checkpoint": "hwprune.training.checkpoint",
    "TrainConfig": "hwprune.training.train",
    "train": "hwprune.training.train",
    "evaluate": "hwprune.training.train",
    "load_splits": "hwprune.training.data",
    "load_dataset": "hwprune.training.data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
