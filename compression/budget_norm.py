"""Batch norm with one set of running statistics per budget (affine parameters shared).

A decoder's input changes with the budget: at b = 4 all but four channels are zero, at full
width none are. One set of running statistics, averaged over budgets, fits none of them, and
a module trained on mixed budgets then fails at every budget in eval mode (measured on digits:
held-out accuracy fell from 97 % to 45 % at b = 4). Keeping statistics per budget is the
"switchable batch norm" of slimmable networks (Yu et al., ICLR 2019) without the private
affine parameters, so training at a single budget is exactly the reference's batch norm.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BudgetNorm(nn.Module):
    """BatchNorm over ``channels`` (dim 1) with running statistics per budget; None = full width."""

    def __init__(self, channels: int, budgets: Sequence[int], momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.budgets = tuple(budgets)
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        rows = len(self.budgets) + 1  # row 0: full width, then one row per budget
        self.register_buffer("running_mean", torch.zeros(rows, channels))
        self.register_buffer("running_var", torch.ones(rows, channels))

    def row(self, budget: int | None) -> int:
        """Statistics row of ``budget`` (0 = full width)."""
        return 0 if budget is None else 1 + self.budgets.index(budget)

    def forward(self, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        i = self.row(budget)
        return F.batch_norm(x, self.running_mean[i], self.running_var[i], self.weight, self.bias,
                            self.training, self.momentum, self.eps)  # updates row i in place when training
