"""Build a per-layer latency lookup table for one device.

The plan: for each model, find its channel groups (:class:`~hwprune.pruning.space.PruningSpace`),
sample width configurations across the whole space (the full model, uniform shrinks on
multiples of 8, then random configurations denser on multiples of 8/16/32), and for each
configuration

1. time the whole subnet end to end in a fresh, unprofiled session (``e2e`` rows),
2. profile it in a separate session and record every unit the runtime executes, keyed by
   what the runtime really runs after its fusions (``insitu`` rows),
3. micro-benchmark a few of its convolutions in isolation (``micro`` rows).

Every configuration is *anchored* (``anchor``, the default): the unpruned model, the
reference, is timed before the configuration, between its end-to-end timing and its layer
profile, and after (:class:`~hwprune.profiling.host_state.ReferenceWindow`). When the reference
moved by more than ``anchor.tolerance`` within the window, the configuration is measured again
(up to ``anchor.attempts`` times, within ``gate_budget_s``); a window that stays unsteady is kept
with ``state_ok=False``. Every row is normalised to the table's host state by the ratio of the
table's reference to its window's (:meth:`~hwprune.profiling.table.LatencyTable.renormalise`),
so that a neighbour that slowed the host for a while leaves the rows it touched at their
quiet-host values. Before the first configuration the reference is timed in a few sessions and
the estimator that summarises every window is chosen on them
(:func:`~hwprune.profiling.measure.choose_estimator`); the table records the choice.
``anchor=None`` profiles as earlier tables were: no reference windows, the median, no
normalisation.

With ``gate`` set (shared hosts), every configuration is bracketed by two short timings of
the unpruned model; when either ran more than ``gate`` slower than its fastest timing so far
(another tenant held a core), the configuration is measured again (up to ``gate_attempts``
times), and a last pass re-measures configurations whose bracket stayed slow against the
run's final fastest timing. The bracket is stored in the rows (``state_ref_ms``,
``state_ok``), so a fit can leave slow-state rows out. ``gate_budget_s`` caps the time spent
on re-measurement: once it is spent, every configuration is measured once and kept with its
state (``state_ok=False`` when slow), and the last pass is skipped, so a host that stays slow
for the whole run delays it by at most the budget. In an anchored run a slow window is still
measured again while the budget lasts, but one that stays slow and steady is normalised and
kept (``state_ok`` says whether its window was steady), and the last pass is not needed: the
normalisation is recomputed against the final reference after every configuration.

Rows are committed after every configuration with an atomic write, so killing the run
loses at most the configuration in flight; ``resume=True`` continues a partial table and
``max_minutes`` stops cleanly with a usable partial table (marked partial in its metadata).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from hwprune.profiling.backends.base import Backend, LayerTiming, ModelArtifact
from hwprune.errors import HwpruneError, TableMismatch
from hwprune.profiling.onnx_export import export_onnx
from hwprune.profiling.host_state import HostProbe, ReferenceWindow
from hwprune.atomic import check_writable
from hwprune.profiling.measure import (REFERENCE_SESSIONS, MeasureConfig, Measurement, choose_estimator,
                                      median_session, with_estimator)
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.profiling.table import LatencyTable, TableMeta, unit_row
from hwprune.profiling.rows import UnitKey, UnitSpec


@dataclass(frozen=True)
class ProfilePlan:
    """What a profiling run measures; stored in the table so that ``--resume`` can check it."""

    models: tuple[str, ...]
    batch: int = 1
    input_size: int | None = None
    configs: int = 100
    seed: int = 0
    micro_per_config: int = 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = list(self.models)
        return d


@dataclass(frozen=True)
class AnchorConfig:
    """How a profile ties every configuration to the reference timed in its window."""

    tolerance: float = 0.05  # the largest move of the reference within a window (and the fast-state width)
    attempts: int = 3  # measurements of one configuration while its window stays unsteady
    estimator: str | None = None  # None: chosen on the reference's sessions (choose_estimator)
    estimator_sessions: int = 3  # sessions of each unpruned model the choice is made on

    def to_dict(self) -> dict:
        return asdict(self)


def plan_configs(space: PruningSpace, n: int, seed: int) -> list[tuple[str, WidthConfig]]:
    """``n`` width configurations: the full model, uniform shrinks, then random ones."""
    out: list[tuple[str, WidthConfig]] = [("full", space.full())]
    for f in (0.75, 0.5, 0.25):
        out.append((f"uniform{int(f * 100)}", space.uniform(f, multiple=8)))
    rng = random.Random(seed)
    i = 0
    while len(out) < n:
        i += 1
        out.append((f"r{i:04d}", space.sample(rng)))
    return out[:n]


def unit_specs(module: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, UnitSpec]]:
    """Source-level convolution and linear layers of ``module`` with their input shapes."""
    specs: list[tuple[str, UnitSpec]] = []
    hooks = []

    def hook(name):
        def fn(m, inp, out):
            x = inp[0]
            if isinstance(m, nn.Conv2d):
                pad = m.padding[0] if isinstance(m.padding, tuple) else (m.kernel_size[0] // 2)
                specs.append((name, UnitSpec("conv", m.in_channels, m.out_channels, int(x.shape[2]), int(x.shape[3]),
                                             m.kernel_size[0], m.kernel_size[1], m.stride[0], int(pad), m.groups,
                                             m.dilation[0], int(x.shape[0]))))
            elif isinstance(m, nn.Linear) and x.dim() == 2:
                specs.append((name, UnitSpec("linear", m.in_features, m.out_features, batch=int(x.shape[0]))))
        return fn

    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            module(torch.randn(*input_shape))
    finally:
        for h in hooks:
            h.remove()
    return specs


ProgressFn = Callable[[str, int, int], None]


class Profiler:
    """Runs a :class:`ProfilePlan` on a backend and commits rows to a table file."""

    def __init__(self, backend: Backend, plan: ProfilePlan, out: str | Path, gate: float | None = None,
                 gate_attempts: int = 4, gate_budget_s: float | None = None,
                 anchor: AnchorConfig | None = AnchorConfig()):
        self.backend = backend
        self.anchor = anchor
        self.plan = plan
        self.out = Path(out)
        self.gate = gate if gate else None
        self.gate_attempts = max(1, gate_attempts)
        self.gate_budget_s = gate_budget_s
        self.remeasure_s = 0.0  # time spent this run re-measuring configurations timed in a slow or unsteady state
        self._probe: HostProbe | None = None
        self._ref_dir: tempfile.TemporaryDirectory | None = None

    def settings(self) -> dict:
        return {**self.backend.settings(), "batch": self.plan.batch, "input_size": self.plan.input_size}

    def _open(self, resume: bool, overwrite: bool) -> LatencyTable:
        if self.out.exists() and not (resume or overwrite):
            raise HwpruneError(f"'{self.out}' already exists", "pass --resume to continue it or --overwrite to replace it")
        check_writable(self.out)
        if resume and self.out.exists():
            table = LatencyTable.load(self.out, allow_empty=True)
            table.check_settings(self.settings(), what="settings of this run")
            from hwprune.profiling.fingerprint import fingerprint

            table.check_settings({}, fingerprint(), what="device of this run")
            if len(table) and bool(table.meta.noise.get("anchored")) != bool(self.anchor):
                raise TableMismatch(f"cannot resume '{self.out}': it was profiled "
                                    f"{'with' if table.meta.noise.get('anchored') else 'without'} reference windows",
                                    "resume it with the same anchoring (--no-anchor or not)")
            theirs = table.meta.plan
            for k, v in self.plan.to_dict().items():
                if theirs.get(k) != v:
                    raise TableMismatch(f"cannot resume '{self.out}': its plan has {k}={theirs.get(k)!r}, "
                                        f"this run asks for {v!r}")
        else:
            table = LatencyTable(None, TableMeta(settings=self.settings(), models=list(self.plan.models),
                                                 plan=self.plan.to_dict()))
        if table.meta.node_overhead_ms is None:  # new tables, and older ones resumed on their device
            with tempfile.TemporaryDirectory(prefix="hwprune-probe-") as d:
                table.meta.node_overhead_ms = self.backend.node_overhead_ms(Path(d))
            if table.meta.node_overhead_ms is not None and len(table):
                table.save(self.out)
        return table

    def run(self, resume: bool = False, overwrite: bool = False, max_minutes: float | None = None,
            progress: ProgressFn | None = None) -> LatencyTable:
        table = self._open(resume, overwrite)
        spaces, items = plan_items(self.plan)
        table.meta.items_planned = len(items)
        done = table.items_done()
        seen_specs = set(table.rows.loc[table.rows["source"] == "micro", "node"].dropna()) if len(table) else set()
        t_start = time.perf_counter()
        prior = table.meta.profile_seconds
        measured = 0
        torch_threads, cfg = torch.get_num_threads(), self.backend.measure_cfg
        if self.backend.name != "torch":
            torch.set_num_threads(1)  # keep torch's own thread pool quiet while another runtime is timed
        try:
            self._start(table, spaces)
            for k, (model, cid, cfg_w) in enumerate(items):
                item = f"{model}/{cid}"
                if progress:
                    progress(item, k, len(items))
                if item in done:
                    continue
                if max_minutes is not None and measured and time.perf_counter() - t_start >= max_minutes * 60:
                    break  # at least one configuration per run, so that a partial table is usable
                rows = self._measure_item(spaces[model], model, cid, item, cfg_w, seen_specs)
                measured += 1
                self._commit(table, rows, len(items), prior + time.perf_counter() - t_start)
            if self.gate and not self.anchor:
                self._regate(table, spaces, items, seen_specs, progress)
        finally:
            torch.set_num_threads(torch_threads)
            self.backend.measure_cfg = cfg
            if self._ref_dir is not None:
                self._ref_dir.cleanup()
                self._ref_dir = None
        if progress:
            progress("", len(items), len(items))
        if not len(table):
            table.save(self.out)
        return table

    def _commit(self, table: LatencyTable, rows: list[dict], planned: int, seconds: float) -> None:
        """Append one configuration's rows, renormalise an anchored table, write it atomically."""
        table.append(rows)
        if self.anchor:
            table.renormalise()
        table.meta.items_done = len(table.items_done())
        table.meta.complete = table.meta.items_done >= planned
        table.meta.profile_seconds = seconds
        table.save(self.out)

    def _start(self, table: LatencyTable, spaces: dict[str, PruningSpace]) -> None:
        """Set up the reference probe (anchored or gated runs) and, anchored, the estimator: the one
        the table already records (resumed), the one asked for, or the one chosen on the reference."""
        if not (self.gate or self.anchor):
            return
        self._ref_dir = tempfile.TemporaryDirectory(prefix="hwprune-ref-")
        self._probe = HostProbe(self.backend, self.plan.batch, self._ref_dir.name)
        if not self.anchor:
            return
        noise = table.meta.noise
        choice = noise.get("estimator") or self._choose_estimator(spaces)
        self.backend.measure_cfg = with_estimator(self.backend.measure_cfg, choice["name"])
        noise.update({"anchored": True, "tolerance": self.anchor.tolerance, "attempts": self.anchor.attempts,
                      "estimator": choice, "measure": self.backend.measure_cfg.to_dict()})

    def _choose_estimator(self, spaces: dict[str, PruningSpace]) -> dict:
        """Time every unpruned model in ``anchor.estimator_sessions`` fresh sessions of fixed length and
        keep the estimator whose values spread least between them (or the one the anchor names)."""
        if self.anchor.estimator:
            with_estimator(self.backend.measure_cfg, self.anchor.estimator)  # an unknown name fails here
            return {"name": self.anchor.estimator, "chosen_by": "given"}
        keep = self.backend.measure_cfg
        self.backend.measure_cfg = replace(keep, ci_target=None)  # every candidate scored on the same windows
        try:
            groups = [[self.backend.measure_e2e(self._probe.reference(m, spaces[m])).samples_ms
                       for _ in range(max(2, self.anchor.estimator_sessions))] for m in self.plan.models]
        finally:
            self.backend.measure_cfg = keep
        return {**choose_estimator(groups).to_dict(), "chosen_by": "data"}

    def _regate(self, table: LatencyTable, spaces, items, seen_specs: set, progress) -> None:
        """Mark the configurations whose bracket was slow against the run's final fastest timing, and
        re-measure each once while the re-measurement budget lasts."""
        if not len(table) or "state_ref_ms" not in table.rows:
            return
        e2e = table.rows[table.rows["source"] == "e2e"]
        slow = set(e2e.loc[e2e["state_ref_ms"] > (1 + self.gate) * e2e["model"].map(self._probe.best).fillna(float("inf")),
                           "item"])
        if slow:  # judged against the run's fastest timing, these were slow: say so even if the budget is spent
            table.rows.loc[table.rows["item"].isin(slow), "state_ok"] = False
            table.save(self.out)
        todo = [(m, cid, cfg) for m, cid, cfg in items if f"{m}/{cid}" in slow]
        for k, (model, cid, cfg) in enumerate(todo):
            if not self._budget_left():
                break
            t0 = time.perf_counter()
            item = f"{model}/{cid}"
            if progress:
                progress(f"re-measuring {item} (slow host)", k, len(todo))
            rows = self._measure_item(spaces[model], model, cid, item, cfg, seen_specs, micro=False)
            old = table.rows[table.rows["item"] == item]
            keep_micro = old[old["source"] == "micro"]
            table.rows = table.rows[table.rows["item"] != item]
            table.append(rows + keep_micro.to_dict("records"))
            table.save(self.out)
            self.remeasure_s += time.perf_counter() - t0

    def _budget_left(self) -> bool:
        return self.gate_budget_s is None or self.remeasure_s < self.gate_budget_s

    def _measure_item(self, space: PruningSpace, model: str, cid: str, item: str, cfg: WidthConfig,
                      seen_specs: set, micro: bool = True) -> list[dict]:
        if self.anchor:
            return self._measure_anchored(space, model, cid, item, cfg, seen_specs, micro)
        if not self.gate:
            return self._measure_once(space, model, cid, item, cfg, seen_specs, micro)
        micro_rows: list[dict] = []
        for attempt in range(1, self.gate_attempts + 1):
            if attempt > 1 and not self._budget_left():
                break  # keep the slow-state measurement, marked state_ok=False
            t0 = time.perf_counter()
            before = self._probe(model, space)
            rows = self._measure_once(space, model, cid, item, cfg, seen_specs, micro and attempt == 1)
            ref = max(before, self._probe(model, space))
            ok = self._probe.fast(model, ref, self.gate)
            stamp = {"state_ref_ms": ref, "state_ok": bool(ok), "state_attempts": attempt}
            if attempt == 1:  # isolated units are measured once, with the first attempt's state
                micro_rows = [{**r, **stamp} for r in rows if r["source"] == "micro"]
            rows = [{**r, **stamp} for r in rows if r["source"] != "micro"]
            if attempt > 1:
                self.remeasure_s += time.perf_counter() - t0
            if ok:
                break
        return rows + micro_rows

    def _measure_anchored(self, space: PruningSpace, model: str, cid: str, item: str, cfg: WidthConfig,
                          seen_specs: set, micro: bool = True) -> list[dict]:
        """One configuration in a reference window, measured again while the reference moved by more
        than the tolerance within it (or, gated, ran slow) and the re-measurement budget lasts."""
        micro_rows: list[dict] = []
        for attempt in range(1, self.anchor.attempts + 1):
            if attempt > 1 and not self._budget_left():
                break
            t0 = time.perf_counter()
            win = ReferenceWindow()
            rows = self._measure_once(space, model, cid, item, cfg, seen_specs, micro and attempt == 1,
                                      mark=lambda: win.timings_ms.append(self._probe(model, space)))
            steady = win.steady(self.anchor.tolerance)
            rows = anchor_rows(rows, win, attempt, steady)
            if attempt == 1:  # isolated units are measured once, in the first attempt's window
                micro_rows = [r for r in rows if r["source"] == "micro"]
            rows = [r for r in rows if r["source"] != "micro"]
            if attempt > 1:
                self.remeasure_s += time.perf_counter() - t0
            if steady and (not self.gate or self._probe.fast(model, min(win.timings_ms), self.gate)):
                break
        return rows + micro_rows

    def _measure_once(self, space: PruningSpace, model: str, cid: str, item: str, cfg: WidthConfig,
                      seen_specs: set, micro: bool = True, mark: Callable[[], None] | None = None) -> list[dict]:
        """Time one configuration end to end, profile its layers, benchmark a few units; ``mark`` (the
        reference probe of an anchored run) runs before, between the two and after."""
        mark = mark or (lambda: None)
        module = space.apply(cfg).eval()
        shape = (self.plan.batch, *space.input_shape[1:])
        with tempfile.TemporaryDirectory(prefix="hwprune-item-") as d:
            art = ModelArtifact(input_shape=shape, module=module, name=item)
            if self.backend.needs_onnx():
                art.onnx_path = export_onnx(module, shape, Path(d) / "model.onnx")
            sessions = REFERENCE_SESSIONS if cid == "full" else 1
            mark()
            e2e = median_session(lambda: self.backend.measure_e2e(art), sessions)
            mark()
            layers = self.backend.profile_layers(art)
            units = [(name, spec, self.backend.measure_unit(spec, Path(d)))
                     for name, spec in (pick_micro(module, shape, self.plan, item, seen_specs) if micro else [])]
            mark()
        return item_rows(model, cid, item, cfg, shape, e2e, layers, units)


