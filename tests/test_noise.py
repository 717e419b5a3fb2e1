"""The noisy neighbour starts, holds its pattern roughly, and always stops."""

import os
import subprocess
import sys
import time

import pytest

from hwprune.errors import HwpruneError
from hwprune.bench.noise import PATTERNS, NoisePattern, NoisyNeighbour, get_pattern


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running
        return f.read().split()[2] != "Z"


def test_patterns_are_registered_with_a_summary():
    assert {"cpu", "cpu-full", "membw", "bursts"} <= set(PATTERNS)
    assert all(p.summary for p in PATTERNS.values())
    assert get_pattern("bursts").expected_duty() == pytest.approx(0.5)


def test_bad_patterns_get_one_line_errors():
    with pytest.raises(HwpruneError, match="unknown noise pattern 'loud'"):
        get_pattern("loud")
    with pytest.raises(HwpruneError, match="duty"):
        NoisePattern("x", "cpu", duty=1.5)
    with pytest.raises(HwpruneError, match="bursts need both"):
        NoisePattern("x", "cpu", burst_on_s=1.0)
    with pytest.raises(HwpruneError, match="cannot pin"):
        NoisyNeighbour("cpu", cpu=10_000)


@pytest.mark.parametrize("name", ["cpu", "cpu-full"])
def test_neighbour_holds_its_duty_cycle_within_a_loose_bound(name):
    with NoisyNeighbour(name) as hog:
        pid = hog.pid
        time.sleep(2.0)
        duty, held = hog.duty(), hog.held_duty()
        assert hog.running
    expected = PATTERNS[name].expected_duty()
    assert held == pytest.approx(expected, abs=0.1)  # the pattern, in wall time, whatever the host does
    assert 0.0 < duty <= held + 0.05  # CPU actually obtained: less on a busy host, never more
    assert not _alive(pid)


def test_bursts_switch_off():
    quiet = NoisePattern("test-bursts", "cpu", burst_on_s=0.5, burst_off_s=1.5)
    with NoisyNeighbour(quiet) as hog:
        time.sleep(2.5)
        held = hog.held_duty()
    assert 0.1 < held < 0.5  # on a quarter of the time, with at most one extra burst


def test_neighbour_stops_when_the_body_raises():
    with pytest.raises(RuntimeError):
        with NoisyNeighbour("membw") as hog:
            pid = hog.pid
            time.sleep(0.5)
            raise RuntimeError("measurement failed")
    assert not _alive(pid)


def test_neighbour_dies_with_a_killed_parent(tmp_path):
    script = ("import time, sys\nfrom hwprune.bench.noise import NoisyNeighbour\n"
              "h = NoisyNeighbour('cpu').start()\nprint(h.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_cli_runs_a_pattern_and_reports_its_duty(capsys):
    import json

    from hwprune.cli import main

    main(["noise", "cpu-full", "--seconds", "1", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["pattern"]["name"] == "cpu-full" and doc["held_duty"] > 0.9 and 0.0 < doc["duty"] <= 1.0


def test_cli_unknown_pattern_is_one_line(capsys):
    from hwprune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["noise", "loud"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown noise pattern 'loud'" in err and len(err.splitlines()) == 1
