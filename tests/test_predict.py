"""The latency predictor, on a small real table of cifar_resnet20."""

import json
from dataclasses import replace

import numpy as np
import pytest
from sklearn.base import clone

from conftest import OVERHEAD_MS, run_cli, run_cli_here, script_e2e, scripted_ort
from hwprune.errors import HwpruneError, TableMismatch
from hwprune.prediction.predictor import LatencyPredictor, ModelTemplate, cross_validate_e2e
from hwprune.profiling.profiler import profile
from hwprune.pruning.space import PruningSpace
from hwprune.profiling.table import LatencyTable


@pytest.fixture(scope="module")
def table_path(tmp_path_factory, quick):
    """14 configurations of cifar_resnet20 as ONNX Runtime executes them, timed by the scripted
    device of :func:`conftest.scripted_ort`: the same table on every host."""
    path = tmp_path_factory.mktemp("pred") / "r20.parquet"
    profile("cifar_resnet20", path, scripted_ort(measure=quick), configs=14, micro_per_config=0)
    return path


@pytest.fixture(scope="module")
def table(table_path):
    return LatencyTable.load(table_path)


@pytest.fixture(scope="module")
def predictor(table):
    return LatencyPredictor(min_rows=10).fit(table)


#: One regressor (no selection by cross-validation) and the measured calibration (no cross-fitting):
#: the fits of tests about something else than choosing a regressor or a calibration.
ONE_REGRESSOR = {"regressor": "hgb", "calibration": "measured"}


@pytest.fixture(scope="module")
def space():
    return PruningSpace.from_name("cifar_resnet20")


def test_template_channels_follow_the_groups(space):
    tpl = ModelTemplate(space)
    cfg = space.uniform(0.5)
    cin, cout = tpl.channels(tpl.width_matrix([cfg]))
    by = {s.name: j for j, s in enumerate(tpl.slots)}
    m = space.apply(cfg)
    mods = dict(m.named_modules())
    for name, j in by.items():
        mod = mods[name]
        got = (mod.in_channels, mod.out_channels) if hasattr(mod, "in_channels") else (mod.in_features, mod.out_features)
        assert (int(cin[0, j]), int(cout[0, j])) == got, name


def test_fit_selects_a_regressor_per_kind_by_validation(predictor):
    assert set(predictor.selection_) == {"conv", "linear", "calibration"}
    kinds = dict(predictor.selection_)
    cal = kinds.pop("calibration")["cifar_resnet20"]  # the per-model map, chosen the same way
    assert cal["chosen"] == min(cal["loo_rmspe"], key=cal["loo_rmspe"].get)
    for sel in kinds.values():
        assert sel["chosen"] in sel["cv_rmspe"] and sel["rows"] > 0
        assert sel["cv_rmspe"][sel["chosen"]] == min(sel["cv_rmspe"].values())
    assert predictor.fit_seconds_ > 0


def test_predictions_are_positive_ordered_and_vectorised(predictor, space, table):
    full, half, quarter = space.full(), space.uniform(0.5), space.uniform(0.25)
    p = predictor.predict("cifar_resnet20", [full, half, quarter])
    assert (p > 0).all()
    assert p[0] > p[2]  # a quarter-width network is predicted faster than the full one
    single = [predictor.predict("cifar_resnet20", [c])[0] for c in (full, half, quarter)]
    assert np.allclose(p, single)
    total, layers = predictor.predict_layers("cifar_resnet20", half)
    assert total == pytest.approx(p[1])
    assert [l.layer for l in layers][:2] == ["conv1", "layer1.0.conv1"] and len(layers) == 22
    # in-sample, the prediction of the profiled full model is close to its (scripted) measurement
    measured = table.e2e.set_index("config").loc["full", "median_ms"]
    assert abs(p[0] - measured) / measured < 0.05


