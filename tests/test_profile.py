"""The profiler on real ONNX Runtime measurements of tiny models."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import measured, run_cli, run_cli_here, script_e2e, scripted_ort
from hwprune.profiling.backends import ModelArtifact, create_backend
from hwprune.errors import BackendUnavailable, TableError, TableMismatch
from hwprune.profiling.onnx_export import export_onnx
from hwprune.profiling.profiler import profile
from hwprune.profiling.table import LatencyTable, TableMeta
from hwprune.profiling.rows import UnitSpec


class ConvBnReluAdd(nn.Module):
    """stem, then conv-bn-relu -> conv-bn (+ residual) -> relu, as in a ResNet basic block."""

    def __init__(self, c: int):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


@pytest.fixture(scope="module")
def ort(quick):
    return create_backend("onnxruntime", threads=1, measure=quick)


@pytest.mark.parametrize("c", [16, 21])
def test_fusions_are_read_from_the_runtime(tmp_path, ort, c):
    path = export_onnx(ConvBnReluAdd(c).eval(), (1, 3, 12, 12), tmp_path / "m.onnx")
    rows = ort.profile_layers(ModelArtifact((1, 3, 12, 12), onnx_path=path))
    ops = [r.unit.op for r in rows]
    convs = [r for r in rows if r.unit.kind == "conv"]
    # BatchNorm folded, activation and residual Add fused: three conv units, no separate BN/Add/Relu.
    assert len(convs) == 3, ops
    assert not {"BatchNormalization", "Add", "Relu"} & set(ops), ops
    by_layer = {r.layer: r.unit for r in convs}
    assert set(by_layer) == {"stem", "conv1", "conv2"}
    assert by_layer["conv1"].activation == "Relu" and not by_layer["conv1"].fused_add
    assert by_layer["conv2"].activation == "Relu" and by_layer["conv2"].fused_add
    assert by_layer["conv2"].cin == by_layer["conv2"].cout == c  # logical channels, not padded ones
    # The blocked NCHWc layout is the runtime's choice for aligned channels only; read, not assumed.
    if c == 21:  # not a multiple of the block size: the plain NCHW FusedConv kernel runs
        assert by_layer["conv2"].layout == "nchw" and by_layer["conv2"].op == "FusedConv"
    assert all(r.stats.median > 0 and r.stats.count >= 5 for r in rows)


def test_isolated_unit_microbenchmark(tmp_path, ort):
    rows = ort.measure_unit(UnitSpec("conv", 32, 48, 16, 16, 3, 3, 1, 1, activation="relu"), tmp_path)
    conv = [r for r in rows if r.unit.kind == "conv"]
    assert len(conv) == 1
    u = conv[0].unit
    assert (u.cin, u.cout, u.kh, u.h, u.w, u.activation) == (32, 48, 3, 16, 16, "Relu")
    assert conv[0].stats.median > 0


def test_unavailable_backends_say_why():
    with pytest.raises(BackendUnavailable, match="not available here: .*") as e:
        create_backend("onnxruntime", device="cuda")
    assert "\n" not in str(e.value)


def test_profile_writes_a_complete_table_with_metadata(tmp_path, quick):
    out = tmp_path / "t.parquet"
    table = profile("cifar_resnet20", out, threads=1, configs=3, micro_per_config=1, measure=quick)
    assert table.complete
    t = LatencyTable.load(out)
    assert t.complete and t.meta.items_done == 3
    assert set(t.rows["source"]) == {"e2e", "insitu", "micro"}
    assert len(t.e2e) == 3 and t.e2e["median_ms"].gt(0).all()
    s = t.settings
    assert (s["backend"], s["threads"], s["batch"], s["precision"]) == ("onnxruntime", 1, 1, "fp32")
    assert s["backend_version"] and s["execution_provider"] == "CPUExecutionProvider"
    fp = t.meta.fingerprint
    assert fp["cpu_model"] and fp["cpu_cores"] >= 1
    assert t.meta.hwprune_version and t.meta.created and t.meta.plan["configs"] == 3
    insitu = t.source("insitu")
    assert insitu["layer"].str.startswith("layer").any()
    # every width configuration is stored with its e2e row
    widths = [json.loads(w) for w in t.e2e["widths"]]
    assert all(len(w) == 12 for w in widths)
    # what the profiler adds to each node, measured with the table: a small non-negative time
    assert t.meta.node_overhead_ms is not None and 0 <= t.meta.node_overhead_ms < 0.05


def test_profiler_overhead_is_reported_minus_real_time_per_node(monkeypatch):
    """Scripted chains: 220 nodes run in 0.9 ms end to end and 20 in 0.1 ms, 4 us per added node;
    the profiler reports 5 us per node. What it adds is the 1 us per node between the two, and
    never less than nothing."""
    import hwprune.device.ort_runner as orr
    from hwprune.device.ort_runner import NodeRecord
    from hwprune.profiling.measure import Stats

    end_to_end = {"short": 0.1, "long": 0.9}
    reported = {"short": 20, "long": 220}  # nodes, 5 us each

    def nodes(path, us):
        return [NodeRecord(f"chain/{i}", "Neg", [], [], Stats.from_samples([us / 1000] * 3))
                for i in range(reported[str(path)])]

    monkeypatch.setattr(orr, "time_model", lambda path, s, cfg: measured(end_to_end[str(path)]))
    monkeypatch.setattr(orr, "profile_model", lambda path, s, cfg: nodes(path, 5.0))
    ov = orr.node_overhead_ms("short", "long", 20, 220, orr.OrtSettings(), None)
    assert ov == pytest.approx(0.001)
    monkeypatch.setattr(orr, "profile_model", lambda path, s, cfg: nodes(path, 3.0))
    assert orr.node_overhead_ms("short", "long", 20, 220, orr.OrtSettings(), None) == 0.0  # clipped


def test_probe_chains_on_onnxruntime(tmp_path, ort):
    """The real probe: every node of a chain is executed (nothing fused away), the longer chain runs
    longer, and the overhead is a small non-negative time per node."""
    from hwprune.device.ort_runner import profile_model, time_model
    from hwprune.profiling.rows import CHAIN_LENGTHS, chain_onnx

    short, long = (chain_onnx(tmp_path / f"c{n}.onnx", n) for n in CHAIN_LENGTHS)
    assert len(profile_model(long, ort.ort, ort.measure_cfg)) == CHAIN_LENGTHS[1]
    assert time_model(long, ort.ort, ort.measure_cfg).median_ms > time_model(short, ort.ort, ort.measure_cfg).median_ms
    ov = ort.node_overhead_ms(tmp_path)
    assert math.isfinite(ov) and 0 <= ov < 0.05


def test_resume_measures_the_overhead_an_older_table_lacks(tmp_path, quick):
    out = tmp_path / "old.parquet"
    profile("cifar_resnet20", out, scripted_ort(measure=quick), configs=2, micro_per_config=0)
    old = LatencyTable.load(out)
    old.meta.node_overhead_ms = None  # as tables written before the probe
    old.save(out)
    args = ["profile", "--model", "cifar_resnet20", "--configs", "2", "--micro", "0", "--threads", "1", "--quick",
            "--out", str(out), "--resume"]
    r = run_cli_here(*args)
    assert r.returncode == 0, r.stderr
    new = LatencyTable.load(out)
    assert new.meta.node_overhead_ms is not None and new.rows.equals(old.rows)  # nothing re-measured


def test_table_round_trip_and_mismatch(tmp_path):
    from hwprune.profiling.measure import Stats
    from hwprune.profiling.table import unit_row
    from hwprune.profiling.rows import UnitKey

    st = Stats.from_samples([1.0, 1.1, 0.9])
    row = unit_row(UnitKey("Conv", 8, 8, 3, 3), st, source="micro", item="m/full", model="m", config="full")
    meta = TableMeta(settings={"backend": "onnxruntime", "threads": 2, "batch": 1, "precision": "fp32"})
    t = LatencyTable([row], meta)
    p = t.save(tmp_path / "a.parquet")
    back = LatencyTable.load(p)
    assert back.rows.iloc[0]["median_ms"] == pytest.approx(1.0)
    assert back.meta.settings == meta.settings and back.meta.fingerprint == meta.fingerprint

    other = LatencyTable([row], TableMeta(settings={**meta.settings, "threads": 4}))
    with pytest.raises(TableMismatch, match="threads: table has 2, requested 4"):
        t.merge(other)
    foreign = LatencyTable([row], TableMeta(settings=dict(meta.settings),
                                            fingerprint={**meta.fingerprint, "cpu_model": "Cortex-A76"}))
    with pytest.raises(TableMismatch, match="cpu_model"):
        t.merge(foreign)
    # the same marketing name on another generation: its vector extensions tell them apart
    avx512 = {**meta.fingerprint, "cpu_flags": ["avx2", "avx512f"]}
    with pytest.raises(TableMismatch, match="cpu_flags: table has \\['avx2', 'avx512f'\\], other has \\['avx2'\\]"):
        LatencyTable([row], TableMeta(settings=dict(meta.settings), fingerprint=avx512)).check_settings(
            {}, {**meta.fingerprint, "cpu_flags": ["avx2"]})
    unflagged = {k: v for k, v in avx512.items() if k != "cpu_flags"}  # recorded without flags: not compared on them
    assert LatencyTable([row], TableMeta(settings=dict(meta.settings), fingerprint=unflagged)).mismatch({}, avx512) is None
    assert len(t.merge(LatencyTable([row], TableMeta(settings=dict(meta.settings))))) == 2
    with pytest.raises(TableMismatch, match="batch"):
        t.check_settings({"batch": 8})


def test_bad_tables_are_named(tmp_path):
    with pytest.raises(TableError, match="does not exist"):
        LatencyTable.load(tmp_path / "none.parquet")
    good = LatencyTable([{"source": "e2e", "median_ms": 1.0}], TableMeta(settings={})).save(tmp_path / "g.parquet")
    data = good.read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(TableError, match="corrupt or truncated"):
        LatencyTable.load(tmp_path / "trunc.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(TableError, match="not an hwprune latency table"):
        LatencyTable.load(tmp_path / "plain.parquet")
    LatencyTable(None, TableMeta(settings={})).save(tmp_path / "empty.parquet")
    with pytest.raises(TableError, match="empty"):
        LatencyTable.load(tmp_path / "empty.parquet")


def _wait_for_items(path, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            try:
                if LatencyTable.load(path, allow_empty=True).meta.items_done >= n:
                    return
            except TableError:
                pass  # never happens with atomic writes; tolerated only while polling
        if proc.poll() is not None:
            raise AssertionError(f"profiler exited early: {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError("profiler made no progress")


@pytest.mark.slow
def test_resume_after_the_profiler_is_killed(tmp_path):
    out = tmp_path / "k.parquet"
    args = ["profile", "--model", "cifar_resnet20", "--configs", "6", "--micro", "0", "--threads", "1", "--quick",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "hwprune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        _wait_for_items(out, 2, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = LatencyTable.load(out)  # loads: never half-written
    assert not partial.complete and 2 <= partial.meta.items_done < 6
    assert partial.meta.items_done == partial.e2e["item"].nunique()
    again = run_cli_here(*args)
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    r = run_cli_here(*args, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    done = LatencyTable.load(out)
    assert done.complete and done.meta.items_done == 6
    assert done.e2e["item"].is_unique and len(done.e2e) == 6
    kept = partial.e2e.set_index("item")["raw_ms"]  # as timed; the normalised values follow the reference
    assert (done.e2e.set_index("item").loc[kept.index, "raw_ms"] == kept).all()  # nothing re-measured
    bad = run_cli_here(*[a if a != "1" else "2" for a in args], "--resume")
    assert bad.returncode == 2 and "threads" in bad.stderr


def test_max_minutes_leaves_a_usable_partial_table(tmp_path):
    out = tmp_path / "p.parquet"
    r = run_cli_here("profile", "--model", "cifar_resnet20", "--configs", "50", "--micro", "0", "--threads", "1",
                     "--quick", "--max-minutes", "0.001", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "partial table" in r.stderr
    t = LatencyTable.load(out)
    assert not t.complete and t.meta.items_done >= 1 and len(t.e2e) == t.meta.items_done
    with pytest.raises(TableError, match="partial"):
        LatencyTable.load(out, allow_partial=False)


@pytest.mark.parametrize("args,expect", [
    (["profile", "--model", "resnet51", "--out", "{tmp}/x.parquet"], "unknown model 'resnet51'"),
    (["profile", "--backend", "tflite", "--out", "{tmp}/x.parquet"], "unknown backend 'tflite'"),
    (["profile", "--backend", "tensorrt", "--device", "cuda", "--out", "{tmp}/x.parquet"], "not available here"),
    (["profile", "--out", "{tmp}/file.txt/x.parquet"], "cannot create directory"),
    (["table", "info", "{tmp}/file.txt"], "corrupt or truncated"),
    (["table", "info", "{tmp}/missing.parquet"], "does not exist"),
    # option ranges are checked by typer, whose click copy raises its own exception classes
    (["profile", "--configs", "0", "--out", "{tmp}/x.parquet"], "Invalid value for '--configs'"),
    (["profile", "--no-such-option"], "No such option"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, expect):
    (tmp_path / "file.txt").write_text("not a table")
    r = run_cli_here(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_devices_json():
    r = run_cli("devices", "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    ort = [b for b in d["backends"] if b["backend"] == "onnxruntime"][0]
    assert ort["available"] and d["device"]["cpu_cores"] >= 1
    trt = [b for b in d["backends"] if b["backend"] == "tensorrt"][0]
    assert trt["available"] or trt["reason"]


def test_cpu_id_reads_below_the_marketing_name():
    """A VM's "AMD EPYC" says nothing of its generation; family/model/stepping do (x86), and
    implementer/part/revision on ARM. Text without either gives an empty id."""
    from hwprune.profiling.fingerprint import cpu_id

    x86 = "model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nstepping\t: 1\nmicrocode\t: 0x1000065\n"
    assert cpu_id(x86) == "family 25 model 17 stepping 1 microcode 0x1000065"
    arm = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\nCPU revision\t: 0\n"
    assert cpu_id(arm) == "implementer 0x41 part 0xd0b revision 0"
    assert cpu_id("processor\t: 0\n") == ""


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'torch_pruning', 'pandas', 'pyarrow', 'onnx', 'sklearn'):
            raise ImportError('blocked on this device: ' + name)
sys.meta_path.insert(0, Block())
"""
BLOCK_IMPORTS = BLOCKER + "from hwprune.device import main\nmain(sys.argv[1:])\n"


