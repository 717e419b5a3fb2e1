"""A device correction of a fitted predictor, fitted on a few end-to-end measurements.

The correction multiplies each part of the source predictor's decomposition
(:mod:`hwprune.prediction.decomposition`) by a non-negative factor and adds a non-negative time
per executed node::

    target_ms = sum_k factor_k * part_k + overhead_ms_per_node * nodes

It is fitted on relative errors (each measured configuration weighs the same whatever its
latency), shrunk towards a single global ratio of the source's predictions (every factor
equal to that ratio, no node time) by a penalty on each parameter's distance from it::

    sum_i (pred_i / measured_i - 1)^2 + lambda * sum_j |A_j|^2 (x_j - x0_j)^2

where ``A_j`` is the parameter's column of the design divided by the measurements, so that
``lambda`` weighs every parameter alike whatever its unit. ``lambda`` is chosen from
:data:`SHRINKAGE` by leave-one-configuration-out error on the measurements themselves, with
the one-standard-error rule (the strongest shrinkage whose mean squared leave-one-out error
lies within one standard error of the smallest: a few measurements rarely prove that more
parameters than the ratio help, and then the ratio is kept); an
infinite ``lambda`` is the global ratio alone, zero (tried only when the measurements leave at
least one more configuration than there are free parameters) the plain non-negative least
squares fit. A part that no measured configuration has (depthwise convolutions of a ResNet)
keeps the global ratio.

How few measurements suffice: one configuration gives the global ratio only (there is nothing
to leave out, so no leave-one-out error); from two on, the shrinkage is chosen by leave-one-out.
Fewer configurations than parameters are allowed: the penalty keeps every fit determined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.prediction.decomposition import PARTS

#: the shrinkage strengths leave-one-out chooses among, strongest (the global ratio) first
SHRINKAGE = (np.inf, 100.0, 10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4, 0.0)
#: a design column whose largest share of a measurement is below this is left out of the fit
_ABSENT = 1e-6


@dataclass
class Correction:
    """A fitted device correction of one model (see the module's docstring)."""

    factors: dict  # part name -> factor
    overhead_ms_per_node: float
    ratio: float  # the global ratio the factors were shrunk towards
    shrinkage: float | None  # the lambda chosen; None: the global ratio alone
    samples: int
    #: leave-one-configuration-out RMSPE of the chosen correction (None with one configuration)
    loo_rmspe: float | None = None
    #: the same for every shrinkage tried (keys: the lambdas as text, "inf" the global ratio), and
    #: "source": the source's own RMSPE on the measurements, uncorrected
    loo: dict = field(default_factory=dict)

    def vector(self) -> np.ndarray:
        """The parameters in the design's column order (:meth:`Decomposition.design`)."""
        return np.array([*(self.factors[p] for p in PARTS), self.overhead_ms_per_node], dtype=np.float64)

    def apply(self, design: np.ndarray) -> np.ndarray:
        """Corrected milliseconds of the rows of a design ([N, parts + 1])."""
        return np.asarray(design, dtype=np.float64) @ self.vector()

    def to_dict(self) -> dict:
        return {"factors": dict(self.factors), "overhead_ms_per_node": self.overhead_ms_per_node,
                "ratio": self.ratio, "shrinkage": self.shrinkage, "samples": self.samples,
                "loo_rmspe": self.loo_rmspe, "loo": dict(self.loo)}


def _ratio(A: np.ndarray) -> float:
    """The global ratio ``r`` minimising the relative squared error of ``r`` times the source's
    predictions, from relative rows ``A`` (the parts of a row sum to the source's prediction
    over the measurement)."""
    q = A[:, :len(PARTS)].sum(axis=1)
    return float(np.sum(q) / np.sum(q * q))


def _active(A: np.ndarray) -> np.ndarray:
    """The design columns some configuration of ``A`` has."""
    return np.abs(A).max(axis=0) > _ABSENT


def _solve(A: np.ndarray, lam: float) -> np.ndarray:
    """The penalised non-negative fit with shrinkage ``lam`` on relative rows ``A`` (design
    divided by the measurements): the parameters in the design's column order."""
    from scipy.optimize import nnls

    x0 = np.array([_ratio(A)] * len(PARTS) + [0.0])
    active = _active(A)
    if np.isinf(lam) or not active.any():
        return x0
    cols = np.nonzero(active)[0]
    a = A[:, cols]
    b = np.ones(len(A)) - A[:, ~active] @ x0[~active]
    if lam > 0:
        d = np.sqrt(lam) * np.linalg.norm(a, axis=0)
        a = np.vstack([a, np.diag(d)])
        b = np.concatenate([b, d * x0[cols]])
    x = x0.copy()
    x[cols] = nnls(a, b, maxiter=100 * a.shape[1])[0]
    return x


def _loo_errors(A: np.ndarray, lam: float) -> np.ndarray:
    """Leave-one-configuration-out relative errors of the correction fitted with ``lam``."""
    err = []
    for i in range(len(A)):
        rest = np.arange(len(A)) != i
        err.append(float(A[i] @ _solve(A[rest], lam)) - 1.0)
    return np.asarray(err)


def _relative_rows(design: np.ndarray, measured: np.ndarray) -> np.ndarray:
    design = np.asarray(design, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if design.ndim != 2 or design.shape[1] != len(PARTS) + 1 or len(design) != len(measured):
        raise HwpruneError(f"a correction is fitted on a design of {len(PARTS) + 1} columns and one measurement "
                           f"per row, got {design.shape} and {measured.shape}")
    if len(measured) < 1:
        raise HwpruneError("a correction needs at least one measured configuration", "measure one or more (--samples)")
    if not (np.isfinite(measured).all() and (measured > 0).all()):
        raise HwpruneError("the measurements must be positive, finite milliseconds")
    if not (np.isfinite(design).all() and (design[:, :len(PARTS)].sum(axis=1) > 0).all()):
        raise HwpruneError("the source predictor predicts no positive time for some configuration")
    return design / measured[:, None]


def _choose(A: np.ndarray, loo: dict) -> tuple[float, float | None]:
    """The shrinkage by leave-one-out, with the one-standard-error rule: the strongest whose
    mean squared leave-one-out error is within one standard error of the smallest. Records
    every candidate's RMSPE in ``loo``; returns (lambda, its RMSPE)."""
    k = len(A)
    if k < 2:
        return np.inf, None
    free = int(_active(A).sum())
    sq = {}
    for lam in SHRINKAGE:
        if lam == 0 and k - 1 < free:  # an unpenalised leave-one-out fit would not be determined
            continue
        sq[lam] = np.square(_loo_errors(A, lam))
        loo[_key(lam)] = float(np.sqrt(sq[lam].mean()))
    best = min(sq, key=lambda lam: sq[lam].mean())
    bar = sq[best].mean() + sq[best].std(ddof=1) / np.sqrt(k)
    chosen = next(lam for lam in sq if sq[lam].mean() <= bar)  # SHRINKAGE runs strongest first
    return chosen, loo[_key(chosen)]


def fit_correction(design: np.ndarray, measured: np.ndarray) -> Correction:
    """Fit the correction of the rows of ``design`` (:meth:`Decomposition.design`) to their
    ``measured`` end-to-end times (ms), with the shrinkage chosen by leave-one-out."""
    A = _relative_rows(design, measured)
    loo = {"source": float(np.sqrt(np.mean(np.square(A[:, :len(PARTS)].sum(axis=1) - 1.0))))}
    chosen, err = _choose(A, loo)
    x = _solve(A, chosen)
    return Correction(dict(zip(PARTS, map(float, x[:len(PARTS)]))), float(x[-1]), _ratio(A),
                      None if np.isinf(chosen) else float(chosen), len(A), err, loo)


def _key(lam: float) -> str:
    return "inf" if np.isinf(lam) else f"{lam:g}"
