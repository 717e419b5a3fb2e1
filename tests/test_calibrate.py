"""Calibrating a fitted predictor for another device from a few end-to-end timings.

Every timing is scripted: the synthetic device runs each part of the source predictor's
decomposition (dense blocked and NCHW kernels, extras) at a known factor and adds a known time
per executed node, so the calibration must recover those numbers. The source is fitted on 12
configurations of the shipped cifar_resnet20 table with one regressor (fast)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import measured, run_cli_here, script_e2e
from hwprune.errors import HwpruneError
from hwprune.prediction import artifact
from hwprune.prediction import calibrate as cal
from hwprune.prediction.calibrated import CalibratedPredictor
from hwprune.prediction.calibration_plan import choose_configs
from hwprune.prediction.correction import fit_correction
from hwprune.prediction.decomposition import PARTS, decompose
from hwprune.prediction.predictor import LatencyPredictor
from hwprune.profiling.table import LatencyTable
from hwprune.pruning.space import PruningSpace

SHIPPED = Path(__file__).resolve().parents[1] / "latency_tables" / "onnxruntime-cpu-t2-b1" / "cifar_resnet20.parquet"
MODEL = "cifar_resnet20"
#: the synthetic device: a factor per part (depthwise parts unused by a ResNet) and ms per node
TRUTH = {"conv": 1.3, "conv_nchw": 2.0, "dwconv": 1.0, "dwconv_nchw": 1.0, "extras": 1.6}
NODE_MS = 0.004


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    t = LatencyTable.load(SHIPPED)
    items = sorted(set(t.e2e["item"]))[:12]
    table = LatencyTable(t.rows[t.rows["item"].isin(items)], t.meta).save(d / "r20.parquet")
    pred = LatencyPredictor(regressor="extra_trees", calibration="measured").fit(LatencyTable.load(table))
    return table, artifact.save_predictor(pred, d / "r20.predictor.zip", table)


@pytest.fixture(scope="module")
def source(source_files):
    return cal.load_source(source_files[1])


@pytest.fixture(scope="module")
def space():
    return PruningSpace.from_name(MODEL)


def device_ms(src: cal.Source, configs) -> np.ndarray:
    """The synthetic device's end-to-end time of ``configs``."""
    x = np.array([*(TRUTH[p] for p in PARTS), NODE_MS])
    return decompose(src.predictor, MODEL, configs).design() @ x


def scripted_device(src, space, monkeypatch, k, fail=None, seed=0):
    """Make every calibration backend time the configurations ``choose_configs`` picks for ``k``
    at :func:`device_ms`, without exporting or running anything."""
    plan = dict(choose_configs(space, src.predictor, k, seed))
    real = cal.Target.create

    def create(self, measure=None):
        be = real(self, measure)

        def timing(art):
            if fail:
                raise RuntimeError(fail)
            cid = art.name.split("/")[1]  # "reference": the unpruned model the sessions are anchored to
            return float(device_ms(src, [space.full() if cid == "reference" else plan[cid]])[0])

        script_e2e(be, timing)
        be.needs_onnx = lambda: False
        return be

    monkeypatch.setattr(cal.Target, "create", create)
    return plan


def test_configuration_choice_is_deterministic_covers_and_nests(source, space):
    a, b = choose_configs(space, source.predictor, 8), choose_configs(space, source.predictor, 8)
    assert [(i, c.widths) for i, c in a] == [(i, c.widths) for i, c in b]
    assert [i for i, _ in a[:3]] == ["full", "uniform_x2", "uniform_x3"] and a[0][1].widths == space.full().widths
    p = source.predictor.predict(MODEL, [c for _, c in a[:3]])
    assert 0.3 < p[1] / p[0] <= 0.5 and 0.2 < p[2] / p[0] <= 1 / 3  # 2x and 3x by predicted latency
    assert len({json.dumps(c.widths, sort_keys=True) for _, c in a}) == 8
    small = choose_configs(space, source.predictor, 4)
    assert [c.widths for _, c in small] == [c.widths for _, c in a[:4]]  # a larger calibration extends a smaller
    assert [i for i, _ in choose_configs(space, source.predictor, 1)] == ["full"]
    other = choose_configs(space, source.predictor, 8, seed=5)
    assert [c.widths for _, c in other[:3]] == [c.widths for _, c in a[:3]] and other != a


