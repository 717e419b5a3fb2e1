"""Check a predictor against end-to-end measurements of real pruned models.

Random width configurations (drawn with a seed different from the table's plan, so they
are held out) are built, exported and measured end to end on the table's backend and
settings, each in a fresh session, with the models interleaved so that drift hits all of
them alike. The report gives the share of predictions within ±5% and ±10%, the RMSPE,
Spearman's rank correlation and the worst cases; a predicted-versus-measured plot goes
beside it.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from hwprune.profiling.backends import ModelArtifact, create_backend
from hwprune.errors import HwpruneError, TableMismatch
from hwprune.profiling.onnx_export import export_onnx
from hwprune.profiling.fingerprint import fingerprint
from hwprune.profiling.host_state import HostProbe
from hwprune.profiling.measure import MeasureConfig
from hwprune.prediction.predictor import LatencyPredictor
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.profiling.table import LatencyTable

VALIDATION_SEED_OFFSET = 1_000_003  # keeps validation configurations apart from any profiling plan


@dataclass
class ValidationSample:
    model: str
    widths: dict
    predicted_ms: float
    measured_ms: float  # median over fresh sessions
    session_spread: float  # max/min - 1 of the session medians
    extrapolated: bool
    sessions_ms: list = field(default_factory=list)  # the medians of the sessions that counted
    #: paired runs: the unpruned model's median timed in the same window as each session
    reference_ms: list = field(default_factory=list)
    #: paired runs: the predicted latency of the unpruned model
    predicted_reference_ms: float | None = None

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def ratios(self) -> list[float]:
        """Paired runs: each session's time over the unpruned model's time in the same window."""
        return [a / b for a, b in zip(self.sessions_ms, self.reference_ms)]

    @property
    def relative_error(self) -> float:
        """Paired runs: error of the predicted latency relative to the unpruned model's
        (``predicted / predicted unpruned``) against the median measured ratio."""
        measured = float(np.median(self.ratios))
        return (self.predicted_ms / self.predicted_reference_ms) / measured - 1


@dataclass
class ValidationResult:
    n: int
    within_5pct: float
    within_10pct: float
    rmspe: float
    spearman: float
    worst: list[dict]
    per_model: dict
    settings: dict
    device: dict
    measure_seconds: float
    #: configurations the predictor was fitted on although a gated profile marked them slow-state
    slow_configs_used: int = 0
    #: gated runs on a gated table: per model, the unpruned model's probe now against the table's
    #: (``reference_ms`` / ``table_reference_ms`` = ``factor``): how much faster or slower the host runs
    #: than when it was profiled
    drift: dict = field(default_factory=dict)
    #: the metrics again with every prediction multiplied by its model's drift factor
    drift_corrected: dict = field(default_factory=dict)
    #: measured against measured (2+ sessions per configuration): how often one session lands within
    #: 5% and 10% of the median of the configuration's other sessions, the ceiling of any predictor
    #: judged by these measurements on this machine
    repeatability: dict = field(default_factory=dict)
    #: paired runs (``paired=True``): the metrics of the latency relative to the unpruned model,
    #: predicted against measured in the same window (host drift cancels), per model, and their
    #: own repeatability
    relative: dict = field(default_factory=dict)
    samples: list[ValidationSample] = field(repr=False, default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "samples"}
        if with_samples:
            d["samples"] = [{**asdict(s), "error": s.error,
                             **({"relative_error": s.relative_error} if s.reference_ms else {})}
                            for s in self.samples]
        return d


def _metrics(samples: Sequence[ValidationSample], relative: bool = False) -> dict:
    from scipy.stats import spearmanr

    if relative:
        err = np.array([s.relative_error for s in samples])
        pred = np.array([s.predicted_ms / s.predicted_reference_ms for s in samples])
        meas = np.array([np.median(s.ratios) for s in samples])
    else:
        err = np.array([s.error for s in samples])
        pred = np.array([s.predicted_ms for s in samples])
        meas = np.array([s.measured_ms for s in samples])
    rho = float(spearmanr(pred, meas).statistic) if len(samples) > 2 else float("nan")
    return {"n": len(samples), "within_5pct": float(np.mean(np.abs(err) <= 0.05)),
            "within_10pct": float(np.mean(np.abs(err) <= 0.10)), "rmspe": float(np.sqrt(np.mean(err ** 2))),
            "spearman": rho}


def validate(table: LatencyTable, models: Sequence[str], samples: int, seed: int = 0,
             predictor: LatencyPredictor | None = None, measure: MeasureConfig | None = None,
             rounds: int = 2, progress=None, gate: float | None = None, paired: bool = False) -> ValidationResult:
    """Measure ``samples`` random configurations per model and compare with predictions.

    Every configuration is measured in ``rounds`` fresh sessions, round-robin over all
    configurations (so a slow spell of the machine hits different models in different
    rounds); the measured value is the median of its session medians. With ``gate``
    (shared hosts, see :class:`hwprune.bench.harness.GatedMeter`), a short timing of the unpruned
    model precedes every session, and only sessions whose timing was within ``gate`` of that
    model's fastest count (all of them if none did).

    With ``paired``, every session also times the unpruned model in the same window
    (:meth:`hwprune.profiling.backends.base.Backend.measure_pair`: alternating chunks on ONNX Runtime),
    and the result's ``relative`` metrics compare the predicted latency relative to the
    unpruned model's with the measured one: a neighbour that slows the host for a while slows
    both alike, so what remains is the predictor's own error. The absolute metrics are
    reported as well, from the same sessions.
    """
    if paired and gate:
        raise HwpruneError("gated and paired validation are alternatives", "use --gate or --paired, not both")
    s = table.settings
    diff = table.mismatch({}, fingerprint())
    if diff:
        raise HwpruneError(f"the table was measured on another device ({diff})",
                           "validate on the device the table describes")
    pred = predictor or LatencyPredictor().fit(table)
    for m in models:
        pred.check_model(m)
    backend = create_backend(s["backend"], threads=s.get("threads"), device=s.get("device") or "cpu",
                             measure=measure or MeasureConfig.profile())
    batch = int(s.get("batch") or 1)
    rng = random.Random(seed + VALIDATION_SEED_OFFSET)
    spaces = {m: PruningSpace.from_name(m, input_size=s.get("input_size")) for m in models}
    # interleave the models: A B A B ...
    plan: list[tuple[str, WidthConfig]] = []
    for _ in range(samples):
        for m in models:
            plan.append((m, spaces[m].sample(rng)))
    # Predict everything first, then let any worker threads of the fit go idle: nothing
    # but the runtime being measured may use the CPU during a measurement.
    predicted = []
    for m, cfg in plan:
        p, layers = pred.predict_layers(m, cfg)
        predicted.append((p, any(l.extrapolated for l in layers)))
    ref_pred = {m: float(pred.predict(m, [spaces[m].full()])[0]) for m in models} if paired else {}
    time.sleep(0.5)
    out: list[ValidationSample] = []
    t0 = time.perf_counter()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sessions: list[list] = [[] for _ in plan]
    probes: list[list] = [[] for _ in plan]
    refs: list[list] = [[] for _ in plan]
    try:
        with tempfile.TemporaryDirectory(prefix="hwprune-validate-") as d:
            arts, probe = [], HostProbe(backend, batch, d)
            for k, (m, cfg) in enumerate(plan):
                space = spaces[m]
                shape = (batch, *space.input_shape[1:])
                module = space.apply(cfg).eval()
                art = ModelArtifact(input_shape=shape, module=module, name=m)
                if backend.needs_onnx():
                    art.onnx_path = export_onnx(module, shape, Path(d) / f"v{k}.onnx")
                    art.module = None
                arts.append(art)
            total = rounds * len(plan)
            for r in range(rounds):
                for k, art in enumerate(arts):
                    if progress:
                        progress(plan[k][0], r * len(plan) + k, total)
                    if gate:
                        probes[k].append(probe(plan[k][0], spaces[plan[k][0]]))
                    if paired:
                        m = plan[k][0]
                        st, ref = backend.measure_pair(art, probe.reference(m, spaces[m]))
                        sessions[k].append(st.stats)
                        refs[k].append(ref.stats.median)
                    else:
                        sessions[k].append(backend.measure_e2e(art).stats)
    finally:
        torch.set_num_threads(threads)
    for (m, cfg), (p, extrapolated), st, pr, rf in zip(plan, predicted, sessions, probes, refs):
        if gate:
            fast = [x for x, ref in zip(st, pr) if probe.fast(m, ref, gate)]
            st = fast or st
        med = float(np.median([x.median for x in st]))
        spread = float(max(x.median for x in st) / min(x.median for x in st) - 1)
        out.append(ValidationSample(m, dict(cfg.widths), p, med, spread, extrapolated, [x.median for x in st],
                                    rf, ref_pred.get(m)))
    if progress:
        progress("", rounds * len(plan), rounds * len(plan))
    drift = (host_drift(table, plan, probes, probe, gate) if gate
             else paired_drift(table, plan, refs) if paired else {})
    return ValidationResult(
        **score(out, models, drift), settings=dict(s),
        device={k: table.meta.fingerprint.get(k) for k in ("cpu_model", "cpu_cores")},
        measure_seconds=time.perf_counter() - t0, slow_configs_used=getattr(pred, "slow_configs_used_", 0),
        drift=drift, samples=out)


def repredict(table: LatencyTable, measured: Mapping, predictor: LatencyPredictor | None = None) -> ValidationResult:
    """Score a table's predictor against the measurements of an earlier validation, without
    timing anything: ``measured`` is what :meth:`ValidationResult.to_dict` wrote with its
    samples (``hwprune validate --json``). Use it to compare predictors or tables on the same
    measurements, which no second run on a shared host can repeat. The earlier run's backend,
    batch, threads and precision must be the table's."""
    rows = measured.get("samples") if isinstance(measured, Mapping) else None
    if not rows:
        raise HwpruneError("the measurements hold no configurations",
                           "give the JSON that `hwprune validate --json` printed (it keeps every sample)")
    stored = measured.get("settings") or {}
    for k in ("backend", "threads", "batch", "precision", "device", "input_size"):  # before any fit
        if stored.get(k) is not None and table.settings.get(k) != stored[k]:
            raise TableMismatch(f"the measurements were taken with {k}={stored[k]!r}, the table has "
                                f"{k}={table.settings.get(k)!r}", "re-predict them with a table of the same settings")
    pred = predictor or LatencyPredictor().fit(table)
    models = list(dict.fromkeys(x["model"] for x in rows))
    spaces = {m: PruningSpace.from_name(m, input_size=table.settings.get("input_size")) for m in models}
    for m in models:
        pred.check_model(m)
    unpruned = {m: float(pred.predict(m, [spaces[m].full()])[0]) for m in models}
    out = []
    for x in rows:
        cfg = spaces[x["model"]].validate(WidthConfig(x["model"], x["widths"]))
        p, layers = pred.predict_layers(x["model"], cfg)
        ref = list(x.get("reference_ms") or [])
        out.append(ValidationSample(x["model"], dict(cfg.widths), p, float(x["measured_ms"]),
                                    float(x.get("session_spread", 0.0)), any(l.extrapolated for l in layers),
                                    list(x.get("sessions_ms") or []), ref, unpruned[x["model"]] if ref else None))
    return ValidationResult(
        **score(out, models, measured.get("drift")), settings=dict(measured.get("settings") or table.settings),
        device=dict(measured.get("device") or {}), measure_seconds=0.0,
        slow_configs_used=getattr(pred, "slow_configs_used_", 0), drift=dict(measured.get("drift") or {}),
        samples=out)


