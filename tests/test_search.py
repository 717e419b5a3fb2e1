"""Evolutionary search under a cost budget, its proxy fitness, the `search` method and command."""

import json

import numpy as np
import pytest

from hwprune.errors import HwpruneError
from hwprune.pruning.objectives import objective
from hwprune.pruning.space import PruningSpace, WidthConfig
from hwprune.search.evolution import CostFraction, EvolutionConfig, budget_window, evolve, repair

FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class FakeGrid:
    """The width grid's interface: per group the widths at ``FRACTIONS`` of its channels."""

    def __init__(self, space: PruningSpace):
        self.space = space
        self._choices = {g.id: sorted({g.round_width(g.channels * f) for f in FRACTIONS}) for g in space.groups}
        self.groups = list(self._choices)

    def choices(self, gid):
        return self._choices[gid]

    def full(self):
        return WidthConfig(self.space.name, {g: c[-1] for g, c in self._choices.items()})

    def narrowest(self):
        return WidthConfig(self.space.name, {g: c[0] for g, c in self._choices.items()})


class NarrowPrior:
    """A prior that puts most of its mass on a group's narrowest widths."""

    def __init__(self, grid, decay=1.0):
        self.grid, self.decay = grid, decay

    def probs(self, gid):
        p = np.exp(-self.decay * np.arange(len(self.grid.choices(gid))))
        return p / p.sum()


@pytest.fixture(scope="module")
def space():
    return PruningSpace.from_name("cifar_resnet20")


@pytest.fixture(scope="module")
def grid(space):
    return FakeGrid(space)


@pytest.fixture(scope="module")
def flops(space):
    return CostFraction(objective("flops", space))


def weighted_width(space):
    """A synthetic fitness: the kept fractions of the groups, weighted."""
    weights = np.random.default_rng(3).random(len(space.groups))

    def fitness(widths):
        return float(sum(w * widths.widths[g.id] / g.channels for w, g in zip(weights, space.groups)))

    return fitness


SMALL = EvolutionConfig(population=16, parents=4, mutations=6, crossovers=6, generations=4, top_k=5)


def test_every_returned_candidate_lies_inside_the_budget(grid, flops, space):
    res = evolve(grid, flops, weighted_width(space), 0.5, config=SMALL, seed=0)
    lo, hi = res.settings["window"]
    assert (lo, hi) == pytest.approx((0.475, 0.5))
    assert len(res.candidates) == 5
    for c in res.candidates:
        assert lo <= c.cost <= hi and c.cost == pytest.approx(objective("flops", space).fraction(c.widths))
    assert [c.fitness for c in res.candidates] == sorted((c.fitness for c in res.candidates), reverse=True)
    assert res.best_widths().model == space.name and res.repairs["attempted"] > 0
    wide = evolve(grid, flops, weighted_width(space), 0.5, window=(0.3, 0.6), config=SMALL, seed=0)
    assert all(0.3 <= c.cost <= 0.6 for c in wide.candidates) and wide.settings["window"] == [0.3, 0.6]


def test_repair_moves_a_candidate_into_the_window_from_either_side(grid, flops):
    fixed = repair(grid, flops, grid.full(), 0.4)
    assert fixed is not None and 0.38 <= flops(fixed) <= 0.4
    assert all(w in grid.choices(g) for g, w in fixed.widths.items())
    up = repair(grid, flops, grid.narrowest(), 0.8, window=(0.7, 0.8))
    assert up is not None and 0.7 <= flops(up) <= 0.8
    inside = WidthConfig(grid.space.name, dict(fixed.widths))
    assert repair(grid, flops, inside, 0.4).widths == inside.widths  # already inside: unchanged
    assert repair(grid, flops, grid.full(), 0.4, window=(0.39999, 0.4)) is None  # no step lands in so thin a window


def test_the_cache_evaluates_no_candidate_twice_and_a_resumed_search_continues(grid, flops, space, tmp_path):
    seen, fit = [], weighted_width(space)

    def counted(widths):
        seen.append(tuple(sorted(widths.widths.items())))
        return fit(widths)

    state = tmp_path / "state.json"
    first = evolve(grid, flops, counted, 0.5, config=SMALL, seed=1, state_path=state)
    assert len(seen) == len(set(seen)) == first.fitness_evaluations
    assert first.predicted_configs >= first.fitness_evaluations and first.predictor_calls > 0
    more = EvolutionConfig(**{**SMALL.__dict__, "generations": 6})
    again = evolve(grid, flops, counted, 0.5, config=more, seed=1, state_path=state)
    assert len(again.generations) == 6 and len(seen) == len(set(seen)) == again.fitness_evaluations
    assert again.best.fitness >= first.best.fitness
    with pytest.raises(HwpruneError, match="other settings"):
        evolve(grid, flops, counted, 0.4, config=more, seed=1, state_path=state)
    timed = EvolutionConfig(**{**SMALL.__dict__, "max_seconds": 1e-6})
    stopped = evolve(grid, flops, counted, 0.45, config=timed, seed=1)
    assert len(stopped.generations) == 1  # the time limit ends the search after its first generation


