"""Admission: the coordinator's short window of scheduled requests, what it decides, and when each may go.

A request submitted with a deadline (``Client.submit(..., deadline_ms=, user=)``) asks the
coordinator first (ADMIT: model, user, deadline, input bytes). Asks gather for
``admission_window_ms``; then, per *server*, one ``edgesplit.scheduling`` problem is built
from the live state and solved by the configured scheduler. Every ask is answered at once:

- admitted, with the plan's times (when it is planned to upload, start and end);
- refused with ``DeadlineUnmeetable``, naming the reason (alone it would end too late, or
  admitting it would make admitted ones late).

An admitted request is then **held** until the coordinator *releases* it (ADMIT with ``go``):
at the start of its slot of the shared uplink, or, on an unlimited link, when its job's load
is due. Until then it is re-planned with every later window: a window's problem is every held
request of the server plus the new asks, so a request for a model that is queued anyway joins
the others of that model instead of costing a second switch. A re-plan is adopted only when
it keeps every held request (each still on time, as the evaluator checks); otherwise the new
asks are planned after the held ones, whose plan stays as it was. Released work is never
reordered. Each result's client reports how late against the plan it came (DONE): a server
found behind moves its held work later by that much (``observe``), so plans follow the
workers rather than drift from them. With ``--scheduler none`` everything is admitted and
released at once.

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
profiled block times), times ``1 + margin`` plus a fixed allowance per hop. The uplink is
one link for all clients: a server's uploads are planned after the released uploads and
the other servers' held ones, one at a time in service order, so a worker receives its
requests in the plan's order.

**Order and prefetches reach the workers** as the releases (each request is sent when the
plan says) and as PREFETCH orders sent with a switching job's release, naming the models
that follow as the eviction hint.

Pure: no sockets; the caller passes the clock (``now``, monotonic seconds; the perf counter only times decisions).
"""
from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from edgesplit.scheduling import (ModelLibrary, Problem, Request, Schedule, ScheduleError, ServerConfig,
                                  UplinkConfig, create_scheduler, evaluate, list_schedulers)

NO_PLAN = "none"  # scheduler name: admit everything and release it at once (the baseline of "all send at once")
WIRE_EFFICIENCY = 0.92  # of a link's nominal rate, what a TCP upload delivers (IP/TCP/ZMTP framing, 1500 MTU)
SEND_LEAD_S = 0.002  # on an unlimited link, a request is released this long before its job's load is due
HOP_ALLOWANCE_S = 0.002  # per stage: decode, encode and the next hop's transfer on top of compute
END_GUARD_S = 0.01  # a plan ends every request this long before its deadline (the result's way back, jitter)
DEFAULT_LOAD_RATE = 100e6  # bytes/s, until a worker has measured its own
MAX_PENDING_ASKS = 4096  # asks one window takes; beyond, an ask is refused as OVERLOADED
MAX_HELD_REPLAN = 64  # held requests of a server re-planned with a window; beyond, new asks go after them
LAG_TOLERANCE_S = 0.005  # a server found this much behind its plan has its held work moved later
MAX_LAG_S = 10.0  # a reported lag is believed up to this
MAX_RUNNING = 8192  # released requests whose result is not reported yet (oldest forgotten first)


def scheduler_names() -> list[str]:
    """What ``--scheduler`` accepts: the scheduling registry's names (but the exponential oracle) and ``none``."""
    return [n for n in list_schedulers() if n != "exact"] + [NO_PLAN]


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
class Job:
    """An admitted request's place in its server's plan (absolute monotonic times)."""

    ask: Ask
    server: str
    admitted_at: float  # when its admission was answered: the plan's times are sent relative to it
    send_at: float  # release: the client sends its input then
    upload_end: float | None  # end of its upload slot (None: unlimited link, or nothing to send)
    load_bytes: int
    start: float
    end: float
    method: str
    blocks: frozenset[str]  # its model's blocks: resident once it ran

    def body(self, go: bool = False) -> dict[str, object]:
        """An ADMIT answer's body: the plan in ms after the admission was answered (``go``: send now)."""
        def ms(t: float) -> float:
            return round((t - self.admitted_at) * 1000, 3)
        upload = 0.0 if self.upload_end is None else round((self.upload_end - self.send_at) * 1000, 3)
        body: dict[str, object] = {"send_in_ms": ms(self.send_at), "upload_ms": upload, "start_ms": ms(self.start),
                                   "end_ms": ms(self.end), "method": self.method, "server": self.server}
        if go:
            body["go"] = True
        return body


@dataclass(frozen=True)
class Refusal:
    ask: Ask
    reason: str