def score(samples: Sequence[ValidationSample], models: Sequence[str], drift: dict | None = None) -> dict:
    """Everything a validation reports about its samples (the :class:`ValidationResult` fields
    that do not describe the run): the metrics overall and per model, the worst cases, the
    metrics with predictions scaled by ``drift`` (when every model has a factor) and the
    measurements' repeatability."""
    drift = drift or {}
    corrected = [replace(x, predicted_ms=x.predicted_ms * drift[x.model]["factor"])
                 for x in samples if x.model in drift]
    worst = sorted(samples, key=lambda x: -abs(x.error))[:5]
    return {**_metrics(samples),
            "worst": [{"model": w.model, "predicted_ms": w.predicted_ms, "measured_ms": w.measured_ms,
                       "error": w.error, "extrapolated": w.extrapolated, "widths": w.widths} for w in worst],
            "per_model": {m: _metrics([x for x in samples if x.model == m]) for m in models},
            "drift_corrected": _metrics(corrected) if corrected and len(corrected) == len(samples) else {},
            "repeatability": repeatability(samples), "relative": relative_metrics(samples, models)}


def relative_metrics(samples: Sequence[ValidationSample], models: Sequence[str]) -> dict:
    """Paired runs: the metrics of the latency relative to the unpruned model, overall and per
    model, with the ratios' own repeatability (empty unless every sample is paired)."""
    if not samples or not all(x.reference_ms and x.predicted_reference_ms for x in samples):
        return {}
    return {**_metrics(samples, relative=True),
            "per_model": {m: _metrics([x for x in samples if x.model == m], relative=True) for m in models},
            "repeatability": _agreement(x.ratios for x in samples)}


