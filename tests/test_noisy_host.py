"""Profiling, validation and the device correction on a host whose state moves.

Every timing here is scripted (a :class:`ScriptedHost` on top of :func:`conftest.scripted_ort`):
the host state is a function of a virtual clock that advances by one tick per timing call, so a
neighbour can be switched on and off at chosen points of the protocol, mid-window included, and
no assertion depends on how fast or busy this machine is.
"""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import measured, run_cli_here, scripted_ort
from hwprune.errors import HwpruneError
from hwprune.profiling.backends.base import LayerTiming
from hwprune.profiling.measure import (ESTIMATORS, MeasureConfig, Measurement, Stats, choose_estimator,
                                       collect_adaptive, measure, measure_pair, rank_bounds, window_ci_rel)
from hwprune.profiling.profiler import AnchorConfig, Profiler, ProfilePlan, profile
from hwprune.profiling.table import LatencyTable, TableMeta

PLAN = dict(configs=4, input_size=16, micro_per_config=0)


class ScriptedHost:
    """The scripted device of :func:`conftest.scripted_ort`, slowed by ``factor(tick)``: every end-to-end
    timing and every layer profile is one tick of a virtual clock and runs ``factor`` times slower than
    on the quiet host. ``log`` holds (tick, what, factor) of every call; ``reference_sessions``, when
    given, are the sample lists the first timings of the unpruned model return (one per call)."""

    def __init__(self, factor=lambda t: 1.0, reference_sessions=()):
        self.tick, self.factor, self.log = 0, factor, []
        self.sessions = list(reference_sessions)
        be = scripted_ort(measure=MeasureConfig.quick())
        quiet_e2e, quiet_layers = be.measure_e2e, be.profile_layers

        def e2e(art):
            ref = art.name.endswith("/reference")
            f = self._advance("R" if ref else "E:" + art.name)
            if ref and self.sessions:
                s = self.sessions.pop(0)
                return Measurement(stats=Stats.from_samples(s), samples_ms=list(s))
            return measured(quiet_e2e(art).stats.median * f)

        def layers(art):
            f = self._advance("L:" + art.name)
            return [LayerTiming(r.unit, Stats.from_samples([r.stats.median * f] * 5), r.node, r.layer, dict(r.extra))
                    for r in quiet_layers(art)]

        be.measure_e2e, be.profile_layers = e2e, layers
        be.measure_pair = lambda art, ref: (e2e(art), e2e(ref))
        self.backend = be

    def _advance(self, what: str) -> float:
        f = self.factor(self.tick)
        self.log.append((self.tick, what, f))
        self.tick += 1
        return f


def pulse(start: int, stop: int, factor: float = 2.0):
    """A neighbour that slows the host ``factor`` times from tick ``start`` to tick ``stop``."""
    return lambda t: factor if start <= t < stop else 1.0


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """The table of the quiet host: what normalisation should recover."""
    path = tmp_path_factory.mktemp("quiet") / "q.parquet"
    return profile("cifar_resnet20", path, ScriptedHost().backend, **PLAN)


def _by_item(table: LatencyTable, source: str) -> dict:
    rows = table.source(source)
    return {(i, n): v for i, n, v in zip(rows["item"], rows["node"].fillna(""), rows["median_ms"])}


