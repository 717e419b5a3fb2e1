"""Pruning: width spaces, costs, importance criteria and the registered pruning methods."""

from hwprune.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
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
})
