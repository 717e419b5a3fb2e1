"""Reports for deployment teams: one self-contained HTML page, and a Markdown twin.

Sections (each with a stable id): the device fingerprint and settings, the measured
results, accuracy versus throughput with its Pareto front (like the PruneNet paper's
Figure 1), per-layer width charts (kept fraction per channel group, like its Figures 2
and 3), predicted versus measured latency, the layer-sensitivity picture of a checkpoint pruned by
the ``lstm`` method (:mod:`hwprune.pruning.lstm.sensitivity`), and the exact commands that reproduce it.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Sequence

from hwprune.bench.figures import figure_png

SECTIONS = ("device", "results", "pareto", "widths", "predicted", "sensitivity", "commands")
CHARTS = (("pareto", "Accuracy versus throughput"), ("widths", "Per-layer widths"),
          ("predicted", "Predicted versus measured latency"), ("sensitivity", "Layer sensitivity (LSTM controller)"))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (throughput up, accuracy up), by throughput."""
    idx = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _width_figure(lines: dict[str, Sequence[float]], labels: Sequence[str] | None = None, title: str | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(v) for v in lines.values())
    fig, ax = plt.subplots(figsize=(max(7.0, 0.22 * n), 3.8))
    for name, fr in lines.items():
        ax.plot(range(len(fr)), fr, marker=".", label=name)
    ax.set_xlabel("channel group (network order)")
    ax.set_ylabel("kept fraction of channels")
    ax.set_ylim(0, 1.05)
    if labels is not None:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def width_chart(lines: dict[str, Sequence[float]], out: str | Path, labels: Sequence[str] | None = None,
                title: str | None = None) -> Path:
    """Per-layer width chart (like the PruneNet paper's Figures 2 and 3): kept fraction of each
    channel group in network order, one line per entry of ``lines``; written as a PNG."""
    from hwprune.atomic import atomic_write_bytes

    if not lines:
        raise ValueError("width_chart needs at least one line")
    return atomic_write_bytes(Path(out), figure_png(_width_figure(lines, labels, title)))


