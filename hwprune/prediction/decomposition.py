"""A fitted predictor's end-to-end prediction, split into the parts devices scale differently.

Devices differ in more than one speed factor: one runs dense convolutions relatively faster,
another depthwise ones; layout reorders and unfused element-wise nodes cost little on one
runtime and much on another; per-node overheads (an eager framework's Python dispatch, a GPU's
launch) add a time per executed node that no kernel time shows. A fitted predictor already
knows, for every configuration, how much of its time is which:

* the kernels of dense convolutions (linear layers counted with them) and of depthwise ones,
  each split by whether the layer runs in the blocked (NCHWc) layout or falls back to plain
  NCHW (:func:`hwprune.prediction.features.unblocked`);
* the extras: reorders, unfused Adds and poolings around the layers;
* the executed nodes: one per layer, plus one per layer that runs unblocked or borders an
  unblocked layer (the reorder or unfused Add it then pays).

:func:`decompose` scales the parts by the predictor's own end-to-end map (summed layer times to
end-to-end time), so that they add up to its end-to-end prediction. A device correction
(:mod:`hwprune.prediction.correction`) is a non-negative scale factor per part plus a time per
node; a single factor for every part and no node time is a plain ratio of the source's
predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the parts of :class:`Decomposition`, in column order
PARTS = ("conv", "conv_nchw", "dwconv", "dwconv_nchw", "extras")


@dataclass
class Decomposition:
    """Per configuration: the source's end-to-end prediction split into :data:`PARTS`."""

    #: [N, len(PARTS)] milliseconds, each row summing to ``predicted_ms``
    parts: np.ndarray
    #: [N] executed nodes (layers, plus the reorders and unfused Adds of unblocked layouts)
    nodes: np.ndarray
    #: [N] the source's end-to-end prediction (ms)
    predicted_ms: np.ndarray
    #: [N] the source's map from summed layer times to end-to-end time, as a factor (e2e / sum)
    scale: np.ndarray

    def design(self) -> np.ndarray:
        """[N, len(PARTS) + 1]: the parts, then the node count (what a correction multiplies)."""
        return np.column_stack([self.parts, self.nodes])


@dataclass
class LayerParts:
    """Per layer of every configuration ([N, layers]): which part its kernel belongs to, its
    kernel and extras times (raw, before the end-to-end map) and its node count."""

    part: np.ndarray  # index into PARTS of the layer's kernel
    kernel_ms: np.ndarray
    extras_ms: np.ndarray
    nodes: np.ndarray
    cin: np.ndarray
    cout: np.ndarray
    outside: np.ndarray  # the layer's features lie outside the table's range


def layer_parts(pred, model: str, configs) -> LayerParts:
    """The per-layer split of ``pred``'s prediction of ``configs`` (see :class:`LayerParts`)."""
    tpl = pred.check_model(model).template
    per, cin, cout, outside, extras = pred._layer_matrix(model, configs)
    nb = tpl.unblocked(cin, cout)
    prod, peer = tpl.layout_context(cin, cout=cout)
    dw = np.array([s.kind == "dwconv" for s in tpl.slots])[None, :]
    part = np.where(dw, 2, 0) + nb.astype(np.int64)
    nodes = 1 + (nb | (prod > 0) | (peer > 0)).astype(np.int64)
    return LayerParts(part, per - extras, extras, nodes, cin, cout, outside)


def decompose(pred, model: str, configs) -> Decomposition:
    """Split ``pred``'s end-to-end predictions of ``configs`` of ``model`` into :data:`PARTS`.

    ``pred`` is a fitted :class:`~hwprune.prediction.predictor.LatencyPredictor`; ``configs``
    width configurations or a width matrix, as for its ``predict``."""
    lp = layer_parts(pred, model, configs)
    n = lp.kernel_ms.shape[0]
    raw = np.zeros((n, len(PARTS)))
    for k in range(len(PARTS) - 1):
        raw[:, k] = np.where(lp.part == k, lp.kernel_ms, 0.0).sum(axis=1)
    raw[:, -1] = lp.extras_ms.sum(axis=1)
    total = raw.sum(axis=1)
    predicted = np.asarray(pred.check_model(model)(total), dtype=np.float64)
    scale = predicted / np.maximum(total, 1e-12)
    return Decomposition(raw * scale[:, None], lp.nodes.sum(axis=1).astype(np.float64), predicted, scale)
