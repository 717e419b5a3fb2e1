"""GCP on a tiny model and tiny synthetic data."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from hwprune.errors import HwpruneError
from hwprune.pruning.objectives import FlopsCost, ParamsCost, _Base
from hwprune.pruning.gcp import GCPConfig, _Masks, _phase, _trainables, gcp
from hwprune.pruning.space import PruningSpace


def make_space():
    torch.manual_seed(0)
    return PruningSpace.from_name("cifar_resnet20", input_size=16)


class TinyGrouped(nn.Module):
    """A stem, then a residual block around a grouped 3x3 convolution (4 conv groups), and a
    classifier: the groups feeding and leaving the grouped convolution have step 4."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout, k=1, groups=1, relu=True):
            layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

        self.stem = cbr(3, 16, 3)
        self.a, self.b, self.c = cbr(16, 24), cbr(24, 24, 3, groups=4), cbr(24, 16, relu=False)
        self.fc = nn.Linear(16, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):  # distinct BN scales, so that units rank differently
                nn.init.uniform_(m.weight, 0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c(self.b(self.a(x)))
        return self.fc(x.mean((2, 3)))


def grouped_space():
    torch.manual_seed(0)
    return PruningSpace(TinyGrouped(), (1, 3, 16, 16), name="tiny_grouped")


def assert_whole_units(space, widths, keep):
    """Every width is a multiple of its group's step, and ``keep`` is made of whole units."""
    for g in space.groups:
        assert widths.widths[g.id] % g.step == 0, (g.id, widths.widths[g.id], g.step)
        g.check_keep(keep[g.id], widths.widths[g.id])


def make_batches(n=4, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        y = torch.randint(0, 10, (bs,), generator=g)
        x = torch.randn(bs, 3, 16, 16, generator=g) * 0.5 + (y.float() / 10).view(-1, 1, 1, 1)
        data.append((x, y))
    return lambda: iter(data)


FAST = dict(steps=2, lr=1e-2, lam_factors=(0.3,), iters_per_phase=2)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy two-core host, two threads mostly wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gcp_reaches_the_requested_cost_fraction():
    space = make_space()
    cost = FlopsCost(space)
    pruned, res = gcp(space.model, space, cost, make_batches(), make_batches(seed=1), GCPConfig(target=0.5, **FAST))
    assert res.cost_fraction <= 0.5 + 1e-9 and res.cost_fraction > 0.4
    assert [h["step"] for h in res.history] == [1, 2]
    assert res.history[0]["cost_fraction"] <= 0.75 + 1e-9  # each step cuts (1 - alpha) / T of the cost
    assert space.widths_of(pruned).widths == res.widths.widths
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # coupled channels: every module of a residual group kept the same channels
    mods = dict(pruned.named_modules())
    for g in space.groups:
        outs = {mods[m].out_channels for m in g.modules}
        assert outs == {res.widths.widths[g.id]}
    # the original model is left untouched
    assert space.widths_of(space.model).widths == space.full().widths


def test_bn_statistics_are_frozen_in_the_regularised_step_and_refreshed_in_recovery():
    space = make_space()
    model = space.model
    masks = _Masks(model, space)
    params = _trainables(model, masks)
    bn = model.layer1[0].bn1
    before = bn.running_mean.clone(), bn.running_var.clone()
    conv_before = model.layer1[0].conv1.weight.clone()
    costs = {g.id: 1.0 for g in space.groups}
    it = iter(list(make_batches()()) * 4)
    _phase(model, masks, params, it, 3, 1e-2, 0.9, lam=1e-3, costs=costs, train_stats=False)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(model.layer1[0].conv1.weight, conv_before)  # convolution weights frozen
    assert not torch.equal(masks.params["layer1.0.conv1"], torch.ones(16))  # masks did train
    _phase(model, masks, params, it, 2, 1e-2, 0.9, train_stats=True)
    assert not torch.equal(bn.running_mean, before[0])
    masks.remove()


def test_proximal_step_zeroes_costly_channels_first():
    space = make_space()
    model = space.model
    masks = _Masks(model, space)
    params = _trainables(model, masks)
    costs = {g.id: (100.0 if g.id == "layer3.0.conv1" else 0.01) for g in space.groups}
    it = iter(list(make_batches()()) * 4)
    _phase(model, masks, params, it, 2, 1e-2, 0.0, lam=1.0, costs=costs, train_stats=False)
    expensive = masks.params["layer3.0.conv1"].detach()
    cheap = masks.params["layer2.0.conv1"].detach()
    assert (expensive == 0).float().mean() > 0.9 and (cheap == 0).float().mean() < 0.1
    masks.remove()


@pytest.mark.parametrize("make", [make_space, grouped_space])
def test_masks_fold_exactly_into_the_pruned_model(make):
    space = make()
    model = space.model.eval()
    masks = _Masks(model, space)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gid, m in masks.params.items():
            m.copy_(torch.rand(m.shape, generator=g) + 0.5)
            units = torch.as_tensor(space.channel_units(gid))
            dead = torch.rand(len(units), generator=g) < 0.3  # whole units: one channel unless grouped
            dead[0] = False
            masks.alive[gid][units[dead].ravel()] = False
            m.mul_(masks.alive[gid])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        masked = model(x)
    widths = masks.widths()
    keep = {gid: [int(i) for i in np.nonzero(a.numpy())[0]] for gid, a in masks.alive.items()}
    masks.remove()
    pruned = space.apply(widths, keep=keep)
    masks.fold_into(pruned, keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked, rtol=1e-4, atol=1e-5)


class LateExpensive:
    """A latency-like objective under which the last stage is what costs time."""

    name = "latency"

    def __init__(self, space):
        self.flops = FlopsCost(space)
        self.space = space
        self.late = np.array([g.id.startswith("layer3") for g in space.groups], dtype=float)

    def total(self, configs):
        W = self.flops._matrix(configs).astype(float)
        return W @ (1 + 50 * self.late)

    def marginal(self, config, step=1):
        return {g.id: 1 + 50 * self.late[i] for i, g in enumerate(self.space.groups)}

    def fraction(self, config):
        return float(self.total([config])[0] / self.total([self.space.full()])[0])


def test_gcp_lambda_prunes_differently_from_gcp_f():
    space = make_space()
    _, f = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1), GCPConfig(target=0.5, **FAST))
    _, lat = gcp(space.model, space, LateExpensive(space), make_batches(), make_batches(seed=1),
                 GCPConfig(target=0.5, **FAST))
    assert f.widths.widths != lat.widths.widths
    late = [g.id for g in space.groups if g.id.startswith("layer3")]
    kept = lambda r: sum(r.widths.widths[g] for g in late) / sum(space[g].channels for g in late)  # noqa: E731
    assert kept(lat) < kept(f)  # the latency objective cuts the expensive late stage harder