def test_bulk_prediction_uses_every_core_and_predicts_the_same(predictor, space, monkeypatch):
    import random

    from sklearn.ensemble import ExtraTreesRegressor

    import hwprune.prediction.predictor as hp

    configs = [space.sample(random.Random(3)) for _ in range(6)]
    few = predictor.predict("cifar_resnet20", configs)
    calls = []
    real = hp._every_core
    monkeypatch.setattr(hp, "_every_core", lambda est, on: calls.append(on) or real(est, on))
    monkeypatch.setattr(hp, "BULK_ROWS", 10)  # the convolutions of 6 configurations count as bulk now
    assert np.allclose(predictor.predict("cifar_resnet20", configs), few, rtol=1e-12) and True in calls
    forest = ExtraTreesRegressor(n_estimators=4, n_jobs=1, random_state=0).fit(np.eye(4), np.arange(4.0))
    with real(forest, True):
        assert forest.n_jobs == -1
    assert forest.n_jobs == 1  # given back after the bulk prediction
    with real(forest, False):
        assert forest.n_jobs == 1


def test_marginal_costs_cover_every_group(predictor, space):
    mc = predictor.marginal_costs("cifar_resnet20", space.full(), step=8)
    assert list(mc) == [g.id for g in space.groups]
    assert all(np.isfinite(a) and np.isfinite(b) for a, b in mc.values())


def test_extrapolation_is_flagged(table, space):
    caps = {g.id: g.channels for g in space.groups}
    narrow = [i for i, w in zip(table.e2e["item"], table.e2e["widths"])
              if all(v <= 0.6 * caps[k] for k, v in json.loads(w).items())]
    assert len(narrow) >= 2  # uniform25 and uniform50 at least
    reduced = LatencyTable(table.rows[table.rows["item"].isin(narrow)], table.meta)
    pred = LatencyPredictor(min_rows=2, **ONE_REGRESSOR).fit(reduced)
    _, layers = pred.predict_layers("cifar_resnet20", space.full())
    assert any(l.extrapolated for l in layers)
    _, inside = pred.predict_layers("cifar_resnet20", space.uniform(0.25))
    assert not any(l.extrapolated for l in inside)


def test_bad_input_names_the_problem(predictor, table):
    with pytest.raises(HwpruneError, match="unknown channel group 'nope'"):
        predictor.predict("cifar_resnet20", [{"nope": 3}])
    with pytest.raises(HwpruneError, match="between 1 and 16, got 0"):
        predictor.predict("cifar_resnet20", [{"conv1": 0}])
    with pytest.raises(HwpruneError, match="must be an integer"):
        predictor.predict("cifar_resnet20", [{"conv1": 2.5}])
    with pytest.raises(HwpruneError, match="never covered model 'resnet18'"):
        predictor.predict("resnet18", [{}])
    with pytest.raises(HwpruneError, match="too small to fit the 'conv' regressor"):
        LatencyPredictor(min_rows=10_000).fit(table)
    with pytest.raises(TableMismatch, match="batch"):
        predictor.check_settings({"batch": 8})


def test_sklearn_conventions(predictor):
    params = predictor.get_params()
    assert params["regressor"] == "auto"
    c = clone(predictor)
    assert c.get_params() == params and not hasattr(c, "estimators_")
    assert LatencyPredictor().set_params(regressor="hgb").regressor == "hgb"


def test_saved_and_loaded_without_refitting(predictor, table_path, tmp_path, space):
    path = predictor.save(tmp_path / "p.predictor.zip", table_path)  # hwprune.prediction.artifact: no pickle
    back = LatencyPredictor.load(path, table_path)
    cfgs = [space.uniform(0.5), space.full()]
    assert np.array_equal(back.predict("cifar_resnet20", cfgs), predictor.predict("cifar_resnet20", cfgs))


def test_cross_validation_on_held_out_configurations(table):
    df = cross_validate_e2e(table, folds=2, min_rows=5, **ONE_REGRESSOR)
    assert len(df) == len(table.e2e) and df["error"].notna().all()


