"""The README's main command, end to end on the shipped assets (shortened settings)."""

import json

import pytest

from conftest import run_cli_here
from hwprune.training.checkpoint import Checkpoint
from hwprune.pipeline import BASE_CK, SAMPLE, noisy_host_warning


def test_assets_ship_with_the_package():
    ck = Checkpoint.load(BASE_CK)
    assert ck.arch == "cifar_resnet20" and not ck.widths
    assert (SAMPLE / "train.tar.gz").stat().st_size < 17e6 and (SAMPLE / "test.tar.gz").stat().st_size < 1e6


def _tiny_sample(root):
    """30 training and 10 test images per class of the shipped sample: enough for GCP's batches of
    128 and a held-out split."""
    from hwprune.training.data import load_dataset, save_npz_sample

    for split, per_class in (("train", 30), ("test", 10)):
        save_npz_sample(load_dataset(SAMPLE, split), root / f"{split}.npz", per_class=per_class)
    return root


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_resumes(tmp_path):
    """The smallest run that still goes through every step: 10 configurations (the predictor's
    minimum), 3 validation samples, one GCP round of one iteration per phase, one fine-tuning epoch
    on 300 images, short measurements (--quick), no re-measurement of slow-state configurations
    (--gate-budget 0), all in this process. Its timings are real: only what holds on any host is asserted."""
    out, data = tmp_path / "qs", _tiny_sample(tmp_path)
    r = run_cli_here("quickstart", "--out", str(out), "--configs", "10", "--samples", "3", "--finetune-epochs", "1",
                     "--gcp-iters", "1", "--gcp-steps", "1", "--threads", "1", "--gate-budget", "0", "--data",
                     str(data), "--quick", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    for f in ("cpu_table.parquet", "validation.json", "cifar_resnet20_base.pt", "cifar_resnet20_gcp.pt", "bench.json",
              "report.html", "report.md", "widths.png", "summary.json"):
        assert (out / f).exists(), f
    assert doc["pruned"]["measured_ms"] < doc["base"]["measured_ms"]
    assert doc["base"]["top1"] is not None and doc["pruned"]["top1"] is not None
    assert doc["predictor"]["n"] == 3 and doc["measured_speedup"] > 1
    assert 0 <= doc["predictor_relative"]["within_5pct"] <= doc["predictor_relative"]["within_10pct"] <= 1
    assert 0 <= doc["predictor"]["slow_configs_used"] <= doc["table_slow_state_configs"] <= 10
    pruned = Checkpoint.load(out / "cifar_resnet20_gcp.pt")
    assert pruned.meta["method"] == "gcp" and pruned.meta["objective"] == "latency"
    assert pruned.meta["predicted_ms"] > 0 and pruned.meta["device_correction"]
    html = (out / "report.html").read_text()
    assert all(f"id='{s}'" in html for s in ("device", "results", "pareto", "widths", "predicted", "commands"))
    # a second run keeps the finished steps and only re-reads them
    before = {f: (out / f).stat().st_mtime for f in ("cifar_resnet20_gcp.pt", "bench.json", "report.html")}
    r = run_cli_here("quickstart", "--out", str(out), "--configs", "10", "--samples", "3", "--data", str(data),
                     "--quick", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f: (out / f).stat().st_mtime for f in before} == before
    assert json.loads(r.stdout)["pruned"]["measured_ms"] == doc["pruned"]["measured_ms"]


def test_noisy_host_warning_is_one_line_when_the_host_was_busy():
    quiet = {"table_slow_state_configs": 1, "table_configs": 40, "measured_ceiling": 0.97}
    assert noisy_host_warning(quiet) is None
    busy_profile = {**quiet, "table_slow_state_configs": 20}
    busy_validate = {**quiet, "measured_ceiling": 0.6}
    for s in (busy_profile, busy_validate):
        line = noisy_host_warning(s)
        assert line and "\n" not in line and "busy" in line


@pytest.mark.parametrize("args, message", [(("--gcp-streams", "some"), "streams mode"),
                                           (("--target", "0.99"), "target")])
def test_bad_quickstart_settings_are_one_line_errors(tmp_path, args, message):
    r = run_cli_here("quickstart", "--out", str(tmp_path / "qs"), *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "qs").exists()  # refused before any work