def session_deviations(sessions: Iterable[Sequence[float]]) -> np.ndarray:
    """|one session / median of the same configuration's other sessions - 1|, over every session
    of every configuration that has at least two."""
    out = []
    for v in sessions:
        v = np.asarray(v, dtype=float)
        out += [abs(v[i] / np.median(np.delete(v, i)) - 1) for i in range(len(v) if len(v) >= 2 else 0)]
    return np.asarray(out)


def repeatability(samples: Sequence[ValidationSample]) -> dict:
    """Leave-one-session-out agreement of the measurements with themselves (empty with 1 session)."""
    return _agreement(x.sessions_ms for x in samples)


def _agreement(sessions: Iterable[Sequence[float]]) -> dict:
    """How often one session lands within 5% and 10% of the others (:func:`session_deviations`)."""
    e = session_deviations(sessions)
    if not len(e):
        return {}
    return {"pairs": len(e), "within_5pct": float(np.mean(e <= 0.05)), "within_10pct": float(np.mean(e <= 0.10))}


def host_drift(table: LatencyTable, plan, probes, probe: HostProbe, gate: float) -> dict[str, dict]:
    """Per model, the median fast-state probe of this run over the median probe of the table's
    fast-state configurations (gated tables only: ``state_ref_ms``). Both are timings of the same
    unpruned model with the same short protocol (:data:`hwprune.profiling.host_state.PROBE`)."""
    e2e = table.e2e
    if "state_ref_ms" not in e2e:
        return {}
    slow, out = table.slow_items(), {}
    for m in sorted({m for m, _ in plan}):
        ref = e2e[(e2e["model"] == m) & ~e2e["item"].isin(slow)]["state_ref_ms"].dropna()
        now = [x for (mm, _), pr in zip(plan, probes) if mm == m for x in pr if probe.fast(m, x, gate)]
        if len(ref) and now:
            t, n = float(np.median(ref)), float(np.median(now))
            out[m] = {"table_reference_ms": t, "reference_ms": n, "factor": n / t}
    return out


