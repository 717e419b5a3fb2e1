"""Check a predictor against end-to-end measurements of real pruned models.

Random width configurations (drawn with a seed different from the table's plan, so they
are held out) are built, exported and measured end to end on the table's backend and
settings, each in a fresh session, with the models interleaved so that drift hits all of
them alike. The report gives the share of predictions within ±5% and ±10%, the RMSPE,
Spearman's rank correlation and the worst cases; a predicted-versus-measured plot goes
beside it.

On a shared host a prediction can miss for two reasons: the predictor is wrong, or the
host moved between the table and the measurement (or between one session and the next).
The report keeps them apart:

* the *ceiling*: measured against measured, each session against the median of the same
  configuration's other sessions (needs 2+ rounds): no predictor judged by these
  measurements can agree with them more often than they agree with themselves;
* the *gap* to a perfect score, split into the share the host explains (what the ceiling
  already loses) and the share the predictor explains (the rest), at ±5% and ±10%;
* with the default anchoring, every session is tied to the unpruned model timed in the same
  window (paired, or probes before and after it; gated runs use the gate's probe before it),
  and the *normalised* scores compare the
  prediction with the measurement scaled to the table's host state (table reference / window
  reference, the normalisation anchored tables apply to their rows);
* a one-line statement when the ceiling is below the claim being checked (``claim`` within
  ±10%): the host is then too noisy for that claim, whatever the predictor.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from hwprune.profiling.backends import ModelArtifact, backend_from_settings
from hwprune.errors import HwpruneError, TableMismatch
from hwprune.profiling.onnx_export import export_onnx
from hwprune.profiling.fingerprint import fingerprint
from hwprune.profiling.host_state import HostProbe
from hwprune.profiling.measure import MeasureConfig
from hwprune.profiling.table_check import table_measure_config
from hwprune.prediction.predictor import LatencyPredictor
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.profiling.table import LatencyTable

VALIDATION_SEED_OFFSET = 1_000_003  # keeps validation configurations apart from any profiling plan
#: The claim a validation checks unless told otherwise: this share of predictions within ±10%.
DEFAULT_CLAIM = 0.95


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
    #: anchored runs: per session, the unpruned model timed in its window (paired, or probes around it)
    window_ref_ms: list = field(default_factory=list)
    #: anchored runs: the table's reference of this model, the host state its rows describe
    table_reference_ms: float | None = None

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def normalised_sessions(self) -> list[float]:
        """Anchored runs: each session scaled to the table's host state (table reference / window reference)."""
        if not self.table_reference_ms or len(self.window_ref_ms) != len(self.sessions_ms):
            return []
        return [x * self.table_reference_ms / w for x, w in zip(self.sessions_ms, self.window_ref_ms)]

    @property
    def normalised_ms(self) -> float:
        return float(np.median(self.normalised_sessions))

    @property
    def normalised_error(self) -> float:
        return self.predicted_ms / self.normalised_ms - 1

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
    #: anchored runs: the metrics against the measurements normalised to the table's host state, per
    #: model, and their own repeatability
    normalised: dict = field(default_factory=dict)
    #: per scored view (absolute, normalised, relative): the predictor's share within ±5%/±10%, the
    #: ceiling's, the gap's split between host and predictor; ``verdict``: one line when the host is too
    #: noisy for the claim, else None
    ceiling: dict = field(default_factory=dict)
    samples: list[ValidationSample] = field(repr=False, default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "samples"}
        if with_samples:
            d["samples"] = [{**asdict(s), "error": s.error,
                             **({"relative_error": s.relative_error} if s.reference_ms else {}),
                             **({"normalised_error": s.normalised_error} if s.normalised_sessions else {})}
                            for s in self.samples]
        return d


def _metrics(samples: Sequence[ValidationSample], relative: bool = False, normalised: bool = False) -> dict:
    if relative:
        pred = np.array([s.predicted_ms / s.predicted_reference_ms for s in samples])
        meas = np.array([np.median(s.ratios) for s in samples])
    elif normalised:
        pred = np.array([s.predicted_ms for s in samples])
        meas = np.array([s.normalised_ms for s in samples])
    else:
        pred = np.array([s.predicted_ms for s in samples])
        meas = np.array([s.measured_ms for s in samples])
    return metrics_of(pred, meas)


