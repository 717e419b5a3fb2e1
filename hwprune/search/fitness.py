"""The search's fitness: a subnet's proxy accuracy in a trained supernet.

A candidate width configuration is scored as the supernet's top-1 accuracy (percent) at that
configuration on the held-out split of the *training* set that the supernet file records
(it never trained on those images), after its BN statistics were recomputed on ~20 batches of
the other training images (:func:`hwprune.search.supernet.recalibrate_bn`). The test split is
never looked at. Every candidate is recalibrated on the same batches, so candidates compare
on equal terms.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

from hwprune.errors import HwpruneError
from hwprune.pruning.space import WidthConfig
from hwprune.search.supernet import BN_BATCHES



class ProxyFitness:
    """``fitness_fn`` for :func:`hwprune.search.evolution.evolve`: ``fitness(widths)`` is the proxy
    top-1 (percent) of ``supernet`` at ``widths`` after BN recalibration.

    ``data``: the training data (a path with a ``train`` split, or a training ``ImageDataset``);
    the held-out split and the normalisation come from the supernet file. ``n_batches`` batches
    of ``batch_size`` training images recalibrate BN.
    """

    def __init__(self, supernet, data, n_batches: int = BN_BATCHES, batch_size: int = 128, seed: int = 0,
                 eval_batch: int = 500):
        if n_batches < 1 or batch_size < 1:
            raise HwpruneError(f"BN recalibration needs at least one batch of one image "
                               f"(got {n_batches} batches of {batch_size})")
        self.supernet = supernet
        self.n_batches, self.batch_size, self.eval_batch = int(n_batches), int(batch_size), int(eval_batch)
        self.fitness_data = supernet.fitness_data(data, batch_size=batch_size, n_batches=n_batches, seed=seed)
        self.evaluations = 0
        self.seconds = 0.0

    @property
    def held_out_images(self) -> int:
        return len(self.fitness_data.holdout)

    def __call__(self, widths: WidthConfig | Mapping[str, int]) -> float:
        t0 = time.perf_counter()
        try:
            return float(self.supernet.proxy_accuracy(widths, self.fitness_data, batch_size=self.eval_batch))
        finally:
            self.evaluations += 1
            self.seconds += time.perf_counter() - t0

    def info(self) -> dict:
        """What the fitness was measured on, for a result file."""
        return {"fitness": "proxy top-1 (%) on the supernet's held-out training split after BN recalibration",
                "held_out_images": self.held_out_images, "bn_batches": len(self.fitness_data.calibration),
                "bn_batch_size": self.batch_size, "holdout": dict(self.supernet.meta.get("holdout") or {}),
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3)}


def training_data(data: str | Path | None) -> Path:
    """The training data path; one-line error without one (the supernet file records the held-out
    split, not where the images live)."""
    if data is None:
        raise HwpruneError("the search scores candidates on the supernet's held-out training images: it needs --data",
                           "pass the training data the supernet was trained on")
    return Path(data)
