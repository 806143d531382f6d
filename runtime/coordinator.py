"""The coordinator: worker registry from heartbeats, plan deployment, routes, block serving.

Run one per cluster::

    edgesplit coordinator --bind tcp://*:5555 --store ./store
    # Python: Coordinator(CoordinatorConfig(bind=..., store=...)).start()  (a background thread)

It never carries activations: clients ask it for a model's route and send their input
to the first stage's worker; the data goes worker to worker and back to the client.
One ROUTER socket serves workers (READY, HEARTBEAT, DEPLOYED, FETCH) and clients (HELLO,
ROUTE, WORKERS, MODELS, PLAN, LINK). A worker silent for ``heartbeat_ms x liveness`` is
purged and a NOTICE ``{"lost", "lost_endpoint"}`` goes to every client and worker, so
requests waiting on it are replayed on a replica or fail at once instead of at their
deadlines; a worker that finished a deploy is announced with ``{"alive", "alive_endpoint"}``.

Plans are durable (``plans.py``): every deployed plan is kept in ``<store>/plans/`` and the
coordinator keeps the cluster matching it without anybody calling deploy again:

- a planned worker that registers without its stages (it restarted, or the coordinator
  did) gets them back: the same plan id when its endpoint is unchanged, else the whole plan
  again under a new id, so the stages before it send to its new endpoint;
- a stage that lost every live replica (always the case with one replica) is re-planned:
  the same blocks on the least loaded live worker that can hold them, under a new id;
  with no such worker the plan is kept and re-applied when a worker returns;
- after its own restart it relearns from the workers' READY what they host, and waits
  ``heartbeat_ms x liveness`` for absent workers before moving their stages.

Keyed (``--keys DIR``), every connection is CURVE and the ZAP handler admits only listed
keys; each message is then checked against its sender's role (``security.roles``): only
workers register, heartbeat and fetch blocks, only operators deploy, undeploy and change
links and read the registry, users ask routes and admission. A worker name belongs to
the key that first registered it (kept across restarts) and an endpoint to the worker
planned there; a reported stage counts for routes only where a plan of this coordinator
put it; routes and DEPLOY orders carry each worker's key, so clients and workers speak
CURVE to exactly the workers the plan names.

A ROUTE asked while the model's route is broken and a deploy of it is under way is
answered when that deploy ends (or at the question's deadline), so clients replaying
requests after a loss get the repaired route without polling.
"""
from __future__ import annotations

import collections
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import zmq

from edgesplit.partitioner import BlockStore, EdgesplitError, ModelManifest
from edgesplit.scheduling import ScheduleError

from . import admission, protocol as P
from .config import human_size, opt
from .endpoints import check_metrics_bind
from .errors import (ConfigError, DeployError, Forbidden, NotDeployed, Overloaded, ProtocolError, RuntimeFailure,
                     UnknownModel)
from .links import LinkSpec
from .liveness import PeerTable
from .measuring import MAX_MEASURED_WORKERS, MeasureOrder
from .metrics import ClusterMetrics, MetricsServer
from .plan import PlannedHop, PlannedStage, group_replicas, layerwise_hops
from .plans import PLANS_DIR, WORKER_KEYS_FILE, LiveWorker, PlanRecord, PlanStore, Repair, reconcile
from .routes import route_of_plan, route_of_reports
from .protocol import Err, Msg
from .security.ratelimit import RateLimiter
from .security import InsecureNag, Peer, Security, check_exposure, is_loopback, load_keys
from .security.roles import CONNECT, CONTROL, coordinator_takes
from .transport import SocketOptions, Waker, recv, router, send
from .types import MAX_REPLICAS, Route, StageInfo, WorkerInfo, WorkerState, stages_from_msg

log = logging.getLogger("edgesplit.coordinator")

RETRY_INIT_S = 1.0  # a repair deploy that failed on a worker is tried again after this, doubling ...
RETRY_MAX_S = 60.0  # ... up to this
MAX_ROUTE_WAITERS = 4096  # ROUTE questions parked while a model is being (re)deployed
MAX_MEASURE_ORDERS = 8  # MEASURE orders queued at once (each takes every listed worker a while)
UNPROFILED_STAGE_MS = 100.0  # a stage never run nor profiled is planned with this compute time


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator's settings (``edgesplit coordinator --help`` lists them as flags)."""

    bind: str = opt("tcp://*:5555", "control endpoint to bind (workers and clients connect here)")
    store: str = opt("./store", "block store holding the models' manifests and blocks (workers fetch from it)")
    plan_dir: str | None = opt(None, "directory where deployed plans are kept across restarts "
                                     "(default: <store>/plans)")
    replan: bool = opt(True, "move a stage that lost every live replica onto a live worker (a new plan id); "
                             "--no-replan keeps the plan until one of its workers returns")
    heartbeat_ms: int = opt(P.HEARTBEAT_INTERVAL_MS, "heartbeat interval to workers")
    liveness: int = opt(P.HEARTBEAT_LIVENESS, "silent heartbeat intervals before a worker is declared lost")
    deploy_timeout_ms: int = opt(300_000, "how long a plan may take to load on every worker")
    serve_cache_bytes: int = opt(256 * 1024**2, "block file bytes kept in memory for serving fetches")
    scheduler: str = opt("auto", "how requests submitted with a deadline are admitted and ordered: auto (the DP "
                                 "capped at 8 ms, else the greedy), greedy, dp, fcfs (first come first served), "
                                 "edf, oblivious-greedy (blind to shared blocks), none (admit all, send at once)",
                         choices=admission.scheduler_names())
    admission_window_ms: float = opt(5.0, "how long requests with a deadline gather before one scheduling decision")
    uplink_bytes: int = opt(0, "the clients' shared uplink in bytes/s as the link's spec or tc gives it (e.g. 2MB); "
                               "uploads get serial slots of it (plans use 0.92 of it: TCP/IP framing); 0 = unlimited",
                            alias="--uplink-rate")
    admission_margin: float = opt(0.25, "inference is planned as (1 + margin) x the stages' median compute time")
    keys: str | None = opt(None, "key directory (`edgesplit keygen`): this coordinator's secret key and the public "
                                 "keys of the workers, operators and users it admits; every connection is then "
                                 "CURVE-encrypted and checked by role")
    insecure: bool = opt(False, "allow binding beyond loopback without --keys (anyone who reaches the port may "
                                "deploy, read weights and forge results; logged every minute)")
    control_rate: float = opt(P.CONTROL_RATE_PER_S, "control messages per second one peer may send (a burst of "
                                                    "4x that is allowed); beyond, they are refused as OVERLOADED")
    metrics_bind: str = opt("", "HOST:PORT for a Prometheus /metrics endpoint (e.g. 0.0.0.0:9464); empty = off")
    log_level: str = opt("info", "logging level", choices=["debug", "info", "warning", "error"])


@dataclass
class _WorkerRec:
    info: WorkerInfo
    ident: bytes
    stats: list[list[Any]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    resident: list[list[Any]] = field(default_factory=list)  # [[model, hop], ...] whose blocks are all loaded
    last_seen: float = field(default_factory=time.monotonic)
    claimed: list[StageInfo] = field(default_factory=list)  # every stage it reports (keyed: info.stages = ours)


@dataclass
class _PendingPlan:
    """DEPLOY orders out under one request id, until every worker answered DEPLOYED."""

    model: str
    plan: int
    waiting: set[str]
    deadline: float
    client: bytes | None = None  # who asked (None: the coordinator's own repair)
    rid: bytes = b""  # the client's request id
    commit: PlanRecord | None = None  # kept once every worker loaded it (a client's deploy)
    kind: str = "deploy"
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _LinkOrder:
    """A client's LINK order sent to every replica of the cut's sending stage."""

    client: bytes
    model: str
    cut: int
    plan: int
    waiting: set[str]
    deadline: float
    link: dict[str, Any] | None = None


@dataclass
class _PrefetchOrder:
    """A client's PREFETCH sent to every worker hosting a stage of the model."""

    client: bytes
    model: str
    waiting: set[str]
    deadline: float
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)


