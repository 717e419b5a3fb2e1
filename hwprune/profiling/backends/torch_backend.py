"""PyTorch backend: eager ``nn.Module`` inference on the CPU or a CUDA GPU.

What is measured
----------------
* ``measure_e2e``: a copy of the artifact's module is moved to the device, put in
  ``eval()`` mode and optionally converted to ``channels_last`` (timed as ``setup_ms``);
  the first forward is timed on its own (``first_run_ms``: lazy initialisation, cuDNN
  algorithm search, allocator warm-up); the steady state then follows the protocol of
  :func:`hwprune.profiling.measure.measure`. Everything runs under ``torch.inference_mode()`` with
  one input tensor allocated once on the device. ``fp16``/``bf16`` use ``torch.autocast``
  (weights stay fp32, as in mixed-precision deployment); the setting is recorded.
* CPU samples are wall-clock times of a synchronous forward; the thread count is set
  explicitly with ``torch.set_num_threads`` and recorded.
* CUDA samples are CUDA-event times around each forward (``start.record(); model(x);
  end.record(); end.synchronize()``): no launch is ever left unsynchronised. With
  ``use_cuda_graphs=True`` the forward is captured once into a ``torch.cuda.CUDAGraph``
  after a warm-up on a side stream and replayed in the timed loop; the capture time is
  added to ``setup_ms``.

Per-layer profile
-----------------
``profile_layers`` times every *leaf* module with forward pre/post hooks (CPU:
``perf_counter_ns``; CUDA: a pair of CUDA events per module call, resolved after the
forward's synchronize) in a run separate from the timed one, for at least the protocol's
``min_iters`` iterations and ``min_time_s`` seconds after a time-based warm-up, and
reports the median per module call. Eager PyTorch executes no graph-level fusions: every
module is its own executed unit (a BatchNorm after a Conv is a separate kernel, an
activation module is a separate kernel), so each module is reported as one
:class:`UnitKey`. Functional operations that are not modules (the residual ``+`` of a
ResNet block, ``torch.flatten``...) are not seen by hooks: their time is the gap between
the end-to-end time and the sum of the module times (see ``last_profile_summary``).
A module called several times per forward (a shared ``ReLU``) gets one row per call,
``node`` being ``path#k`` for the k-th call (k > 0).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from hwprune.errors import HwpruneError
from hwprune.profiling.measure import MeasureConfig, Measurement, Stats, collect, measure, wallclock_step
from hwprune.profiling.rows import UnitKey, UnitSpec
from hwprune.profiling.backends.base import Backend, LayerTiming, ModelArtifact, register_backend

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_PRECISIONS = ("fp32", "fp16", "bf16")

# torch activation module -> (UnitKey.op, UnitKey.activation). ONNX operator names where one
# exists (they are in units.KIND_OF_OP), else the generic "Activation" with the function's name.
_ACTIVATION_OPS: dict[type, tuple[str, str]] = {
    nn.ReLU: ("Relu", ""),
    nn.ReLU6: ("Clip", ""),
    nn.Hardtanh: ("Clip", ""),
    nn.Hardswish: ("HardSwish", ""),
    nn.Hardsigmoid: ("HardSigmoid", ""),
    nn.Sigmoid: ("Sigmoid", ""),
    nn.SiLU: ("Activation", "SiLU"),
    nn.GELU: ("Activation", "Gelu"),
    nn.LeakyReLU: ("Activation", "LeakyRelu"),
    nn.Tanh: ("Activation", "Tanh"),
    nn.Mish: ("Activation", "Mish"),
}

# UnitSpec.activation -> the ONNX-style name used in UnitKey.activation (as the other backends).
SPEC_ACTIVATION_NAMES = {"relu": "Relu", "relu6": "Clip", "hardswish": "HardSwish", "silu": "SiLU",
                         "sigmoid": "Sigmoid"}
_SPEC_OPS = {"conv": "Conv", "linear": "Linear", "maxpool": "MaxPool2d", "avgpool": "AvgPool2d",
             "gap": "AdaptiveAvgPool2d"}


# -----------------------------------------------------------------------------------------
# device helpers
# -----------------------------------------------------------------------------------------
def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _cuda_index(device: str) -> int:
    dev = torch.device(device)
    return dev.index if dev.index is not None else 0


def _cuda_reason(device: str) -> str | None:
    """None when ``device`` (``cuda`` or ``cuda:N``) is usable by torch here, else why not."""
    try:
        idx = _cuda_index(device)
    except (RuntimeError, ValueError):
        return f"'{device}' is not a device name torch understands (use cpu, cuda or cuda:N)"
    if not torch.cuda.is_available():
        built = torch.version.cuda
        build = f"built for CUDA {built}" if built else "built without CUDA"
        return f"no CUDA device visible to torch (torch {torch.__version__} {build})"
    n = torch.cuda.device_count()
    if idx >= n:
        return f"CUDA device {idx} requested but torch sees {n} device(s)"
    return None


def gpu_driver_version() -> str | None:
    """The NVIDIA driver version (``"580.65.06"``), or None when it cannot be read.

    Tries NVML (``pynvml``/``nvidia-ml-py``), then ``nvidia-smi``; informational only.
    """
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False)
            line = out.stdout.strip().splitlines()
            if out.returncode == 0 and line:
                return line[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


# -----------------------------------------------------------------------------------------
# unit keys of modules
# -----------------------------------------------------------------------------------------
def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _layout_of(t: Any) -> str:
    if isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous() \
            and t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "nchw"


def unit_key_for_module(module: nn.Module, in_shape: Sequence[int], layout: str = "nchw") -> UnitKey:
    """The :class:`UnitKey` of one eager call of ``module`` on an input of ``in_shape``.

    ``h``/``w`` are the input's spatial size (1 for non-spatial inputs); eager torch pads
    nothing, so the executed channel counts equal the logical ones.
    """
    shape = [int(s) for s in in_shape]
    batch = shape[0] if shape else 1
    c_in = shape[1] if len(shape) >= 2 else (shape[0] if shape else 0)
    h, w = (shape[-2], shape[-1]) if len(shape) >= 4 else (1, 1)
    kw_: dict[str, Any] = dict(batch=batch, h=h, w=w, layout=layout)
    if isinstance(module, nn.Conv2d):
        kh, kw = _pair(module.kernel_size)
        key = dict(op="Conv", cin=module.in_channels, cout=module.out_channels, kh=kh, kw=kw,
                   stride=_pair(module.stride)[0], groups=module.groups, dilation=_pair(module.dilation)[0])
    elif isinstance(module, nn.Linear):
        # every leading dimension is a row of the GEMM
        rows = 1
        for s in shape[:-1]:
            rows *= s
        key = dict(op="Linear", cin=module.in_features, cout=module.out_features)
        kw_.update(batch=rows if shape else 1, h=1, w=1)
    elif isinstance(module, nn.BatchNorm2d):
        key = dict(op="BatchNormalization", cin=module.num_features, cout=module.num_features)
    elif isinstance(module, nn.MaxPool2d):
        kh, kw = _pair(module.kernel_size)
        stride = module.stride if module.stride is not None else module.kernel_size
        key = dict(op="MaxPool2d", cin=c_in, cout=c_in, kh=kh, kw=kw, stride=_pair(stride)[0],
                   dilation=_pair(module.dilation)[0])
    elif isinstance(module, nn.AvgPool2d):
        kh, kw = _pair(module.kernel_size)
        stride = module.stride if module.stride is not None else module.kernel_size
        key = dict(op="AvgPool2d", cin=c_in, cout=c_in, kh=kh, kw=kw, stride=_pair(stride)[0])
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        oh, ow = _pair(module.output_size if module.output_size is not None else 1)
        oh = oh or h
        ow = ow or w
        key = dict(op="AdaptiveAvgPool2d", cin=c_in, cout=c_in, kh=max(1, h // max(1, oh)),
                   kw=max(1, w // max(1, ow)), stride=max(1, h // max(1, oh)))
    elif type(module) in _ACTIVATION_OPS:
        op, act = _ACTIVATION_OPS[type(module)]
        key = dict(op=op, cin=c_in, cout=c_in, activation=act)
    elif isinstance(module, nn.Flatten):
        key = dict(op="Flatten", cin=c_in, cout=c_in)
    else:
        key = dict(op=type(module).__name__, cin=c_in, cout=c_in)
    key.update(kw_)
    key.setdefault("cin_exec", key.get("cin", 0))
    key.setdefault("cout_exec", key.get("cout", 0))
    return UnitKey(**key)


def _first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, (tuple, list)):
        for a in args:
            t = _first_tensor(a)
            if t is not None:
                return t
    if isinstance(args, dict):
        for a in args.values():
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


# -----------------------------------------------------------------------------------------
# per-module timing hooks
# -----------------------------------------------------------------------------------------
class _LeafRecorder:
    """Forward pre/post hooks on every leaf module that time each call of one forward.

    CPU: ``perf_counter_ns`` stamps; CUDA: a pair of CUDA events per module call, taken from a
    pool reused by every forward and resolved only after the forward's synchronize.
    Samples are kept once :meth:`start_recording` has been called (after the warm-up).
    """

    def __init__(self, is_cuda: bool):
        self.is_cuda = is_cuda
        # per forward: (path, call index) -> [start, end] (ns on CPU, CUDA events on GPU)
        self.calls: dict[tuple[str, int], list] = {}
        self.order: list[tuple[str, int]] = []
        self.meta: dict[tuple[str, int], dict] = {}
        self.seen: dict[str, int] = defaultdict(int)
        self.pending: list[tuple[str, int]] = []  # stack of open calls (leaves never nest)
        self.ev_pool: list[torch.cuda.Event] = []
        self.ev_used = 0
        self.record = False
        self.samples: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.forward_ms: list[float] = []

    def _event(self) -> torch.cuda.Event:
        i = self.ev_used
        if i == len(self.ev_pool):
            self.ev_pool.append(torch.cuda.Event(enable_timing=True))
        self.ev_used += 1
        return self.ev_pool[i]

    def _hooks(self, path: str, mod: nn.Module):
        # the hooks hold the containers themselves (cleared between forwards, never rebound)
        calls, meta, order, seen, pending = self.calls, self.meta, self.order, self.seen, self.pending
        is_cuda, event = self.is_cuda, self._event

        def pre(_m, args):
            k = (path, seen[path])
            seen[path] += 1
            if k not in meta:
                x = _first_tensor(args)
                shape = tuple(x.shape) if x is not None else ()
                meta[k] = {"module": mod, "shape": shape, "layout": _layout_of(x)}
                order.append(k)
            if is_cuda:
                e = event()
                e.record()
                calls[k] = [e, None]
            else:
                calls[k] = [time.perf_counter_ns(), None]
            pending.append(k)

        def post(_m, _args, out):
            k = pending.pop() if pending else (path, seen[path] - 1)
            if is_cuda:
                e = event()
                e.record()
                calls[k][1] = e
            else:
                calls[k][1] = time.perf_counter_ns()
            if "out_shape" not in meta[k]:
                y = _first_tensor(out)
                meta[k]["out_shape"] = tuple(y.shape) if y is not None else ()

        return pre, post

    def attach(self, module: nn.Module) -> list:
        """Hook every leaf of ``module``; returns the handles to remove."""
        leaves = [(n, m) for n, m in module.named_modules() if n and not any(True for _ in m.children())]
        handles = []
        for path, mod in leaves:
            pre, post = self._hooks(path, mod)
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
        return handles

    def start_recording(self) -> None:
        self.record = True

    def start_forward(self) -> None:
        self.calls.clear()
        self.seen.clear()
        self.pending.clear()
        self.ev_used = 0

    def end_forward(self, wall_ms: float) -> None:
        """After the forward's synchronize: keep its module times (once recording)."""
        if not self.record:
            return
        for k, (a, b) in self.calls.items():
            if b is None:
                continue
            self.samples[k].append(float(a.elapsed_time(b)) if self.is_cuda else (b - a) / 1e6)
        self.forward_ms.append(wall_ms)

    def layer_timings(self, cov_threshold: float) -> tuple[list[LayerTiming], float]:
        """One row per recorded module call, in call order, and the sum of their medians."""
        rows: list[LayerTiming] = []
        total_layers = 0.0
        for k in self.order:
            if not self.samples.get(k):
                continue
            path, idx = k
            info = self.meta[k]
            mod = info["module"]
            unit = unit_key_for_module(mod, info["shape"], info["layout"])
            stats = Stats.from_samples(self.samples[k], cov_threshold)
            total_layers += stats.median
            rows.append(LayerTiming(
                unit=unit, stats=stats, node=path if idx == 0 else f"{path}#{idx}", layer=path,
                extra={"module_type": type(mod).__name__, "call_index": idx,
                       "input_shape": list(info["shape"]), "output_shape": list(info.get("out_shape", ())),
                       "fused": False, "timing": "cuda_events" if self.is_cuda else "perf_counter_ns"}))
        return rows, total_layers

    def summary(self, cov_threshold: float, total_layers: float) -> dict:
        """The profiled forward against the sum of its module medians."""
        fwd = Stats.from_samples(self.forward_ms, cov_threshold)
        return {
            "profiled_forward_median_ms": fwd.median, "sum_of_module_medians_ms": total_layers,
            "unhooked_gap_ms": fwd.median - total_layers, "iterations": len(self.forward_ms),
            "note": "the gap holds functional ops (residual adds, flatten) and hook overhead",
        }


