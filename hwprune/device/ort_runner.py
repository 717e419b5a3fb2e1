"""ONNX Runtime measurement, with nothing but onnxruntime and numpy.

This is the measuring half of hwprune. The host uses it in-process; an edge or mobile
device runs it through ``python -m hwprune.device run BUNDLE`` with only onnxruntime and
numpy installed. Two runs per model, never mixed:

* :func:`time_model` creates a plain session (timed as set-up), times the first run
  apart, then follows the protocol of :mod:`hwprune.profiling.measure`;
* :func:`profile_model` creates a separate session with ``enable_profiling`` and the
  optimised graph written to disk, runs it, and returns per-node samples read from the
  runtime's own profile (``*_kernel_time`` events), warm-up runs dropped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from hwprune.profiling.measure import MeasureConfig, Measurement, Stats, collect, measure, measure_pair, time_once


#: ONNX Runtime's graph optimisation levels by name ("disabled": the graph runs as exported)
GRAPH_OPTIMIZATIONS = ("disabled", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtSettings:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # one of GRAPH_OPTIMIZATIONS
    spinning: bool = True
    provider: str = "CPUExecutionProvider"

    def to_dict(self) -> dict:
        return {"intra_op_threads": self.intra_op_threads, "inter_op_threads": self.inter_op_threads,
                "graph_optimization": self.graph_optimization, "spinning": self.spinning,
                "execution_provider": self.provider}


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _session_options(s: OrtSettings):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = s.intra_op_threads
    so.inter_op_num_threads = s.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[s.graph_optimization]
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if s.spinning else "0")
    return so


def _feeds(sess, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _timed_session(onnx_path: str | Path, so, settings: OrtSettings) -> tuple[Callable[[], float], float, float]:
    """A fresh, unprofiled session as a timing step, with its set-up and first-run times (ms)."""
    import onnxruntime as ort

    sess, setup_ms = time_once(lambda: ort.InferenceSession(str(onnx_path), so, providers=[settings.provider]))
    feeds = _feeds(sess)
    _, first_ms = time_once(lambda: sess.run(None, feeds))

    def step() -> float:
        t = time.perf_counter_ns()
        sess.run(None, feeds)
        return (time.perf_counter_ns() - t) / 1e6

    return step, setup_ms, first_ms


def time_model(onnx_path: str | Path, settings: OrtSettings, cfg: MeasureConfig) -> Measurement:
    """End-to-end latency of one inference with a fresh, unprofiled session."""
    step, setup_ms, first_ms = _timed_session(onnx_path, _session_options(settings), settings)
    m = measure(step, cfg)
    m.setup_ms, m.first_run_ms = setup_ms, first_ms
    return m


def time_pair(onnx_path: str | Path, reference_path: str | Path, settings: OrtSettings,
              cfg: MeasureConfig) -> tuple[Measurement, Measurement]:
    """End-to-end latency of a model and a reference, each in a fresh session, timed in
    alternating chunks in the same window (:func:`hwprune.profiling.measure.measure_pair`)."""
    so = _session_options(settings)
    a, b = (_timed_session(p, so, settings) for p in (onnx_path, reference_path))
    pair = measure_pair(a[0], b[0], cfg)
    for m, (_, setup_ms, first_ms) in zip(pair, (a, b)):
        m.setup_ms, m.first_run_ms = setup_ms, first_ms
    return pair


def node_overhead_ms(short_path: str | Path, long_path: str | Path, n_short: int, n_long: int,
                     settings: OrtSettings, cfg: MeasureConfig) -> float:
    """What the runtime's profiler adds to the time of each node it reports (ms per node).

    Two chains of the same tiny element-wise node, ``n_short`` and ``n_long`` long, are
    timed unprofiled and profiled: per added node, the reported kernel time minus the
    added end-to-end time. On x86 with ONNX Runtime 1.31 this is about 1 us per node,
    whatever the node's size; it matters for small models, whose summed node times would
    otherwise count it once per node (and the number of nodes changes with the widths).
    """
    real = (time_model(long_path, settings, cfg).median_ms - time_model(short_path, settings, cfg).median_ms)
    rep = [sum(n.stats.median for n in profile_model(p, settings, cfg)) for p in (long_path, short_path)]
    return max((rep[0] - rep[1] - real) / (n_long - n_short), 0.0)


@dataclass
class NodeRecord:
    """One executed node of a profiled run: what the runtime reported, summarised."""

    name: str
    op: str
    input_shapes: list[list[int]]
    output_shapes: list[list[int]]
    stats: Stats

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "input_shapes": self.input_shapes,
                "output_shapes": self.output_shapes, "stats": self.stats.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "NodeRecord":
        return cls(d["name"], d["op"], d["input_shapes"], d["output_shapes"], Stats(**d["stats"]))


@dataclass
class NodeSamples:
    """Per-node samples of a profiled run, as the runtime reported them."""

    name: str
    op: str
    input_shapes: list[list[int]]
    output_shapes: list[list[int]]
    samples_ms: list[float] = field(default_factory=list)

    def stats(self, cov_threshold: float) -> Stats:
        return Stats.from_samples(self.samples_ms, cov_threshold)

    def record(self, cov_threshold: float) -> NodeRecord:
        return NodeRecord(self.name, self.op, self.input_shapes, self.output_shapes, self.stats(cov_threshold))


def _shapes(arg) -> list[list[int]]:
    out = []
    for d in arg or []:
        for v in d.values():
            out.append([int(x) for x in v])
    return out


def _parse_profile(path: str, skip_runs: int) -> list[NodeSamples]:
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    nodes: dict[str, NodeSamples] = {}
    seen: dict[str, int] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        name = e["name"][: -len("_kernel_time")]
        seen[name] = seen.get(name, 0) + 1
        if seen[name] <= skip_runs:
            continue
        ns = nodes.get(name)
        if ns is None:
            ns = nodes[name] = NodeSamples(name, args.get("op_name", ""), _shapes(args.get("input_type_shape")),
                                           _shapes(args.get("output_type_shape")))
        ns.samples_ms.append(float(e["dur"]) / 1000.0)
    return list(nodes.values())


def profile_model(onnx_path: str | Path, settings: OrtSettings, cfg: MeasureConfig,
                  optimized_path: str | Path | None = None) -> list[NodeRecord]:
    """Per-node kernel times from ONNX Runtime's profiler (a run separate from timing).

    ``optimized_path``, when given, receives the graph the runtime really executes, so
    the host can read fused activations, fused Adds and layout reorders from it. Only its
    structure is kept: the weights ONNX Runtime writes beside it are deleted at once.
    Nodes whose time is unstable are measured again (up to ``cfg.retries`` times); the
    attempt with the least time in unstable nodes is kept.
    """
    best: list[NodeSamples] | None = None
    best_bad = float("inf")
    for attempt in range(cfg.retries + 1):
        tmpdir = tempfile.mkdtemp(prefix="hwprune-prof-")
        sess = _profiling_session(onnx_path, settings, tmpdir, optimized_path if attempt == 0 else None)
        nodes = _profiled_nodes(sess, cfg, tmpdir)
        bad = _unstable_share(nodes, cfg.cov_threshold)
        if bad < best_bad:
            best, best_bad = nodes, bad
        if bad <= 0.1:
            break
    assert best is not None
    return [n.record(cfg.cov_threshold) for n in best]


def _profiling_session(onnx_path: str | Path, settings: OrtSettings, tmpdir: str,
                       optimized_path: str | Path | None):
    """A session that profiles into ``tmpdir`` and, with ``optimized_path``, writes its optimised graph there."""
    import onnxruntime as ort

    so = _session_options(settings)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmpdir, "p")
    weights = None
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        weights = Path(optimized_path).name + ".weights"
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    sess = ort.InferenceSession(str(onnx_path), so, providers=[settings.provider])
    if weights is not None:
        try:
            os.remove(Path(optimized_path).parent / weights)
        except OSError:
            pass
    return sess


def _profiled_nodes(sess, cfg: MeasureConfig, tmpdir: str) -> list[NodeSamples]:
    """Run ``sess`` as the protocol says and read each node's samples from its profile (warm-up dropped)."""
    feeds = _feeds(sess)
    runs = 0

    def step() -> float:
        nonlocal runs
        sess.run(None, feeds)
        runs += 1
        return 0.0  # the times come from the profile; the protocol only decides how many runs

    step()  # the first run, dropped with the warm-up below
    timed = collect(step, replace(cfg, max_iters=min(cfg.max_iters, cfg.profile_max_iters)))
    skip = runs - len(timed)
    prof = sess.end_profiling()
    try:
        return _parse_profile(prof, skip)
    finally:
        try:
            os.remove(prof)
            os.rmdir(tmpdir)
        except OSError:
            pass


def _unstable_share(nodes: list[NodeSamples], cov_threshold: float) -> float:
    """The share of the summed node medians that lies in unstable nodes."""
    total = sum(float(np.median(x.samples_ms)) for x in nodes) or 1.0
    return sum(float(np.median(x.samples_ms)) for x in nodes if x.stats(cov_threshold).unstable) / total