def anchor_rows(rows: list[dict], win: ReferenceWindow, attempt: int, steady: bool) -> list[dict]:
    """``rows`` stamped with their window: the reference of their part of it (the end-to-end timing's or
    the layer profile's), how far it moved, whether it was steady, the attempt; the timed value is kept
    in ``raw_ms`` and the rows start unnormalised (``norm_factor`` 1)."""
    out = []
    for r in rows:
        ref = win.e2e_ms() if r["source"] == "e2e" else win.layers_ms()
        out.append({**r, "state_ref_ms": ref, "state_ok": bool(steady), "state_attempts": attempt,
                    "ref_moved": win.moved, "raw_ms": r["median_ms"], "norm_factor": 1.0})
    return out


def pick_micro(module: nn.Module, shape: Sequence[int], plan: ProfilePlan, item: str,
               seen_specs: set) -> list[tuple[str, UnitSpec]]:
    """Up to ``plan.micro_per_config`` layers of this subnet not yet benchmarked in isolation."""
    if plan.micro_per_config <= 0:
        return []
    rng = random.Random(f"{plan.seed}/{item}")
    fresh = [(n, s) for n, s in unit_specs(module, shape) if s.key() not in seen_specs]
    rng.shuffle(fresh)
    picked = fresh[: plan.micro_per_config]
    seen_specs.update(s.key() for _, s in picked)
    return picked