# -----------------------------------------------------------------------------------------
# a torch module for a UnitSpec
# -----------------------------------------------------------------------------------------
def _activation_module(name: str) -> nn.Module | None:
    if not name:
        return None
    table = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
             "sigmoid": nn.Sigmoid}
    if name not in table:
        raise HwpruneError(f"unknown activation '{name}'", f"choose one of: {', '.join(table)}")
    return table[name]()


class UnitModule(nn.Module):
    """One source-level layer (the torch twin of :meth:`UnitSpec.to_onnx`).

    ``forward(x)`` or, for a unit with ``fused_add``, ``forward(x, z)``: the layer, then
    ``+ z`` (a residual), then the activation.
    """

    def __init__(self, spec: UnitSpec):
        super().__init__()
        self.spec = spec
        if spec.op == "conv":
            self.layer: nn.Module = nn.Conv2d(spec.cin, spec.cout, (spec.kh, spec.kw), stride=spec.stride,
                                              padding=spec.pad, dilation=spec.dilation, groups=spec.groups,
                                              bias=True)
        elif spec.op == "linear":
            self.layer = nn.Linear(spec.cin, spec.cout, bias=True)
        elif spec.op == "maxpool":
            self.layer = nn.MaxPool2d((spec.kh, spec.kw), stride=spec.stride, padding=spec.pad)
        elif spec.op == "avgpool":
            self.layer = nn.AvgPool2d((spec.kh, spec.kw), stride=spec.stride, padding=spec.pad)
        elif spec.op == "gap":
            self.layer = nn.AdaptiveAvgPool2d(1)
        else:
            raise HwpruneError(f"unknown unit op '{spec.op}'", "choose conv, linear, maxpool, avgpool or gap")
        self.act = _activation_module(spec.activation)
        self.fused_add = bool(spec.fused_add)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        y = self.layer(x)
        if z is not None:
            y = y + z
        if self.act is not None:
            y = self.act(y)
        return y