def test_the_prior_puts_more_draws_inside_a_tight_budget_than_uniform_sampling(grid, flops, space):
    cfg = EvolutionConfig(population=100, parents=2, mutations=0, crossovers=0, generations=1)
    fit = weighted_width(space)
    learned = evolve(grid, flops, fit, 0.1, prior=NarrowPrior(grid), config=cfg, seed=0)
    uniform = evolve(grid, flops, fit, 0.1, prior="uniform", config=cfg, seed=0)
    assert learned.settings["prior"] == "learned" and uniform.settings["prior"] == "uniform"
    assert learned.initial_inside_share >= 0.04 and learned.initial_inside_share > uniform.initial_inside_share + 0.03
    assert all(0.095 <= c.cost <= 0.1 for r in (learned, uniform) for c in r.candidates)


def test_a_synthetic_fitness_improves_over_the_generations(grid, flops, space):
    cfg = EvolutionConfig(population=20, parents=5, mutations=8, crossovers=8, generations=8)
    res = evolve(grid, flops, weighted_width(space), 0.5, config=cfg, seed=2)
    so_far = [h["best_so_far"] for h in res.generations]
    assert so_far == sorted(so_far) and so_far[-1] > res.generations[0]["best"]
    assert res.generations[-1]["mean"] > res.generations[0]["mean"]
    assert {"mutation", "crossover"} <= set(res.generations[1]["origins"])


def test_bad_input_is_refused_in_one_line(grid, flops, space):
    fit = weighted_width(space)
    with pytest.raises(HwpruneError, match="below what the narrowest configuration"):
        evolve(grid, flops, fit, 0.03, config=SMALL)
    with pytest.raises(HwpruneError, match="does not contain the target"):
        evolve(grid, flops, fit, 0.5, window=(0.2, 0.3), config=SMALL)
    with pytest.raises(HwpruneError, match="target must be a fraction"):
        budget_window(1.5)
    with pytest.raises(HwpruneError, match="do not fit in a population"):
        evolve(grid, flops, fit, 0.5, config=EvolutionConfig(population=10))
    with pytest.raises(HwpruneError, match="unknown prior 'learnt'"):
        evolve(grid, flops, fit, 0.5, prior="learnt", config=SMALL)

    class Short:
        def probs(self, gid):
            return np.ones(2)

    with pytest.raises(HwpruneError, match="not a distribution over its 7 allowed widths"):
        evolve(grid, flops, fit, 0.5, prior=Short(), config=SMALL)


# ----------------------------------------------------------------------------- with a supernet