def test_normalised_rows_recover_the_quiet_host_values(quiet, tmp_path):
    """Windows (ticks): full 3-9, uniform75 10-14, uniform50 15-19, uniform25 20-24. A neighbour doubles
    every time from tick 12, the middle of uniform75's window, to tick 22, inside uniform50's: both
    windows see the reference move and are measured again; uniform75's second window is slow throughout
    and is normalised by half. Every row then equals the quiet host's. Profiled without reference windows,
    a neighbour over the same configurations leaves them twice as slow."""
    host = ScriptedHost(pulse(12, 22))
    table = profile("cifar_resnet20", tmp_path / "n.parquet", host.backend, **PLAN)
    e2e = table.e2e.set_index("config")
    assert e2e["state_attempts"].to_dict() == {"full": 1, "uniform75": 2, "uniform50": 2, "uniform25": 1}
    assert e2e["state_ok"].all()
    assert e2e.loc["uniform75", "norm_factor"] == pytest.approx(0.5)  # timed slow, and normalised
    assert e2e.loc["uniform75", "raw_ms"] == pytest.approx(2 * e2e.loc["uniform75", "median_ms"])
    for source in ("e2e", "insitu"):
        got, want = _by_item(table, source), _by_item(quiet, source)
        assert got.keys() == want.keys()
        assert np.allclose([got[k] for k in want], list(want.values()), rtol=1e-9)
    noise = LatencyTable.load(tmp_path / "n.parquet").summary()["noise"]
    assert noise["anchored"] and noise["remeasured"] == 2 and noise["unsteady_configs"] == 0
    assert noise["reference_ratio"]["max"] == pytest.approx(2.0)  # one window ran at twice the reference
    assert noise["estimator"]["name"] == "median" and noise["estimator"]["chosen_by"] == "data"
    before = profile("cifar_resnet20", tmp_path / "b.parquet", ScriptedHost(pulse(4, 8)).backend, anchor=None,
                     **PLAN)
    old = before.e2e.set_index("config")["median_ms"] / quiet.e2e.set_index("config")["median_ms"]
    assert old.to_dict() == pytest.approx({"full": 1.0, "uniform75": 2.0, "uniform50": 2.0, "uniform25": 1.0})
    assert not before.summary()["noise"]["anchored"]


def test_a_neighbour_that_stays_leaves_one_host_state(quiet, tmp_path):
    """From tick 5 (inside the first window) the host stays twice as slow: the first window is measured
    again, and every row describes the slow state, none the quiet one it started in."""
    table = profile("cifar_resnet20", tmp_path / "s.parquet", ScriptedHost(pulse(5, 10 ** 6)).backend, **PLAN)
    e2e = table.e2e.set_index("config")
    assert e2e.loc["full", "state_attempts"] == 2 and e2e["state_ok"].all()
    got, want = _by_item(table, "e2e"), _by_item(quiet, "e2e")
    assert np.allclose([got[k] / want[k] for k in want], 2.0)


def test_a_window_that_stays_unsteady_is_kept_marked_after_its_attempts(tmp_path):
    """The host runs 1x, 1.5x, 2x, 1x ... (a neighbour changing its load every tick): no window is steady,
    each configuration is measured ``attempts`` times and kept with state_ok=False, which the fit leaves
    out."""
    host = ScriptedHost(lambda t: 1.0 + 0.5 * (t % 3))
    plan = ProfilePlan(models=("cifar_resnet20",), input_size=16, configs=2, micro_per_config=0)
    table = Profiler(host.backend, plan, tmp_path / "u.parquet", anchor=AnchorConfig(attempts=2)).run()
    e2e = table.e2e
    assert (e2e["state_attempts"] == 2).all() and not e2e["state_ok"].any()
    assert table.summary()["noise"]["unsteady_configs"] == 2
    with pytest.raises(HwpruneError, match="anchor tolerance"):
        profile("cifar_resnet20", tmp_path / "x.parquet", host.backend, anchor=AnchorConfig(tolerance=0.0), **PLAN)


def _burst_sessions():
    """Three sessions of the reference, 100 samples each: quiet (1.0 ms) for the first 8%, 30% and 50% of
    the session, then a neighbour's burst (1.5 ms) to its end, with a little deterministic jitter."""
    jitter = 0.001 * np.sin(np.arange(100))
    return [list(np.where(np.arange(100) < q, 1.0, 1.5) + jitter) for q in (8, 30, 50)]