@pytest.mark.slow
def test_cli_widths_predict_validate(table_path, tmp_path):
    """widths, predict and validate as the command line runs them (in this process: no interpreter
    start-up per command); validate times 3 configurations for real and is checked for its form only."""
    r = run_cli_here("widths", "--model", "cifar_resnet20", "--random", "3", "--seed", "1", "--out",
                     str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "w").glob("*.json"))
    assert len(files) == 3
    doc = json.loads(files[0].read_text())
    assert doc["model"] == "cifar_resnet20" and len(doc["widths"]) == 12
    r = run_cli_here("predict", "--table", str(table_path), "--model", "cifar_resnet20", "--widths", str(files[0]),
                     "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["predicted_ms"] > 0 and len(out["layers"]) == 22 and "extrapolated" in out
    assert all(0 <= l["extra_ms"] < l["predicted_ms"] for l in out["layers"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "cifar_resnet20", "widths": {"conv1": 99}}))
    r = run_cli_here("predict", "--table", str(table_path), "--model", "cifar_resnet20", "--widths", str(bad))
    assert r.returncode == 2 and "conv1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli_here("validate", "--table", str(table_path), "--model", "cifar_resnet20", "--samples", "3", "--json",
                     "--plot", str(tmp_path / "v.png"), "--paired")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["n"] == 3 and {"within_5pct", "within_10pct", "rmspe", "spearman", "worst"} <= set(v)
    assert v["relative"]["n"] == 3 and v["relative"]["repeatability"]["pairs"] == 6  # 2 rounds by default
    assert (tmp_path / "v.png").stat().st_size > 1000
    # the JSON keeps every configuration: its widths re-predict to the same time through `predict`
    assert len(v["samples"]) == 3 and all(len(s["sessions_ms"]) == 2 for s in v["samples"])
    s0 = v["samples"][0]
    (tmp_path / "s0.json").write_text(json.dumps({"model": s0["model"], "widths": s0["widths"]}))
    r = run_cli_here("predict", "--table", str(table_path), "--model", "cifar_resnet20", "--widths",
                     str(tmp_path / "s0.json"), "--json")
    assert json.loads(r.stdout)["predicted_ms"] == pytest.approx(s0["predicted_ms"], rel=1e-6)
    # --measured times nothing: the same predictor on the stored measurements scores the same
    (tmp_path / "v.json").write_text(r_v := json.dumps(v))
    r = run_cli_here("validate", "--table", str(table_path), "--measured", str(tmp_path / "v.json"), "--json",
                     "--plot", str(tmp_path / "v2.png"))
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["measure_seconds"] == 0.0 and again["samples"][0]["measured_ms"] == s0["measured_ms"]
    assert [x["predicted_ms"] for x in again["samples"]] == pytest.approx([x["predicted_ms"] for x in v["samples"]])
    assert again["relative"]["within_5pct"] == v["relative"]["within_5pct"] and again["rmspe"] == pytest.approx(v["rmspe"])
    (tmp_path / "v.json").write_text(r_v.replace('"batch": 1', '"batch": 8'))
    r = run_cli_here("validate", "--table", str(table_path), "--measured", str(tmp_path / "v.json"))
    assert r.returncode == 2 and "batch" in r.stderr and "Traceback" not in r.stderr
    r = run_cli_here("validate", "--table", str(table_path), "--measured", str(bad))
    assert r.returncode == 2 and "no configurations" in r.stderr and "Traceback" not in r.stderr


def _script_validation_timings(monkeypatch, timing):
    """Make validation's backend time every model at ``timing(artifact)`` ms (nothing runs)."""
    import hwprune.prediction.validate as hv
    from hwprune.profiling.backends import backend_from_settings as real_create

    monkeypatch.setattr(hv, "backend_from_settings", lambda *a, **k: script_e2e(real_create(*a, **k), timing))
    return hv


def test_gated_validation_counts_only_fast_sessions(table, predictor, monkeypatch):
    """Scripted host: the second reference timing is 3x slow and the session after it reads 100 ms."""
    from hwprune.profiling.measure import MeasureConfig

    flip = {"n": 0}

    def timing(art):
        if art.name.endswith("/reference"):
            flip["n"] += 1
            return 3.0 if flip["n"] == 2 else 1.0
        return 100.0 if flip["n"] == 2 else 1.0  # the session in the slow state

    hv = _script_validation_timings(monkeypatch, timing)
    res = hv.validate(table, ["cifar_resnet20"], 2, rounds=2, gate=0.5, measure=MeasureConfig.quick(),
                      predictor=predictor)
    assert flip["n"] == 4  # one reference timing before every session
    assert [s.measured_ms for s in res.samples] == [1.0, 1.0]  # the slow session never counts
    assert [s.sessions_ms for s in res.samples] == [[1.0, 1.0], [1.0]]


