"""The weight-sharing supernet: grid, prior, masked/sliced execution, extraction, BN, training, scale-out."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli_here
from hwprune.errors import HwpruneError

ROOT = Path(__file__).resolve().parents[1]
CK = ROOT / "hwprune" / "assets" / "cifar_resnet20.pt"
DATA = ROOT / "hwprune" / "assets" / "cifar10-sample"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a busy 2-core host a second one only adds contention to these tiny passes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    from hwprune.training.checkpoint import Checkpoint

    return Checkpoint.load(CK)


@pytest.fixture(scope="module")
def sn(base):
    from hwprune.search.supernet import Supernet

    return Supernet(base)


@pytest.fixture
def fresh(sn):
    """The module's supernet, reset to full width, masked execution and train mode after the test."""
    yield sn
    sn.set_widths(sn.grid.full())
    sn.mode = "masked"
    sn.train()


def _batch(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _run(sn, x, mode, widths):
    sn.mode = mode
    sn.set_widths(widths)
    sn.zero_grad(set_to_none=True)
    y = sn(x)
    (y * torch.linspace(-1, 1, y.shape[1])).square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in sn.named_parameters()}


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ----------------------------------------------------------------------------- grid and prior


class _StairCost:
    """A cost that only changes every 8 channels of a group (a latency staircase)."""

    def __init__(self, space):
        self.space = space

    def total(self, configs):
        return np.array([sum(-(-self.space.validate(c).widths[g.id] // 8) for g in self.space.groups) for c in configs],
                        dtype=float)


def test_grid_rounds_to_steps_includes_full_and_climbs_the_staircase(sn):
    from hwprune.search.grid import WidthGrid

    g = sn.space.groups[-1]  # 64 channels
    grid = WidthGrid.for_space(sn.space, fractions=(0.25, 0.5))
    assert grid.choices(g.id) == [16, 32, 64] and grid.full().widths[g.id] == 64
    assert grid.narrowest().widths[g.id] == 16
    stair = WidthGrid.for_space(sn.space, fractions=(0.3,), cost=_StairCost(sn.space))
    assert stair.choices(g.id) == [24, 64]  # 0.3 * 64 = 19 costs what 24 does: the top of its stair
    assert stair.staircase and not grid.staircase
    again = WidthGrid.from_json(grid.to_json())
    assert again.widths == grid.widths and again.fractions == grid.fractions
    cfg = grid.random(np.random.default_rng(0))
    assert grid.contains(cfg) and not grid.contains({g.id: 17})
    assert grid.snap({g.id: 20}).widths[g.id] == 16 and grid.snap({g.id: 20}, "up").widths[g.id] == 32
    with pytest.raises(HwpruneError, match="fractions"):
        WidthGrid.for_space(sn.space, fractions=(0.0, 0.5))


def test_prior_moves_probability_toward_lower_loss_widths(sn):
    from hwprune.search.prior import SamplingPrior

    grid = sn.grid
    prior = SamplingPrior.uniform(grid)
    gid = grid.groups[0]
    first = grid.choices(gid)
    assert np.allclose(prior.probs(gid), 1 / len(first))
    rng = np.random.default_rng(0)
    for _ in range(200):
        cfg = grid.random(rng)
        w = cfg.widths[gid]
        prior.update(cfg, 1.0 + (first.index(w) == 2))  # the third width loses more
    p = prior.probs(gid)
    assert abs(p.sum() - 1) < 1e-9 and p[2] == p.min() and p[2] < 0.5 / len(first)
    assert np.allclose(p[[0, 1, 3]], p[0], rtol=0.05)  # the others stay level
    # with sizes, a width is credited for beating what its subnets' size predicts, not for being wide
    sized = SamplingPrior.uniform(grid)
    for _ in range(300):
        cfg = grid.random(rng)
        frac = np.mean([cfg.widths[g] / grid.full().widths[g] for g in grid.groups])
        bonus = -0.2 if cfg.widths[gid] == first[1] else 0.0
        sized.update(cfg, 2.0 - frac + bonus, size=frac)
    q = sized.probs(gid)
    assert q.argmax() == 1
    back = SamplingPrior.from_json(sized.to_json(), grid)
    assert all(np.allclose(back.probs(g), sized.probs(g)) for g in grid.groups)
    draws = [back.sample(rng).widths[gid] for _ in range(300)]
    assert draws.count(first[1]) > 300 / len(first)
    with pytest.raises(HwpruneError, match="size"):
        sized.update(grid.full(), 1.0)


# ----------------------------------------------------------------------------- execution


def test_sorted_channels_keep_the_function_and_put_the_strongest_first(sn, base):
    spec = base.build_model()
    sn.set_widths(sn.grid.full())
    sn.eval()
    x = _batch(4)
    with torch.no_grad():
        assert _close(sn(x), spec.module(x), 1e-4)
    w = dict(sn.net.named_parameters())["layer2.0.conv1.weight"].detach()
    l1 = w.abs().sum(dim=(1, 2, 3))
    assert torch.all(l1[:-1] >= l1[1:] - 1e-6)
    sn.train()


def test_masked_and_sliced_agree_in_outputs_and_gradients(fresh):
    sn = fresh
    x = _batch()
    sn.train()
    for seed in (0, 1):
        cfg = sn.grid.random(np.random.default_rng(seed))
        ym, gm = _run(sn, x, "masked", cfg)
        ys, gs = _run(sn, x, "sliced", cfg)
        assert _close(ym, ys)
        assert all(_close(gm[n], gs[n]) for n in gm)
    full_m, _ = _run(sn, x, "masked", sn.grid.full())
    assert not _close(ym, full_m, 1e-3)  # the subnet really is another network


def test_extracted_subnet_equals_the_supernet_at_its_configuration(fresh):
    sn = fresh
    cfg = sn.grid.random(np.random.default_rng(3))
    sub = sn.extract(cfg)
    widths = sn.space.widths_of(sub).widths
    assert widths == sn.space.validate(cfg).widths and sum(p.numel() for p in sub.parameters()) < sum(
        p.numel() for p in sn.net.parameters())
    x = _batch()
    sn.set_widths(cfg)
    with torch.no_grad():
        for train in (False, True):  # running statistics, then batch statistics (which updates the subnet's)
            sub.train(train)
            sn.train(train)
            for mode in ("masked", "sliced"):
                sn.mode = mode
                assert _close(sn(x), sub(x))
    ck = sn.extract_checkpoint(cfg)
    assert ck.widths == sn.space.validate(cfg).widths
    rebuilt = ck.build_model().module
    sn.eval()
    with torch.no_grad():
        assert _close(rebuilt(x), sn(x))


def test_depthwise_groups_agree_across_modes_and_extraction():
    """MobileNetV2: depthwise convolutions coupled with their producers, residual streams, a
    dropout (off here: its random draws differ between the modes). In float64, because a deep
    random network in training mode differs by rounding at the 1e-4 level in float32."""
    from hwprune.models import create_model
    from hwprune.search.supernet import Supernet
    from hwprune.training.checkpoint import Checkpoint

    torch.manual_seed(0)
    sn = Supernet(Checkpoint.from_model(create_model("cifar_mobilenet_v2", input_size=16)))
    sn.get_submodule("net.classifier.0").p = 0.0
    sn.double()
    cfg = sn.grid.random(np.random.default_rng(0))
    x = _batch(4).double()[:, :, :16, :16]
    sn.train()
    ym, gm = _run(sn, x, "masked", cfg)
    ys, gs = _run(sn, x, "sliced", cfg)
    assert _close(ym, ys, 1e-9) and all(_close(gm[n], gs[n], 1e-9) for n in gm)
    sub = sn.extract(cfg).double().eval()
    sn.eval()
    with torch.no_grad():
        assert _close(sn(x), sub(x), 1e-9)


def test_parallel_slices_equal_separate_passes(fresh):
    sn = fresh
    rng = np.random.default_rng(5)
    cfgs = [sn.grid.full(), sn.grid.narrowest(), sn.grid.random(rng), sn.grid.random(rng)]
    x = _batch(8)
    sn.train()
    for mode in ("masked", "sliced"):
        y, g = _run(sn, x, mode, cfgs)
        parts, total = [], None
        for k, c in enumerate(cfgs):
            yk, gk = _run(sn, x[2 * k:2 * k + 2], mode, c)
            parts.append(yk)
            total = gk if total is None else {n: total[n] + gk[n] for n in total}
        assert _close(y, torch.cat(parts))
        assert all(_close(g[n], total[n]) for n in g)


def test_batch_norm_statistics_stay_within_each_slice(fresh):
    sn = fresh
    cfgs = [sn.grid.full(), sn.grid.narrowest()]
    x = _batch(8)
    x2 = x.clone()
    x2[4:] = 3 * x2[4:] + 1  # only the second slice's images change
    sn.train()
    sn.mode = "masked"
    sn.set_widths(cfgs)
    with torch.no_grad():
        a, b = sn(x), sn(x2)
        assert _close(a[:4], b[:4]) and not _close(a[4:], b[4:], 1e-3)
        sn.set_widths(sn.grid.full())  # one configuration over the whole batch mixes them
        assert not _close(sn(x)[:4], sn(x2)[:4], 1e-3)


def test_recalibrate_bn_is_a_cumulative_average_in_either_mode(fresh):
    from hwprune.search.supernet import recalibrate_bn

    sn = fresh
    cfg = sn.grid.random(np.random.default_rng(7))
    batches = [_batch(6, seed=s) for s in range(3)]
    x = _batch(4, seed=9)
    outs = {}
    for mode in ("masked", "sliced"):
        sn.mode = mode
        sn.set_widths(cfg)
        sn.train()
        assert recalibrate_bn(sn, [(b, None) for b in batches], n_batches=5) == 3
        assert sn.training  # modes restored
        sn.eval()
        with torch.no_grad():
            outs[mode] = sn(x)
    assert _close(outs["masked"], outs["sliced"])
    sub = sn.extract(cfg)
    recalibrate_bn(sub, batches)
    with torch.no_grad():
        assert _close(sub.eval()(x), outs["sliced"])
    stem = sub.get_submodule("bn1")
    with torch.no_grad():
        feats = [sub.conv1(b) for b in batches]
    expect = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(stem.running_mean, expect, atol=1e-5)
    with pytest.raises(HwpruneError, match="no batches"):
        recalibrate_bn(sub, [])


def test_stage_distillation_matches_the_teacher_at_full_width_and_across_modes(fresh, base):
    from hwprune.search.supernet_training import StageDistiller, SupernetConfig

    sn = fresh
    trainer = types.SimpleNamespace(cfg=SupernetConfig(distill="stage"), teacher=sn.teacher(base), sn=sn,
                                    autocast=contextlib.nullcontext)
    dist = StageDistiller(trainer)
    assert [s.name for s in dist.stages] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert dist.stages[1].out_gid == "conv1" and dist.stages[-1].out_gid is None
    x, y = _batch(8), torch.arange(8) % 10
    sn.train()
    trainer.teacher.train()  # batch statistics on both sides: identical weights give identical stages
    dist.start_step(x, y)
    sn.set_widths(sn.grid.full())
    with torch.no_grad():
        full = sn(x, y, *dist.extras([sn.grid.full()]), fn=dist.terms)
    assert full.shape == (8, 5) and float(full[:, :4].abs().max()) < 1e-8
    cfg = sn.grid.random(np.random.default_rng(2))
    terms = {}
    for mode in ("masked", "sliced"):
        sn.mode = mode
        sn.set_widths([cfg, sn.grid.narrowest()])
        with torch.no_grad():
            terms[mode] = sn(x, y, *dist.extras([cfg]), fn=dist.terms)
    assert _close(terms["masked"], terms["sliced"]) and float(terms["masked"][:, :4].min()) > 0
    credits = dist.credits(sn)
    assert credits["conv1"] == [0, 1] and credits["layer3.0.conv2"] == [3]


def test_stages_of_an_unknown_model_are_a_one_line_error():
    from hwprune.search.stages import model_stages

    with pytest.raises(HwpruneError, match="does not know the stages") as e:
        model_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), types.SimpleNamespace(name="tiny"), (1, 3, 8, 8))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip_and_mismatches(sn, base, tmp_path):
    from hwprune.search.supernet import Supernet, checkpoint_hash
    from hwprune.training.checkpoint import Checkpoint

    sn.prior.update(sn.grid.full(), 0.5)
    path = sn.save(tmp_path / "sn.pt")
    back = Supernet.load(path, checkpoint=base)
    assert back.grid.widths == sn.grid.widths and back.base_hash == checkpoint_hash(base)
    assert all(np.allclose(back.prior.probs(g), sn.prior.probs(g)) for g in sn.grid.groups)
    cfg = sn.grid.random(np.random.default_rng(1))
    x = _batch(4)
    for m in (sn, back):
        m.set_widths(cfg)
        m.eval()
    with torch.no_grad():
        assert _close(back(x), sn(x))
    sn.set_widths(sn.grid.full())
    sn.train()
    other = Checkpoint(base.arch, {k: v + 1e-3 if v.is_floating_point() else v for k, v in base.state_dict.items()},
                       base.num_classes, base.input_size, meta=base.meta)
    with pytest.raises(HwpruneError, match="another cifar_resnet20 checkpoint"):
        Supernet.load(path, checkpoint=other)
    with pytest.raises(HwpruneError, match="not of cifar_resnet56"):
        Supernet.load(path, checkpoint=Checkpoint("cifar_resnet56", {}, 10, (3, 32, 32)))
    with pytest.raises(HwpruneError, match="not an hwprune supernet"):
        Supernet.load(CK)
    raw = torch.load(path, weights_only=True)
    raw["space"][0][1] = 17
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(HwpruneError, match="another pruning space"):
        Supernet.load(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- training


def _cfg(**kw):
    from hwprune.search.supernet_training import SupernetConfig

    base = dict(epochs=1, batch_size=16, max_iters=1, holdout=5, precision="fp32", execution="sliced", threads=1,
                random_per_step=1, prior_warmup=1)
    return SupernetConfig(**{**base, **kw})


def test_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    from hwprune.search.supernet import Supernet
    from hwprune.search.supernet_training import SupernetTrainer, train_supernet

    straight = train_supernet(CK, DATA, _cfg(epochs=2), tmp_path / "a.pt", progress=False)
    end_epoch = SupernetTrainer._end_epoch

    def interrupted(self, epoch, *a):
        end_epoch(self, epoch, *a)
        raise KeyboardInterrupt  # stopped right after the first epoch's state was written

    monkeypatch.setattr(SupernetTrainer, "_end_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(CK, DATA, _cfg(epochs=2), tmp_path / "b.pt", progress=False)
    monkeypatch.setattr(SupernetTrainer, "_end_epoch", end_epoch)
    assert not (tmp_path / "b.pt").exists()
    state = torch.load(tmp_path / "b.state.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = train_supernet(CK, DATA, _cfg(epochs=2), tmp_path / "b.pt", progress=False)
    for (n, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), n
    assert resumed.prior.updates == straight.prior.updates == 6
    back = Supernet.load(tmp_path / "b.pt")
    assert back.meta["epochs_trained"] == 2 and back.meta["holdout"] == {"per_class": 5, "seed": 0, "size": 50}
    assert len((tmp_path / "b.log.jsonl").read_text().splitlines()) == 2
    with pytest.raises(HwpruneError, match="another supernet run"):
        train_supernet(CK, DATA, _cfg(epochs=3, mode="parallel", parallel=2), tmp_path / "b.pt", progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="zigzag"), "unknown supernet training mode"),
    (dict(mode="parallel", parallel=1), "at least 2"),
    (dict(mode="parallel", parallel=3), "equal slices"),
    (dict(mode="stage", distill="teacher"), "--distill stage"),
    (dict(distill="nope"), "unknown distillation"),
    (dict(execution="fast"), "execution"),
])
def test_bad_settings_fail_in_one_line_before_any_work(tmp_path, kw, match):
    from hwprune.search.supernet_training import train_supernet

    with pytest.raises(HwpruneError, match=match) as e:
        train_supernet(CK, DATA, _cfg(**kw), tmp_path / "x.pt", progress=False)
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


def test_sharded_loader_splits_every_epoch_between_ranks():
    from hwprune.search.distributed import ShardedBatchLoader, World
    from hwprune.training.data import ImageDataset

    n = 40
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    ds = ImageDataset(images, np.arange(n) % 4, list("abcd"), (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
    seen = []
    for rank in (0, 1):
        loader = ShardedBatchLoader(ds, 5, World(rank=rank, size=2), shuffle=True, seed=3, drop_last=True)
        assert len(loader) == 4
        loader.set_epoch(1)
        seen.append(sorted(int(x[0, 0, 0]) for xb, _ in loader for x in xb))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == n


def test_a_world_that_cannot_form_is_a_one_line_error(monkeypatch):
    from hwprune.search.distributed import world_from_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(HwpruneError, match="could not form") as e:
        world_from_env(torch.device("cpu"), timeout_s=1.0)
    assert "\n" not in str(e.value)
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(HwpruneError, match="MASTER_PORT is not set"):
        world_from_env(torch.device("cpu"))


_WORKER = """
import sys, torch
from hwprune.search.supernet_training import SupernetConfig, train_supernet
ck, data, out = sys.argv[1:4]
cfg = SupernetConfig(epochs=1, batch_size=8, max_iters=2, holdout=0, precision="fp32", execution="sliced",
                     threads=1, random_per_step=1, prior_warmup=1)
sn = train_supernet(ck, data, cfg, out + "/sn.pt", progress=False)
weights = {n: p.detach() for n, p in sn.net.named_parameters()}  # BN buffers are local to each rank
torch.save({"weights": weights, "prior": sn.prior.to_json()}, f"{out}/rank{sys.argv[4]}.pt")
"""


def test_two_gloo_processes_end_with_identical_weights(tmp_path, base):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(CK), str(DATA), str(tmp_path), str(rank)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for n, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][n]), n
    assert r0["prior"] == r1["prior"]
    start = base.state_dict["layer1.0.conv1.weight"].flatten().sort().values  # blind to the channel order
    assert not torch.allclose(r0["weights"]["layer1.0.conv1.weight"].flatten().sort().values, start)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt", "sn.log.jsonl", "sn.pt",
                                                          "sn.state.pt"]


