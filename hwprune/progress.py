"""Rich progress bars for long work, silenced when output is not a terminal or JSON is asked for."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def item_progress(title: str, enabled: bool = True) -> Iterator:
    """Yields ``update(description, done, total)`` for the profiler-style callbacks."""
    console = Console(stderr=True)
    if not enabled:
        yield lambda desc, done, total: None
        return
    with Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                  console=console, transient=False) as bar:
        task = bar.add_task("", total=None, title=title)

        def update(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        yield update
