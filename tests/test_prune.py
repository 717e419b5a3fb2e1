"""Channel surgery, cost objectives, baseline pruners, checkpoints of pruned models."""

import json
import random

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import params_ms, run_cli, run_cli_here, script_the_meter, scripted_ort
from hwprune.training.checkpoint import Checkpoint
from hwprune.pruning.objectives import FlopsCost, MemoryCost, ParamsCost, objective
from hwprune.errors import HwpruneError
from hwprune.profiling.onnx_export import export_onnx
from hwprune.pruning.importance import CRITERIA, channel_importance, keep_indices
from hwprune.models import ModelSpec, create_model
from hwprune.pruning.widths import prune_widths, round_to_staircase, search_global, search_uniform
from hwprune.pruning.space import PruningSpace, WidthConfig

MODELS = {  # name -> input size used in the tests (small, to stay fast)
    "cifar_resnet20": 32, "cifar_mobilenet_v2": 32, "cifar_vgg16_bn": 32, "resnet18": 64, "mobilenet_v3_small": 64,
}
_SPACES: dict = {}


def space_of(name):
    if name not in _SPACES:
        torch.manual_seed(0)
        _SPACES[name] = PruningSpace.from_name(name, input_size=MODELS[name])
        _randomize_bn(_SPACES[name].model)
    return _SPACES[name]


