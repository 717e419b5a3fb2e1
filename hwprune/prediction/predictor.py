"""Predict latency from a device's table.

A table samples the width space; :class:`LatencyPredictor` generalises from it to any
width configuration of the models it covers.

How a prediction is made:

* A :class:`ModelTemplate` lists a model's convolution and linear layers with their
  shapes written as functions of the width configuration (which group sets each layer's
  input and output channels). Shapes of thousands of configurations are computed at once
  with numpy, without building a single module.
* Each layer's time is predicted by a scikit-learn regressor chosen per unit kind
  (convolution, depthwise convolution, linear) by grouped cross-validation, from features
  of the layer's shape that let latency staircases be learnt
  (:mod:`hwprune.prediction.features`).
* The training target of a layer is what the runtime executed for it in situ, in two
  parts with a regressor each. Its own kernel (log target, regressor chosen by grouped
  cross-validation); and its *extras*: the layout reorders around it, any element-wise
  node that was *not* fused into it, and the poolings and activations that run on its
  output before the next layer (time target, squared loss). Whether extras run at all is
  decided by the layer's neighbours, not by its own shape: one convolution that falls back
  to NCHW keeps its whole residual stream in NCHW, so every layer writing or reading that
  stream pays reorders and unfused Adds. The features count those neighbours
  (:meth:`ModelTemplate.layout_context`); learnt apart from the kernel, that context is
  the whole signal of the extras rather than a few per cent of the layer's time.
* A model's latency is the sum of its layers, mapped to the measured end-to-end time by a
  per-model overhead term fitted on the table's ``e2e`` rows (the gap covers un-modelled
  nodes, launch gaps and the profiler's own cost): a power law of the out-of-fold
  predicted layer sums by default (see :meth:`LatencyPredictor.fit` and
  :mod:`hwprune.prediction.e2e_map`).

Where the parts live: features and the kernel target in :mod:`hwprune.prediction.features`,
the training rows in :mod:`hwprune.prediction.training_set`, the extras' regressor in
:mod:`hwprune.prediction.extras`, the end-to-end map in :mod:`hwprune.prediction.e2e_map`.

A fitted predictor is saved as an artifact without pickles (:mod:`hwprune.prediction.artifact`):
commands given ``--table`` load it from ``--predictor`` or from the cache beside the table
instead of fitting again.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from hwprune.errors import HwpruneError, TableMismatch
from hwprune.prediction.e2e_map import CALIBRATIONS, _calibrate, _calibration_loo, _ModelFit
from hwprune.prediction.extras import _Extras
from hwprune.prediction.features import (FEATURE_NAMES, FEATURE_VERSION, FLOP_EXPONENT, KERNEL_FLOPS_COL,
                                         _kernel_ms, _kernel_target, layer_features)
from hwprune.prediction.training_set import KINDS, TrainingSet, add_layer_rows, empty_lists
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.profiling.table import LatencyTable
from hwprune.profiling.layer_shapes import ModelTemplate

__all__ = ["BULK_ROWS", "CALIBRATIONS", "FEATURE_NAMES", "FEATURE_VERSION", "FLOP_EXPONENT", "KERNEL_FLOPS_COL", "KINDS",
           "LatencyPredictor", "LayerPrediction", "ModelTemplate", "cross_validate_e2e", "fit_predictor",
           "layer_features", "unique_rows"]

#: feature rows from which a prediction uses every core
BULK_ROWS = 100_000


# ---------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------
#: fixed directions on which feature rows are hashed (:func:`unique_rows`)
_ROW_HASH = np.random.default_rng(20261203).standard_normal(len(FEATURE_NAMES))


def unique_rows(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``F`` and the index of each row among them (``U[inverse] == F``).

    Configurations of one model share most of their layers' shapes (a search over a width grid
    repeats them thousands of times), and a tree ensemble's prediction of a row does not depend
    on the other rows, so each distinct row is predicted once. Rows are grouped by a fixed
    random projection and the grouping is checked exactly; should two distinct rows ever
    project alike (or a row hold a NaN), every row is kept as it is."""
    if len(F) < 2 or F.shape[1] != len(_ROW_HASH):
        return F, np.arange(len(F))
    h = F @ _ROW_HASH
    if not np.isfinite(h).all():
        return F, np.arange(len(F))
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    U = F[first]
    dup = np.flatnonzero(first[inverse] != np.arange(len(F)))  # rows standing in for another: check only those
    if not np.array_equal(U[inverse[dup]], F[dup]):
        return F, np.arange(len(F))
    return U, inverse


