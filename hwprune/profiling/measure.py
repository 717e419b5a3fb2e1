"""The measurement protocol, shared by every backend and by the device-side runner.

It follows the practice of trtexec and torch.utils.benchmark (see the project's NOTES):

* set-up (session creation, engine build) and the first run are timed apart and never
  mixed into the steady-state samples;
* warm-up is by time, not by a count;
* at least ``min_iters`` iterations *and* at least ``min_time_s`` seconds are timed;
* the median is the value a table stores, with min, mean, p90, p95, p99 (nearest rank),
  std, the coefficient of variation and the count beside it;
* a result whose spread exceeds ``cov_threshold`` is measured again (up to ``retries``
  times, keeping the steadiest attempt) and flagged ``unstable`` if it stays unsteady;
* with ``ci_target`` set, a window is extended until the chosen estimator's confidence
  interval lies within ``ci_target`` of the estimate, or ``ci_max_time_s`` seconds were timed
  (the cap; :attr:`Stats.cap_hit` records that it ended the window).

Which number summarises a window is an :class:`Estimator`, chosen from :data:`ESTIMATORS`:
the ``median``, a low quantile (``p10``) or the fastest of many short rounds (``min-round``).
On a quiet host they agree; on a busy one they do not, and which one repeats best from one
session to the next depends on the neighbour. :func:`choose_estimator` decides on data: it
scores every candidate on a few sessions of the same model (the unpruned reference) and keeps
the one whose session-to-session spread is smallest.

The spread that decides stability is the *robust* coefficient of variation,
``rcov = 1.4826 * MAD / median`` (equal to std/mean for normal samples). The plain CoV is
stored too, but it is not the criterion: on a shared 2-core machine one preemption of a
few milliseconds among a thousand 0.1 ms samples triples the std while the median does
not move, so the plain CoV would call nearly every sub-millisecond result unstable and
trigger retries that measure nothing new. Between-run stability (the median's CoV over
fresh processes, trtexec's 2.5 % criterion) is what the benchmarks report.

This module needs only numpy and the standard library: it runs on edge devices where
torch is not installed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist
from typing import Callable, Iterable, Sequence

import numpy as np

from hwprune.registry import Registry


@dataclass(frozen=True)
class MeasureConfig:
    warmup_s: float = 0.2
    min_iters: int = 10
    min_time_s: float = 1.0
    max_iters: int = 100_000
    cov_threshold: float = 0.05
    retries: int = 2
    profile_max_iters: int = 200  # profiled runs write one event per node and run: keep them bounded
    estimator: str = "median"  # a name of :data:`ESTIMATORS`: the number that summarises a window
    ci_target: float | None = None  # extend a window until the estimate's interval is within this fraction
    ci_level: float = 0.95  # coverage of that interval
    ci_max_time_s: float = 3.0  # the cap: seconds timed in one window at most, however wide the interval

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def profile(cls, adaptive: bool = True) -> "MeasureConfig":
        """The settings of ``hwprune profile``'s end-to-end timings, which validation, device bundles
        and ``hwprune table check`` share so that their times compare with a table's. ``adaptive``
        extends each window until the estimate is known within +-2% (at most 2 s timed);
        ``adaptive=False`` is the fixed 0.5 s window of earlier tables."""
        return cls(warmup_s=0.1, min_time_s=0.5, ci_target=0.02 if adaptive else None, ci_max_time_s=2.0)

    @classmethod
    def quick(cls) -> "MeasureConfig":
        """Short settings for tests and smoke runs (never for shipped tables)."""
        return cls(warmup_s=0.02, min_iters=5, min_time_s=0.05, retries=1, profile_max_iters=20)


# -- order statistics ----------------------------------------------------------------------
def _log_binom_pmf(k: int, n: int, q: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(q) + (n - k) * math.log1p(-q))


def rank_bounds(n: int, q: float, level: float = 0.95) -> tuple[int, int]:
    """0-based ranks ``(l, u)`` of the order statistics ``[x_(l), x_(u)]`` of ``n`` sorted samples that
    cover the ``q``-quantile with probability at least ``level`` (clipped to the sample: with few
    samples the interval is the whole range and covers less).

    The count of samples below the quantile is Binomial(n, q): the exact distribution up to 200
    samples, its normal approximation (with continuity correction) above."""
    if n <= 1:
        return 0, 0
    alpha = 1.0 - level
    if n <= 200:
        cdf = np.cumsum([math.exp(_log_binom_pmf(k, n, q)) for k in range(n + 1)])
        lo = int(np.searchsorted(cdf, alpha / 2, side="right")) - 1
        hi = int(np.searchsorted(cdf, 1 - alpha / 2, side="left"))
    else:
        z, sd = NormalDist().inv_cdf(1 - alpha / 2), math.sqrt(n * q * (1 - q))
        lo, hi = math.floor(n * q - 0.5 - z * sd), math.ceil(n * q - 0.5 + z * sd)
    return max(0, lo), min(n - 1, hi)


def quantile_interval(samples: Sequence[float], q: float, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the ``q``-quantile (:func:`rank_bounds`)."""
    s = np.sort(np.asarray(samples, dtype=np.float64))
    lo, hi = rank_bounds(s.size, q, level)
    return float(s[lo]), float(s[hi])


