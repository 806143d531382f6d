"""Admission: the coordinator's short window of scheduled requests, and what it decides for each.

A request submitted with a deadline (``Client.submit(..., deadline_ms=, user=)``) asks the
coordinator first (ADMIT: model, user, deadline, input bytes). Asks gather for
``admission_window_ms``; then, per *server*, one ``edgesplit.scheduling`` problem is built
from the live state and solved by the configured scheduler. Every ask gets an answer at once:

- admitted: when to start its upload (a slot of the shared uplink, or, on an unlimited
  link, when its job's load is due) and when its result is planned;
- refused with ``DeadlineUnmeetable``, naming the reason (alone it would end too late, or
  admitting it would make admitted ones late).

**How the single-server model maps onto a cluster.** PartialLoading plans one server that
loads blocks and runs one request at a time. Here a *server* is a set of workers: the
primary workers of each deployed model's route, with routes that share a worker merged, so
two servers never compete for a worker. A server runs one scheduled request at a time (the
pipeline is not overlapped across scheduled requests: conservative). A model's blocks are
named per worker (``worker:block id``), so blocks two models share on one worker are shared
in the plan and the same block on two workers is not. Loading a model costs its missing
bytes over all the server's workers at the slowest worker's measured load rate (loads run in
parallel on the workers, so this only overestimates). A model's inference time is the sum
of its stages' median compute times as the workers report them (before any, the manifest's
profiled block times), times ``1 + margin`` plus a fixed allowance per hop.

**Online, append-only.** Admitted work is never reordered: a window's plan starts when the
server's admitted work is planned to end, with the last admitted model's blocks resident
(or, on an idle server, the blocks its workers report resident). The uplink is one link for
all clients: a window's uploads start after the uploads already admitted (their slots are
serial, in service order, so arrival order at the workers is the plan's order).

**Order and prefetches reach the workers** as the clients' send times (each request is sent
when the plan says, so a worker serves them in plan order) and as PREFETCH orders the
coordinator sends each worker at a switching job's planned load start, with the models that
follow as the eviction hint.

Pure: no sockets; the caller passes the clock (``now``, monotonic seconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from edgesplit.scheduling import (ModelLibrary, Problem, Request, ScheduleError, ServerConfig, UplinkConfig,
                                  create_scheduler, evaluate, list_schedulers)

NO_PLAN = "none"  # scheduler name: admit everything at once, no planning (the baseline of "all send at once")
WIRE_EFFICIENCY = 0.92  # of a link's nominal rate, what a TCP upload delivers (IP/TCP/ZMTP framing, 1500 MTU)
SEND_LEAD_S = 0.002  # on an unlimited link, a request is sent this long before its job's load is due
HOP_ALLOWANCE_S = 0.002  # per stage: decode, encode and the next hop's transfer on top of compute
DEFAULT_LOAD_RATE = 100e6  # bytes/s, until a worker has measured its own


def scheduler_names() -> list[str]:
    """What ``--scheduler`` accepts: the scheduling registry's names and ``none``."""
    return [n for n in list_schedulers() if n not in ("exact",)] + [NO_PLAN]


@dataclass(frozen=True)
class Ask:
    """One request asking to be scheduled (times: the coordinator's monotonic clock)."""

    client: bytes
    rid: bytes
    model: str
    user: str
    deadline: float  # absolute: the result must exist by then
    input_bytes: int
    arrived: float


@dataclass(frozen=True)
class HostedModel:
    """A deployed model as one server sees it (built by the coordinator from live state)."""

    workers: tuple[str, ...]  # the primary worker of each stage, in route order
    blocks: Mapping[str, int]  # "worker:block id" -> bytes
    infer_s: float  # estimated inference time through every stage (before the margin)
    measured: bool = True  # infer_s comes from the workers' reports (else a profile or a guess)


@dataclass(frozen=True)
class Decision:
    """The answer to one ask: admitted with its plan, or refused with the reason (times relative to the decision)."""

    ask: Ask
    admitted: bool
    reason: str = ""
    send_in_s: float = 0.0  # start the upload this long after the answer
    upload_s: float = 0.0  # planned length of the upload (0: unlimited link)
    start_in_s: float = 0.0  # planned start of its inference
    end_in_s: float = 0.0  # planned end (the result)
    method: str = ""
    server: str = ""

    def body(self) -> dict[str, object]:
        """The ADMIT reply's body (milliseconds)."""
        return {"send_in_ms": round(self.send_in_s * 1000, 3), "upload_ms": round(self.upload_s * 1000, 3),
                "start_ms": round(self.start_in_s * 1000, 3), "end_ms": round(self.end_in_s * 1000, 3),
                "method": self.method, "server": self.server}