def test_cli_trains_inspects_and_extracts(tmp_path):
    out = tmp_path / "sn.pt"
    r = run_cli_here("supernet", "train", "--checkpoint", str(CK), "--data", str(DATA), "--out", str(out),
                     "--epochs", "1", "--max-iters", "1", "--batch-size", "16", "--holdout", "5", "--mode",
                     "parallel", "--parallel", "4", "--precision", "fp32", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "parallel" and doc["epochs_trained"] == 1 and doc["prior_updates"] == 4
    assert set(doc["holdout_top1"]) == {"widest", "narrowest"}
    info = json.loads(run_cli_here("supernet", "info", str(out), "--json").stdout)
    assert info["arch"] == "cifar_resnet20" and len(info["prior"]) == info["groups"]
    widths = {"model": "cifar_resnet20", "widths": {g: ws[0] for g, ws in info["grid"].items()}}
    (tmp_path / "w.json").write_text(json.dumps(widths))
    r = run_cli_here("supernet", "extract", str(out), "--widths", str(tmp_path / "w.json"), "--out",
                     str(tmp_path / "sub.pt"))
    assert r.returncode == 0, r.stderr
    from hwprune.training.checkpoint import Checkpoint

    assert Checkpoint.load(tmp_path / "sub.pt").widths == widths["widths"]
    bad = run_cli_here("supernet", "train", "--checkpoint", str(CK), "--data", str(tmp_path / "none"), "--out",
                       str(tmp_path / "x.pt"), "--epochs", "1")
    assert bad.returncode == 2 and "does not exist" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli_here("supernet", "info", str(CK))
    assert bad.returncode == 2 and "not an hwprune supernet" in bad.stderr


def test_rank_fidelity_benchmark_runs_end_to_end(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("supernet_rank_fidelity", ROOT / "benchmarks" / "supernet_rank_fidelity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = bench.main(["--quick", "--modes", "parallel", "--out", str(tmp_path), "--threads", "1"])
    (row,) = doc["rows"]
    assert row["mode"] == "parallel" and len(row["proxy_top1"]) == len(row["finetuned_top1"]) == 3
    assert (row["kendall_tau"] is None or -1 <= row["kendall_tau"] <= 1) and row["seconds_per_epoch"] > 0
    assert "| parallel | teacher |" in (tmp_path / "supernet_rank_fidelity.md").read_text()
    assert len(list((tmp_path / "runs").glob("parallel-subnet??.pt"))) == 3
