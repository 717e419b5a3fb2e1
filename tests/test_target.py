"""The measured-target loop as an API, the method registry, and the CLI's agreement with both.

How the loop decides on uncertain measurements (intervals that reach across the target) is tested
in tests/test_noisy_host.py."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import params_ms, run_cli_here, script_the_meter, scripted_ort
from hwprune.training.checkpoint import Checkpoint
from hwprune.errors import HwpruneError
from hwprune.pruning.methods import METHODS, get_method
from hwprune.models import create_model
from hwprune.pruning.target import DeviceOptions, prune_to_target


@pytest.fixture
def scripted_device(monkeypatch):
    """Device measurements on the scripted device of :func:`conftest.params_ms`."""
    script_the_meter(monkeypatch)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    spec = create_model("cifar_resnet20")
    for m in spec.module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
    return Checkpoint.from_model(spec, meta={}).save(tmp_path_factory.mktemp("base") / "base.pt")


@pytest.fixture(scope="module")
def table(tmp_path_factory, quick):
    from hwprune.profiling.profiler import profile

    path = tmp_path_factory.mktemp("table") / "r20.parquet"
    profile("cifar_resnet20", path, scripted_ort(measure=quick), configs=10, micro_per_config=0)
    return path


def test_registry_lists_the_methods_and_refuses_unknown_ones():
    assert {"uniform", "l1", "groupnorm", "gcp"} <= set(METHODS.names())
    assert all(summary for _, summary in METHODS.rows())
    with pytest.raises(HwpruneError, match="unknown pruning method 'magic'.*choose one of uniform"):
        get_method("magic")


def test_cli_lists_methods_and_gives_one_line_for_an_unknown_one(base, tmp_path):
    r = run_cli_here("methods", "--json")
    assert r.returncode == 0 and {m["name"] for m in json.loads(r.stdout)} >= {"uniform", "gcp"}
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "magic", "--target", "0.5",
                     "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "unknown pruning method 'magic'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_api_meets_a_measured_target_and_the_cli_gives_the_same_widths(base, table, scripted_device, tmp_path):
    res = prune_to_target(base, "l1", "latency", 0.6, table=table, device=DeviceOptions(patience_s=0))
    meta = res.checkpoint.meta
    base_ms = params_ms(SimpleNamespace(module=Checkpoint.load(base).build_model().module))
    assert meta["base_measured_ms"] == pytest.approx(base_ms)
    ratio = meta["measured_ms"] / base_ms
    assert 0.45 <= ratio <= 0.6  # met: the correction aims at [0.57, 0.6] and keeps the widest try under 0.6
    met = [e["ratio"] for e in res.correction if e["ratio"] <= 0.6]
    assert ratio == pytest.approx(max(met))
    assert meta["measured_ms"] == pytest.approx(params_ms(SimpleNamespace(module=res.model)))
    kept = [e for e in res.correction if e.get("kept")]
    assert len(kept) == 1 and kept[0]["widths"] == res.widths.widths
    # every measurement carries its interval; the scripted device repeats itself exactly, so none is ambiguous
    for e in res.correction + [e for e in meta["goal_calibration"] if "ratio" in e]:
        assert e["ratio_lo"] == pytest.approx(e["ratio"]) == pytest.approx(e["ratio_hi"]) and not e["ambiguous"]
    assert meta["measured_speedup_ci"] == pytest.approx([meta["measured_speedup"]] * 2)
    assert "device_correction_decision" not in meta and "(median)" in meta["measured_estimator"]
    assert set(res.method_widths.widths) == set(res.widths.widths)  # the method's own choice is kept beside it
    out = tmp_path / "cli.pt"
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "l1", "--objective", "latency", "--target",
                     "0.6", "--table", str(table), "--patience", "0", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["widths"] == res.widths.widths
    assert Checkpoint.load(out).widths == res.widths.widths


def test_api_without_a_measured_target_prunes_to_the_cost(base):
    res = prune_to_target(base, "uniform", "flops", 0.5)
    assert res.correction is None and res.cost_fraction <= 0.5
    assert "measured_ms" not in res.checkpoint.meta and res.checkpoint.widths == res.widths.widths
    x = torch.randn(2, 3, 32, 32)
    assert res.model.eval()(x).shape == (2, 10)


def test_the_method_trains_on_the_fine_tuning_threads_and_they_are_restored(base, monkeypatch):
    from hwprune.pruning.target import Finetune

    seen = []
    uniform = METHODS.get("uniform")
    original = uniform.__call__

    def recording(self, job, goal):
        seen.append(torch.get_num_threads())
        return original(self, job, goal)

    monkeypatch.setattr(uniform, "__call__", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prune_to_target(base, "uniform", "flops", 0.5, finetune=Finetune(threads=2))
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_api_refuses_bad_settings_before_any_work(base):
    with pytest.raises(HwpruneError, match="--recover 'most'"):
        prune_to_target(base, "gcp", "flops", 0.5, options={"recover": "most"})
    with pytest.raises(HwpruneError, match="needs --data"):
        prune_to_target(base, "gcp", "flops", 0.5)
    with pytest.raises(HwpruneError, match="needs a latency table"):
        prune_to_target(base, "l1", "latency", 0.5)