def test_lambda_and_lr_are_chosen_on_the_holdout_loss():
    space = make_space()
    cfg = GCPConfig(target=0.6, steps=2, iters_per_phase=4, lam_factors=(0.1, 1.0), lr_grid=(1e-2,), search_iters=2)
    _, res = gcp(space.model, space, ParamsCost(space), make_batches(), make_batches(seed=1), cfg)
    assert len(res.search) == 2
    assert all(len(s["zeroed_share"]) == 2 for s in res.search)  # each candidate ran the whole T-round schedule
    assert [s["lambda_factor"] for s in res.search] == pytest.approx([0.1, 1.0])
    best = min(res.search, key=lambda s: s["holdout_loss"])
    assert (res.lam, res.lr) == (best["lambda"], best["lr"])
    assert res.lam_factor == pytest.approx(best["lambda_factor"])


def test_target_is_corrected_until_met_on_the_device():
    from hwprune.pruning.device_correction import correct_to_measured

    space = make_space()
    cost = FlopsCost(space)
    _, res = gcp(space.model, space, cost, make_batches(), make_batches(seed=1), GCPConfig(target=0.5, **FAST))
    base_ms = 10.0

    def measure(widths, keep):  # a device on which pruned models run 25% slower than predicted
        assert all(len(keep[g]) == w for g, w in widths.widths.items())
        return base_ms * cost.fraction(widths) * 1.25

    widths, keep, log = correct_to_measured(space, cost, res.widths, res.keep, res.scores, res.prior, measure,
                                            base_ms, target=0.5, tol=0.03)
    assert log[0]["ratio"] > 0.5  # missed at first
    assert 0.47 <= log[-1]["ratio"] <= 0.5  # met after correcting
    assert cost.fraction(widths) < res.cost_fraction

    def fast(widths, keep):  # a device on which they run faster than predicted: channels come back
        return base_ms * cost.fraction(widths) * 0.8

    widths2, _, log2 = correct_to_measured(space, cost, res.widths, res.keep, res.scores, res.prior, fast,
                                           base_ms, target=0.5, tol=0.03)
    assert cost.fraction(widths2) > res.cost_fraction and log2[-1]["ratio"] <= 0.5


