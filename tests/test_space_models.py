import copy
import functools
import random

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import HealthCheck, given, settings, strategies as st

from hwprune.pruning.objectives import FlopsCost, ParamsCost
from hwprune.errors import HwpruneError
from hwprune.profiling.onnx_export import export_onnx
from hwprune.pruning.importance import keep_indices
from hwprune.models import create_model, list_models
from hwprune.pruning.widths import prune_widths, round_to_staircase, search_global, search_uniform
from hwprune.pruning.space import PruningSpace, WidthConfig, is_depthwise
from hwprune.profiling.layer_shapes import ModelTemplate, unblocked


@pytest.mark.parametrize("name,shape", [("cifar_resnet20", (3, 32, 32)), ("cifar_resnet56", (3, 32, 32)),
                                        ("cifar_vgg16_bn", (3, 32, 32)), ("cifar_mobilenet_v2", (3, 32, 32)),
                                        ("resnet18", (3, 224, 224))])
def test_zoo_resolves_names(name, shape):
    spec = create_model(name)
    assert spec.input_size == shape
    out = spec.module(torch.randn(2, *shape))
    assert out.shape == (2, spec.num_classes)


def test_zoo_lists_torchvision_and_cifar_and_rejects_unknown():
    names = list_models()
    assert "resnet50" in names and "cifar_resnet110" in names and "mobilenet_v3_small" in names
    with pytest.raises(HwpruneError, match="unknown model 'resnet51'.*resnet50"):
        create_model("resnet51")


def test_cifar_resnet56_has_standard_stages():
    m = create_model("cifar_resnet56").module
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == 9
    assert m.layer3[0].conv1.out_channels == 64
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(0.86e6, rel=0.03)


def test_residual_stages_are_one_group_each():
    space = PruningSpace.from_name("cifar_resnet20")
    kinds = {g.id: g.kind for g in space.groups}
    assert len(space) == 12
    stage2 = space["layer2.0.conv2"]
    assert stage2.kind == "residual" and "layer2.0.downsample.0" in stage2.modules and "layer2.2.conv2" in stage2.modules
    assert kinds["layer1.0.conv1"] == "conv"


def test_depthwise_is_coupled_with_its_producer():
    space = PruningSpace.from_name("mobilenet_v2")
    dw = [g for g in space.groups if g.kind == "depthwise"]
    assert dw and all(len(g.modules) == 2 for g in dw)
    cfg = space.sample(random.Random(1))
    m = space.apply(cfg)
    for g in dw:
        conv = dict(m.named_modules())[g.modules[1]]
        assert conv.groups == conv.in_channels == conv.out_channels == cfg.widths[g.id]


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_mobilenet_v2", "cifar_vgg16_bn", "resnet18"])
def test_apply_gives_requested_widths(name):
    space = PruningSpace.from_name(name)
    cfg = space.sample(random.Random(3))
    m = space.apply(cfg)
    assert space.widths_of(m).widths == cfg.widths
    with torch.no_grad():
        assert m(torch.randn(space.input_shape)).shape[-1] == space.model(torch.randn(space.input_shape)).shape[-1]


def test_samples_cover_the_space_and_favour_hardware_steps():
    space = PruningSpace.from_name("resnet50")
    rng = random.Random(0)
    fr, mult = [], 0
    n = 0
    for _ in range(60):
        cfg = space.sample(rng)
        for g in space.groups:
            w = cfg.widths[g.id]
            assert 1 <= w <= g.channels
            fr.append(w / g.channels)
            mult += w % 8 == 0
            n += 1
    assert min(fr) < 0.2 and max(fr) == 1.0
    assert mult / n > 0.5  # denser on multiples of 8 than uniform sampling (12.5%)


def test_validate_rejects_bad_configurations():
    space = PruningSpace.from_name("cifar_resnet20")
    with pytest.raises(HwpruneError, match="unknown channel group 'layer9.conv'"):
        space.validate({"layer9.conv": 3})
    with pytest.raises(HwpruneError, match="between 1 and 16, got 0"):
        space.validate({"conv1": 0})
    with pytest.raises(HwpruneError, match="between 1 and 16, got 17"):
        space.validate({"conv1": 17})
    with pytest.raises(HwpruneError, match="must be an integer"):
        space.validate({"conv1": 3.5})
    with pytest.raises(HwpruneError, match="is for model 'resnet18'"):
        space.validate(WidthConfig("resnet18", {"conv1": 3}))