@pytest.mark.parametrize("n_slow, used", [(2, 0), (6, 6)])
def test_slow_state_configurations_are_left_out_while_enough_others_remain(table, predictor, n_slow, used):
    """A gated profile marks configurations timed in the host's slow state. The fit leaves them
    out, unless that leaves a unit kind with fewer than ``min_rows`` rows (14 configurations,
    one linear row each, min_rows 10): then it fits on all of them and says how many were slow."""
    rows = table.rows.copy()
    slow = sorted(set(rows["item"]))[:n_slow]
    rows["state_ok"] = ~rows["item"].isin(slow)
    marked = LatencyTable(rows, table.meta)
    pred = LatencyPredictor(min_rows=10, **ONE_REGRESSOR).fit(marked)
    assert pred.slow_configs_used_ == used
    assert pred.selection_["linear"]["rows"] == 14 - n_slow + used
    assert marked.summary()["slow_state_configs"] == n_slow
    assert predictor.slow_configs_used_ == 0  # ungated table: nothing is slow


def test_gated_validation_reports_host_drift_against_the_table(table, predictor, monkeypatch):
    """The table's probes of the unpruned model read 0.5 ms; this run's read 1.0 ms: the host runs
    2x slower than when it was profiled, and the drift-corrected metrics double every prediction."""
    from hwprune.profiling.measure import MeasureConfig

    rows = table.rows.copy()
    rows["state_ref_ms"], rows["state_ok"] = 0.5, True
    gated = LatencyTable(rows, table.meta)
    hv = _script_validation_timings(monkeypatch, lambda art: 1.0 if art.name.endswith("/reference") else 2.0)
    res = hv.validate(gated, ["cifar_resnet20"], 3, rounds=1, gate=0.5, measure=MeasureConfig.quick(),
                      predictor=predictor)
    assert res.drift["cifar_resnet20"] == {"table_reference_ms": 0.5, "reference_ms": 1.0, "factor": 2.0}
    assert [s.measured_ms for s in res.samples] == [2.0] * 3
    doubled = [replace(s, predicted_ms=2 * s.predicted_ms) for s in res.samples]
    assert res.drift_corrected == hv._metrics(doubled) and res.drift_corrected["n"] == 3
    assert res.to_dict()["drift"]["cifar_resnet20"]["factor"] == 2.0
    bare = LatencyTable(table.rows.assign(state_ref_ms=None), table.meta)  # profiled without reference probes
    plain = hv.validate(bare, ["cifar_resnet20"], 1, rounds=1, gate=0.5, measure=MeasureConfig.quick(),
                        predictor=predictor)
    assert plain.drift == {} and plain.drift_corrected == {}  # a table without probes has none to compare with


def test_paired_validation_predicts_latency_relative_to_the_unpruned_model(table, predictor, monkeypatch):
    """Paired sessions time the unpruned model beside each configuration. The scripted host runs
    every pruned session at 0.5 ms and its reference at 2.0 ms: the measured ratio is 0.25
    whatever the host's speed, and the relative error compares it with predicted / predicted
    unpruned."""
    from hwprune.profiling.measure import MeasureConfig

    import hwprune.prediction.validate as hv
    from hwprune.profiling.backends import backend_from_settings as real_create

    pairs = []

    def create(*a, **k):
        be = script_e2e(real_create(*a, **k), lambda art: 2.0 if art.name.endswith("/reference") else 0.5)
        pair = be.measure_pair

        def checked(art, ref):
            assert ref.name == "cifar_resnet20/reference" and ref.onnx_path.exists()
            pairs.append(art.name)
            return pair(art, ref)
        be.measure_pair = checked
        return be

    monkeypatch.setattr(hv, "backend_from_settings", create)
    res = hv.validate(table, ["cifar_resnet20"], 2, rounds=2, paired=True, measure=MeasureConfig.quick(),
                      predictor=predictor)
    assert len(pairs) == 4
    full = float(predictor.predict("cifar_resnet20", [PruningSpace.from_name("cifar_resnet20").uniform(1.0)])[0])
    for s in res.samples:
        assert s.reference_ms == [2.0, 2.0] and s.ratios == [0.25, 0.25]
        assert s.predicted_reference_ms == pytest.approx(full)
        assert s.relative_error == pytest.approx(s.predicted_ms / full / 0.25 - 1)
    rel = res.relative
    assert rel["n"] == 2 and rel["per_model"]["cifar_resnet20"]["n"] == 2
    assert rel["repeatability"] == {"pairs": 4, "within_5pct": 1.0, "within_10pct": 1.0}
    assert res.to_dict(with_samples=True)["samples"][0]["relative_error"] == res.samples[0].relative_error
    # the unpruned model's half of each pair against the table's end-to-end time of it: the drift
    profiled = float(table.e2e.set_index("config").loc["full", "median_ms"])
    assert res.drift["cifar_resnet20"]["factor"] == pytest.approx(2.0 / profiled)
    assert res.drift_corrected["n"] == 2
    unpaired = hv.validate(table, ["cifar_resnet20"], 1, rounds=1, measure=MeasureConfig.quick(), predictor=predictor)
    assert unpaired.relative == {} and unpaired.samples[0].reference_ms == []
    assert unpaired.samples[0].measured_ms == 0.5 and len(pairs) == 4
    with pytest.raises(HwpruneError, match="alternatives"):
        hv.validate(table, ["cifar_resnet20"], 1, paired=True, gate=0.1)