class Staircase:
    """A latency-like cost under which removing one channel from a full group makes it slower."""

    name = "latency"

    def __init__(self, space):
        self.flops = FlopsCost(space)
        self.space = space
        self.full = np.array([g.channels for g in space.groups])

    def total(self, configs):
        W = self.flops._matrix(configs).astype(float)
        off_step = (W % 8 != 0).astype(float)  # widths off a multiple of 8 run a slower kernel
        return (W * (1 + 0.5 * off_step)).sum(axis=1)

    def marginal(self, config, step=1):
        from hwprune.pruning.objectives import _Base

        return _Base.marginal(self, config, step)

    def fraction(self, config):
        return float(self.total([config])[0] / self.total([self.space.full()])[0])


def test_channel_costs_survive_a_staircase_where_one_channel_costs_time():
    from hwprune.pruning.gcp import _channel_costs

    space = make_space()
    cost = Staircase(space)
    cost.template = FlopsCost(space).template
    assert all(v < 0 for v in cost.marginal(space.full(), 1).values())  # one channel less is slower
    costs = _channel_costs(space, cost, space.full())
    vals = np.array(list(costs.values()))
    assert np.all(np.isfinite(vals)) and np.all(vals > 0) and abs(vals.mean() - 1) < 1e-9
    assert vals.max() < 100  # not the 1e12 that zeroed every mask


def test_channel_costs_reach_the_next_step_of_a_16_channel_staircase():
    """With 16-channel kernel blocks (AVX-512), removing 1 or 8 channels from a wide group saves
    nothing; its cost is the per-channel saving of reaching the next block, not the floor."""
    from hwprune.pruning.gcp import _channel_costs
    from hwprune.pruning.objectives import _Base

    space = make_space()

    class Blocks16(_Base):  # a layer's time follows its channels rounded up to a block of 16
        def total(self, configs):
            W = self._matrix(configs)
            return (16 * np.ceil(W / 16)).sum(axis=1).astype(float)

    cost = Blocks16(space)
    full = space.full().widths
    wide = [g.id for g in space.groups if full[g.id] >= 32]
    assert wide and all(cost.marginal(space.full(), 8)[g] == 0 for g in wide)  # 8 fewer: no saving
    costs = _channel_costs(space, cost, space.full())
    # every channel of a wide group saves one unit when its block goes: all wide groups cost alike
    assert np.allclose([costs[g] for g in wide], costs[wide[0]]) and costs[wide[0]] > 0.5


def test_recover_modes_train_the_convolutions_only_when_asked():
    import pytest

    from hwprune.errors import HwpruneError

    space = make_space()
    before = {n: p.detach().clone() for n, p in space.model.named_parameters() if p.dim() == 4}
    changed = {}
    for mode in ("paper", "all"):
        _, res = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
                     GCPConfig(target=0.6, recover=mode, **FAST))
        after = dict(res.trained.named_parameters())
        changed[mode] = sum(not torch.equal(before[n], after[n].detach()) for n in before)
    assert changed["paper"] == 0  # the paper's recover step: masks, BN shifts and classifier only
    assert changed["all"] == len(before)  # every convolution trained
    with pytest.raises(HwpruneError, match="recover mode"):
        gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
            GCPConfig(target=0.6, recover="most", **FAST))


def test_channels_given_back_by_the_correction_are_not_dead():
    from hwprune.pruning.gcp import materialize

    space = make_space()
    _, res = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
                 GCPConfig(target=0.5, **FAST))
    full = space.full()
    everything = {g.id: list(range(g.channels)) for g in space.groups}
    restored = materialize(space, res, full, everything)
    mods = dict(restored.named_modules())
    for g in space.groups:
        pruned_idx = [i for i in range(g.channels) if i not in set(res.keep[g.id])]
        for n in g.norms:
            w = mods[n].weight.detach()[pruned_idx]
            assert bool((w != 0).all()), f"{n}: a restored channel came back with a zero BN scale"