def metrics_of(pred: np.ndarray, meas: np.ndarray) -> dict:
    """The share of ``pred`` within ±5% and ±10% of ``meas``, the RMSPE and Spearman's rho."""
    from scipy.stats import spearmanr

    err = pred / meas - 1
    ranked = len(pred) > 2 and np.ptp(pred) > 0 and np.ptp(meas) > 0  # a constant side has no ranks
    rho = float(spearmanr(pred, meas).statistic) if ranked else np.nan  # one nan object: results compare equal
    return {"n": len(pred), "within_5pct": float(np.mean(np.abs(err) <= 0.05)),
            "within_10pct": float(np.mean(np.abs(err) <= 0.10)), "rmspe": float(np.sqrt(np.mean(err ** 2))),
            "spearman": rho}


def validate(table: LatencyTable, models: Sequence[str], samples: int, seed: int = 0,
             predictor: LatencyPredictor | None = None, measure: MeasureConfig | None = None,
             rounds: int = 2, progress=None, gate: float | None = None, paired: bool = False,
             anchor: bool = True, claim: float = DEFAULT_CLAIM) -> ValidationResult:
    """Measure ``samples`` random configurations per model and compare with predictions.

    Every configuration is measured in ``rounds`` fresh sessions, round-robin over all
    configurations (so a slow spell of the machine hits different models in different
    rounds); the measured value is the median of its session values (each summarised with the
    table's estimator). With ``gate`` (shared hosts, see :class:`hwprune.bench.harness.GatedMeter`),
    a short timing of the unpruned model precedes every session, and only sessions whose timing
    was within ``gate`` of that model's fastest count (all of them if none did).

    With ``paired``, every session also times the unpruned model in the same window
    (:meth:`hwprune.profiling.backends.base.Backend.measure_pair`: alternating chunks on ONNX Runtime),
    and the result's ``relative`` metrics compare the predicted latency relative to the
    unpruned model's with the measured one: a neighbour that slows the host for a while slows
    both alike, so what remains is the predictor's own error. The absolute metrics are
    reported as well, from the same sessions.

    With ``anchor`` (the default), every session's window reference (the paired timing, else
    probes of the unpruned model before and after the session) scales it to the table's host
    state for the ``normalised`` metrics. ``claim`` is the share within ±10% the report checks
    the ceiling against (see the module's docstring).
    """
    pred = _checked_predictor(table, models, predictor, gate, paired, claim)
    s = table.settings
    backend = backend_from_settings(s, measure or table_measure_config(table))
    spaces = {m: PruningSpace.from_name(m, input_size=s.get("input_size")) for m in models}
    plan = _plan(models, spaces, samples, seed)
    # Predict everything first, then let any worker threads of the fit go idle: nothing
    # but the runtime being measured may use the CPU during a measurement.
    predicted = [(p, any(l.extrapolated for l in layers)) for p, layers in (pred.predict_layers(m, c) for m, c in plan)]
    ref_pred = {m: float(pred.predict(m, [spaces[m].full()])[0]) for m in models} if paired else {}
    time.sleep(0.5)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hwprune-validate-") as d:
        probe = HostProbe(backend, int(s.get("batch") or 1), d)
        runs = _Runs(len(plan))
        _measure_rounds(backend, probe, plan, spaces, Path(d), rounds, runs, gate, paired, anchor, progress)
    table_refs = {m: table_reference(table, m) for m in models} if anchor else {}
    out = [runs.sample(k, m, cfg, p, x, probe, gate, ref_pred.get(m), table_refs.get(m))
           for k, ((m, cfg), (p, x)) in enumerate(zip(plan, predicted))]
    if progress:
        progress("", rounds * len(plan), rounds * len(plan))
    drift = (host_drift(table, plan, runs.probes, probe, gate) if gate
             else paired_drift(table, plan, runs.refs) if paired else {})
    return ValidationResult(
        **score(out, models, drift, claim), settings=dict(s),
        device={k: table.meta.fingerprint.get(k) for k in ("cpu_model", "cpu_cores")},
        measure_seconds=time.perf_counter() - t0, slow_configs_used=getattr(pred, "slow_configs_used_", 0),
        drift=drift, samples=out)


def _checked_predictor(table: LatencyTable, models: Sequence[str], predictor: LatencyPredictor | None,
                       gate: float | None, paired: bool, claim: float) -> LatencyPredictor:
    """Refuse a request that cannot be validated here; the predictor (fitted on ``table`` when none is given)."""
    if paired and gate:
        raise HwpruneError("gated and paired validation are alternatives", "use --gate or --paired, not both")
    if not 0 < claim <= 1:
        raise HwpruneError(f"the claim must be a share in (0, 1], got {claim}")
    diff = table.mismatch({}, fingerprint())
    if diff:
        raise HwpruneError(f"the table was measured on another device ({diff})",
                           "validate on the device the table describes")
    pred = predictor or LatencyPredictor().fit(table)
    for m in models:
        pred.check_model(m)
    return pred


