"""Evolutionary search of width configurations under a cost budget.

:func:`evolve` follows MetaPruning's search (``search.py``): a population of 50 width
configurations, the 10 best seen so far as parents, 25 mutations (each gene redrawn with
probability 0.1) and 25 crossovers (each gene from either parent) per generation, topped up
with fresh samples, for 20 generations, with a cache so that no configuration is evaluated
twice. It knows nothing of supernets: it takes a grid of allowed widths per channel group
(``grid.groups``, ``grid.choices(gid)``, ``grid.full()``, ``grid.narrowest()``), a
``cost_fn(widths)`` giving a configuration's cost as a fraction of the base model's (for
example :class:`CostFraction` of a latency objective), and a ``fitness_fn(widths)``, higher
is better (for example :class:`hwprune.search.fitness.ProxyFitness`).

The budget is a window ``(lo, hi)`` of cost fractions (default: within 5% under the target).
A candidate outside it is *repaired*, not redrawn: one group at a time is stepped to its next
narrower width (too expensive) or wider width (too cheap), the group whose step changes the
cost most favourably per channel, until the cost lies inside (:meth:`_Budget.repair`).

Prior-distributed sampling (PSE-Net): configurations that meet a tight budget are rare under
uniform sampling, so the initial population, the top-up samples and the mutated genes are drawn
from per-group width distributions (a ``prior`` with ``probs(gid)`` over ``grid.choices(gid)``,
such as the one a supernet learns while it trains), conditioned on the budget by rejection:
a few rounds of draws, then repair of what is still outside. ``prior="uniform"`` (or ``None``)
draws every allowed width alike, for comparison.

The :class:`SearchResult` records every generation's best and mean fitness, the share of the
first draws of the initial population that met the budget before any repair, the number of
cost-model calls and configurations costed, fitness evaluations, wall time, the settings and
the best candidates with their predicted cost. With ``state_path`` the search writes its state
after every generation and an interrupted search continues from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.pruning.space import WidthConfig

STATE_FORMAT = "hwprune.search-state/1"
DEFAULT_WINDOW = 0.05  # the budget window reaches this fraction of the target under it


@dataclass
class EvolutionConfig:
    """Settings of :func:`evolve` (MetaPruning's defaults)."""

    population: int = 50
    parents: int = 10  # the best candidates seen so far, from which children are bred
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1  # per gene
    generations: int = 20
    top_k: int = 10  # candidates the result keeps
    sample_tries: int = 10  # rounds of budget-conditioned draws (rejection) before repair
    max_seconds: float | None = None  # stop after the first generation that ends past this wall time

    def validate(self) -> None:
        for name in ("population", "parents", "generations", "top_k", "sample_tries"):
            if int(getattr(self, name)) < 1:
                raise HwpruneError(f"evolution setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("mutations", "crossovers"):
            if int(getattr(self, name)) < 0:
                raise HwpruneError(f"evolution setting {name} must not be negative, got {getattr(self, name)}")
        if self.mutations + self.crossovers > self.population:
            raise HwpruneError(f"{self.mutations} mutations and {self.crossovers} crossovers do not fit in a "
                               f"population of {self.population}", "lower them or raise the population")
        if not 0.0 < self.mutation_prob <= 1.0:
            raise HwpruneError(f"mutation probability must lie in (0, 1], got {self.mutation_prob}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise HwpruneError(f"the search's time limit must be positive, got {self.max_seconds} s")


@dataclass
class Candidate:
    """One evaluated width configuration."""

    widths: dict[str, int]
    fitness: float
    cost: float  # predicted cost, as a fraction of the base model's
    generation: int
    origin: str  # "initial", "mutation", "crossover" or "random"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    """What :func:`evolve` found, and how."""

    model: str
    candidates: list[Candidate]  # the best ``top_k``, best first, all inside the window
    generations: list[dict]
    initial_inside_share: float  # of the initial population's first draws, inside the window before repair
    predictor_calls: int  # calls of the cost model
    predicted_configs: int  # distinct configurations it costed
    fitness_evaluations: int
    seconds: float
    settings: dict
    repairs: dict = field(default_factory=dict)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def best_widths(self) -> WidthConfig:
        return WidthConfig(self.model, dict(self.best.widths))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        return d


def budget_window(target: float, window: tuple[float, float] | None = None) -> tuple[float, float]:
    """The budget window ``(lo, hi)`` of cost fractions: ``window`` checked, or the default
    ``(0.95 * target, target)``."""
    if not 0.0 < float(target) <= 1.0:
        raise HwpruneError(f"target must be a fraction in (0, 1], got {target}")
    lo, hi = (target * (1.0 - DEFAULT_WINDOW), target) if window is None else (float(w) for w in window)
    if not 0.0 <= lo < hi:
        raise HwpruneError(f"the budget window ({lo:.4g}, {hi:.4g}) is empty", "give (lo, hi) with lo < hi")
    if not lo <= target <= hi:
        raise HwpruneError(f"the budget window ({lo:.4g}, {hi:.4g}) does not contain the target {target:.4g}")
    return float(lo), float(hi)


class CostFraction:
    """``cost_fn`` for :func:`evolve` from a cost objective (:func:`hwprune.pruning.objectives.objective`):
    a configuration's cost as a fraction of the unpruned model's, many configurations per call."""

    def __init__(self, cost):
        self.cost = cost
        self.base = float(cost.total([cost.space.full()])[0])

    def __call__(self, widths: WidthConfig | Mapping[str, int]) -> float:
        return float(self.many([widths])[0])

    def many(self, configs: Sequence[WidthConfig | Mapping[str, int]]) -> np.ndarray:
        return np.asarray(self.cost.total(list(configs)), dtype=np.float64) / self.base


class _Genes:
    """Width configurations as tuples of choice indices, one per group of the grid."""

    def __init__(self, grid):
        self.gids = [str(g) for g in grid.groups]
        self.choices = [np.asarray(grid.choices(g), dtype=np.int64) for g in self.gids]
        if not self.gids or any(len(c) == 0 for c in self.choices):
            raise HwpruneError("the width grid has a group without allowed widths")
        self.model = grid.full().model
        self.sizes = np.array([len(c) for c in self.choices])

    def widths(self, genes: Sequence[int]) -> dict[str, int]:
        return {g: int(c[i]) for g, c, i in zip(self.gids, self.choices, genes)}

    def config(self, genes: Sequence[int]) -> WidthConfig:
        return WidthConfig(self.model, self.widths(genes))

    def genes(self, widths: WidthConfig | Mapping[str, int]) -> tuple[int, ...]:
        w = widths.widths if isinstance(widths, WidthConfig) else widths
        out = []
        for g, c in zip(self.gids, self.choices):
            hit = np.flatnonzero(c == int(w[g]))
            if not len(hit):
                raise HwpruneError(f"width {w[g]} of group '{g}' is not on the width grid ({', '.join(map(str, c))})")
            out.append(int(hit[0]))
        return tuple(out)

    def channels(self, genes: Sequence[int]) -> np.ndarray:
        return np.array([c[i] for c, i in zip(self.choices, genes)], dtype=np.float64)


class _Budget:
    """Costs of configurations (each costed once) and the window they must lie in."""

    def __init__(self, genes: _Genes, cost_fn: Callable, lo: float, hi: float):
        self.g, self.cost_fn, self.lo, self.hi = genes, cost_fn, lo, hi
        self.memo: dict[tuple[int, ...], float] = {}
        self.calls = 0
        self.repairs = {"attempted": 0, "inside": 0, "failed": 0, "steps": 0}

    def costs(self, many: Sequence[tuple[int, ...]]) -> np.ndarray:
        missing = list(dict.fromkeys(m for m in many if m not in self.memo))
        if missing:
            configs = [self.g.config(m) for m in missing]
            batch = getattr(self.cost_fn, "many", None)
            vals = batch(configs) if batch is not None else [self.cost_fn(c) for c in configs]
            self.calls += 1 if batch is not None else len(configs)
            self.memo.update(zip(missing, (float(v) for v in np.asarray(vals, dtype=np.float64))))
        return np.array([self.memo[m] for m in many])

    def inside(self, cost) -> np.ndarray | bool:
        eps = 1e-12
        return (np.asarray(cost) >= self.lo - eps) & (np.asarray(cost) <= self.hi + eps)

    def repair(self, many: Sequence[tuple[int, ...]]) -> list[tuple[int, ...] | None]:
        """Each configuration moved inside the window one group step at a time (None where no
        step gets it there). All of them step together, so that each step costs one call."""
        self.repairs["attempted"] += len(many)
        cur: list[tuple[int, ...] | None] = [tuple(int(x) for x in m) for m in many]
        done: list[tuple[int, ...] | None] = [None] * len(cur)
        for _ in range(int(self.g.sizes.sum()) + 1):
            live = [i for i, c in enumerate(cur) if c is not None]
            if not live:
                break
            costs = self.costs([cur[i] for i in live])
            moves = {}
            for i, c in zip(live, costs):
                if self.inside(c):
                    done[i], cur[i] = cur[i], None
                    continue
                moves[i] = self._moves(cur[i], narrower=c > self.hi)
            self.costs([m for ms in moves.values() for m in ms])  # every candidate's next steps, one call
            for i, ms in moves.items():
                cur[i] = self._step(cur[i], float(self.memo[cur[i]]), ms, narrower=self.memo[cur[i]] > self.hi)
                self.repairs["steps"] += cur[i] is not None
        self.repairs["inside"] += sum(d is not None for d in done)
        self.repairs["failed"] += sum(d is None for d in done)
        return done

    def _moves(self, genes: tuple[int, ...], narrower: bool) -> list[tuple[int, ...]]:
        d = -1 if narrower else 1
        return [genes[:i] + (genes[i] + d,) + genes[i + 1:] for i in range(len(genes))
                if 0 <= genes[i] + d < self.g.sizes[i]]

    def _step(self, genes: tuple[int, ...], cost: float, moves: list[tuple[int, ...]],
              narrower: bool) -> tuple[int, ...] | None:
        """The one-group step with the best cost change per channel: most cost saved per channel
        removed (narrower) or most channels gained per cost added (wider); a step that lands
        inside the window first, one that overshoots it last (never above it when widening)."""
        if not moves:
            return None
        mc = self.costs(moves)
        dw = np.array([abs(self.g.channels(m) - self.g.channels(genes)).sum() for m in moves])
        if narrower:
            useful = mc < cost
            gain = (cost - mc) / dw
            over = mc < self.lo
        else:
            useful = mc <= self.hi + 1e-12
            gain = dw / np.maximum(mc - cost, 1e-12)
            over = np.zeros(len(moves), dtype=bool)
        for pick in (useful & self.inside(mc), useful & ~over, useful):
            if pick.any():
                return moves[int(np.flatnonzero(pick)[np.argmax(gain[pick])])]
        return None


def check_budget(grid, cost_fn: Callable, target: float, window: tuple[float, float] | None = None) -> None:
    """One-line errors, before any search, when no configuration of ``grid`` can meet the budget
    window: the narrowest costs more than its top, or the widest less than its bottom."""
    _check_reachable(_Budget(_Genes(grid), cost_fn, *budget_window(target, window)), target)


def _check_reachable(budget: _Budget, target: float) -> None:
    c_narrow, c_wide = budget.costs([tuple(0 for _ in budget.g.gids), tuple(int(n) - 1 for n in budget.g.sizes)])
    if c_narrow > budget.hi:
        raise HwpruneError(f"target {target:.3f} is below what the narrowest configuration of the width grid "
                           f"costs ({c_narrow:.3f} of the base)", "choose a larger target or a finer grid")
    if c_wide < budget.lo:
        raise HwpruneError(f"the widest configuration of the width grid costs {c_wide:.3f} of the base, under "
                           f"the budget window ({budget.lo:.3f}, {budget.hi:.3f})")


def inside_share(grid, cost_fn: Callable, target: float, prior: Any = None, n: int = 1000, seed: int = 0,
                 window: tuple[float, float] | None = None) -> float:
    """The share of ``n`` configurations drawn from ``prior`` (see :func:`evolve`) whose cost lies
    in the budget window, before any repair."""
    genes = _Genes(grid)
    budget = _Budget(genes, cost_fn, *budget_window(target, window))
    draws = _Sampler(genes, prior).draw(np.random.default_rng(seed), int(n))
    return float(np.mean(budget.inside(budget.costs(draws))))


def repair(grid, cost_fn: Callable, widths: WidthConfig | Mapping[str, int], target: float,
           window: tuple[float, float] | None = None) -> WidthConfig | None:
    """``widths`` (on ``grid``) stepped group by group until its cost lies in the budget window
    (see :func:`budget_window`), or None where no sequence of single steps gets it there."""
    genes = _Genes(grid)
    fixed = _Budget(genes, cost_fn, *budget_window(target, window)).repair([genes.genes(widths)])[0]
    return None if fixed is None else genes.config(fixed)


class _Sampler:
    """Draws choice indices per group from a prior (``probs(gid)``) or uniformly."""

    def __init__(self, genes: _Genes, prior):
        self.g = genes
        if prior is None or (isinstance(prior, str) and prior == "uniform"):
            self.name, self.p = "uniform", [np.full(n, 1.0 / n) for n in genes.sizes]
            return
        if isinstance(prior, str):
            raise HwpruneError(f"unknown prior '{prior}'", "pass 'uniform' or a prior object with probs(group)")
        self.name = str(getattr(prior, "name", "learned"))
        self.p = [self._checked(gid, np.asarray(prior.probs(gid), dtype=np.float64), n)
                  for gid, n in zip(genes.gids, genes.sizes)]

    @staticmethod
    def _checked(gid: str, p: np.ndarray, n: int) -> np.ndarray:
        if p.shape != (n,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise HwpruneError(f"the prior of group '{gid}' is not a distribution over its {n} allowed widths")
        return p / p.sum()

    def draw(self, rng: np.random.Generator, n: int) -> list[tuple[int, ...]]:
        cols = [rng.choice(len(p), size=n, p=p) for p in self.p]
        return [tuple(int(c[k]) for c in cols) for k in range(n)]

    def redraw(self, rng: np.random.Generator, genes: tuple[int, ...], mask: np.ndarray) -> tuple[int, ...]:
        return tuple(int(rng.choice(len(p), p=p)) if m else int(x) for x, p, m in zip(genes, self.p, mask))


def evolve(grid, cost_fn: Callable, fitness_fn: Callable, target: float, *,
           window: tuple[float, float] | None = None, prior: Any = None, config: EvolutionConfig | None = None,
           rng: np.random.Generator | None = None, seed: int = 0, progress: Callable | None = None,
           state_path: str | Path | None = None) -> SearchResult:
    """The fittest width configurations of ``grid`` whose ``cost_fn`` lies in the budget window.

    ``target``: the cost fraction to meet; ``window``: the cost fractions accepted (default
    :func:`budget_window`); ``prior``: ``None``/``"uniform"`` or an object whose ``probs(gid)`` gives
    a distribution over ``grid.choices(gid)``; ``progress(description, done, total)`` is called
    after every fitness evaluation; ``state_path``: a JSON file the search keeps its state in
    after every generation and resumes from.
    """
    cfg = config or EvolutionConfig()
    cfg.validate()
    lo, hi = budget_window(target, window)
    genes = _Genes(grid)
    search = _Evolution(genes, _Budget(genes, cost_fn, lo, hi), _Sampler(genes, prior), fitness_fn, cfg,
                        rng if rng is not None else np.random.default_rng(seed), progress)
    _check_reachable(search.budget, target)
    search.settings = {**asdict(cfg), "target": float(target), "window": [lo, hi], "prior": search.sampler.name,
                       "seed": seed if rng is None else None}
    return search.run(Path(state_path) if state_path is not None else None)


class _Evolution:
    """The state of one search: every evaluated candidate, the history, the counters."""

    def __init__(self, genes, budget, sampler, fitness_fn, cfg, rng, progress):
        self.g, self.budget, self.sampler, self.fitness_fn, self.cfg = genes, budget, sampler, fitness_fn, cfg
        self.rng, self.progress = rng, progress
        self.archive: dict[tuple[int, ...], Candidate] = {}
        self.history: list[dict] = []
        self.inside_share = float("nan")
        self.settings: dict = {}
        self.seconds_before = 0.0

    # -- the loop ----------------------------------------------------------------------
    def run(self, state_path: Path | None) -> SearchResult:
        t0 = time.perf_counter()
        start, population = self._resume(state_path)
        if population is None:
            population = self._initial()
        total = self.cfg.generations * self.cfg.population
        for gen in range(start, self.cfg.generations):
            self._evaluate(population, gen, total)
            last = gen + 1 == self.cfg.generations
            over = self.cfg.max_seconds is not None and \
                self.seconds_before + time.perf_counter() - t0 >= self.cfg.max_seconds
            population = [] if last or over else self._offspring(self._ranked()[: self.cfg.parents])
            if state_path is not None:
                self._save(state_path, population, self.seconds_before + time.perf_counter() - t0)
            if over:
                break
        if not self.archive:
            raise HwpruneError(f"no width configuration could be brought inside the budget window "
                               f"({self.budget.lo:.3f}, {self.budget.hi:.3f})", "widen the window or refine the grid")
        return self._result(self.seconds_before + time.perf_counter() - t0)

    def _ranked(self) -> list[Candidate]:
        return sorted(self.archive.values(), key=lambda c: (-c.fitness, c.cost))

    def _evaluate(self, population: list[tuple[tuple[int, ...], str]], gen: int, total: int) -> None:
        t0 = time.perf_counter()
        scores = []
        for genes, origin in population:
            if genes in self.archive:  # the cache: never evaluated twice
                continue
            widths = self.g.config(genes)
            fit = float(self.fitness_fn(widths))
            cand = Candidate(widths.widths, fit, float(self.budget.costs([genes])[0]), gen, origin)
            self.archive[genes] = cand
            scores.append(fit)
            if self.progress is not None:
                self.progress(f"generation {gen + 1}/{self.cfg.generations}", min(len(self.archive), total), total)
        best = self._ranked()[0] if self.archive else None
        self.history.append({
            "generation": gen, "evaluated": len(scores), "best": max(scores) if scores else None,
            "mean": float(np.mean(scores)) if scores else None, "best_so_far": best.fitness if best else None,
            "origins": {o: sum(1 for _, x in population if x == o) for o in dict.fromkeys(x for _, x in population)},
            "seconds": time.perf_counter() - t0})

    # -- new candidates ----------------------------------------------------------------
    def _initial(self) -> list[tuple[tuple[int, ...], str]]:
        return self._sample(self.cfg.population, set(), "initial", record=True)

    def _offspring(self, parents: list[Candidate]) -> list[tuple[tuple[int, ...], str]]:
        seen = set(self.archive)
        pool = [self.g.genes(p.widths) for p in parents]
        kids = self._fill(self.cfg.mutations, lambda k: self._mutants(pool, k, seen), "mutation", seen)
        if len(pool) > 1:
            kids += self._fill(self.cfg.crossovers, lambda k: self._crosses(pool, k), "crossover", seen)
        return kids + self._sample(self.cfg.population - len(kids), seen, "random")

    def _admit(self, children: list[tuple[int, ...]], seen: set) -> list[tuple[int, ...]]:
        """``children`` inside the window (those outside repaired, all together) that are new."""
        inside = self.budget.inside(self.budget.costs(children))
        out_ = [c for c, ok in zip(children, inside) if not ok]
        fixed = iter(self.budget.repair(out_) if out_ else [])
        out = []
        for c, ok in zip(children, inside):
            c = c if ok else next(fixed)
            if c is not None and c not in seen:
                seen.add(c)
                out.append(c)
        return out

    def _fill(self, n: int, make: Callable[[int], list], origin: str, seen: set) -> list[tuple[tuple[int, ...], str]]:
        """Up to ``n`` new children from ``make(k)`` (k children per call), a few rounds at most."""
        out: list[tuple[int, ...]] = []
        for _ in range(10):
            if len(out) >= n:
                break
            out += self._admit(make(n - len(out)), seen)[: n - len(out)]
        return [(c, origin) for c in out]

    def _mutants(self, pool: list[tuple[int, ...]], k: int, seen: set) -> list[tuple[int, ...]]:
        """``k`` children of random parents with each gene redrawn from the prior with
        ``mutation_prob``: of ``sample_tries`` such children of one parent, the first new one
        inside the window (else the first new one, to be repaired)."""
        slots = []
        for _ in range(k):
            parent = pool[int(self.rng.integers(len(pool)))]
            tries = []
            for _ in range(self.cfg.sample_tries):
                mask = self.rng.random(len(parent)) < self.cfg.mutation_prob
                if not mask.any():
                    mask[int(self.rng.integers(len(parent)))] = True
                tries.append(self.sampler.redraw(self.rng, parent, mask))
            slots.append([t for t in tries if t not in seen] or tries)
        inside = iter(self.budget.inside(self.budget.costs([t for ts in slots for t in ts])))
        out = []
        for ts in slots:
            ok = [bool(next(inside)) for _ in ts]
            out.append(ts[ok.index(True)] if True in ok else ts[0])
        return out

    def _crosses(self, pool: list[tuple[int, ...]], k: int) -> list[tuple[int, ...]]:
        """``k`` children taking each gene from either of two random parents."""
        out = []
        for _ in range(k):
            i, j = self.rng.choice(len(pool), size=2, replace=False)
            mask = self.rng.random(len(pool[i])) < 0.5
            out.append(tuple(a if m else b for a, b, m in zip(pool[i], pool[j], mask)))
        return out

    def _sample(self, n: int, seen: set, origin: str, record: bool = False) -> list[tuple[tuple[int, ...], str]]:
        """``n`` new configurations drawn from the prior and conditioned on the window: rounds of
        draws keep those inside it; the last round's other draws are repaired."""
        out: list[tuple[int, ...]] = []
        left: list[tuple[int, ...]] = []
        for t in range(self.cfg.sample_tries):
            if len(out) >= n:
                break
            draws = self.sampler.draw(self.rng, n - len(out))
            inside = self.budget.inside(self.budget.costs(draws))
            if record and t == 0:
                self.inside_share = float(np.mean(inside))
            left = [d for d, ok in zip(draws, inside) if not ok]
            for d in (d for d, ok in zip(draws, inside) if ok and d not in seen):
                seen.add(d)
                out.append(d)
        if len(out) < n and left:
            out += self._admit(left[: n - len(out)], seen)
        return [(d, origin) for d in out]

    # -- results and state -------------------------------------------------------------
    def _result(self, seconds: float) -> SearchResult:
        top = self._ranked()[: self.cfg.top_k]
        return SearchResult(self.g.model, top, self.history, self.inside_share, self.budget.calls,
                            len(self.budget.memo), len(self.archive), seconds, dict(self.settings),
                            dict(self.budget.repairs))

    def _key(self) -> dict:
        keep = {k: v for k, v in self.settings.items() if k not in ("generations", "max_seconds")}
        return {"settings": keep, "grid": {g: c.tolist() for g, c in zip(self.g.gids, self.g.choices)}}

    def _save(self, path: Path, population: list, seconds: float) -> None:
        from hwprune.atomic import atomic_write_text

        state = {"format": STATE_FORMAT, **self._key(), "history": self.history, "inside_share": self.inside_share,
                 "archive": [[list(k), c.to_dict()] for k, c in self.archive.items()],
                 "costs": [[list(k), v] for k, v in self.budget.memo.items()],
                 "population": [[list(k), o] for k, o in population], "rng": self.rng.bit_generator.state,
                 "calls": self.budget.calls, "repairs": self.budget.repairs, "seconds": seconds}
        atomic_write_text(path, json.dumps(state))

    def _resume(self, path: Path | None) -> tuple[int, list | None]:
        """(first generation to run, its population) from the state at ``path``, or (0, None)."""
        if path is None or not path.is_file():
            return 0, None
        from hwprune.atomic import read_json

        state = read_json(path, "search state")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise HwpruneError(f"'{path}' is not the state of a search", "remove it or choose another state file")
        if {"settings": state.get("settings"), "grid": state.get("grid")} != json.loads(json.dumps(self._key())):
            raise HwpruneError(f"the search state '{path}' is of a search with other settings or another grid",
                               "remove it to start again")
        self.history, self.inside_share = state["history"], state["inside_share"]
        self.archive = {tuple(k): Candidate(**c) for k, c in state["archive"]}
        self.budget.memo.update({tuple(k): float(v) for k, v in state["costs"]})
        self.budget.calls, self.budget.repairs = state["calls"], state["repairs"]
        self.rng.bit_generator.state = state["rng"]
        self.seconds_before = float(state["seconds"])
        population = [(tuple(k), o) for k, o in state["population"]]
        start = len(self.history)
        if not population and start < self.cfg.generations:  # stopped early: breed the next generation now
            population = self._offspring(self._ranked()[: self.cfg.parents])
        return start, population
