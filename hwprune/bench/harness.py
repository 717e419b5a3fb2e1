"""Benchmark harness: the real end-to-end latency and throughput of models on one backend.

Protocol (NOTES section 2): every model is exported once, then measured ``rounds`` times
per batch size in *fresh* sessions, models interleaved A B A B ... so that drift (thermal,
other tenants) hits them alike; each measurement warms up by time and runs at least the
minimum iterations and duration; set-up and first-run times are reported apart. The
reported latency is the median of the per-round medians; its spread across rounds is the
between-session CoV. Beside it, ``fastest_round`` is the lowest per-round median: on a shared
host whose other tenants add a fixed delay for seconds at a time (this project's 2-core VM
runs a tiny model at 0.23 ms or 0.37 ms for stretches of 5-10 s, benchmarks/results/bench_stability.md),
the fastest of many short rounds is the estimator that tracks the device rather than its
neighbours (timeit's argument for the minimum), and speed-ups between such values are steady. A backend failure on one model is recorded in the results and the
others go on.

Every round is summarised with one estimator (:data:`hwprune.profiling.measure.ESTIMATORS`; a
table's own choice when a table is given), and every latency, speed-up and gated ratio comes
with its confidence interval: the order-statistic interval of the median over rounds (with
few rounds, their range).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hwprune.profiling.backends import ModelArtifact, create_backend
from hwprune.errors import HwpruneError
from hwprune.profiling.fingerprint import fingerprint
from hwprune.profiling.measure import MeasureConfig, Stats, quantile_interval, with_estimator


@dataclass
class BenchModel:
    """A model to benchmark: a zoo name with optional widths, a checkpoint, or an ONNX file."""

    label: str
    module: object = None  # nn.Module
    onnx: Path | None = None
    input_size: tuple[int, int, int] | None = None
    arch: str | None = None
    widths: dict | None = None
    source: str = ""
    onnx_batch: int | None = None  # the static batch of an ONNX file, None when dynamic

    @classmethod
    def from_name(cls, name: str, widths_file: str | Path | None = None, input_size: int | None = None,
                  label: str | None = None) -> "BenchModel":
        from hwprune.pruning.space import PruningSpace, WidthConfig

        space = PruningSpace.from_name(name, input_size=input_size)
        widths = None
        module = space.model
        if widths_file:
            cfg = WidthConfig.load(widths_file)
            if cfg.model and cfg.model != name:
                raise HwpruneError(f"width file '{widths_file}' is for model '{cfg.model}', not '{name}'")
            widths = space.validate(WidthConfig(name, cfg.widths)).widths
            module = space.apply(widths)
        lab = label or (f"{name}@{Path(widths_file).stem}" if widths_file else name)
        return cls(lab, module=module.eval(), input_size=tuple(space.input_shape[1:]), arch=name, widths=widths,
                   source=f"--model {name}" + (f" --widths {widths_file}" if widths_file else ""))

    @classmethod
    def from_checkpoint(cls, path: str | Path, label: str | None = None) -> "BenchModel":
        from hwprune.training.checkpoint import Checkpoint

        ck = Checkpoint.load(path)
        spec = ck.build_model()
        return cls(label or Path(path).stem, module=spec.module.eval(), input_size=tuple(spec.input_size),
                   arch=ck.arch, widths=ck.widths, source=f"--checkpoint {path}")

    @classmethod
    def from_onnx(cls, path: str | Path, input_size: int | None = None, label: str | None = None) -> "BenchModel":
        p = Path(path)
        if not p.is_file():
            raise HwpruneError(f"ONNX file '{p}' does not exist")
        try:
            import onnx

            m = onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise HwpruneError(f"'{p}' is not a readable ONNX model: {type(e).__name__}") from None
        dims = [d.dim_value if d.dim_value > 0 else None for d in m.graph.input[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or any(d is None for d in dims[1:]):
            if input_size is None:
                raise HwpruneError(f"cannot infer the input shape of '{p}' (input dims {dims})",
                                   "pass --input-size")
            chw = (dims[1] or 3, input_size, input_size)
        else:
            chw = tuple(int(d) for d in dims[1:])
        return cls(label or p.stem, onnx=p, input_size=chw, source=f"--onnx {path}",
                   onnx_batch=int(dims[0]) if dims and dims[0] else None)


@dataclass
class BenchResult:
    model: str
    batch: int
    latency_ms: dict | None = None
    throughput_ips: float | None = None
    rounds: list[dict] = field(default_factory=list)
    setup_ms: float | None = None
    first_run_ms: float | None = None
    predicted_ms: float | None = None
    error: str | None = None
    arch: str | None = None
    widths: dict | None = None
    source: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("error",)}


def _summary(samples: list[float], cov_threshold: float) -> dict:
    s = Stats.from_samples(samples, cov_threshold)
    return {"median": s.median, "min": s.min, "mean": s.mean, "p90": s.p90, "p95": s.p95, "p99": s.p99,
            "std": s.std, "cov": s.cov, "rcov": s.rcov, "count": s.count, "unstable": s.unstable}


def median_interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """``[lo, hi]``: the order-statistic confidence interval of the median of per-round ``values``."""
    return list(quantile_interval(values, 0.5, level))


def bench(models: Sequence[BenchModel], backend: str = "onnxruntime", batches: Sequence[int] = (1,),
          threads: int | None = None, device: str = "cpu", rounds: int = 3, measure: MeasureConfig | None = None,
          predictor=None, progress=None, estimator: str | None = None) -> dict:
    """Measure every model at every batch size; returns the documented JSON document. ``estimator``
    summarises every round (default: ``measure``'s, the median)."""
    if not models:
        raise HwpruneError("nothing to benchmark: give --model, --checkpoint or --onnx")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise HwpruneError(f"two models share the label '{next(l for l in labels if labels.count(l) > 1)}'")
    cfg = measure or MeasureConfig(warmup_s=0.2, min_time_s=1.0)
    if estimator:
        cfg = with_estimator(cfg, estimator)
    be = create_backend(backend, threads=threads, device=device, measure=cfg)
    results: dict[tuple[str, int], BenchResult] = {}
    order: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hwprune-bench-") as d:
        arts = _prepare(models, batches, be, backend, predictor, Path(d), results)
        total = rounds * len(arts)
        done = 0
        for r in range(rounds):
            for key, art in arts.items():  # interleaved: A B A B ...
                res = results[key]
                if res.error is not None:
                    continue
                if progress:
                    progress(f"{key[0]} b{key[1]} round {r + 1}", done, total)
                try:
                    meas = be.measure_e2e(art)
                except Exception as e:  # backend failed mid-run: say which model, go on with the others
                    res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    continue
                finally:
                    done += 1
                order.append({"model": key[0], "batch": key[1], "round": r})
                res.rounds.append({"median": meas.value_ms, "rcov": meas.stats.rcov, "count": meas.stats.count,
                                   "attempts": meas.attempts, "setup_ms": meas.setup_ms,
                                   "first_run_ms": meas.first_run_ms, "samples_ms": meas.samples_ms})
    if progress:
        progress("", total, total)
    for res in results.values():
        _summarise(res, cfg)
    return {
        "device": fingerprint(),
        "settings": {**be.settings(), "batches": list(batches), "rounds": rounds, "measure": cfg.to_dict()},
        "results": [r.to_dict() for r in results.values()],
        "run_order": order,
        "seconds": time.perf_counter() - t0,
    }


def _prepare(models: Sequence[BenchModel], batches: Sequence[int], be, backend: str, predictor, d: Path,
             results: dict) -> dict[tuple[str, int], ModelArtifact]:
    """One artifact per model and batch (exported when the backend runs ONNX), each with its
    :class:`BenchResult` in ``results``; a model that cannot be prepared is marked, the others go on."""
    from hwprune.profiling.onnx_export import export_onnx

    arts: dict[tuple[str, int], ModelArtifact] = {}
    for m in models:
        for b in batches:
            key = (m.label, b)
            res = results[key] = BenchResult(m.label, b, arch=m.arch, widths=m.widths, source=m.source)
            shape = (b, *m.input_size)
            try:
                if m.onnx is not None:
                    if not be.needs_onnx():
                        raise HwpruneError(f"backend '{backend}' runs nn.Modules; an ONNX file cannot be run")
                    if m.onnx_batch is not None and m.onnx_batch != b:
                        raise HwpruneError(f"the ONNX file has a static batch of {m.onnx_batch}, not {b}")
                    art = ModelArtifact(shape, onnx_path=m.onnx, name=m.label)
                else:
                    art = ModelArtifact(shape, module=m.module, name=m.label)
                    if be.needs_onnx():
                        art.onnx_path = export_onnx(m.module, shape, d / f"{len(arts)}.onnx")
                arts[key] = art
            except Exception as e:  # a model that cannot be prepared is reported, the others go on
                res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if predictor is not None and m.arch and res.error is None:
                try:
                    predictor.check_settings({"batch": b})
                    res.predicted_ms = float(predictor.predict(m.arch, [m.widths or {}])[0])
                except HwpruneError:
                    pass
    return arts


def _summarise(res: BenchResult, cfg: MeasureConfig) -> None:
    """``res.latency_ms`` and the rest from its rounds: the median of the round values with its interval,
    the between-session CoV, the fastest round, the pooled samples' statistics."""
    if not res.rounds:
        return
    samples = [s for rd in res.rounds for s in rd.pop("samples_ms")]
    meds = np.array([rd["median"] for rd in res.rounds])
    lat = _summary(samples, cfg.cov_threshold)
    lat["median"] = float(np.median(meds))
    lat["estimator"] = cfg.estimator
    lat["ci"] = median_interval(meds)
    lat["between_session_cov"] = float(meds.std(ddof=1) / meds.mean()) if len(meds) > 1 else 0.0
    lat["fastest_round"] = float(meds.min())
    res.latency_ms = lat
    res.throughput_ips = 1000.0 * res.batch / lat["median"]
    res.setup_ms = float(np.median([rd["setup_ms"] for rd in res.rounds]))
    res.first_run_ms = float(np.median([rd["first_run_ms"] for rd in res.rounds]))


def speedups(doc: dict, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """Speed-up of ``a`` over ``b`` per batch, computed round by round (interleaved runs)."""
    by = {(r["model"], r["batch"]): r for r in doc["results"] if r.get("rounds")}
    out = []
    for a, b in pairs:
        for batch in doc["settings"]["batches"]:
            ra, rb = by.get((a, batch)), by.get((b, batch))
            if not ra or not rb:
                continue
            ratios = [x["median"] / y["median"] for x, y in zip(rb["rounds"], ra["rounds"])]
            fa, fb = ra["latency_ms"].get("fastest_round"), rb["latency_ms"].get("fastest_round")
            out.append({"model": a, "baseline": b, "batch": batch, "speedup": float(np.median(ratios)),
                        "ci": median_interval(ratios),
                        "speedup_fastest": float(fb / fa) if fa and fb else None, "per_round": ratios})
    return out


@dataclass
class GatedLatency:
    """A gated measurement: each model's latency relative to the reference, in the host's fast state."""

    ratios: dict[str, float]  # model / reference, median over the gated rounds
    ms: dict[str, float]  # each model's median over the gated rounds
    reference_ms: float  # the reference's median over the gated rounds
    rounds: int  # rounds run
    gated_rounds: int  # rounds whose reference was within the gate of the fastest reference seen
    settled: bool  # False: max_rounds ran out before ``need`` gated rounds (the host stayed slow)
    #: per model, its ratio to the reference in each gated round (what the median and interval come from)
    round_ratios: dict[str, list[float]] = field(default_factory=dict)
    estimator: str = "median"  # what summarised each round's window

    def interval(self, label: str, level: float = 0.95) -> list[float]:
        """``[lo, hi]`` of ``label``'s median ratio (order statistics over the gated rounds)."""
        return median_interval(self.round_ratios.get(label) or [self.ratios[label]], level)

    def host_state(self) -> dict:
        """What this measurement says about the host's state, for logs."""
        return {"rounds": self.rounds, "gated_rounds": self.gated_rounds, "settled": self.settled}


class GatedMeter:
    """End-to-end latency of candidate models, paired with a reference model and gated on the host's state.

    Other tenants of a shared host (this project's 2-vCPU VM) take one of its cores for seconds
    to minutes at a time; while they do, a 2-thread ONNX Runtime session runs at 1-thread speed,
    which adds a fixed delay per inference and squeezes speed-ups (measured here: a pruned
    cifar_resnet20 at 2.13x in the fast state and 1.27x in the slow one). So every round times
    the reference (the unpruned model) and then each candidate, each in a fresh session and
    for a short window, and only rounds whose reference ran within ``gate`` of the fastest
    reference this meter has seen count. Rounds repeat until ``need`` of them count or
    ``max_rounds`` ran; the result is the median over the counted rounds of each candidate's
    ratio to the reference in the same round; at least ``min_rounds`` run, so that a call that
    starts in the slow state has a few seconds to see the fast one. The meter keeps the fastest reference across
    calls, so measurements taken minutes apart (a device correction loop) stay comparable.
    With ``patience_s`` > 0, a call that has not settled after ``max_rounds`` (the host stayed
    slow throughout) keeps measuring until it does or ``patience_s`` seconds have passed since it
    began, instead of returning slow-state ratios.
    """

    def __init__(self, reference, backend: str = "onnxruntime", batch: int = 1, threads: int | None = None,
                 device: str = "cpu", measure: MeasureConfig | None = None, gate: float = 1.05, need: int = 3,
                 max_rounds: int = 30, min_rounds: int = 4, patience_s: float = 0.0, estimator: str | None = None,
                 options: Mapping | None = None):
        from hwprune.profiling.onnx_export import export_onnx

        cfg = measure or MeasureConfig(warmup_s=0.1, min_time_s=0.3, retries=0)
        cfg = with_estimator(cfg, estimator) if estimator else cfg
        self.estimator = cfg.estimator
        self.be = create_backend(backend, **{"threads": threads, "device": device, **(options or {}), "measure": cfg})
        self.batch, self.gate, self.need, self.max_rounds = batch, gate, need, max_rounds
        self.min_rounds = min(min_rounds, max_rounds)
        self.patience_s = max(0.0, float(patience_s))
        self._dir = tempfile.TemporaryDirectory(prefix="hwprune-meter-")
        self._n = 0
        self.input_size = tuple(reference.input_size)
        self.ref = self._artifact(reference.module, export_onnx)
        self.best_ref = math.inf

    def _artifact(self, module, export_onnx) -> ModelArtifact:
        shape = (self.batch, *self.input_size)
        art = ModelArtifact(shape, module=module.eval(), name=f"m{self._n}")
        if self.be.needs_onnx():
            art.onnx_path = export_onnx(module, shape, Path(self._dir.name) / f"m{self._n}.onnx")
        self._n += 1
        return art

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> "GatedMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, modules: dict, need: int | None = None) -> GatedLatency:
        """``modules``: label -> nn.Module (same input size as the reference); ``need``: gated rounds to
        collect (default: the meter's), more for a narrower interval."""
        from hwprune.profiling.onnx_export import export_onnx

        need = need or self.need
        arts = {label: self._artifact(m, export_onnx) for label, m in modules.items()}
        refs: list[float] = []
        meds: dict[str, list[float]] = {label: [] for label in arts}
        good: list[int] = []
        t0 = time.perf_counter()
        while len(refs) < max(self.max_rounds, need) or time.perf_counter() - t0 < self.patience_s:
            refs.append(self.be.measure_e2e(self.ref).value_ms)
            for label, art in arts.items():
                meds[label].append(self.be.measure_e2e(art).value_ms)
            self.best_ref = min(self.best_ref, refs[-1])
            good = [i for i, x in enumerate(refs) if x <= self.gate * self.best_ref]
            if len(good) >= need and len(refs) >= self.min_rounds:
                break
        settled = len(good) >= need
        if not good:  # the fastest reference was seen in an earlier call: use this call's fastest rounds
            cut = self.gate * min(refs)
            good = [i for i, x in enumerate(refs) if x <= cut]
        for art in arts.values():
            if art.onnx_path is not None:
                Path(art.onnx_path).unlink(missing_ok=True)
        per_round = {label: [v[i] / refs[i] for i in good] for label, v in meds.items()}
        return GatedLatency(
            ratios={label: float(np.median(r)) for label, r in per_round.items()},
            ms={label: float(np.median([v[i] for i in good])) for label, v in meds.items()},
            reference_ms=float(np.median([refs[i] for i in good])), rounds=len(refs), gated_rounds=len(good),
            settled=settled, round_ratios=per_round, estimator=self.estimator)