def test_width_array_matches_validate_and_rejects_what_it_rejects():
    space = PruningSpace.from_name("cifar_resnet20")
    rng = random.Random(3)
    configs = [space.sample(rng) for _ in range(50)] + [{}, {"conv1": 8}, {"conv1": 8.0}, {"conv1": np.int64(4)}]
    ids = [g.id for g in space.groups]
    want = np.array([[space.validate(c).widths[i] for i in ids] for c in configs])
    assert np.array_equal(space.width_array(configs), want)
    for bad, msg in [({"layer9.conv": 3}, "unknown channel group"), ({"conv1": 0}, "between 1 and 16, got 0"),
                     ({"conv1": 3.5}, "must be an integer"), ({"conv1": True}, "must be an integer"),
                     (WidthConfig("resnet18", {"conv1": 3}), "is for model 'resnet18'")]:
        with pytest.raises(HwpruneError, match=msg):
            space.width_array(configs[:3] + [bad])


def test_unique_rows_groups_equal_rows_and_keeps_distinct_ones():
    from hwprune.prediction.predictor import FEATURE_NAMES, unique_rows

    rng = np.random.default_rng(0)
    F = rng.integers(0, 3, (400, len(FEATURE_NAMES))).astype(float)
    F[200:] = F[:200]  # every row twice
    U, inverse = unique_rows(F)
    assert np.array_equal(U[inverse], F) and len(U) == len(np.unique(F, axis=0)) <= 200


def test_width_config_json_round_trip(tmp_path):
    space = PruningSpace.from_name("cifar_resnet20")
    cfg = space.uniform(0.5)
    p = cfg.save(tmp_path / "w.json")
    assert WidthConfig.load(p).widths == cfg.widths
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(HwpruneError, match="not valid JSON"):
        WidthConfig.load(tmp_path / "bad.json")


def test_a_model_torch_pruning_cannot_trace_is_one_clear_error():
    """torchvision's own shufflenet, whose channel shuffle is a function (a reshape across
    groups), breaks Torch-Pruning's index mapping; the zoo's shufflenet wraps it in a module."""
    with pytest.raises(HwpruneError, match="cannot trace the channel dependencies of 'tv_shufflenet'"):
        PruningSpace(torchvision.models.shufflenet_v2_x0_5(), (1, 3, 64, 64), name="tv_shufflenet")


# -- grouped convolutions and channel shuffles ---------------------------------------------
GROUPED = {  # name -> (input size, hypothesis examples), small to stay fast
    "resnext50_32x4d": (32, 1), "regnet_y_400mf": (32, 2), "regnet_x_400mf": (32, 2), "shufflenet_v2_x1_0": (32, 2),
}


@functools.lru_cache(maxsize=None)
def grouped_space(name):
    torch.manual_seed(0)
    return PruningSpace.from_name(name, input_size=GROUPED[name][0])


class Mixed(nn.Module):
    """A residual block around two grouped 3x3 convolutions (4 then 6 conv groups), then an
    inverted residual with a depthwise 3x3 and a classifier; its BN statistics are random,
    so that every channel matters."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout, k=1, groups=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(3, 32, 3)
        self.a, self.b, self.b2 = cbr(32, 48), cbr(48, 48, 3, groups=4), cbr(48, 48, 3, groups=6)
        self.c = nn.Sequential(nn.Conv2d(48, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.expand, self.dw = cbr(32, 64), cbr(64, 64, 3, groups=64)
        self.project = nn.Conv2d(64, 40, 1)
        self.fc = nn.Linear(40, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.running_mean, std=0.1)
                nn.init.uniform_(m.running_var, 0.5, 1.5)
                nn.init.uniform_(m.weight, 0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c(self.b2(self.b(self.a(x))))
        return self.fc(self.project(self.dw(self.expand(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    return PruningSpace(Mixed().eval(), (1, 3, 12, 12), name="mixed")


def masked_reference(space, keep):
    """The unpruned model with every removed channel's readers zeroed: what surgery must compute."""
    ref = copy.deepcopy(space.model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for g in space.groups:
            removed = sorted(set(range(g.channels)) - set(keep[g.id]))
            for name in g.consumers if removed else ():
                m = mods[name]
                if isinstance(m, nn.Linear):
                    m.weight[:, removed] = 0
                elif not is_depthwise(m):
                    per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
                    for r in removed:
                        k, p = divmod(r, per_in)
                        m.weight[k * per_out:(k + 1) * per_out, p] = 0
    return ref.eval()


def assert_valid(space, widths):
    for g in space.groups:
        w = widths[g.id]
        assert 1 <= w <= g.channels and w % g.step == 0, (g.id, w, g.step)


def assert_structure(space, pruned):
    """Grouped convolutions keep their conv groups; depthwise ones stay depthwise."""
    before = dict(space.model.named_modules())
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Conv2d) and before[name].groups > 1:
            if is_depthwise(before[name]):
                assert m.groups == m.in_channels == m.out_channels, name
            else:
                assert m.groups == before[name].groups, name
                assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name


