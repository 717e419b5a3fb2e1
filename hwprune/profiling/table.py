"""Latency lookup tables: rows of measured units, with the device and settings they hold for.

A table is a Parquet file. Its rows are measurements (see :data:`COLUMNS`); its schema
metadata (key ``hwprune``) holds a JSON document with the device fingerprint, the run
settings (backend and version, execution provider, threads, precision, batch, input
size), the hwprune version, the date, the command line, the profiling plan and whether the
run completed. Tables of different devices or settings never mix silently:
:meth:`LatencyTable.merge` and :meth:`LatencyTable.check_settings` raise
:class:`~hwprune.errors.TableMismatch` naming the first field that differs.

Row sources: ``insitu`` (a node of a profiled run of a whole sampled subnet), ``micro``
(a unit benchmarked in isolation) and ``e2e`` (a whole subnet timed end to end, in its own
unprofiled session: what predictions are validated against).

Anchored tables (``hwprune profile``'s default) tie every configuration to the unpruned model
timed in the same window (:mod:`hwprune.profiling.host_state`): ``state_ref_ms`` is that
window's reference, ``raw_ms`` the row's value as timed, and the time columns hold it
normalised to the table's host state, ``norm_factor`` = table reference / window reference
(:meth:`LatencyTable.renormalise`). ``median_ms`` is the value of the table's estimator (the
median unless ``meta.noise["estimator"]`` names another, see
:data:`hwprune.profiling.measure.ESTIMATORS`). ``meta.noise`` records the estimator and why it was
chosen, the tolerance, the per-model reference; :meth:`LatencyTable.noise_summary` adds how noisy
the windows were.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hwprune.errors import TableError, TableMismatch
from hwprune.profiling.fingerprint import device_identity, fingerprint
from hwprune.atomic import atomic_write_bytes
from hwprune.profiling.rows import UnitKey, op_kind

FORMAT = "hwprune.table/1"
META_KEY = b"hwprune"

STAT_COLUMNS = ["median_ms", "min_ms", "mean_ms", "p90_ms", "p95_ms", "p99_ms", "std_ms", "cov", "rcov", "count",
                "unstable"]
ROW_COLUMNS = ["source", "item", "model", "config", "layer", "node", "kind"]
#: The host's state around a configuration, written by gated profiling runs (``hwprune profile --gate``).
STATE_COLUMNS = ["state_ref_ms", "state_ok", "state_attempts"]
#: Anchored profiling (the default): the row's value as timed, the factor that normalised it, how far
#: the reference moved within its window, the estimate's relative half-width and whether its window hit
#: the repetition cap before the interval was narrow enough.
NOISE_COLUMNS = ["raw_ms", "norm_factor", "ref_moved", "ci_rel", "cap_hit"]
COLUMNS = (ROW_COLUMNS + UnitKey.field_names() + STAT_COLUMNS + ["attempts", "setup_ms", "first_run_ms", "widths"]
           + STATE_COLUMNS + NOISE_COLUMNS)
#: Time columns that normalisation scales together.
TIME_COLUMNS = ["median_ms", "min_ms", "mean_ms", "p90_ms", "p95_ms", "p99_ms", "std_ms"]

#: Settings that must agree between tables (and between a table and a request).
SETTING_KEYS = ("backend", "backend_version", "execution_provider", "device", "threads", "precision", "batch",
                "input_size")


def _num(values) -> pd.Series:
    """``values`` as floats, unknown ones NaN."""
    return pd.to_numeric(pd.Series(values), errors="coerce").astype(float)


def _spread(values) -> dict | None:
    """Median, 90th percentile and maximum of the known ``values`` (None when there are none)."""
    v = _num(values).dropna()
    if not len(v):
        return None
    return {"median": float(v.median()), "p90": float(v.quantile(0.9)), "max": float(v.max())}


def table_estimator(path: str | Path | None) -> str | None:
    """The estimator the table at ``path`` was profiled with, which every later measurement
    compared with it should use (None: no table, or one profiled before tables recorded it)."""
    meta = LatencyTable.read_meta(path) if path is not None else None
    return ((meta.noise or {}).get("estimator") or {}).get("name") if meta is not None else None


def command_line() -> str:
    """The command that is running, with the program's directory left out."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""


