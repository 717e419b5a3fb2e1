import itertools

import pytest

from hwprune.profiling.measure import (MeasureConfig, Measurement, Stats, collect_pair, measure, measure_pair, median_session,
                             robust_cov)


def test_stats_nearest_rank_percentiles():
    s = Stats.from_samples(list(range(1, 101)))  # 1..100
    assert s.median == 50.5 and s.min == 1 and s.count == 100
    assert s.p90 == 90 and s.p95 == 95 and s.p99 == 99
    assert s.mean == pytest.approx(50.5)
    assert s.cov == pytest.approx(s.std / s.mean)


def test_robust_cov_ignores_rare_outliers_but_not_spread():
    steady = [1.0] * 999 + [50.0]
    assert robust_cov(steady) == 0.0
    assert Stats.from_samples(steady).cov > 1.0  # the plain CoV is dominated by the one outlier
    spread = [1.0, 1.5] * 50
    assert robust_cov(spread) > 0.2


def test_measure_respects_min_iters_and_time():
    cfg = MeasureConfig(warmup_s=0.0, min_iters=7, min_time_s=0.0, retries=0)
    m = measure(lambda: 1.0, cfg)
    assert m.stats.count == 7 and m.stats.median == 1.0 and not m.stats.unstable


def test_unstable_measurement_is_retried_and_flagged():
    noisy = itertools.cycle([1.0, 2.0, 3.0])
    cfg = MeasureConfig(warmup_s=0.0, min_iters=9, min_time_s=0.0, cov_threshold=0.05, retries=2)
    m = measure(lambda: next(noisy), cfg)
    assert m.attempts == 3 and m.stats.unstable


def test_steady_after_retry_is_not_flagged():
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        return 1.0 + (calls["n"] % 3) if calls["n"] <= 9 else 1.0

    cfg = MeasureConfig(warmup_s=0.0, min_iters=9, min_time_s=0.0, cov_threshold=0.05, retries=2)
    m = measure(step, cfg)
    assert m.attempts == 2 and not m.stats.unstable and m.stats.median == 1.0


def test_paired_timing_alternates_chunks_so_both_models_see_the_same_host():
    """A scripted host turns 3x slower after the first pair of chunks. Model a takes 1 ms and b
    4 ms, chunks are 4 ms: a gets an untimed re-warm run and 4 timed runs per chunk, b one timed
    run and no re-warm. Every chunk of a has a chunk of b beside it in the same host state, so the pairs'
    ratio stays 0.25 although the absolute times moved 3x."""
    log = []

    def step(name, ms):
        def run():
            log.append(name)
            return ms * (1.0 if len(log) <= 8 else 3.0)
        return run

    cfg = MeasureConfig(warmup_s=0.0, min_iters=8, min_time_s=0.0, retries=0)
    a, b = collect_pair(step("a", 1.0), step("b", 4.0), cfg, chunk_s=0.004)
    assert log == ["a", "b"] + (["a"] * 5 + ["b"]) * 8  # first runs, then chunks until b has 8 samples
    assert len(a) == 32 and len(b) == 8
    assert a[:5] == [1.0] * 4 + [3.0] and b[:2] == [4.0, 12.0]  # the host slowed down after the first chunks
    per_chunk = [sum(a[4 * i:4 * i + 4]) / 4 / b[i] for i in range(8)]
    assert per_chunk[0] == 0.25 and per_chunk[-1] == 0.25
    log.clear()
    ma, mb = measure_pair(step("a", 1.0), step("b", 4.0), cfg, chunk_s=0.004)
    assert ma.stats.count == 32 and mb.stats.count == 8


def test_median_session_keeps_the_middle_session():
    """Three sessions of 2.4 (a slow first one), 2.2 and 2.25 ms: the 2.25 ms one is kept, and its
    attempts count all three sessions' attempts."""
    times = iter([2.4, 2.2, 2.25])

    def timed():
        return Measurement(stats=Stats.from_samples([next(times)] * 5), attempts=2)

    m = median_session(timed, 3)
    assert m.stats.median == 2.25 and m.attempts == 6
    one = median_session(lambda: Measurement(stats=Stats.from_samples([1.0])), 1)
    assert one.stats.median == 1.0 and one.attempts == 1