def build_unit_module(spec: UnitSpec) -> UnitModule:
    """Build the ``nn.Module`` of a :class:`UnitSpec` (random weights, fixed seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UnitModule(spec).eval()


def unit_key_for_spec(spec: UnitSpec, layout: str = "nchw") -> UnitKey:
    """The key of a whole micro-benchmarked unit (layer + residual add + activation)."""
    op = _SPEC_OPS.get(spec.op, spec.op)
    pool = spec.op in ("maxpool", "avgpool", "gap")
    cout = spec.cin if pool else spec.cout
    kh, kw, stride = spec.kh, spec.kw, spec.stride
    if spec.op == "gap":  # a global pool: the window is the whole input
        kh, kw, stride = spec.h, spec.w, 1
    elif spec.op == "linear":
        kh, kw, stride = 1, 1, 1
    h, w = (1, 1) if spec.op == "linear" else (spec.h, spec.w)
    return UnitKey(op=op, cin=spec.cin, cout=cout, kh=kh, kw=kw, stride=stride,
                   groups=spec.groups if spec.op == "conv" else 1,
                   dilation=spec.dilation if spec.op == "conv" else 1, h=h, w=w, batch=spec.batch,
                   activation=SPEC_ACTIVATION_NAMES.get(spec.activation, spec.activation),
                   fused_add=bool(spec.fused_add), layout=layout, cin_exec=spec.cin, cout_exec=cout)


# -----------------------------------------------------------------------------------------
# the backend
# -----------------------------------------------------------------------------------------
@register_backend
class TorchBackend(Backend):
    """Eager PyTorch on ``cpu`` or ``cuda``/``cuda:N``.

    ``threads``: intra-op CPU threads (``torch.set_num_threads``; default: torch's current
    count, recorded). ``precision``: ``fp32`` or ``fp16``/``bf16`` through ``torch.autocast``.
    ``channels_last``: convert the module and the input to NHWC memory format.
    ``use_cuda_graphs``: replay a captured CUDA graph in the timed loop (CUDA only).
    ``cudnn_benchmark``: let cuDNN pick its fastest algorithms (CUDA only; the search runs in
    the first, separately timed forward).
    """

    name = "torch"

    def __init__(self, *, threads: int | None = None, device: str = "cpu", precision: str = "fp32",
                 measure: MeasureConfig | None = None, channels_last: bool = False,
                 use_cuda_graphs: bool = False, cudnn_benchmark: bool = True):
        super().__init__(threads=threads, device=device, precision=precision, measure=measure)
        if precision not in _PRECISIONS:
            raise HwpruneError(f"torch backend: unknown precision '{precision}'",
                               f"choose one of: {', '.join(_PRECISIONS)}")
        self.is_cuda = _is_cuda(device)
        if use_cuda_graphs and not self.is_cuda:
            raise HwpruneError("CUDA graphs need a CUDA device", "use --device cuda or drop use_cuda_graphs")
        self.torch_device = torch.device(device)
        if self.is_cuda:
            self.torch_device = torch.device("cuda", _cuda_index(device))
            self.device = str(self.torch_device)
            torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        if threads is not None:
            if threads < 1:
                raise HwpruneError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        self.channels_last = bool(channels_last)
        self.use_cuda_graphs = bool(use_cuda_graphs)
        self.cudnn_benchmark = bool(cudnn_benchmark) if self.is_cuda else False
        self.autocast_dtype = _AUTOCAST_DTYPES.get(precision)
        self.last_profile_summary: dict = {}

    # -- availability ------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        device = str(device)
        if device == "cpu":
            return None
        if _is_cuda(device):
            return _cuda_reason(device)
        return f"the torch backend runs on 'cpu' or 'cuda[:N]', not '{device}'"

    @classmethod
    def version(cls) -> str:
        return torch.__version__

    def execution_provider(self) -> str:
        if self.is_cuda:
            return torch.cuda.get_device_name(self.torch_device)
        return "cpu"

    def settings(self) -> dict:
        s = super().settings()
        s.update({
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
            "channels_last": self.channels_last,
            "inference_mode": True,
            "cuda_graphs": self.use_cuda_graphs,
            "eager_fusions": False,
        })
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.torch_device)
            s.update({
                "torch_cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "cudnn_benchmark": self.cudnn_benchmark,
                "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "gpu_name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "timing": "cuda_events",
            })
            s["driver"] = gpu_driver_version()
        else:
            s["timing"] = "wall_clock"
        return s

    def needs_onnx(self) -> bool:
        return False

    # -- internals -----------------------------------------------------------------------
    def _sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def _autocast(self, cache_enabled: bool = True):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=self.autocast_dtype,
                              cache_enabled=cache_enabled)

    def _device_ctx(self):
        return torch.cuda.device(self.torch_device) if self.is_cuda else contextlib.nullcontext()

    def _module_of(self, model: ModelArtifact) -> nn.Module:
        if model.module is None:
            raise HwpruneError(f"the torch backend needs an nn.Module for '{model.name}'",
                               "build the artifact with module=...")
        return model.module

    def _prepare(self, module: nn.Module) -> tuple[nn.Module, float]:
        """Copy the module (the caller's stays where it is) and set it up; returns (module, setup ms)."""
        module = copy.deepcopy(module)
        t = time.perf_counter_ns()
        module = module.to(self.torch_device)
        module.eval()
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self._sync()
        return module, (time.perf_counter_ns() - t) / 1e6

    def _inputs(self, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        xs = []
        for shape in shapes:
            x = torch.randn(tuple(int(s) for s in shape), generator=gen).to(self.torch_device)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            xs.append(x)
        self._sync()
        return xs

    def _cuda_event_step(self, fn: Callable[[], object]) -> Callable[[], float]:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def step() -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return step

    def _capture_graph(self, module: nn.Module, xs: list[torch.Tensor]) -> Callable[[], object]:
        """Capture one forward into a CUDA graph (warm-up on a side stream first)."""
        side = torch.cuda.Stream(device=self.torch_device)
        side.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.cuda.stream(side):
            for _ in range(3):
                module(*xs)
        torch.cuda.current_stream(self.torch_device).wait_stream(side)
        self._sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = module(*xs)  # noqa: F841 - kept alive by the closure below
        self._sync()

        def replay() -> object:
            graph.replay()
            return static_out

        return replay

    def _measure_module(self, module: nn.Module, shapes: Sequence[Sequence[int]]) -> Measurement:
        cfg = self.measure_cfg
        with self._device_ctx():
            module, setup_ms = self._prepare(module)
            xs = self._inputs(shapes)
            # autocast's weight-cast cache must be off while a CUDA graph is captured
            with torch.inference_mode(), self._autocast(cache_enabled=not self.use_cuda_graphs):
                t = time.perf_counter_ns()
                module(*xs)
                self._sync()
                first_ms = (time.perf_counter_ns() - t) / 1e6
                fn: Callable[[], object] = lambda: module(*xs)  # noqa: E731
                if self.use_cuda_graphs:
                    t = time.perf_counter_ns()
                    fn = self._capture_graph(module, xs)
                    setup_ms += (time.perf_counter_ns() - t) / 1e6
                step = self._cuda_event_step(fn) if self.is_cuda else wallclock_step(fn)
                m = measure(step, cfg)
        m.setup_ms = setup_ms
        m.first_run_ms = first_ms
        return m

    # -- measurements ----------------------------------------------------------------------
    def measure_e2e(self, model: ModelArtifact) -> Measurement:
        return self._measure_module(self._module_of(model), [model.input_shape])

    def profile_layers(self, model: ModelArtifact) -> list[LayerTiming]:
        return self._profile_module(self._module_of(model), [model.input_shape])

    def _profile_module(self, module: nn.Module, shapes: Sequence[Sequence[int]]) -> list[LayerTiming]:
        cfg = self.measure_cfg
        with self._device_ctx():
            module, _ = self._prepare(module)
            xs = self._inputs(shapes)
            rec = _LeafRecorder(self.is_cuda)
            handles = rec.attach(module)

            def one_forward() -> float:
                rec.start_forward()
                t = time.perf_counter_ns()
                module(*xs)
                self._sync()
                wall = (time.perf_counter_ns() - t) / 1e6
                rec.end_forward(wall)
                return wall

            try:
                with torch.inference_mode(), self._autocast():
                    one_forward()  # first run: lazy initialisation, not recorded
                    # the protocol's one timing loop; one_forward synchronises, recording starts after the warm-up
                    collect(one_forward, cfg, on_start=rec.start_recording)
            finally:
                for h in handles:
                    h.remove()

        rows, total_layers = rec.layer_timings(cfg.cov_threshold)
        if rec.forward_ms:
            self.last_profile_summary = rec.summary(cfg.cov_threshold, total_layers)
        return rows

    def measure_unit(self, spec: UnitSpec, workdir: Path) -> list[LayerTiming]:
        """Time the unit's torch module end to end; one row keyed by the whole unit.

        Eager torch fuses nothing, so the residual add and the activation run as separate
        kernels inside this time; the row's ``extra`` says so.
        """
        module = build_unit_module(spec)
        shapes = list(spec.input_shapes().values())
        m = self._measure_module(module, shapes)
        layout = "nhwc" if self.channels_last and spec.op != "linear" else "nchw"
        kernels = [k for k in (spec.op, "add" if spec.fused_add else "", spec.activation) if k]
        lt = LayerTiming(unit=unit_key_for_spec(spec, layout), stats=m.stats, node="unit", layer="unit",
                         extra={"spec": spec.key(), "fused": False, "kernels": kernels})
        return [lt]
