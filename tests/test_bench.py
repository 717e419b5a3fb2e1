"""The bench harness and the report."""

import json
import shutil
import subprocess

import onnx
import pytest
import torch.nn as nn
from onnx import TensorProto, helper

from conftest import run_cli, run_cli_here
from hwprune.bench.harness import BenchModel, bench, speedups
from hwprune.errors import HwpruneError
from hwprune.profiling.measure import MeasureConfig
from hwprune.bench.report import SECTIONS, pareto_front, write_report
from hwprune.pruning.space import PruningSpace

QUICK = MeasureConfig(warmup_s=0.01, min_iters=5, min_time_s=0.02, retries=0)


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("this model cannot run")


@pytest.fixture(scope="module")
def doc():
    space = PruningSpace.from_name("cifar_resnet20")
    a = BenchModel("full", module=space.model.eval(), input_size=(3, 32, 32), arch="cifar_resnet20")
    b = BenchModel("half", module=space.apply(space.uniform(0.5)).eval(), input_size=(3, 32, 32),
                   arch="cifar_resnet20", widths=space.uniform(0.5).widths)
    broken = BenchModel("broken", module=Broken(), input_size=(3, 32, 32))
    return bench([a, b, broken], batches=(1, 2), threads=1, rounds=2, measure=QUICK)


def test_schema(doc):
    assert {"device", "settings", "results", "run_order"} <= set(doc)
    assert doc["settings"]["backend"] == "onnxruntime" and doc["settings"]["batches"] == [1, 2]
    ok = [r for r in doc["results"] if not r.get("error")]
    assert len(ok) == 4
    for r in ok:
        lat = r["latency_ms"]
        assert {"median", "p90", "p99", "mean", "std", "cov"} <= set(lat)
        assert r["throughput_ips"] == pytest.approx(1000 * r["batch"] / lat["median"])
        assert len(r["rounds"]) == 2 and r["setup_ms"] > 0 and r["first_run_ms"] > 0
        assert lat["fastest_round"] == min(x["median"] for x in r["rounds"]) <= lat["median"]


def test_failure_is_marked_and_the_others_go_on(doc):
    broken = [r for r in doc["results"] if r["model"] == "broken"]
    assert len(broken) == 2 and all("cannot run" in r["error"] or "export" in r["error"] for r in broken)


def test_runs_are_interleaved(doc):
    order = [(o["model"], o["batch"]) for o in doc["run_order"]]
    first_round = order[:4]
    assert first_round == [("full", 1), ("full", 2), ("half", 1), ("half", 2)]
    assert order[4:] == first_round  # round 2 repeats the same interleaving: A B A B, not A A B B
    assert [o["round"] for o in doc["run_order"]] == [0] * 4 + [1] * 4


def test_speedups_pair_by_pair(doc):
    s = speedups(doc, [("half", "full")])
    assert len(s) == 2 and all(x["speedup"] > 1.0 for x in s)  # half the channels runs faster
    by = {(r["model"], r["batch"]): r["latency_ms"]["fastest_round"] for r in doc["results"] if r.get("rounds")}
    for x in s:
        assert x["speedup_fastest"] == pytest.approx(by[("full", x["batch"])] / by[("half", x["batch"])])


def test_onnx_inputs(tmp_path):
    with pytest.raises(HwpruneError, match="does not exist"):
        BenchModel.from_onnx(tmp_path / "missing.onnx")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, tmp_path / "dyn.onnx")
    with pytest.raises(HwpruneError, match="--input-size"):
        BenchModel.from_onnx(tmp_path / "dyn.onnx")
    assert BenchModel.from_onnx(tmp_path / "dyn.onnx", input_size=16).input_size == (3, 16, 16)


def test_pareto_front():
    pts = [(100, 90.0), (200, 89.0), (150, 88.0), (300, 80.0), (50, 91.0)]
    assert pareto_front(pts) == [4, 0, 1, 3]


def test_report_holds_every_section(doc, tmp_path):
    from hwprune.training.checkpoint import Checkpoint
    from hwprune.models import ModelSpec

    space = PruningSpace.from_name("cifar_resnet20")
    half = space.uniform(0.5)
    ck = Checkpoint.from_model(ModelSpec("cifar_resnet20", space.apply(half), (3, 32, 32), 10), widths=half.widths,
                               meta={"accuracy": {"top1": 90.1}})
    ck.save(tmp_path / "half.pt")
    Checkpoint.from_model(ModelSpec("cifar_resnet20", space.model, (3, 32, 32), 10),
                          meta={"accuracy": {"top1": 92.0}}).save(tmp_path / "full.pt")
    bj = tmp_path / "bench.json"
    bj.write_text(json.dumps({**doc, "command": "hwprune bench --model cifar_resnet20"}))
    html_path, md_path = write_report(bj, [tmp_path / "half.pt", tmp_path / "full.pt"], tmp_path / "r.html")
    text = html_path.read_text()
    for s in SECTIONS:
        assert f"id='{s}'" in text
    assert text.count("data:image/png;base64,") >= 2  # pareto and widths charts are embedded
    assert "hwprune bench --model cifar_resnet20" in text
    md = md_path.read_text()
    assert "#pareto" in md and (tmp_path / "r_pareto.png").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(doc, tmp_path):
    bj = tmp_path / "bench.json"
    bj.write_text(json.dumps(doc))
    html_path, _ = write_report(bj, [], tmp_path / "r.html")
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--dump-dom",
                          html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert "hwprune benchmark report" in out.stdout and "id=\"results\"" in out.stdout