class Coordinator:
    """The coordinator daemon; ``run()`` blocks, ``start()`` runs it in a thread, ``stop()`` ends it."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        # every check of the settings first: a mistake must leave no store directories and no bound socket behind
        check_metrics_bind(cfg.metrics_bind)
        keys = load_keys(cfg.keys) if cfg.keys else None
        if keys is not None and keys.me.role != "coordinator":
            raise ConfigError(f"{keys.root}: the coordinator needs a coordinator key, this directory's secret key "
                              f"{keys.me.name} is a {keys.me.role} key")
        check_exposure("the coordinator", cfg.bind, keys is not None, cfg.insecure)
        self.store = BlockStore(cfg.store)
        self.plan_store = PlanStore(cfg.plan_dir or Path(cfg.store) / PLANS_DIR)
        self.records: dict[str, PlanRecord] = self.plan_store.load()  # model -> its kept plan
        self.ctx = zmq.Context(io_threads=1)
        self.sec = Security(self.ctx, keys, {CONTROL: CONNECT[CONTROL]})
        try:
            self.sock, self.endpoint = router(self.ctx, cfg.bind, SocketOptions(hwm_msgs=P.CONTROL_HWM_MSGS,
                                                                                max_frame_bytes=P.CHUNK_BYTES * 2),
                                              sec=self.sec, domain=CONTROL)
        except ConfigError:
            self.sec.close()
            self.ctx.destroy(linger=0)
            raise
        self._nag = InsecureNag("the coordinator", self.endpoint, keys is None and cfg.insecure
                                and not is_loopback(cfg.bind))
        self.limiter = RateLimiter(cfg.control_rate, max(1, int(cfg.control_rate * 4)))
        # keyed: worker name -> the key it first registered with, kept across restarts (a name is never handed over)
        self.worker_keys: dict[str, str] = self.plan_store.worker_keys() if keys is not None else {}
        self.refused: collections.Counter[str] = collections.Counter()  # messages refused, by reason
        self._peer: Peer | None = None  # the sender of the message being handled (keyed clusters)
        self.workers: dict[str, _WorkerRec] = {}
        self.live = PeerTable[str](cfg.heartbeat_ms, cfg.liveness)
        self.clients = PeerTable[bytes](cfg.heartbeat_ms, cfg.liveness * 4)
        self.plans: dict[bytes, _PendingPlan] = {}  # DEPLOY rid -> orders out
        self.link_orders: dict[bytes, _LinkOrder] = {}
        self.prefetches: dict[bytes, _PrefetchOrder] = {}
        self.measures: dict[bytes, MeasureOrder] = {}  # a client's MEASURE rid -> the order
        self.undeployed: set[str] = self.plan_store.undeployed()  # a worker back with one of these drops it
        self.lost: dict[tuple[str, int], list[str]] = {}  # (model, plan) -> workers lost while hosting it
        self.route_waiters: dict[str, list[tuple[bytes, bytes, float]]] = {}  # model -> [(client, rid, deadline)]
        self.seen: set[str] = set()  # workers registered since this coordinator started
        self._retry: dict[tuple[str, str], tuple[float, float]] = {}  # (model, worker) -> (retry at, delay s)
        self._manifests: dict[str, tuple[int, ModelManifest]] = {}  # model -> (file mtime_ns, manifest)
        self._files: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._last_plan = max((r.plan for r in self.records.values()), default=0)
        self._started = time.monotonic()
        self._announced_absent = False
        self.admission = admission.Admission(cfg.scheduler, cfg.admission_window_ms / 1000.0, cfg.uplink_bytes,
                                             cfg.admission_margin)
        self._stop = threading.Event()
        self._waker = Waker()
        self._thread: threading.Thread | None = None
        self.metrics = ClusterMetrics(self.admission.counts)  # read by /metrics scrapes on their own thread
        try:
            self.metrics_http = MetricsServer(cfg.metrics_bind, self.metrics) if cfg.metrics_bind else None
        except ConfigError:
            self.sec.close()
            self.ctx.destroy(linger=0)
            raise

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Coordinator":
        """Serve in a background thread (for scripts and tests)."""
        self._thread = threading.Thread(target=self.run, name="coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._waker.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def run(self) -> None:
        """The loop: poll, dispatch, heartbeat the workers, purge the silent ones, keep plans applied."""
        models, broken = self.store.scan_models()  # one bad manifest must not keep the others from serving
        for _, problem in broken:
            log.warning("W: %s; skipping that model (requests for it are refused, naming the file)", problem)
        log.info("coordinator on %s, store %s (%d models), %d kept plan(s) in %s", self.endpoint, self.store.root,
                 len(models), len(self.records), self.plan_store.root)
        interval = self.cfg.heartbeat_ms / 1000.0
        next_hb = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wake_at = min(next_hb, self.live.next_expiry() or next_hb, now + 0.1,
                              self.admission.due_at() or now + 1)
                events = dict(poller.poll(max(0, int((wake_at - now) * 1000))))
                if self._waker.fileno() in events:
                    self._waker.drain()
                if self.sock in events:
                    for _ in range(256):
                        try:
                            route, frames = recv(self.sock, 1)
                        except zmq.Again:
                            break
                        self._dispatch(route[0], frames)
                now = time.monotonic()
                if self.admission.window_due(now):
                    self._admit(now)
                self._release_admitted(now)
                self._nag.tick(now)
                if now >= next_hb:
                    next_hb = now + interval
                    for rec in self.workers.values():
                        send(self.sock, P.encode(Msg.HEARTBEAT, P.new_rid(), self.cfg.heartbeat_ms * self.cfg.liveness),
                             route=[rec.ident])
                    self._reconcile(now)
                for name in self.live.purge(now):
                    self._lose(name)
                self.clients.purge(now)
                self._expire(now)
        finally:
            if self.metrics_http is not None:
                self.metrics_http.close()
            self.sec.close()
            self.ctx.destroy(linger=0)
            self._waker.close()
            log.info("coordinator stopped")

    def _expire(self, now: float) -> None:
        """Link orders, deploys and parked route questions past their deadlines end with an error."""
        for rid, order in list(self.link_orders.items()):
            if now > order.deadline:
                del self.link_orders[rid]
                self._reply(order.client, P.encode_error(rid, Err.TIMEOUT, f"worker(s) {sorted(order.waiting)} did "
                                                                          "not confirm the link change in time"))
        for rid, pre in list(self.prefetches.items()):
            if now > pre.deadline:
                del self.prefetches[rid]
                self._reply(pre.client, P.encode_error(rid, Err.TIMEOUT, f"worker(s) {sorted(pre.waiting)} did not "
                                                                        f"finish loading {pre.model} in time"))
        for order in list(self.measures.values()):
            if now > order.deadline:
                for name in [*order.running.values(), *order.waiting]:
                    order.drop(name, "did not finish measuring in time")
        if self.measures:
            self._advance_measures()
        for rid, plan in list(self.plans.items()):
            if now > plan.deadline:
                self._fail_plan(rid, Err.TIMEOUT, f"workers {sorted(plan.waiting)} did not finish loading "
                                                  f"{plan.model} within {self.cfg.deploy_timeout_ms} ms",
                                blame=plan.waiting)
        for model in list(self.route_waiters):
            self._answer_route_waiters(model, now)

    # --- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, ident: bytes, frames: list[Any]) -> None:
        now = time.monotonic()
        self._peer = self.sec.peer_of(frames[0])  # keyed: who signed the handshake (None: open cluster)
        # before decoding: a flood costs a dict lookup per message; keyed, per key (new connections do not reset it)
        if not self.limiter.allow(self._peer.key if self._peer is not None else ident, now):
            self.refused["rate"] += 1
            if self.refused["rate"] % 1000 == 1:
                log.warning("W: %r sends more than %.0f control messages/s; dropped %d so far", ident[:32],
                            self.cfg.control_rate, self.refused["rate"])
            return
        try:
            msg = P.decode(frames, max_frame_bytes=P.CHUNK_BYTES * 2)
        except ProtocolError as e:
            log.warning("W: refused a message from %r: %s", ident[:32], e)
            send(self.sock, P.encode_error(P.salvage_rid(frames), Err.BAD_MESSAGE, f"coordinator: {e}"), route=[ident])
            return
        if self.sec.keyed and (self._peer is None or not coordinator_takes(self._peer.role, msg.type)):
            self.refused["role"] += 1
            role = self._peer.role if self._peer is not None else "unlisted"
            log.warning("W: refused %s from a %s key (%r)", msg.type.name, role, ident[:32])
            send(self.sock, P.encode_error(msg.rid, Err.FORBIDDEN, f"coordinator: a {role} key may not send "
                                           f"{msg.type.name}"), route=[ident])
            return
        handler = self._HANDLERS.get(msg.type)
        if handler is None:
            send(self.sock, P.encode_error(msg.rid, Err.BAD_MESSAGE, f"coordinator does not take {msg.type.name}"),
                 route=[ident])
            return
        try:
            handler(self, ident, msg)
        except RuntimeFailure as e:
            send(self.sock, P.encode_error(msg.rid, P.error_code(e), str(e)), route=[ident])
        except EdgesplitError as e:  # manifests, store: the caller asked for something that is not there
            send(self.sock, P.encode_error(msg.rid, Err.UNKNOWN_MODEL, str(e)), route=[ident])
        except (ValueError, TypeError, KeyError, IndexError) as e:  # a body of the wrong shape
            log.warning("W: refused %s from %r: %s: %s", msg.type.name, ident[:32], type(e).__name__, e)
            send(self.sock, P.encode_error(msg.rid, Err.BAD_MESSAGE, f"coordinator could not use this "
                                           f"{msg.type.name}: {type(e).__name__}: {e}"), route=[ident])

    def _reply(self, ident: bytes, frames: list[Any]) -> None:
        if not send(self.sock, frames, route=[ident]):
            log.warning("W: %r's queue is full; reply dropped (it will time out)", ident[:32])

    def _broadcast(self, body: dict[str, Any], skip: str | None = None) -> None:
        """A NOTICE to every client and every worker but ``skip``."""
        notice = P.encode(Msg.NOTICE, P.new_rid(), 0, {"body": body})
        for client in self.clients:
            send(self.sock, notice, route=[client])
        for rec in self.workers.values():
            if rec.info.name != skip:
                send(self.sock, notice, route=[rec.ident])

    # workers ---------------------------------------------------------------------------------
    def _on_ready(self, ident: bytes, msg: P.Message) -> None:
        info = WorkerInfo.from_msg(msg.body)
        if _worker_name(ident) != info.name:
            raise ProtocolError(f"bad message: worker connects as {ident!r:.40} but calls itself {info.name!r}")
        key = self._peer.key if self._peer is not None else ""
        claimed, info.stages = info.stages, self._issued(info.stages, info.name)
        if key and not self._may_register(ident, msg, info, key):
            return
        old = self.workers.get(info.name)
        if old is not None and old.ident != ident:
            if info.name in self.live and (old.info.endpoint != info.endpoint or old.info.host != info.host):
                log.warning("refused a second worker named %s at %s (host %s): %s at %s is alive", info.name,
                            info.endpoint, info.host, info.name, old.info.endpoint)
                self._reply(ident, P.encode_error(msg.rid, Err.NAME_TAKEN, (
                    f"worker name {info.name} is already taken by a live worker at {old.info.endpoint} (host "
                    f"{old.info.host}); give each worker its own --name")))
                return
            # the same name, host and endpoint from a new process: the old one was restarted
            log.warning("worker %s re-registered from a new process at %s (was %s)", info.name, info.endpoint,
                        old.info.endpoint)
            self._notify_lost(info.name, old.info.endpoint)
        self.workers[info.name] = _WorkerRec(info, ident, claimed=claimed)
        if key and self.worker_keys.get(info.name) != key:
            self.worker_keys[info.name] = key
            try:
                self.plan_store.save_worker_keys(self.worker_keys)
            except OSError as e:
                log.error("E: could not keep worker %s's key in %s: %s", info.name, self.plan_store.root, e)
        self.seen.add(info.name)
        for s in info.stages:  # a worker declared lost that comes back still hosts its stages
            names = self.lost.get((s.model, s.plan), [])
            if info.name in names:
                names.remove(info.name)
                if not names:
                    del self.lost[(s.model, s.plan)]
        self.live.refresh(info.name)
        log.info("worker %s registered: %s, %s, budget %d B, %d stage(s)", info.name, info.endpoint, info.device,
                 info.memory_budget_bytes, len(info.stages))
        self._reply(ident, P.encode(Msg.HEARTBEAT, msg.rid, 0))
        if info.stages:  # back with its stages (a blip, or the coordinator restarted): senders may use it again
            self._notify_alive(self.workers[info.name], info.stages)
        # a (re-)registered worker has dropped any deploy it was loading: those orders end here
        for rid, plan in list(self.plans.items()):
            if info.name in plan.waiting:
                self._fail_plan(rid, Err.WORKER_LOST, f"worker {info.name} registered again while loading "
                                                      f"{plan.model} (it restarted or lost its link)")
        for key in [k for k in self._retry if k[1] == info.name]:
            del self._retry[key]  # a fresh process deserves a fresh try
        self._reconcile(time.monotonic())
        self._end_prefetches(info.name, "registered again")
        for model in sorted({s.model for s in claimed} & self.undeployed):  # it missed the undeploy
            log.info("worker %s still hosts %s, undeployed meanwhile: undeploying it there", info.name, model)
            self._undeploy_on(model, [info.name], P.new_rid(), None)

    def _issued(self, stages: list[StageInfo], name: str) -> list[StageInfo]:
        """Keyed: only the stages this coordinator gave ``name`` (in a kept plan, or one being deployed)
        count for routes; a worker claiming others (another plan id, or another worker's stage of ours,
        to take a route over) is not believed. What it claims still counts for clean-up."""
        if not self.sec.keyed:
            return stages
        recs = [*self.records.values(), *(p.commit for p in self.plans.values() if p.commit is not None)]
        given = {(r.model, r.plan, k, h.start, h.end) for r in recs for k, h in enumerate(r.hops) if name in h.workers}
        kept = [s for s in stages if (s.model, s.plan, s.hop, s.start, s.end) in given]
        if len(kept) < len(stages):
            self.refused["plan_id"] += len(stages) - len(kept)
        return kept

    def _may_register(self, ident: bytes, msg: P.Message, info: WorkerInfo, key: str) -> bool:
        """Keyed: a name belongs to the key that first registered it (across restarts), and an endpoint to the
        worker that holds or is planned at it; anything else is refused as NAME_TAKEN."""
        bound = self.worker_keys.get(info.name)
        holder = next((n for n, w in self.workers.items() if w.info.endpoint == info.endpoint and n != info.name),
                      None) or next((n for r in self.records.values() for n, ep in r.endpoints.items()
                                     if ep == info.endpoint and n != info.name), None)
        if bound is not None and bound != key:
            why = (f"worker name {info.name} belongs to another key; if this board was given a new key, remove "
                   f"{info.name} from {self.plan_store.root / WORKER_KEYS_FILE} and restart the coordinator")
        elif holder is not None:
            why = f"endpoint {info.endpoint} belongs to another worker; give each worker its own --bind port"
        else:
            return True
        self.refused["name"] += 1
        log.warning("refused a READY as %s at %s: %s", info.name, info.endpoint, why)
        self._reply(ident, P.encode_error(msg.rid, Err.NAME_TAKEN, why))
        return False

    def _worker_at(self, ident: bytes) -> _WorkerRec | None:
        """The registered worker sending on ``ident`` (keyed: with the key it registered with), or None."""
        rec = self.workers.get(_worker_name(ident))
        if rec is None or rec.ident != ident or (self._peer is not None and
                                                 self.worker_keys.get(rec.info.name) != self._peer.key):
            return None
        return rec

    def _known_worker(self, ident: bytes, msg: P.Message) -> _WorkerRec | None:
        rec = self._worker_at(ident)
        if rec is None:
            self._reply(ident, P.encode(Msg.DISCONNECT, msg.rid, 0))
            return None
        rec.last_seen = time.monotonic()
        self.live.refresh(rec.info.name)
        return rec

    def _on_heartbeat(self, ident: bytes, msg: P.Message) -> None:
        rec = self._known_worker(ident, msg)
        if rec is None:
            return
        body = msg.body
        rec.claimed = stages_from_msg(P.body_get(body, "stages", list, []))
        rec.info.stages = self._issued(rec.claimed, rec.info.name)
        tel = dict(P.body_get(body, "telemetry", dict, {}))
        tel["kept"] = body.get("kept", 0)  # outputs awaiting an ACK: 0 when idle, else a leak
        tel["queue"] = body.get("queue", 0)
        tel.update({f"count_{k}": v for k, v in P.body_get(body, "counters", dict, {}).items() if isinstance(k, str)})
        rec.info.telemetry = {k: v for k, v in tel.items() if isinstance(k, str) and P.is_finite_number(v)}
        # what a worker reports is kept only in the shape it is used (found by fuzzing: a string where the load
        # rate goes once stopped the coordinator at its next admission window)
        rec.stats = [r for r in P.body_get(body, "stats", list, [])[:P.MAX_REPORTED_ROWS]
                     if isinstance(r, list) and len(r) == 6 and isinstance(r[0], str) and isinstance(r[1], int)
                     and all(P.is_finite_number(v) for v in r[2:])]
        rec.cache = {k: v for k, v in list(P.body_get(body, "cache", dict, {}).items())[:P.MAX_REPORTED_ROWS]
                     if isinstance(k, str) and P.is_finite_number(v)}
        rec.resident = [r for r in P.body_get(body, "resident", list, []) if isinstance(r, list) and len(r) == 2]
        self.metrics.heartbeat(rec.info.name, rec.info.endpoint, rec.info.telemetry, rec.stats, rec.cache,
                               body.get("metrics"), any(rec.info.name in p.waiting for p in self.plans.values()))

    def _on_deployed(self, ident: bytes, msg: P.Message) -> None:
        rec = self._known_worker(ident, msg)
        if rec is None:
            return
        model = msg.body.get("model")
        claimed = stages_from_msg(P.body_get(msg.body, "stages", list, []))
        rec.claimed = [s for s in rec.claimed if s.model != model] + claimed
        stages = self._issued(claimed, rec.info.name)
        rec.info.stages = [s for s in rec.info.stages if s.model != model] + stages
        plan = self.plans.get(msg.rid)
        if plan is None:
            return
        name = rec.info.name
        plan.waiting.discard(name)
        plan.loaded[name] = {k: msg.body.get(k) for k in ("load_ms", "fetched_bytes", "loaded_bytes", "freed_bytes",
                                                           "resident_bytes")}
        self._retry.pop((plan.model, name), None)
        if stages:
            self._notify_alive(rec, stages)
        if not plan.waiting:
            self._finish_plan(msg.rid)

    def _on_worker_error(self, ident: bytes, msg: P.Message) -> None:
        rec = self._known_worker(ident, msg)
        if rec is None:
            return
        for measure in list(self.measures.values()):
            if measure.finish(msg.rid, None, str(msg.get("err")[1])):
                self._advance_measures()
                return
        order = self.link_orders.pop(msg.rid, None) or self.prefetches.pop(msg.rid, None)
        if order is not None:
            self._reply(order.client, P.encode(Msg.ERROR, msg.rid, 0, {"err": msg.get("err")}))
        if msg.rid in self.plans:
            code, reason = msg.get("err")
            self._fail_plan(msg.rid, Err.DEPLOY_FAILED, reason, blame={rec.info.name})

    def _on_fetch(self, ident: bytes, msg: P.Message) -> None:
        rec = self._known_worker(ident, msg)
        if rec is None:
            return
        bid = P.body_get(msg.body, "id", str)
        off = P.body_get(msg.body, "off", int)
        length = P.body_get(msg.body, "len", int)
        if not 0 < length <= P.CHUNK_BYTES or off < 0:
            raise ProtocolError(f"bad message: FETCH of [{off}, +{length}), chunks are at most {P.CHUNK_BYTES} B")
        try:
            data = self._file(bid)
        except (EdgesplitError, ValueError) as e:
            self._reply(ident, P.encode_error(msg.rid, Err.MISSING_BLOCK, f"coordinator cannot serve block {bid[:16]}: {e}"))
            return
        chunk = memoryview(data)[off:off + length]
        self._reply(ident, P.encode(Msg.CHUNK, msg.rid, 0, {"body": {"id": bid, "off": off, "size": len(data)}},
                                    [chunk]))

    def _file(self, bid: str) -> bytes:
        data = self._files.get(bid)
        if data is None:
            data = self.store.read_bytes(bid)
            self._files[bid] = data
            while sum(len(v) for v in self._files.values()) > self.cfg.serve_cache_bytes and len(self._files) > 1:
                self._files.popitem(last=False)
        self._files.move_to_end(bid)
        return data

    def _lose(self, name: str) -> None:
        rec = self.workers.pop(name, None)
        if rec is None:
            return
        self.metrics.lost(name)
        for s in rec.info.stages:
            self.lost.setdefault((s.model, s.plan), []).append(name)
        while len(self.lost) > 256:
            del self.lost[next(iter(self.lost))]
        log.warning("worker %s (%s) lost: silent for %.1f s; notifying %d clients and %d workers", name,
                    rec.info.endpoint, self.live.ttl_s, len(self.clients), len(self.workers))
        self._notify_lost(name, rec.info.endpoint)
        for rid, plan in list(self.plans.items()):
            if name in plan.waiting:
                self._fail_plan(rid, Err.WORKER_LOST, f"worker {name} was lost while loading {plan.model}")
        self._end_prefetches(name, "was lost")
        for measure in list(self.measures.values()):
            measure.drop(name, "was lost")
        if self.measures:
            self._advance_measures()
        self.admission.forget([name], time.monotonic())  # what its server held goes now (and replays as usual)
        self._reconcile(time.monotonic())

    def _end_prefetches(self, name: str, what: str) -> None:
        """PREFETCH orders waiting on ``name`` end with WORKER_LOST (it will never answer them)."""
        for rid, order in list(self.prefetches.items()):
            if name in order.waiting:
                del self.prefetches[rid]
                self._reply(order.client, P.encode_error(rid, Err.WORKER_LOST, f"worker {name} {what} while "
                                                                               f"loading {order.model}"))

    def _notify_lost(self, name: str, endpoint: str) -> None:
        self._broadcast({"lost": name, "lost_endpoint": endpoint}, skip=name)

    def _notify_alive(self, rec: _WorkerRec, stages: list[StageInfo]) -> None:
        """``rec`` serves (again): tell everybody; and tell it which of its next stages' workers are absent.

        A worker that installs stages treats every endpoint they send to as alive; the ones
        that are not (a plan names them, they have not returned) are announced lost to it.
        """
        self._broadcast({"alive": rec.info.name, "alive_endpoint": rec.info.endpoint,
                         "alive_key": self.worker_keys.get(rec.info.name, "")}, skip=rec.info.name)
        live_eps = {w.info.endpoint for w in self.workers.values()}
        names = {ep: w for r in self.records.values() for w, ep in r.endpoints.items()}
        for ep in sorted({ep for s in stages for ep in s.next} - live_eps):
            send(self.sock, P.encode(Msg.NOTICE, P.new_rid(), 0, {"body": {"lost": names.get(ep, "?"),
                                                                            "lost_endpoint": ep}}),
                 route=[rec.ident])

    # clients ----------------------------------------------------------------------------------
    def _on_hello(self, ident: bytes, msg: P.Message) -> None:
        self.clients.refresh(ident)
        self._reply(ident, P.encode(Msg.HELLO, msg.rid, 0, {"body": {
            "coordinator": self.endpoint, "workers": len(self.workers), "heartbeat_ms": self.cfg.heartbeat_ms,
            "liveness": self.cfg.liveness, "admission": self.admission.report(),
            "refused": {**self.refused, "handshakes": self.sec.refused()}}}))

    def _on_route(self, ident: bytes, msg: P.Message) -> None:
        self.clients.refresh(ident)
        model = P.check_model_name(msg.get("mdl"))
        try:
            route = self.route(model)
        except RuntimeFailure:
            # a deploy of it is under way (a repair after a loss, say), or workers are still registering
            # after a coordinator restart: answered when the route serves or there is nothing left to wait for
            if self._may_wait(model) and sum(map(len, self.route_waiters.values())) < MAX_ROUTE_WAITERS:
                deadline = time.monotonic() + msg.budget_ms / 1000.0
                self.route_waiters.setdefault(model, []).append((ident, msg.rid, deadline))
                return
            raise
        self._reply(ident, P.encode(Msg.ROUTE, msg.rid, 0, {"mdl": model, "body": {"route": route.to_msg()}}))

    def _may_wait(self, model: str) -> bool:
        """Whether ``model``'s broken route may still mend by itself soon (a deploy, or the start-up grace)."""
        return self._deploying(model) or self._settling(time.monotonic())

    def _settling(self, now: float) -> bool:
        """The start-up grace: workers named in kept plans may still be re-registering."""
        return bool(self.records) and now < self._started + self.live.ttl_s

    def _answer_route_waiters(self, model: str, now: float) -> None:
        """Parked ROUTE questions of ``model``: the route once it serves, an error when nothing is left to wait for."""
        waiters = self.route_waiters.pop(model, [])
        if not waiters:
            return
        try:
            route, err = self.route(model), None
        except RuntimeFailure as e:
            route, err = None, e
        keep = []
        for ident, rid, deadline in waiters:
            if route is not None:
                self._reply(ident, P.encode(Msg.ROUTE, rid, 0, {"mdl": model, "body": {"route": route.to_msg()}}))
            elif self._may_wait(model) and now <= deadline:
                keep.append((ident, rid, deadline))
            else:
                self._reply(ident, P.encode_error(rid, P.error_code(err), str(err)))
        if keep:
            self.route_waiters[model] = keep

    def _on_workers(self, ident: bytes, msg: P.Message) -> None:
        self.clients.refresh(ident)
        now = time.monotonic()
        out = []
        for rec in self.workers.values():
            rec.info.last_seen_s = now - rec.last_seen
            rec.info.state = WorkerState.DEPLOYING if any(rec.info.name in p.waiting for p in self.plans.values()) \
                else WorkerState.LIVE
            rec.info.stats, rec.info.cache, rec.info.resident = rec.stats, rec.cache, rec.resident
            out.append(rec.info.to_msg())
        self._reply(ident, P.encode(Msg.WORKERS, msg.rid, 0, {}, [P.pack_blob(out)]))

    def _on_models(self, ident: bytes, msg: P.Message) -> None:
        self.clients.refresh(ident)
        out = []
        for name in self.store.list_models():
            m = self.store.manifest(name)
            try:
                route: list[str] | None = self.route(name).workers
            except RuntimeFailure:
                route = None
            out.append({"name": name, "n_blocks": m.n_blocks, "size_bytes": m.size_bytes,
                        "input_shape": list(m.input_shape), "route": route})
        self._reply(ident, P.encode(Msg.MODELS, msg.rid, 0, {}, [P.pack_blob(out)]))

    def _on_plan(self, ident: bytes, msg: P.Message) -> None:
        """A client's PLAN: ``model`` and either ``stages`` or ``workers``/``n_stages``/``splits``; ``replicas``, ``links``."""
        self.clients.refresh(ident)
        body = msg.body
        model = P.check_model_name(P.body_get(body, "model", str))
        manifest = self._manifest(model)
        live = sorted(self.workers)
        replicas = P.body_get(body, "replicas", int, None)
        if replicas is not None and not 1 <= replicas <= MAX_REPLICAS:
            raise DeployError(f"plan for {model}: replicas must be 1..{MAX_REPLICAS}, got {replicas}")
        if "stages" in body:
            stages = [PlannedStage.from_msg(s) for s in P.body_get(body, "stages", list)]
            hops = group_replicas(stages, manifest.n_blocks, model, replicas)
        else:
            workers = P.body_get(body, "workers", list, live) or live
            splits = P.body_get(body, "splits", list, None)
            n_stages = P.body_get(body, "n_stages", int, None)
            if not all(isinstance(w, str) for w in workers) or (
                    splits is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in splits)):
                raise ProtocolError("bad message: PLAN workers are names and splits are block indices")
            hops = layerwise_hops(manifest, [str(w) for w in workers], n_stages, splits, replicas or 1)
        unknown = sorted({w for h in hops for w in h.workers} - set(self.workers))
        if unknown:
            raise DeployError(f"plan for {model} names workers {unknown} that are not registered; live workers: {live}")
        self._check_budgets(manifest, hops)
        links_raw = P.body_get(body, "links", list, [None] * (len(hops) - 1))
        if len(links_raw) != len(hops) - 1:
            raise DeployError(f"plan for {model} has {len(hops)} stages, so {len(hops) - 1} cuts, but "
                              f"{len(links_raw)} link specs; give one per cut")
        links = tuple(LinkSpec.from_msg(v) for v in links_raw)
        named = {w for h in hops for w in h.workers}
        load = P.body_get(body, "load", bool, True)
        if model in self.undeployed:
            self.undeployed.discard(model)
            self._mark_undeployed(model, False)
        record = PlanRecord(model, self._take_plan_id(), manifest.n_blocks, tuple(hops), links,
                            {w: self.workers[w].info.endpoint for w in named},
                            replicas or max(len(h.workers) for h in hops))
        for rid, pending in list(self.plans.items()):  # a client's plan supersedes a repair in progress
            if pending.model == model and pending.client is None:
                del self.plans[rid]
        # workers hosting an older plan of this model get an empty stage list (undeploy)
        extra = sorted(w for w, r in self.workers.items() if w not in named and any(s.model == model
                                                                                    for s in r.claimed))
        pending = _PendingPlan(model, record.plan, set(), self._deploy_deadline(), client=ident, rid=msg.rid,
                               commit=record)
        self._send_deploys(msg.rid, manifest, record, record.workers + extra, pending, load)
        log.info("plan %d of %s: %s", record.plan, model, _describe(record.hops))

    def _on_link(self, ident: bytes, msg: P.Message) -> None:
        """A client's LINK order goes to every replica of the cut's sending stage; their replies come back here."""
        worker = self._worker_at(ident)
        if worker is not None:
            self._on_link_reply(worker.info.name, msg)
            return
        self._operator_only(msg)
        self.clients.refresh(ident)
        model = P.check_model_name(P.body_get(msg.body, "model", str))
        cut = P.body_get(msg.body, "cut", int)
        route = self.route(model)
        if not 0 <= cut < len(route.hops) - 1:
            raise DeployError(f"model {model} runs in {len(route.hops)} stage(s), so its cuts are "
                              f"0..{len(route.hops) - 2}; there is no cut {cut}")
        senders = [h.worker for h in route.replicas[cut]]
        body = {"model": model, "hop": cut, "plan": route.plan, "link": P.body_get(msg.body, "link", dict)}
        frames = P.encode(Msg.LINK, msg.rid, msg.budget_ms, {"body": body})
        for name in senders:
            if not send(self.sock, frames, route=[self.workers[name].ident]):
                raise DeployError(f"worker {name}'s control queue is full; try again")
        self.link_orders[msg.rid] = _LinkOrder(ident, model, cut, route.plan, set(senders),
                                               time.monotonic() + msg.budget_ms / 1000.0)

    def _operator_only(self, msg: P.Message) -> None:
        """Keyed: a worker key's LINK or PREFETCH is a reply to an order; as an order it needs an operator key."""
        if self._peer is not None and self._peer.role != "operator":
            self.refused["role"] += 1
            raise Forbidden(f"coordinator: a {self._peer.role} key may not order {msg.type.name}")

    def _on_link_reply(self, name: str, msg: P.Message) -> None:
        order = self.link_orders.get(msg.rid)
        if order is None or name not in order.waiting:
            return  # a late reply (the order ended with another replica's error)
        order.waiting.discard(name)
        order.link = P.body_get(msg.body, "link", dict)
        if order.waiting:
            return
        del self.link_orders[msg.rid]
        self._reply(order.client, P.encode(Msg.LINK, msg.rid, 0, {"body": msg.body}))
        rec = self.records.get(order.model)
        if rec is not None and rec.plan == order.plan and order.cut < len(rec.links):
            links = list(rec.links)
            try:
                links[order.cut] = LinkSpec.from_msg(order.link)
            except ProtocolError as e:
                log.warning("W: worker %s confirmed a link it cannot describe (%s); the kept plan keeps the old one",
                            name, e)
                return
            self._keep(rec.changed(links=tuple(links)))  # a worker that returns gets the link as it is now

    def _check_budgets(self, manifest: ModelManifest, hops: Sequence[PlannedHop]) -> None:
        """Refuse a plan whose stages on some worker exceed its memory budget, before anything is sent."""
        need: dict[str, int] = collections.Counter()
        for h in hops:
            for w in h.workers:
                need[w] += sum(b.size_bytes for b in manifest.blocks[h.start:h.end])
        for w, nbytes in sorted(need.items()):
            budget = self.workers[w].info.memory_budget_bytes if w in self.workers else 0
            if 0 < budget < nbytes:
                raise DeployError(f"plan for {manifest.name} does not fit worker {w}: its stages need "
                                  f"{human_size(nbytes)} ({nbytes} B), its memory budget is {human_size(budget)} "
                                  f"({budget} B); use more stages or workers, or raise that worker's --memory-budget")

    def _on_undeploy(self, ident: bytes, msg: P.Message) -> None:
        """Release a model: forget its plan and tell every worker hosting it to drop its stages.

        The model stays undeployed (until deployed again) for workers that were away: one that
        registers still hosting it is told to drop it then.
        """
        self.clients.refresh(ident)
        model = P.check_model_name(P.body_get(msg.body, "model", str))
        self._manifest(model)  # UnknownModel when it is not in the store
        self.records.pop(model, None)
        self.plan_store.remove(model)
        self.undeployed.add(model)
        self._mark_undeployed(model, True)
        for rid, pending in list(self.plans.items()):  # a deploy or repair in progress ends here
            if pending.model == model:
                self._fail_plan(rid, Err.DEPLOY_FAILED, f"{model} was undeployed meanwhile")
        targets = sorted(w for w, r in self.workers.items() if any(s.model == model for s in r.claimed))
        if not targets:
            self._reply(ident, P.encode(Msg.UNDEPLOY, msg.rid, 0, {"body": {"loaded": {}}}))
            return
        log.info("undeploy %s from %s", model, targets)
        self._undeploy_on(model, targets, msg.rid, ident)

    def _mark_undeployed(self, model: str, undeployed: bool) -> None:
        try:
            self.plan_store.mark_undeployed(model, undeployed)
        except OSError as e:
            log.error("E: could not record in %s that %s is %s: %s; a coordinator restart forgets it",
                      self.plan_store.root, model, "undeployed" if undeployed else "deployed", e)

    def _undeploy_on(self, model: str, targets: list[str], rid: bytes, client: bytes | None) -> None:
        """DEPLOY an empty stage list of ``model`` to ``targets``; ``client`` (if any) gets the figures."""
        plan = self._take_plan_id()
        self.plans[rid] = _PendingPlan(model, plan, set(targets), self._deploy_deadline(), client=client,
                                       rid=rid, kind="undeploy")
        frames = P.encode(Msg.DEPLOY, rid, self.cfg.deploy_timeout_ms, {"body": {
            "model": model, "plan": plan, "stages": [], "links_in": [], "links_out": []}},
            [self._manifest(model).to_json().encode()])
        for name in targets:
            if not send(self.sock, frames, route=[self.workers[name].ident]):
                self._fail_plan(rid, Err.OVERLOADED, f"worker {name}'s control queue is full", blame={name})
                return

    def _on_prefetch(self, ident: bytes, msg: P.Message) -> None:
        """A client's PREFETCH goes to every worker hosting the model; a worker's reply is collected here."""
        worker = self._worker_at(ident)
        if "loaded_bytes" in msg.body and worker is None:
            return  # a reply from a worker purged meanwhile (its order already ended)
        if worker is not None:
            order = self.prefetches.get(msg.rid)
            if order is None or worker.info.name not in order.waiting:
                return
            order.waiting.discard(worker.info.name)
            order.replies[worker.info.name] = dict(msg.body)
            if not order.waiting:
                del self.prefetches[msg.rid]
                self._reply(order.client, P.encode(Msg.PREFETCH, msg.rid, 0, {"body": {"loaded": order.replies}}))
            return
        self._operator_only(msg)
        self.clients.refresh(ident)
        model = P.check_model_name(P.body_get(msg.body, "model", str))
        hint = [m for m in P.body_get(msg.body, "hint", list, []) if isinstance(m, str)][:P.MAX_HINT_MODELS]
        targets = sorted(w for w, r in self.workers.items() if any(s.model == model for s in r.info.stages))
        if not targets:
            raise NotDeployed(f"model {model} is registered on no live worker; deploy it first")
        asked = P.body_get(msg.body, "workers", list, None)
        if asked is not None:
            unknown = sorted(str(w)[:64] for w in asked if w not in targets)
            if unknown:
                raise NotDeployed(f"workers {unknown} host no stage of {model}; its workers: {targets}")
            targets = sorted(set(asked))
        frames = P.encode(Msg.PREFETCH, msg.rid, msg.budget_ms, {"body": {"model": model, "hint": hint}})
        for name in targets:
            if not send(self.sock, frames, route=[self.workers[name].ident]):
                raise DeployError(f"worker {name}'s control queue is full; try again")
        self.prefetches[msg.rid] = _PrefetchOrder(ident, model, set(targets), time.monotonic() + msg.budget_ms / 1000.0)

    def _on_measure(self, ident: bytes, msg: P.Message) -> None:
        """A client's MEASURE goes to the listed workers one at a time; their replies are collected here."""
        worker = self._worker_at(ident)
        if worker is not None:
            try:
                reply = P.unpack_blob(msg.blob(0)) if msg.specs else None
            except ProtocolError:
                reply = None
            for order in list(self.measures.values()):
                if order.running.get(msg.rid) == worker.info.name:
                    ok = isinstance(reply, dict)
                    order.finish(msg.rid, reply if ok else None, None if ok else "a malformed reply")
            self._advance_measures()
            return
        self._operator_only(msg)
        self.clients.refresh(ident)
        body = msg.body
        model = P.check_model_name(P.body_get(body, "model", str))
        manifest = self._manifest(model)
        names = list(dict.fromkeys(P.body_get(body, "workers", list, None) or sorted(self.workers)))
        unknown = sorted(str(w)[:64] for w in names if w not in self.workers)
        if unknown:
            raise DeployError(f"cannot measure on {unknown}: not registered; live workers: {sorted(self.workers)}")
        if not names:
            raise DeployError("no live workers to measure; start some with `edgesplit worker`")
        if len(names) > MAX_MEASURED_WORKERS:
            raise DeployError(f"{len(names)} workers to measure; at most {MAX_MEASURED_WORKERS} at once (each probes "
                              "every other, and the planner is exact): list the workers a plan may use")
        batches = P.body_get(body, "batches", list, [1])
        if not (1 <= len(batches) <= 8 and all(type(b) is int and 1 <= b <= P.MAX_BATCH for b in batches)):
            raise ProtocolError(f"bad message: MEASURE batches are 1..8 sizes in [1, {P.MAX_BATCH}], "
                                f"got {batches!r:.60}")
        if len(self.measures) >= MAX_MEASURE_ORDERS:
            raise Overloaded(f"{len(self.measures)} MEASURE orders are queued already; wait for them")
        order = MeasureOrder(ident, msg.rid, model, time.monotonic() + msg.budget_ms / 1000.0, names)
        order.request = {k: body[k] for k in ("batches", "reps", "probe_s", "refresh") if k in body}
        order.manifest = manifest.to_json().encode()
        order.summary = {"blocks": [[b.size_bytes, b.act_bytes] for b in manifest.blocks],
                         "input_bytes": 4 * math.prod(manifest.input_shape),
                         "codecs": {k: v for k, v in (manifest.extra.get("codecs") or {}).items()
                                    if isinstance(v, dict) and "cut" in v and "points" in v},
                         "endpoints": {n: [self.workers[n].info.endpoint, self.worker_keys.get(n, "")] for n in names}}
        self.measures[msg.rid] = order
        self._advance_measures()

    def _advance_measures(self) -> None:
        """Answer the orders whose turns all ended; while no worker measures, start the oldest order's next turn.

        One turn at a time across every order: two profiles at once on one machine would time
        each other, and two probes into one worker would share its link.
        """
        for order in list(self.measures.values()):
            if order.done:
                del self.measures[order.rid]
                self._reply(order.client, P.encode(Msg.MEASURE, order.rid, 0, {}, [P.pack_blob(order.body())]))
        while self.measures and not any(o.running for o in self.measures.values()):
            order = next(o for o in self.measures.values())
            turn = order.next_turn()
            if turn is None:
                del self.measures[order.rid]
                self._reply(order.client, P.encode(Msg.MEASURE, order.rid, 0, {}, [P.pack_blob(order.body())]))
                continue
            name, rid = turn
            rec = self.workers.get(name)
            if rec is None:
                order.finish(rid, None, "was lost")
                continue
            targets = [[self.workers[w].info.endpoint, self.worker_keys.get(w, "")] for w in order.workers
                       if w != name and w in self.workers]
            frames = P.encode(Msg.MEASURE, rid, max(0, int((order.deadline - time.monotonic()) * 1000)),
                              {"body": {**order.request, "model": order.model, "targets": targets}}, [order.manifest])
            if not send(self.sock, frames, route=[rec.ident]):
                order.finish(rid, None, "its control queue is full")

    # --- admission (scheduled requests) ----------------------------------------------------------
    def _on_admit(self, ident: bytes, msg: P.Message) -> None:
        """A request with a deadline asks to run: it waits for the window's decision (``admission``)."""
        self.clients.refresh(ident)
        model = P.check_model_name(msg.get("mdl"))
        user = str(P.body_get(msg.body, "user", str, ""))[:P.MAX_USER_CHARS]
        deadline_ms = float(P.body_get(msg.body, "deadline_ms", (int, float)))
        nbytes = int(P.body_get(msg.body, "bytes", int, 0))
        if not (math.isfinite(deadline_ms) and deadline_ms > 0) or nbytes < 0:
            raise ProtocolError(f"bad message: ADMIT needs deadline_ms > 0 and bytes >= 0, got {deadline_ms}, {nbytes}")
        self.route(model)  # an unknown or undeployed model is refused now, with the route's reason
        if len(self.admission.pending) >= admission.MAX_PENDING_ASKS:
            raise Overloaded(f"{admission.MAX_PENDING_ASKS} requests already wait for this admission window; "
                             "submit fewer at once")
        if any(a.rid == msg.rid for a in self.admission.pending):
            raise ProtocolError("bad message: this request id already waits for admission")
        now = time.monotonic()
        self.admission.add(admission.Ask(ident, msg.rid, model, user, now + deadline_ms / 1000.0, nbytes, now))

    def _admit(self, now: float) -> None:
        """Close the admission window: every ask is answered now (admitted ones are released later)."""
        hosted: dict[str, admission.HostedModel] = {}
        for model in self.records:
            try:
                route = self.route(model)
                manifest = self._manifest(model)
            except (RuntimeFailure, EdgesplitError):
                continue  # no live route now: its asks are refused with the reason
            times = [self._stage_ms(h.worker, model, h, manifest) for h in route.hops]
            hosted[model] = admission.HostedModel(
                tuple(h.worker for h in route.hops),
                {f"{h.worker}:{b.id}": b.size_bytes for h in route.hops for b in manifest.blocks[h.start:h.end]},
                sum(ms for ms, _ in times) / 1000.0, all(measured for _, measured in times))
        resident: dict[str, frozenset[str]] = {}
        rates: dict[str, float] = {}
        for name, rec in self.workers.items():
            ids = set()
            for s in rec.info.stages:
                if [s.model, s.hop] in rec.resident:
                    try:
                        ids.update(f"{name}:{b.id}" for b in self._manifest(s.model).blocks[s.start:s.end])
                    except (RuntimeFailure, EdgesplitError):
                        pass
            resident[name] = frozenset(ids)
            rates[name] = float(rec.cache.get("load_bytes_per_s", 0.0))
        try:
            admitted, refused = self.admission.decide(now, hosted, resident, rates)
        except (ScheduleError, ValueError, ArithmeticError) as e:  # a bug or a state we did not foresee: say so
            log.error("admission failed: %s: %s", type(e).__name__, e)
            for ask in self.admission.pending:
                self._reply(ask.client, P.encode_error(ask.rid, Err.INTERNAL, f"coordinator: admission failed: {e}"))
            self.admission.pending.clear()
            return
        for job in admitted:
            self._reply(job.ask.client, P.encode(Msg.ADMIT, job.ask.rid, 0, {"body": job.body()}))
        for r in refused:
            self._reply(r.ask.client, P.encode_error(r.ask.rid, Err.DEADLINE_UNMEETABLE, r.reason))

    def _on_done(self, ident: bytes, msg: P.Message) -> None:
        """A client's report that an admitted request's result came (and how late against its plan)."""
        self.clients.refresh(ident)
        lag_ms = float(P.body_get(msg.body, "lag_ms", (int, float)))
        self.metrics.done(self.admission, ident, msg.rid, time.monotonic())
        moved = self.admission.observe(ident, msg.rid, lag_ms / 1000.0)
        if moved > 0.05:
            log.warning("admission: a server was %.0f ms behind its plan; its held requests moved later", moved * 1000)

    def _release_admitted(self, now: float) -> None:
        """Held requests whose time has come: their clients send now; a switching job's workers start loading."""
        for r in self.admission.release_due(now):
            job = r.job
            self._reply(job.ask.client, P.encode(Msg.ADMIT, job.ask.rid, 0, {"body": job.body(go=True)}))
            if r.prefetch_workers:
                frames = P.encode(Msg.PREFETCH, P.new_rid(), self.cfg.deploy_timeout_ms,
                                  {"body": {"model": job.ask.model, "hint": list(r.hint)[:P.MAX_HINT_MODELS]}})
                for name in r.prefetch_workers:
                    rec = self.workers.get(name)
                    if rec is not None:
                        send(self.sock, frames, route=[rec.ident])  # best effort: the request loads what is missing

    def _stage_ms(self, worker: str, model: str, hop: Any, manifest: ModelManifest) -> tuple[float, bool]:
        """A stage's compute time and whether it was measured: the worker's reported median, else a guess.

        The guess is the manifest's profile (another machine's) or ``UNPROFILED_STAGE_MS``.
        """
        rec = self.workers.get(worker)
        for row in rec.stats if rec is not None else ():
            if isinstance(row, list) and len(row) == 6 and row[0] == model and row[1] == hop.hop and row[2] > 0:
                return float(row[3]), True
        profiled = [b.forward_ms for b in manifest.blocks[hop.start:hop.end]]
        if all(ms is not None for ms in profiled):
            return float(sum(profiled)), False  # type: ignore[arg-type]
        return UNPROFILED_STAGE_MS, False

    def _manifest(self, model: str) -> ModelManifest:
        """``model``'s manifest (re-read when its file changes)."""
        try:
            path = self.store.root / "models" / f"{P.check_model_name(model)}.json"
            mtime = path.stat().st_mtime_ns
        except OSError:
            raise UnknownModel(f"model {model!r} is not in the coordinator's store {self.store.root}; known: "
                               f"{self.store.list_models()}. Add it with `edgesplit partition MODEL --store ...`") from None
        cached = self._manifests.get(model)
        if cached is None or cached[0] != mtime:
            cached = (mtime, self.store.manifest(model))
            self._manifests[model] = cached
        return cached[1]

    # --- deploys -------------------------------------------------------------------------------
    def _take_plan_id(self) -> int:
        plan_id = self._peek_plan_id()
        self._last_plan = plan_id
        return plan_id

    def _peek_plan_id(self) -> int:
        """The next plan id: milliseconds since the epoch, so ids grow across coordinator restarts."""
        return max(self._last_plan + 1, int(time.time() * 1000))

    def _deploy_deadline(self) -> float:
        return time.monotonic() + self.cfg.deploy_timeout_ms / 1000.0

    def _deploying(self, model: str) -> bool:
        return any(p.model == model for p in self.plans.values())

    def _send_deploys(self, rid: bytes, manifest: ModelManifest, record: PlanRecord, targets: list[str],
                      pending: _PendingPlan, load: bool = True) -> None:
        """DEPLOY ``record``'s stages to each of ``targets`` under ``rid`` (an empty list to workers it does not name)."""
        pending.waiting = set(targets)
        self.plans[rid] = pending
        manifest_json = manifest.to_json().encode()
        for name in targets:
            body = {**record.deploy_body(name), "load": load}
            if self.sec.keyed:  # who its stages may take RUNs from, and whose keys its next stages hold
                body["prev"] = {str(k): [record.endpoints[w] for w in record.hops[k - 1].workers]
                                for k, h in enumerate(record.hops) if k > 0 and name in h.workers}
                body["keys"] = {record.endpoints[w]: self.worker_keys[w] for w in record.workers
                                if w in self.worker_keys}
            frames = P.encode(Msg.DEPLOY, rid, self.cfg.deploy_timeout_ms, {"body": body}, [manifest_json])
            if not send(self.sock, frames, route=[self.workers[name].ident]):
                self._fail_plan(rid, Err.OVERLOADED, f"worker {name}'s control queue is full", blame={name})
                return

    def _finish_plan(self, rid: bytes) -> None:
        """Every worker loaded its stages: keep the plan (a client's), answer the client and parked questions."""
        plan = self.plans.pop(rid)
        if plan.commit is not None:
            try:
                route = route_of_plan(self._manifest(plan.model), plan.commit, self._live_view())
            except RuntimeFailure as e:  # e.g. a worker reported other stages than it was given
                log.warning("plan %d of %s loaded but does not route: %s", plan.plan, plan.model, e)
                if plan.client is not None:
                    self._reply(plan.client, P.encode_error(plan.rid, Err.DEPLOY_FAILED,
                                                            f"deploying {plan.model}: {e}"))
                self._answer_route_waiters(plan.model, time.monotonic())
                return
            self._keep(plan.commit)
            log.info("plan %d of %s deployed: %s", plan.plan, plan.model, " | ".join(
                ",".join(h.worker for h in reps) for reps in route.replicas))
            if plan.client is not None:
                self._reply(plan.client, P.encode(Msg.PLAN, plan.rid, 0, {"body": {"route": route.to_msg(),
                                                                                    "loaded": plan.loaded}}))
        else:
            log.info("plan %d of %s: %s done on %s", plan.plan, plan.model, plan.kind, sorted(plan.loaded))
            if plan.client is not None:  # an undeploy
                self._reply(plan.client, P.encode(Msg.UNDEPLOY, plan.rid, 0, {"body": {"loaded": plan.loaded}}))
        self._answer_route_waiters(plan.model, time.monotonic())

    def _fail_plan(self, rid: bytes, code: Err, reason: str, blame: Collection[str] = ()) -> None:
        """End a deploy with an error; a repair is tried again on the ``blame``d workers after a growing delay."""
        plan = self.plans.pop(rid, None)
        if plan is None:
            return
        log.warning("plan %d of %s (%s) failed: %s", plan.plan, plan.model, plan.kind, reason)
        if plan.client is not None:
            self._reply(plan.client, P.encode_error(plan.rid, code, f"deploying {plan.model}: {reason}"))
        else:
            now = time.monotonic()
            for name in blame:
                delay = min(self._retry.get((plan.model, name), (0.0, RETRY_INIT_S / 2))[1] * 2, RETRY_MAX_S)
                self._retry[(plan.model, name)] = (now + delay, delay)
        # parked ROUTE questions are answered by the loop (_expire), after any repair this failure leads to

    def _keep(self, record: PlanRecord) -> None:
        """Make ``record`` the model's plan and write it to the plan store."""
        self.records[record.model] = record
        try:
            self.plan_store.save(record)
        except OSError as e:
            log.error("E: could not write plan %d of %s to %s: %s; it serves, but will not survive a coordinator "
                      "restart", record.plan, record.model, self.plan_store.root, e)

    # --- keeping the cluster on its plans ------------------------------------------------------
    def _reconcile(self, now: float) -> None:
        """Compare every kept plan with the live workers and deploy what differs (see ``plans.reconcile``)."""
        if not self.records:
            return
        grace = not self._settling(now)  # absent workers had their chance to re-register
        if grace and not self._announced_absent:
            self._announce_absent()
        for model, rec in list(self.records.items()):
            if self._deploying(model):
                continue
            try:
                manifest = self._manifest(model)
            except (RuntimeFailure, EdgesplitError):
                continue  # removed from the store: nothing to deploy
            if manifest.n_blocks != rec.n_blocks:
                continue  # re-partitioned since: only a new deploy makes sense
            live = self._live_view(model, claimed=True)
            may_replan = self.cfg.replan and grace and any(w in self.seen for w in rec.workers)
            hop_bytes = [sum(b.size_bytes for b in manifest.blocks[h.start:h.end]) for h in rec.hops]
            repair = reconcile(rec, live, self._peek_plan_id(), hop_bytes, may_replan)
            if repair is not None:
                self._repair(manifest, repair, now)

    def _repair(self, manifest: ModelManifest, repair: Repair, now: float) -> None:
        model = repair.record.model
        targets = [t for t in repair.targets if self._retry.get((model, t), (0.0, 0.0))[0] <= now]
        if not targets or (repair.kind != "resend" and len(targets) < len(repair.targets)):
            return  # waiting out a failed try
        if repair.kind != "resend":
            self._last_plan = max(self._last_plan, repair.record.plan)
            self._keep(repair.record)  # kept now: a restart in the middle re-applies it
        log.warning("plan %d of %s: %s to %s: %s", repair.record.plan, model, repair.kind, list(targets), repair.why)
        pending = _PendingPlan(model, repair.record.plan, set(), self._deploy_deadline(), kind=repair.kind)
        self._send_deploys(P.new_rid(), manifest, repair.record, list(targets), pending)

    def _live_view(self, model: str | None = None, claimed: bool = False) -> dict[str, LiveWorker]:
        """The live workers as ``reconcile`` and the routes see them.

        ``hosted_bytes`` counts only ``model``'s stages (none when None): a worker evicts other
        models' blocks to make room, so only this model's own stages compete for its budget.
        ``claimed``: every stage workers report (to clean up), not only those of our plans (to route).
        """
        out = {}
        for name, rec in self.workers.items():
            stages = rec.claimed if claimed else rec.info.stages
            hosted = 0
            for s in stages if model is not None else ():
                if s.model != model:
                    continue
                try:
                    hosted += sum(b.size_bytes for b in self._manifest(s.model).blocks[s.start:s.end])
                except (RuntimeFailure, EdgesplitError):
                    pass  # a model no longer in the store: its size is unknown, count it as nothing
            out[name] = LiveWorker(rec.info.endpoint, frozenset(stages), rec.info.memory_budget_bytes, hosted,
                                   self.worker_keys.get(name, ""))
        return out

    def _announce_absent(self) -> None:
        """Once, after start-up: workers named in kept plans that did not re-register are lost for everyone."""
        self._announced_absent = True
        live_eps = {w.info.endpoint for w in self.workers.values()}
        for rec in self.records.values():
            for name, ep in rec.endpoints.items():
                if name not in self.workers and ep not in live_eps:
                    self._notify_lost(name, ep)

    # --- routes --------------------------------------------------------------------------------
    def route(self, model: str) -> Route:
        """The route of ``model`` over live workers: its kept plan, or else the newest plan workers report.

        Raises:
            UnknownModel: not in the store, deployed nowhere, or still loading.
            WorkerLost: a stage has no live worker (its workers were lost and none could take it).
        """
        P.check_model_name(model)
        manifest = self._manifest(model)
        if model in self.undeployed and model not in self.records:
            raise NotDeployed(f"model {model} was undeployed; deploy it again to serve it")
        live = self._live_view()
        rec = self.records.get(model)
        if rec is not None:
            return route_of_plan(manifest, rec, live, self._deploying(model), self._settling(time.monotonic()))
        return route_of_reports(manifest, live, self.lost)

    _HANDLERS = {
        Msg.READY: _on_ready, Msg.HEARTBEAT: _on_heartbeat, Msg.DEPLOYED: _on_deployed, Msg.ERROR: _on_worker_error,
        Msg.FETCH: _on_fetch, Msg.HELLO: _on_hello, Msg.ROUTE: _on_route, Msg.WORKERS: _on_workers,
        Msg.MODELS: _on_models, Msg.PLAN: _on_plan, Msg.LINK: _on_link, Msg.PREFETCH: _on_prefetch,
        Msg.UNDEPLOY: _on_undeploy, Msg.ADMIT: _on_admit, Msg.DONE: _on_done, Msg.MEASURE: _on_measure,
    }


def _worker_name(ident: bytes) -> str:
    """A worker's name from its socket identity (``name/tag``: the tag tells processes apart)."""
    return ident.decode(errors="replace").split("/", 1)[0]


def _describe(hops: tuple[PlannedHop, ...]) -> str:
    return ", ".join(f"{'+'.join(h.workers)}[{h.start}:{h.end})" for h in hops)


def run_coordinator(cfg: CoordinatorConfig) -> int:
    """Run a coordinator in this process until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    coord = Coordinator(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: coord.stop())
    coord.run()
    return 0