def test_repeatability_compares_each_session_with_the_others():
    """Sessions of 1.00, 1.02 and 1.20 ms: each is compared with the median of the other two."""
    from hwprune.prediction.validate import ValidationSample, repeatability

    s = ValidationSample("m", {}, 1.0, 1.02, 0.2, False, [1.0, 1.02, 1.2])
    r = repeatability([s])
    # session 1 vs median(1.02, 1.2) = 1.11: 9.9%; session 2 vs 1.1: 7.3%; session 3 vs 1.01: 18.8%
    assert r == {"pairs": 3, "within_5pct": 0.0, "within_10pct": pytest.approx(2 / 3)}
    steady = ValidationSample("m", {}, 1.0, 1.0, 0.01, False, [1.0, 1.01])
    assert repeatability([steady])["within_5pct"] == 1.0
    assert repeatability([ValidationSample("m", {}, 1.0, 1.0, 0.0, False, [1.0])]) == {}  # one session: no ceiling


def test_nodes_after_a_layer_are_charged_to_it():
    """Whatever runs on a layer's output before the next layer (a fused SiLU, a pooling, a
    reorder, an unfused Add) is that layer's cost; nothing runs before the first layer."""
    import pandas as pd

    from hwprune.prediction.training_set import _attribute

    rows = pd.DataFrame({
        "layer": ["", "conv1", "", "block.avgpool", "fc1", "", "block", "conv2"],
        "op": ["ReorderInput", "nchwc.Conv", "QuickGelu", "nchwc.GlobalAveragePool", "Conv", "ReorderOutput", "Mul",
               "Conv"]})
    got = _attribute(rows, {"conv1", "fc1", "conv2"})
    assert got.isna().tolist() == [True] + [False] * 7
    assert got.tolist()[1:] == ["conv1", "conv1", "conv1", "fc1", "fc1", "fc1", "conv2"]


@pytest.mark.parametrize("calibration", ["cross-fitted", "measured"])
def test_calibration_maps_layer_sums_to_end_to_end_time(table, space, calibration):
    """cross-fitted: a power law fitted on out-of-fold predicted layer sums (so a regressor's bias
    at small or large layers is corrected); measured: a line fitted on the measured layer sums."""
    pred = LatencyPredictor(regressor="hgb", calibration=calibration).fit(table)
    f = pred.models_["cifar_resnet20"]
    assert f.log == (calibration == "cross-fitted")
    total, layers = pred.predict_layers("cifar_resnet20", space.uniform(0.5))
    s = sum(l.predicted_ms for l in layers)
    want = np.exp(f.intercept) * s ** f.slope if f.log else f.slope * s + f.intercept
    assert total == pytest.approx(want) and total > 0
    # the table's own configurations come back close to their (scripted) measurements
    e2e = table.e2e
    p = pred.predict("cifar_resnet20", [json.loads(w) for w in e2e["widths"]])
    assert np.median(np.abs(p / e2e["median_ms"].to_numpy() - 1)) < 0.03
    with pytest.raises(HwpruneError, match="unknown calibration 'nope'"):
        LatencyPredictor(calibration="nope").fit(table)