@dataclass(frozen=True)
class PrefetchOrder:
    """Make ``model`` resident on ``workers`` at ``at`` (monotonic), evicting by ``hint``."""

    at: float
    workers: tuple[str, ...]
    model: str
    hint: tuple[str, ...]


@dataclass
class _Committed:
    """A server's admitted work: when it is planned to end and what is resident then."""

    free_at: float = 0.0
    last_model: str | None = None
    blocks: frozenset[str] = frozenset()


@dataclass
class Admission:
    """The admission window and the online state of every server and of the uplink."""

    scheduler: str = "auto"
    window_s: float = 0.005
    uplink_rate_bytes_per_s: float = 0.0  # nominal; 0 = unlimited
    margin: float = 0.25  # inference estimates are planned as (1 + margin) x estimate + allowance
    pending: list[Ask] = field(default_factory=list)
    committed: dict[str, _Committed] = field(default_factory=dict)
    link_free_at: float = 0.0
    decided: int = 0
    admitted: int = 0

    def __post_init__(self) -> None:
        if self.scheduler not in scheduler_names():
            raise ScheduleError(f"scheduler {self.scheduler!r} unknown; choose one of {scheduler_names()}")
        self._solve = None if self.scheduler == NO_PLAN else create_scheduler(self.scheduler)

    @property
    def plan_rate(self) -> float:
        """The uplink rate plans use (bytes/s; inf when unlimited)."""
        return self.uplink_rate_bytes_per_s * WIRE_EFFICIENCY if self.uplink_rate_bytes_per_s > 0 else math.inf

    def add(self, ask: Ask) -> None:
        self.pending.append(ask)

    def due_at(self) -> float | None:
        """When the open window closes (None: no ask waits)."""
        return self.pending[0].arrived + self.window_s if self.pending else None

    def decide(self, now: float, hosted: Mapping[str, HostedModel], resident: Mapping[str, frozenset[str]],
               load_rate: Mapping[str, float]) -> tuple[list[Decision], list[PrefetchOrder]]:
        """Close the window: one decision per pending ask, and the prefetches the plans need.

        Args:
            now: the decision time (monotonic s).
            hosted: every deployed model with a live route.
            resident: per worker, the "worker:block id"s its last report says are resident.
            load_rate: per worker, its measured load rate (bytes/s; <= 0 when not measured yet).
        """
        asks = list(self.pending)  # cleared once every ask has its answer (the caller answers them on an error)
        out: list[Decision] = []
        prefetches: list[PrefetchOrder] = []
        by_server: dict[str, list[Ask]] = {}
        servers = group_servers(hosted)
        for ask in asks:
            if ask.model not in hosted:
                out.append(Decision(ask, False, f"model {ask.model} has no live route right now (being deployed or "
                                                "its workers were lost); ask again shortly"))
                continue
            by_server.setdefault(servers[ask.model], []).append(ask)
        for key in sorted(by_server):
            models = {m: h for m, h in hosted.items() if servers[m] == key}
            decisions, orders = self._decide_server(now, key, by_server[key], models, resident, load_rate)
            out += decisions
            prefetches += orders
        self.pending = []
        self.decided += len(out)
        self.admitted += sum(d.admitted for d in out)
        return out, prefetches

    def _decide_server(self, now: float, key: str, asks: list[Ask], models: Mapping[str, HostedModel],
                       resident: Mapping[str, frozenset[str]], load_rate: Mapping[str, float]
                       ) -> tuple[list[Decision], list[PrefetchOrder]]:
        workers = sorted({w for h in models.values() for w in h.workers})
        if self._solve is None:
            return [Decision(a, True, send_in_s=0.0, start_in_s=0.0, end_in_s=a.deadline - now, method=NO_PLAN,
                             server=key) for a in asks], []
        comm = self.committed.setdefault(key, _Committed())
        start = max(0.0, comm.free_at - now)
        if start > 0 and comm.last_model is not None:
            r0 = comm.blocks
        else:
            r0 = frozenset().union(*(resident.get(w, frozenset()) for w in workers))
        rates = [load_rate.get(w, 0.0) for w in workers]
        rate = min((r for r in rates if r > 0), default=DEFAULT_LOAD_RATE)
        sizes: dict[str, int] = {}
        for h in models.values():
            sizes.update(h.blocks)
        library = ModelLibrary(sizes, {m: frozenset(h.blocks) for m, h in models.items()})
        release = max(0.0, self.link_free_at - now)
        reqs = [Request(a.rid.hex(), a.user, a.model, a.input_bytes, self.planned_infer_s(models[a.model]),
                        a.deadline - now, arrival_s=release) for a in asks]
        problem = Problem(library, reqs, ServerConfig(rate, start_s=start, resident_blocks=r0),
                          UplinkConfig(total_rate_bytes_per_s=self.plan_rate))
        schedule = self._solve(problem)
        jobs = schedule.timeline.jobs
        slots = _upload_slots(jobs, [problem.requests[k].input_bytes for k in schedule.order], self.plan_rate)
        out: list[Decision] = []
        served = set(schedule.order)
        for n, (k, job) in enumerate(zip(schedule.order, jobs)):
            up = slots[n]
            send_in = up[0] if up is not None else max(0.0, job.load_start_s - SEND_LEAD_S)
            out.append(Decision(asks[k], True, send_in_s=send_in, upload_s=(up[1] - up[0]) if up else 0.0,
                                start_in_s=job.start_s, end_in_s=job.end_s, method=schedule.method, server=key))
        for k, ask in enumerate(asks):
            if k not in served:
                why = _why_not(problem, k, len(served), len(asks), start, schedule.method)
                if not models[ask.model].measured:
                    why += (f" (no worker has reported {ask.model}'s compute time yet: it was planned with a guess; "
                            "run it once without a deadline to measure it)")
                out.append(Decision(ask, False, why, method=schedule.method, server=key))
        orders = []
        for n, job in enumerate(jobs):
            if job.load_bytes > 0:
                hint = tuple(dict.fromkeys(j.model for j in jobs[n + 1:] if j.model != job.model))
                orders.append(PrefetchOrder(now + job.load_start_s, models[job.model].workers, job.model, hint))
        if jobs:
            last = jobs[-1]
            comm.free_at, comm.last_model = now + last.end_s, last.model
            comm.blocks = frozenset(models[last.model].blocks)
            ends = [s[1] for s in slots if s is not None]
            if ends:
                self.link_free_at = max(self.link_free_at, now + max(ends))
        return out, orders

    def planned_infer_s(self, h: HostedModel) -> float:
        """The inference time a plan reserves for one request of ``h``."""
        return h.infer_s * (1 + self.margin) + HOP_ALLOWANCE_S * len(h.workers)

    def forget(self, workers: Sequence[str]) -> None:
        """Drop the admitted state of servers that contain any of ``workers`` (lost or redeployed)."""
        gone = set(workers)
        for key in list(self.committed):
            if gone & set(key.split("+")):
                del self.committed[key]