def test_the_estimator_choice_picks_the_steadier_estimator():
    """On the burst sessions the median (1.5, 1.5, 1.25) and the 10th percentile (1.5, 1.0, 1.0) jump
    between sessions; the fastest of ten rounds finds the quiet first round every time. Preemptions
    spread evenly (20%, 55%, 70% of the samples slow) defeat the round minimum too, and the low quantile
    wins. Sessions that agree (a quiet host) keep the median."""
    choice = choose_estimator([_burst_sessions()])
    assert choice.name == "min-round" and choice.spreads["min-round"] < 0.01
    assert choice.spreads["median"] > 0.1 and choice.spreads["p10"] > 0.1
    spread = [list(np.where((np.arange(100) * 37 % 100) < p, 1.5, 1.0)) for p in (20, 55, 70)]
    assert choose_estimator([spread]).name == "p10"
    quiet = [list(1.0 + 0.01 * np.sin(np.arange(100) + k) + 0.002 * k) for k in range(3)]  # within 0.4%
    assert choose_estimator([quiet]).name == "median"
    assert set(choose_estimator([quiet]).spreads) == set(ESTIMATORS.names())


def test_the_profile_chooses_its_estimator_on_the_reference_and_records_it(tmp_path):
    host = ScriptedHost(reference_sessions=_burst_sessions())
    plan = ProfilePlan(models=("cifar_resnet20",), input_size=16, configs=1, micro_per_config=0)
    table = Profiler(host.backend, plan, tmp_path / "e.parquet").run()
    est = table.meta.noise["estimator"]
    assert est["name"] == "min-round" and est["chosen_by"] == "data" and est["sessions"] == 3
    assert table.meta.noise["measure"]["estimator"] == "min-round"  # every later window used it
    assert host.backend.measure_cfg.estimator == "median"  # the backend is handed back as it came
    r = run_cli_here("table", "info", str(tmp_path / "e.parquet"))
    assert r.returncode == 0 and "min-round" in r.stderr and "reference moved" in r.stderr  # rich prints to stderr
    doc = json.loads(run_cli_here("table", "info", str(tmp_path / "e.parquet"), "--json").stdout)
    assert doc["noise"]["estimator"]["name"] == "min-round" and "ci_rel" in doc["noise"]
    from hwprune.cli.bench import _estimator  # `hwprune bench --table` summarises its rounds the same way

    assert _estimator(None, tmp_path / "e.parquet") == "min-round" and _estimator("p10", tmp_path / "e.parquet") == "p10"
    assert _estimator(None, None) is None
    with pytest.raises(HwpruneError, match="unknown estimator 'mode'"):
        _estimator("mode", None)


def _golden(k: int, spread: float) -> float:
    """A deterministic sample spread evenly over [1, 1 + spread] (the golden-ratio sequence)."""
    return 1.0 + spread * ((k * 0.6180339887) % 1.0)


def test_adaptive_repetition_stops_once_the_interval_is_within_2pct():
    """Samples spread evenly over [1, 1.2] ms: 10 samples leave the median's interval near +-5%; the
    window grows until it is within +-2%, without reaching the cap."""
    k = iter(range(10 ** 6))
    cfg = MeasureConfig(warmup_s=0.0, min_iters=10, min_time_s=0.0, retries=0, ci_target=0.02, ci_max_time_s=60.0)
    samples, cap = collect_adaptive(lambda: _golden(next(k), 0.2), cfg)
    assert not cap and window_ci_rel(samples, cfg) <= 0.02
    assert window_ci_rel(samples[:10], cfg) > 0.02 and len(samples) > 10
    m = measure(lambda: _golden(next(k), 0.2), cfg)
    assert not m.stats.cap_hit and m.stats.ci_rel <= 0.02 and m.stats.ci_lo <= m.stats.estimate <= m.stats.ci_hi


