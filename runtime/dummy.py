"""A weightless-in-spirit model for routing tests: each block adds its own scalar (1.0 by default).

Input ``x`` of any shape leaves an ``n``-block model as ``x + n``, so a test can tell which
input a result belongs to and that every block ran once, without timm or real weights.
The scalar is a parameter (the block store keys blocks by their tensors).
"""
from __future__ import annotations

import torch
from torch import nn

from edgesplit.partitioner import register_builder


class Shift(nn.Module):
    """``x + delta``."""

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.tensor([float(delta)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta


@register_builder("dummy")
def build_dummy(n_blocks: int = 4, delta: float = 1.0) -> nn.Sequential:
    """``n_blocks`` Shift blocks in a row (recipe: ``{"builder": "dummy", "kwargs": {"n_blocks": 4}}``)."""
    return nn.Sequential(*[Shift(delta) for _ in range(n_blocks)])


def dummy_recipe(n_blocks: int = 4, delta: float = 1.0) -> dict:
    return {"builder": "dummy", "kwargs": {"n_blocks": n_blocks, "delta": delta}}
