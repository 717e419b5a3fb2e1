"""The interface every backend implements.

A backend turns a model artifact into measurements on one device with fixed settings:

* :meth:`Backend.measure_e2e` times the whole model (the table's ``e2e`` rows, the
  bench harness), with set-up and the first run reported apart;
* :meth:`Backend.profile_layers` times every unit the runtime executes, in a run
  separate from the timed run (profilers add overhead), keyed by a :class:`UnitKey`
  read from the runtime's own optimised graph;
* :meth:`Backend.measure_unit` micro-benchmarks one source-level layer in isolation and
  returns the executed nodes it became.

``Backend.unavailable_reason()`` says in one line why a backend cannot run here (library
or hardware missing), or returns None.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from hwprune.errors import BackendUnavailable
from hwprune.profiling.measure import MeasureConfig, Measurement, Stats
from hwprune.profiling.rows import UnitKey, UnitSpec


@dataclass
class ModelArtifact:
    """A model in the forms backends consume.

    ``onnx_path`` is used by ONNX Runtime and TensorRT, ``module`` (an ``nn.Module``)
    by the torch backend. ``input_shape`` includes the batch dimension.
    """

    input_shape: tuple[int, ...]
    onnx_path: Path | None = None
    module: Any = None
    name: str = "model"

    @property
    def batch(self) -> int:
        return int(self.input_shape[0])


@dataclass
class LayerTiming:
    """One executed unit of a profiled run."""

    unit: UnitKey
    stats: Stats
    node: str = ""  # the runtime's name for the executed node / layer
    layer: str = ""  # the source layer (module path) it implements, "" when none
    extra: dict = field(default_factory=dict)


class Backend(abc.ABC):
    name: ClassVar[str] = "base"

    def __init__(self, *, threads: int | None = None, device: str = "cpu", precision: str = "fp32",
                 measure: MeasureConfig | None = None):
        self.check_available(device)
        self.threads = threads
        self.device = device
        self.precision = precision
        self.measure_cfg = measure or MeasureConfig()

    # -- availability ------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        """None when the backend can run on ``device`` here, else one line saying why not."""

    @classmethod
    def check_available(cls, device: str = "cpu") -> None:
        """Raise :class:`BackendUnavailable` (one line) when the backend cannot run on ``device`` here."""
        reason = cls.unavailable_reason(device)
        if reason:
            raise BackendUnavailable(f"backend '{cls.name}' is not available here: {reason}")

    @classmethod
    def version(cls) -> str:
        return "unknown"

    # -- settings recorded with every table --------------------------------------
    def settings(self) -> dict:
        return {
            "backend": self.name,
            "backend_version": self.version(),
            "execution_provider": self.execution_provider(),
            "device": self.device,
            "threads": self.threads,
            "precision": self.precision,
        }

    def execution_provider(self) -> str:
        return self.device

    # -- measurements ------------------------------------------------------------
    @abc.abstractmethod
    def measure_e2e(self, model: ModelArtifact) -> Measurement:
        """End-to-end latency of one inference (ms) following the protocol."""

    def measure_pair(self, model: ModelArtifact, reference: ModelArtifact) -> tuple[Measurement, Measurement]:
        """End-to-end latency of ``model`` and of ``reference`` taken in the same window, so that
        their ratio is free of the host's drift. Backends that can alternate the two in one window
        override this; the fallback times the reference, then the model."""
        ref = self.measure_e2e(reference)
        return self.measure_e2e(model), ref

    @abc.abstractmethod
    def profile_layers(self, model: ModelArtifact) -> list[LayerTiming]:
        """Per-unit times of the executed graph, from a separate profiled run."""

    @abc.abstractmethod
    def measure_unit(self, spec: UnitSpec, workdir: Path) -> list[LayerTiming]:
        """Micro-benchmark one isolated unit: the times of the nodes the runtime executes for it."""

    def node_overhead_ms(self, workdir: Path) -> float | None:
        """What this backend's layer profiler adds to every node it times (ms per node), or
        None where it is not measured. The predictor takes it off each profiled node."""
        return None

    def needs_onnx(self) -> bool:
        """Whether artifacts must carry an ONNX file (else an nn.Module)."""
        return True


_BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    _load_all()
    return sorted(_BACKENDS)


def _load_all() -> None:
    import importlib
    import importlib.util

    for mod in ("onnxruntime", "torch_backend", "tensorrt_backend"):
        if importlib.util.find_spec(f"{__package__}.{mod}") is None:
            continue
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ImportError as e:  # e.g. torch absent on an edge device: that backend is simply not offered
            if mod == "onnxruntime" or "torch" not in str(e):
                raise


def get_backend_class(name: str) -> type[Backend]:
    _load_all()
    if name not in _BACKENDS:
        from hwprune.errors import HwpruneError
        raise HwpruneError(f"unknown backend '{name}'", f"choose one of: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def create_backend(name: str, **kwargs) -> Backend:
    return get_backend_class(name)(**kwargs)


def backend_options(settings: Mapping) -> dict:
    """The constructor arguments of ``settings['backend']`` that ``settings`` (a table's or a
    predictor's, as :meth:`Backend.settings` recorded them) holds: threads, device, precision and
    the backend's own options (ONNX Runtime's graph optimisation level, say)."""
    import inspect

    params = inspect.signature(get_backend_class(settings["backend"]).__init__).parameters
    out = {k: settings[k] for k in params if k not in ("self", "measure") and settings.get(k) is not None}
    out.setdefault("device", "cpu")
    return out


def backend_from_settings(settings: Mapping, measure: MeasureConfig | None = None) -> Backend:
    """A backend that measures as the one that recorded ``settings`` did."""
    return create_backend(settings["backend"], measure=measure, **backend_options(settings))