class MacsPredictor:
    """A latency predictor of one model that needs no table: 0.05 ms plus 4 ns per MAC."""

    def __init__(self, model="cifar_resnet20"):
        self.models_ = {model: None}
        self.settings_ = {"backend": "onnxruntime", "batch": 1, "threads": 1, "device": "cpu"}
        self._macs = objective("flops", PruningSpace.from_name(model))

    def check_model(self, model):
        if model not in self.models_:
            raise HwpruneError(f"the table never covered model '{model}'")

    def predict(self, model, configs):
        self.check_model(model)
        return 0.05 + 4e-9 * self._macs.total(configs)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Colour-coded synthetic 32x32 images: 10 classes, 24 training and 4 test images each."""
    from hwprune.training.data import ImageDataset, save_npz_sample

    root, rng = tmp_path_factory.mktemp("data"), np.random.default_rng(0)
    colours = rng.integers(30, 225, (10, 1, 1, 3))
    for split, per_class in (("train", 24), ("test", 4)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.clip(colours[labels] + rng.integers(-30, 30, (len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
        ds = ImageDataset(images, labels, [f"class{i}" for i in range(10)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        save_npz_sample(ds, root / f"{split}.npz", per_class=per_class)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import torch

    from hwprune.models import create_model
    from hwprune.training.checkpoint import Checkpoint

    torch.manual_seed(0)
    return Checkpoint.from_model(create_model("cifar_resnet20"), meta={}).save(
        tmp_path_factory.mktemp("base") / "base.pt")


TINY_SUPERNET = {"supernet_epochs": 1, "supernet_max_iters": 2, "supernet_batch_size": 32, "supernet_holdout": 4,
                 "supernet_fractions": [0.5, 0.75, 1.0], "supernet_threads": 1}
TINY_SEARCH = {"generations": 2, "population": 6, "parents": 2, "mutations": 2, "crossovers": 2, "bn_batches": 2,
               "bn_batch_size": 16}


@pytest.fixture(scope="module")
def supernet(base, tiny_data, tmp_path_factory):
    from hwprune.search.method import supernet_settings
    from hwprune.search.supernet_training import train_supernet

    path = tmp_path_factory.mktemp("supernet") / "sn.pt"
    train_supernet(base, tiny_data, supernet_settings(TINY_SUPERNET), path, progress=False)
    return path


def tiny_options(**kw):
    from hwprune.search.supernet_search import SearchOptions

    cfg = EvolutionConfig(**{k: v for k, v in TINY_SEARCH.items() if k in EvolutionConfig.__dataclass_fields__})
    return SearchOptions(config=cfg, bn_batches=2, bn_batch_size=16, **kw)


def test_proxy_fitness_scores_on_the_recorded_held_out_split_the_same_way_every_time(supernet, tiny_data):
    from hwprune.search.fitness import ProxyFitness
    from hwprune.search.supernet import Supernet

    sn = Supernet.load(supernet)
    fit = ProxyFitness(sn, tiny_data, n_batches=2, batch_size=16)
    assert fit.held_out_images == sn.meta["holdout"]["size"] == 40  # 4 per class, never trained on
    narrow = fit(sn.grid.narrowest())
    assert 0.0 <= narrow <= 100.0 and fit(sn.grid.full()) >= 0.0 and fit(sn.grid.narrowest()) == narrow
    assert fit.evaluations == 3 and fit.info()["bn_batches"] == 2


def test_find_measures_the_best_candidates_and_keeps_the_fittest_that_meets_the_target(
        supernet, tiny_data, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from conftest import params_ms, script_the_meter
    from hwprune.pruning.target import DeviceOptions
    from hwprune.search.supernet import Supernet
    from hwprune.search.supernet_search import find

    script_the_meter(monkeypatch)
    found = find(supernet, "latency", 0.6, predictor=MacsPredictor(), data=tiny_data, options=tiny_options(),
                 device=DeviceOptions(patience_s=0))
    sn = Supernet.load(supernet)
    base_ms = params_ms(SimpleNamespace(module=sn.plain_model()))
    assert found.meta["base_measured_ms"] == pytest.approx(base_ms) and len(found.candidates) == 3
    for c in found.candidates:
        ratio = params_ms(SimpleNamespace(module=sn.extract(c["widths"]))) / base_ms
        assert c["measured_ratio"] == pytest.approx(ratio) and c["meets"] == (ratio <= 0.6)
        assert 0.57 <= c["predicted_fraction"] <= 0.6 and c["predicted_ms"] > 0
    win = found.meta["winner"]
    meeting = [i for i, c in enumerate(found.candidates) if c["meets"]]
    assert win == (meeting[0] if meeting else min(range(3), key=lambda i: found.candidates[i]["measured_ratio"]))
    assert found.widths.widths == found.candidates[win]["widths"]
    saved = WidthConfig.load(found.save(tmp_path / "found.json"))  # the result file is also a width file
    assert saved.widths == found.widths.widths and saved.model == "cifar_resnet20"
    assert len(json.loads((tmp_path / "found.json").read_text())["generations"]) == 2


def test_search_command_writes_its_result_and_refuses_bad_input_in_one_line(supernet, tiny_data, base, tmp_path):
    from conftest import run_cli_here

    out = tmp_path / "found.json"
    args = ["search", "--supernet", str(supernet), "--objective", "flops", "--data", str(tiny_data), "--out",
            str(out), "--generations", "2", "--population", "6", "--parents", "2", "--mutations", "2",
            "--crossovers", "2", "--bn-batches", "1", "--prior", "uniform"]
    r = run_cli_here(*args, "--target", "0.5", "--json", "--no-measure")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["prior"] == "uniform" and len(doc["generations"]) == 2 and doc["fitness_evaluations"] <= 12
    assert json.loads(out.read_text())["widths"] == doc["widths"] and 0.475 <= doc["candidates"][0][
        "predicted_fraction"] <= 0.5
    out.unlink()
    from hwprune.models import create_model
    from hwprune.training.checkpoint import Checkpoint

    other = Checkpoint.from_model(create_model("cifar_resnet56"), meta={}).save(tmp_path / "r56.pt")
    for extra, msg in ((["--target", "0.05"], "below what the narrowest configuration"),
                       (["--target", "0.5", "--checkpoint", str(other)], "is a supernet of cifar_resnet20, not of "
                                                                         "cifar_resnet56"),
                       (["--target", "0.5", "--objective", "latency"], "needs a latency table"),
                       (["--target", "0.5", "--prior", "bayes"], "unknown prior 'bayes'")):
        r = run_cli_here(*args, *extra)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not out.exists()
    from hwprune.search.supernet_search import find

    with pytest.raises(HwpruneError, match="the predictor is for cifar_resnet56, not for the supernet's "
                                           "cifar_resnet20"):
        find(supernet, "latency", 0.5, predictor=MacsPredictor("cifar_resnet56"), data=tiny_data)
    with pytest.raises(HwpruneError, match="needs --data"):
        find(supernet, "flops", 0.5)


def test_the_search_method_is_listed_and_refuses_bad_settings_before_any_work(base, tmp_path):
    from conftest import run_cli_here
    from hwprune.pruning.methods import get_method
    from hwprune.pruning.target import prune_to_target

    r = run_cli_here("methods", "--json")
    assert r.returncode == 0 and "search" in {m["name"] for m in json.loads(r.stdout)}
    method = get_method("search")
    method.validate({"steps": 4, "recover": "all", "generations": 3})  # other methods' settings pass through
    for bad, msg in (({"generation": 3}, "unknown search setting 'generation'"),
                     ({"prior": "bayes"}, "unknown prior 'bayes'"),
                     ({"population": 4}, "do not fit in a population of 4"),
                     ({"generations": "many"}, "generations must be int"),
                     ({"supernet": str(tmp_path / "missing.pt")}, "does not exist"),
                     ({"mode": "zigzag"}, "unknown supernet training mode 'zigzag'"),
                     ({"supernet_epochz": 3}, "unknown supernet setting 'epochz'"),
                     ({"window": 1.5}, "window's width must lie in"),
                     ({"supernet": __file__, "supernet_epochs": 3}, "supernet_epochs is a supernet training")):
        with pytest.raises(HwpruneError, match=msg):
            method.validate(bad)
    with pytest.raises(HwpruneError, match="needs --data"):
        prune_to_target(base, "search", "flops", 0.5, options={"generations": 2})
    r = run_cli_here("prune", "--checkpoint", str(base), "--method", "search", "--target", "0.5", "--option",
                     "prior=bayes", "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "unknown prior 'bayes'" in r.stderr and not (tmp_path / "x.pt").exists()


def test_prune_with_search_trains_a_supernet_and_meets_the_cost_goal(base, tiny_data, tmp_path):
    from hwprune.pruning.target import prune_to_target
    from hwprune.training.checkpoint import Checkpoint

    res = prune_to_target(base, "search", "flops", 0.5, data=tiny_data,
                          options={**TINY_SUPERNET, **TINY_SEARCH, "supernet_out": str(tmp_path / "sn.pt")})
    meta = res.checkpoint.meta
    assert 0.475 <= res.cost_fraction <= 0.5 and (tmp_path / "sn.pt").is_file()
    assert meta["method_epochs"] == meta["supernet_epochs"] == 1 and meta["supernet_trained"] is True
    assert len(meta["search_history"]) == 2 and meta["search_widths"] == res.widths.widths
    grid = json.loads(json.dumps(meta["search_settings"]))["window"]
    assert grid == pytest.approx([0.475, 0.5])
    again = Checkpoint.load(res.save(tmp_path / "pruned.pt")).build_model().module
    import torch

    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(again(x), res.model.eval()(x), atol=1e-5) and "accuracy" in meta


def test_prune_with_search_reuses_a_supernet_and_meets_a_measured_target(base, supernet, tiny_data, monkeypatch):
    from types import SimpleNamespace

    from conftest import params_ms, script_the_meter
    from hwprune.pruning.methods import get_method
    from hwprune.pruning.target import DeviceOptions, prune_to_target
    from hwprune.search.supernet import Supernet

    script_the_meter(monkeypatch)
    res = prune_to_target(base, "search", "latency", 0.6, predictor=MacsPredictor(), data=tiny_data,
                          options={"supernet": str(supernet), **TINY_SEARCH}, device=DeviceOptions(patience_s=0))
    meta = res.checkpoint.meta
    base_ms = params_ms(SimpleNamespace(module=Supernet.load(supernet).plain_model()))
    assert meta["measured_ms"] / base_ms <= 0.6 and meta["supernet_trained"] is False
    assert meta["measured_ms"] == pytest.approx(params_ms(SimpleNamespace(module=res.model)))
    sn = Supernet.load(supernet)
    assert sn.grid.contains(meta["method_widths"])  # the search's own choice lies on the supernet's grid
    for gid, kept in res.keep.items():  # the correction removed and restored channels in supernet order
        assert kept == list(range(len(kept)))
    assert get_method("search").needs_data
