"""What a latency predictor sees of a layer: its feature row, and what its kernel regressor learns.

Features come from the layer's shape: channels, kernel, stride, spatial size, batch, and
derived quantities (FLOPs, bytes moved, channels rounded up to the SIMD block, channel
counts modulo 4/8/16/32) so that latency staircases can be learnt. Modulo 4 matters on ONNX
Runtime's x86 CPU provider: a convolution with 16 or more input channels that are not a
multiple of 4 (depthwise: any channel count not a multiple of 4) stays in NCHW (im2col +
GEMM, or the plain depthwise kernel) instead of the blocked NCHWc kernels, with reorders
around it (:func:`unblocked`). In the 1-thread mobilenet_v2 table these NCHW convolutions
took 44% of the model's time.

This module needs only numpy: :class:`~hwprune.profiling.layer_shapes.ModelTemplate`
computes the feature rows of whole models with it.
"""

from __future__ import annotations

import numpy as np

FEATURE_NAMES = ["batch", "cin", "cout", "kh", "stride", "h", "oh", "log_flops", "log_padded_flops", "log_in_bytes",
                 "log_out_bytes", "log_w_bytes", "cin_mod8", "cout_mod8", "cin_mod16", "cout_mod16", "cin_mod32",
                 "cout_mod32", "cin16", "cout16", "cin_small", "prod_cin_mod16", "prod_cin_small", "residual_out",
                 "cin_mod4", "cout_mod4", "prod_cin_mod4", "prod_unblocked", "peer_unblocked",
                 "unblocked", "log_kernel_flops"]
#: Version of what a fitted predictor means: the features above, the targets, the template's
#: layer context and the fitted attributes. Change it with any of them: saved predictors
#: (:mod:`hwprune.prediction.artifact`) of another version are refused, and cached ones refitted.
FEATURE_VERSION = 2

#: Channels of ONNX Runtime's NCHWc block on AVX-512 hosts (8 on AVX2 ones).
NCHWC_BLOCK = 16