def _version() -> str:
    from hwprune import __version__

    return __version__


def _mean_known(*values: float | None) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


@dataclass
class TableMeta:
    settings: dict
    fingerprint: dict = field(default_factory=fingerprint)
    models: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    complete: bool = False
    items_done: int = 0
    items_planned: int = 0
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    updated: str = ""
    command: str = field(default_factory=lambda: command_line())
    hwprune_version: str = field(default_factory=_version)
    profile_seconds: float = 0.0
    node_overhead_ms: float | None = None  # what the layer profiler adds to each node it times, measured
    #: anchored profiling: estimator (and its choice), tolerance, per-model reference the rows are normalised to
    noise: dict = field(default_factory=dict)
    format: str = FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TableMeta":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def stats_columns(stats) -> dict:
    """The stat columns of a row; ``median_ms`` takes the estimator's value where the stats carry one."""
    return {"median_ms": getattr(stats, "value", stats.median), "min_ms": stats.min, "mean_ms": stats.mean, "p90_ms": stats.p90,
            "p95_ms": stats.p95, "p99_ms": stats.p99, "std_ms": stats.std, "cov": stats.cov, "rcov": stats.rcov,
            "count": stats.count, "unstable": stats.unstable}


def unit_row(unit: UnitKey, stats, *, source: str, item: str, model: str, config: str, layer: str = "",
             node: str = "", **extra: Any) -> dict:
    row = {"source": source, "item": item, "model": model, "config": config, "layer": layer, "node": node,
           "kind": op_kind(unit.op, unit.groups, unit.cin), **unit.to_dict(), **stats_columns(stats)}
    row.update(extra)
    return row