def test_calibration_recovers_the_factors_of_a_scripted_device(source, space, monkeypatch):
    scripted_device(source, space, monkeypatch, 12)
    run = cal.measure_here(source, MODEL, 12, cal.Target(threads=1), rounds=1, anchor=True)
    assert [len(s) for s in run.sessions][:2] == [3, 1]  # the unpruned model in REFERENCE_SESSIONS sessions
    full_ms = float(device_ms(source, [space.full()])[0])  # a steady host: every anchor alike, nothing rescaled
    assert all(m.state_ref_ms == pytest.approx(full_ms) and m.norm_factor == pytest.approx(1) for s in run.sessions
               for m in s)
    pred = cal.calibrate(source, run)
    c = pred.corrections_[MODEL]
    for part in ("conv", "conv_nchw", "extras"):
        assert c.factors[part] == pytest.approx(TRUTH[part], rel=1e-6), part
    assert c.overhead_ms_per_node == pytest.approx(NODE_MS, rel=1e-6)
    assert c.shrinkage == 0.0 and c.loo_rmspe < 1e-6 and c.loo["source"] > 0.1
    fresh = [space.sample(random.Random(7)) for _ in range(20)]
    assert np.allclose(pred.predict(MODEL, fresh), device_ms(source, fresh), rtol=1e-6)
    total, layers = pred.predict_layers(MODEL, fresh[0])
    assert total == pytest.approx(float(device_ms(source, fresh[:1])[0])) and sum(
        l.predicted_ms for l in layers) == pytest.approx(total)
    assert pred.settings_["threads"] == 1 and pred.source_settings_ == source.predictor.settings_


def test_anchored_sessions_are_brought_to_the_hosts_fast_state():
    from hwprune.profiling.measure import Measurement, Stats

    def m(ms, ref=None):
        return Measurement(Stats.from_samples([ms, ms]), state_ref_ms=ref)

    # the host ran 1.5x slower through the second session of each configuration, its probes included
    sessions = [[m(2.0, 1.0), m(3.0, 1.5)], [m(4.0, 1.0), m(6.0, 1.5)], [m(1.0, 1.0), m(1.5, 1.5)]]
    out = cal.renormalised(sessions)
    assert [x.value_ms for ss in out for x in ss] == pytest.approx([2, 2, 4, 4, 1, 1])
    assert out[0][1].norm_factor == pytest.approx(1 / 1.5) and out[0][1].stats.min == pytest.approx(2)
    again = cal.renormalised(out + [[m(9.0, 3.0)]])  # more sessions: all rescaled from their timed values
    assert [x.value_ms for ss in again for x in ss] == pytest.approx([2, 2, 4, 4, 1, 1, 3])
    assert cal.renormalised([[m(2.0)]])[0][0].value_ms == 2.0  # timed without a reference: as timed


def test_shrinkage_keeps_a_single_ratio_device_at_one_ratio(source, space):
    configs = [c for _, c in choose_configs(space, source.predictor, 12)]
    dec = decompose(source.predictor, MODEL, configs)
    noise = 1 + 0.005 * np.random.default_rng(0).standard_normal(len(configs))
    c = fit_correction(dec.design(), 1.7 * dec.predicted_ms * noise)
    assert c.ratio == pytest.approx(1.7, rel=0.01)
    assert all(f == pytest.approx(c.ratio, rel=0.02) for f in c.factors.values()), c.factors
    assert c.overhead_ms_per_node * dec.nodes.mean() < 0.01 * dec.predicted_ms.mean()
    # few configurations: no unpenalised fit is tried, and one configuration gives the ratio alone
    few = fit_correction(dec.design()[:3], device_ms(source, configs[:3]))
    assert "0" not in few.loo and few.samples == 3 and all(v >= 0 for v in few.vector())
    one = fit_correction(dec.design()[:1], 2.0 * dec.predicted_ms[:1])
    assert one.shrinkage is None and one.loo_rmspe is None and list(one.factors.values()) == pytest.approx([2.0] * 5)