@pytest.mark.slow
def test_device_runner_without_torch(tmp_path):
    bundle = tmp_path / "bundle"
    r = run_cli_here("bundle", "--model", "cifar_resnet20", "--configs", "2", "--micro", "1", "--out", str(bundle))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["measure"] = {"warmup_s": 0.02, "min_iters": 5, "min_time_s": 0.05, "retries": 0, "profile_max_iters": 10}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    dev = subprocess.run([sys.executable, "-c", BLOCK_IMPORTS, "run", str(bundle), "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert dev.returncode == 0, dev.stderr
    assert json.loads(dev.stdout) == {"done": 4, "total": 4, "complete": True}
    blocked = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert "blocked on this device" in blocked.stderr  # the guard really blocks torch
    r = run_cli_here("import", str(bundle), "--out", str(tmp_path / "dev.parquet"), "--json")
    assert r.returncode == 0, r.stderr
    t = LatencyTable.load(tmp_path / "dev.parquet")
    assert t.complete and len(t.e2e) == 2 and len(t.source("micro")) >= 1
    assert t.settings["threads"] == 1 and t.settings["backend"] == "onnxruntime"
    assert (t.source("insitu")["layer"] == "layer1.0.conv1").any()
    assert 0 <= t.meta.node_overhead_ms < 0.05  # the device measured its profiler's overhead too


def _scripted_host(quick, references, config_ms=1.0):
    """An ONNX Runtime backend whose end-to-end timings are scripted: the unpruned reference's
    probes read ``references`` in turn (then 1.0 ms), every configuration ``config_ms``
    (a number, or a callable of the artifact). The layers are still profiled for real."""
    be = create_backend("onnxruntime", threads=1, measure=quick)
    probes = iter(references)

    def timing(art):
        if art.name.endswith("/reference"):
            return next(probes, 1.0)
        return config_ms(art) if callable(config_ms) else config_ms

    return script_e2e(be, timing)


def test_the_unpruned_model_is_timed_in_three_sessions_and_the_median_kept(tmp_path, quick):
    """Sessions of the unpruned model read 2.4 (a slow first one), 2.2 and 2.25 ms: the table keeps
    2.25 ms. Other configurations get one session."""
    calls, full = [], iter([2.4, 2.2, 2.25])

    def config_ms(art):
        calls.append(art.name)
        return next(full) if art.name.endswith("/full") else 1.0

    be = _scripted_host(quick, [], config_ms)
    table = profile("cifar_resnet20", tmp_path / "r.parquet", be, input_size=16, configs=3, micro_per_config=0)
    assert [calls.count(f"cifar_resnet20/{c}") for c in ("full", "uniform75", "uniform50")] == [3, 1, 1]
    e2e = table.source("e2e").set_index("config")
    assert e2e.loc["full", "median_ms"] == 2.25 and e2e.loc["full", "attempts"] == 3
    assert (e2e.drop("full")["median_ms"] == 1.0).all()


def test_gated_profile_remeasures_a_configuration_timed_while_the_host_was_slow(tmp_path, quick):
    """The probe before the first configuration reads 3 ms, every later one 1 ms (a neighbour held a
    core at first): the bracket of 'full' is 3x the fastest probe, so it is measured again. (The gate
    without reference windows, as tables were profiled before anchoring; anchored runs:
    tests/test_noisy_host.py.)"""
    be = _scripted_host(quick, [3.0])
    table = profile("cifar_resnet20", tmp_path / "g.parquet", be, input_size=16, configs=3, micro_per_config=1,
                    gate=0.5, anchor=None)
    e2e = table.source("e2e").set_index("config")
    assert e2e["state_attempts"].to_dict() == {"full": 2, "uniform75": 1, "uniform50": 1}
    assert e2e["state_ok"].all() and (e2e["state_ref_ms"] == 1.0).all()
    assert (table.rows["state_attempts"].notna()).all()  # every row carries its state, micro rows too
    micro = table.source("micro")
    assert len(micro) > 0 and (micro["state_attempts"] == 1).all()
    reloaded = LatencyTable.load(tmp_path / "g.parquet")
    assert reloaded.source("e2e")["state_ok"].all()
    with pytest.raises(Exception, match="gate"):
        profile("cifar_resnet20", tmp_path / "h.parquet", be, input_size=16, configs=1, gate=1.5)


def test_gated_profile_last_pass_remeasures_what_was_timed_before_the_host_sped_up(tmp_path, quick):
    """Both probes around the first configuration read 3 ms: it looks fine until the 1 ms probes
    of the next configuration, and the last pass measures it again."""
    from hwprune.profiling.profiler import ProfilePlan, Profiler

    be = _scripted_host(quick, [3.0, 3.0])
    plan = ProfilePlan(models=("cifar_resnet20",), input_size=16, configs=3, micro_per_config=1)
    profiler = Profiler(be, plan, tmp_path / "r.parquet", gate=0.5, gate_attempts=1, anchor=None)
    table = profiler.run()
    e2e = table.source("e2e").set_index("config")
    assert len(e2e) == 3 and e2e["state_ok"].all()
    assert (e2e["state_ref_ms"] == 1.0).all()  # the slow bracket of 'full' was replaced by a fresh one
    assert profiler.remeasure_s > 0 and len(table.source("micro")) >= 1


def test_gate_budget_bounds_the_re_measurement_on_a_host_that_stays_slow(tmp_path, quick):
    """With no budget left, a slow-state configuration is measured once and kept, marked
    state_ok=False, and the last pass does not run; with a budget, the same run re-measures it."""
    from hwprune.profiling.profiler import ProfilePlan, Profiler

    plan = ProfilePlan(models=("cifar_resnet20",), input_size=16, configs=3, micro_per_config=0)
    spent = Profiler(_scripted_host(quick, [3.0, 3.0]), plan, tmp_path / "b0.parquet", gate=0.5,
                     gate_budget_s=0.0, anchor=None)
    table = spent.run()
    e2e = table.source("e2e").set_index("config")
    assert len(e2e) == 3 and (e2e["state_attempts"] == 1).all()
    assert not e2e.loc["full", "state_ok"] and e2e.drop("full")["state_ok"].all()
    assert e2e.loc["full", "state_ref_ms"] == 3.0
    assert spent.remeasure_s == 0 and table.summary()["slow_state_configs"] == 1
    roomy = Profiler(_scripted_host(quick, [3.0, 3.0]), plan, tmp_path / "b1.parquet", gate=0.5,
                     gate_budget_s=600.0, anchor=None)
    e2e = roomy.run().source("e2e").set_index("config")
    assert e2e["state_ok"].all() and roomy.remeasure_s > 0  # the last pass measured 'full' again
    assert (e2e["state_ref_ms"] == 1.0).all()
    r = run_cli_here("profile", "--model", "cifar_resnet20", "--gate-budget", "-1", "--out",
                     str(tmp_path / "x.parquet"))
    assert r.returncode == 2 and "'--gate-budget'" in r.stderr and "Traceback" not in r.stderr
