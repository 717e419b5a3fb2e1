"""Rich progress bars for long work.

The bar appears on the first update, so that an error raised while checking the input
prints alone on its line.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def item_progress(title: str, enabled: bool = True) -> Iterator:
    """Yields ``update(description, done, total)``, the callback the profiler and bundler take."""
    if not enabled:
        yield lambda desc, done, total: None
        return
    bar = Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                   console=Console(stderr=True))
    task = bar.add_task("", total=None, title=title)
    started = False

    def update(desc: str, done: int, total: int) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        bar.update(task, description=desc, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            bar.stop()