def test_grouped_groups_know_their_step():
    rx = grouped_space("resnext50_32x4d")
    assert (rx["layer1.0.conv1"].step, rx["layer1.0.conv1"].kind) == (32, "conv")  # feeds the grouped conv
    assert (rx["layer1.0.conv2"].step, rx["layer1.0.conv2"].kind) == (32, "grouped")  # comes out of it
    assert rx["layer1.0.conv3"].step == 1 and "step 32" in str(rx["layer1.0.conv2"])
    assert rx.valid_widths("layer1.0.conv2") == list(range(32, 129, 32))
    ry = grouped_space("regnet_y_400mf")
    b = ry["trunk_output.block1.block1-0.f.b.0"]
    assert (b.channels, b.step) == (48, 6)  # group width 8: the 6 conv groups stay, each narrows
    assert "trunk_output.block1.block1-0.f.se.fc2" in b.modules  # squeeze-excitation rescales the same channels
    assert rx.round_width("layer1.0.conv2", 88) == 96 and rx.round_width("layer1.0.conv2", 88, "down") == 64


def test_mixed_space_steps_and_lcm(mixed):
    steps = {g.id: (g.kind, g.step) for g in mixed.groups}
    assert steps == {"stem.0": ("residual", 1), "a.0": ("conv", 4), "b.0": ("grouped", 12), "b2.0": ("grouped", 6),
                     "expand.0": ("depthwise", 1), "project": ("conv", 1)}
    assert mixed.channel_units("b.0").shape == (4, 12)  # position p of each of 12 conv groups of 4 channels