def test_restoring_gives_back_the_most_bn_scale_per_unit_cost():
    """With equal BN scales everywhere, the channels given back first are the cheapest ones, not
    those of the coupled residual groups (whose scales sum over several BNs)."""
    from hwprune.pruning.device_correction import _add_back_cost, correct_to_measured
    from hwprune.pruning.space import WidthConfig

    space = make_space()
    cost = FlopsCost(space)
    keep = {g.id: list(range(max(1, g.channels // 2))) for g in space.groups}
    widths = WidthConfig(space.name, {gid: len(k) for gid, k in keep.items()})
    unit = _add_back_cost(cost, widths)
    assert set(unit) == {g.id for g in space.groups} and all(v > 0 for v in unit.values())
    cheap, dear = min(unit, key=unit.get), max(unit, key=unit.get)
    assert unit[dear] > 2 * unit[cheap]
    ones = {g.id: np.ones(g.channels) for g in space.groups}
    base_ms = 10.0
    start = cost.fraction(widths)

    def fast(w, k):  # pruned models run 30% faster than predicted: some channels come back
        return base_ms * cost.fraction(w) * 0.7

    restored, _, log = correct_to_measured(space, cost, widths, keep, ones, ones, fast, base_ms,
                                           target=start * 0.8, tol=0.02)
    full = {g.id: g.channels for g in space.groups}
    gained = {gid: (restored.widths[gid] - widths.widths[gid]) / (full[gid] - widths.widths[gid]) for gid in full}
    assert cost.fraction(restored) > start and log[-1]["ratio"] <= start * 0.8
    assert gained[cheap] == 1.0 and gained[dear] == 0.0


def test_default_lambda_makes_the_proximal_step_zero_masks():
    space = make_space()
    _, res = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
                 GCPConfig(target=0.5, lr=1e-2, steps=2, iters_per_phase=2))
    assert [s["lambda_factor"] for s in res.search] == pytest.approx([0.1, 0.3, 1.0])
    shares = [h["zeroed_share"] for h in res.history]
    assert max(shares) > 0.05, shares
    live = sum(g.channels for g in space.groups)
    for h in res.history:  # the per-group counts add up to the share of the round's live channels
        assert all(n > 0 for n in h["zeroed"].values())
        assert sum(h["zeroed"].values()) == round(h["zeroed_share"] * live)
        live = sum(h["widths"].values())


class Weighted(_Base):
    """A cost linear in the group widths, one weight per channel of each group (1 unless given)."""

    name = "weighted"

    def __init__(self, space, weights):
        super().__init__(space)
        self.w = np.array([weights.get(g.id, 1.0) for g in space.groups], dtype=float)

    def total(self, configs):
        return self._matrix(configs).astype(float) @ self.w


def test_costs_decide_which_channels_go():
    """One layer is expensive under one objective and cheap under the other: the objective under
    which it is expensive prunes it to the floor, the other keeps it."""
    space = make_space()
    x = "layer2.1.conv1"
    kept = {}
    for name, w in (("dear", 20.0), ("cheap", 0.05)):
        _, r = gcp(space.model, space, Weighted(space, {x: w}), make_batches(), make_batches(seed=1),
                   GCPConfig(target=0.6, **FAST))
        assert r.cost_fraction <= 0.6 + 1e-9
        kept[name] = r.widths.widths[x] / space[x].channels
    assert kept["dear"] < 0.5 and kept["cheap"] > 0.9, kept


def test_coupled_and_single_groups_are_scored_on_one_scale():
    space = make_space()
    assert len(space["conv1"].norms) == 4 and len(space["layer1.0.conv1"].norms) == 1
    mods = dict(space.model.named_modules())
    gamma = torch.linspace(0.2, 1.0, 16)
    with torch.no_grad():
        for gid in ("conv1", "layer1.0.conv1"):  # a residual stream and an inner convolution, 16 channels each
            for n in space[gid].norms:
                mods[n].weight.copy_(gamma)
    masks = _Masks(space.model, space)
    scores = masks.scores()
    masks.remove()
    np.testing.assert_allclose(scores["conv1"], scores["layer1.0.conv1"], rtol=1e-6)
    assert scores["conv1"].mean() == pytest.approx(1.0)


def test_bn_scales_are_refreshed_after_every_recovery(monkeypatch):
    import hwprune.pruning.gcp as G

    space = make_space()
    x, new = "layer2.1.conv1", torch.linspace(2.0, 0.1, 32)
    real_phase, real_prune, seen = G._phase, G._prune_to, []

    def phase(model, masks, *args, train_stats=False, **kw):
        loss = real_phase(model, masks, *args, train_stats=train_stats, **kw)
        if train_stats:  # the recover step moved gamma
            with torch.no_grad():
                model.layer2[1].bn1.weight.copy_(new)
        return loss

    def prune_to(space, cost, masks, *args, **kw):
        seen.append((masks.gscale[x].clone(), masks.alive[x].clone()))
        return real_prune(space, cost, masks, *args, **kw)

    monkeypatch.setattr(G, "_phase", phase)
    monkeypatch.setattr(G, "_prune_to", prune_to)
    _, res = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
                 GCPConfig(target=0.6, recover="paper", **FAST))
    assert len(seen) == 2
    torch.testing.assert_close(seen[0][0], torch.ones(32))  # the model's gamma before any recovery
    scale, alive = seen[1]
    torch.testing.assert_close(scale, new / new[alive].mean())  # round 2 ranks by the recovered gamma


def test_gcp_prunes_a_grouped_convolution_in_whole_units():
    space = grouped_space()
    assert {g.id: g.step for g in space.groups} == {"stem.0": 1, "a.0": 4, "b.0": 4}
    pruned, res = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
                      GCPConfig(target=0.5, **FAST))
    assert res.cost_fraction <= 0.5 + 1e-9
    assert_whole_units(space, res.widths, res.keep)
    assert res.widths.widths["a.0"] < 24 or res.widths.widths["b.0"] < 24  # the grouped block was pruned
    assert all(res.widths.widths[g.id] >= 8 for g in space.groups if g.step == 4)  # min_keep 0.2, rounded up
    for h in res.history:
        assert all(h["widths"][g.id] % g.step == 0 for g in space.groups)
    assert space.widths_of(pruned).widths == res.widths.widths
    assert pruned.b[0].groups == 4
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def scripted(cost, factor, seen):
    """A device on which pruned models run ``factor`` times their predicted cost fraction of 10 ms."""
    def measure(widths, keep):
        seen.append((widths, keep))
        return 10.0 * cost.fraction(widths) * factor
    return measure


def random_scores(space, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.channels) for g in space.groups}


