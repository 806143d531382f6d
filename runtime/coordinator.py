"""The coordinator: worker registry from heartbeats, plan deployment, routes, block serving.

Run one per cluster::

    edgesplit coordinator --bind tcp://*:5555 --store ./store
    # Python: Coordinator(CoordinatorConfig(bind=..., store=...)).start()  (a background thread)

It never carries activations: clients ask it for a model's route and send their input
to the first stage's worker; the data goes worker to worker and back to the client.
One ROUTER socket serves workers (READY, HEARTBEAT, DEPLOYED, FETCH) and clients (HELLO,
ROUTE, WORKERS, MODELS, PLAN). A worker silent for ``heartbeat_ms x liveness`` is purged
and a NOTICE goes to every client and worker, so requests waiting on it fail at once
with WORKER_LOST instead of at their deadlines.

A model's route is derived from what live workers report hosting (the newest plan id
wins), so a restarted coordinator relearns deployments from the next heartbeats.
"""
from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from edgesplit.partitioner import BlockStore, EdgesplitError, ModelManifest

from . import protocol as P
from .config import opt
from .errors import DeployError, ProtocolError, RuntimeFailure, UnknownModel, WorkerLost
from .links import LinkSpec
from .liveness import PeerTable
from .plan import PlannedStage, check_plan, layerwise_plan
from .protocol import Err, Msg
from .transport import SocketOptions, Waker, router, send
from .types import Route, RouteHop, StageInfo, WorkerInfo, WorkerState

log = logging.getLogger("edgesplit.coordinator")


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator's settings (``edgesplit coordinator --help`` lists them as flags)."""

    bind: str = opt("tcp://*:5555", "control endpoint to bind (workers and clients connect here)")
    store: str = opt("./store", "block store holding the models' manifests and blocks (workers fetch from it)")
    heartbeat_ms: int = opt(P.HEARTBEAT_INTERVAL_MS, "heartbeat interval to workers")
    liveness: int = opt(P.HEARTBEAT_LIVENESS, "silent heartbeat intervals before a worker is declared lost")
    deploy_timeout_ms: int = opt(300_000, "how long a plan may take to load on every worker")
    serve_cache_bytes: int = opt(256 * 1024**2, "block file bytes kept in memory for serving fetches")
    log_level: str = opt("info", "logging level", choices=["debug", "info", "warning", "error"])


@dataclass
class _WorkerRec:
    info: WorkerInfo
    ident: bytes
    stats: list[list[Any]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class _PendingPlan:
    client: bytes
    rid: bytes
    model: str
    plan: int
    waiting: set[str]
    deadline: float
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)


