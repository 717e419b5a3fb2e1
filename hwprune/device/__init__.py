"""The device side of hwprune: measure a bundle with only onnxruntime and numpy.

On an edge board or a phone CPU, install ``onnxruntime`` and ``numpy`` and copy the
``hwprune`` package (no torch, pandas or onnx needed), then::

    python -m hwprune.device run BUNDLE [--threads T] [--max-minutes M]

The host writes BUNDLE with ``hwprune bundle``; the device writes ``BUNDLE/results``;
the host turns them into a table with ``hwprune import BUNDLE --out table.parquet``.
"""

from hwprune.device.run import main, run_bundle

__all__ = ["main", "run_bundle"]