def test_adaptive_repetition_stops_at_the_cap_and_says_so():
    """Samples over [10, 100] ms never give a +-2% interval in 5 s of scripted time: the window stops at
    the cap (the samples' summed time, far beyond the wall time the script takes) and the stats say the
    cap ended it."""
    k = iter(range(10 ** 6))
    cfg = MeasureConfig(warmup_s=0.0, min_iters=10, min_time_s=0.0, retries=0, ci_target=0.02, ci_max_time_s=5.0)
    m = measure(lambda: 10 * _golden(next(k), 9.0), cfg)
    assert m.stats.cap_hit and m.stats.ci_rel > 0.02
    assert 5000 <= sum(m.samples_ms) < 5000 + 100.0  # stopped within one sample of the cap
    off = measure(lambda: _golden(next(k), 9.0), MeasureConfig(warmup_s=0.0, min_iters=10, min_time_s=0.0,
                                                                 retries=0))
    assert off.stats.count == 10 and not off.stats.cap_hit  # no target: the fixed window of earlier tables
    a, b = measure_pair(lambda: _golden(next(k), 0.2), lambda: 4.0, replace(cfg, ci_max_time_s=60.0), chunk_s=0.004)
    assert not a.stats.cap_hit and a.stats.ci_rel <= 0.02 and b.stats.ci_rel == 0.0


def test_order_statistic_intervals_cover_what_they_should():
    assert rank_bounds(3, 0.5) == (0, 2)  # three samples: the whole range
    lo, hi = rank_bounds(1000, 0.5)
    assert lo < 500 < hi and hi - lo < 80
    lo, hi = rank_bounds(1000, 0.1)
    assert lo < 100 < hi


# -- the device correction ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r20():
    from hwprune.pruning.objectives import FlopsCost
    from hwprune.pruning.space import PruningSpace

    space = PruningSpace.from_name("cifar_resnet20", input_size=16)
    rng = np.random.default_rng(0)
    scores = {g.id: rng.random(g.channels) for g in space.groups}
    return SimpleNamespace(space=space, cost=FlopsCost(space), scores=scores)


def test_the_correction_measures_an_ambiguous_configuration_again_and_decides_on_the_pooled_rounds(r20):
    """The first rounds of the method's configuration read 0.40, 0.49 and 0.56 of the base: the median
    0.49 meets the 0.5 target but the interval reaches 0.56. It is measured again (six rounds near
    0.49) and kept on the pooled interval, [0.48, 0.49]."""
    from hwprune.pruning.device_correction import Reading, correct_to_measured

    widths = r20.space.uniform(0.7)
    calls = []

    def meter(w, keep):
        calls.append(dict(w.widths))
        vals = [4.0, 4.9, 5.6] if len(calls) == 1 else [4.9, 4.9, 4.8, 4.9, 4.9, 4.9]
        return Reading.from_values(vals, {"rounds": len(vals)})

    out, _, log = correct_to_measured(r20.space, r20.cost, widths, {}, r20.scores, None, meter, 10.0, 0.5)
    assert len(calls) == 2 and calls[0] == calls[1] and len(log) == 1
    assert log[0]["remeasured"] == 1 and not log[0]["ambiguous"] and log[0]["kept"]
    assert (log[0]["ratio_lo"], log[0]["ratio"], log[0]["ratio_hi"]) == pytest.approx((0.48, 0.49, 0.49))
    assert log[0]["rounds"] == 9 and "decision" not in log[0]
    assert out.widths == r20.space.validate(widths).widths


def test_the_correction_refuses_to_decide_on_overlapping_intervals(r20):
    """Every reading is twice as uncertain as it is long ([0, 2x] around x): no configuration is ever
    decided under the target, so none is kept as met. The correction measures each one again, steers
    on the upper ends, and keeps the narrowest try, saying so."""
    from hwprune.pruning.device_correction import Reading, correct_to_measured

    calls = []

    def meter(w, keep):
        ms = 10.0 * r20.cost.fraction(w)
        calls.append(ms)
        return Reading(ms, 0.0, 2 * ms)

    out, _, log = correct_to_measured(r20.space, r20.cost, r20.space.uniform(0.8), {}, r20.scores, None, meter,
                                      10.0, 0.5, min_keep=0.6)
    assert all(e["ambiguous"] and e["remeasured"] == 1 for e in log)
    assert len(calls) == 2 * len(log)
    kept = [e for e in log if e.get("kept")]
    assert len(kept) == 1 and "safe side" in kept[0]["decision"]
    assert kept[0]["predicted_fraction"] == min(e["predicted_fraction"] for e in log)  # the narrowest
    assert r20.cost.fraction(out) == pytest.approx(kept[0]["predicted_fraction"])
    exact = correct_to_measured(r20.space, r20.cost, r20.space.uniform(0.8), {}, r20.scores, None,
                                lambda w, k: 10.0 * r20.cost.fraction(w), 10.0, 0.5, min_keep=0.2)[2]
    assert not any(e["ambiguous"] for e in exact) and 0.47 <= [e for e in exact if e.get("kept")][0]["ratio"] <= 0.5


