"""Layer-wise plans: which contiguous block span runs on which worker. Pure functions, no sockets.

A plan is a list of ``PlannedStage(worker, start, end)`` covering blocks ``[0, n)`` in
order. Stages may outnumber workers (a worker then hosts several, round robin). When no
split points are given, they balance the manifest's profiled per-block times (the
slowest stage bounds a pipeline's throughput), falling back to equal block counts.

With replicas, each stage is a ``PlannedHop(start, end, workers)``: the same blocks on
several workers, any of which may take a request, so losing one costs no request
(``place_replicas`` says how slots are filled, ``replace_lost`` how a plan that lost every
replica of a stage is repaired).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

from edgesplit.partitioner import ModelManifest

from .errors import DeployError, ProtocolError
from .types import MAX_REPLICAS


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
        splits: block indices where a new stage starts; default: the manifest's stored splits
            when they make ``n_stages`` stages, else balance its profiled times.
    Returns:
        The planned stages, checked to cover every block once.
    """
    if not workers:
        raise DeployError(f"no workers to place {manifest.name} on; start some with `edgesplit worker`")
    n = manifest.n_blocks
    stored = manifest.extra.get("splits")
    if splits is None and isinstance(stored, list) and len(stored) + 1 == (n_stages or len(workers)):
        splits = stored  # cut at partition time (`partition --split/--stages`) for this many stages
    if splits is None:
        k = n_stages or len(workers)
        costs = [b.forward_ms for b in manifest.blocks]
        splits = (balanced_splits([float(c) for c in costs], k) if all(c is not None for c in costs)
                  else [round(i * n / k) for i in range(1, k)])
    bounds = [0, *sorted(int(s) for s in splits), n]
    stages = [PlannedStage(workers[i % len(workers)], a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    check_plan(stages, n, manifest.name)
    return stages


# --- replicas ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedHop:
    """Stage ``hop`` of a plan: blocks ``[start, end)`` on every worker of ``workers`` (its replicas).

    ``workers`` is in preference order: a route lists the live ones in this order.
    """

    start: int
    end: int
    workers: tuple[str, ...]

    def to_msg(self) -> list[Any]:
        return [self.start, self.end, list(self.workers)]

    @classmethod
    def from_msg(cls, v: Any) -> "PlannedHop":
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in v[:2])
                and isinstance(v[2], list) and all(isinstance(w, str) and w for w in v[2])):
            raise ProtocolError(f"bad plan: a hop is [start, end, [worker, ...]], got {v!r:.80}")
        return cls(v[0], v[1], tuple(v[2]))


def check_hops(hops: Sequence[PlannedHop], n_blocks: int, model: str = "model") -> None:
    """Raise ``DeployError`` unless the hops cover ``[0, n_blocks)`` in order, each on 1..MAX_REPLICAS distinct workers."""
    check_plan([PlannedStage(h.workers[0] if h.workers else "?", h.start, h.end) for h in hops], n_blocks, model)
    for k, h in enumerate(hops):
        if not 1 <= len(h.workers) <= MAX_REPLICAS:
            raise DeployError(f"plan for {model}: stage {k} has {len(h.workers)} workers; each stage needs "
                              f"1..{MAX_REPLICAS}")
        if len(set(h.workers)) != len(h.workers):
            raise DeployError(f"plan for {model}: stage {k} lists a worker twice ({list(h.workers)}); replicas "
                              "of a stage must be distinct workers")


def place_replicas(spans: Sequence[tuple[int, int]], workers: Sequence[str], replicas: int = 1,
                   model: str = "model") -> list[PlannedHop]:
    """Put each span on ``replicas`` distinct workers.

    Rule: the spans' replica slots, stage by stage (slot ``k * replicas + r`` is replica ``r``
    of stage ``k``), go round robin over ``workers``. With ``len(workers) == len(spans) * replicas``
    every worker hosts one stage; with fewer, workers host stages of several hops; the
    replicas of one stage are always distinct since ``replicas <= len(workers)``.

    Args:
        spans: ``(start, end)`` of each stage, in order.
        workers: distinct worker names, in the order slots are filled.
        replicas: workers per stage, 1..MAX_REPLICAS.
        model: named in errors.
    Returns:
        One ``PlannedHop`` per span.
    """
    if not 1 <= replicas <= MAX_REPLICAS:
        raise DeployError(f"plan for {model}: replicas must be 1..{MAX_REPLICAS}, got {replicas}")
    if len(set(workers)) != len(workers):
        raise DeployError(f"plan for {model}: worker list {list(workers)} names a worker twice")
    if len(workers) < replicas:
        raise DeployError(f"plan for {model}: {replicas} replicas per stage need at least {replicas} workers, "
                          f"{len(workers)} given ({list(workers)}); start more workers or ask for fewer replicas")
    w = len(workers)
    return [PlannedHop(a, b, tuple(workers[(k * replicas + r) % w] for r in range(replicas)))
            for k, (a, b) in enumerate(spans)]


