"""A reproducible noisy neighbour: a helper process that loads the host in a chosen pattern.

Robustness claims about profiling and validation ("holds while the host is busy") are only
worth something when the noise is known. :class:`NoisyNeighbour` starts one process that
loads a CPU (or the memory bus) with a registered :class:`NoisePattern` and stops it
cleanly, whatever happens to the caller:

* ``cpu``: a pure-Python busy loop at a duty cycle (busy ``duty`` of every ``period_s``);
* ``cpu-full``: the same, always busy;
* ``membw``: streaming copies of arrays far larger than the last-level cache, which
  contend for memory bandwidth rather than for the core;
* ``bursts``: the CPU hog at full duty, switched on and off every few seconds, like a
  neighbour's batch job.

The helper pins itself to one CPU when asked (``cpu=1`` puts it on the core the
measurement is not using), asks the kernel to terminate it when its parent dies, and is
stopped by the context manager, by :meth:`NoisyNeighbour.stop` and at interpreter exit.

>>> with NoisyNeighbour("cpu", cpu=1) as hog:   # doctest: +SKIP
...     ...                                    # measure under a 50% CPU hog on core 1
...     hog.duty()                             # the duty cycle it actually held
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass

from hwprune.errors import HwpruneError


@dataclass(frozen=True)
class NoisePattern:
    """How the neighbour loads the host.

    ``kind`` is ``cpu`` (a busy loop) or ``membw`` (streaming array copies). Within every
    ``period_s`` the neighbour works ``duty`` of the time and sleeps the rest. With
    ``burst_on_s`` set, it runs that pattern for ``burst_on_s`` seconds, then sleeps for
    ``burst_off_s``, and so on.
    """

    name: str
    kind: str
    duty: float = 1.0
    period_s: float = 0.1
    burst_on_s: float | None = None
    burst_off_s: float | None = None
    summary: str = ""

    def __post_init__(self):
        if self.kind not in ("cpu", "membw"):
            raise HwpruneError(f"noise kind must be cpu or membw, not '{self.kind}'")
        if not 0.0 < self.duty <= 1.0 or self.period_s <= 0:
            raise HwpruneError(f"noise duty must lie in (0, 1] and its period be positive (got {self.duty}, "
                               f"{self.period_s} s)")
        if (self.burst_on_s is None) != (self.burst_off_s is None):
            raise HwpruneError("noise bursts need both burst_on_s and burst_off_s")

    def expected_duty(self) -> float:
        """The share of wall time the pattern keeps its CPU busy, on average."""
        if self.burst_on_s is None:
            return self.duty
        return self.duty * self.burst_on_s / (self.burst_on_s + self.burst_off_s)


PATTERNS: dict[str, NoisePattern] = {}


def register_pattern(pattern: NoisePattern) -> NoisePattern:
    PATTERNS[pattern.name] = pattern
    return pattern


register_pattern(NoisePattern("cpu", "cpu", duty=0.5, summary="busy loop, 50% duty cycle in 100 ms periods"))
register_pattern(NoisePattern("cpu-full", "cpu", duty=1.0, summary="busy loop, always on"))
register_pattern(NoisePattern("membw", "membw", duty=1.0, summary="streaming copies of 2 x 64 MB arrays, always on"))
register_pattern(NoisePattern("bursts", "cpu", duty=1.0, burst_on_s=3.0, burst_off_s=3.0,
                              summary="busy loop, 3 s on and 3 s off"))


def get_pattern(pattern: str | NoisePattern) -> NoisePattern:
    if isinstance(pattern, NoisePattern):
        return pattern
    if pattern not in PATTERNS:
        raise HwpruneError(f"unknown noise pattern '{pattern}'", f"choose one of {', '.join(PATTERNS)}")
    return PATTERNS[pattern]


class NoisyNeighbour:
    """One helper process loading the host with ``pattern``; a context manager.

    ``cpu``: the CPU index to pin the helper to (``None``: wherever the scheduler puts it).
    :meth:`duty` reports the share of wall time the helper actually spent on the CPU since
    it started (its own CPU time over its wall time), so a run can record the load it ran
    under.
    """

    def __init__(self, pattern: str | NoisePattern, cpu: int | None = None):
        self.pattern = get_pattern(pattern)
        if cpu is not None and cpu not in os.sched_getaffinity(0):
            raise HwpruneError(f"cannot pin the noisy neighbour to CPU {cpu}",
                               f"this process may use CPUs {sorted(os.sched_getaffinity(0))}")
        self.cpu = cpu
        self._proc = None
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._cpu_s = self._ctx.Value("d", 0.0)
        self._wall_s = self._ctx.Value("d", 0.0)
        self._busy_s = self._ctx.Value("d", 0.0)

    def start(self, timeout_s: float = 30.0) -> "NoisyNeighbour":
        """Start the helper and wait until it has run its first period (so the load is on)."""
        if self._proc is not None:
            return self
        self._proc = self._ctx.Process(target=_neighbour_main, name=f"hwprune-noise-{self.pattern.name}",
                                       args=(self.pattern, self.cpu, os.getpid(), self._stop,
                                             (self._cpu_s, self._wall_s, self._busy_s)),
                                       daemon=True)
        self._proc.start()
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while self._wall_s.value == 0.0 and self._proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._wall_s.value == 0.0:
            self.stop()
            raise HwpruneError(f"the noisy neighbour did not start within {timeout_s:g} s")
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def duty(self) -> float:
        """CPU time over wall time of the helper so far (0 before its first report).

        On a host whose other work competes for the same CPU this falls below
        :meth:`held_duty`: the helper wanted the CPU but did not always get it.
        """
        wall = self._wall_s.value
        return self._cpu_s.value / wall if wall > 0 else 0.0

    def held_duty(self) -> float:
        """Share of wall time the helper spent in its busy phases so far: the pattern it held."""
        wall = self._wall_s.value
        return self._busy_s.value / wall if wall > 0 else 0.0

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop the helper: ask it, then terminate it, then kill it. Safe to call twice."""
        if self._proc is None:
            return
        self._stop.set()
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout_s)
        atexit.unregister(self.stop)

    def __enter__(self) -> "NoisyNeighbour":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGTERM when its parent exits, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _neighbour_main(pattern: NoisePattern, cpu, parent: int, stop, counters) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    work = _membw_work() if pattern.kind == "membw" else _cpu_work
    cpu_s, wall_s, busy_s = counters
    t0, c0, busy = time.monotonic(), time.process_time(), 0.0
    while not stop.is_set() and os.getppid() == parent:
        now = time.monotonic()
        if pattern.burst_on_s is not None and (now - t0) % (pattern.burst_on_s + pattern.burst_off_s) \
                >= pattern.burst_on_s:
            stop.wait(min(pattern.period_s, 0.05))
        else:
            busy += _one_period(pattern, work, stop)
        cpu_s.value, busy_s.value = time.process_time() - c0, busy
        wall_s.value = time.monotonic() - t0


def _one_period(pattern: NoisePattern, work, stop) -> float:
    """One busy-then-idle period; returns the seconds spent busy."""
    start = time.monotonic()
    busy_until = start + pattern.duty * pattern.period_s
    while time.monotonic() < busy_until:
        work()
    busy = time.monotonic() - start
    rest = start + pattern.period_s - time.monotonic()
    if rest > 0:
        stop.wait(rest)
    return busy


def _cpu_work() -> None:
    x = 0
    for i in range(2000):  # about 50-100 us of pure-Python arithmetic
        x += i * i
    return None


def _membw_work():
    import numpy as np

    src = np.ones(8 << 20, dtype=np.float64)  # 64 MB each: far beyond any last-level cache
    dst = np.empty_like(src)
    chunk = 1 << 20

    def work(state={"i": 0}) -> None:
        i = state["i"]
        np.copyto(dst[i:i + chunk], src[i:i + chunk])
        state["i"] = (i + chunk) % len(src)

    return work