# -- validation: the predictor against the host ---------------------------------------------------------
class ScriptedPredictor:
    """Predicts 0.2 ms plus 1 ms per 100,000 parameters (the scripted device's quiet time, conftest.params_ms),
    off by ``miss`` on every other configuration it is asked about."""

    def __init__(self, space, miss: float):
        self.space, self.miss, self.n = space, miss, 0

    def check_model(self, model):
        return SimpleNamespace(template=SimpleNamespace(space=self.space))

    def _ms(self, cfg) -> float:
        return 0.2 + 1e-5 * sum(p.numel() for p in self.space.apply(cfg).parameters())

    def predict_layers(self, model, cfg):
        self.n += 1
        return self._ms(cfg) * (1 + self.miss * (self.n % 2)), [SimpleNamespace(extrapolated=False)]

    def predict(self, model, cfgs):
        return np.array([self._ms(c) for c in cfgs])


def _scripted_validation(monkeypatch, factor):
    """Validation timings on the scripted device of conftest.params_ms, every session (and the reference
    probes around it) ``factor(session)`` times slower than the quiet host."""
    import hwprune.prediction.validate as hv
    from hwprune.profiling.backends import backend_from_settings as real_create

    state = {"sessions": 0, "after": False}  # a probe right after a session belongs to it

    def timing(art):
        if art.name.endswith("/reference"):
            session = state["sessions"] - 1 if state["after"] else state["sessions"]
            state["after"] = False
        else:
            session, state["after"] = state["sessions"], True
            state["sessions"] += 1
        return (0.2 + 1e-5 * sum(p.numel() for p in art.module.parameters())) * factor(session)

    def create(*a, **k):
        be = real_create(*a, **k)
        be.measure_e2e = lambda art: measured(timing(art))
        be.needs_onnx = lambda: False
        return be

    monkeypatch.setattr(hv, "backend_from_settings", create)
    return hv


def test_validation_splits_the_gap_between_the_host_and_the_predictor(monkeypatch):
    """A neighbour slows the second round of sessions by 30%: measured against measured, no session lands within
    ±10% of the other, so the absolute ceiling is 0 and the host explains the whole absolute gap. The
    probes around each session move with it, so normalised to the table's host state the sessions agree
    (ceiling 100%), and the predictor's miss of 20% on every other configuration is all that is left:
    half the predictions within ±10%, the gap all the predictor's. Without anchoring only the absolute
    view is left, and the report says the host is too noisy for a 95% claim."""
    from hwprune.pruning.space import PruningSpace

    space = PruningSpace.from_name("cifar_resnet20")
    quiet_ref = 0.2 + 1e-5 * sum(p.numel() for p in space.model.parameters())
    settings = {**scripted_ort().settings(), "batch": 1, "input_size": None}
    table = LatencyTable(None, TableMeta(settings=settings, models=["cifar_resnet20"],
                                         noise={"anchored": True, "reference_ms": {"cifar_resnet20": quiet_ref}}))
    hv = _scripted_validation(monkeypatch, lambda s: 1.3 if s % 8 >= 4 else 1.0)  # every second round is slow
    res = hv.validate(table, ["cifar_resnet20"], 4, rounds=2, measure=MeasureConfig.quick(),
                      predictor=ScriptedPredictor(space, 0.2))
    views = res.ceiling["views"]
    assert views["absolute"]["within_10pct"]["ceiling"] == 0.0
    assert views["absolute"]["within_10pct"]["host_share"] == 1.0
    norm = views["normalised"]["within_10pct"]
    assert (norm["predictor"], norm["ceiling"], norm["host_share"], norm["predictor_share"]) == (0.5, 1.0, 0.0, 1.0)
    assert res.normalised["within_10pct"] == 0.5 and res.ceiling["verdict"] is None
    assert all(s.normalised_sessions == pytest.approx([s.normalised_ms] * 2) for s in res.samples)
    doc = res.to_dict(with_samples=True)  # what `hwprune validate --json` prints
    assert doc["ceiling"]["views"]["normalised"]["within_10pct"]["gap"] == 0.5
    assert "normalised_error" in doc["samples"][0]
    plain = hv.validate(table, ["cifar_resnet20"], 4, rounds=2, measure=MeasureConfig.quick(), anchor=False,
                        predictor=ScriptedPredictor(space, 0.2))
    assert set(plain.ceiling["views"]) == {"absolute"} and plain.normalised == {}
    assert "too noisy for the claim of 95% within ±10%" in plain.ceiling["verdict"]
    again = hv.repredict(table, doc, ScriptedPredictor(space, 0.2))  # stored measurements, scored again
    assert again.ceiling["views"]["normalised"]["within_10pct"]["ceiling"] == 1.0