# -- estimators ------------------------------------------------------------------------------
class Estimator:
    """What summarises a window of samples (in time order), and how sure that summary is."""

    def estimate(self, samples: np.ndarray) -> float:
        raise NotImplementedError

    def interval(self, samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
        raise NotImplementedError


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator")


@ESTIMATORS.register("median", "the median of the window; interval from order statistics")
class Median(Estimator):
    q = 0.5

    def estimate(self, samples: np.ndarray) -> float:
        return float(np.median(samples))

    def interval(self, samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
        return quantile_interval(samples, self.q, level)


@ESTIMATORS.register("p10", "the 10th percentile (nearest rank), a low quantile that a neighbour's "
                            "preemptions rarely reach; interval from order statistics")
class LowQuantile(Median):
    q = 0.1

    def estimate(self, samples: np.ndarray) -> float:
        s = np.sort(np.asarray(samples, dtype=np.float64))
        return float(s[max(0, math.ceil(self.q * s.size) - 1)])


@ESTIMATORS.register("min-round", "the fastest of 10 short rounds: the window cut into 10 consecutive "
                                  "rounds, the lowest round median; bootstrap interval")
class MinRound(Estimator):
    rounds = 10
    resamples = 200

    def _blocks(self, samples: np.ndarray) -> list[np.ndarray]:
        a = np.asarray(samples, dtype=np.float64)
        return np.array_split(a, min(self.rounds, a.size))

    def estimate(self, samples: np.ndarray) -> float:
        return float(min(np.median(b) for b in self._blocks(samples)))

    def interval(self, samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
        rng = np.random.default_rng(0)  # a fixed seed: the same window always gets the same interval
        mins = np.full(self.resamples, np.inf)
        for b in self._blocks(samples):
            idx = rng.integers(0, b.size, size=(self.resamples, b.size))
            mins = np.minimum(mins, np.median(b[idx], axis=1))
        alpha = 1.0 - level
        lo, hi = np.quantile(mins, [alpha / 2, 1 - alpha / 2])
        est = self.estimate(samples)
        return float(min(lo, est)), float(max(hi, est))


def get_estimator(name: str) -> Estimator:
    """An instance of the registered estimator ``name`` (one-line error for unknown names)."""
    return ESTIMATORS.get(name)()


def relative_halfwidth(estimate: float, lo: float, hi: float) -> float:
    """Half the interval's width over the estimate (inf for a non-positive estimate)."""
    return (hi - lo) / 2 / estimate if estimate > 0 else math.inf


@dataclass
class Stats:
    """Summary of steady-state samples, all times in milliseconds.

    ``estimate`` is the value of the window's :class:`Estimator` (named in ``estimator``),
    ``ci_lo``/``ci_hi`` its confidence interval, ``cap_hit`` whether the window ended at its cap
    before the interval was narrow enough; they are None where no estimator was asked for."""

    median: float
    min: float
    mean: float
    p90: float
    p95: float
    p99: float
    std: float
    cov: float
    count: int
    unstable: bool = False
    rcov: float = 0.0
    estimate: float | None = None
    estimator: str | None = None
    ci_lo: float | None = None
    ci_hi: float | None = None
    cap_hit: bool = False

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], cov_threshold: float = math.inf,
                     estimator: str | None = None, level: float = 0.95, cap_hit: bool = False) -> "Stats":
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no samples")
        s = np.sort(a)

        def rank(p: float) -> float:  # nearest-rank percentile
            return float(s[max(0, math.ceil(p / 100.0 * s.size) - 1)])

        mean = float(a.mean())
        std = float(a.std(ddof=1)) if a.size > 1 else 0.0
        cov = std / mean if mean > 0 else 0.0
        rc = robust_cov(a)
        est = lo = hi = None
        if estimator is not None:
            e = get_estimator(estimator)
            est = e.estimate(a)
            lo, hi = e.interval(a, level)
        return cls(
            median=float(np.median(a)), min=float(s[0]), mean=mean, p90=rank(90), p95=rank(95),
            p99=rank(99), std=std, cov=cov, count=int(a.size), unstable=bool(rc > cov_threshold), rcov=rc,
            estimate=est, estimator=estimator, ci_lo=lo, ci_hi=hi, cap_hit=bool(cap_hit),
        )

    @property
    def value(self) -> float:
        """The estimator's value, or the median where no estimator was asked for."""
        return self.median if self.estimate is None else self.estimate

    @property
    def ci_rel(self) -> float | None:
        """The interval's half-width relative to the estimate, or None without an interval."""
        if self.ci_lo is None or self.ci_hi is None:
            return None
        return relative_halfwidth(self.value, self.ci_lo, self.ci_hi)

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled(self, factor: float) -> "Stats":
        """The same window with every time multiplied by ``factor`` (a host-state normalisation);
        the relative spreads stay as they were."""
        times = ("median", "min", "mean", "p90", "p95", "p99", "std", "estimate", "ci_lo", "ci_hi")
        return replace(self, **{k: None if getattr(self, k) is None else getattr(self, k) * factor for k in times})


@dataclass
class Measurement:
    """One measured thing: steady-state stats plus the costs kept out of them."""

    stats: Stats
    setup_ms: float | None = None
    first_run_ms: float | None = None
    attempts: int = 1
    samples_ms: list[float] = field(default_factory=list, repr=False)
    #: the host-state reference the measurement was taken in, where one was timed around it
    state_ref_ms: float | None = None
    #: the factor its times were scaled by (:meth:`scaled`): 1 for a measurement as timed
    norm_factor: float = 1.0

    @property
    def median_ms(self) -> float:
        return self.stats.median

    @property
    def value_ms(self) -> float:
        """The estimator's value (:attr:`Stats.value`): what tables, validation and bench use."""
        return self.stats.value

    def scaled(self, factor: float) -> "Measurement":
        """This measurement with its steady-state times multiplied by ``factor`` (set-up and first
        run, one-off costs, stay as timed)."""
        return replace(self, stats=self.stats.scaled(factor), samples_ms=[x * factor for x in self.samples_ms],
                       norm_factor=self.norm_factor * factor)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = {"stats": self.stats.to_dict(), "setup_ms": self.setup_ms, "first_run_ms": self.first_run_ms,
             "attempts": self.attempts}
        if with_samples:
            d["samples_ms"] = list(self.samples_ms)
        return d


def robust_cov(samples: Sequence[float]) -> float:
    """1.4826 * median absolute deviation / median: a CoV that outliers do not dominate."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size < 2:
        return 0.0
    med = float(np.median(a))
    return float(1.4826 * np.median(np.abs(a - med)) / med) if med > 0 else 0.0


def _warm_up(step: Callable[[], float], seconds: float) -> None:
    """Run ``step`` untimed for ``seconds`` (warm-up is by time, not by a count)."""
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        step()


class _Window:
    """Samples of one timed window, with the wall clock and the summed sample time since it began."""

    def __init__(self):
        self.samples: list[float] = []
        self.total_ms = 0.0
        self.t0 = time.perf_counter()

    def add(self, ms: float) -> None:
        self.samples.append(ms)
        self.total_ms += ms

    def wall_s(self) -> float:
        return time.perf_counter() - self.t0

    def timed_s(self) -> float:
        """Seconds timed: the wall clock, or the samples' sum where a step reports more than it took."""
        return max(self.wall_s(), self.total_ms / 1000.0)


def _run(step: Callable[[], float], cfg: MeasureConfig, w: _Window, n_min: int, t_min: float,
         cap_s: float = math.inf) -> None:
    """Add samples to ``w`` until ``n_min`` samples and ``t_min`` wall seconds, ``max_iters``, or ``cap_s``
    seconds timed."""
    while True:
        w.add(step())
        n = len(w.samples)
        if n >= cfg.max_iters or w.timed_s() >= cap_s:
            break
        if n >= n_min and w.wall_s() >= t_min:
            break


def collect(step: Callable[[], float], cfg: MeasureConfig, on_start: Callable[[], None] | None = None) -> list[float]:
    """Warm up by time, then collect samples from ``step`` (which returns one sample in ms).

    Stops once both ``min_iters`` samples and ``min_time_s`` seconds have been reached. This is
    the one timing loop of every backend: ``step`` does its own synchronisation (a CUDA event, a
    stream), and ``on_start`` runs once between the warm-up and the first timed sample (a profiler
    starts recording there).
    """
    _warm_up(step, cfg.warmup_s)
    if on_start is not None:
        on_start()
    w = _Window()
    _run(step, cfg, w, cfg.min_iters, cfg.min_time_s)
    return w.samples


def window_ci_rel(samples: Sequence[float], cfg: MeasureConfig) -> float:
    """The relative half-width of ``cfg.estimator``'s interval on ``samples``."""
    e = get_estimator(cfg.estimator)
    a = np.asarray(samples, dtype=np.float64)
    return relative_halfwidth(e.estimate(a), *e.interval(a, cfg.ci_level))


def collect_adaptive(step: Callable[[], float], cfg: MeasureConfig) -> tuple[list[float], bool]:
    """:func:`collect`, then, with ``cfg.ci_target``, more samples (a quarter more each time) until
    the estimate's interval is within the target or ``ci_max_time_s`` seconds were timed. Returns
    the samples and whether the cap ended the window with the interval still too wide."""
    _warm_up(step, cfg.warmup_s)
    w = _Window()
    _run(step, cfg, w, cfg.min_iters, cfg.min_time_s)
    if cfg.ci_target is None:
        return w.samples, False
    while window_ci_rel(w.samples, cfg) > cfg.ci_target:
        if len(w.samples) >= cfg.max_iters or w.timed_s() >= cfg.ci_max_time_s:
            return w.samples, True
        grow = max(cfg.min_iters, len(w.samples) // 4)
        _run(step, cfg, w, len(w.samples) + grow, 0.0, cap_s=cfg.ci_max_time_s)
    return w.samples, False


def _stats(samples: Sequence[float], cfg: MeasureConfig, cap_hit: bool = False) -> Stats:
    return Stats.from_samples(samples, cfg.cov_threshold, estimator=cfg.estimator, level=cfg.ci_level,
                              cap_hit=cap_hit)


def measure(step: Callable[[], float], cfg: MeasureConfig = MeasureConfig()) -> Measurement:
    """Run the protocol on ``step``: re-measure while the CoV is above the threshold."""
    best: list[float] | None = None
    best_cap = False
    attempts = 0
    for attempts in range(1, cfg.retries + 2):
        samples, cap = collect_adaptive(step, cfg)
        if best is None or robust_cov(samples) < robust_cov(best):
            best, best_cap = samples, cap
        if robust_cov(best) <= cfg.cov_threshold:
            break
    assert best is not None
    return Measurement(stats=_stats(best, cfg, best_cap), attempts=attempts, samples_ms=best)


def _pair_chunk(steps, runs: list[int], out: tuple[list[float], list[float]]) -> None:
    for k, step in enumerate(steps):
        if runs[k] > 1:
            step()  # re-warm after the other model
        for _ in range(runs[k]):
            out[k].append(step())


def _collect_pair(step_a: Callable[[], float], step_b: Callable[[], float], cfg: MeasureConfig,
                  chunk_s: float) -> tuple[list[float], list[float], bool]:
    steps = (step_a, step_b)
    for step in steps:
        _warm_up(step, cfg.warmup_s)
    out: tuple[list[float], list[float]] = ([], [])
    # runs per chunk, from one untimed run of each model after its warm-up
    runs = [max(1, int(1000 * chunk_s / max(step(), 1e-6))) for step in steps]
    checked = 0
    while True:
        _pair_chunk(steps, runs, out)
        if all(len(o) >= cfg.max_iters for o in out):
            return out[0], out[1], cfg.ci_target is not None
        if not all(len(o) >= cfg.min_iters and sum(o) >= 1000 * cfg.min_time_s for o in out):
            continue
        if cfg.ci_target is None:
            return out[0], out[1], False
        n = len(out[0]) + len(out[1])
        if n < 1.25 * checked:
            continue  # look at the intervals again once a quarter more samples came in
        checked = n
        if all(window_ci_rel(o, cfg) <= cfg.ci_target for o in out):
            return out[0], out[1], False
        if (sum(out[0]) + sum(out[1])) / 1000 >= cfg.ci_max_time_s:
            return out[0], out[1], True


def collect_pair(step_a: Callable[[], float], step_b: Callable[[], float], cfg: MeasureConfig,
                 chunk_s: float = 0.05) -> tuple[list[float], list[float]]:
    """Samples of two models timed in alternating chunks of about ``chunk_s`` seconds each.

    Paired timing for shared hosts: a neighbour that slows the machine for a few seconds slows
    both models alike, so the ratio of the two medians keeps what the absolute times lose. A
    chunk holds as many runs as fit in ``chunk_s`` (at least one), as one untimed run after the
    warm-up timed them. A model short enough for several runs per chunk gets one untimed run
    at the start of each chunk, because the other model has just evicted its weights from the
    caches; a model that needs the whole chunk for one run streams its weights from memory
    anyway and is timed straight away. Both models are warmed up first; it stops once each has
    ``min_iters`` samples and ``min_time_s`` seconds of timed runs, and with ``ci_target`` once
    both estimates' intervals are within it (or both models together were timed for
    ``ci_max_time_s`` seconds).
    """
    a, b, _ = _collect_pair(step_a, step_b, cfg, chunk_s)
    return a, b


def measure_pair(step_a: Callable[[], float], step_b: Callable[[], float], cfg: MeasureConfig = MeasureConfig(),
                 chunk_s: float = 0.05) -> tuple[Measurement, Measurement]:
    """:func:`collect_pair`, summarised: one :class:`Measurement` per model (no retries: the pair's
    ratio, not either spread, is what paired timing is for)."""
    a, b, cap = _collect_pair(step_a, step_b, cfg, chunk_s)
    return (Measurement(stats=_stats(a, cfg, cap), samples_ms=a), Measurement(stats=_stats(b, cfg, cap), samples_ms=b))


#: Fresh sessions in which a profile times the unpruned model (its ``full`` configuration) end to
#: end, keeping the one with the median time. Every other configuration gets one session. The
#: unpruned model anchors every relative figure (a latency target of 0.5 is half its predicted
#: time; paired validation divides by it), and it is the first configuration a run measures:
#: on 2026-11-30 cifar_resnet56's single session of it came out 9% slower than three sessions
#: timed later by ``hwprune table check`` (2.435 against 2.22 ms, within-session rcov 4.1%
#: against 2.4% for the other rows), which every relative prediction of that table inherited.
REFERENCE_SESSIONS = 3


def median_session(timed: Callable[[], Measurement], sessions: int) -> Measurement:
    """Call ``timed`` (one fresh session each) ``sessions`` times and return the measurement with
    the median value (the lower middle one for an even count). ``attempts`` counts every
    attempt of every session."""
    ms = sorted((timed() for _ in range(max(1, sessions))), key=lambda m: m.value_ms)
    pick = ms[(len(ms) - 1) // 2]
    pick.attempts = sum(m.attempts for m in ms)
    return pick


def session_spread(values: Sequence[float]) -> float:
    """``(max - min) / median`` of one estimator's values over sessions of the same model."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    return float((v.max() - v.min()) / med) if v.size > 1 and med > 0 else 0.0


#: A later candidate replaces an earlier one only with a spread this much smaller: by this share of it
#: and by this many points (0.2 = 20%, 0.002 = 0.2 percentage points).
CHOICE_MARGIN = (0.2, 0.002)


@dataclass
class EstimatorChoice:
    """Which estimator :func:`choose_estimator` picked, and every candidate's spread."""

    name: str
    spreads: dict[str, float]
    sessions: int
    criterion: str = ("smallest session-to-session spread ((max - min) / median) on the reference; a later "
                      "candidate must beat an earlier one by 20% and 0.2 points")

    def to_dict(self) -> dict:
        return asdict(self)


def choose_estimator(groups: Sequence[Sequence[Sequence[float]]],
                     candidates: Sequence[str] | None = None) -> EstimatorChoice:
    """The candidate whose values repeat best from one session to the next.

    ``groups``: per reference model, its sessions, each session's samples in time order. Every
    candidate's :func:`session_spread` is averaged over the groups; the smallest wins, unless an
    earlier registered candidate (the median first) is within :data:`CHOICE_MARGIN` of it, so
    that on a quiet host, where they all agree to a fraction of a percent, the choice stays the
    median."""
    names = list(candidates or ESTIMATORS.names())
    usable = [g for g in groups if len(g) >= 2]
    if not usable:
        return EstimatorChoice(names[0], {}, 0)
    spreads = {}
    for n in names:
        e = get_estimator(n)
        spreads[n] = float(np.mean([session_spread([e.estimate(np.asarray(s)) for s in g]) for g in usable]))
    best = names[0]
    rel, points = CHOICE_MARGIN
    for n in names[1:]:
        if spreads[n] < spreads[best] * (1 - rel) and spreads[n] < spreads[best] - points:
            best = n
    return EstimatorChoice(best, spreads, min(len(g) for g in usable))


def fast_state_reference(timings_ms: Sequence[float], tolerance: float) -> float:
    """The host state a table is normalised to: the median of the reference timings that lie
    within ``tolerance`` of the fastest one.

    On a quiet host nearly every window is within the tolerance, and this is the plain median;
    under a neighbour that comes and goes (bursts) it is the median of the quiet windows; under a
    neighbour that never leaves, the median of what the host offers. Nothing runs faster than the
    machine, so a lone fast outlier is rarer than a lone slow one, and the median of the fast
    cluster keeps one from deciding alone."""
    t = np.asarray([float(x) for x in timings_ms if x is not None and math.isfinite(float(x)) and float(x) > 0])
    if not t.size:
        raise ValueError("no reference timings")
    return float(np.median(t[t <= (1 + tolerance) * t.min()]))


def with_estimator(cfg: MeasureConfig, name: str) -> MeasureConfig:
    """``cfg`` with ``name`` as its estimator (checked against :data:`ESTIMATORS`)."""
    ESTIMATORS.get(name)
    return replace(cfg, estimator=name)


def wallclock_step(fn: Callable[[], object]) -> Callable[[], float]:
    """Wrap a synchronous callable into a step that returns its wall time in ms."""

    def step() -> float:
        t = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t) / 1e6

    return step


def time_once(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter_ns()
    out = fn()
    return out, (time.perf_counter_ns() - t) / 1e6


def summarize_groups(samples: dict[str, Iterable[float]], cov_threshold: float) -> dict[str, Stats]:
    return {k: Stats.from_samples(list(v), cov_threshold) for k, v in samples.items()}