@pytest.fixture(scope="module")
def calibrated_files(source_files, source, space, tmp_path_factory):
    """``hwprune calibrate`` on the scripted device (6 configurations), as files."""
    mp = pytest.MonkeyPatch()
    try:
        scripted_device(source, space, mp, 6)
        out = tmp_path_factory.mktemp("calibrated") / "dev.predictor.zip"
        r = run_cli_here("calibrate", "--predictor", str(source_files[1]), "--model", MODEL, "--samples", "6",
                         "--threads", "1", "--rounds", "1", "--out", str(out), "--json")
    finally:
        mp.undo()
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_calibrated_predictor_saves_loads_and_records_its_source(calibrated_files, source_files, source, space):
    out, doc = calibrated_files
    table = Path(doc["table"])
    assert table == out.with_name("dev.parquet") and doc["models"][MODEL]["samples"] == 6
    pred = artifact.load_predictor(out, table)  # the measurements' table is the one it records
    assert isinstance(pred, CalibratedPredictor)
    fresh = [space.sample(random.Random(3)) for _ in range(10)]
    assert np.allclose(pred.predict(MODEL, fresh), device_ms(source, fresh), rtol=0.02)
    header = artifact.read_header(out)
    cal_info = header["summary"]["calibration"]
    assert cal_info["source"]["table"]["sha256"] == artifact.table_digest(source_files[0])
    assert cal_info["models"][MODEL]["samples"] == 6 and cal_info["device"]["cpu_cores"] > 0
    assert pred.calibration_[MODEL]["loo_rmspe"] == doc["models"][MODEL]["loo_rmspe"]
    t = LatencyTable.load(table)
    assert len(t.e2e) == 6 and t.meta.plan["calibration"]["models"] == {MODEL: 6}
    assert np.allclose(sorted(t.e2e["median_ms"]), sorted(doc["models"][MODEL]["measured_ms"]))
    with pytest.raises(HwpruneError, match="calibrated for cifar_resnet20"):
        pred.predict("resnet18", [{}])
    with pytest.raises(HwpruneError, match="not fitted on a table"):
        pred.fit(t)
    with pytest.raises(HwpruneError, match="only the end-to-end measurements of a calibration"):
        LatencyPredictor().fit(t)


