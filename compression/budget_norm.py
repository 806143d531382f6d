"""Batch norm with one set of running statistics per budget (affine parameters shared).

A decoder's input changes with the budget: at b = 4 all but four channels are zero, at full
width none are. One set of running statistics, averaged over budgets, fits none of them, and
a module trained on mixed budgets then fails at every budget in eval mode (measured on digits:
held-out accuracy fell from 97 % to 45 % at b = 4). Keeping statistics per budget is the
"switchable batch norm" of slimmable networks (Yu et al., ICLR 2019) without the private
affine parameters.

Each row's running statistics warm up as a cumulative average over its first 1/momentum
batches (the exponential average with its start-up bias removed, as torch's
``momentum=None``), then average exponentially as usual. Without this, a budget's row starts
at mean 0, variance 1: when training switches to a budget not seen before (prune's b = 32
and b = 4 phases after uncompressed training), the true variance of a 4-channel input can be
orders of magnitude smaller, and the model failed in eval mode for about 80 steps while it
trained well (measured on digits: held-out accuracy at chance for most of an epoch).
With ``warmup=False`` training at a single budget is exactly the reference's batch norm.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_WARM = 1 << 30  # batches-seen count given to rows of state dicts saved before warm-up existed


class BudgetNorm(nn.Module):
    """BatchNorm over ``channels`` (dim 1) with running statistics per budget; None = full width."""

    def __init__(self, channels: int, budgets: Sequence[int], momentum: float = 0.1, eps: float = 1e-5,
                 warmup: bool = True) -> None:
        super().__init__()
        self.budgets = tuple(budgets)
        self.momentum, self.eps, self.warmup = momentum, eps, warmup
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        rows = len(self.budgets) + 1  # row 0: full width, then one row per budget
        self.register_buffer("running_mean", torch.zeros(rows, channels))
        self.register_buffer("running_var", torch.ones(rows, channels))
        self.register_buffer("batches_seen", torch.zeros(rows, dtype=torch.long))  # training batches per row

    def row(self, budget: int | None) -> int:
        """Statistics row of ``budget`` (0 = full width)."""
        return 0 if budget is None else 1 + self.budgets.index(budget)

    def forward(self, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        i = self.row(budget)
        momentum = self.momentum
        if self.training:
            n = int(self.batches_seen[i])
            if self.warmup:
                momentum = max(momentum, 1.0 / (n + 1))
            self.batches_seen[i] += 1
        return F.batch_norm(x, self.running_mean[i], self.running_var[i], self.weight, self.bias,
                            self.training, momentum, self.eps)  # updates row i in place when training

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key, mean, var = prefix + "batches_seen", prefix + "running_mean", prefix + "running_var"
        if key not in state_dict and mean in state_dict and var in state_dict:  # saved before warm-up existed:
            m, v = state_dict[mean], state_dict[var]  # rows still at their initial values were never trained
            fresh = (m == 0).all(dim=1) & (v == 1).all(dim=1)
            state_dict[key] = torch.where(fresh, 0, _WARM).to(torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