def paired_drift(table: LatencyTable, plan, refs) -> dict[str, dict]:
    """Paired runs: per model, the median of the unpruned model's timings in this run's windows over
    the table's end-to-end time of the same model (its ``full`` configuration). Above 1 the host runs
    slower than when it was profiled (see :mod:`hwprune.profiling.table_check`). The pair alternates the two
    models in chunks, which costs the unpruned model a little time of its own (about 1-2% here)."""
    from hwprune.profiling.table_check import table_reference_ms

    out = {}
    for m in sorted({m for m, _ in plan}):
        now = [x for (mm, _), rf in zip(plan, refs) if mm == m for x in rf]
        try:
            t = table_reference_ms(table, m)
        except HwpruneError:
            continue
        if now:
            n = float(np.median(now))
            out[m] = {"table_reference_ms": t, "reference_ms": n, "factor": n / t}
    return out


def plot_validation(result: ValidationResult, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    models = sorted({s.model for s in result.samples})
    for m in models:
        xs = [s.measured_ms for s in result.samples if s.model == m]
        ys = [s.predicted_ms for s in result.samples if s.model == m]
        ax.scatter(xs, ys, s=12, alpha=0.7, label=m, zorder=3)  # above the bands, drawn after
    lo = min(min(s.measured_ms, s.predicted_ms) for s in result.samples) * 0.9
    hi = max(max(s.measured_ms, s.predicted_ms) for s in result.samples) * 1.1
    xs = np.geomspace(lo, hi, 50)
    ax.plot(xs, xs, "k-", lw=0.8)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.85", label="±10%")
    ax.fill_between(xs, xs * 0.95, xs * 1.05, color="0.7", label="±5%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title or f"n={result.n}: {100 * result.within_5pct:.0f}% within ±5%, "
                          f"{100 * result.within_10pct:.0f}% within ±10%", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
