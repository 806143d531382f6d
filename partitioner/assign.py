"""Greedy placement of class-wise sub-models onto workers (ED-ViT step 3, EC-SNN Algorithm 1).

Each sub-model costs memory (its stored weights) and compute (MFLOP per request); each
worker offers a memory budget and a compute budget per request (its rate times the latency
target). The greedy takes the most expensive sub-model first and gives it to the worker,
among those where it fits, with the most compute budget left: sub-models then spread over
workers and run in parallel. If a sub-model fits nowhere, the caller prunes it harder and
the placement is retried; after the allowed rounds it is a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .errors import EdgesplitError


class AssignmentError(EdgesplitError):
    """A sub-model fits on no worker under the memory and compute budgets."""

    def __init__(self, message: str, submodel: str, detail: str = "") -> None:
        super().__init__(message)
        self.submodel = submodel
        self.detail = detail or message  # what was needed and what was free


@dataclass(frozen=True)
class WorkerBudget:
    """What one worker can give a class-wise sub-model."""

    name: str
    memory_bytes: int  # weight bytes it may hold
    compute_mflop: float  # MFLOP it can run per request within the latency target


@dataclass(frozen=True)
class SubModelCost:
    """What one class-wise sub-model needs."""

    name: str
    size_bytes: int  # stored weight bytes (the manifest's size)
    mflop: float  # forward MFLOP per sample


@torch.no_grad()
def count_mflop(model: nn.Module, input_shape: list[int]) -> float:
    """Forward MFLOP of ``model`` for one sample (torch's FLOP counter: 2 per multiply-add).

    Args:
        model: the model, on CPU.
        input_shape: per-sample input shape, e.g. ``[1, 32, 32]``.
    Returns:
        MFLOP per sample.
    """
    from torch.utils.flop_counter import FlopCounterMode  # imports triton (+76 MiB): partitioning only

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return counter.get_total_flops() / 1e6


def _describe(workers: list[WorkerBudget]) -> str:
    return ", ".join(f"{w.name} ({w.memory_bytes} B, {w.compute_mflop:.3g} MFLOP)" for w in workers) or "none"


def assign_greedy(costs: list[SubModelCost], workers: list[WorkerBudget], exclusive: bool = True) -> dict[str, str]:
    """Place every sub-model on a worker, largest first, most compute left first.

    Args:
        costs: the sub-models' needs.
        workers: the workers' budgets.
        exclusive: at most one sub-model per worker (they run in parallel on one input);
            ``False`` lets a worker take several while its budgets last.
    Returns:
        sub-model name -> worker name.
    Raises:
        AssignmentError: the first sub-model that fits nowhere (its ``submodel`` names it).
    """
    mem = {w.name: w.memory_bytes for w in workers}
    flop = {w.name: w.compute_mflop for w in workers}
    used: set[str] = set()
    out: dict[str, str] = {}
    for c in sorted(costs, key=lambda c: (-c.mflop, -c.size_bytes, c.name)):
        fits = [w for w in workers if mem[w.name] >= c.size_bytes and flop[w.name] >= c.mflop
                and not (exclusive and w.name in used)]
        if not fits:
            left = [replace(w, memory_bytes=mem[w.name], compute_mflop=flop[w.name])
                    for w in workers if not (exclusive and w.name in used)]
            detail = (f"sub-model {c.name} needs {c.size_bytes} B and {c.mflop:.3g} MFLOP per request, but no "
                      f"worker has that left (free: {_describe(left)})")
            raise AssignmentError(f"{detail}; prune it harder, add workers, or raise their budgets", c.name, detail)
        best = max(fits, key=lambda w: (flop[w.name], mem[w.name], -workers.index(w)))
        mem[best.name] -= c.size_bytes
        flop[best.name] -= c.mflop
        used.add(best.name)
        out[c.name] = best.name
    return out


def assign_with_pruning(costs: list[SubModelCost], workers: list[WorkerBudget],
                        shrink: Callable[[str, int], SubModelCost], max_rounds: int = 3,
                        exclusive: bool = True) -> tuple[dict[str, str], list[SubModelCost]]:
    """Greedy placement; a sub-model that fits nowhere is pruned harder and placement retried.

    Args:
        costs: the sub-models' needs.
        workers: the workers' budgets.
        shrink: ``shrink(name, round)`` prunes sub-model ``name`` harder (round 1, 2, ...) and
            returns its new cost.
        max_rounds: how often one sub-model may be pruned harder before giving up.
        exclusive: at most one sub-model per worker.
    Returns:
        (sub-model name -> worker name, the final costs).
    Raises:
        AssignmentError: a sub-model still fits nowhere after ``max_rounds`` harder prunings.
    """
    costs = list(costs)
    rounds = {c.name: 0 for c in costs}
    while True:
        try:
            return assign_greedy(costs, workers, exclusive), costs
        except AssignmentError as e:
            name = e.submodel
            if rounds[name] >= max_rounds:
                raise AssignmentError(f"nothing fits: {e.detail}, even after pruning it harder {max_rounds} times; "
                                      "add workers or raise their budgets", name, e.detail) from None
            rounds[name] += 1
            i = next(i for i, c in enumerate(costs) if c.name == name)
            costs[i] = shrink(name, rounds[name])