class Coordinator:
    """The coordinator daemon; ``run()`` blocks, ``start()`` runs it in a thread, ``stop()`` ends it."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self.store = BlockStore(cfg.store)
        self.ctx = zmq.Context(io_threads=1)
        self.sock, self.endpoint = router(self.ctx, cfg.bind, SocketOptions(hwm_msgs=P.CONTROL_HWM_MSGS,
                                                                            max_frame_bytes=P.CHUNK_BYTES * 2))
        self.workers: dict[str, _WorkerRec] = {}
        self.live = PeerTable[str](cfg.heartbeat_ms, cfg.liveness)
        self.clients = PeerTable[bytes](cfg.heartbeat_ms, cfg.liveness * 4)
        self.plans: dict[bytes, _PendingPlan] = {}
        self.link_orders: dict[bytes, tuple[bytes, str, float]] = {}  # rid -> (client, worker, deadline)
        self.lost: dict[tuple[str, int], list[str]] = {}  # (model, plan) -> workers lost while hosting it
        self._files: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._last_plan = 0
        self._stop = threading.Event()
        self._waker = Waker()
        self._thread: threading.Thread | None = None

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
        """The loop: poll, dispatch, heartbeat the workers, purge the silent ones."""
        log.info("coordinator on %s, store %s (%d models)", self.endpoint, self.store.root, len(self.store.list_models()))
        interval = self.cfg.heartbeat_ms / 1000.0
        next_hb = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wake_at = min(next_hb, self.live.next_expiry() or next_hb, now + 0.1)
                events = dict(poller.poll(max(0, int((wake_at - now) * 1000))))
                if self._waker.fileno() in events:
                    self._waker.drain()
                if self.sock in events:
                    for _ in range(256):
                        try:
                            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._dispatch(frames[0].bytes, frames[1:])
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + interval
                    for rec in self.workers.values():
                        send(self.sock, P.encode(Msg.HEARTBEAT, P.new_rid(), self.cfg.heartbeat_ms * self.cfg.liveness),
                             route=[rec.ident])
                for name in self.live.purge(now):
                    self._lose(name)
                self.clients.purge(now)
                for rid, (client, worker, deadline) in list(self.link_orders.items()):
                    if now > deadline:
                        del self.link_orders[rid]
                        self._reply(client, P.encode_error(rid, Err.TIMEOUT, f"worker {worker} did not confirm "
                                                                             "the link change in time"))
                for rid, plan in list(self.plans.items()):
                    if now > plan.deadline:
                        self._fail_plan(rid, Err.TIMEOUT, f"workers {sorted(plan.waiting)} did not finish loading "
                                                          f"{plan.model} within {self.cfg.deploy_timeout_ms} ms")
        finally:
            self.ctx.destroy(linger=0)
            self._waker.close()
            log.info("coordinator stopped")

    # --- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, ident: bytes, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames, max_frame_bytes=P.CHUNK_BYTES * 2)
        except ProtocolError as e:
            log.warning("W: refused a message from %r: %s", ident[:32], e)
            send(self.sock, P.encode_error(bytes(P.RID_BYTES), Err.BAD_MESSAGE, f"coordinator: {e}"), route=[ident])
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

    # workers ---------------------------------------------------------------------------------
    def _on_ready(self, ident: bytes, msg: P.Message) -> None:
        info = WorkerInfo.from_msg(msg.body)
        if _worker_name(ident) != info.name:
            raise ProtocolError(f"bad message: worker connects as {ident!r:.40} but calls itself {info.name!r}")
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
        self.workers[info.name] = _WorkerRec(info, ident)
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

    def _known_worker(self, ident: bytes, msg: P.Message) -> _WorkerRec | None:
        rec = self.workers.get(_worker_name(ident))
        if rec is None or rec.ident != ident:
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
        rec.info.stages = [StageInfo.from_msg(s) for s in P.body_get(body, "stages", list, [])]
        tel = dict(P.body_get(body, "telemetry", dict, {}))
        tel["kept"] = body.get("kept", 0)  # outputs awaiting an ACK: 0 when idle, else a leak
        tel["queue"] = body.get("queue", 0)
        tel.update({f"count_{k}": v for k, v in P.body_get(body, "counters", dict, {}).items() if isinstance(k, str)})
        rec.info.telemetry = {k: v for k, v in tel.items() if isinstance(k, str) and P.is_finite_number(v)}
        rec.stats = P.body_get(body, "stats", list, [])
        rec.cache = P.body_get(body, "cache", dict, {})

    def _on_deployed(self, ident: bytes, msg: P.Message) -> None:
        rec = self._known_worker(ident, msg)
        if rec is None:
            return
        rec.info.stages = [s for s in rec.info.stages if s.model != msg.body.get("model")] + \
                          [StageInfo.from_msg(s) for s in P.body_get(msg.body, "stages", list, [])]
        plan = self.plans.get(msg.rid)
        if plan is None:
            return
        plan.waiting.discard(rec.info.name)
        plan.loaded[rec.info.name] = {"load_ms": msg.body.get("load_ms"), "fetched_bytes": msg.body.get("fetched_bytes")}
        if not plan.waiting:
            del self.plans[msg.rid]
            route = self.route(plan.model)
            log.info("plan %d of %s deployed: %s", plan.plan, plan.model, " -> ".join(route.workers))
            self._reply(plan.client, P.encode(Msg.PLAN, plan.rid, 0, {"body": {"route": route.to_msg(),
                                                                                "loaded": plan.loaded}}))

    def _on_worker_error(self, ident: bytes, msg: P.Message) -> None:
        if self._known_worker(ident, msg) is None:
            return
        order = self.link_orders.pop(msg.rid, None)
        if order is not None:
            self._reply(order[0], P.encode(Msg.ERROR, msg.rid, 0, {"err": msg.get("err")}))
        if msg.rid in self.plans:
            code, reason = msg.get("err")
            self._fail_plan(msg.rid, Err.DEPLOY_FAILED, reason)

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

    def _notify_lost(self, name: str, endpoint: str) -> None:
        notice = P.encode(Msg.NOTICE, P.new_rid(), 0, {"body": {"lost": name, "lost_endpoint": endpoint}})
        for client in self.clients:
            send(self.sock, notice, route=[client])
        for rec in self.workers.values():
            if rec.info.name != name:
                send(self.sock, notice, route=[rec.ident])

    # clients ----------------------------------------------------------------------------------
    def _on_hello(self, ident: bytes, msg: P.Message) -> None:
        self.clients.refresh(ident)
        self._reply(ident, P.encode(Msg.HELLO, msg.rid, 0, {"body": {
            "coordinator": self.endpoint, "workers": len(self.workers), "heartbeat_ms": self.cfg.heartbeat_ms,
            "liveness": self.cfg.liveness}}))

    def _on_route(self, ident: bytes, msg: P.Message) -> None:
        self.clients.refresh(ident)
        model = msg.get("mdl")
        self._reply(ident, P.encode(Msg.ROUTE, msg.rid, 0, {"mdl": model, "body": {"route": self.route(model).to_msg()}}))

    def _on_workers(self, ident: bytes, msg: P.Message) -> None:
        self.clients.refresh(ident)
        now = time.monotonic()
        out = []
        for rec in self.workers.values():
            rec.info.last_seen_s = now - rec.last_seen
            rec.info.state = WorkerState.DEPLOYING if any(rec.info.name in p.waiting for p in self.plans.values()) \
                else WorkerState.LIVE
            rec.info.stats, rec.info.cache = rec.stats, rec.cache
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
        self.clients.refresh(ident)
        body = msg.body
        model = P.check_model_name(P.body_get(body, "model", str))
        manifest = self._manifest(model)
        live = sorted(self.workers)
        if "stages" in body:
            stages = [PlannedStage.from_msg(s) for s in P.body_get(body, "stages", list)]
        else:
            workers = P.body_get(body, "workers", list, live) or live
            splits = P.body_get(body, "splits", list, None)
            n_stages = P.body_get(body, "n_stages", int, None)
            if not all(isinstance(w, str) for w in workers) or (
                    splits is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in splits)):
                raise ProtocolError("bad message: PLAN workers are names and splits are block indices")
            stages = layerwise_plan(manifest, [str(w) for w in workers], n_stages, splits)
        check_plan(stages, manifest.n_blocks, model)
        unknown = sorted({s.worker for s in stages} - set(self.workers))
        if unknown:
            raise DeployError(f"plan for {model} names workers {unknown} that are not registered; live workers: {live}")
        links_raw = P.body_get(body, "links", list, [None] * (len(stages) - 1))
        if len(links_raw) != len(stages) - 1:
            raise DeployError(f"plan for {model} has {len(stages)} stages, so {len(stages) - 1} cuts, but "
                              f"{len(links_raw)} link specs; give one per cut")
        links = [LinkSpec.from_msg(v) for v in links_raw]
        self._deploy(ident, msg, manifest, stages, links)

    def _on_link(self, ident: bytes, msg: P.Message) -> None:
        """A client's LINK order goes to the worker sending on that cut; the worker's reply comes back."""
        order = self.link_orders.get(msg.rid)
        sender = self.workers.get(order[1]) if order is not None else None
        if sender is not None and ident == sender.ident:
            del self.link_orders[msg.rid]
            self._reply(order[0], P.encode(Msg.LINK, msg.rid, 0, {"body": msg.body}))
            return
        self.clients.refresh(ident)
        model = P.check_model_name(P.body_get(msg.body, "model", str))
        cut = P.body_get(msg.body, "cut", int)
        route = self.route(model)
        if not 0 <= cut < len(route.hops) - 1:
            raise DeployError(f"model {model} runs in {len(route.hops)} stage(s), so its cuts are "
                              f"0..{len(route.hops) - 2}; there is no cut {cut}")
        worker = route.hops[cut].worker
        body = {"model": model, "hop": cut, "plan": route.plan, "link": P.body_get(msg.body, "link", dict)}
        if not send(self.sock, P.encode(Msg.LINK, msg.rid, msg.budget_ms, {"body": body}),
                    route=[self.workers[worker].ident]):
            raise DeployError(f"worker {worker}'s control queue is full; try again")
        self.link_orders[msg.rid] = (ident, worker, time.monotonic() + msg.budget_ms / 1000.0)

    def _manifest(self, model: str) -> ModelManifest:
        if model not in self.store.list_models():
            raise UnknownModel(f"model {model!r} is not in the coordinator's store {self.store.root}; known: "
                               f"{self.store.list_models()}. Add it with `edgesplit partition MODEL --store ...`")
        return self.store.manifest(model)

    def _deploy(self, ident: bytes, msg: P.Message, manifest: ModelManifest, stages: list[PlannedStage],
                links: list[LinkSpec]) -> None:
        plan_id = max(self._last_plan + 1, int(time.time() * 1000))
        self._last_plan = plan_id
        endpoints = {name: rec.info.endpoint for name, rec in self.workers.items()}
        per_worker: dict[str, list[tuple[StageInfo, LinkSpec, LinkSpec]]] = {}
        cuts = [LinkSpec(), *links, LinkSpec()]  # the client's links at both ends stay raw
        for hop, s in enumerate(stages):
            nxt = (endpoints[stages[hop + 1].worker],) if hop + 1 < len(stages) else ()
            info = StageInfo(manifest.name, hop, s.start, s.end, manifest.n_blocks, plan_id, nxt)
            per_worker.setdefault(s.worker, []).append((info, cuts[hop], cuts[hop + 1]))
        # workers hosting an older plan of this model get an empty stage list (undeploy)
        for name, rec in self.workers.items():
            if name not in per_worker and any(st.model == manifest.name for st in rec.info.stages):
                per_worker[name] = []
        manifest_json = manifest.to_json().encode()
        pending = _PendingPlan(ident, msg.rid, manifest.name, plan_id, set(per_worker),
                               time.monotonic() + self.cfg.deploy_timeout_ms / 1000.0)
        self.plans[msg.rid] = pending
        for name, items in per_worker.items():
            body = {"model": manifest.name, "plan": plan_id, "stages": [i.to_msg() for i, _, _ in items],
                    "links_in": [a.to_msg() for _, a, _ in items], "links_out": [b.to_msg() for _, _, b in items]}
            frames = P.encode(Msg.DEPLOY, msg.rid, self.cfg.deploy_timeout_ms, {"body": body}, [manifest_json])
            if not send(self.sock, frames, route=[self.workers[name].ident]):
                self._fail_plan(msg.rid, Err.OVERLOADED, f"worker {name}'s control queue is full")
                return
        log.info("plan %d of %s: %s", plan_id, manifest.name,
                 ", ".join(f"{s.worker}[{s.start}:{s.end})" for s in stages))

    def _fail_plan(self, rid: bytes, code: Err, reason: str) -> None:
        plan = self.plans.pop(rid, None)
        if plan is not None:
            log.warning("plan %d of %s failed: %s", plan.plan, plan.model, reason)
            self._reply(plan.client, P.encode_error(rid, code, f"deploying {plan.model}: {reason}"))

    # --- routes --------------------------------------------------------------------------------
    def route(self, model: str) -> Route:
        """The route of ``model`` over live workers (newest complete plan).

        Raises:
            UnknownModel: not in the store, or deployed on no live worker.
            WorkerLost: its newest plan lost a worker; redeploy.
        """
        P.check_model_name(model)
        manifest = self._manifest(model)
        by_plan: dict[int, dict[int, tuple[str, StageInfo]]] = {}
        for name, rec in self.workers.items():
            for s in rec.info.stages:
                if s.model == model:
                    by_plan.setdefault(s.plan, {})[s.hop] = (name, s)
        newest = max(by_plan, default=None)
        lost = [(p, names) for (m, p), names in self.lost.items() if m == model and (newest is None or p >= newest)]
        if lost:
            p, names = max(lost)
            raise WorkerLost(f"model {model}: worker(s) {names} hosting plan {p} were lost; redeploy it "
                             "(Client.deploy) on the live workers")
        if newest is None:
            raise UnknownModel(f"model {model} is in the store but deployed on no live worker; deploy it with "
                               "Client.deploy(...) or `edgesplit up --model ...`")
        hops = by_plan[newest]
        out, pos = [], 0
        for hop in range(len(hops)):
            if hop not in hops or hops[hop][1].start != pos:
                raise UnknownModel(f"model {model} plan {newest} is incomplete (still deploying?); hops {sorted(hops)}")
            name, s = hops[hop]
            out.append(RouteHop(hop, name, self.workers[name].info.endpoint, s.start, s.end))
            pos = s.end
        if pos != manifest.n_blocks:
            raise UnknownModel(f"model {model} plan {newest} covers blocks up to {pos} of {manifest.n_blocks}")
        return Route(model, newest, manifest.n_blocks, list(manifest.input_shape), out)

    _HANDLERS = {
        Msg.READY: _on_ready, Msg.HEARTBEAT: _on_heartbeat, Msg.DEPLOYED: _on_deployed, Msg.ERROR: _on_worker_error,
        Msg.FETCH: _on_fetch, Msg.HELLO: _on_hello, Msg.ROUTE: _on_route, Msg.WORKERS: _on_workers,
        Msg.MODELS: _on_models, Msg.PLAN: _on_plan, Msg.LINK: _on_link,
    }


def _worker_name(ident: bytes) -> str:
    """A worker's name from its socket identity (``name/tag``: the tag tells processes apart)."""
    return ident.decode(errors="replace").split("/", 1)[0]


def run_coordinator(cfg: CoordinatorConfig) -> int:
    """Run a coordinator in this process until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    coord = Coordinator(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: coord.stop())
    coord.run()
    return 0
