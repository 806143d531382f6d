"""Layer-wise plans: which contiguous block span runs on which worker. Pure functions, no sockets.

A plan is a list of ``PlannedStage(worker, start, end)`` covering blocks ``[0, n)`` in
order. Stages may outnumber workers (a worker then hosts several, round robin). When no
split points are given, they balance the manifest's profiled per-block times (the
slowest stage bounds a pipeline's throughput), falling back to equal block counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from edgesplit.partitioner import ModelManifest

from .errors import DeployError, ProtocolError


@dataclass(frozen=True)
class PlannedStage:
    """Blocks ``[start, end)`` placed on ``worker``."""

    worker: str
    start: int
    end: int

    def to_msg(self) -> list[Any]:
        return [self.worker, self.start, self.end]

    @classmethod
    def from_msg(cls, v: Any) -> "PlannedStage":
        if not (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v[1:])):
            raise ProtocolError(f"bad message: a planned stage is [worker, start, end], got {v!r:.60}")
        return cls(v[0], v[1], v[2])


def check_plan(stages: Sequence[PlannedStage], n_blocks: int, model: str = "model") -> None:
    """Raise ``DeployError`` unless the stages cover ``[0, n_blocks)`` contiguously, in order."""
    if not stages:
        raise DeployError(f"plan for {model} has no stages")
    pos = 0
    for i, s in enumerate(stages):
        if s.start != pos or s.end <= s.start:
            raise DeployError(f"plan for {model}: stage {i} is [{s.start}, {s.end}) but must start at block {pos} "
                              f"and be non-empty; stages must cover blocks 0..{n_blocks - 1} in order")
        pos = s.end
    if pos != n_blocks:
        raise DeployError(f"plan for {model} ends at block {pos}, the model has {n_blocks} blocks")


def balanced_splits(costs: Sequence[float], n_stages: int) -> list[int]:
    """Split points minimising the largest stage cost (contiguous stages; exact DP, O(k n^2)).

    Args:
        costs: per-block cost (e.g. forward ms), in block order.
        n_stages: number of stages, 1..len(costs).
    Returns:
        ``n_stages - 1`` increasing split points (block indices where a stage starts).
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise DeployError(f"cannot make {n_stages} stages from {n} blocks")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + max(float(c), 0.0))
    inf = float("inf")
    # best[k][i]: min over ways to cut the first i blocks into k stages of the largest stage cost
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut_at = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i] - 1e-12:
                    best[k][i], cut_at[k][i] = v, j
    splits, i = [], n
    for k in range(n_stages, 0, -1):
        i = cut_at[k][i]
        splits.append(i)
    return sorted(s for s in splits if s > 0)


def layerwise_plan(manifest: ModelManifest, workers: Sequence[str], n_stages: int | None = None,
                   splits: Sequence[int] | None = None) -> list[PlannedStage]:
    """Place a layer-wise cut of ``manifest`` on ``workers``.

    Args:
        manifest: the model (its block list and profiled ``forward_ms``).
        workers: worker names; stage i goes to ``workers[i % len(workers)]``.
        n_stages: number of stages (default: one per worker); ignored when ``splits`` is given.
        splits: block indices where a new stage starts; default balances profiled times.
    Returns:
        The planned stages, checked to cover every block once.
    """
    if not workers:
        raise DeployError(f"no workers to place {manifest.name} on; start some with `edgesplit worker`")
    n = manifest.n_blocks
    if splits is None:
        k = n_stages or len(workers)
        costs = [b.forward_ms for b in manifest.blocks]
        splits = (balanced_splits([float(c) for c in costs], k) if all(c is not None for c in costs)
                  else [round(i * n / k) for i in range(1, k)])
    bounds = [0, *sorted(int(s) for s in splits), n]
    stages = [PlannedStage(workers[i % len(workers)], a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    check_plan(stages, n, manifest.name)
    return stages