@pytest.mark.slow
def test_cli_bench_json(tmp_path):
    out = tmp_path / "b.json"
    r = run_cli("bench", "--model", "cifar_resnet20", "--batch", "1", "--threads", "1", "--rounds", "1", "--quick",
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["results"][0]["model"] == "cifar_resnet20" and d["results"][0]["latency_ms"]["median"] > 0
    assert d["results"][0]["latency_ms"]["fastest_round"] > 0
    r = run_cli_here("bench", "--model", "cifar_resnet20", "--quick", "--min-time", "0.1")
    assert r.returncode == 2 and "not both" in r.stderr and "Traceback" not in r.stderr
    r = run_cli_here("bench", "--onnx", str(tmp_path / "nope.onnx"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_gated_meter_counts_only_rounds_in_the_fast_state(monkeypatch):
    """Scripted host: the reference runs slow (a neighbour took a core) for three rounds, then fast."""
    from types import SimpleNamespace

    import hwprune.bench.harness as hb

    script = iter([  # (reference, candidate) per round: slow rounds squeeze the ratio to 0.8
        (1.0, 0.8), (1.0, 0.8), (1.0, 0.8), (0.6, 0.3), (0.61, 0.305), (0.6, 0.3), (1.0, 0.8)])
    state = {}

    class Fake:
        def needs_onnx(self):
            return False

        def measure_e2e(self, art):
            if art.name == "m0":  # the reference is timed first in every round
                state["pair"] = next(script)
                v = state["pair"][0]
            else:
                v = state["pair"][1]
            return SimpleNamespace(stats=SimpleNamespace(median=v), value_ms=v)

    monkeypatch.setattr(hb, "create_backend", lambda *a, **k: Fake())
    space = PruningSpace.from_name("cifar_resnet20", input_size=16)
    ref = BenchModel("base", module=space.model, input_size=(3, 16, 16))
    meter = hb.GatedMeter(ref, need=3, max_rounds=10)
    g = meter({"half": space.apply(space.uniform(0.5))})
    assert g.rounds == 6 and g.gated_rounds == 3 and g.settled
    assert g.ratios["half"] == pytest.approx(0.5)  # the slow rounds' 0.8 never counts
    assert g.reference_ms == pytest.approx(0.6)
    meter.close()


def _scripted_meter(monkeypatch, script, **kw):
    """A GatedMeter whose backend returns (reference, candidate) timings from ``script``, one pair per round."""
    from types import SimpleNamespace

    import hwprune.bench.harness as hb

    script, state = iter(script), {}

    class Fake:
        def needs_onnx(self):
            return False

        def measure_e2e(self, art):
            if art.name == "m0":
                state["pair"] = next(script)
            v = state["pair"][0 if art.name == "m0" else 1]
            return SimpleNamespace(stats=SimpleNamespace(median=v), value_ms=v)

    monkeypatch.setattr(hb, "create_backend", lambda *a, **k: Fake())
    space = PruningSpace.from_name("cifar_resnet20", input_size=16)
    meter = hb.GatedMeter(BenchModel("base", module=space.model, input_size=(3, 16, 16)), **kw)
    return meter, space.apply(space.uniform(0.5))


@pytest.mark.parametrize("patience", [0.0, 30.0])
def test_gated_meter_waits_for_the_fast_state_with_patience(monkeypatch, patience):
    """The fast state was seen in an earlier call; this call starts in a slow spell longer than max_rounds."""
    fast, slow = [(0.6, 0.3)] * 3, [(1.0, 0.8)] * 12
    meter, half = _scripted_meter(monkeypatch, fast + slow + fast, need=3, max_rounds=10, min_rounds=1,
                                  patience_s=patience)
    assert meter({"half": half}).settled
    g = meter({"half": half})
    if patience:  # kept measuring through the slow spell until three fast rounds counted
        assert g.settled and g.rounds == 15 and g.gated_rounds == 3
        assert g.ratios["half"] == pytest.approx(0.5)
    else:  # gave up after max_rounds and fell back to the slow rounds
        assert not g.settled and g.rounds == 10 and g.ratios["half"] == pytest.approx(0.8)
    meter.close()


@pytest.mark.slow
def test_gated_meter_on_onnxruntime():
    space = PruningSpace.from_name("cifar_resnet20", input_size=16)
    from hwprune.bench.harness import GatedMeter

    with GatedMeter(BenchModel("base", module=space.model, input_size=(3, 16, 16)), threads=1, measure=QUICK,
                    need=2, max_rounds=6) as meter:
        g = meter({"full": space.model, "quarter": space.apply(space.uniform(0.25))})
    assert 1 <= g.gated_rounds <= g.rounds <= 6 and g.reference_ms > 0
    assert g.ratios["quarter"] < g.ratios["full"]  # a quarter of the channels runs faster than the same model
    assert 0.5 < g.ratios["full"] < 2.0  # the reference against itself
