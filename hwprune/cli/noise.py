"""``hwprune noise``: run a reproducible noisy neighbour while something else is measured."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from hwprune.cli import app, console


@app.command()
def noise(
    pattern: str = typer.Argument(..., help="cpu | cpu-full | membw | bursts (see --list)."),
    seconds: float = typer.Option(60.0, "--seconds", min=0.1, help="How long to load the host."),
    cpu: Optional[int] = typer.Option(None, "--cpu", min=0, help="Pin the neighbour to this CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print the pattern and the duty cycle held as JSON."),
) -> None:
    """Load this host with a known pattern for a while (Ctrl-C stops it cleanly)."""
    from dataclasses import asdict

    from hwprune.bench.noise import NoisyNeighbour

    hog = NoisyNeighbour(pattern, cpu=cpu)
    t0 = time.monotonic()
    with hog:
        console.print(f"noisy neighbour '{hog.pattern.name}' ({hog.pattern.summary}) running as pid {hog.pid}"
                      f"{'' if cpu is None else f' on CPU {cpu}'} for {seconds:g} s", highlight=False)
        try:
            time.sleep(seconds)
        finally:
            duty, held = hog.duty(), hog.held_duty()
    doc = {"pattern": asdict(hog.pattern), "cpu": cpu, "seconds": round(time.monotonic() - t0, 3),
           "duty": round(duty, 4), "held_duty": round(held, 4), "expected_duty": hog.pattern.expected_duty()}
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        console.print(f"held a duty cycle of {100 * held:.1f}% (pattern: {100 * doc['expected_duty']:.0f}%), "
                      f"of which the CPU granted {100 * duty:.1f}%", highlight=False)
