"""Pricing a plan: the outputs (``Placement``, ``StagePlan``, ``HopPlan``) and ``evaluate_placement``."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .problem import _INF, ACCURACY_TOL, CLIENT, OBJECTIVES, CutCodec, PlacementError, PlacementProblem, WorkerProfile


# --- outputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagePlan:
    """Blocks ``[start, end)`` on ``worker``: its compute per batch (codec work included) and weight bytes."""

    worker: str
    start: int
    end: int
    compute_ms: float
    weight_bytes: int


@dataclass(frozen=True)
class HopPlan:
    """One message per batch from ``src`` to ``dst``; ``cut`` is None for the client hops, ``codec`` None for raw."""

    src: str
    dst: str
    cut: int | None
    codec: str | None
    bytes: int  # per batch
    transfer_ms: float


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class Placement:
    """A priced plan: stages in chain order, hops in path order (one more than stages)."""

    objective: str
    stages: tuple[StagePlan, ...]
    hops: tuple[HopPlan, ...]
    latency_ms: float
    bottleneck_ms: float
    throughput: float  # samples/s of a full pipeline: 1000 * batch / bottleneck_ms
    accuracy_cost: float

    @property
    def splits(self) -> list[int]:
        """Block indices where a stage starts (``runtime.plan.layerwise_plan``'s ``splits``)."""
        return [s.start for s in self.stages[1:]]

    @property
    def workers(self) -> list[str]:
        return [s.worker for s in self.stages]

    @property
    def codecs(self) -> dict[int, str]:
        """Cut -> codec name, for the cuts that do not travel raw."""
        return {h.cut: h.codec for h in self.hops if h.cut is not None and h.codec is not None}

    @property
    def bottleneck(self) -> str:
        """What bounds the throughput, first in path order: ``"stage 1 on w2"`` (0-based) or ``"hop w1->w2"``."""
        for k, h in enumerate(self.hops):
            if h.transfer_ms == self.bottleneck_ms:
                return f"hop {h.src}->{h.dst}"
            if k < len(self.stages) and self.stages[k].compute_ms == self.bottleneck_ms:
                return f"stage {k} on {self.stages[k].worker}"
        return "?"  # unreachable: bottleneck_ms is one of them

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (non-finite numbers become None), for ``--json`` output."""
        return {
            "objective": self.objective,
            "workers": self.workers, "splits": self.splits, "codecs": {str(c): n for c, n in self.codecs.items()},
            "latency_ms": _json_float(self.latency_ms), "bottleneck_ms": _json_float(self.bottleneck_ms),
            "throughput": _json_float(self.throughput), "accuracy_cost": self.accuracy_cost,
            "bottleneck": self.bottleneck,
            "stages": [{"worker": s.worker, "start": s.start, "end": s.end, "compute_ms": s.compute_ms,
                        "weight_bytes": s.weight_bytes} for s in self.stages],
            "hops": [{"src": h.src, "dst": h.dst, "cut": h.cut, "codec": h.codec, "bytes": h.bytes,
                      "transfer_ms": _json_float(h.transfer_ms)} for h in self.hops],
        }


# --- pricing a given plan --------------------------------------------------------------------------
def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise PlacementError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")


def _seq_sum(xs: Sequence[float]) -> float:
    """Left-to-right float sum (``sum`` of floats is compensated from Python 3.12; the DP adds in order)."""
    s = 0.0
    for x in xs:
        s += x
    return s


def _cut_bytes(p: PlacementProblem, cut: int, codec: CutCodec | None) -> int:
    return (p.act_bytes[cut - 1] if codec is None else codec.bytes_per_sample) * p.batch


def _price(p: PlacementProblem, objective: str, plan: Sequence[tuple[WorkerProfile, int, int]],
           codec_at: Mapping[int, CutCodec]) -> Placement:
    """Price a checked plan; every sum runs in path order (hop, stage, hop, ...), as the DP adds."""
    stages, hops = [], []
    prev = CLIENT
    for k, (w, a, b) in enumerate(plan):
        cin = codec_at.get(a) if k else None
        cout = codec_at.get(b) if k + 1 < len(plan) else None
        nbytes = p.input_bytes * p.batch if k == 0 else _cut_bytes(p, a, cin)
        hops.append(HopPlan(prev, w.name, a if k else None, cin.name if cin else None, nbytes,
                            p.transfer_ms(prev, w.name, nbytes)))
        ms = _seq_sum(w.stage_blocks(a, b)) + (cin.decode_ms if cin else 0.0) + (cout.encode_ms if cout else 0.0)
        stages.append(StagePlan(w.name, a, b, ms, sum(p.block_bytes[a:b])))
        prev = w.name
    nbytes = p.act_bytes[-1] * p.batch
    hops.append(HopPlan(prev, CLIENT, None, None, nbytes, p.transfer_ms(prev, CLIENT, nbytes)))
    latency = 0.0
    for h, s in itertools.zip_longest(hops, stages):
        latency += h.transfer_ms
        if s is not None:
            latency += s.compute_ms
    bottleneck = max(max(h.transfer_ms for h in hops), max(s.compute_ms for s in stages))
    accuracy = 0.0
    for cut in sorted(codec_at):
        accuracy += codec_at[cut].accuracy_cost
    throughput = 1000.0 * p.batch / bottleneck if bottleneck > 0 else _INF
    return Placement(objective, tuple(stages), tuple(hops), latency, bottleneck, throughput, accuracy)


def evaluate_placement(problem: PlacementProblem, stages: Sequence[tuple[str, int, int]],
                       codecs: Mapping[int, str] | None = None, objective: str = "throughput") -> Placement:
    """Price a given plan (e.g. the equal-block split, to compare with the planner's).

    Args:
        problem: the chain, workers, links and codecs.
        stages: ``(worker, start, end)`` in chain order, covering blocks ``0..n-1``.
        codecs: cut -> codec name for the cuts that do not travel raw.
        objective: recorded in the result (``"throughput"`` or ``"latency"``).
    Raises:
        PlacementError: the plan does not cover the chain in order, reuses or names an unknown worker,
            has too many stages, overflows a worker's memory, names a codec that is not at one of its
            cuts, or spends more accuracy than ``max_accuracy_cost``.
    """
    _check_objective(objective)
    p, n = problem, problem.n_blocks
    by_name = {w.name: w for w in p.workers}
    if not stages:
        raise PlacementError("a plan needs at least one stage")
    plan, pos = [], 0
    for k, st in enumerate(stages):
        if not (isinstance(st, (tuple, list)) and len(st) == 3 and isinstance(st[0], str)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in st[1:])):
            raise PlacementError(f"stage {k} must be (worker, start, end), got {st!r:.60}")
        name, a, b = st
        if name not in by_name:
            raise PlacementError(f"stage {k} is on unknown worker {name!r}; workers: {sorted(by_name)}")
        if a != pos or b <= a:
            raise PlacementError(f"stage {k} is [{a}, {b}) but must start at block {pos} and be non-empty; "
                                 f"stages must cover blocks 0..{n - 1} in order")
        plan.append((by_name[name], a, b))
        pos = b
    if pos != n:
        raise PlacementError(f"the plan ends at block {pos}, the model has {n} blocks")
    used = [w.name for w, _, _ in plan]
    dup = sorted({x for x in used if used.count(x) > 1})
    if dup:
        raise PlacementError(f"worker(s) {dup} host more than one stage; each stage needs its own worker")
    if len(plan) > p.stage_limit:
        raise PlacementError(f"the plan has {len(plan)} stages, at most {p.stage_limit} are allowed")
    for k, (w, a, b) in enumerate(plan):
        need = sum(p.block_bytes[a:b])
        if 0 < w.memory_bytes < need:
            raise PlacementError(f"stage {k} (blocks [{a}, {b}), {need} weight bytes) does not fit worker "
                                 f"{w.name!r}'s memory budget of {w.memory_bytes} bytes")
    cuts = {a for _, a, _ in plan[1:]}
    codec_at: dict[int, CutCodec] = {}
    for cut, cname in (codecs or {}).items():
        if cut not in cuts:
            raise PlacementError(f"codec {cname!r} is given for cut {cut}, which is not a cut of this plan "
                                 f"(cuts: {sorted(cuts)})")
        found = [c for c in p.codecs if c.cut == cut and c.name == cname]
        if not found:
            raise PlacementError(f"no codec {cname!r} at cut {cut}; available there: "
                                 f"{sorted(c.name for c in p.codecs if c.cut == cut)}")
        codec_at[cut] = found[0]
    priced = _price(p, objective, plan, codec_at)
    if priced.accuracy_cost > p.max_accuracy_cost + ACCURACY_TOL:
        raise PlacementError(f"the plan's codecs cost {priced.accuracy_cost:g} accuracy points, the budget is "
                             f"{p.max_accuracy_cost:g}")
    return priced


def _key(pl: Placement) -> tuple[float, float]:
    """(primary, secondary) objective values of a placement."""
    if pl.objective == "throughput":
        return pl.bottleneck_ms, pl.latency_ms
    return pl.latency_ms, pl.bottleneck_ms
