"""The list of models a benchmark compares: zoo names (with optional widths), checkpoints and ONNX files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hwprune.bench.harness import BenchModel


def bench_models(names: Sequence[str] = (), widths_file: str | Path | None = None,
                 checkpoints: Sequence[str | Path] = (), onnx: Sequence[str | Path] = (),
                 input_size: int | None = None) -> list[BenchModel]:
    """:class:`BenchModel` s in order: ``names``, then ``checkpoints``, then ``onnx`` files.

    Each name is ``NAME`` or ``NAME=WIDTHS.json``; a name without its own width file takes
    ``widths_file``. ``input_size`` sets the image side of zoo models and of ONNX files whose
    input shape is dynamic.
    """
    models = []
    for m in names:
        name, _, w = m.partition("=")
        models.append(BenchModel.from_name(name, w or widths_file, input_size=input_size))
    models += [BenchModel.from_checkpoint(c) for c in checkpoints]
    models += [BenchModel.from_onnx(o, input_size=input_size) for o in onnx]
    return models
