"""The regressor of a layer's extras: the nodes the runtime runs around its kernel."""

from __future__ import annotations

import numpy as np


class _Extras:
    """Milliseconds of the nodes the runtime runs around a layer's kernel: layout reorders,
    an Add or activation it did not fuse, a pooling on its output.

    Whether they run at all is decided by the layer's neighbours (a single unblocked writer
    keeps a residual stream in NCHW), not by its own shape, so they get a regressor of their
    own, with the neighbours' layout counts among the features. Learnt apart from the
    kernel, the context is the whole signal rather than a few per cent of it. The target is
    the time itself, with a squared loss: its conditional mean is what a model's sum
    needs, where a log target would predict the geometric mean of "none" and "some" and
    fall well short of it.
    """

    def __init__(self, seed: int):
        from sklearn.ensemble import HistGradientBoostingRegressor

        self.est = HistGradientBoostingRegressor(max_iter=150, learning_rate=0.16, max_leaf_nodes=31,
                                                 min_samples_leaf=8, random_state=seed)

    def fit(self, X: np.ndarray, extra_ms: np.ndarray) -> "_Extras":
        self.est.fit(X, extra_ms)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(self.est.predict(X), 0.0)
