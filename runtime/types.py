"""Records that cross the wire in control messages: workers, hosted stages, routes, plans.

Each has ``to_msg()`` (msgpack-safe lists/maps) and ``from_msg()`` which validates what
it reads and raises ``ProtocolError`` naming the field, since it comes from the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import protocol as P
from .errors import ProtocolError


MAX_REPLICAS = 16  # workers per stage


class WorkerState(str, Enum):
    """A worker as the coordinator sees it."""

    LIVE = "live"  # heartbeating
    DEPLOYING = "deploying"  # heartbeating, loading stages
    LOST = "lost"  # silent for interval x liveness


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"bad message: {what} must be an int in [{lo}, {hi}], got {v!r:.60}")
    return v


def _list(v: Any, what: str, n: int | None = None) -> list[Any]:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise ProtocolError(f"bad message: {what} must be a list" + (f" of {n}" if n is not None else "")
                            + f", got {v!r:.60}")
    return v


@dataclass(frozen=True)
class StageInfo:
    """One stage a worker hosts: blocks ``[start, end)`` of ``model`` at route position ``hop``.

    ``plan`` is the id of the plan that placed it; ``next`` the endpoints of the next stage's
    replicas, any of which may take its output (empty for the last stage, whose output goes
    to the requester).
    """

    model: str
    hop: int
    start: int
    end: int
    n_blocks: int
    plan: int
    next: tuple[str, ...] = ()

    @property
    def is_last(self) -> bool:
        return self.end == self.n_blocks

    def to_msg(self) -> list[Any]:
        return [self.model, self.hop, self.start, self.end, self.n_blocks, self.plan, list(self.next)]

    @classmethod
    def from_msg(cls, v: Any) -> "StageInfo":
        model, hop, start, end, n_blocks, plan, nxt = _list(v, "a stage", 7)
        P.check_model_name(model)
        n = _int(n_blocks, "n_blocks", 1, 100_000)
        s, e = _int(start, "start", 0, n), _int(end, "end", 1, n)
        if s >= e:
            raise ProtocolError(f"bad message: stage span [{s}, {e}) is empty")
        nxt = [] if nxt is None else _list(nxt, "next endpoints")
        if len(nxt) > MAX_REPLICAS:
            raise ProtocolError(f"bad message: at most {MAX_REPLICAS} replicas per stage, got {len(nxt)}")
        return cls(model, _int(hop, "hop", 0, P.MAX_HOPS), s, e, n, _int(plan, "plan"),
                   tuple(P.check_endpoint(ep) for ep in nxt))


MAX_REPORTED_STAGES = 256  # stages one worker reports at once (a READY or HEARTBEAT is parsed in bounded time)


def stages_from_msg(v: Any) -> list[StageInfo]:
    """The stages a worker reports, at most ``MAX_REPORTED_STAGES``."""
    items = _list(v, "stages")
    if len(items) > MAX_REPORTED_STAGES:
        raise ProtocolError(f"bad message: a worker reports at most {MAX_REPORTED_STAGES} stages, got {len(items)}")
    return [StageInfo.from_msg(s) for s in items]


@dataclass(frozen=True)
class RouteHop:
    """One stage of a route: who runs blocks ``[start, end)`` and where to send its input."""

    hop: int
    worker: str
    endpoint: str
    start: int
    end: int
    key: str = ""  # the worker's public key (z85) in a keyed cluster: connections to it speak CURVE to this key

    def to_msg(self) -> list[Any]:
        return [self.hop, self.worker, self.endpoint, self.start, self.end, self.key]

    @classmethod
    def from_msg(cls, v: Any) -> "RouteHop":
        hop, worker, endpoint, start, end, key = _list(v, "a route hop", 6)
        if not isinstance(worker, str) or not worker:
            raise ProtocolError("bad message: route hop worker must be a name")
        if not isinstance(key, str) or len(key) not in (0, P.KEY_Z85_CHARS):
            raise ProtocolError(f"bad message: a route hop's key is empty or {P.KEY_Z85_CHARS} z85 characters")
        return cls(_int(hop, "hop", 0, P.MAX_HOPS), worker, P.check_endpoint(endpoint),
                   _int(start, "start"), _int(end, "end"), key)


@dataclass(frozen=True)
class Route:
    """The path a request of ``model`` takes: hop 0's worker gets the input, the last returns the output.

    ``hops[k]`` is one worker of stage k; ``replicas[k]`` lists every live worker hosting it
    (``hops[k]`` among them), so a sender can choose, and replay on another when one is lost.
    """

    model: str
    plan: int
    n_blocks: int
    input_shape: list[int]
    hops: list[RouteHop]
    replicas: list[list[RouteHop]] = field(default_factory=list)
    # what the deploy that made this route did on each worker (Client.deploy fills it): load_ms,
    # fetched_bytes (into its store), loaded_bytes (into memory), freed_bytes, resident_bytes
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    # timm's preprocessing for the model (manifest extra["data_config"]): how a client turns an image into input
    data_config: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.replicas:
            object.__setattr__(self, "replicas", [[h] for h in self.hops])

    @property
    def workers(self) -> list[str]:
        """Every worker on the route (all replicas), stage by stage."""
        return [h.worker for reps in self.replicas for h in reps]

    def describe(self) -> str:
        """The route for messages: stages in order, replicas of one stage joined by |, e.g. ``w0|w1 -> w2|w3``."""
        return " -> ".join("|".join(h.worker for h in reps) for reps in self.replicas)

    def to_msg(self) -> dict[str, Any]:
        return {"model": self.model, "plan": self.plan, "n_blocks": self.n_blocks,
                "input_shape": list(self.input_shape), "hops": [h.to_msg() for h in self.hops],
                "replicas": [[h.to_msg() for h in reps] for reps in self.replicas], "data_config": self.data_config}

    @classmethod
    def from_msg(cls, v: Any) -> "Route":
        if not isinstance(v, dict):
            raise ProtocolError("bad message: a route is a map")
        hops = [RouteHop.from_msg(h) for h in _list(v.get("hops"), "route hops")]
        if not hops:
            raise ProtocolError("bad message: a route has at least one hop")
        shape = [_int(d, "input dim", 0, 1 << 20) for d in _list(v.get("input_shape"), "input_shape")]
        reps_raw = _list(v.get("replicas", [[h] for h in v["hops"]]), "route replicas", len(hops))
        replicas = [[RouteHop.from_msg(h) for h in _list(r, "a hop's replicas")[:MAX_REPLICAS]] for r in reps_raw]
        if any(not r or any(h.hop != k for h in r) for k, r in enumerate(replicas)):
            raise ProtocolError("bad message: route replicas must list at least one worker per hop, in hop order")
        data_config = v.get("data_config")
        if data_config is not None and not isinstance(data_config, dict):
            raise ProtocolError("bad message: a route's data_config is a map or nil")  # its values: inputs.py checks
        return cls(P.check_model_name(v.get("model")), _int(v.get("plan"), "plan"),
                   _int(v.get("n_blocks"), "n_blocks", 1), shape, hops, replicas, data_config=data_config)


@dataclass
class WorkerInfo:
    """A worker as registered with the coordinator (what ``Client.workers()`` returns)."""

    name: str
    endpoint: str
    device: str
    memory_budget_bytes: int
    state: WorkerState = WorkerState.LIVE
    host: str = ""
    pid: int = 0
    stages: list[StageInfo] = field(default_factory=list)
    telemetry: dict[str, Any] = field(default_factory=dict)
    last_seen_s: float = 0.0  # seconds since the coordinator last heard from it
    stats: list[list[Any]] = field(default_factory=list)  # [[model, hop, n, compute_ms_p50, compute_ms_mean, errors]]
    cache: dict[str, Any] = field(default_factory=dict)  # the worker's BlockCache.report()
    resident: list[list[Any]] = field(default_factory=list)  # [[model, hop], ...] of stages with every block loaded

    def stage_stats(self) -> dict[tuple[str, int], dict[str, float]]:
        """``{(model, hop): {"n", "compute_ms_p50", "compute_ms_mean", "errors"}}`` from the last heartbeat."""
        out = {}
        for row in self.stats:
            if isinstance(row, list) and len(row) == 6 and isinstance(row[0], str) and isinstance(row[1], int):
                out[(row[0], row[1])] = {"n": row[2], "compute_ms_p50": row[3], "compute_ms_mean": row[4],
                                         "errors": row[5]}
        return out

    def to_msg(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "device": self.device,
                "memory_budget_bytes": self.memory_budget_bytes, "state": self.state.value, "host": self.host,
                "pid": self.pid, "stages": [s.to_msg() for s in self.stages], "telemetry": self.telemetry,
                "last_seen_s": self.last_seen_s, "stats": self.stats, "cache": self.cache, "resident": self.resident}

    @classmethod
    def from_msg(cls, v: Any) -> "WorkerInfo":
        if not isinstance(v, dict):
            raise ProtocolError("bad message: a worker record is a map")
        name = v.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ProtocolError("bad message: a worker name is 1-64 characters")
        try:
            state = WorkerState(v.get("state", "live"))
        except ValueError:
            raise ProtocolError(f"bad message: unknown worker state {v.get('state')!r:.30}") from None
        tel = v.get("telemetry", {})
        return cls(name=name, endpoint=P.check_endpoint(v.get("endpoint")), device=str(v.get("device", "cpu"))[:32],
                   memory_budget_bytes=_int(v.get("memory_budget_bytes", 0), "memory_budget_bytes"), state=state,
                   host=str(v.get("host", ""))[:128], pid=_int(v.get("pid", 0), "pid"),
                   stages=stages_from_msg(v.get("stages", [])),
                   telemetry=tel if isinstance(tel, dict) else {},
                   last_seen_s=float(v.get("last_seen_s", 0.0)) if P.is_finite_number(v.get("last_seen_s", 0.0)) else 0.0,
                   stats=v.get("stats") if isinstance(v.get("stats"), list) else [],
                   cache=v.get("cache") if isinstance(v.get("cache"), dict) else {},
                   resident=[r for r in _list(v.get("resident", []), "resident") if isinstance(r, list) and len(r) == 2])