@contextmanager
def _every_core(est, on: bool):
    """Let a forest predict on every core while ``on`` (its trees are fitted with one job:
    OpenMP limits do not reach joblib). The predictions are the same either way."""
    if not on or getattr(est, "n_jobs", None) is None:
        yield
        return
    old = est.n_jobs
    est.n_jobs = -1
    try:
        yield
    finally:
        est.n_jobs = old


def _candidates(seed: int) -> dict[str, object]:
    from sklearn.ensemble import ExtraTreesRegressor, HistGradientBoostingRegressor

    return {
        "hgb": HistGradientBoostingRegressor(max_iter=400, learning_rate=0.08, max_leaf_nodes=31,
                                             min_samples_leaf=4, l2_regularization=1e-3, random_state=seed),
        "hgb_deep": HistGradientBoostingRegressor(max_iter=600, learning_rate=0.05, max_leaf_nodes=63,
                                                  min_samples_leaf=2, random_state=seed),
        # 50 trees: on the 2026-11-30 tables, 150 cut the held-out end-to-end error by 0.1 point
        # (resnet50: 3.0% against 3.1%) for three times the prediction time
        "extra_trees": ExtraTreesRegressor(n_estimators=50, min_samples_leaf=1, n_jobs=1, random_state=seed),
    }


