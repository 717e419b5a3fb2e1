"""The README's main command, end to end on the shipped assets (shortened settings)."""

import json

from conftest import run_cli
from hwprune.checkpoint import Checkpoint
from hwprune.cli_quickstart import BASE_CK, SAMPLE


def test_assets_ship_with_the_package():
    ck = Checkpoint.load(BASE_CK)
    assert ck.arch == "cifar_resnet20" and not ck.widths
    assert (SAMPLE / "train.tar.gz").stat().st_size < 3e6 and (SAMPLE / "test.tar.gz").stat().st_size < 1e6


def test_quickstart_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "qs"
    r = run_cli("quickstart", "--out", str(out), "--configs", "12", "--samples", "3", "--finetune-epochs", "1",
                "--gcp-iters", "3", "--threads", "1", "--gate-budget", "20", "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    for f in ("cpu_table.parquet", "validation.json", "cifar_resnet20_base.pt", "cifar_resnet20_gcp.pt", "bench.json",
              "report.html", "report.md", "widths.png", "summary.json"):
        assert (out / f).exists(), f
    assert doc["pruned"]["measured_ms"] < doc["base"]["measured_ms"]
    assert doc["base"]["top1"] is not None and doc["pruned"]["top1"] is not None
    assert doc["predictor"]["n"] == 3 and doc["measured_speedup"] > 1
    assert 0 <= doc["predictor_relative"]["within_5pct"] <= doc["predictor_relative"]["within_10pct"] <= 1
    assert 0 <= doc["predictor"]["slow_configs_used"] <= doc["table_slow_state_configs"] <= 12
    pruned = Checkpoint.load(out / "cifar_resnet20_gcp.pt")
    assert pruned.meta["method"] == "gcp" and pruned.meta["objective"] == "latency"
    assert pruned.meta["predicted_ms"] > 0 and pruned.meta["device_correction"]
    html = (out / "report.html").read_text()
    assert all(f"id='{s}'" in html for s in ("device", "results", "pareto", "widths", "predicted", "commands"))
    # a second run keeps the finished steps and only re-reads them
    before = (out / "cifar_resnet20_gcp.pt").stat().st_mtime
    r = run_cli("quickstart", "--out", str(out), "--configs", "12", "--samples", "3", "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "cifar_resnet20_gcp.pt").stat().st_mtime == before
