"""Does a table still describe this host? Time its unpruned models now and compare.

A table's fingerprint names the CPU, its cores and flags, but a virtual CPU hides what
decides its speed: the same "AMD EPYC" with 2 vCPUs ran resnet18 (batch 1, 1 thread) in
17 ms on one day and in 33.5 ms, steadily, on another. Absolute predictions from a
table taken in the other state are then wrong by that factor, whatever the predictor.

:func:`check_host` times the unpruned model of every model in the table with the
table's own backend and settings, in a few fresh sessions, and compares the median with
the table's end-to-end row of the same model (the ``full`` configuration every profile
measures first). The factor is ``now / when profiled``: 1.9 means this host runs the
model 1.9 times slower than the table says.

On a busy host the sessions themselves disagree. The value compared is therefore the
fast-state value of the sessions (:func:`~hwprune.profiling.measure.fast_state_reference`: the
median of the sessions within the tolerance of the fastest), the host state an anchored table
is normalised to, and a check whose sessions spread by more than the tolerance says that the
host is too noisy right now to tell, instead of rejecting the table.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np

from hwprune.profiling.backends import backend_from_settings
from hwprune.errors import HwpruneError
from hwprune.profiling.fingerprint import fingerprint
from hwprune.profiling.host_state import HostProbe
from hwprune.profiling.measure import MeasureConfig, fast_state_reference, session_spread
from hwprune.pruning.space import PruningSpace
from hwprune.profiling.table import LatencyTable

@dataclass
class ModelCheck:
    model: str
    table_ms: float  # the table's end-to-end median of the unpruned model
    now_ms: float  # fast-state value over this check's sessions
    sessions_ms: list[float] = field(default_factory=list)

    @property
    def factor(self) -> float:
        return self.now_ms / self.table_ms

    @property
    def spread(self) -> float:
        """``(max - min) / median`` of the sessions."""
        return session_spread(self.sessions_ms)


@dataclass
class HostCheck:
    """Per model, the unpruned model timed now against the table; ``matches`` when every
    factor lies within ``tolerance`` of 1."""

    tolerance: float
    models: list[ModelCheck]
    device_mismatch: str | None = None  # the fingerprint difference, when the identity differs

    @property
    def factor(self) -> float:
        """The median factor over the models."""
        return float(np.median([m.factor for m in self.models]))

    @property
    def matches(self) -> bool:
        return self.device_mismatch is None and all(abs(m.factor - 1) <= self.tolerance for m in self.models)

    @property
    def noisy(self) -> bool:
        """Whether the sessions of some model spread by more than the tolerance: the host is busy now."""
        return any(m.spread > self.tolerance for m in self.models)

    def verdict(self) -> str:
        if self.device_mismatch:
            return f"another device: {self.device_mismatch}"
        f = self.factor
        if self.matches:
            return f"the table matches this host (within {100 * self.tolerance:.0f}%: {f:.3f}x)"
        if self.noisy:
            worst = max(m.spread for m in self.models)
            return (f"this host is too noisy right now to tell (sessions spread {100 * worst:.0f}%, more than the "
                    f"{100 * self.tolerance:.0f}% tolerance; fastest state {f:.2f}x the table): check again when it is "
                    f"quieter, or with more --sessions")
        how = f"{f:.2f}x slower" if f > 1 else f"{1 / f:.2f}x faster"
        return (f"this host runs {how} than when the table was profiled: absolute predictions will be off by "
                f"that much (profile this host again, or compare relative latencies: validate --paired)")

    def to_dict(self) -> dict:
        return {"matches": self.matches, "noisy": self.noisy, "factor": self.factor, "tolerance": self.tolerance,
                "device_mismatch": self.device_mismatch, "verdict": self.verdict(),
                "models": [{**asdict(m), "factor": m.factor, "spread": m.spread} for m in self.models]}


def table_reference_ms(table: LatencyTable, model: str) -> float:
    """The table's end-to-end median of ``model``'s unpruned configuration."""
    e2e = table.e2e
    rows = e2e[(e2e["model"] == model) & (e2e["config"] == "full")]
    if not len(rows):
        raise HwpruneError(f"the table has no end-to-end timing of the unpruned {model}",
                           "profile it with hwprune profile (the full model is the first configuration)")
    return float(np.median(rows["median_ms"]))


def check_host(table: LatencyTable, models: Sequence[str] | None = None, sessions: int = 3,
               tolerance: float = 0.05, measure: MeasureConfig | None = None, progress=None) -> HostCheck:
    """Time the unpruned ``models`` (default: all of the table's) in ``sessions`` fresh sessions
    each, interleaved, with the table's backend and settings, and compare with the table."""
    if sessions < 1:
        raise HwpruneError("--sessions must be at least 1")
    s = table.settings
    models = list(models or table.meta.models)
    unknown = [m for m in models if m not in table.meta.models]
    if unknown:
        raise HwpruneError(f"the table has no model {unknown[0]!r}", f"it holds {', '.join(table.meta.models)}")
    refs = {m: table_reference_ms(table, m) for m in models}
    mismatch = table.mismatch({}, fingerprint())
    backend = backend_from_settings(s, measure or table_measure_config(table))
    batch = int(s.get("batch") or 1)
    times: dict[str, list[float]] = {m: [] for m in models}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="hwprune-check-") as d:
            probe = HostProbe(backend, batch, d)  # exports each unpruned model once
            arts = {m: probe.reference(m, PruningSpace.from_name(m, input_size=s.get("input_size"))) for m in models}
            total = sessions * len(models)
            for r in range(sessions):
                for k, m in enumerate(models):  # interleaved: a slow spell hits every model
                    if progress:
                        progress(m, r * len(models) + k, total)
                    times[m].append(backend.measure_e2e(arts[m]).value_ms)
            if progress:
                progress("", total, total)
    finally:
        torch.set_num_threads(threads)
    checks = [ModelCheck(m, refs[m], fast_state_reference(times[m], tolerance), times[m]) for m in models]
    return HostCheck(tolerance, checks, mismatch)


def table_measure_config(table: LatencyTable, adaptive: bool | None = None) -> MeasureConfig:
    """The end-to-end protocol whose numbers compare with ``table``'s: :meth:`MeasureConfig.profile`
    with the table's estimator; adaptive repetition as the table was profiled (anchored tables) unless
    ``adaptive`` says otherwise."""
    noise = table.meta.noise or {}
    cfg = MeasureConfig.profile(adaptive=bool(noise.get("anchored")) if adaptive is None else adaptive)
    name = (noise.get("estimator") or {}).get("name")
    return replace(cfg, estimator=name) if name else cfg
