"""The memory format a model trains in is measured on a copy, never on the model itself."""

import torch

from hwprune.models import create_model
from hwprune.training.memory_format import fastest_format


def test_the_probe_leaves_the_model_and_the_random_state_alone():
    spec = create_model("cifar_resnet20")
    module = spec.module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    fmt = fastest_format(module, spec.input_size, torch.device("cpu"), torch.bfloat16)
    assert fmt in (torch.channels_last, torch.contiguous_format)
    assert torch.equal(rng, torch.get_rng_state())  # the probe's batch comes from its own generator
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and weights untouched
    assert all(p.grad is None for p in module.parameters())
    assert all(p.is_contiguous() for p in module.parameters())  # the model was not converted


def test_without_autocast_a_cpu_keeps_nchw_and_cuda_takes_channels_last():
    spec = create_model("cifar_resnet20")
    assert fastest_format(spec.module, spec.input_size, torch.device("cpu"), None) == torch.contiguous_format
    assert fastest_format(spec.module, spec.input_size, torch.device("cuda"), torch.bfloat16) == torch.channels_last