def group_servers(hosted: Mapping[str, HostedModel]) -> dict[str, str]:
    """Model -> its server's key ("w0+w1"): routes that share a worker belong to one server."""
    parent: dict[str, str] = {}

    def find(w: str) -> str:
        while parent.setdefault(w, w) != w:
            parent[w] = parent[parent[w]]
            w = parent[w]
        return w

    for h in hosted.values():
        for w in h.workers[1:]:
            parent[find(w)] = find(h.workers[0])
        find(h.workers[0])
    members: dict[str, list[str]] = {}
    for w in parent:
        members.setdefault(find(w), []).append(w)
    return {m: "+".join(sorted(members[find(h.workers[0])])) for m, h in hosted.items()}


def _upload_slots(jobs: Sequence, sizes: Sequence[int], rate: float) -> list[tuple[float, float] | None]:
    """Each served upload's slot on the shared link: serial, in service order, each ending at its planned end.

    The schedulers' shared link serves uploads by service position; all of a window's
    uploads are released together, so the link serves them one after another: upload n
    holds the whole link during [u_n - D_n / B, u_n]. None: nothing to pace (no bytes, or an
    unlimited link).
    """
    if math.isinf(rate):
        return [None] * len(jobs)
    return [(j.upload_end_s - d / rate, j.upload_end_s) if d > 0 else None for j, d in zip(jobs, sizes)]


def _why_not(problem: Problem, k: int, served: int, asked: int, start_s: float, method: str) -> str:
    """Why request k was refused: alone it ends too late, or it would make admitted ones late."""
    r = problem.requests[k]
    alone = evaluate(problem, [k]).jobs[0]
    if alone.end_s > r.deadline_s:
        load = (f"loading {alone.load_bytes / 1e6:.1f} MB takes {(alone.load_end_s - alone.load_start_s) * 1000:.0f} "
                "ms, " if alone.load_bytes else "")
        queue = f"{start_s * 1000:.0f} ms of admitted work come first, " if start_s > 0 else ""
        upload = (f"its upload ends at {alone.upload_end_s * 1000:.0f} ms, "
                  if alone.upload_end_s > problem.requests[k].arrival_s + 1e-9 else "")
        return (f"deadline {r.deadline_s * 1000:.0f} ms from now cannot be met for {r.model}: {queue}{load}{upload}"
                f"inference takes {r.infer_s * 1000:.0f} ms, so the earliest result is at {alone.end_s * 1000:.0f} ms")
    return (f"deadline {r.deadline_s * 1000:.0f} ms for {r.model} fits alone, but not with the others: the "
            f"{method} schedule admits {served} of the {asked} requests of this window and found no order that adds "
            "this one without making one late")
