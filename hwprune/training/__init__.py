"""Training: data, training and evaluation loops, and module-free checkpoints."""

from hwprune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Checkpoint": "hwprune.training.checkpoint",
    "TrainConfig": "hwprune.training.train",
    "train": "hwprune.training.train",
    "evaluate": "hwprune.training.train",
    "load_splits": "hwprune.training.data",
    "load_dataset": "hwprune.training.data",
})
