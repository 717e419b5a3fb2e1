"""Pruning: width spaces, costs, importance criteria and the registered pruning methods."""

_LAZY = {
    "PruningSpace": "hwprune.pruning.space",
    "WidthConfig": "hwprune.pruning.space",
    "objective": "hwprune.pruning.objectives",
    "METHODS": "hwprune.pruning.methods",
    "get_method": "hwprune.pruning.methods",
    "PruneJob": "hwprune.pruning.methods",
    "MethodOutput": "hwprune.pruning.methods",
    "gcp": "hwprune.pruning.gcp",
    "prune_to_target": "hwprune.pruning.target",
    "DeviceOptions": "hwprune.pruning.target",
    "Finetune": "hwprune.pruning.target",
    "TargetResult": "hwprune.pruning.target",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