@dataclass(frozen=True)
class Release:
    """A held request whose time has come: tell its client to send; prefetch its model when it switches."""

    job: Job
    prefetch_workers: tuple[str, ...] = ()
    hint: tuple[str, ...] = ()


@dataclass
class _Released:
    """A server's released work: when it is planned to end and what is resident then."""

    free_at: float = 0.0
    last_model: str | None = None
    blocks: frozenset[str] = frozenset()


@dataclass
class Admission:
    """The admission window, the held plan of every server, and what has been released."""

    scheduler: str = "auto"
    window_s: float = 0.005
    uplink_rate_bytes_per_s: float = 0.0  # nominal; 0 = unlimited
    margin: float = 0.25  # inference estimates are planned as (1 + margin) x estimate + allowance
    pending: list[Ask] = field(default_factory=list)  # asks of the open window
    held: dict[str, list[Job]] = field(default_factory=dict)  # server -> admitted, not released, in plan order
    released: dict[str, _Released] = field(default_factory=dict)
    link_free_at: float = 0.0  # end of the last released upload slot
    counts: dict[str, int] = field(default_factory=lambda: {"asked": 0, "admitted": 0, "refused": 0,
                                                            "replans": 0, "replans_kept": 0, "lagged": 0})
    running: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # rid -> (job, shift then)
    shift: dict[str, float] = field(default_factory=dict)  # server -> how far its plan was moved later so far
    decision_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2048))  # per window

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

    @property
    def window_end(self) -> float | None:
        """When the open window closes (None: no ask waits)."""
        return self.pending[0].arrived + self.window_s if self.pending else None

    def due_at(self) -> float | None:
        """When the open window closes or the next held request is released (None: nothing waits)."""
        times = [jobs[0].send_at for jobs in self.held.values() if jobs]
        if self.window_end is not None:
            times.append(self.window_end)
        return min(times) if times else None

    def window_due(self, now: float) -> bool:
        return self.window_end is not None and now >= self.window_end

    # --- deciding -------------------------------------------------------------------------------
    def decide(self, now: float, hosted: Mapping[str, HostedModel], resident: Mapping[str, frozenset[str]],
               load_rate: Mapping[str, float]) -> tuple[list[Job], list[Refusal]]:
        """Close the window: every pending ask is admitted (a held job) or refused.

        Args:
            now: the decision time (monotonic s).
            hosted: every deployed model with a live route.
            resident: per worker, the "worker:block id"s its last report says are resident.
            load_rate: per worker, its measured load rate (bytes/s; <= 0 when not measured yet).
        """
        t0 = time.perf_counter()
        asks = list(self.pending)  # cleared once every ask has its answer (the caller answers them on an error)
        admitted: list[Job] = []
        refused: list[Refusal] = []
        by_server: dict[str, list[Ask]] = {}
        servers = group_servers(hosted)
        seen = {j.ask.rid for jobs in self.held.values() for j in jobs}
        for ask in asks:
            if ask.rid in seen:  # one client's reused id must not fail the window for everyone
                refused.append(Refusal(ask, "this request id is already admitted and waiting; request ids are unique"))
                continue
            seen.add(ask.rid)
            if ask.model not in hosted:
                refused.append(Refusal(ask, f"model {ask.model} has no live route right now (being deployed or its "
                                            "workers were lost); ask again shortly"))
                continue
            by_server.setdefault(servers[ask.model], []).append(ask)
        for key, jobs in self.held.items():
            if any(servers.get(j.ask.model) != key for j in jobs):
                self._expedite(key, now)  # a route moved: what the server held goes now, outside any plan
        for key in sorted(by_server):
            models = {m: h for m, h in hosted.items() if servers[m] == key}
            a, r = self._decide_server(now, key, by_server[key], models, resident, load_rate)
            admitted += a
            refused += r
        self.pending = []
        self.counts["asked"] += len(asks)
        self.counts["admitted"] += len(admitted)
        self.counts["refused"] += len(refused)
        self.decision_ms.append((time.perf_counter() - t0) * 1000)
        return admitted, refused

    def report(self) -> dict[str, object]:
        """Counters and the decision time per window (p50, p99, max over the last 2,048 windows; ms)."""
        ms = sorted(self.decision_ms)
        pick = (lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 3)) if ms else (lambda q: 0.0)
        return {"scheduler": self.scheduler, **self.counts,
                "shift_ms": {k: round(v * 1000, 1) for k, v in self.shift.items()}, "windows": len(ms),
                "decision_ms_p50": pick(0.5),
                "decision_ms_p99": pick(0.99), "decision_ms_max": pick(1.0),
                "held": sum(len(j) for j in self.held.values())}

    def _decide_server(self, now: float, key: str, asks: list[Ask], models: Mapping[str, HostedModel],
                       resident: Mapping[str, frozenset[str]], load_rate: Mapping[str, float]
                       ) -> tuple[list[Job], list[Refusal]]:
        held = self.held.setdefault(key, [])
        if self._solve is None:  # no plan: everything goes now
            jobs = [Job(a, key, now, now, None, 0, now, a.deadline, NO_PLAN, frozenset()) for a in asks]
            held.extend(jobs)
            return jobs, []
        rel = self.released.setdefault(key, _Released())
        workers = sorted({w for h in models.values() for w in h.workers})
        rate = min((r for r in (load_rate.get(w, 0.0) for w in workers) if r > 0), default=DEFAULT_LOAD_RATE)
        r0 = rel.blocks if rel.last_model is not None else frozenset().union(
            *(resident.get(w, frozenset()) for w in workers))
        others_link = max([self.link_free_at] + [j.upload_end for k, js in self.held.items() if k != key
                                                 for j in js if j.upload_end is not None])
        answered = {id(j.ask): j.admitted_at for j in held}
        schedule = None
        replan = held and len(held) <= MAX_HELD_REPLAN and all(j.method != "released-early" for j in held)
        if replan:  # re-plan the held ones with the new asks
            self.counts["replans"] += 1
            cands = [j.ask for j in held] + asks
            problem = self._problem(now, cands, models, rate, rel.free_at, r0, others_link)
            schedule = self._solve(problem)
            if set(range(len(held))) <= set(schedule.order):
                self.counts["replans_kept"] += 1
                held.clear()
            else:
                schedule = None
        if schedule is None:  # the new asks after the held ones, whose plan stays
            cands = list(asks)
            if held:
                free_at, r0 = held[-1].end, held[-1].blocks
            else:
                free_at = rel.free_at
            link = max([others_link] + [j.upload_end for j in held if j.upload_end is not None])
            problem = self._problem(now, cands, models, rate, free_at, r0, link)
            schedule = self._solve(problem)
        jobs = self._jobs(now, key, problem, schedule, cands, models, answered)
        held.extend(jobs)
        served = {id(j.ask) for j in jobs}
        new = {id(a) for a in asks}
        admitted = [j for j in jobs if id(j.ask) in new]
        refused = [Refusal(a, self._why_not(problem, k, schedule, models))
                   for k, a in enumerate(cands) if id(a) in new and id(a) not in served]
        return admitted, refused

    def _problem(self, now: float, asks: Sequence[Ask], models: Mapping[str, HostedModel], rate: float,
                 free_at: float, r0: frozenset[str], link_free_at: float) -> Problem:
        sizes: dict[str, int] = {}
        for h in models.values():
            sizes.update(h.blocks)
        library = ModelLibrary(sizes, {m: frozenset(h.blocks) for m, h in models.items()})
        release = max(0.0, link_free_at - now)
        reqs = [Request(a.rid.hex(), a.user, a.model, a.input_bytes, self.planned_infer_s(models[a.model]),
                        a.deadline - END_GUARD_S - now, arrival_s=release) for a in asks]
        return Problem(library, reqs, ServerConfig(rate, start_s=max(0.0, free_at - now), resident_blocks=r0),
                       UplinkConfig(total_rate_bytes_per_s=self.plan_rate))

    def _jobs(self, now: float, key: str, problem: Problem, schedule: Schedule, cands: Sequence[Ask],
              models: Mapping[str, HostedModel], answered: Mapping[int, float]) -> list[Job]:
        """The schedule's jobs with absolute times; a held job keeps when its admission was answered."""
        out = []
        for k, t in zip(schedule.order, schedule.timeline.jobs):
            ask = cands[k]
            d = problem.requests[k].input_bytes
            if math.isinf(self.plan_rate) or d == 0:
                send, up_end = max(now, now + t.load_start_s - SEND_LEAD_S), None
            else:
                send, up_end = now + t.upload_end_s - d / self.plan_rate, now + t.upload_end_s
            out.append(Job(ask, key, answered.get(id(ask), now), send, up_end, t.load_bytes, now + t.start_s,
                           now + t.end_s, schedule.method, frozenset(models[ask.model].blocks)))
        return out

    def planned_infer_s(self, h: HostedModel) -> float:
        """The inference time a plan reserves for one request of ``h``."""
        return h.infer_s * (1 + self.margin) + HOP_ALLOWANCE_S * len(h.workers)

    def _why_not(self, problem: Problem, k: int, schedule: Schedule, models: Mapping[str, HostedModel]) -> str:
        why = why_refused(problem, k, schedule)
        model = problem.requests[k].model
        if not models[model].measured:
            why += (f" (no worker has reported {model}'s compute time yet: it was planned with a guess; run it once "
                    "without a deadline to measure it)")
        return why

    # --- releasing -------------------------------------------------------------------------------
    def release_due(self, now: float) -> list[Release]:
        """Held jobs whose send time has come, in plan order per server; the server's state moves past them."""
        out: list[Release] = []
        for key, jobs in self.held.items():
            while jobs and jobs[0].send_at <= now:
                out.append(self._release(key, jobs))
        return out

    def _release(self, key: str, jobs: list[Job]) -> Release:
        job = jobs.pop(0)
        rel = self.released.setdefault(key, _Released())
        rel.free_at = max(rel.free_at, job.end)
        if job.method != NO_PLAN:
            rel.last_model, rel.blocks = job.ask.model, job.blocks
            self.running[job.ask.rid] = (job, self.shift.get(key, 0.0))
            while len(self.running) > MAX_RUNNING:
                self.running.popitem(last=False)
        if job.upload_end is not None:
            self.link_free_at = max(self.link_free_at, job.upload_end)
        if job.load_bytes <= 0:
            return Release(job)
        hint = tuple(dict.fromkeys(j.ask.model for j in jobs if j.ask.model != job.ask.model))
        return Release(job, tuple(sorted({b.rsplit(":", 1)[0] for b in job.blocks})), hint)

    def observe(self, client: bytes, rid: bytes, lag_s: float) -> float:
        """A released request's result came ``lag_s`` after the end its client was given: keep the plan honest.

        When its server is behind the plan (beyond what earlier reports already moved), the
        server's released work is taken to end that much later and everything it holds moves
        later too (its releases as well, on an unlimited link, so a lagging worker's queue does
        not grow); the next window re-plans from there, refusing what no longer fits.
        Returns how far the server's plan was moved (s).
        """
        entry = self.running.get(rid)
        if entry is None or entry[0].ask.client != client or not math.isfinite(lag_s):
            return 0.0  # unknown, already reported, or not this client's
        job, shift_then = self.running.pop(rid)
        key = job.server
        behind = min(lag_s, MAX_LAG_S) - (self.shift.get(key, 0.0) - shift_then)
        if behind <= LAG_TOLERANCE_S:
            return 0.0
        self.shift[key] = self.shift.get(key, 0.0) + behind
        self.counts["lagged"] += 1
        rel = self.released.setdefault(key, _Released())
        rel.free_at += behind
        self.held[key] = [replace(j, send_at=j.send_at + behind if j.upload_end is None else j.send_at,
                                  start=j.start + behind, end=j.end + behind) for j in self.held.get(key, [])]
        return behind

    def _expedite(self, key: str, now: float) -> None:
        """Everything ``key`` holds is released at once, and its state is forgotten."""
        self.held[key] = [replace(j, send_at=now, method="released-early") for j in self.held.get(key, [])]
        self.released.pop(key, None)

    def forget(self, workers: Sequence[str], now: float) -> None:
        """A worker was lost: its servers' held requests are released at once (they replay as any request does)."""
        gone = set(workers)
        for key in list(self.held):
            if gone & set(key.split("+")):
                self._expedite(key, now)


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


