"""The LSTM-guided pruning loop: children, rewards, beam, cache, budget and resumable state.

One **step** starts from the networks in the beam (at first, the unpruned model). In each
**round** the controller samples ``children`` actions, spread over the beam's networks; each
action selects groups, and its child is that network after one pruning step
(:mod:`hwprune.pruning.lstm.step`: the selected groups lose ``share`` of their channels, the
next layers' energy is restored, a short distillation recovers it). A child is scored by

    R = A / A0 - cost_weight * max(0, c - g) / (1 - g)

with ``A`` its accuracy on the held-out split of the training set, ``A0`` the unpruned model's,
``c`` its cost fraction under the objective (predicted latency for ``latency``, FLOPs for
``flops``) and ``g`` the goal: accuracy traded against the way still left to the goal. A child
that makes no progress (no selected group can lose a channel) gets the floor reward
``-(1 + cost_weight)``, below every feasible child's. After each round the controller takes
one REINFORCE step on the round's rewards. A step ends when a round brings no better reward
than the step's earlier rounds (``patience`` rounds in a row), or after ``rounds`` rounds; the
``beam`` best children (by reward) become the next step's networks. A child that would pass
the goal removes its channels, least important first, only until the goal is met; the search
ends when a network in the beam meets the goal (the most accurate one is returned).

Children are cached by their parent's and their own widths: a repeated action costs no
training. The wall-time budget (``budget_minutes``) counts everything since the first start; when
what is left is less than a round and one more child, one **finishing** step prunes the best
network straight to the goal (the controller's most probable groups first, then the others,
down to ``min_keep``), so that the goal is always met; the budget is exceeded by that child at most.

The state (beam weights, controller and optimiser, baseline, sampler, cache, log, time spent) is
written atomically to ``<work_dir>/state.pt`` after every step, the step log to
``<work_dir>/log.json``; a run started again with the same work dir continues from its last step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from hwprune.errors import HwpruneError
from hwprune.pruning.lstm.controller import Controller, RandomController, Reinforce
from hwprune.pruning.lstm.step import (Batches, Net, Recovery, Surgeon, accuracy, child_of, make_child, plan_removal,
                                       recover)
from hwprune.pruning.lstm.tokens import N_FEATURES, encode, min_width, next_layers
from hwprune.pruning.objectives import _Base as CostBase
from hwprune.pruning.space import PruningSpace

FORMAT = "hwprune.lstm-state/1"
CONTROLLERS = {"lstm": Controller, "random": RandomController}
PRECISIONS = ("auto", "bf16", "fp32")
#: Settings of other methods that ``hwprune prune`` passes to every method; the LSTM method ignores them.
SHARED_OPTIONS = ("steps", "iters", "recover", "supernet")


@dataclass
class LSTMConfig:
    """Settings of the LSTM-guided search (``--option KEY=VALUE``; see docs/lstm.md)."""

    goal: float = 0.5  # cost fraction to reach
    share: float = 0.2  # of a selected group's current channels removed per step
    children: int = 4  # per round
    beam: int = 2  # networks kept between steps
    rounds: int = 3  # controller rounds per step at most
    patience: int = 1  # rounds without a better reward that end a step
    recovery_iters: int = 60  # SGD steps of a child's recovery
    recovery_lr: float = 0.01
    batch_size: int = 128  # of the recovery steps (at most the training loader's 128)
    cost_weight: float = 0.5  # the reward's cost term
    controller: str = "lstm"  # or "random": a fixed 0.5 policy, the control
    controller_lr: float = 3e-3
    baseline_decay: float = 0.8
    hidden: int = 100
    lstm_layers: int = 2
    budget_minutes: float = 60.0
    min_keep: float = 0.2
    seed: int = 0
    precision: str = "auto"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "share": (lambda v: _num(v) and 0 < v < 1, "a fraction in (0, 1)"),
    "children": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "beam": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "rounds": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "patience": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "recovery_iters": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "recovery_lr": (lambda v: _num(v) and v > 0, "a positive number"),
    "batch_size": (lambda v: _int(v) and 1 <= v <= 128, "an integer from 1 to 128"),
    "cost_weight": (lambda v: _num(v) and v >= 0, "a non-negative number"),
    "controller": (lambda v: v in CONTROLLERS, f"one of {', '.join(CONTROLLERS)}"),
    "controller_lr": (lambda v: _num(v) and v > 0, "a positive number"),
    "baseline_decay": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "hidden": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "lstm_layers": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "budget_minutes": (lambda v: _num(v) and v > 0, "a positive number of minutes"),
    "seed": (_int, "an integer"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "work_dir": (lambda v: isinstance(v, str) and bool(v.strip()), "a directory path"),
}


def config_from_options(options: Mapping[str, Any], goal: float = 0.5, min_keep: float = 0.2) -> LSTMConfig:
    """An :class:`LSTMConfig` from ``--option`` settings; a one-line error for an unknown or bad one."""
    values = {}
    for key, v in options.items():
        if key in SHARED_OPTIONS or (key == "budget_minutes" and v is None):
            continue
        if key not in _RULES:
            raise HwpruneError(f"unknown lstm option '{key}'", f"valid options: {', '.join(_RULES)}")
        ok, what = _RULES[key]
        if not ok(v):
            raise HwpruneError(f"lstm option {key}={v!r} must be {what}")
        if key != "work_dir":
            values[key] = float(v) if key in ("share", "recovery_lr", "cost_weight", "controller_lr",
                                              "baseline_decay", "budget_minutes") else v
    return LSTMConfig(goal=float(goal), min_keep=float(min_keep), **values)


def reward(acc: float, base_acc: float, cost: float, goal: float, weight: float) -> float:
    """``A / A0 - weight * max(0, c - g) / (1 - g)`` (the module docstring)."""
    return acc / max(base_acc, 1e-2) - weight * max(0.0, cost - goal) / max(1.0 - goal, 1e-6)


def floor_reward(weight: float) -> float:
    return -(1.0 + weight)


def check_goal(space: PruningSpace, cost: CostBase, goal: float, min_keep: float) -> None:
    """A one-line error when even every group at its ``min_keep`` width costs more than ``goal``."""
    narrowest = {g.id: min_width(g, min_keep) for g in space.groups}
    least = cost.fraction(narrowest)
    if goal < least - 1e-12:
        raise HwpruneError(f"the goal {goal:.3f} of the base {cost.name} is below what the narrowest network reaches "
                           f"({least:.3f} with every group at {min_keep:g} of its channels)",
                           "choose a larger target or a smaller --min-keep")


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_identity(space: PruningSpace, model: nn.Module, cost: CostBase, cfg: LSTMConfig) -> dict:
    """What a saved state must share with a run to be resumed by it (the goal may differ)."""
    return {"format": FORMAT, "arch": space.name, "weights": weights_digest(model),
            "cost": f"{cost.name}:{float(cost.total([space.full()])[0]):.9g}", "groups": [g.id for g in space.groups],
            "share": cfg.share, "min_keep": cfg.min_keep, "controller": cfg.controller, "hidden": cfg.hidden,
            "lstm_layers": cfg.lstm_layers, "seed": cfg.seed}


@dataclass
class LSTMResult:
    net: Net
    scores: dict[str, np.ndarray]
    log: list[dict]
    base_accuracy: float
    train_iters: int
    children: int
    updates: int
    seconds: float
    finished_by: str
    work_dir: Path
    sensitivity: Path | None = None
    settings: dict = field(default_factory=dict)


def _summary(net: Net, entry: Mapping | None = None) -> dict:
    out = {"cost_fraction": net.cost, "accuracy": net.accuracy, "reward": net.reward, "widths": dict(net.widths)}
    if entry is not None:
        out.update(tokens=list(entry["tokens"]), pruned=dict(entry["pruned"]))
    return out


class LSTMSearch:
    """The loop of the module docstring, for ``model`` (the unpruned, trained model of ``space``)."""

    def __init__(self, space: PruningSpace, model: nn.Module, cost: CostBase, train: Batches, held: Batches,
                 cfg: LSTMConfig, work_dir: str | Path, progress: Callable[[str, int, int], None] | None = None):
        from hwprune.pruning.gcp import _amp

        self.space, self.cost, self.train, self.held, self.cfg = space, cost, train, held, cfg
        self.work_dir = Path(work_dir)
        self.progress = progress or (lambda desc, done, total: None)
        self.amp = _amp(cfg.precision)
        self.base_total = float(cost.total([space.full()])[0])
        self.nexts = next_layers(space)
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.surgeon = Surgeon(space, model)
        self.identity = run_identity(space, model, cost, cfg)
        with torch.random.fork_rng(devices=[]):  # seeded, leaving the caller's generator as it was
            torch.manual_seed(cfg.seed)
            self.reinforce = Reinforce(CONTROLLERS[cfg.controller](N_FEATURES, cfg.hidden, cfg.lstm_layers),
                                       cfg.controller_lr, cfg.baseline_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rec = Recovery(cfg.recovery_iters, cfg.recovery_lr, self.amp)
        self.floor = floor_reward(cfg.cost_weight)
        self.beam: list[Net] = []
        self.st: dict = {}

    @property
    def state_path(self) -> Path:
        return self.work_dir / "state.pt"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "log.json"

    # -- the loop ------------------------------------------------------------------
    def run(self) -> LSTMResult:
        """Search until a network meets the goal; resumes from the work dir's state when there is one."""
        self._start()
        while self.st["finished"] is None:
            if self._reached() is not None:
                self.st["finished"] = self.st.get("finish_reason") or "goal"
                self._save()
                break
            if self._left() < (self.cfg.children + 1) * self.st["child_seconds"]:
                self._finish("budget")
            elif not self._step():
                self._finish("no feasible child")
            self._save()
        return self._result()

    def _start(self) -> None:
        check_goal(self.space, self.cost, self.cfg.goal, self.cfg.min_keep)
        self.t0 = time.perf_counter()
        if self.state_path.exists():
            self._load()
            return
        base_acc, est = self._probe()
        need = (self.cfg.children + 1) * est
        if self.cfg.budget_minutes * 60 < need:
            raise HwpruneError(f"a budget of {self.cfg.budget_minutes:g} minutes is too small for one LSTM step: "
                               f"{self.cfg.children} children and a finishing child of {self.cfg.recovery_iters} "
                               f"recovery iterations each take about {need / 60:.2f} minutes here",
                               "raise --budget-minutes, or lower the children or recovery_iters options")
        from hwprune.atomic import check_writable

        check_writable(self.state_path)
        base = self.surgeon.base_net()
        base.accuracy, base.cost, base.reward = base_acc, 1.0, reward(base_acc, base_acc, 1.0, self.cfg.goal,
                                                                    self.cfg.cost_weight)
        self.beam = [base]
        self.st = {"goal": self.cfg.goal, "step": 0, "log": [], "cache": {}, "elapsed": 0.0, "train_iters": 0,
                   "children": 0, "child_seconds": est, "base_accuracy": base_acc, "finished": None}

    def _probe(self) -> tuple[float, float]:
        """The unpruned model's held-out accuracy, and an estimate of one child's seconds on this host
        (surgery, recovery iterations timed on a pruned copy, evaluation)."""
        t = time.perf_counter()
        base_acc = accuracy(self.teacher, self.held, self.amp)
        t_eval = time.perf_counter() - t
        base = self.surgeon.base_net()
        t = time.perf_counter()
        removal = plan_removal(self.space, self.cost, base, base.prior, [g.id for g in self.space.groups],
                               self.cfg.share, self.cfg.min_keep, self.cfg.goal)
        widths, keep = child_of(base, removal)
        small = self.surgeon.build(widths, keep, base.state)
        self.surgeon.maps(widths, keep)
        t_surgery = time.perf_counter() - t
        t_iter = 0.0
        if self.cfg.recovery_iters > 0:
            recover(small, self.teacher, self.train, 1, self.cfg.recovery_lr, self.amp)  # warm-up
            t = time.perf_counter()
            recover(small, self.teacher, self.train, 2, self.cfg.recovery_lr, self.amp)
            t_iter = (time.perf_counter() - t) / 2
        return base_acc, t_eval + 2 * t_surgery + self.cfg.recovery_iters * t_iter

    def _left(self) -> float:
        return self.cfg.budget_minutes * 60 - self._elapsed()

    def _elapsed(self) -> float:
        return self.st["elapsed"] + time.perf_counter() - self.t0

    def _reached(self) -> Net | None:
        done = [n for n in self.beam if n.cost <= self.cfg.goal + 1e-9]
        return max(done, key=lambda n: (n.accuracy or 0.0, -n.cost)) if done else None

    def _tokens(self, net: Net) -> torch.Tensor:
        return encode(self.space, self.cost, net.widths, self.cfg.goal, self.cfg.share, self.cfg.min_keep, self.nexts)

    def _step(self) -> bool:
        """One step (rounds of children, one REINFORCE update each); False when no child was feasible."""
        cfg, s = self.cfg, self.st["step"]
        parents = list(self.beam)
        tokens = [self._tokens(p) for p in parents]
        scores = [self.surgeon.normalised(p) for p in parents]
        best: list[tuple[float, str, Net, dict]] = []
        rounds, top, stale = [], -math.inf, 0
        for r in range(cfg.rounds):
            if r > 0 and self._left() < (cfg.children + 1) * self.st["child_seconds"]:
                break
            entries, actions = self._round(s, r, parents, tokens, scores, best)
            upd = self.reinforce.update([tokens[e["parent"]] for e in entries], actions, [e["reward"] for e in entries])
            rounds.append({"round": r, "children": entries, "baseline": upd["baseline"],
                           "mean_reward": upd["mean_reward"], "loss": upd["loss"]})
            m = max(e["reward"] for e in entries)
            top, stale = (m, 0) if m > top + 1e-9 else (top, stale + 1)
            if stale >= cfg.patience:
                break
        if best:
            self.beam = [n for _, _, n, _ in best]
        self.st["log"].append({"step": s, "kind": "search", "parents": [_summary(p) for p in parents], "rounds": rounds,
                               "beam": [_summary(n, e) for _, _, n, e in best], "elapsed": self._elapsed()})
        self.st["step"] += 1
        return bool(best)

    def _round(self, s: int, r: int, parents: list[Net], tokens: list[torch.Tensor], scores: list[dict],
               best: list) -> tuple[list[dict], list[np.ndarray]]:
        entries, actions = [], []
        for k in range(self.cfg.children):
            pi = k % len(parents)
            a = self.reinforce.controller.sample(tokens[pi], self.gen)
            entry, net = self._child(parents[pi], scores[pi], a)
            entry.update(round=r, parent=pi)
            if net is not None:
                self._keep_best(best, net, entry)
            entries.append(entry)
            actions.append(a)
            self.progress(f"step {s} round {r}: child {k + 1}/{self.cfg.children}, best cost "
                          f"{100 * min(p.cost for p in parents):.1f}% -> goal {100 * self.cfg.goal:.1f}%",
                          self._progress_pct(), 100)
        return entries, actions

    def _keep_best(self, best: list, net: Net, entry: dict) -> None:
        if any(k == entry["key"] for _, k, _, _ in best):
            return
        best.append((net.reward, entry["key"], net, entry))
        best.sort(key=lambda b: -b[0])
        del best[self.cfg.beam:]

    def _progress_pct(self) -> int:
        c = min(n.cost for n in self.beam)
        return int(round(100 * min(1.0, max(0.0, (1.0 - c) / max(1.0 - self.cfg.goal, 1e-6)))))

    def _child(self, parent: Net, scores: dict, actions: np.ndarray, finish: bool = False) -> tuple[dict, Net | None]:
        """Evaluate the child ``actions`` make of ``parent`` (or take it from the cache)."""
        cfg = self.cfg
        selected = [g.id for g, a in zip(self.space.groups, actions) if a]
        removal = plan_removal(self.space, self.cost, parent, scores, selected, cfg.share, cfg.min_keep, cfg.goal,
                               finish=finish)
        entry = {"tokens": selected, "pruned": {g: len(v) for g, v in removal.items()}}
        if not removal:
            return {**entry, "key": None, "feasible": False, "cached": False, "reward": self.floor,
                    "cost_fraction": parent.cost, "accuracy": None}, None
        widths, _ = child_of(parent, removal)
        entry["key"] = parent.key() + "|" + ",".join(str(widths[g]) for g in widths)
        if entry["key"] in self.st["cache"] and not finish:
            return {**entry, **self.st["cache"][entry["key"]], "cached": True}, None
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + self.st["children"])
            child, info = make_child(self.surgeon, parent, removal, scores, self.teacher, self.train, self.held,
                                     self.rec)
        total = float(self.cost.total([widths])[0])
        child.cost = total / self.base_total
        child.reward = reward(child.accuracy, self.st["base_accuracy"], child.cost, cfg.goal, cfg.cost_weight)
        secs = time.perf_counter() - t
        self.st["children"] += 1
        self.st["train_iters"] += self.rec.iters
        self.st["child_seconds"] = 0.5 * self.st["child_seconds"] + 0.5 * secs
        result = {"feasible": True, "reward": child.reward, "cost_fraction": child.cost, "predicted_cost": total,
                  "cost_unit": self.cost.unit, "accuracy": child.accuracy, "seconds": secs,
                  "recovery_loss": info["recovery_loss"]}
        self.st["cache"][entry["key"]] = result
        return {**entry, **result, "cached": False}, child

    def _finish(self, reason: str) -> None:
        """Prune the best network of the beam straight to the goal (module docstring)."""
        parent = max(self.beam, key=lambda n: n.reward if n.reward is not None else -math.inf)
        tokens = self._tokens(parent)
        entry, child = self._child(parent, self.surgeon.normalised(parent), self.reinforce.controller.greedy(tokens),
                                   finish=True)
        if child is None:  # nothing left to remove: the narrowest network, already checked to meet the goal
            raise HwpruneError("the LSTM search cannot prune further towards the goal")
        self.beam = [child]
        self.st["log"].append({"step": self.st["step"], "kind": "finish", "reason": reason,
                               "parents": [_summary(parent)], "children": [entry], "beam": [_summary(child, entry)],
                               "elapsed": self._elapsed()})
        self.st["finish_reason"] = reason
        self.st["step"] += 1

    # -- state -------------------------------------------------------------------
    def _save(self) -> None:
        from hwprune.atomic import atomic_write_text
        from hwprune.training.checkpoint import atomic_torch_save

        st = {**self.st, "elapsed": self._elapsed()}
        payload = {"identity": self.identity, **st, "beam": [n.payload() for n in self.beam],
                   "reinforce": self.reinforce.state_dict(), "generator": self.gen.get_state()}
        atomic_torch_save(payload, self.state_path)
        atomic_write_text(self.log_path, json.dumps(self._log_doc(), indent=1, default=float) + "\n")

    def _log_doc(self) -> dict:
        return {"goal": self.cfg.goal, "settings": asdict(self.cfg), "groups": [g.id for g in self.space.groups],
                "base_accuracy": self.st["base_accuracy"], "train_iters": self.st["train_iters"],
                "children": self.st["children"], "controller_updates": self.reinforce.updates,
                "elapsed_seconds": self.st["elapsed"], "finished": self.st["finished"], "steps": self.st["log"]}

    def _load(self) -> None:
        from hwprune.training.checkpoint import safe_torch_load

        raw = safe_torch_load(self.state_path, "LSTM search state")
        ident = raw.get("identity") if isinstance(raw, dict) else None
        if not isinstance(ident, dict):
            raise HwpruneError(f"{self.state_path} is not an LSTM search state", "pass another work_dir")
        for key, want in self.identity.items():
            if ident.get(key) != want:
                raise HwpruneError(f"{self.state_path} holds the state of another LSTM run ({key} differs)",
                                   "pass another work_dir or delete that one")
        self.st = {k: v for k, v in raw.items() if k not in ("identity", "beam", "reinforce", "generator")}
        self.beam = [Net.from_payload(b) for b in raw["beam"]]
        self.reinforce.load_state_dict(raw["reinforce"])
        self.gen.set_state(raw["generator"])
        if abs(self.st["goal"] - self.cfg.goal) > 1e-12:  # a new calibration: continue towards the new goal
            self.st["log"].append({"step": self.st["step"], "kind": "goal", "from": self.st["goal"],
                                   "to": self.cfg.goal})
            self.st.update(goal=self.cfg.goal, finished=None, finish_reason=None)
            for n in self.beam:
                n.reward = reward(n.accuracy or 0.0, self.st["base_accuracy"], n.cost, self.cfg.goal,
                                  self.cfg.cost_weight)

    def _result(self) -> LSTMResult:
        from hwprune.pruning.lstm.sensitivity import save_sensitivity

        net = self._reached()
        png = save_sensitivity(self.st["log"], [g.id for g in self.space.groups], self.work_dir / "sensitivity.png",
                               title=f"{self.space.name}: groups the controller pruned")
        return LSTMResult(net, self.surgeon.normalised(net), self.st["log"], self.st["base_accuracy"],
                          self.st["train_iters"], self.st["children"], self.reinforce.updates, self._elapsed(),
                          self.st["finished"], self.work_dir, png, asdict(self.cfg))