class LatencyTable:
    """Measured latencies of one device under one set of settings."""

    def __init__(self, rows: pd.DataFrame | Iterable[Mapping] | None, meta: TableMeta):
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows or []))
        for c in COLUMNS:
            if c not in df.columns:
                df[c] = pd.NA
        self.rows: pd.DataFrame = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)
        self.meta = meta

    # -- views -----------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return self.meta.settings

    @property
    def complete(self) -> bool:
        return bool(self.meta.complete)

    def __len__(self) -> int:
        return len(self.rows)

    def source(self, name: str) -> pd.DataFrame:
        return self.rows[self.rows["source"] == name]

    @property
    def e2e(self) -> pd.DataFrame:
        return self.source("e2e")

    def items_done(self) -> set[str]:
        return set(self.rows["item"].dropna().astype(str))

    def slow_items(self) -> set[str]:
        """Configurations a gated profile timed in the host's slow state (``state_ok`` False)."""
        if "state_ok" not in self.rows:
            return set()
        slow = self.rows["state_ok"].map(lambda v: v is False or v is np.False_)
        return set(self.rows.loc[slow, "item"].dropna().astype(str))

    def summary(self) -> dict:
        r = self.rows
        e2e = self.e2e
        layer_rows = r[r["source"] != "e2e"]
        return {
            "models": sorted(set(r["model"].dropna())),
            "rows": int(len(r)),
            "insitu_rows": int((r["source"] == "insitu").sum()),
            "micro_rows": int((r["source"] == "micro").sum()),
            "e2e_rows": int(len(e2e)),
            "distinct_units": int(layer_rows[UnitKey.field_names()].drop_duplicates().shape[0]) if len(layer_rows) else 0,
            "unstable_rows": int(r["unstable"].fillna(False).astype(bool).sum()),
            "slow_state_configs": len(self.slow_items()),
            "noise": self.noise_summary(),
            "e2e_ms_min": float(e2e["median_ms"].min()) if len(e2e) else None,
            "e2e_ms_max": float(e2e["median_ms"].max()) if len(e2e) else None,
            "complete": self.complete,
            "items": f"{self.meta.items_done}/{self.meta.items_planned}",
            "profile_seconds": round(self.meta.profile_seconds, 1),
            "node_overhead_us": None if self.meta.node_overhead_ms is None else round(self.meta.node_overhead_ms * 1e3, 3),
            "settings": self.settings,
            "device": {k: self.meta.fingerprint.get(k) for k in ("cpu_model", "cpu_cores", "gpus")},
        }

    # -- host state ------------------------------------------------------------------
    def anchored_rows(self) -> pd.Series:
        """Rows tied to a reference timed in their window (anchored profiling)."""
        r = self.rows
        return r["norm_factor"].notna() & r["state_ref_ms"].notna() & r["raw_ms"].notna()

    def renormalise(self) -> dict[str, float]:
        """Normalise every anchored row to its model's table reference, the fast-state reference
        (:func:`~hwprune.profiling.measure.fast_state_reference`) of all the model's window
        references; returns those references (also stored in ``meta.noise["reference_ms"]``).

        Rows keep their timed value in ``raw_ms``; the time columns are rescaled from it, so this
        may run after every configuration as the reference settles."""
        from hwprune.profiling.measure import fast_state_reference

        mask = self.anchored_rows()
        if not mask.any():
            return {}
        tol = float(self.meta.noise.get("tolerance", 0.05))
        r = self.rows
        windows = r.loc[mask, ["model", "item", "state_ref_ms"]].drop_duplicates()
        refs = {m: fast_state_reference(g["state_ref_ms"].astype(float), tol) for m, g in windows.groupby("model")}
        new = r.loc[mask, "model"].map(refs).astype(float) / r.loc[mask, "state_ref_ms"].astype(float)
        scale = new / r.loc[mask, "norm_factor"].astype(float)
        for c in TIME_COLUMNS:
            r.loc[mask, c] = r.loc[mask, c].astype(float) * scale
        r.loc[mask, "norm_factor"] = new
        self.meta.noise["reference_ms"] = refs
        return refs

    def noise_summary(self) -> dict:
        """How noisy the table's windows were: the estimator and its choice, the per-window reference
        over the table's reference, how far the reference moved within windows, the estimates'
        relative interval half-widths, windows that hit the repetition cap, re-measured and
        unsteady configurations."""
        n = self.meta.noise
        e2e = self.e2e
        out = {"anchored": bool(self.anchored_rows().any()), "estimator": n.get("estimator"),
               "tolerance": n.get("tolerance"), "reference_ms": n.get("reference_ms", {})}
        if not len(e2e):
            return out
        refs = out["reference_ms"]
        ratio = _num(e2e["state_ref_ms"]) / _num(e2e["model"].map(refs)) if refs else pd.Series([], dtype=float)
        out.update({"reference_ratio": _spread(ratio), "moved": _spread(e2e["ref_moved"]),
                    "ci_rel": _spread(e2e["ci_rel"]),
                    "cap_hits": int(e2e["cap_hit"].map(lambda v: v is True or v is np.True_).sum()),
                    "remeasured": int((_num(e2e["state_attempts"]).fillna(1) - 1).clip(lower=0).sum()),
                    "unsteady_configs": len(self.slow_items()) if out["anchored"] else None})
        return out

    # -- persistence -----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        self.meta.updated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        df = self.rows.copy()
        for c in ("widths", "layer", "node", "item", "model", "config", "activation", "op", "layout", "kind", "source"):
            df[c] = df[c].astype("string")
        tbl = pa.Table.from_pandas(df, preserve_index=False)
        md = dict(tbl.schema.metadata or {})
        md[META_KEY] = json.dumps(self.meta.to_dict(), default=str).encode()
        tbl = tbl.replace_schema_metadata(md)
        buf = io.BytesIO()
        pq.write_table(tbl, buf, compression="zstd")
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written table."""
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, allow_empty: bool = False, allow_partial: bool = True) -> "LatencyTable":
        p = Path(path)
        if not p.exists():
            raise TableError(f"table '{p}' does not exist", "make one with `hwprune profile ... --out PATH`")
        if p.is_dir():
            raise TableError(f"table path '{p}' is a directory, not a Parquet file")
        try:
            tbl = pq.read_table(p)
        except Exception as e:  # pyarrow raises several types for corrupt or truncated files
            raise TableError(f"table '{p}' is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                             "profile again, or continue with --resume") from None
        md = tbl.schema.metadata or {}
        if META_KEY not in md:
            raise TableError(f"'{p}' is a Parquet file but not an hwprune latency table (no hwprune metadata)")
        try:
            meta = TableMeta.from_dict(json.loads(md[META_KEY]))
        except (ValueError, TypeError) as e:
            raise TableError(f"table '{p}' has unreadable metadata: {e}") from None
        if meta.format != FORMAT:
            raise TableError(f"table '{p}' has format '{meta.format}', this hwprune reads '{FORMAT}'")
        df = tbl.to_pandas()
        for c in df.columns:
            if str(df[c].dtype) == "string":
                df[c] = df[c].astype(object).where(df[c].notna(), None)
        if len(df) == 0 and not allow_empty:
            raise TableError(f"table '{p}' is empty: it holds no measurements", "profile again")
        if not meta.complete and not allow_partial:
            raise TableError(f"table '{p}' is partial ({meta.items_done}/{meta.items_planned} items)",
                             "continue it with `hwprune profile ... --resume`")
        return cls(df, meta)

    @staticmethod
    def read_meta(path: str | Path) -> TableMeta | None:
        """The metadata of the table at ``path`` without reading its rows (None if unreadable)."""
        try:
            md = pq.read_schema(Path(path)).metadata or {}
            return TableMeta.from_dict(json.loads(md[META_KEY])) if META_KEY in md else None
        except (OSError, ValueError, TypeError, pa.ArrowException):
            return None

    # -- compatibility ---------------------------------------------------------------
    def mismatch(self, settings: Mapping, fp: Mapping | None = None) -> str | None:
        """The first difference between this table and ``settings`` (and device), or None."""
        for k in SETTING_KEYS:
            if k in settings and settings[k] is not None and k in self.settings:
                a, b = self.settings.get(k), settings[k]
                if a != b and not (isinstance(a, (list, tuple)) and list(a) == list(b)):
                    return f"{k}: table has {a!r}, requested {b!r}"
        if fp is not None:
            mine, theirs = device_identity(self.meta.fingerprint), device_identity(fp)
            for k, v in mine.items():
                if k == "cpu_flags" and (v is None or theirs.get(k) is None):
                    continue  # one side recorded no flags
                if theirs.get(k) != v:
                    return f"device {k}: table has {v!r}, other has {theirs.get(k)!r}"
        return None

    def check_settings(self, settings: Mapping, fp: Mapping | None = None, what: str = "requested settings") -> None:
        diff = self.mismatch(settings, fp)
        if diff:
            raise TableMismatch(f"table does not match the {what}: {diff}",
                                "profile this device with these settings, or use a matching table")

    def merge(self, other: "LatencyTable") -> "LatencyTable":
        """Rows of both tables; only tables of the same device and settings merge."""
        diff = self.mismatch(other.settings, other.meta.fingerprint)
        if diff:
            raise TableMismatch(f"cannot merge tables of different devices or settings: {diff}")
        meta = TableMeta.from_dict({**self.meta.to_dict(),
                                    "models": sorted(set(self.meta.models) | set(other.meta.models)),
                                    "complete": self.complete and other.complete,
                                    "items_done": self.meta.items_done + other.meta.items_done,
                                    "items_planned": self.meta.items_planned + other.meta.items_planned,
                                    "profile_seconds": self.meta.profile_seconds + other.meta.profile_seconds,
                                    "node_overhead_ms": _mean_known(self.meta.node_overhead_ms,
                                                                    other.meta.node_overhead_ms),
                                    "noise": {**other.meta.noise, **self.meta.noise}})
        merged = LatencyTable(pd.concat([self.rows, other.rows], ignore_index=True), meta)
        merged.renormalise()  # one reference per model over both tables' windows
        return merged

    def append(self, rows: Iterable[Mapping]) -> None:
        new = pd.DataFrame(list(rows))
        if len(new):
            for c in COLUMNS:
                if c not in new.columns:
                    new[c] = pd.NA
            self.rows = pd.concat([self.rows, new[self.rows.columns.intersection(new.columns)]], ignore_index=True) \
                if len(self.rows) else new[COLUMNS]