@dataclass
class LayerPrediction:
    layer: str
    kind: str
    cin: int
    cout: int
    h: int
    w: int
    kh: int
    stride: int
    predicted_ms: float
    extrapolated: bool
    #: of ``predicted_ms``, the nodes the runtime runs around the kernel (layout reorders,
    #: an unfused Add or activation, a pooling): where a neighbour's width costs this layer
    extra_ms: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class LatencyPredictor(BaseEstimator):
    """Latency of any width configuration of the models a device's table covers.

    A scikit-learn estimator: parameters in ``__init__`` (``get_params``/``set_params``
    and ``clone`` come from :class:`~sklearn.base.BaseEstimator`), validated in ``fit``,
    which returns ``self``; learnt attributes end with ``_``.

    >>> pred = LatencyPredictor().fit(LatencyTable.load("table.parquet"))  # doctest: +SKIP
    >>> pred.predict("resnet18", [space.uniform(0.5)])                   # doctest: +SKIP
    """

    def __init__(self, regressor: str = "auto", min_rows: int = 10, cv_folds: int = 3, random_state: int = 0,
                 selection_rows: int = 4000, calibration: str = "auto", flop_exponent: float = FLOP_EXPONENT):
        self.regressor = regressor
        self.flop_exponent = flop_exponent
        self.calibration = calibration
        self.min_rows = min_rows
        self.cv_folds = cv_folds
        self.random_state = random_state
        self.selection_rows = selection_rows

    # -- fitting ----------------------------------------------------------------------
    def _validate_params(self) -> None:
        """Raise a one-line error for a parameter ``fit`` cannot use, before any work."""
        cands = _candidates(self.random_state)
        if self.regressor != "auto" and self.regressor not in cands:
            raise HwpruneError(f"unknown regressor '{self.regressor}'", f"choose auto or one of {', '.join(cands)}")
        if self.calibration not in CALIBRATIONS:
            raise HwpruneError(f"unknown calibration '{self.calibration}'", f"choose {', '.join(CALIBRATIONS)}")
        for name in ("min_rows", "cv_folds", "selection_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (2 if name == "cv_folds" else 1):
                raise HwpruneError(f"{name} must be an integer of at least {2 if name == 'cv_folds' else 1}, got {v!r}")
        a = self.flop_exponent
        if isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not np.isfinite(a):
            raise HwpruneError(f"flop_exponent must be a finite number, got {self.flop_exponent!r}")

    def _template(self, model: str, input_size) -> ModelTemplate:
        return ModelTemplate(PruningSpace.from_name(model, input_size=input_size))

    def _training_set(self, table: LatencyTable, drop_slow: bool = True
                      ) -> tuple[TrainingSet, dict[str, _ModelFit], pd.DataFrame]:
        """Layer rows (features from the template, targets from the in-situ profile) per unit kind.

        With ``drop_slow``, configurations a gated profile marked as timed in the host's slow
        state (``state_ok=False``) are left out, provided at least 5 others remain.

        The profiler adds about a microsecond to every node it times, and the number of
        executed nodes varies with the widths (reorders, unfused element-wise nodes). The
        profiler measures that per-node overhead when it builds a table (two chains of tiny
        nodes, timed with and without profiling: ``TableMeta.node_overhead_ms``), and it
        is taken off every node before the layers are summed. Tables without it (older
        ones; ``hwprune profile --resume`` on their device adds it) are used as they are.
        """
        rows = table.rows
        slow_items = table.slow_items()  # gated runs: the bracket stayed slow
        self.slow_configs_used_ = len(slow_items)  # configurations timed in the host's slow state, fitted on
        fast_e2e = rows["source"].eq("e2e") & ~rows["item"].isin(slow_items)
        if drop_slow and slow_items and fast_e2e.sum() >= 5:
            self.slow_configs_used_ = 0
            rows = rows[~rows["item"].isin(slow_items)]
        batch = int(table.settings.get("batch") or 1)
        insitu = rows[rows["source"] == "insitu"]
        measured = table.meta.node_overhead_ms
        self.node_overhead_ms_ = float(measured) if measured is not None else 0.0
        acc = empty_lists()
        fits: dict[str, _ModelFit] = {}
        sums = []  # per e2e item: measured e2e time
        for model in sorted(set(rows["model"].dropna())):
            tpl = self._template(model, table.settings.get("input_size"))
            fits[model] = _ModelFit(tpl)
            names = set(tpl.layer_names)
            e2e = rows[(rows["source"] == "e2e") & (rows["model"] == model)]
            ins = insitu[insitu["model"] == model]
            by_item = {k: v for k, v in ins.groupby("item", sort=False)}
            for item, e in zip(e2e["item"], e2e.itertuples()):
                nodes = by_item.get(item)
                if nodes is None or not len(nodes):
                    continue
                add_layer_rows(acc, tpl, names, nodes, json.loads(e.widths), batch, f"{model}/{item}",
                               self.node_overhead_ms_)
                sums.append({"model": model, "item": item, "e2e": float(e.median_ms), "widths": e.widths})
        return TrainingSet.from_lists(acc), fits, pd.DataFrame(sums)

    def _select(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[str, dict, np.ndarray]:
        """The regressor with the lowest grouped-CV RMSPE (on at most ``selection_rows`` rows) and its scores."""
        from sklearn.base import clone
        from sklearn.model_selection import GroupKFold

        cands, a = _candidates(self.random_state), self.flop_exponent
        names = list(cands) if self.regressor == "auto" else [self.regressor]
        if len(names) == 1:
            return names[0], {}, np.full_like(y, np.nan)
        if len(y) > self.selection_rows:  # choose on a subsample of whole configurations: fitting stays fast
            rng = np.random.default_rng(self.random_state)
            uniq = np.unique(groups)
            keep = rng.permutation(uniq)[: max(3, int(len(uniq) * self.selection_rows / len(y)))]
            sel = np.isin(groups, keep)
            X, y, groups = X[sel], y[sel], groups[sel]
        n_groups = len(set(groups))
        if n_groups < 2:
            return names[0], {}, np.full_like(y, np.nan)
        folds = list(GroupKFold(n_splits=min(self.cv_folds, n_groups)).split(X, y, groups))
        scores, oof = {}, {}
        for name in names:
            pred = np.empty_like(y)
            for tr, te in folds:
                pred[te] = _kernel_ms(clone(cands[name]).fit(X[tr], _kernel_target(X[tr], y[tr], a)), X[te], a)
            scores[name] = float(np.sqrt(np.mean(((pred - y) / y) ** 2)))
            oof[name] = pred
        best = min(scores, key=scores.get)
        return best, scores, oof[best]

    def _out_of_fold(self, est, X: np.ndarray, y: np.ndarray, extra: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """Predictions (kernel plus extras) of every row by copies of ``est`` and the extras
        model fitted without that row's configuration."""
        from sklearn.base import clone
        from sklearn.model_selection import GroupKFold

        n_groups, a = len(set(groups)), self.flop_exponent
        if n_groups < 2:
            return y + extra
        out = np.empty_like(y)
        for tr, te in GroupKFold(n_splits=min(self.cv_folds, n_groups)).split(X, y, groups):
            out[te] = (_kernel_ms(clone(est).fit(X[tr], _kernel_target(X[tr], y[tr], a)), X[te], a)
                       + _Extras(self.random_state).fit(X[tr], extra[tr]).predict(X[te]))
        return out

    def fit(self, table: LatencyTable) -> "LatencyPredictor":
        """Fit one regressor per unit kind, then each model's overhead term.

        The overhead term maps the sum of a configuration's layer times to its measured
        end-to-end time, per model. With ``calibration="auto"`` (the default) each model
        gets whichever of the two maps below has the lower leave-one-configuration-out
        error on the table (both applied to out-of-fold predicted sums, as at prediction
        time; the choice is in ``selection_["calibration"]``). With
        ``calibration="cross-fitted"`` it is a power law, ``exp(b) * sum ** a``, fitted in log space on *out-of-fold*
        predicted layer sums (each configuration's layers predicted by regressors fitted
        without that configuration, ``cv_folds`` folds): it then corrects what the
        regressors get wrong for a whole model, such as over-predicting every small layer
        of a heavily pruned mobilenet_v2, and the in-situ profile running slower than an
        unprofiled session by a share that grows as the layers shrink. Out-of-fold rather
        than in-sample predictions, because in-sample ones fit the noise and would make the
        map an identity. With ``"measured"`` it is a line fitted on the measured layer sums.
        Compared by cross-validation on the tables in
        ``benchmarks/predictor_cv.py``.
        """
        t0 = time.perf_counter()
        self._validate_params()
        if not isinstance(table, LatencyTable):
            raise HwpruneError(f"a predictor is fitted on a LatencyTable, not on {type(table).__name__}")
        if len(table.e2e) == 0:
            raise HwpruneError("the table has no end-to-end rows to calibrate a predictor on")
        ts, fits, sums = self._training_set(table)
        if any(len(y) < self.min_rows for y in ts.y.values()) and table.slow_items():
            # too few fast-state rows for some unit kind: fit on every row rather than not at all,
            # and say so (slow_configs_used_ counts the slow-state configurations fitted on)
            ts, fits, sums = self._training_set(table, drop_slow=False)
        if not ts.y:
            if (table.meta.plan or {}).get("calibration"):
                raise HwpruneError("the table holds only the end-to-end measurements of a calibration",
                                   "use the predictor `hwprune calibrate` wrote with it: --predictor PATH")
            raise HwpruneError("the table has no in-situ layer rows the predictor can learn from")
        for k, y in ts.y.items():
            if len(y) < self.min_rows:
                raise HwpruneError(f"the table is too small to fit the '{k}' regressor: {len(y)} layer rows, "
                                   f"need {self.min_rows}", "profile more configurations (--configs)")
        self.settings_ = dict(table.settings)
        self.flop_exponent_ = float(self.flop_exponent)  # what the kernels were fitted on, whatever set_params does later
        self.fingerprint_ = dict(table.meta.fingerprint)
        self.models_ = fits
        self.ranges_ = ts.ranges
        self.selection_: dict[str, dict] = {}
        measured_sum, oof_sum = self._fit_kinds(ts)
        self._fit_calibration(sums, measured_sum, oof_sum)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _fit_kinds(self, ts: TrainingSet) -> tuple[dict[str, float], dict[str, float]]:
        """Fit each unit kind's kernel regressor (chosen by :meth:`_select`) and extras model.

        Returns, per configuration, the measured (target) time of its layers and the same
        predicted by regressors fitted without that configuration (the measured time again
        when ``calibration="measured"``)."""
        from sklearn.base import clone

        self.estimators_: dict[str, object] = {}
        self.extras_: dict[str, _Extras] = {}
        cands = _candidates(self.random_state)
        measured_sum: dict[str, float] = {}
        oof_sum: dict[str, float] = {}
        crossfit = self.calibration != "measured"
        for k, y in ts.y.items():
            # one OpenMP thread: the fits are small, and spinning OpenMP workers made them 20x slower
            # whenever another process (a training run, a measurement) held the other core
            with threadpool_limits(1):
                name, scores, _ = self._select(ts.X[k], y, ts.groups[k])
                self.estimators_[k] = clone(cands[name]).fit(ts.X[k], _kernel_target(ts.X[k], y, self.flop_exponent_))
                self.extras_[k] = _Extras(self.random_state).fit(ts.X[k], ts.extra[k])
                total = y + ts.extra[k]
                oof = self._out_of_fold(cands[name], ts.X[k], y, ts.extra[k], ts.groups[k]) if crossfit else total
            self.selection_[k] = {"chosen": name, "cv_rmspe": scores, "rows": int(len(y)),
                                  "extra_share": float(ts.extra[k].sum() / total.sum())}
            for g, v, o in zip(ts.groups[k], total, oof):
                measured_sum[g] = measured_sum.get(g, 0.0) + float(v)
                oof_sum[g] = oof_sum.get(g, 0.0) + float(o)
        return measured_sum, oof_sum

    def _fit_calibration(self, sums: pd.DataFrame, measured_sum: Mapping[str, float],
                         oof_sum: Mapping[str, float]) -> None:
        """Fit each model's map from summed layer times to end-to-end time (see :meth:`fit`)."""
        for model, f in self.models_.items():
            s = sums[sums["model"] == model]
            x = np.array([measured_sum.get(f"{model}/{i}", np.nan) for i in s["item"]])
            xo = np.array([oof_sum.get(f"{model}/{i}", np.nan) for i in s["item"]])
            ok = np.isfinite(x)
            x, xo, e2e = x[ok], xo[ok], s["e2e"].to_numpy()[ok]
            if ok.sum() < 3:  # too few configurations for a slope: keep the sum, correct the mean gap
                f.slope, f.intercept = 1.0, float(np.mean(e2e - x)) if ok.any() else 0.0
                continue
            choice = self.calibration
            if choice == "auto":  # the map whose leave-one-out error on out-of-fold sums is lower
                errs = {c: _calibration_loo(c, x, xo, e2e) for c in ("cross-fitted", "measured")}
                choice = min(errs, key=errs.get)
                self.selection_.setdefault("calibration", {})[model] = {"chosen": choice, "loo_rmspe": errs}
            f.slope, f.intercept, f.log = _calibrate(choice, x, xo, e2e)

    # -- prediction -------------------------------------------------------------------
    def _feature_batch(self) -> int:
        """The batch size the layer features are computed at: the table's."""
        return int(self.settings_.get("batch") or 1)

    def artifact_summary(self) -> dict:
        """What a saved artifact's header says about this predictor beyond its parameters."""
        return {"models": sorted(self.models_), "settings": self.settings_,
                "regressors": {k: v["chosen"] for k, v in self.selection_.items() if "chosen" in v},
                "fit_seconds": round(float(self.fit_seconds_), 3),
                "slow_configs_used": int(self.slow_configs_used_)}

    def _check_fitted(self) -> None:
        try:
            check_is_fitted(self, "models_")
        except NotFittedError:
            raise HwpruneError("the predictor is not fitted", "call fit(table) first") from None

    def check_model(self, model: str) -> _ModelFit:
        """The fitted parts of ``model``; a one-line error when the predictor is not fitted or
        its table never covered ``model``."""
        self._check_fitted()
        if model not in self.models_:
            raise HwpruneError(f"the table never covered model '{model}'",
                               f"it covers {', '.join(self.models_)}; profile {model} on this device first")
        return self.models_[model]

    def check_settings(self, settings: Mapping) -> None:
        """Raise when the requested settings (batch, threads, backend...) differ from the table's."""
        for k in ("backend", "threads", "batch", "precision", "device", "input_size"):
            if k in settings and settings[k] is not None and self.settings_.get(k) != settings[k]:
                raise TableMismatch(f"the predictor's table has {k}={self.settings_.get(k)!r}, "
                                    f"requested {settings[k]!r}")

    def _layer_matrix(self, model: str, configs
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-layer predictions [N, layers], channel matrices, the extrapolation mask and
        the extras' part of the predictions."""
        tpl = self.check_model(model).template
        W = configs if isinstance(configs, np.ndarray) else tpl.width_matrix(list(configs))
        cin, cout = tpl.channels(W)
        n, L = cin.shape
        batch = self._feature_batch()
        out = np.zeros((n, L))
        extras = np.zeros((n, L))
        outside = np.zeros((n, L), dtype=bool)
        for kind in KINDS:
            cols = [j for j, s in enumerate(tpl.slots) if s.kind == kind]
            if not cols:
                continue
            if kind not in self.estimators_:
                raise HwpruneError(f"the table never covered unit kind '{kind}' (layer '{tpl.slots[cols[0]].name}')")
            F, inverse = unique_rows(tpl.features(kind, cols, batch, cin, cout))
            # one thread for the small batches that come right before a measurement (validation,
            # GCP's device check): OpenMP workers left spinning would slow it down; every core
            # for bulk prediction (a search scoring thousands of configurations)
            bulk = len(F) >= BULK_ROWS
            with threadpool_limits(None if bulk else 1), _every_core(self.estimators_[kind], bulk):
                ex = self.extras_[kind].predict(F)
                kernel = _kernel_ms(self.estimators_[kind], F, self.flop_exponent_)
            lo, hi = self.ranges_[kind]
            off = ((F < lo - 1e-9) | (F > hi + 1e-9)).any(axis=1)
            extras[:, cols] = ex[inverse].reshape(n, len(cols))
            out[:, cols] = kernel[inverse].reshape(n, len(cols)) + extras[:, cols]
            outside[:, cols] = off[inverse].reshape(n, len(cols))
        return out, cin, cout, outside, extras

    def _layer_sum(self, model: str, configs) -> np.ndarray:
        return self._layer_matrix(model, configs)[0].sum(axis=1)

    def predict(self, model: str, configs: Sequence[WidthConfig | Mapping[str, int]] | np.ndarray) -> np.ndarray:
        """End-to-end latency (ms) of each configuration, vectorised over configurations."""
        return self.check_model(model)(self._layer_sum(model, configs))

    def predict_layers(self, model: str, config: WidthConfig | Mapping[str, int]) -> tuple[float, list[LayerPrediction]]:
        f = self.check_model(model)
        per, cin, cout, outside, extras = self._layer_matrix(model, [config])
        layers = [LayerPrediction(s.name, s.kind, int(cin[0, j]), int(cout[0, j]), s.h, s.w, s.kh, s.stride,
                                  float(per[0, j]), bool(outside[0, j]), float(extras[0, j]))
                  for j, s in enumerate(f.template.slots)]
        return float(f(per.sum())), layers

    def marginal_costs(self, model: str, config: WidthConfig | Mapping[str, int],
                       step: int = 16) -> dict[str, tuple[float, float]]:
        """Per group: predicted ms saved by removing 1 channel and ``step`` channels at these widths."""
        tpl = self.check_model(model).template
        base = tpl.width_matrix([config])[0]
        rows = [base]
        for i in range(len(base)):
            for k in (1, step):
                r = base.copy()
                r[i] = max(1, r[i] - k)
                rows.append(r)
        pred = self.predict(model, np.stack(rows))
        out = {}
        for i, gid in enumerate(tpl.group_ids):
            out[gid] = (float(pred[0] - pred[1 + 2 * i]), float(pred[0] - pred[2 + 2 * i]))
        return out

    # -- persistence ------------------------------------------------------------------
    def without_modules(self) -> "LatencyPredictor":
        """A copy that predicts the same and holds no torch module: each model's template
        keeps its layers and its space's channel groups (validation, sampling, costs) but not
        the network they were read from. What :mod:`hwprune.prediction.artifact` saves."""
        self._check_fitted()
        out = copy.copy(self)
        out.models_ = {}
        for model, f in self.models_.items():
            tpl = copy.copy(f.template)
            tpl.space = copy.copy(tpl.space)
            tpl.space.model = None
            out.models_[model] = replace(f, template=tpl)
        return out

    def save(self, path: str | Path, table_path: str | Path) -> Path:
        """Save the fitted predictor as an artifact of the table at ``table_path``
        (:func:`hwprune.prediction.artifact.save_predictor`)."""
        from hwprune.prediction.artifact import save_predictor

        return save_predictor(self, path, table_path)

    @classmethod
    def load(cls, path: str | Path, table_path: str | Path | None = None) -> "LatencyPredictor":
        """Load a saved predictor without refitting; with ``table_path``, refuse one fitted on
        another table (:func:`hwprune.prediction.artifact.load_predictor`)."""
        from hwprune.prediction.artifact import load_predictor

        return load_predictor(path, table_path)


def fit_predictor(table: str | Path | LatencyTable, **params) -> LatencyPredictor:
    t = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
    return LatencyPredictor(**params).fit(t)


def cross_validate_e2e(table: LatencyTable, folds: int = 4, seed: int = 0, **params) -> pd.DataFrame:
    """End-to-end errors on held-out configurations of the table itself.

    The table's configurations are split into ``folds`` groups; each group's end-to-end
    times are predicted by a predictor fitted on the others. A cheap check before the real
    validation (which measures fresh pruned models).
    """
    items = sorted(set(table.e2e["item"]))
    rng = np.random.default_rng(seed)
    rng.shuffle(items)
    out = []
    for f in range(folds):
        test = set(items[f::folds])
        train_rows = table.rows[~table.rows["item"].isin(test)]
        pred = LatencyPredictor(**params).fit(LatencyTable(train_rows, table.meta))
        e2e = table.e2e[table.e2e["item"].isin(test)]
        for model in sorted(set(e2e["model"])):
            e = e2e[e2e["model"] == model]
            p = pred.predict(model, [json.loads(w) for w in e["widths"]])
            out += [{"model": model, "item": i, "measured_ms": m, "predicted_ms": float(v)}
                    for i, m, v in zip(e["item"], e["median_ms"], p)]
    df = pd.DataFrame(out)
    df["error"] = (df["predicted_ms"] - df["measured_ms"]) / df["measured_ms"]
    return df
