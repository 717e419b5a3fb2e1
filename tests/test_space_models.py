import random

import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.models import create_model, list_models
from hwprune.space import PruningSpace, WidthConfig


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


def test_width_config_json_round_trip(tmp_path):
    space = PruningSpace.from_name("cifar_resnet20")
    cfg = space.uniform(0.5)
    p = cfg.save(tmp_path / "w.json")
    assert WidthConfig.load(p).widths == cfg.widths
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(HwpruneError, match="not valid JSON"):
        WidthConfig.load(tmp_path / "bad.json")


def test_a_model_torch_pruning_cannot_trace_is_one_clear_error():
    """shufflenet's channel shuffle (a reshape across groups) breaks Torch-Pruning's index mapping."""
    with pytest.raises(HwpruneError, match="cannot trace the channel dependencies of 'shufflenet_v2_x0_5'"):
        PruningSpace.from_name("shufflenet_v2_x0_5")