def test_validate_accepts_the_calibrated_predictor(calibrated_files, monkeypatch, tmp_path):
    """``hwprune validate --table T2 --predictor P2``: the table its measurements went to names
    the calibrated device and settings, so validation measures there (scripted here)."""
    import hwprune.prediction.validate as hv

    out, doc = calibrated_files
    real, made = hv.backend_from_settings, []

    def create(*a, **k):
        be = script_e2e(real(*a, **k), lambda art: 1.0)
        be.needs_onnx = lambda: False
        made.append(be)
        return be

    monkeypatch.setattr(hv, "backend_from_settings", create)
    r = run_cli_here("validate", "--table", doc["table"], "--predictor", str(out), "--model", MODEL, "--samples",
                     "2", "--rounds", "1", "--plot", str(tmp_path / "v.png"), "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    pred = artifact.load_predictor(out)
    got = [s["predicted_ms"] for s in v["samples"]]
    assert got == pytest.approx(list(pred.predict(MODEL, [s["widths"] for s in v["samples"]])))
    assert v["settings"]["threads"] == 1 and [s["measured_ms"] for s in v["samples"]] == [1.0, 1.0]
    assert made and made[0].settings()["graph_optimization"] == LatencyTable.load(doc["table"]).settings["graph_optimization"]


ORT_DISABLED = {"backend": "onnxruntime", "backend_version": "1", "execution_provider": "CPUExecutionProvider",
                "device": "cpu", "threads": 1, "precision": "fp32", "inter_op_threads": 1,
                "graph_optimization": "disabled", "spinning": False, "batch": 1}


def test_recorded_settings_rebuild_the_backend_that_recorded_them():
    """A calibration to ONNX Runtime without graph optimisations is validated, checked and
    metered without them: the backend's own options travel with the settings."""
    from hwprune.bench.harness import GatedMeter
    from hwprune.models import create_model
    from hwprune.profiling.backends import backend_from_settings, backend_options
    from hwprune.pruning.target import DeviceOptions, _meter

    assert backend_options(ORT_DISABLED) == {"threads": 1, "device": "cpu", "precision": "fp32",
                                             "graph_optimization": "disabled", "spinning": False}
    be = backend_from_settings(ORT_DISABLED)
    assert be.settings()["graph_optimization"] == "disabled" and be.settings()["spinning"] is False
    meter = _meter(ORT_DISABLED, create_model(MODEL).module, (3, 32, 32), DeviceOptions(quick=True))
    assert isinstance(meter, GatedMeter) and meter.be.settings()["graph_optimization"] == "disabled"
    assert meter.be.threads == 1


def test_prune_accepts_the_calibrated_predictor(calibrated_files, tmp_path):
    out, doc = calibrated_files
    pred = artifact.load_predictor(out)
    base = Path(__file__).resolve().parents[1] / "hwprune" / "assets" / "cifar_resnet20.pt"
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "l1", "--objective", "latency", "--target",
                     "0.6", "--table", doc["table"], "--predictor", str(out), "--no-measure",
                     "--out", str(tmp_path / "p.pt"), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["predicted_ms"] == pytest.approx(float(pred.predict(MODEL, [p["widths"]])[0]))
    assert p["base_predicted_ms"] == pytest.approx(float(pred.predict(MODEL, [{}])[0]))
    assert p["predicted_ms"] <= 0.6 * p["base_predicted_ms"] * 1.0001


def test_bad_input_is_one_line_and_writes_nothing(source_files, source, space, monkeypatch, tmp_path):
    src, out = str(source_files[1]), tmp_path / "x.predictor.zip"
    scripted_device(source, space, monkeypatch, 3, fail="device lost")
    cases = [
        (["--model", MODEL, "--samples", "0"], "at least one configuration"),
        (["--model", "mobilenet_v2", "--samples", "3"], "never covered model 'mobilenet_v2'"),
        (["--model", MODEL, "--samples", "3"], "failed on onnxruntime: RuntimeError: device lost"),
        (["--model", MODEL, "--samples", "3", "--graph-optimization", "none"], "graph optimisation level 'none'"),
        (["--model", MODEL, "--samples", "3", "--backend", "torch", "--graph-optimization", "all"],
         "has no option 'graph_optimization'"),
        (["--model", MODEL, "--bundle", str(tmp_path / "b"), "--bundle-results", str(tmp_path / "b")], "give one"),
        (["--model", MODEL, "--out", str(tmp_path / "x.parquet")], "both be written"),
        (["--model", MODEL, "--samples", "3", "--backend", "tensorrt"], "backend 'tensorrt' is not available here"),
    ]
    for args, message in cases:
        given = args if "--out" in args else [*args, "--out", str(out)]
        r = run_cli_here("calibrate", "--predictor", src, "--threads", "1", *given)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len([line for line in r.stderr.splitlines() if line.startswith("error")]) == 1, r.stderr
        assert not out.exists() and not out.with_name("x.parquet").exists()
    with pytest.raises(HwpruneError, match="itself calibrated"):
        CalibratedPredictor.derive(_a_calibrated(source), {}, {}, {}, {}, {})


def _a_calibrated(source):
    dec = decompose(source.predictor, MODEL, [PruningSpace.from_name(MODEL).full()])
    corr = fit_correction(dec.design(), dec.predicted_ms)
    return CalibratedPredictor.derive(source.predictor, {MODEL: corr}, {"batch": 1}, {}, {}, {})


def test_a_bundle_carries_the_calibration_to_a_torch_free_device(source_files, source, space, monkeypatch, tmp_path):
    """Host writes the bundle, the device runner times it (scripted), the host calibrates on its results."""
    import hwprune.device.run as dev

    bundle = tmp_path / "bundle"
    r = run_cli_here("calibrate", "--predictor", str(source_files[1]), "--model", MODEL, "--samples", "3",
                     "--bundle", str(bundle), "--threads", "1")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    widths = {str(bundle / i["onnx"]): i["widths"] for i in manifest["items"]}
    monkeypatch.setattr(dev, "time_model", lambda onnx, s, cfg: measured(float(device_ms(source, [widths[str(onnx)]])[0])))
    monkeypatch.setattr(dev, "profile_model", lambda *a, **k: [])
    out = tmp_path / "dev.predictor.zip"
    r = run_cli_here("calibrate", "--predictor", str(source_files[1]), "--bundle-results", str(bundle), "--out", str(out))
    assert r.returncode == 2 and "no results" in r.stderr and not out.exists()
    assert dev.run_bundle(bundle, threads=1, log=lambda s: None) == (3, 3)
    r = run_cli_here("calibrate", "--predictor", str(source_files[1]), "--bundle-results", str(bundle), "--out",
                     str(out), "--json")
    assert r.returncode == 0, r.stderr
    pred = artifact.load_predictor(out)
    assert pred.settings_["backend"] == "onnxruntime" and pred.settings_["threads"] == 1
    assert pred.calibration_[MODEL]["configs"] == [i["config"] for i in manifest["items"]]
    configs = [i["widths"] for i in manifest["items"]]
    direct = fit_correction(decompose(source.predictor, MODEL, configs).design(), device_ms(source, configs))
    assert np.allclose(pred.corrections_[MODEL].vector(), direct.vector(), rtol=1e-9)  # the device's timings, fitted
    other = artifact.save_predictor(source.predictor, tmp_path / "other.predictor.zip", SHIPPED)  # another table's
    r = run_cli_here("calibrate", "--predictor", str(other), "--bundle-results", str(bundle), "--out",
                     str(tmp_path / "y.predictor.zip"))
    assert r.returncode == 2 and "another source predictor" in r.stderr
