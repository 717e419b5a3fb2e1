"""Which tensor memory format a model trains (or runs) faster in, measured on this device.

Channels-last is oneDNN's fast layout for bf16 convolutions at the channel counts of unpruned
networks (multiples of 16). A pruned network's widths (6, 12, 25 channels) leave those kernels:
on a 2-core AVX-512 CPU one bf16 training step of a CIFAR ResNet-20 cut to those widths took
272 ms in channels-last against 63 ms in NCHW with 2 threads (with 1 thread, 121 ms against
108 ms), most of it in OpenMP barriers, layout reorders and the channels-last BatchNorm
backward. So the layout is timed, not assumed.
"""

from __future__ import annotations

import copy
import time

import torch

#: images per timed batch: enough to reach the kernels a full batch reaches, small enough to be cheap
PROBE_BATCH = 32
PROBE_STEPS = 2


def fastest_format(module: torch.nn.Module, input_size: tuple[int, int, int], device: torch.device,
                   amp_dtype: torch.dtype | None, train: bool = True) -> torch.memory_format:
    """``torch.channels_last`` or ``torch.contiguous_format``, whichever runs ``module`` faster here.

    On CUDA channels-last (tensor cores); on a CPU without autocast NCHW. On a CPU with autocast
    each layout runs one warm-up and ``PROBE_STEPS`` timed steps (forward and, when ``train``,
    backward) of a copy of ``module`` on a fixed random batch: ``module`` itself, its gradients,
    its BN statistics and the global random state are left as they were."""
    if device.type == "cuda":
        return torch.channels_last
    if amp_dtype is None:
        return torch.contiguous_format
    x0 = torch.randn((PROBE_BATCH, *input_size), generator=torch.Generator().manual_seed(0)).to(device)
    seconds = {}
    for fmt in (torch.channels_last, torch.contiguous_format):
        m = copy.deepcopy(module).to(memory_format=fmt).train(train)
        x = x0.contiguous(memory_format=fmt)
        seconds[fmt] = _timed(m, x, device, amp_dtype, train)
    return min(seconds, key=seconds.get)


def _timed(m: torch.nn.Module, x: torch.Tensor, device: torch.device, amp_dtype: torch.dtype, train: bool) -> float:
    """Seconds of ``PROBE_STEPS`` steps of ``m`` on ``x``, after one untimed step."""
    def step():
        with torch.autocast(device.type, dtype=amp_dtype), torch.set_grad_enabled(train):
            out = m(x)
        if train:
            out.float().sum().backward()

    step()
    t0 = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step()
    return time.perf_counter() - t0