@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_model_runs_exports_and_matches_onnxruntime(name, tmp_path):
    space = grouped_space(name)
    cost = ParamsCost(space)

    @settings(max_examples=GROUPED[name][1], deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2 ** 31 - 1))
    def check(seed):
        cfg = space.sample(random.Random(seed), min_fraction=0.05)
        assert_valid(space, cfg.widths)
        pruned = space.apply(cfg).eval()
        assert space.widths_of(pruned).widths == cfg.widths
        assert_structure(space, pruned)
        assert cost.total([cfg])[0] == sum(p.numel() for p in pruned.parameters())
        x = torch.randn(2, *space.input_shape[1:])
        with torch.no_grad():
            y = pruned(x)
        path = export_onnx(pruned, tuple(x.shape), tmp_path / f"{seed}.onnx")
        (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
        np.testing.assert_allclose(out, y.numpy(), rtol=1e-3, atol=1e-4)

    check()


@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_full_widths_reproduce_the_original_exactly(name):
    space = grouped_space(name)
    x = torch.randn(2, *space.input_shape[1:])
    with torch.no_grad():
        assert torch.equal(space.apply(space.full()).eval()(x), space.model.eval()(x))


@pytest.mark.parametrize("name", ["mixed", "regnet_x_400mf", "shufflenet_v2_x1_0"])
def test_surgery_removes_exactly_the_unkept_channels(name, mixed):
    """Importance-chosen survivors (whole units of grouped groups): the pruned model computes
    what the unpruned one does with the removed channels' readers zeroed."""
    space = mixed if name == "mixed" else grouped_space(name)
    rng = np.random.default_rng(3)
    cfg = space.sample(random.Random(4), min_fraction=0.05)
    keep = keep_indices({g.id: rng.random(g.channels) for g in space.groups}, cfg, space)
    x = torch.randn(2, *space.input_shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(space.apply(cfg, keep=keep).eval()(x), masked_reference(space, keep)(x),
                                   rtol=1e-4, atol=1e-5)


def test_every_width_generator_respects_grouped_and_depthwise_constraints(mixed):
    rng = random.Random(0)
    for _ in range(200):
        assert_valid(mixed, mixed.sample(rng, min_fraction=0.05).widths)
    for f in np.linspace(0.02, 1.0, 50):
        assert_valid(mixed, mixed.uniform(float(f)).widths)
        assert_valid(mixed, mixed.uniform(float(f), multiple=8).widths)
    for g in mixed.groups:
        for w in range(-3, g.channels + 5):
            assert g.round_width(w) in g.valid_widths()
    flops = FlopsCost(mixed)
    assert_valid(mixed, search_uniform(mixed, flops, 0.5).widths)
    scores = {g.id: np.random.default_rng(1).random(g.channels) for g in mixed.groups}
    assert_valid(mixed, search_global(mixed, scores, flops, 0.4).widths)
    res = prune_widths(mixed, "l1", flops, 0.5)
    assert_valid(mixed, res.widths.widths)
    stair = round_to_staircase(mixed, _Staircase(mixed), mixed.sample(random.Random(2)), window=8)
    assert_valid(mixed, stair.widths)
    for cfg in (res.widths, stair):
        pruned = mixed.apply(cfg, keep=keep_indices(scores, cfg, mixed))
        assert_structure(mixed, pruned)
        assert FlopsCost(mixed).total([cfg])[0] == _conv_macs(pruned, mixed.input_shape)


class _Staircase:
    """Latency that only grows at every 16th channel of each group."""

    def __init__(self, space):
        self.space = space

    def total(self, configs):
        return np.array([sum(-(-self.space.validate(c).widths[g.id] // 16) for g in self.space.groups)
                         for c in configs], dtype=float)


def _conv_macs(model, shape):
    macs = []

    def hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
        cin = m.in_channels // m.groups if isinstance(m, nn.Conv2d) else m.in_features
        macs.append(out[0].numel() * cin * k)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.randn(shape))
    for h in hooks:
        h.remove()
    return sum(macs)


def test_invalid_grouped_configurations_are_one_line_errors(mixed):
    rx = grouped_space("resnext50_32x4d")
    with pytest.raises(HwpruneError) as e:
        rx.validate({"layer1.0.conv2": 88})
    assert str(e.value) == ("layer1.0.conv2 group: width 88 is not a multiple of 32 "
                            "(grouped convolution layer1.0.conv2, groups=32)")
    with pytest.raises(HwpruneError, match=r"^a\.0 group: width 6 is not a multiple of 4 \(grouped convolution b\.0"):
        mixed.apply({"a.0": 6})
    uneven = [i for i in range(48) if i not in (0, 13)]  # drops position 0 of conv group 0, position 1 of group 1
    with pytest.raises(HwpruneError, match="same positions in each of its 4 conv groups") as e:
        mixed.apply({"a.0": 44}, keep={"a.0": uneven[:44]})
    assert "\n" not in str(e.value)


def test_shufflenet_prunes_inside_the_blocks_and_keeps_the_shuffled_channels():
    space = grouped_space("shufflenet_v2_x1_0")
    ids = {g.id for g in space.groups}
    assert {"conv1.0", "conv5.0", "stage2.0.branch2.0", "stage4.3.branch2.0"} <= ids
    assert not any(i.endswith(("branch2.5", "branch1.2", "branch1.0")) for i in ids)  # block outputs: shuffled
    assert all(g.step == 1 for g in space.groups)
    assert space["stage2.1.branch2.0"].kind == "depthwise" and "stage2.1.branch2.3" in space["stage2.1.branch2.0"].modules


def test_grouped_layers_in_the_template():
    tpl = ModelTemplate(grouped_space("regnet_x_400mf"))
    s = tpl.slots[tpl.layer_names.index("trunk_output.block1.block1-0.f.b.0")]
    assert (s.kind, s.groups) == ("conv", 2) and s.in_group != s.out_group
    # NCHWc runs a grouped convolution only with input and output channels per group multiples of the block
    # (depthwise layers keep their own rule: channels a multiple of 4)
    nb = unblocked([False, False, False, True, True], [64, 64, 32, 48, 50], [4, 4, 2, 1, 1], [64, 32, 32, 48, 50])
    assert nb.tolist() == [False, True, False, False, True]


def test_grouped_family_profiles_and_predicts(tmp_path, quick):
    """A grouped family through the whole latency path: profiled (scripted timings, real ONNX Runtime
    graph), fitted, and predicted at valid pruned widths."""
    from conftest import scripted_ort
    from hwprune.prediction.predictor import LatencyPredictor
    from hwprune.profiling.profiler import profile

    path = tmp_path / "regnet.parquet"
    table = profile("regnet_x_400mf", path, scripted_ort(measure=quick), configs=12, micro_per_config=0,
                    input_size=32)
    pred = LatencyPredictor().fit(table)
    space = PruningSpace.from_name("regnet_x_400mf", input_size=32)
    cfgs = [space.uniform(f) for f in (0.4, 0.7, 1.0)]
    ms = pred.predict("regnet_x_400mf", cfgs)
    assert np.all(np.isfinite(ms)) and np.all(ms > 0)
    e2e = table.e2e
    full = float(e2e.loc[e2e["config"] == "full", "median_ms"].iloc[0])
    assert ms[2] == pytest.approx(full, rel=0.1)  # the unpruned model, a table row, is predicted near its time