def why_refused(problem: Problem, k: int, schedule: Schedule) -> str:
    """Why request k was refused: alone it ends too late, or it would make admitted ones late."""
    r = problem.requests[k]
    alone = evaluate(problem, [k]).jobs[0]
    start_s = problem.server.start_s
    if alone.end_s > r.deadline_s:
        load = (f"loading {alone.load_bytes / 1e6:.1f} MB takes {(alone.load_end_s - alone.load_start_s) * 1000:.0f} "
                "ms, " if alone.load_bytes else "")
        queue = f"{start_s * 1000:.0f} ms of admitted work come first, " if start_s > 0 else ""
        upload = (f"its upload ends at {alone.upload_end_s * 1000:.0f} ms, "
                  if alone.upload_end_s > r.arrival_s + 1e-9 else "")
        return (f"deadline {r.deadline_s * 1000:.0f} ms from now cannot be met for {r.model}: {queue}{load}{upload}"
                f"inference takes {r.infer_s * 1000:.0f} ms, so the earliest result is at {alone.end_s * 1000:.0f} ms")
    return (f"deadline {r.deadline_s * 1000:.0f} ms for {r.model} fits alone, but not with the others: the "
            f"{schedule.method} schedule admits {schedule.served} of the {len(problem.requests)} requests it planned "
            "and found no order that adds this one without making an admitted one late")
