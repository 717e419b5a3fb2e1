"""The LSTM policy that decides which groups one pruning step prunes, trained with REINFORCE.

:class:`Controller` reads the token sequence of a network (:mod:`hwprune.pruning.lstm.tokens`,
one token per channel group in network order) with a 2-layer LSTM (hidden size 100, as in
"Where to Prune") and outputs, per token, the probability of pruning that group in this step;
an action is one Bernoulli draw per token. :class:`Reinforce` trains it on the rewards of the
children its actions produced: the loss is ``-sum_i (R_i - b) * log pi(a_i | s_i)`` over a round
of children, ``b`` a moving average of past rewards (the baseline; N2N's policy gradient with a
running-mean baseline), optimised by Adam. :class:`RandomController` keeps every probability at
0.5 and never learns: the control a learning controller is compared with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from hwprune.pruning.lstm.tokens import N_FEATURES


class Controller(nn.Module):
    """``tokens`` [n, F] (or [B, n, F]) -> prune probabilities [n] (or [B, n])."""

    learns = True

    def __init__(self, n_features: int = N_FEATURES, hidden: int = 100, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)  # every group starts at probability 0.5: the widest exploration
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        single = tokens.dim() == 2
        h, _ = self.lstm(tokens[None] if single else tokens)
        p = torch.sigmoid(self.head(h).squeeze(-1))
        return p[0] if single else p

    @torch.no_grad()
    def sample(self, tokens: torch.Tensor, generator: torch.Generator) -> np.ndarray:
        """One action: a prune (True) or keep decision per token."""
        return (torch.rand(tokens.shape[0], generator=generator) < self(tokens)).numpy()

    @torch.no_grad()
    def greedy(self, tokens: torch.Tensor) -> np.ndarray:
        """The most probable action (prune where the probability is at least 0.5)."""
        return (self(tokens) >= 0.5).numpy()

    def log_prob(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log pi(actions | tokens)``: summed over the tokens, one value per sequence."""
        p = self(tokens).clamp(1e-6, 1 - 1e-6)
        a = actions.to(p.dtype)
        return (a * p.log() + (1 - a) * (1 - p).log()).sum(-1)


class RandomController(Controller):
    """Probability 0.5 for every token, whatever the input; it has parameters (so that its state
    saves like the LSTM's) but :class:`Reinforce` never moves them."""

    learns = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.full(tokens.shape[:-1], 0.5)


class Reinforce:
    """REINFORCE with a moving-average baseline for a :class:`Controller`."""

    def __init__(self, controller: Controller, lr: float = 3e-3, baseline_decay: float = 0.8):
        self.controller = controller
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=lr)
        self.decay = baseline_decay
        self.baseline: float | None = None
        self.updates = 0

    def update(self, tokens: Sequence[torch.Tensor], actions: Sequence[np.ndarray], rewards: Sequence[float]) -> dict:
        """One policy-gradient step on a round of children; returns what the log records."""
        r = np.asarray(rewards, dtype=np.float64)
        b = float(r.mean()) if self.baseline is None else self.baseline
        adv = torch.tensor(r - b, dtype=torch.float32)
        loss = torch.tensor(0.0)
        if self.controller.learns:
            logp = self.controller.log_prob(torch.stack(list(tokens)),
                                            torch.as_tensor(np.stack([np.asarray(a) for a in actions])))
            loss = -(adv * logp).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
        self.baseline = self.decay * b + (1 - self.decay) * float(r.mean())
        return {"baseline": b, "mean_reward": float(r.mean()), "loss": float(loss.detach()), "advantages": adv.tolist()}

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.updates = int(state["updates"])