def test_layout_context_counts_unblocked_neighbours(space):
    """One convolution that falls back to NCHW (>= 16 input channels, not a multiple of 4) is
    counted by every other writer of its output group (peers) and by that group's readers
    (producers), and by nobody else."""
    tpl = ModelTemplate(space)
    j = tpl.layer_names.index("layer2.0.conv2")
    inner = tpl.group_ids[tpl.slots[j].in_group]
    W = tpl.width_matrix([space.full(), {inner: 30}, {inner: 13}, {inner: 28}])
    cin, _ = tpl.channels(W)
    nb = tpl.unblocked(cin)
    assert not nb[0].any() and nb[1].tolist() == [k == j for k in range(len(tpl.slots))]
    assert not nb[2].any() and not nb[3].any()  # fewer than 16 channels, or a multiple of 4: blocked
    prod, peer = tpl.layout_context(cin)
    assert not prod[[0, 2, 3]].any() and not peer[[0, 2, 3]].any()
    g = tpl.slots[j].out_group
    writers = {k for k, s in enumerate(tpl.slots) if s.out_group == g and k != j}
    readers = {k for k, s in enumerate(tpl.slots) if s.in_group == g}
    assert len(writers) >= 2 and readers  # the stage's other blocks and its shortcut
    assert {k for k in range(len(tpl.slots)) if peer[1, k]} == writers
    assert {k for k in range(len(tpl.slots)) if prod[1, k]} == readers
    assert peer[1].max() == 1 and prod[1].max() == 1


def test_kernels_and_extras_are_learnt_apart_and_add_up(table, predictor):
    """The training targets split each layer's in-situ time into its own kernel and the
    nodes around it, losing nothing; predictions add both back."""
    ts, fits, sums = predictor._training_set(table)
    assert set(ts.extra) == set(ts.y) and all((ts.extra[k] >= 0).all() for k in ts.y)
    assert set(predictor.extras_) == set(predictor.estimators_)
    item = sums["item"].iloc[0]
    tpl = fits["cifar_resnet20"].template
    rows = table.rows[(table.rows["item"] == item) & (table.rows["source"] == "insitu")]
    from hwprune.prediction.training_set import _attribute

    att = _attribute(rows, set(tpl.layer_names))
    charged = (rows["median_ms"] - predictor.node_overhead_ms_).clip(lower=1e-4)[att.notna()].sum()
    got = sum((ts.y[k] + ts.extra[k])[ts.groups[k] == f"cifar_resnet20/{item}"].sum() for k in ts.y)
    assert got == pytest.approx(charged, rel=1e-6)
    # the profiler's per-node overhead stored with the table (scripted here) is what comes off every node
    assert predictor.node_overhead_ms_ == table.meta.node_overhead_ms == OVERHEAD_MS
    raw = LatencyTable(table.rows, replace(table.meta, node_overhead_ms=None))  # an older table: nothing off
    ts0, _, _ = LatencyPredictor(min_rows=10)._training_set(raw)
    assert sum(ts0.y[k].sum() + ts0.extra[k].sum() for k in ts0.y) > sum(ts.y[k].sum() + ts.extra[k].sum()
                                                                          for k in ts.y)
    for k, sel in predictor.selection_.items():
        if k != "calibration":
            assert 0 <= sel["extra_share"] < 1
    F = tpl.features("conv", [0], 1, *tpl.channels(tpl.width_matrix([{}])))
    _, layers = predictor.predict_layers("cifar_resnet20", {})
    extras = predictor.extras_["conv"].predict(F)[0]
    kernel = np.exp(predictor.estimators_["conv"].predict(F) + F[:, -1])[0]  # learnt per kernel FLOP
    assert layers[0].predicted_ms == pytest.approx(kernel + extras)
    assert layers[0].extra_ms == pytest.approx(extras)
    assert all(0 <= l.extra_ms < l.predicted_ms for l in layers)  # reported per layer (hwprune predict)