def _figures(doc: dict, cks: list[dict]) -> dict[str, bytes | None]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes | None] = {}
    acc = {c["label"]: c["top1"] for c in cks if c.get("top1") is not None}
    batch = max(doc["settings"]["batches"])
    pts = [(r["throughput_ips"], acc[r["model"]], r["model"]) for r in doc["results"]
           if r.get("throughput_ips") and r["batch"] == batch and r["model"] in acc]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(p[0], p[1]) for p in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "r--", lw=1, label="Pareto front")
        ax.set_xlabel(f"throughput (images/s, batch {batch})")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs["pareto"] = figure_png(fig)
    else:
        figs["pareto"] = None
    wcks = [c for c in cks if c.get("fractions")]
    if wcks:
        figs["widths"] = figure_png(_width_figure({c["label"]: c["fractions"] for c in wcks}))
    else:
        figs["widths"] = None
    pv = [(r["latency_ms"]["median"], r["predicted_ms"], r["model"]) for r in doc["results"]
          if r.get("predicted_ms") and r.get("latency_ms")]
    if pv:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter([p[0] for p in pv], [p[1] for p in pv])
        lo, hi = min(min(p[:2]) for p in pv) * 0.9, max(max(p[:2]) for p in pv) * 1.1
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="0.85", label="±5%")
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("predicted latency (ms)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs["predicted"] = figure_png(fig)
    else:
        figs["predicted"] = None
    return figs


def _checkpoint_rows(paths: Sequence[Path]) -> list[dict]:
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.pruning.space import PruningSpace

    rows = []
    for p in paths:
        ck = Checkpoint.load(p)
        acc = ck.meta.get("accuracy") or {}
        top1 = acc.get("top1", ck.meta.get("top1"))
        row = {"label": Path(p).stem, "path": str(p), "arch": ck.arch, "top1": top1, "fractions": None,
               "meta": {k: v for k, v in ck.meta.items() if k in ("method", "objective", "target", "predicted_ms",
                                                                     "measured_ms", "cost_fraction", "parent")}}
        if ck.widths:
            space = PruningSpace.from_name(ck.arch)
            row["fractions"] = space.kept_fractions(ck.widths)
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_RESULT_HEADERS = ["model", "batch", "median ms", "p90 ms", "p99 ms", "CoV across sessions", "images/s",
                   "predicted ms", "status"]
_NO_DATA = {"pareto": "no checkpoint with accuracy among the benched models",
            "widths": "no pruned checkpoint given",
            "predicted": "bench was run without --table",
            "sensitivity": "no checkpoint pruned by the lstm method"}


def _load_bench(bench_json: Path) -> dict:
    from hwprune.errors import HwpruneError

    try:
        doc = json.loads(bench_json.read_text())
        doc["results"], doc["settings"], doc["device"]
    except (OSError, ValueError, KeyError) as e:
        raise HwpruneError(f"'{bench_json}' is not a bench result written by `hwprune bench --json` ({e})") from None
    return doc


def _device_rows(doc: dict) -> list[tuple[str, str]]:
    dev = doc["device"]
    return [("CPU", f"{dev.get('cpu_model')} ({dev.get('cpu_cores')} cores, {' '.join(dev.get('cpu_flags') or [])})"),
            ("GPU", ", ".join(f"{g['name']} (driver {g['driver']})" for g in dev.get("gpus") or []) or "none"),
            *[(k, _fmt(v)) for k, v in doc["settings"].items() if k != "measure"]]


def _result_rows(results: list[dict]) -> list[list]:
    rows = []
    for r in results:
        lat = r.get("latency_ms") or {}
        rows.append([r["model"], r["batch"], _fmt(lat.get("median", "")), _fmt(lat.get("p90", "")),
                     _fmt(lat.get("p99", "")), f"{100 * lat.get('between_session_cov', 0):.2f}%" if lat else "",
                     _fmt(r.get("throughput_ips", "")), _fmt(r.get("predicted_ms", "") or ""),
                     r.get("error") or "ok"])
    return rows


def _markdown(doc: dict, device_rows, result_rows, figs: dict, commands: list[str], stem: Path) -> str:
    """The Markdown twin; writes each figure as a PNG file beside it (``STEM_KEY.png``)."""
    from hwprune.atomic import atomic_write_bytes

    md = ["# hwprune benchmark report", "", "## Device {#device}", "", "| | |", "|---|---|"]
    md += [f"| {k} | {html.escape(str(v))} |" for k, v in device_rows]
    md += ["", "## Results {#results}", "", "| " + " | ".join(_RESULT_HEADERS) + " |",
           "|" + "---|" * len(_RESULT_HEADERS)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in result_rows]
    for s in doc.get("speedups", []):
        md.append(f"\n{s['model']} vs {s['baseline']} at batch {s['batch']}: **{s['speedup']:.2f}x** (interleaved rounds)")
    for key, title in CHARTS:
        md += ["", f"## {title} {{#{key}}}", ""]
        if figs[key]:
            png = Path(f"{stem}_{key}.png")
            atomic_write_bytes(png, figs[key])
            md.append(f"![{title}]({png.name})")
        else:
            md.append("(no data for this chart: " + _NO_DATA[key] + ")")
    md += ["", "## Reproduce {#commands}", "", "```bash", *commands, "```", ""]
    return "\n".join(md)


def _table_html(head, rows) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _html(doc: dict, device_rows, result_rows, figs: dict, cks: list[dict], commands: list[str]) -> str:
    """The self-contained page: figures inlined as base64 PNGs."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>hwprune report</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>",
             "<h1>hwprune benchmark report</h1>",
             f"<section id='device'><h2>Device</h2>{_table_html(['', ''], device_rows)}</section>",
             f"<section id='results'><h2>Results</h2>{_table_html(_RESULT_HEADERS, result_rows)}"]
    for s in doc.get("speedups", []):
        parts.append(f"<p>{html.escape(s['model'])} vs {html.escape(s['baseline'])} at batch {s['batch']}: "
                     f"<b>{s['speedup']:.2f}x</b></p>")
    parts.append("</section>")
    for key, title in CHARTS:
        body = (f"<img alt='{title}' src='data:image/png;base64,{base64.b64encode(figs[key]).decode()}'>"
                if figs[key] else "<p>No data for this chart.</p>")
        parts.append(f"<section id='{key}'><h2>{title}</h2>{body}</section>")
    if cks:
        parts.append(_table_html(["checkpoint", "arch", "top-1", "details"],
                                 [[c["label"], c["arch"], _fmt(c["top1"]), json.dumps(c["meta"])] for c in cks]))
    parts.append("<section id='commands'><h2>Reproduce</h2><pre>" + html.escape("\n".join(commands)) +
                 "</pre></section></body></html>")
    return "".join(parts)


def write_report(bench_json: str | Path, checkpoints: Sequence[str | Path], out: str | Path) -> tuple[Path, Path]:
    from hwprune.atomic import atomic_write_text
    from hwprune.pruning.lstm.sensitivity import report_png

    bench_json, out = Path(bench_json), Path(out)
    doc = _load_bench(bench_json)
    cks = _checkpoint_rows([Path(c) for c in checkpoints])
    figs = _figures(doc, cks)
    figs["sensitivity"] = report_png([c["path"] for c in cks])
    device_rows, result_rows = _device_rows(doc), _result_rows(doc["results"])
    commands = [doc.get("command") or "hwprune bench ..."] + [f"hwprune report --bench {bench_json} "
                                                              f"{' '.join('--checkpoints ' + str(c) for c in checkpoints)} --out {out}"]
    # Markdown twin, with the figures as PNG files beside it
    md_path = atomic_write_text(out.with_suffix(".md"),
                                _markdown(doc, device_rows, result_rows, figs, commands, out.with_suffix("")))
    html_path = atomic_write_text(out, _html(doc, device_rows, result_rows, figs, cks, commands))
    return html_path, md_path