def layerwise_hops(manifest: ModelManifest, workers: Sequence[str], n_stages: int | None = None,
                   splits: Sequence[int] | None = None, replicas: int = 1) -> list[PlannedHop]:
    """A layer-wise cut of ``manifest`` with every stage on ``replicas`` workers (see :func:`place_replicas`).

    ``n_stages`` defaults to ``len(workers) // replicas`` (at least 1): one stage per group of
    ``replicas`` workers. The cut itself is :func:`layerwise_plan`'s.
    """
    if not workers:
        raise DeployError(f"no workers to place {manifest.name} on; start some with `edgesplit worker`")
    k = n_stages or max(1, len(workers) // max(1, replicas))
    spans = [(s.start, s.end) for s in layerwise_plan(manifest, workers, k, splits)]
    hops = place_replicas(spans, workers, replicas, manifest.name)
    check_hops(hops, manifest.n_blocks, manifest.name)
    return hops


def group_replicas(stages: Sequence[PlannedStage], n_blocks: int, model: str = "model",
                   replicas: int | None = None) -> list[PlannedHop]:
    """An explicit plan as hops: the same span listed on several workers means replicas of that stage.

    Args:
        stages: ``PlannedStage(worker, start, end)`` in any order.
        n_blocks: the model's block count (the spans must cover it once).
        model: named in errors.
        replicas: when given, every stage must be listed exactly this many times.
    """
    spans: dict[tuple[int, int], list[str]] = {}
    for s in stages:
        names = spans.setdefault((s.start, s.end), [])
        if s.worker in names:
            raise DeployError(f"plan for {model} lists worker {s.worker} twice for blocks [{s.start}, {s.end})")
        names.append(s.worker)
    hops = [PlannedHop(a, b, tuple(names)) for (a, b), names in sorted(spans.items())]
    check_hops(hops, n_blocks, model)
    if replicas is not None and any(len(h.workers) != replicas for h in hops):
        raise DeployError(f"plan for {model} asks for {replicas} replicas, but its explicit stages list "
                          f"{[len(h.workers) for h in hops]} workers per stage; list each span once per replica")
    return hops


def replace_lost(hops: Sequence[PlannedHop], live: Collection[str], hosted_bytes: Mapping[str, int],
                 budget_bytes: Mapping[str, int], hop_bytes: Sequence[int]) -> list[PlannedHop] | None:
    """The re-plan after losses: the same spans, live workers in the slots of stages left with none.

    A stage that still has a live replica is kept as it is (its lost workers get their stages
    back when they return). In a stage with no live replica, each lost worker's slot goes to
    the live worker with the fewest hosted bytes (counting what this re-plan adds) that is not
    already a replica of it and has room for its blocks (a budget <= 0 means no limit); ties go
    by name. Slots left without a candidate keep their lost worker.

    Args:
        hops: the plan's stages.
        live: names of the live workers.
        hosted_bytes: bytes of blocks each live worker hosts now (missing: 0).
        budget_bytes: each live worker's memory budget (missing or <= 0: no limit).
        hop_bytes: bytes of blocks of each stage.
    Returns:
        The new hops (equal to ``hops`` when every stage has a live replica), or None when a
        stage without a live replica finds no live worker that can hold it.
    """
    load = {w: int(hosted_bytes.get(w, 0)) for w in live}

    def fits(worker: str, nbytes: int) -> bool:
        budget = int(budget_bytes.get(worker, 0))
        return budget <= 0 or load[worker] + nbytes <= budget

    out = []
    for k, h in enumerate(hops):
        if any(w in load for w in h.workers):
            out.append(h)
            continue
        slots = list(h.workers)
        for i in range(len(slots)):
            cands = [c for c in load if c not in slots and fits(c, hop_bytes[k])]
            if not cands:
                break
            best = min(cands, key=lambda c: (load[c], c))
            slots[i] = best
            load[best] += hop_bytes[k]
        if not any(w in load for w in slots):
            return None
        out.append(PlannedHop(h.start, h.end, tuple(slots)))
    return out