def item_rows(model: str, cid: str, item: str, cfg: WidthConfig, shape: Sequence[int], e2e: Measurement | None,
              layers: list[LayerTiming], micro: list[tuple[str, UnitSpec, list[LayerTiming]]]) -> list[dict]:
    """Table rows of one measured configuration (used by local runs and bundle imports)."""
    batch, _, h, w = shape
    rows: list[dict] = []
    if e2e is not None:
        rows.append(unit_row(UnitKey(op="model", batch=batch, h=h, w=w), e2e.stats, source="e2e", item=item,
                             model=model, config=cid, attempts=e2e.attempts, setup_ms=e2e.setup_ms,
                             first_run_ms=e2e.first_run_ms, widths=json.dumps(cfg.widths),
                             ci_rel=e2e.stats.ci_rel, cap_hit=bool(e2e.stats.cap_hit)))
    for lt in layers:
        rows.append(unit_row(lt.unit, lt.stats, source="insitu", item=item, model=model, config=cid,
                             layer=lt.layer, node=lt.node))
    for name, spec, unit_layers in micro:
        for lt in unit_layers:
            rows.append(unit_row(lt.unit, lt.stats, source="micro", item=item, model=model, config=cid,
                                 layer=name, node=spec.key()))
    return rows


def plan_items(plan: ProfilePlan) -> tuple[dict[str, PruningSpace], list[tuple[str, str, WidthConfig]]]:
    """The spaces of the plan's models and its (model, config id, widths) items, in order."""
    spaces = {m: PruningSpace.from_name(m, input_size=plan.input_size) for m in plan.models}
    items = [(m, cid, cfg) for m in plan.models for cid, cfg in plan_configs(spaces[m], plan.configs, plan.seed)]
    return spaces, items