def test_layers_below_the_tables_range_are_predicted_smaller(table, space):
    """Trees predict a constant beyond their data; the kernels are learnt per FLOP, so that
    constant is a cost per FLOP and a layer smaller than any in the table is predicted
    smaller, not at the table's smallest time (as it is when log time itself is learnt)."""
    from sklearn.ensemble import ExtraTreesRegressor

    from hwprune.prediction.features import KERNEL_FLOPS_COL, _kernel_ms, _kernel_target, layer_features

    def shapes(channels):  # blocked convolutions at 16x16, every cin/cout pair
        cin, cout = (a.ravel() for a in np.meshgrid(channels, channels))
        X = layer_features("conv", 1, cin, cout, 3, 3, 1, 16, 16)
        return X, 1e-6 * np.exp(X[:, KERNEL_FLOPS_COL])  # 1 ns per kernel FLOP

    X, y = shapes(np.arange(64, 129, 4))  # the table
    below, truth = shapes(np.array([16, 32]))  # pruned below anything in it
    for a, ok in ((1.0, lambda p: np.allclose(p, truth, rtol=1e-6)), (0.0, lambda p: (p >= 0.99 * y.min()).all())):
        est = ExtraTreesRegressor(n_estimators=10, random_state=0).fit(X, _kernel_target(X, y, a))
        assert ok(_kernel_ms(est, below, a)), a
    assert truth.max() < 0.5 * y.min()
    # on a real table: the target the kernels were fitted on is what predicts, whatever
    # set_params says afterwards
    log_time = LatencyPredictor(min_rows=10, flop_exponent=0.0, **ONE_REGRESSOR).fit(table)
    before = log_time.predict("cifar_resnet20", [space.uniform(0.25)])
    log_time.set_params(flop_exponent=1.0)
    assert log_time.predict("cifar_resnet20", [space.uniform(0.25)]) == pytest.approx(before)


def _scripted_host(monkeypatch, table, factor):
    """hostcheck's backend times every unpruned model at ``factor`` x the table's time of it."""
    import hwprune.profiling.table_check as hc
    from hwprune.profiling.backends import backend_from_settings as real_create

    times = []

    def timing(art):
        assert art.onnx_path.exists()  # a real export of the unpruned model is what would be timed
        times.append(factor * hc.table_reference_ms(table, art.name.split("/")[0]))
        return times[-1]

    monkeypatch.setattr(hc, "backend_from_settings", lambda *a, **k: script_e2e(real_create(*a, **k), timing))
    return hc, times


@pytest.mark.parametrize("factor, matches", [(1.03, True), (1.9, False), (0.5, False)])
def test_host_check_compares_the_unpruned_model_now_with_the_table(table, monkeypatch, factor, matches):
    from hwprune.profiling.measure import MeasureConfig

    hc, times = _scripted_host(monkeypatch, table, factor)
    res = hc.check_host(table, sessions=2, tolerance=0.05, measure=MeasureConfig.quick())
    assert len(times) == 2 and res.matches is matches
    assert res.factor == pytest.approx(factor) and res.models[0].model == "cifar_resnet20"
    verdict = res.verdict()
    assert ("matches" in verdict) if matches else (("slower" if factor > 1 else "faster") in verdict)
    assert res.to_dict()["models"][0]["factor"] == pytest.approx(factor)
    with pytest.raises(HwpruneError, match="no model 'resnet18'"):
        hc.check_host(table, ["resnet18"])


@pytest.mark.slow
def test_table_check_cli_exits_1_on_a_drifted_host(table_path, tmp_path):
    """The real host against a table whose unpruned time is 0.1 us, faster than any host runs
    cifar_resnet20: exit 1, JSON out."""
    t = LatencyTable.load(table_path)
    rows = t.rows.copy()
    full = (rows["source"] == "e2e") & (rows["config"] == "full")
    rows.loc[full, "median_ms"] = 1e-4
    path = tmp_path / "fast.parquet"
    LatencyTable(rows, t.meta).save(path)
    r = run_cli("table", "check", str(path), "--sessions", "1", "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["matches"] is False and doc["factor"] > 10 and "slower" in doc["verdict"]
    r = run_cli_here("table", "check", str(path), "--model", "resnet18")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no model 'resnet18'" in r.stderr
