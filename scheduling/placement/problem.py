"""The planner's inputs: ``PlacementProblem`` (blocks, workers, links, codecs), their validation, ``PlacementError``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import ScheduleError

CLIENT = "<client>"  # the requester's name in ``link_rate`` (no worker name can be this: they start alphanumeric)
OBJECTIVES = ("throughput", "latency")
ACCURACY_TOL = 1e-9  # accuracy costs are float sums: the budget check allows this much

_INF = math.inf


class PlacementError(ScheduleError):
    """A placement problem is malformed, a given plan breaks a constraint, or no feasible plan exists."""


# --- inputs --------------------------------------------------------------------------------------
def _nonneg_float(v: Any, what: str, *, allow_inf: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0 \
            or (math.isinf(v) and not allow_inf):
        raise PlacementError(f"{what} must be a {'' if allow_inf else 'finite '}number >= 0, got {v!r}")
    return float(v)


def _nonneg_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise PlacementError(f"{what} must be an int >= 0, got {v!r}")
    return v


@dataclass(frozen=True)
class WorkerProfile:
    """One worker: its measured forward time per block (one batch) and the weight bytes it may hold.

    A stage's first block runs after the worker sat idle waiting for input, with its caches
    gone cold; ``first_ms`` is each block's time in that place (measured: 20-45 % over the
    time right after the block before it, on a 2-core VM). A stage [a, b) costs
    ``first_ms[a] + block_ms[a+1] + ... + block_ms[b-1]``. Empty: the same as ``block_ms``.
    """

    name: str
    block_ms: tuple[float, ...]  # forward ms of each block right after the one before it, for one batch
    memory_bytes: int = 0  # weight bytes it may hold; <= 0 means no limit
    first_ms: tuple[float, ...] = ()  # forward ms of each block as a stage's first (after an idle wait)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == CLIENT:
            raise PlacementError(f"a worker needs a non-empty name other than {CLIENT!r}, got {self.name!r}")
        ms = tuple(_nonneg_float(v, f"worker {self.name!r}: block_ms[{i}]") for i, v in enumerate(self.block_ms))
        object.__setattr__(self, "block_ms", ms)
        first = tuple(_nonneg_float(v, f"worker {self.name!r}: first_ms[{i}]") for i, v in enumerate(self.first_ms))
        if first and len(first) != len(ms):
            raise PlacementError(f"worker {self.name!r} has first_ms for {len(first)} blocks, block_ms for {len(ms)}")
        object.__setattr__(self, "first_ms", first or ms)
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int):
            raise PlacementError(f"worker {self.name!r}: memory_bytes must be an int (<= 0: no limit), "
                                 f"got {self.memory_bytes!r}")

    def stage_blocks(self, a: int, b: int) -> list[float]:
        """The block times of stage [a, b) on this worker, in order (the first as a stage's first)."""
        return [self.first_ms[a], *self.block_ms[a + 1:b]]


@dataclass(frozen=True)
class CutCodec:
    """A codec usable at one cut: smaller activations for measured accuracy and encode/decode time."""

    name: str
    cut: int  # 1..n-1: the codec carries the activation entering block ``cut``
    bytes_per_sample: int
    accuracy_cost: float = 0.0  # points of accuracy lost (measured), >= 0
    encode_ms: float = 0.0  # per batch, added to the sending stage's compute
    decode_ms: float = 0.0  # per batch, added to the receiving stage's compute

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlacementError(f"a codec needs a non-empty name, got {self.name!r}")
        what = f"codec {self.name!r} at cut {self.cut!r}"
        if isinstance(self.cut, bool) or not isinstance(self.cut, int):
            raise PlacementError(f"{what}: cut must be an int, got {self.cut!r}")
        _nonneg_int(self.bytes_per_sample, f"{what}: bytes_per_sample")
        for attr in ("accuracy_cost", "encode_ms", "decode_ms"):
            object.__setattr__(self, attr, _nonneg_float(getattr(self, attr), f"{what}: {attr}"))


@dataclass(frozen=True)
class PlacementProblem:
    """A chain of blocks, the workers that may run them, the links between them, and codecs per cut.

    Costs of a plan, in ms per batch: stage compute = its blocks' times on its worker
    (``WorkerProfile.stage_blocks``) (+ encode of its outgoing codec + decode of its incoming one); hop = ``hop_ms`` +
    1000 * bytes * batch / rate (a missing or infinite rate adds nothing); latency = the sum of
    all stages and hops; bottleneck = the largest of them (a pipeline overlaps them all).
    """

    block_bytes: tuple[int, ...]  # weight bytes of each block
    act_bytes: tuple[int, ...]  # bytes per sample leaving each block (len n; the last is the output)
    input_bytes: int  # bytes per sample of the model input
    workers: tuple[WorkerProfile, ...]
    link_rate: Mapping[tuple[str, str], float] = field(hash=False)  # bytes/s a -> b; CLIENT is the requester
    hop_ms: float = 0.0  # fixed cost per message on every hop
    codecs: tuple[CutCodec, ...] = ()
    max_accuracy_cost: float = 0.0  # the chosen codecs' accuracy costs must sum to at most this
    batch: int = 1  # samples per message (bytes scale with it; block_ms is already per batch)
    max_stages: int | None = None

    def __post_init__(self) -> None:
        bb = tuple(_nonneg_int(v, f"block_bytes[{i}]") for i, v in enumerate(self.block_bytes))
        n = len(bb)
        if n == 0:
            raise PlacementError("a placement problem needs at least one block")
        ab = tuple(_nonneg_int(v, f"act_bytes[{i}]") for i, v in enumerate(self.act_bytes))
        if len(ab) != n:
            raise PlacementError(f"act_bytes has {len(ab)} entries, block_bytes {n}: give one per block")
        _nonneg_int(self.input_bytes, "input_bytes")
        workers = tuple(self.workers)
        if not workers or not all(isinstance(w, WorkerProfile) for w in workers):
            raise PlacementError("a placement problem needs at least one WorkerProfile")
        names = [w.name for w in workers]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise PlacementError(f"worker names must be distinct, repeated: {dup}")
        for w in workers:
            if len(w.block_ms) != n:
                raise PlacementError(f"worker {w.name!r} has block_ms for {len(w.block_ms)} blocks, the model has {n}")
        known = set(names) | {CLIENT}
        rates: dict[tuple[str, str], float] = {}
        for pair, rate in dict(self.link_rate).items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and pair[0] in known and pair[1] in known):
                raise PlacementError(f"link_rate key {pair!r} is not a (src, dst) pair of known names "
                                     f"({sorted(known)})")
            if pair[0] == pair[1]:
                raise PlacementError(f"link_rate has a link from {pair[0]!r} to itself")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
                raise PlacementError(f"link rate {pair[0]}->{pair[1]} must be > 0 bytes/s (leave the pair out "
                                     f"if unmeasured), got {rate!r}")
            rates[pair] = float(rate)
        hop = _nonneg_float(self.hop_ms, "hop_ms")
        codecs = tuple(self.codecs)
        seen: set[tuple[int, str]] = set()
        for c in codecs:
            if not isinstance(c, CutCodec):
                raise PlacementError(f"codecs must be CutCodec, got {c!r:.60}")
            if not 1 <= c.cut <= n - 1:
                raise PlacementError(f"codec {c.name!r}: cut {c.cut} is out of range; a model of {n} blocks has "
                                     f"cuts 1..{n - 1}")
            if (c.cut, c.name) in seen:
                raise PlacementError(f"codec {c.name!r} is listed twice at cut {c.cut}")
            seen.add((c.cut, c.name))
        budget = _nonneg_float(self.max_accuracy_cost, "max_accuracy_cost", allow_inf=True)
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise PlacementError(f"batch must be an int >= 1, got {self.batch!r}")
        if self.max_stages is not None and (isinstance(self.max_stages, bool) or not isinstance(self.max_stages, int)
                                            or self.max_stages < 1):
            raise PlacementError(f"max_stages must be None or an int >= 1, got {self.max_stages!r}")
        for attr, v in (("block_bytes", bb), ("act_bytes", ab), ("workers", workers), ("codecs", codecs),
                        ("link_rate", MappingProxyType(rates)), ("hop_ms", hop), ("max_accuracy_cost", budget)):
            object.__setattr__(self, attr, v)

    @property
    def n_blocks(self) -> int:
        return len(self.block_bytes)

    @property
    def stage_limit(self) -> int:
        """Most stages a plan may have: one per worker, per block, and at most ``max_stages``."""
        return min(len(self.workers), self.n_blocks, self.max_stages or len(self.workers))

    def rate(self, src: str, dst: str) -> float:
        """Bytes/s from ``src`` to ``dst``; an unmeasured link counts as infinitely fast."""
        return self.link_rate.get((src, dst), _INF)

    def transfer_ms(self, src: str, dst: str, nbytes: int) -> float:
        """One message of ``nbytes`` from ``src`` to ``dst``: the fixed hop cost plus bytes over the rate."""
        return self.hop_ms + 1000.0 * nbytes / self.rate(src, dst)


def _infeasible(p: PlacementProblem) -> PlacementError:
    """Why no plan exists (only memory and the stage limit can forbid every plan: raw links always work)."""
    budgets = ", ".join(f"{w.name}={w.memory_bytes if w.memory_bytes > 0 else 'unlimited'}" for w in p.workers)
    for j, size in enumerate(p.block_bytes):
        if all(0 < w.memory_bytes < size for w in p.workers):
            return PlacementError(f"no feasible placement: block {j} needs {size} weight bytes and no worker's "
                                  f"memory budget holds it ({budgets})")
    return PlacementError(f"no feasible placement: the {p.n_blocks} blocks ({sum(p.block_bytes)} weight bytes) "
                          f"cannot be split into at most {p.stage_limit} stages on distinct workers within their "
                          f"memory budgets ({budgets})")