def test_device_correction_moves_whole_units_of_a_grouped_space():
    from hwprune.pruning.device_correction import correct_to_measured
    from hwprune.pruning.importance import keep_indices

    space = grouped_space()
    cost = FlopsCost(space)
    scores = random_scores(space)
    widths = space.uniform(0.5)
    keep = keep_indices(scores, widths, space)  # any method's result: here, the best-scored units
    start = cost.fraction(widths)
    for factor, more in ((1.6, False), (0.6, True)):  # slower, then faster than predicted
        seen = []
        out, kept, log = correct_to_measured(space, cost, widths, keep, scores, None, scripted(cost, factor, seen),
                                             10.0, target=start, tol=0.05)
        assert len(seen) == len(log) > 1 and log[-1]["ratio"] <= start
        for w, k in seen + [(out, kept)]:
            assert_whole_units(space, w, k)
            assert all(w.widths[g.id] >= 8 for g in space.groups if g.step == 4)
        assert (cost.fraction(out) > start) == more
        assert any(out.widths[g.id] != widths.widths[g.id] for g in space.groups if g.step == 4)  # moved by units


def test_device_correction_without_prior_ranks_by_the_scores():
    from hwprune.pruning.device_correction import correct_to_measured

    space = make_space()
    cost = FlopsCost(space)
    scores = random_scores(space, seed=1)
    widths = space.uniform(0.5)
    keep = {g.id: list(range(widths.widths[g.id])) for g in space.groups}  # not the best-scored channels
    start = cost.fraction(widths)
    runs = [correct_to_measured(space, cost, widths, keep, scores, prior, scripted(cost, 0.7, []), 10.0,
                                target=start, tol=0.03) for prior in (None, scores)]
    assert runs[0] == runs[1]
    out, kept, log = runs[0]
    assert cost.fraction(out) > start and log[-1]["ratio"] <= start
    gained = 0
    for g in space.groups:  # within a group, the removed channels come back in order of their scores
        back, still = set(kept[g.id]) - set(keep[g.id]), set(range(g.channels)) - set(kept[g.id])
        s = scores[g.id]
        assert not back or not still or min(s[list(back)]) >= max(s[list(still)]), g.id
        gained += len(back)
    assert gained


