"""Per model, the map from a configuration's summed layer times to its end-to-end time.

The gap between the two covers un-modelled nodes, launch gaps and the profiler's own cost.
:meth:`LatencyPredictor.fit <hwprune.prediction.predictor.LatencyPredictor.fit>` fits one
map per model on the table's ``e2e`` rows and chooses its form by leave-one-configuration-out
error (:data:`CALIBRATIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hwprune.profiling.layer_shapes import ModelTemplate

#: forms of the map: chosen per model by leave-one-out error, a power law of out-of-fold
#: predicted sums, or a line on measured sums
CALIBRATIONS = ("auto", "cross-fitted", "measured")


@dataclass
class _ModelFit:
    """A model's template and the map from its summed layer times to end-to-end time:
    ``slope * sum + intercept``, or ``exp(intercept) * sum ** slope`` when ``log``."""

    template: "ModelTemplate"
    slope: float = 1.0
    intercept: float = 0.0
    log: bool = False

    def __call__(self, layer_sum):
        if self.log:
            return np.exp(self.intercept) * np.power(np.maximum(layer_sum, 1e-9), self.slope)
        return self.slope * layer_sum + self.intercept


def _calibrate(kind: str, measured: np.ndarray, oof: np.ndarray, e2e: np.ndarray) -> tuple[float, float, bool]:
    """(slope, intercept, log) of one map: a power law on out-of-fold predicted sums, or a
    line on measured sums."""
    if kind == "cross-fitted":
        A = np.stack([np.log(oof), np.ones(len(oof))], axis=1)
        a, b = np.linalg.lstsq(A, np.log(e2e), rcond=None)[0]
        return float(a), float(b), True
    A = np.stack([measured, np.ones(len(measured))], axis=1)
    a, b = np.linalg.lstsq(A, e2e, rcond=None)[0]
    return float(a), float(b), False


def _calibration_loo(kind: str, measured: np.ndarray, oof: np.ndarray, e2e: np.ndarray) -> float:
    """Leave-one-configuration-out RMSPE of a map, applied as at prediction time: to the
    held-out configuration's out-of-fold predicted sum."""
    err = []
    for i in range(len(e2e)):
        m = np.arange(len(e2e)) != i
        f = _ModelFit(None, *_calibrate(kind, measured[m], oof[m], e2e[m]))
        err.append(float(f(oof[i])) / e2e[i] - 1)
    return float(np.sqrt(np.mean(np.square(err))))