def _plan(models: Sequence[str], spaces: dict, samples: int, seed: int) -> list[tuple[str, WidthConfig]]:
    """``samples`` random configurations per model, the models interleaved: A B A B ..."""
    rng = random.Random(seed + VALIDATION_SEED_OFFSET)
    return [(m, spaces[m].sample(rng)) for _ in range(samples) for m in models]


class _Runs:
    """Per configuration of a validation plan, what its sessions measured."""

    def __init__(self, n: int):
        self.sessions: list[list] = [[] for _ in range(n)]  # Stats of each session
        self.probes: list[list] = [[] for _ in range(n)]  # gated: the probe before each session
        self.refs: list[list] = [[] for _ in range(n)]  # paired: the reference's value in each session
        self.windows: list[list] = [[] for _ in range(n)]  # anchored: each session's window reference

    def sample(self, k: int, model: str, cfg: WidthConfig, predicted: float, extrapolated: bool, probe: HostProbe,
               gate: float | None, predicted_ref: float | None, table_ref: float | None) -> ValidationSample:
        """The configuration's :class:`ValidationSample`; gated, only its fast-state sessions count."""
        n = len(self.sessions[k])
        keep = list(range(n))
        if gate:
            keep = [i for i in keep if probe.fast(model, self.probes[k][i], gate)] or keep
        values = [self.sessions[k][i].value for i in keep]

        def pick(v: list) -> list:  # the kept sessions' entries of a per-session list
            return [v[i] for i in keep] if len(v) == n else list(v)

        return ValidationSample(model, dict(cfg.widths), predicted, float(np.median(values)),
                                float(max(values) / min(values) - 1), extrapolated, values, pick(self.refs[k]),
                                predicted_ref, pick(self.windows[k]), table_ref)


def _measure_rounds(backend, probe: HostProbe, plan, spaces: dict, d: Path, rounds: int, runs: _Runs,
                    gate: float | None, paired: bool, anchor: bool, progress) -> None:
    """``rounds`` fresh sessions of every configuration, round-robin, with what each mode times beside them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        arts = []
        for k, (m, cfg) in enumerate(plan):
            shape = (probe.batch, *spaces[m].input_shape[1:])
            module = spaces[m].apply(cfg).eval()
            art = ModelArtifact(input_shape=shape, module=module, name=m)
            if backend.needs_onnx():
                art.onnx_path, art.module = export_onnx(module, shape, d / f"v{k}.onnx"), None
            arts.append(art)
        for r in range(rounds):
            for k, art in enumerate(arts):
                m = plan[k][0]
                if progress:
                    progress(m, r * len(plan) + k, rounds * len(plan))
                _session(backend, probe, art, m, spaces[m], runs, k, gate, paired, anchor)
    finally:
        torch.set_num_threads(threads)


def _session(backend, probe: HostProbe, art: ModelArtifact, m: str, space: PruningSpace, runs: _Runs, k: int,
             gate: float | None, paired: bool, anchor: bool) -> None:
    """One fresh session of configuration ``k``: paired, beside the reference (its window reference);
    gated, after a probe (which anchors it too); anchored otherwise, between two probes."""
    if paired:
        st, ref = backend.measure_pair(art, probe.reference(m, space))
        runs.sessions[k].append(st.stats)
        runs.refs[k].append(ref.value_ms)
        window = ref.value_ms
    elif gate:
        window = probe(m, space)
        runs.probes[k].append(window)
        runs.sessions[k].append(backend.measure_e2e(art).stats)
    else:
        before = probe(m, space) if anchor else None
        runs.sessions[k].append(backend.measure_e2e(art).stats)
        window = 0.5 * (before + probe(m, space)) if anchor else None
    if anchor:
        runs.windows[k].append(window)


def table_reference(table: LatencyTable, model: str) -> float | None:
    """The reference the table's rows describe for ``model``: an anchored table's fast-state reference,
    else its end-to-end time of the unpruned model (None when it has neither)."""
    from hwprune.profiling.table_check import table_reference_ms

    refs = (table.meta.noise or {}).get("reference_ms") or {}
    if model in refs:
        return float(refs[model])
    try:
        return table_reference_ms(table, model)
    except HwpruneError:
        return None


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
                                    list(x.get("sessions_ms") or []), ref, unpruned[x["model"]] if ref else None,
                                    list(x.get("window_ref_ms") or []), x.get("table_reference_ms")))
    claim = float((measured.get("ceiling") or {}).get("claim") or DEFAULT_CLAIM)
    return ValidationResult(
        **score(out, models, measured.get("drift"), claim), settings=dict(measured.get("settings") or table.settings),
        device=dict(measured.get("device") or {}), measure_seconds=0.0,
        slow_configs_used=getattr(pred, "slow_configs_used_", 0), drift=dict(measured.get("drift") or {}),
        samples=out)


def score(samples: Sequence[ValidationSample], models: Sequence[str], drift: dict | None = None,
          claim: float = DEFAULT_CLAIM) -> dict:
    """Everything a validation reports about its samples (the :class:`ValidationResult` fields
    that do not describe the run): the metrics overall and per model, the worst cases, the
    metrics with predictions scaled by ``drift`` (when every model has a factor), the
    measurements' repeatability, the normalised and relative metrics where the samples allow
    them, and the ceiling with the gap's split (:func:`ceiling_report`)."""
    drift = drift or {}
    corrected = [replace(x, predicted_ms=x.predicted_ms * drift[x.model]["factor"])
                 for x in samples if x.model in drift]
    worst = sorted(samples, key=lambda x: -abs(x.error))[:5]
    return {**_metrics(samples),
            "worst": [{"model": w.model, "predicted_ms": w.predicted_ms, "measured_ms": w.measured_ms,
                       "error": w.error, "extrapolated": w.extrapolated, "widths": w.widths} for w in worst],
            "per_model": {m: _metrics([x for x in samples if x.model == m]) for m in models},
            "drift_corrected": _metrics(corrected) if corrected and len(corrected) == len(samples) else {},
            **_views(samples, models, claim)}