def test_gcp_options_fix_lambda_and_lr_or_are_refused_in_one_line():
    """``-o lam_factor=0.3 -o lr=0.01`` runs one candidate (no held-out search); bad values are one-line errors."""
    from hwprune.pruning.methods import PruneJob, _gcp_config, get_method

    space = make_space()
    job = PruneJob(checkpoint=None, model=space.model, space=space, cost=ParamsCost(space), data=None,
                   options={"lam_factor": 0.3, "lr": 0.01, "iters": 5, "steps": 3})
    cfg = _gcp_config(0.6, job)
    assert (cfg.lam_factors, cfg.lr, cfg.iters_per_phase, cfg.steps, cfg.target) == ((0.3,), 0.01, 5, 3, 0.6)
    from hwprune.pruning.gcp import _candidates

    assert len(_candidates(space, ParamsCost(space), cfg, 5)) == 1  # nothing left to choose
    default = _gcp_config(0.6, PruneJob(checkpoint=None, model=space.model, space=space, cost=ParamsCost(space)))
    assert default.lam_factors == GCPConfig().lam_factors and default.lr is None
    for bad in ({"lr": -1}, {"lam_factor": "big"}, {"steps": 0}, {"iters": True}):
        with pytest.raises(HwpruneError, match="must be a positive number"):
            get_method("gcp").validate(bad)


def test_streams_keep_prunes_only_inside_the_blocks():
    """``-o streams=keep``: every residual stream stays whole, the other groups meet the target alone;
    an unknown mode is a one-line error."""
    from hwprune.pruning.methods import PruneJob, _gcp_config, get_method

    space = make_space()
    streams = [g.id for g in space.groups if g.kind == "residual"]
    assert streams  # the test model has a residual stage
    _, res = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
                 GCPConfig(target=0.6, streams="keep", **FAST))
    full = space.full().widths
    assert all(res.widths.widths[g] == full[g] for g in streams)
    assert res.cost_fraction <= 0.6 + 1e-9
    assert any(res.widths.widths[g.id] < g.channels for g in space.groups if g.kind != "residual")
    _, free = gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
                  GCPConfig(target=0.6, **FAST))
    assert any(free.widths.widths[g] < full[g] for g in streams)  # by default the streams compete
    job = PruneJob(checkpoint=None, model=space.model, space=space, cost=FlopsCost(space), options={"streams": "keep"})
    assert _gcp_config(0.6, job).streams == "keep"
    with pytest.raises(HwpruneError, match="streams"):
        get_method("gcp").validate({"streams": "some"})
    with pytest.raises(HwpruneError, match="streams mode"):
        gcp(space.model, space, FlopsCost(space), make_batches(), make_batches(seed=1),
            GCPConfig(target=0.6, streams="some", **FAST))


def test_device_correction_keeps_the_method_floors():
    """A device slower than predicted makes the correction remove channels; with GCP's
    ``streams=keep`` floors it takes them from inside the blocks only, never from a stream."""
    from hwprune.pruning.device_correction import correct_to_measured
    from hwprune.pruning.gcp import width_floors

    space = make_space()
    cost = FlopsCost(space)
    streams = [g.id for g in space.groups if g.kind == "residual"]
    _, res = gcp(space.model, space, cost, make_batches(), make_batches(seed=1),
                 GCPConfig(target=0.6, streams="keep", **FAST))

    def slow(widths, keep):  # pruned models run 30% slower than predicted
        return 10.0 * cost.fraction(widths) * 1.3

    # the streams' channels score lowest, so a correction without floors removes them first
    scores = {g: (s * 1e-3 if g in streams else s) for g, s in res.scores.items()}
    args = (space, cost, res.widths, res.keep, scores, res.prior, slow, 10.0)
    free, _, _ = correct_to_measured(*args, target=0.6, tol=0.03)
    assert any(free.widths[g] < space.full().widths[g] for g in streams)  # without floors, streams are cut
    kept, _, log = correct_to_measured(*args, target=0.6, tol=0.03, floors=width_floors(space, 0.2, "keep"))
    assert all(kept.widths[g] == space.full().widths[g] for g in streams)
    assert cost.fraction(kept) < res.cost_fraction  # it did remove channels, inside the blocks


