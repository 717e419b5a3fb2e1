"""GCP on a tiny model and tiny synthetic data."""

import numpy as np
import torch

from hwprune.cost import FlopsCost, ParamsCost
from hwprune.gcp import GCPConfig, _Masks, _phase, _trainables, gcp
from hwprune.space import PruningSpace


def make_space():
    torch.manual_seed(0)
    return PruningSpace.from_name("cifar_resnet20", input_size=16)


def make_batches(n=4, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        y = torch.randint(0, 10, (bs,), generator=g)
        x = torch.randn(bs, 3, 16, 16, generator=g) * 0.5 + (y.float() / 10).view(-1, 1, 1, 1)
        data.append((x, y))
    return lambda: iter(data)


FAST = dict(steps=2, lam=1e-3, lr=1e-2, iters_per_phase=2)


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


def test_masks_fold_exactly_into_the_pruned_model():
    space = make_space()
    model = space.model.eval()
    masks = _Masks(model, space)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gid, m in masks.params.items():
            m.copy_(torch.rand(m.shape, generator=g) + 0.5)
            dead = torch.rand(m.shape, generator=g) < 0.3
            dead[0] = False
            masks.alive[gid] &= ~dead
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
    cfg = GCPConfig(target=0.6, steps=1, iters_per_phase=2, lam_grid=(1e-4, 1e-2), lr_grid=(1e-2,), search_iters=2)
    _, res = gcp(space.model, space, ParamsCost(space), make_batches(), make_batches(seed=1), cfg)
    assert len(res.search) == 2
    best = min(res.search, key=lambda s: s["holdout_loss"])
    assert (res.lam, res.lr) == (best["lambda"], best["lr"])


def test_target_is_corrected_until_met_on_the_device():
    from hwprune.gcp import correct_to_measured

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
        from hwprune.cost import _Base

        return _Base.marginal(self, config, step)

    def fraction(self, config):
        return float(self.total([config])[0] / self.total([self.space.full()])[0])


def test_channel_costs_survive_a_staircase_where_one_channel_costs_time():
    from hwprune.gcp import _channel_costs

    space = make_space()
    cost = Staircase(space)
    cost.template = FlopsCost(space).template
    assert all(v < 0 for v in cost.marginal(space.full(), 1).values())  # one channel less is slower
    masks = _Masks(space.model, space)
    costs = _channel_costs(space, cost, masks)
    masks.remove()
    vals = np.array(list(costs.values()))
    assert np.all(np.isfinite(vals)) and np.all(vals > 0) and abs(vals.mean() - 1) < 1e-9
    assert vals.max() < 100  # not the 1e12 that zeroed every mask


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
    from hwprune.gcp import materialize

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
    from hwprune.gcp import _add_back_cost, correct_to_measured
    from hwprune.space import WidthConfig

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