def _randomize_bn(model):
    """Non-trivial BN statistics, so that kept channels matter."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def configs(name):
    space = space_of(name)
    return st.integers(0, 2 ** 31 - 1).map(lambda s: space.sample(random.Random(s), min_fraction=0.05))


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_pruned_model_runs_exports_and_matches_onnxruntime(name, data, tmp_path_factory):
    space = space_of(name)
    cfg = data.draw(configs(name))
    pruned = space.apply(cfg).eval()
    x = torch.randn(2, *space.input_shape[1:])
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (2, create_model(name).num_classes)
    assert space.widths_of(pruned).widths == cfg.widths
    # parameter count follows the configuration's arithmetic
    assert ParamsCost(space).total([cfg])[0] == sum(p.numel() for p in pruned.parameters())
    path = export_onnx(pruned, tuple(x.shape), tmp_path_factory.mktemp("onnx") / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, y.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_widths_reproduce_the_original_exactly(name):
    space = space_of(name)
    x = torch.randn(2, *space.input_shape[1:])
    with torch.no_grad():
        assert torch.equal(space.apply(space.full()).eval()(x), space.model.eval()(x))


def test_kept_channels_carry_their_weights():
    space = space_of("cifar_resnet20")
    scores = channel_importance(space, criterion="l1")
    cfg = space.uniform(0.5)
    keep = keep_indices(scores, cfg)
    pruned = space.apply(cfg, keep=keep)
    w0 = dict(space.model.named_modules())["layer1.0.conv1"].weight
    w1 = dict(pruned.named_modules())["layer1.0.conv1"].weight
    k_out, k_in = keep["layer1.0.conv1"], keep["conv1"]
    assert torch.equal(w1, w0[k_out][:, k_in])
    assert np.all(scores["layer1.0.conv1"][k_out].min() >= np.delete(scores["layer1.0.conv1"], k_out).max())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_scores_every_group(criterion):
    space = space_of("cifar_resnet20")
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))] if criterion == "taylor" else None
    scores = channel_importance(space, criterion=criterion, batches=batches)
    assert set(scores) == {g.id for g in space.groups}
    assert all(len(scores[g.id]) == g.channels and np.isfinite(scores[g.id]).all() for g in space.groups)


def test_cost_objectives():
    space = space_of("cifar_resnet20")
    full, half = space.full(), space.uniform(0.5)
    flops, params, mem = FlopsCost(space), ParamsCost(space), MemoryCost(space)
    assert flops.total([full])[0] == pytest.approx(40.6e6, rel=0.03)  # ResNet-20's well-known 41M MACs
    assert 0.2 < flops.fraction(half) < 0.3  # both in and out channels halve
    assert mem.fraction(half) == pytest.approx(0.5, abs=0.02)
    mc = params.marginal(full, step=1)
    # one channel of the 16-wide stage is read by 3x3 filters of 16-channel layers and more
    assert mc["layer1.0.conv1"] == 2 * 9 * 16 + 2  # out of conv1 and in of conv2, plus its BN scale and shift
    with pytest.raises(HwpruneError, match="needs a latency table"):
        objective("latency", space)
    with pytest.raises(HwpruneError, match="unknown objective"):
        objective("watts", space)


@pytest.mark.parametrize("method", ["uniform", "l1", "groupnorm"])
@pytest.mark.parametrize("target", [0.5, 0.3])
def test_baselines_reach_their_target(method, target):
    space = space_of("cifar_resnet20")
    res = prune_widths(space, method, FlopsCost(space), target)
    assert res.cost_fraction <= target + 1e-9
    assert res.cost_fraction > target - 0.05  # and do not overshoot much
    assert all(len(res.keep[g]) == w for g, w in res.widths.widths.items())


def test_unreachable_target_and_bad_method():
    space = space_of("cifar_resnet20")
    with pytest.raises(HwpruneError, match="below what the narrowest configuration reaches"):
        search_uniform(space, FlopsCost(space), 0.0001)
    with pytest.raises(HwpruneError, match="below what the narrowest"):
        search_global(space, channel_importance(space, criterion="l1"), FlopsCost(space), 0.0001)
    with pytest.raises(HwpruneError, match="unknown pruning method"):
        prune_widths(space, "magic", FlopsCost(space), 0.5)
    with pytest.raises(HwpruneError, match="between 1 and 16, got 0"):
        space.apply({"conv1": 0})
    with pytest.raises(HwpruneError, match="unknown channel group 'features.0.0'"):
        space.apply(WidthConfig("", {"features.0.0": 8}))


class StairLatency:
    """A fake latency objective with a staircase every 8 channels."""

    name = "latency"

    def __init__(self, space):
        self.space = space

    def total(self, cfgs):
        return np.array([sum(-(-w // 8) for w in self.space.validate(c).widths.values()) for c in cfgs], dtype=float)


def test_round_to_staircase_takes_free_channels():
    space = space_of("cifar_resnet20")
    cfg = space.validate({"layer2.0.conv1": 17, "layer3.0.conv1": 40})
    out = round_to_staircase(space, StairLatency(space), cfg, window=8)
    assert out.widths["layer2.0.conv1"] == 24  # 17..24 cost the same step: take the widest
    assert out.widths["layer3.0.conv1"] == 40  # 41 would start a new step
    assert StairLatency(space).total([out])[0] == StairLatency(space).total([cfg])[0]


def test_pruned_checkpoint_round_trip(tmp_path):
    space = space_of("cifar_resnet20")
    cfg = space.sample(random.Random(5))
    pruned = space.apply(cfg).eval()
    ck = Checkpoint.from_model(ModelSpec("cifar_resnet20", pruned, (3, 32, 32), 10), widths=cfg.widths,
                               meta={"objective": "flops"})
    path = ck.save(tmp_path / "p.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["widths"] == cfg.widths and "state_dict" in raw
    back = Checkpoint.load(path).build_model().module.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))


def test_cli_prune_and_export(tmp_path):
    """The first command runs the real entry point; the others run in this process (no interpreter
    start-up each)."""
    spec = create_model("cifar_resnet20")
    _randomize_bn(spec.module)
    base = Checkpoint.from_model(spec, meta={}).save(tmp_path / "base.pt")
    out = tmp_path / "pruned.pt"
    r = run_cli("prune", "--checkpoint", str(base), "--method", "l1", "--objective", "flops", "--target", "0.5",
                "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["cost_fraction"] <= 0.5 and doc["flops"] > 0
    ck = Checkpoint.load(out)
    assert ck.widths and ck.meta["method"] == "l1"
    r = run_cli_here("export", "--checkpoint", str(out), "--onnx", str(tmp_path / "p.onnx"))
    assert r.returncode == 0, r.stderr
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)
    # bad input: one line, nothing overwritten
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "l1", "--target", "0.0001", "--out", str(out))
    assert r.returncode == 2 and "below what the narrowest" in r.stderr and "Traceback" not in r.stderr
    assert Checkpoint.load(out).meta["target"] == 0.5
    r = run_cli_here("prune", "--checkpoint", str(base), "--objective", "latency", "--target", "0.5", "--out",
                     str(out))
    assert r.returncode == 2 and "needs a latency table" in r.stderr
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "gcp", "--recover", "most", "--target", "0.5",
                     "--out", str(out))
    assert r.returncode == 2 and "--recover 'most'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli_here("prune", "--checkpoint", str(out), "--target", "0.5", "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "already pruned" in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = run_cli_here("prune", "--checkpoint", str(tmp_path / "junk.pt"), "--target", "0.5", "--out",
                     str(tmp_path / "y.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_cli_prune_meets_a_measured_latency_target(tmp_path, quick, monkeypatch):
    """GCP-f style: a FLOPs-driven method re-planned until the measured latency meets --latency-target.
    On the scripted device (:func:`conftest.params_ms`) the FLOPs target of 0.6 measures above 0.6 of
    the base latency (parameters shrink less than FLOPs, and every run costs 0.2 ms): the goal is
    lowered until it is met."""
    from types import SimpleNamespace

    from hwprune.profiling.profiler import profile

    table = tmp_path / "r20.parquet"
    profile("cifar_resnet20", table, scripted_ort(measure=quick), configs=10, micro_per_config=0)
    script_the_meter(monkeypatch)
    spec = create_model("cifar_resnet20")
    _randomize_bn(spec.module)
    base = Checkpoint.from_model(spec, meta={}).save(tmp_path / "base.pt")
    out, chart = tmp_path / "p.pt", tmp_path / "w.png"
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "l1", "--objective", "flops", "--target", "0.6",
                     "--latency-target", "0.6", "--table", str(table), "--threads", "1", "--chart", str(chart),
                     "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    base_ms = params_ms(SimpleNamespace(module=spec.module))
    assert doc["latency_target"] == 0.6 and doc["base_measured_ms"] == pytest.approx(base_ms)
    log = doc["device_correction"]
    assert log[0]["ratio"] > 0.6 and log[0]["predicted_fraction"] <= 0.6  # the FLOPs target alone misses
    assert all(e["measured_ms"] == pytest.approx(base_ms * e["ratio"]) and e["settled"] for e in log)
    kept = [e for e in log if e.get("kept")]
    assert len(kept) == 1 and 0.57 <= kept[0]["ratio"] <= 0.6  # met within the 3% tolerance
    assert doc["cost_fraction"] == pytest.approx(kept[0]["predicted_fraction"])
    assert doc["cost_fraction"] < log[0]["predicted_fraction"]  # pruned further than the FLOPs target said
    pruned = Checkpoint.load(out).build_model().module
    assert doc["measured_ms"] == pytest.approx(params_ms(SimpleNamespace(module=pruned)))
    assert doc["measured_speedup"] == pytest.approx(base_ms / doc["measured_ms"])
    assert chart.read_bytes()[:4] == b"\x89PNG"
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "l1", "--target", "0.6", "--latency-target",
                     "0.6", "--out", str(tmp_path / "q.pt"))
    assert r.returncode == 2 and "--table" in r.stderr and "Traceback" not in r.stderr
