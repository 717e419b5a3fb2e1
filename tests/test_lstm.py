"""LSTM-guided pruning: encoding, controller, REINFORCE, one pruning step, the search loop and the method."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import params_ms, run_cli_here, script_the_meter
from hwprune.errors import HwpruneError
from hwprune.pipeline import BASE_CK, SAMPLE
from hwprune.pruning.lstm.controller import Controller, RandomController, Reinforce
from hwprune.pruning.lstm.search import LSTMConfig, LSTMSearch, config_from_options, reward
from hwprune.pruning.lstm.step import Surgeon, child_of, make_child, plan_removal, Recovery
from hwprune.pruning.lstm.tokens import N_FEATURES, encode, step_width
from hwprune.pruning.methods import get_method
from hwprune.pruning.objectives import FlopsCost, LatencyCost
from hwprune.pruning.space import PruningSpace
from hwprune.pruning.target import DeviceOptions, prune_to_target
from hwprune.training.checkpoint import Checkpoint


_THREADS = []


def setup_module():
    """One intra-op thread: on a busy two-core host, two threads mostly wait for each other."""
    _THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)


def teardown_module():
    torch.set_num_threads(_THREADS.pop())


class Tiny(nn.Module):
    """A stem on a residual stream (coupled with the block's output), an inner convolution, a last
    convolution and a classifier: three groups, one of them coupled."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout, relu=True):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 *([nn.ReLU()] if relu else []))

        self.stem, self.a, self.b, self.c = cbr(3, 16), cbr(16, 24), cbr(24, 16, relu=False), cbr(16, 32)
        self.fc = nn.Linear(32, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        return self.fc(self.c(x).mean((2, 3)))


def tiny_space():
    torch.manual_seed(0)
    return PruningSpace(Tiny().eval(), (1, 3, 16, 16), name="tiny")


def batches(n=3, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        y = torch.randint(0, 10, (bs,), generator=g)
        data.append((torch.randn(bs, 3, 16, 16, generator=g) + y.float().view(-1, 1, 1, 1) / 4, y))
    return lambda: iter(data)


FAST = dict(children=3, beam=2, rounds=2, recovery_iters=1, budget_minutes=10.0, precision="fp32")


# ----------------------------------------------------------------------------- encoding and controller


def test_tokens_and_controller_actions_have_the_right_shape_and_probabilities():
    space = tiny_space()
    tokens = encode(space, FlopsCost(space), space.full().widths, goal=0.5, share=0.2, min_keep=0.2)
    assert tokens.shape == (3, N_FEATURES) and torch.isfinite(tokens).all()
    assert tokens[0, 1] == 1.0 and tokens[0, -2] == 1.0  # kind "residual", prunable
    ctrl = Controller()
    p = ctrl(tokens)
    assert p.shape == (3,) and torch.allclose(p, torch.full((3,), 0.5))  # zero-initialised head
    assert ctrl(torch.stack([tokens, tokens])).shape == (2, 3)
    with torch.no_grad():
        ctrl.head.bias.fill_(1.5)
        ctrl.head.weight.normal_(0, 0.5)
    p = ctrl(tokens).detach()
    gen = torch.Generator().manual_seed(0)
    acts = np.stack([ctrl.sample(tokens, gen) for _ in range(3000)])
    assert acts.shape == (3000, 3) and acts.dtype == bool
    np.testing.assert_allclose(acts.mean(0), p.numpy(), atol=0.03)
    a = torch.tensor([True, False, True])
    want = torch.log(p[0]) + torch.log(1 - p[1]) + torch.log(p[2])
    assert float(ctrl.log_prob(tokens, a).detach()) == pytest.approx(float(want), rel=1e-5)
    assert RandomController()(tokens).tolist() == [0.5, 0.5, 0.5]


def test_reinforce_raises_the_probability_of_a_rewarded_action():
    torch.manual_seed(0)
    tokens = torch.randn(5, N_FEATURES)
    ctrl = Controller()
    rl = Reinforce(ctrl, lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    before = ctrl(tokens).detach()
    for _ in range(25):  # reward: +1 for pruning group 0, -1 for pruning group 3
        acts = [ctrl.sample(tokens, gen) for _ in range(8)]
        rl.update([tokens] * 8, acts, [float(a[0]) - float(a[3]) for a in acts])
    after = ctrl(tokens).detach()
    assert after[0] > before[0] + 0.15 and after[3] < before[3] - 0.15
    assert rl.updates == 25 and rl.baseline is not None
    random = RandomController()
    rl = Reinforce(random)
    rl.update([tokens] * 2, [np.ones(5, bool), np.zeros(5, bool)], [1.0, 0.0])
    assert random(tokens).tolist() == [0.5] * 5 and rl.updates == 0


# ----------------------------------------------------------------------------- one step


def test_importance_is_the_energy_the_next_layers_read_and_rescaling_restores_it():
    space = tiny_space()
    surgeon = Surgeon(space, space.model)
    base = surgeon.base_net()
    w_b, w_fc = base.state["b.0.weight"], base.state["fc.weight"]
    imp = surgeon.importance(base)
    np.testing.assert_allclose(imp["a.0"], w_b.double().pow(2).sum((0, 2, 3)).numpy(), rtol=1e-9)
    stream = base.state["a.0.weight"].double().pow(2).sum((0, 2, 3)) + base.state["c.0.weight"].double().pow(2).sum((0, 2, 3))
    np.testing.assert_allclose(imp["stem.0"], stream.numpy(), rtol=1e-9)  # summed over every reader
    removal = plan_removal(space, FlopsCost(space), base, base.prior, ["stem.0", "a.0"], 0.25, 0.2, goal=0.1)
    assert {g: len(r) for g, r in removal.items()} == {"stem.0": 4, "a.0": 6}
    low = np.argsort(imp["a.0"])[:6]
    assert sorted(removal["a.0"]) == sorted(low.tolist())  # the lowest importance go
    widths, keep = child_of(base, removal)
    small = surgeon.build(widths, keep, base.state)
    factors = surgeon.rescale(base, widths, keep, small, removal)
    assert set(factors) == {"a.0", "b.0", "c.0"} and all(f > 1 for f in factors.values())
    rows = torch.tensor(keep["stem.0"])  # b reads a's channels and writes the (pruned) stream
    assert float(small.b[0].weight.detach().norm()) == pytest.approx(float(w_b[rows].norm()), rel=1e-5)
    assert float(small.c[0].weight.detach().norm()) == pytest.approx(float(base.state["c.0.weight"].norm()), rel=1e-5)
    assert float(small.fc.weight.detach().norm()) == pytest.approx(float(w_fc.norm()), rel=1e-6)  # fc reads c, not pruned


def test_a_child_is_written_back_where_its_channels_came_from():
    space = tiny_space()
    surgeon = Surgeon(space, space.model)
    base = surgeon.base_net()
    removal = plan_removal(space, FlopsCost(space), base, base.prior, ["a.0", "c.0"], 0.5, 0.2, goal=0.1)
    child, info = make_child(surgeon, base, removal, base.prior, space.model, batches(), batches(1, seed=3),
                             Recovery(iters=2, lr=0.05))
    assert info["recovery_loss"] > 0 and 0 <= child.accuracy <= 1
    rebuilt = surgeon.build(child.widths, child.keep, child.state).eval()
    x = torch.randn(2, 3, 16, 16)
    again = surgeon.build(child.widths, child.keep, child.state).eval()
    assert torch.allclose(rebuilt(x), again(x))
    gone = sorted(removal["a.0"])
    w = child.state["a.0.weight"]
    assert torch.equal(w[gone], base.state["a.0.weight"][gone])  # removed channels keep their last weights
    assert not torch.equal(w[child.keep["a.0"]], base.state["a.0.weight"][child.keep["a.0"]])  # kept ones trained


# ----------------------------------------------------------------------------- the search


def test_the_search_meets_the_cost_goal_in_steps_of_the_share(tmp_path):
    space = tiny_space()
    cost = FlopsCost(space)
    cfg = LSTMConfig(goal=0.55, share=0.25, **FAST)
    res = LSTMSearch(space, space.model, cost, batches(), batches(1, seed=3), cfg, tmp_path / "w").run()
    assert res.finished_by == "goal" and res.net.cost <= 0.55 and cost.fraction(res.net.widths) == pytest.approx(res.net.cost)
    checked = 0
    for s in res.log:  # every kept child short of the goal removed a quarter of each selected group's channels
        for e in s["beam"] if s["kind"] == "search" else []:
            if e["cost_fraction"] <= cfg.goal:
                continue  # the step that reaches the goal stops there
            for gid, n in e["pruned"].items():
                assert gid in e["tokens"]
                assert e["widths"][gid] == step_width(space[gid], e["widths"][gid] + n, 0.25, 0.2)
                checked += 1
    assert checked
    doc = json.loads((tmp_path / "w" / "log.json").read_text())
    child = doc["steps"][0]["rounds"][0]["children"][0]
    assert {"tokens", "reward", "cost_fraction", "accuracy", "cached"} <= set(child)
    assert (tmp_path / "w" / "sensitivity.png").stat().st_size > 1000
    assert res.train_iters == res.children * cfg.recovery_iters and res.updates >= 1


def _rewards(log):
    return [(c["tokens"], c["reward"]) for s in log for r in s.get("rounds", []) for c in r["children"]]


def test_a_resumed_run_continues_from_its_last_step(tmp_path, monkeypatch):
    space = tiny_space()
    cfg = LSTMConfig(goal=0.4, share=0.2, **FAST)
    whole = LSTMSearch(space, space.model, FlopsCost(space), batches(), batches(1, seed=3), cfg, tmp_path / "a").run()
    assert len([s for s in whole.log if s["kind"] == "search"]) >= 2

    def stop(desc, done, total):
        if search.st["step"] == 1:
            raise KeyboardInterrupt

    search = LSTMSearch(space, space.model, FlopsCost(space), batches(), batches(1, seed=3), cfg, tmp_path / "b",
                        progress=stop)
    with pytest.raises(KeyboardInterrupt):
        search.run()
    saved = json.loads((tmp_path / "b" / "log.json").read_text())["steps"]
    assert [s["step"] for s in saved] == [0]
    import hwprune.pruning.lstm.search as mod

    calls = []
    real = mod.make_child
    monkeypatch.setattr(mod, "make_child", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = LSTMSearch(space, space.model, FlopsCost(space), batches(), batches(1, seed=3), cfg, tmp_path / "b").run()
    assert json.loads(json.dumps(again.log[0])) == saved[0]  # step 0 is not redone
    done = sum(1 for r in saved[0]["rounds"] for c in r["children"] if c["feasible"] and not c["cached"])
    assert len(calls) == whole.children - done  # only the steps after it are
    assert [t for t, _ in _rewards(again.log)] == [t for t, _ in _rewards(whole.log)]
    assert [r for _, r in _rewards(again.log)] == pytest.approx([r for _, r in _rewards(whole.log)])
    assert again.net.widths == whole.net.widths and again.children == whole.children


# ----------------------------------------------------------------------------- the method


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """15 training images per class of the shipped sample (one held-out image per class, 140 for
    recovery) and 3 test images per class."""
    from hwprune.training.data import load_dataset, save_npz_sample

    root = tmp_path_factory.mktemp("data")
    for split, per_class in (("train", 15), ("test", 3)):
        save_npz_sample(load_dataset(SAMPLE, split), root / f"{split}.npz", per_class=per_class)
    return root


class StairPredictor:
    """A latency predictor for cifar_resnet20 that needs no table: 0.1 ms plus a time per MAC plus a
    step per 8 channels of every group (a staircase)."""

    def __init__(self, model="cifar_resnet20"):
        self.model = model
        self.settings_ = {"backend": "onnxruntime", "batch": 1, "threads": 1, "device": "cpu"}
        self._flops = FlopsCost(PruningSpace.from_name(model))

    def check_model(self, model):
        if model != self.model:
            raise HwpruneError(f"the table never covered model '{model}'", f"it covers {self.model}")

    def predict(self, model, configs):
        W = self._flops._matrix(configs)
        return 0.1 + 1e-8 * self._flops.total(W) + 0.002 * np.ceil(W / 8).sum(1)


def test_bad_input_is_refused_in_one_line_before_any_work(tiny_data, tmp_path):
    wd = tmp_path / "wd"
    opts = {"work_dir": str(wd), "recovery_iters": 1, "batch_size": 16}
    with pytest.raises(HwpruneError, match="too small for one LSTM step"):
        prune_to_target(BASE_CK, "lstm", "flops", 0.6, data=tiny_data, options={**opts, "budget_minutes": 1e-4})
    with pytest.raises(HwpruneError, match="below what the narrowest network reaches"):
        prune_to_target(BASE_CK, "lstm", "flops", 0.01, data=tiny_data, options=opts)
    with pytest.raises(HwpruneError, match="never covered model 'cifar_resnet20'"):
        prune_to_target(BASE_CK, "lstm", "latency", 0.5, predictor=StairPredictor("cifar_resnet56"), data=tiny_data,
                        options=opts, device=DeviceOptions(measure=False))
    for bad, msg in (({"share": 1.5}, "share=1.5 must be a fraction"), ({"children": 0}, "children=0 must be"),
                     ({"chidren": 3}, "unknown lstm option 'chidren'"), ({"controller": "gru"}, "controller='gru'")):
        with pytest.raises(HwpruneError, match=msg):
            get_method("lstm").validate(bad)
    assert not wd.exists()
    out = tmp_path / "x.pt"
    r = run_cli_here("prune", "--checkpoint", str(BASE_CK), "--method", "lstm", "--target", "0.5", "--data",
                     str(tiny_data), "--option", "share=2", "--out", str(out))
    assert r.returncode == 2 and "share=2 must be a fraction" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert config_from_options({"steps": 4, "recover": "all", "budget_minutes": None}).budget_minutes == 60


def test_end_to_end_to_a_measured_latency_target_on_the_scripted_device(tiny_data, tmp_path, monkeypatch):
    script_the_meter(monkeypatch)
    pred = StairPredictor()
    opts = {"work_dir": str(tmp_path / "wd"), "children": 2, "beam": 1, "rounds": 1, "recovery_iters": 1,
            "batch_size": 16, "share": 0.4}
    res = prune_to_target(BASE_CK, "lstm", "latency", 0.6, predictor=pred, data=tiny_data, options=opts,
                          device=DeviceOptions(patience_s=0))
    meta = res.checkpoint.meta
    base_ms = params_ms(SimpleNamespace(module=Checkpoint.load(BASE_CK).build_model().module))
    assert meta["measured_ms"] / base_ms <= 0.6 and meta["method"] == "lstm"
    assert meta["measured_ms"] == pytest.approx(params_ms(SimpleNamespace(module=res.model)))
    assert meta["lstm_finished_by"] in ("goal", "budget") and meta["lstm_cost_fraction"] <= meta["goal"] + 1e-9
    assert meta["lstm_train_iters"] == meta["lstm_children"] and meta["lstm_batch_size"] == 16
    assert meta["lstm_log"][0]["rounds"][0]["children"][0]["cost_unit"] == "ms"
    assert res.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10) and "accuracy" in meta
    path = res.save(tmp_path / "lstm.pt")
    from hwprune.bench.report import write_report

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [], "settings": {"batches": [1]}, "device": {}}))
    _, md = write_report(bench, [path], tmp_path / "report.html")
    assert "report_sensitivity.png" in md.read_text() and (tmp_path / "report_sensitivity.png").exists()
    assert "id='sensitivity'" in (tmp_path / "report.html").read_text()
    again = prune_to_target(BASE_CK, "lstm", "latency", 0.6, predictor=pred, data=tiny_data, options=opts,
                            device=DeviceOptions(patience_s=0))  # resumed from the finished state: no new children
    assert again.checkpoint.meta["lstm_children"] == meta["lstm_children"]