def unblocked(depthwise, cin, groups=1, cout=None):
    """Whether a convolution falls back from the blocked (NCHWc) kernels to plain NCHW.

    ONNX Runtime's x86 CPU provider runs a convolution with 16 or more input channels that
    are not a multiple of 4, and a depthwise one whose channels are not a multiple of 4, in
    NCHW (im2col + GEMM, or the plain depthwise kernel) with reorders around it (read from
    the tables' ``layout`` column). A grouped convolution (``groups`` > 1, not depthwise)
    runs blocked only when its input and its output (``cout``, default ``cin``) channels
    per conv group are multiples of :data:`NCHWC_BLOCK` (read from the optimised graphs of
    an AVX-512 host). Other backends simply find the features built on this uninformative.
    """
    cin = np.asarray(cin)
    dw = np.asarray(depthwise, dtype=bool)
    dense = (cin % 4 != 0) & (dw | (cin >= 16))
    groups = np.asarray(groups)
    if not (groups > 1).any():
        return dense
    cout = cin if cout is None else np.asarray(cout)
    g = np.maximum(groups, 1)
    grouped = ((cin // g) % NCHWC_BLOCK != 0) | ((cout // g) % NCHWC_BLOCK != 0)
    return np.where((groups > 1) & ~dw, grouped, dense)


def _ceil(a: np.ndarray, m: int) -> np.ndarray:
    return (a + m - 1) // m * m


def layer_features(kind: str, batch, cin, cout, kh, kw, stride, h, w, prod_cin=0, residual=0, prod_unblocked=0,
                   peer_unblocked=0, groups=1) -> np.ndarray:
    """Feature matrix of layers (all arguments broadcast to 1-D arrays).

    ``prod_cin`` is the input channel count of the layer that produces this layer's input
    (0 for the network input): it decides the producer's kernel and so the layout this
    layer receives. ``residual`` is 1 for layers whose output is summed with a skip
    connection (the runtime may fuse that Add into them). ``prod_unblocked`` and
    ``peer_unblocked`` count the layers producing this layer's input, and the other layers
    writing its output's channel group, that run outside the blocked layout
    (:meth:`ModelTemplate.layout_context`): they decide the reorders and unfused Adds
    around this layer. ``groups`` is the number of conv groups of a grouped convolution
    (1 for dense layers; depthwise ones are their own kind): it enters through the FLOPs,
    the weight bytes and the blocked-layout rule, so dense layers' features do not change.
    """
    b, cin, cout, kh, kw, s, h, w, pc, res, pu, qu, g = (
        np.atleast_1d(np.asarray(a, dtype=np.float64))
        for a in (batch, cin, cout, kh, kw, stride, h, w, prod_cin, residual, prod_unblocked, peer_unblocked, groups))
    b, cin, cout, kh, kw, s, h, w, pc, res, pu, qu, g = np.broadcast_arrays(b, cin, cout, kh, kw, s, h, w, pc, res,
                                                                             pu, qu, g)
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    cin_per_group = np.ones_like(cin) if kind == "dwconv" else cin / g
    flops = b * oh * ow * cout * cin_per_group * kh * kw
    c16i, c16o = _ceil(cin, 16), _ceil(cout, 16)
    padded = b * oh * ow * c16o * (np.ones_like(cin) if kind == "dwconv" else _ceil(cin_per_group, 16)) * kh * kw
    # blocked kernels compute on channels padded to the SIMD block; the NCHW fallback does not
    nb = (unblocked(kind == "dwconv", cin, g, cout) if kind != "linear"
          else np.zeros_like(cin, dtype=bool)).astype(np.float64)
    in_bytes = 4 * b * cin * h * w
    out_bytes = 4 * b * cout * oh * ow
    w_bytes = 4 * cout * cin_per_group * kh * kw
    # the last column is log kernel FLOPs (KERNEL_FLOPS_COL): the kernel target is taken per FLOP
    cols = [b, cin, cout, kh, s, h, oh, np.log(flops), np.log(padded), np.log(in_bytes), np.log(out_bytes),
            np.log(w_bytes), cin % 8, cout % 8, cin % 16, cout % 16, cin % 32, cout % 32, c16i, c16o,
            (cin < 16).astype(np.float64), pc % 16, (pc < 16).astype(np.float64), res, cin % 4, cout % 4, pc % 4,
            pu, qu, nb, np.log(np.where(nb > 0, flops, padded))]
    return np.stack(cols, axis=1)


#: The kernel regressors learn log(time per kernel FLOP), not log(time) (the default of
#: ``LatencyPredictor(flop_exponent=...)``; 0 gives back the log-time target): a tree predicts a
#: constant beyond the table's range, and on this target the constant is a cost per FLOP,
#: so a layer smaller than any the table holds is predicted smaller too instead of at the
#: smallest table layer's time (mobilenet_v2's early depthwise layers, pruned below the
#: table's range, were predicted 1.5-2.7x too slow). Chosen on table cross-validation:
#: within ±5% 72.9% -> 76.2% (batch 1), 74.4% -> 75.6% (batch 8), 55.0% -> 62.5% (held-out
#: families); half the FLOP exponent scored between the two.
FLOP_EXPONENT = 1.0
KERNEL_FLOPS_COL = -1  # log kernel FLOPs in layer_features


def _kernel_target(X: np.ndarray, y: np.ndarray, exponent: float) -> np.ndarray:
    """What the kernel regressors learn from feature rows ``X`` and kernel times ``y`` (ms):
    log(time / kernel FLOPs ** exponent)."""
    return np.log(y) - exponent * X[:, KERNEL_FLOPS_COL]


def _kernel_ms(est, X: np.ndarray, exponent: float) -> np.ndarray:
    """Kernel times (ms) from a regressor fitted on :func:`_kernel_target` with ``exponent``."""
    return np.exp(est.predict(X) + exponent * X[:, KERNEL_FLOPS_COL])
