"""A fitted predictor carried to another device by a few end-to-end measurements.

:class:`CalibratedPredictor` keeps everything its source predictor learnt from a table (the
kernel and extras regressors, the models' templates and end-to-end maps) and predicts the
source's decomposition (:mod:`hwprune.prediction.decomposition`) corrected per model by a
:class:`~hwprune.prediction.correction.Correction` fitted on the new device. It is a
:class:`~hwprune.prediction.predictor.LatencyPredictor`: it saves and loads through
:mod:`hwprune.prediction.artifact`, predicts through the same methods, and its ``settings_``
and ``fingerprint_`` are those of the device it was calibrated on (the backend, threads and
batch its predictions hold for), so that validation and pruning measure there. The layer
features stay at the source's batch size (``source_settings_``): they are what the source's
regressors were fitted on.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from hwprune.errors import HwpruneError
from hwprune.prediction.correction import Correction
from hwprune.prediction.decomposition import PARTS, decompose, layer_parts
from hwprune.prediction.predictor import LatencyPredictor, LayerPrediction
from hwprune.profiling.fingerprint import device_identity
from hwprune.pruning.space import WidthConfig


class CalibratedPredictor(LatencyPredictor):
    """A source predictor's predictions corrected for the device it was calibrated on.

    Built by :meth:`derive` (``hwprune calibrate``), never fitted on a table. Fitted
    attributes beyond the source's: ``corrections_`` (per model, the
    :class:`~hwprune.prediction.correction.Correction`), ``source_settings_`` (the source
    table's settings), ``source_`` (what the source was: its table's name and SHA-256, its
    settings, its device and parameters) and ``calibration_`` (per model: the measured
    configurations and times, the number of them, the leave-one-out error, and when and how
    long the calibration took).
    """

    @classmethod
    def derive(cls, source: LatencyPredictor, corrections: Mapping[str, Correction], settings: Mapping,
               fingerprint: Mapping, source_info: Mapping, record: Mapping) -> "CalibratedPredictor":
        """The calibrated predictor of ``source`` for the models of ``corrections``, on the
        device of ``fingerprint`` with ``settings`` (backend, threads, batch...)."""
        if isinstance(source, CalibratedPredictor):
            raise HwpruneError("the source predictor is itself calibrated",
                               "calibrate the predictor fitted on a table (hwprune fit), not a calibrated one")
        for m in corrections:
            source.check_model(m)
        out = cls(**source.get_params())
        for k, v in vars(source).items():
            if k.endswith("_") and not k.startswith("_"):
                setattr(out, k, v)
        out.models_ = {m: source.models_[m] for m in corrections}
        out.source_settings_ = dict(source.settings_)
        out.settings_ = dict(settings)
        out.fingerprint_ = dict(fingerprint)
        out.corrections_ = dict(corrections)
        out.source_ = dict(source_info)
        out.calibration_ = dict(record)
        return out

    def fit(self, table) -> "CalibratedPredictor":
        raise HwpruneError("a calibrated predictor is not fitted on a table",
                           "fit the source with `hwprune fit`, then calibrate it with `hwprune calibrate`")

    def _check_fitted(self) -> None:
        try:
            check_is_fitted(self, ["models_", "corrections_"])
        except NotFittedError:
            raise HwpruneError("the calibrated predictor is incomplete", "calibrate it again") from None

    def _feature_batch(self) -> int:
        return int(self.source_settings_.get("batch") or 1)

    def check_model(self, model: str):
        self._check_fitted()
        if model not in self.corrections_:
            raise HwpruneError(f"the predictor was calibrated for {', '.join(sorted(self.corrections_))}, "
                               f"not for model '{model}'", f"calibrate it for {model}: hwprune calibrate --model {model}")
        return super().check_model(model)

    # -- prediction -------------------------------------------------------------------
    def predict(self, model: str, configs: Sequence[WidthConfig | Mapping[str, int]] | np.ndarray) -> np.ndarray:
        """End-to-end latency (ms) on the calibrated device, vectorised over configurations."""
        self.check_model(model)
        return self.corrections_[model].apply(decompose(self, model, configs).design())

    def source_predict(self, model: str, configs) -> np.ndarray:
        """What the source predictor predicts (ms, on the source's device and settings)."""
        self.check_model(model)
        return decompose(self, model, configs).predicted_ms

    def predict_layers(self, model: str, config: WidthConfig | Mapping[str, int]) -> tuple[float, list[LayerPrediction]]:
        """The corrected end-to-end latency and each layer's share of it: its kernel and extras
        scaled by their parts' factors and the source's end-to-end map, plus the time of its
        nodes (the kernel's own node in ``predicted_ms``, the others in ``extra_ms``), so that
        the layers add up to the total."""
        f = self.check_model(model)
        x = self.corrections_[model].vector()
        lp = layer_parts(self, model, [config])
        raw = float(lp.kernel_ms.sum() + lp.extras_ms.sum())
        scale = float(f(raw)) / max(raw, 1e-12)
        o = x[-1]
        extra = (lp.extras_ms[0] * x[PARTS.index("extras")] * scale) + o * (lp.nodes[0] - 1)
        total = lp.kernel_ms[0] * x[lp.part[0]] * scale + o + extra
        layers = [LayerPrediction(s.name, s.kind, int(lp.cin[0, j]), int(lp.cout[0, j]), s.h, s.w, s.kh, s.stride,
                                  float(total[j]), bool(lp.outside[0, j]), float(extra[j]))
                  for j, s in enumerate(f.template.slots)]
        return float(total.sum()), layers

    # -- description ------------------------------------------------------------------
    def artifact_summary(self) -> dict:
        out = super().artifact_summary()
        out["calibration"] = {
            "source": self.source_, "device": device_identity(self.fingerprint_),
            "models": {m: {"samples": c.samples, "loo_rmspe": c.loo_rmspe, "factors": c.factors,
                           "overhead_ms_per_node": c.overhead_ms_per_node, "ratio": c.ratio,
                           "shrinkage": c.shrinkage} for m, c in self.corrections_.items()}}
        return out
