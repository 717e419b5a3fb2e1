"""Carry a fitted predictor to another device with a few end-to-end measurements.

Profiling a device takes a table of hundreds of profiled configurations; a predictor fitted on
one device's table can instead be *calibrated* for another device (or other settings of the
same one: another batch size, thread count, runtime or graph optimisation level) from ``K``
configurations timed end to end there:

1. :func:`~hwprune.prediction.calibration_plan.choose_configs` picks ``K`` configurations that
   cover the width space (the unpruned model and the 2x and 3x uniform shrinks first);
2. :func:`measure_here` times them with the usual protocol on this machine's backend (every
   configuration in ``rounds`` fresh sessions, round-robin, the unpruned model in
   :data:`~hwprune.profiling.measure.REFERENCE_SESSIONS`), or a device with only the torch-free
   runner times them from a bundle (:mod:`hwprune.prediction.calibration_bundle`);
3. :func:`calibrate` fits, per model, a correction of the source's decomposition
   (:mod:`hwprune.prediction.correction`) and returns a
   :class:`~hwprune.prediction.calibrated.CalibratedPredictor`;
4. :func:`save_calibration` writes it together with the measurements as an end-to-end-only
   latency table of the new device (its fingerprint and settings), whose hash the predictor
   records: ``hwprune validate --table THAT --predictor P2`` and ``hwprune prune --table THAT
   --predictor P2`` then measure on the calibrated device and settings.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.prediction.predictor import LatencyPredictor
from hwprune.pruning.space import PruningSpace, WidthConfig

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Target:
    """The backend and settings a calibration measures with (``batch`` None: the source's)."""

    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    batch: int | None = None
    #: backend options by name, e.g. ``{"graph_optimization": "disabled"}`` for ONNX Runtime
    options: Mapping = field(default_factory=dict)

    def create(self, measure=None):
        """The backend (a one-line error when it is unavailable here or lacks an option)."""
        import inspect

        from hwprune.profiling.backends import create_backend, get_backend_class

        known = inspect.signature(get_backend_class(self.backend).__init__).parameters
        for name in self.options:
            if name not in known:
                raise HwpruneError(f"backend '{self.backend}' has no option '{name}'")
        return create_backend(self.backend, threads=self.threads, device=self.device, measure=measure,
                              **dict(self.options))


@dataclass
class Source:
    """The fitted predictor a calibration starts from, and what it was fitted on."""

    predictor: LatencyPredictor
    #: its table (name, SHA-256), settings, device identity and parameters
    info: dict

    @property
    def input_size(self):
        return self.predictor.settings_.get("input_size")

    def space(self, model: str) -> PruningSpace:
        """A fresh space of ``model`` at the source's input size (its module can be pruned)."""
        self.predictor.check_model(model)
        return PruningSpace.from_name(model, input_size=self.input_size)


@dataclass
class Measured:
    """The configurations of one model a calibration timed, with the device and settings."""

    model: str
    configs: list[tuple[str, WidthConfig]]
    #: per configuration, its fresh sessions' measurements (:class:`~hwprune.profiling.measure.Measurement`)
    sessions: list[list]
    settings: dict
    fingerprint: dict
    seconds: float = 0.0
    input_shape: tuple = ()

    def picks(self) -> list:
        """Per configuration, the session with the median time (the lower middle for an even count)."""
        from hwprune.profiling.measure import median_session

        # copies: median_session sums every session's attempts into the one it picks
        return [median_session(iter([copy.copy(m) for m in s]).__next__, len(s)) for s in self.sessions]

    @property
    def ms(self) -> np.ndarray:
        return np.array([m.value_ms for m in self.picks()], dtype=np.float64)


def load_source(predictor: str | Path | None = None, table: str | Path | None = None) -> Source:
    """The source predictor: the artifact ``predictor`` (checked against ``table`` when both are
    given), or the predictor of ``table`` (cached beside it, fitted when missing)."""
    from hwprune.prediction.artifact import load_predictor, predictor_for, read_header, table_digest
    from hwprune.profiling.fingerprint import device_identity

    if predictor is None and table is None:
        raise HwpruneError("no source predictor", "give --predictor P (from `hwprune fit`) or --table T")
    if table is not None:
        pred = predictor_for(table, predictor)
        tab = {"name": Path(table).name, "sha256": table_digest(table)}
    else:
        pred = load_predictor(predictor)
        tab = dict(read_header(predictor).get("table") or {})
    from hwprune.prediction.calibrated import CalibratedPredictor

    if isinstance(pred, CalibratedPredictor):
        raise HwpruneError("the source predictor is itself calibrated",
                           "calibrate the predictor fitted on a table (hwprune fit), not a calibrated one")
    info = {"table": tab, "settings": dict(pred.settings_), "device": device_identity(pred.fingerprint_),
            "params": {k: v for k, v in pred.get_params().items()}}
    return Source(pred, info)


def _failure(e: Exception) -> str:
    """A runtime's exception as one line: its type and the first line of its message."""
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else "no detail"
    return f"{type(e).__name__}: {detail}"


def _measure_session(backend, art):
    """One fresh-session end-to-end measurement; a failure of the runtime is one line."""
    try:
        m = backend.measure_e2e(art)
    except HwpruneError:
        raise
    except Exception as e:  # a runtime fails in many ways (out of memory, an unsupported node...)
        raise HwpruneError(f"measuring {art.name} failed on {backend.name}: {_failure(e)}",
                           "check that this backend runs the model here (hwprune devices)") from None
    if not (np.isfinite(m.value_ms) and m.value_ms > 0):
        raise HwpruneError(f"measuring {art.name} on {backend.name} gave {m.value_ms!r} ms")
    return m


def _artifacts(backend, space: PruningSpace, configs, shape, directory: str) -> list:
    from hwprune.profiling.backends import ModelArtifact
    from hwprune.profiling.onnx_export import export_onnx

    arts = []
    for k, (cid, cfg) in enumerate(configs):
        module = space.apply(cfg).eval()
        art = ModelArtifact(input_shape=shape, module=module, name=f"{space.name}/{cid}")
        if backend.needs_onnx():
            art.onnx_path, art.module = export_onnx(module, shape, Path(directory) / f"c{k}.onnx"), None
        arts.append(art)
    return arts


#: how far the reference may move around a session before its normalisation is doubted; the
#: sessions whose reference lies within it of the fastest one set the host state (as a profile's)
ANCHOR_TOLERANCE = 0.05


def measure_configs(backend, space: PruningSpace, configs: Sequence[tuple[str, WidthConfig]], batch: int,
                    rounds: int = 2, progress: ProgressFn | None = None, anchor: bool = False) -> list[list]:
    """Every configuration's fresh-session measurements on ``backend``: ``rounds`` sessions each
    (the unpruned model, id ``full``, at least :data:`REFERENCE_SESSIONS`), round-robin over
    the configurations so that a slow spell of the host hits different ones in different rounds.

    With ``anchor`` a short probe of the unpruned model runs between consecutive
    sessions, as a profile's reference windows do (:mod:`hwprune.profiling.host_state`), and each
    session is normalised to the host's fast state: scaled by the fast-state reference
    (:func:`~hwprune.profiling.measure.fast_state_reference` of the sessions' references) over
    its own reference, the mean of the probes before and after it. A host whose speed swings
    between sessions then calibrates to one state of it instead of a mixture. It is off by
    default: on the one noisy host it was benchmarked on (``benchmarks/calibrate.py``), where the
    speed changed faster than the probes could follow, the anchored calibration was no better."""
    import torch

    from hwprune.profiling.measure import REFERENCE_SESSIONS

    want = [max(rounds, REFERENCE_SESSIONS) if cid == "full" else rounds for cid, _ in configs]
    total, done = sum(want), 0
    sessions: list[list] = [[] for _ in configs]
    threads = torch.get_num_threads()
    if backend.name != "torch":
        torch.set_num_threads(1)  # keep torch's own thread pool quiet while another runtime is timed
    try:
        with tempfile.TemporaryDirectory(prefix="hwprune-calibrate-") as d:
            arts = _artifacts(backend, space, configs, (batch, *space.input_shape[1:]), d)
            probe = _Probe(backend, space, batch, d) if anchor else None
            for r in range(max(want)):
                for k, art in enumerate(arts):
                    if r < want[k]:
                        if progress:
                            progress(art.name, done, total)
                        before = probe.last() if probe else None
                        m = _measure_session(backend, art)
                        if probe:
                            m = replace(m, state_ref_ms=(before + probe.next()) / 2)
                        sessions[k].append(m)
                        done += 1
    finally:
        torch.set_num_threads(threads)
    if progress:
        progress("", total, total)
    return renormalised(sessions) if anchor else sessions


class _Probe:
    """The unpruned model's reference timings between sessions: each probe ends one session's
    window and opens the next one's."""

    def __init__(self, backend, space: PruningSpace, batch: int, directory: str):
        from hwprune.profiling.host_state import HostProbe

        self.space, self.backend, self.host = space, backend, HostProbe(backend, batch, directory)
        self._last: float | None = None

    def next(self) -> float:
        try:
            self._last = self.host(self.space.name, self.space)
        except HwpruneError:
            raise
        except Exception as e:  # as for the sessions themselves: one line
            raise HwpruneError(f"measuring the unpruned {self.space.name} (the sessions' anchor) failed on "
                               f"{self.backend.name}: {_failure(e)}",
                               "check that this backend runs the model here (hwprune devices)") from None
        return self._last

    def last(self) -> float:
        return self._last if self._last is not None else self.next()


def renormalised(sessions: list[list]) -> list[list]:
    """Sessions (per configuration, as :func:`measure_configs` returns them) scaled to one host
    state: the fast-state reference of all their references. Measurements of several calls
    are brought to a common state this way; sessions timed without a reference stay as timed."""
    from hwprune.profiling.measure import fast_state_reference

    refs = [m.state_ref_ms for ss in sessions for m in ss if m.state_ref_ms]
    if not refs:
        return sessions
    fast = fast_state_reference(refs, ANCHOR_TOLERANCE)
    return [[m.scaled(fast / m.state_ref_ms / m.norm_factor) if m.state_ref_ms else m for m in ss]
            for ss in sessions]


def check_request(source: Source, model: str, samples: int, rounds: int = 1, batch: int | None = None) -> None:
    """Refuse, in one line and before any work, what a calibration cannot do. Fewer samples than
    the correction has parameters are allowed: the correction is then shrunk towards the
    global ratio (:mod:`hwprune.prediction.correction`), its one parameter."""
    source.predictor.check_model(model)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise HwpruneError(f"a calibration measures at least one configuration, got {samples!r} samples",
                           "the correction's one parameter is a global ratio: pass --samples 1 or more")
    if rounds < 1:
        raise HwpruneError(f"every configuration is measured in at least one session, got rounds={rounds}")
    if batch is not None and batch < 1:
        raise HwpruneError(f"batch must be at least 1, got {batch}")


def measure_here(source: Source, model: str, samples: int, target: Target = Target(), seed: int = 0,
                 rounds: int = 2, measure=None, progress: ProgressFn | None = None, anchor: bool = False) -> Measured:
    """Choose ``samples`` configurations of ``model`` and time them on this machine with ``target``
    (with ``anchor``, anchored to the unpruned model's timings between sessions: :func:`measure_configs`)."""
    from hwprune.prediction.calibration_plan import choose_configs
    from hwprune.profiling.fingerprint import fingerprint
    from hwprune.profiling.measure import MeasureConfig

    check_request(source, model, samples, rounds, target.batch)
    backend = target.create(measure or MeasureConfig.profile())
    space = source.space(model)
    configs = choose_configs(space, source.predictor, samples, seed)
    batch = int(target.batch or source.predictor.settings_.get("batch") or 1)
    t0 = time.perf_counter()
    sessions = measure_configs(backend, space, configs, batch, rounds, progress, anchor)
    settings = {**backend.settings(), "batch": batch, "input_size": source.input_size}
    return Measured(model, configs, sessions, settings, fingerprint(), time.perf_counter() - t0,
                    (batch, *space.input_shape[1:]))


def calibrate(source: Source, runs: Sequence[Measured] | Measured):
    """The :class:`~hwprune.prediction.calibrated.CalibratedPredictor` of ``source`` fitted on
    the measurements ``runs`` (one per model, all of one device and settings)."""
    from hwprune.prediction.calibrated import CalibratedPredictor
    from hwprune.prediction.correction import fit_correction
    from hwprune.prediction.decomposition import decompose

    runs = [runs] if isinstance(runs, Measured) else list(runs)
    if not runs:
        raise HwpruneError("nothing was measured to calibrate on")
    for r in runs[1:]:
        if r.settings != runs[0].settings or r.fingerprint != runs[0].fingerprint:
            raise HwpruneError("the measurements of a calibration must come from one device and one set of settings")
    t0 = time.perf_counter()
    corrections, record = {}, {}
    for r in runs:
        dec = decompose(source.predictor, r.model, [c for _, c in r.configs])
        corrections[r.model] = fit_correction(dec.design(), r.ms)
        record[r.model] = {"samples": len(r.configs), "configs": [cid for cid, _ in r.configs],
                           "widths": [dict(c.widths) for _, c in r.configs], "measured_ms": [float(v) for v in r.ms],
                           "source_ms": [float(v) for v in dec.predicted_ms],
                           "loo_rmspe": corrections[r.model].loo_rmspe, "measure_seconds": r.seconds}
    record["fit_seconds"] = time.perf_counter() - t0
    return CalibratedPredictor.derive(source.predictor, corrections, runs[0].settings, runs[0].fingerprint,
                                      source.info, record)


def table_path_for(out: str | Path) -> Path:
    """Where :func:`save_calibration` writes the measurements beside the predictor ``out``:
    ``X.predictor.zip`` -> ``X.parquet`` (whose cache the predictor then is), else ``out``
    with the suffix ``.parquet``."""
    from hwprune.prediction.artifact import CACHE_SUFFIX

    out = Path(out)
    if out.name.endswith(CACHE_SUFFIX) and len(out.name) > len(CACHE_SUFFIX):
        return out.with_name(out.name[: -len(CACHE_SUFFIX)] + ".parquet")
    return out.with_suffix(".parquet")


def check_outputs(out: str | Path, table_out: str | Path | None = None) -> tuple[Path, Path]:
    """The predictor and table paths a calibration writes, checked writable and distinct."""
    from hwprune.atomic import check_writable

    out = Path(out)
    table_out = Path(table_out) if table_out is not None else table_path_for(out)
    if out.resolve() == table_out.resolve():
        raise HwpruneError(f"the predictor and its measurements would both be written to '{out}'",
                           "give --out a name ending in .predictor.zip")
    return check_writable(out), check_writable(table_out)


def calibration_table(pred, runs: Sequence[Measured]):
    """The measurements as an end-to-end-only latency table of the calibrated device."""
    from hwprune.profiling.profiler import item_rows
    from hwprune.profiling.table import LatencyTable, TableMeta

    rows: list[dict] = []
    for r in runs:
        for (cid, cfg), m in zip(r.configs, r.picks()):
            rows += item_rows(r.model, cid, f"{r.model}/{cid}", cfg, r.input_shape, m, [], [])
    n = sum(len(r.configs) for r in runs)
    plan = {"calibration": {"source": pred.source_, "models": {r.model: len(r.configs) for r in runs}}}
    meta = TableMeta(settings=dict(pred.settings_), fingerprint=dict(pred.fingerprint_),
                     models=[r.model for r in runs], plan=plan, complete=True, items_done=n, items_planned=n,
                     profile_seconds=float(sum(r.seconds for r in runs)))
    return LatencyTable(rows, meta)


def save_calibration(pred, runs: Sequence[Measured], out: str | Path,
                     table_out: str | Path | None = None) -> tuple[Path, Path]:
    """Write the calibrated predictor to ``out`` and its measurements beside it (see
    :func:`table_path_for`); both are built in memory first and written atomically."""
    from hwprune.atomic import atomic_write_bytes
    from hwprune.prediction.artifact import dumps_predictor

    out, table_out = check_outputs(out, table_out)
    data = calibration_table(pred, runs).to_bytes()
    blob = dumps_predictor(pred, table_out.name, hashlib.sha256(data).hexdigest())
    atomic_write_bytes(table_out, data)
    return atomic_write_bytes(out, blob), table_out