def _views(samples: Sequence[ValidationSample], models: Sequence[str], claim: float) -> dict:
    rep, rel, norm = repeatability(samples), relative_metrics(samples, models), normalised_metrics(samples, models)
    views = {"absolute": (_metrics(samples), rep)} if samples else {}
    if norm:
        views["normalised"] = (norm, norm.get("repeatability", {}))
    if rel:
        views["relative"] = (rel, rel.get("repeatability", {}))
    return {"repeatability": rep, "relative": rel, "normalised": norm, "ceiling": ceiling_report(views, claim)}


def normalised_metrics(samples: Sequence[ValidationSample], models: Sequence[str]) -> dict:
    """Anchored runs: the metrics against the measurements scaled to the table's host state, overall
    and per model, with their own repeatability (empty unless every sample is anchored)."""
    if not samples or not all(x.normalised_sessions for x in samples):
        return {}
    return {**_metrics(samples, normalised=True),
            "per_model": {m: _metrics([x for x in samples if x.model == m], normalised=True) for m in models},
            "repeatability": _agreement(x.normalised_sessions for x in samples)}


def gap_split(within: float, ceiling: float) -> dict:
    """Of the share of predictions outside a band (the gap, ``1 - within``), the part the host explains
    (what the measurements lose against themselves, ``1 - ceiling``) and the part the predictor explains
    (the rest); None for both when there is no gap."""
    gap = 1.0 - within
    if gap <= 1e-12:
        return {"gap": 0.0, "host_share": None, "predictor_share": None}
    host = min(1.0, max(0.0, (1.0 - ceiling) / gap))
    return {"gap": gap, "host_share": host, "predictor_share": 1.0 - host}


def ceiling_report(views: Mapping[str, tuple[dict, dict]], claim: float = DEFAULT_CLAIM) -> dict:
    """Per view (``name -> (metrics, repeatability)``): the predictor's share within ±5%/±10%, the
    ceiling's, and the gap's split (:func:`gap_split`); ``verdict`` is one line naming the view whose
    ceiling falls short of ``claim`` within ±10% (the host is too noisy for the claim), else None."""
    out: dict = {"claim": claim, "views": {}, "verdict": None}
    for name, (met, rep) in views.items():
        if not rep:
            continue
        out["views"][name] = {
            f"within_{b}pct": {"predictor": met[f"within_{b}pct"], "ceiling": rep[f"within_{b}pct"],
                               **gap_split(met[f"within_{b}pct"], rep[f"within_{b}pct"])} for b in (5, 10)}
    noisy = [(n, v["within_10pct"]["ceiling"]) for n, v in out["views"].items() if v["within_10pct"]["ceiling"] < claim]
    if noisy and len(noisy) == len(out["views"]):
        name, c = max(noisy, key=lambda x: x[1])
        out["verdict"] = (f"this host is too noisy for the claim of {100 * claim:.0f}% within ±10%: measured against "
                          f"measured, only {100 * c:.1f}% of sessions agree that well ({name}), so no predictor can "
                          f"show it here")
    return out


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