def profile(models: Sequence[str] | str, out: str | Path, backend: str | Backend = "onnxruntime", *, batch: int = 1,
            threads: int | None = None, input_size: int | None = None, configs: int = 100, seed: int = 0,
            micro_per_config: int = 2, measure: MeasureConfig | None = None, resume: bool = False,
            overwrite: bool = False, max_minutes: float | None = None,
            progress: ProgressFn | None = None, gate: float | None = None,
            gate_budget_s: float | None = None, anchor: AnchorConfig | None = AnchorConfig()) -> LatencyTable:
    """Profile ``models`` on this machine and write a latency table to ``out``.

    ``anchor`` ties every configuration to the unpruned model timed in its window and normalises
    the rows to one host state (see the module's docstring); ``anchor=None`` turns that off.

    >>> table = profile("cifar_resnet20", "r20.parquet", threads=2, configs=20)  # doctest: +SKIP
    """
    from hwprune.profiling.backends import create_backend
    from hwprune.models import is_model

    names = (models,) if isinstance(models, str) else tuple(models)
    for n in names:
        if not is_model(n):
            from hwprune.models import create_model

            create_model(n)  # raises the one-line "unknown model" error with suggestions
    if batch < 1:
        raise HwpruneError(f"batch must be at least 1, got {batch}")
    if configs < 1:
        raise HwpruneError(f"configs must be at least 1, got {configs}")
    be = backend if isinstance(backend, Backend) else create_backend(backend, threads=threads, measure=measure)
    plan = ProfilePlan(models=names, batch=batch, input_size=input_size, configs=configs, seed=seed,
                       micro_per_config=micro_per_config)
    if gate is not None and not 0 <= gate < 1:
        raise HwpruneError(f"gate must be a fraction in [0, 1), got {gate}")
    if gate_budget_s is not None and gate_budget_s < 0:
        raise HwpruneError(f"gate budget must be at least 0 seconds, got {gate_budget_s}")
    check_anchor(anchor)
    return Profiler(be, plan, out, gate=gate, gate_budget_s=gate_budget_s, anchor=anchor).run(
        resume=resume, overwrite=overwrite, max_minutes=max_minutes, progress=progress)


def check_anchor(anchor: AnchorConfig | None) -> None:
    """One-line errors for anchor settings that cannot work, before any measurement."""
    if anchor is None:
        return
    if not 0 < anchor.tolerance < 1:
        raise HwpruneError(f"the anchor tolerance must be a fraction in (0, 1), got {anchor.tolerance}")
    if anchor.attempts < 1 or anchor.estimator_sessions < 2:
        raise HwpruneError("anchored profiling needs at least 1 attempt and 2 estimator sessions")
    if anchor.estimator is not None:
        from hwprune.profiling.measure import ESTIMATORS

        ESTIMATORS.get(anchor.estimator)