def test_a_removal_that_jumps_a_staircase_step_is_given_back_where_it_fits():
    """The removal that crosses the budget can land a layer back on a fast kernel and undercut the
    budget by far; the last removals that still fit are undone, and the cost stays within it."""
    from hwprune.pruning.gcp import _give_back

    space = make_space()
    full = np.array([g.channels for g in space.groups])
    a, b = (int(i) for i in np.argsort(full)[-2:])
    assert space.groups[a].step == space.groups[b].step == 1 and full[a] % 8 == 0

    class Jump:  # one channel per unit of cost; group a off a multiple of 8 costs 40 more
        def total(self, W):
            W = np.asarray(W)
            return W.sum(axis=1) + 40.0 * (W[:, a] % 8 != 0)

    groups = [b] * 4 + [a] * 8  # four removals from b, then eight from a: a lands back on a multiple
    w = full.copy()
    w[b] -= 4
    w[a] -= 8
    budget = float(Jump().total(w[None, :])[0]) + 5.0
    kept = _give_back(space, Jump(), w, groups, budget)
    assert kept == {0, 1, 2, 3}  # b's channels come back; any of a's would cost 41
    w[b] += 4
    assert float(Jump().total(w[None, :])[0]) <= budget
    assert _give_back(space, Jump(), w, [], budget) == set()


def test_of_two_tries_under_the_target_the_wider_one_is_kept_even_when_it_measured_faster():
    """On a noisy host the wider of two configurations can measure faster; both met the target, and
    the one the cost model calls wider (more channels kept) is the one to keep."""
    from hwprune.pruning.widths import MeasuredTarget

    steer = MeasuredTarget(0.65, 0.03)
    assert not steer.record(0.64, 0.557, "narrow")  # under the target, too far under for the band
    assert not steer.record(0.66, 0.508, "wide")  # wider, measured faster: a neighbour left
    assert steer.chosen() == "wide"
    assert not steer.record(0.70, 0.70, "over")  # over the target: never kept
    assert steer.chosen() == "wide"


def test_giving_back_skips_a_unit_that_jumps_a_step_and_restores_those_that_fit():
    """A removed channel whose return would pass the goal (a width off a staircase step) is skipped,
    and the cheaper candidates after it are still given back."""
    from hwprune.pruning.device_correction import _alive_of, _restore_units, _widths_of

    space = make_space()
    full = np.array([g.channels for g in space.groups])
    ids = [g.id for g in space.groups]
    a, b = (int(i) for i in np.argsort(full)[-2:])
    assert space.groups[a].step == space.groups[b].step == 1 and full[a] % 8 == 0

    from hwprune.pruning.objectives import _Base

    class Jump(_Base):  # one per channel; group a off a multiple of 8 costs 1000 more
        def total(self, configs):
            W = self._matrix(configs)
            col = self.template.group_ids.index(ids[a])
            return W.sum(axis=1) + 1000.0 * (W[:, col] % 8 != 0)

    w = dict(space.full().widths)
    w[ids[a]] -= 8
    w[ids[b]] -= 4
    cfg = space.validate(w)
    alive = _alive_of(space, cfg, {})
    prior = {g.id: np.ones(g.channels) for g in space.groups}
    prior[ids[a]] = np.full(space.groups[a].channels, 100.0)  # a's channels come first by importance
    jump = Jump(space)
    base = float(jump.total([space.full()])[0])
    goal = (float(jump.total([cfg])[0]) + 4.0) / base  # room for four channels, not for a's step
    _restore_units(space, jump, alive, prior, goal, base)
    out = _widths_of(space, alive).widths
    assert out[ids[a]] == w[ids[a]]  # a's channels would jump the step: skipped
    assert out[ids[b]] == w[ids[b]] + 4  # b's four came back after them