def test_gap_split_on_its_own():
    from hwprune.prediction.validate import ceiling_report, gap_split

    assert gap_split(0.6, 0.8) == pytest.approx({"gap": 0.4, "host_share": 0.5, "predictor_share": 0.5})
    assert gap_split(1.0, 0.9)["host_share"] is None  # nothing to explain
    assert gap_split(0.9, 0.8)["host_share"] == 1.0  # the predictor is at the ceiling: all the host's
    rep = {"within_5pct": 0.5, "within_10pct": 0.875, "pairs": 8}
    met = {"within_5pct": 0.4, "within_10pct": 0.6}
    out = ceiling_report({"absolute": (met, rep)}, claim=0.95)
    assert "87.5%" in out["verdict"]
    assert ceiling_report({"absolute": (met, rep)}, claim=0.8)["verdict"] is None


def test_table_check_compares_the_fast_state_and_says_when_the_host_is_too_noisy(quiet, monkeypatch):
    """Sessions of the unpruned model read 1.00x, 1.50x and 1.02x the table (a neighbour in the middle
    one): the fast state matches the table. Sessions at 1.30x, 1.90x and 1.32x do not, and spread by
    46%: the check says the host is too noisy to tell instead of rejecting the table outright."""
    import hwprune.profiling.table_check as tc
    from hwprune.profiling.backends import backend_from_settings as real_create

    ref = float(quiet.e2e.set_index("config").loc["full", "median_ms"])
    factors = iter([1.0, 1.5, 1.02, 1.3, 1.9, 1.32])

    def create(*a, **k):
        be = real_create(*a, **k)
        be.measure_e2e = lambda art: measured(ref * next(factors))
        return be

    monkeypatch.setattr(tc, "backend_from_settings", create)
    ok = tc.check_host(quiet, sessions=3)
    assert ok.matches and ok.noisy  # the slow middle session spreads them; the fast state still matches
    assert ok.models[0].factor == pytest.approx(1.01) and "matches" in ok.verdict()
    busy = tc.check_host(quiet, sessions=3)
    assert not busy.matches and busy.noisy and "too noisy right now" in busy.verdict()
    assert busy.to_dict()["noisy"] and busy.models[0].factor == pytest.approx(1.31)


@pytest.mark.parametrize("args,expect", [
    (["--estimator", "mode"], "unknown estimator 'mode'"),
    (["--no-anchor", "--estimator", "p10"], "--estimator goes with anchored profiling"),
    (["--anchor-tolerance", "0"], "Invalid value for '--anchor-tolerance'"),
])
def test_profile_cli_refuses_bad_anchor_settings_in_one_line(tmp_path, args, expect):
    out = tmp_path / "x.parquet"
    r = run_cli_here("profile", "--model", "cifar_resnet20", *args, "--out", str(out))
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
