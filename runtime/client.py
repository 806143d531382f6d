"""The client: submit inputs, get results or explicit errors; plus the coordinator-script API.

::

    from edgesplit.runtime import connect
    with connect("tcp://127.0.0.1:5555") as cl:
        print(cl.workers())                                   # the registry, with telemetry
        cl.deploy("vit_tiny_patch16_224", n_stages=3)         # a layer-wise plan over the live workers
        y = cl.infer("vit_tiny_patch16_224", x)               # one request
        futures = [cl.submit("vit_tiny_patch16_224", xi) for xi in xs]   # many in flight (pipelined)

The client asks the coordinator for a model's route once, then sends each input straight
to a first-stage worker; the last stage sends the result to the client's own result
socket. Every request ends exactly once: a tensor, or an exception naming the reason
(``UnknownModel``, ``BadInput``, ``WorkerLost``, ``RequestTimeout``, ``Overloaded``, ...) --
never a hang:

- each request's deadline is stamped when it is submitted (``timeout_ms``) and enforced
  here whatever the cluster does; a request still waiting to be sent when it expires is
  failed without being sent, and one that waited gets its remaining budget re-stamped;
- at most ``window`` requests wait at one first-stage worker; the rest wait here, earliest
  deadline first, so a burst never queues stale work at the workers;
- the client keeps each input until its result arrives, and replays it (``att`` + 1, after
  asking the coordinator for the route again) when its first worker is announced lost
  before taking it, when a worker reports the route lost or redeployed, or when a worker
  on its route was lost and no result came within ``lost_grace_ms``; a request that
  finishes twice (original and replay) yields one result.

A result tensor borrows the receive buffer (no copy); it is yours, but clone it if you
need it resizable.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import heapq
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import zmq

from edgesplit.scheduling.placement import Placement, PlacementError, plan_placement

from . import protocol as P
from .config import from_env, from_mapping, opt
from .endpoints import check_endpoint
from .errors import (ConfigError, DeadlineMissed, DeployError, Overloaded, ProtocolError, RequestTimeout,
                     RuntimeFailure, UnknownModel, WorkerLost)
from .links import LinkSpec, decode_link
from .protocol import Err, Msg
from .liveness import CoordinatorLink
from .placement import Measurements, deploy_args
from .probe import probe_link
from .security import InsecureNag, Security, check_exposure, is_loopback, load_keys
from .security.roles import CONNECT, RESULTS
from .transport import (PeerLinks, SocketOptions, Waker, advertised, dealer, drain, local_address_towards, router,
                        send)
from .types import Route, RouteHop, WorkerInfo

log = logging.getLogger("edgesplit.client")
MEASURE_TIMEOUT_MS = 300_000  # profiling every block on slow boards, then probing every link, takes a while
NOT_DEPLOYED_RETRY_S = 0.05  # first replay after a worker's NOT_DEPLOYED; doubles per attempt
OVERLOADED_RETRY_S = 0.01  # a first-stage worker that said OVERLOADED is tried again after this, doubling to 0.5 s


@dataclass(frozen=True)
class ClientConfig:
    """A client's settings (``edgesplit infer --help`` lists them as flags)."""

    coordinator: str = opt("tcp://127.0.0.1:5555", "coordinator endpoint")
    reply_host: str | None = opt(None, "address the last stage sends results to (default: this host's address "
                                       "towards the coordinator)")
    reply_port: int = opt(0, "port of the result socket (0 = any free port)")
    timeout_ms: int = opt(P.DEFAULT_BUDGET_MS, "default deadline of a request")
    control_timeout_ms: int = opt(10_000, "deadline of route/workers/models calls to the coordinator")
    deploy_timeout_ms: int = opt(300_000, "deadline of a deploy (workers may fetch blocks first)")
    max_in_flight: int = opt(256, "requests in flight at once; submit() waits for a slot beyond that")
    window: int = opt(8, "requests sent to one first-stage worker and not yet taken on by it; more wait here, "
                         "earliest deadline first")
    max_attempts: int = opt(4, "sends of one request (the first and its replays after a lost worker or a re-plan)")
    lost_grace_ms: int = opt(1000, "after a lost-worker notice, how long a request through it may still deliver "
                                   "before the client replays it")
    heartbeat_ms: int = opt(P.HEARTBEAT_INTERVAL_MS, "interval of the client's HELLO to the coordinator")
    liveness: int = opt(P.HEARTBEAT_LIVENESS, "silent intervals before the client reconnects to the coordinator")
    max_frame_bytes: int = opt(P.MAX_FRAME_BYTES, "largest result frame accepted")
    keys: str | None = opt(None, "key directory (`edgesplit keygen --role user` or `--role operator`): this "
                                 "client's secret key, the coordinator's public key and the workers' keys; "
                                 "every connection is then CURVE-encrypted")
    insecure: bool = opt(False, "allow a result socket beyond loopback without --keys (anyone who reaches it "
                                "may forge results)")


@dataclass
class RequestInfo:
    """What happened to one request (times: ``time.time()`` seconds, comparable with worker traces on one host)."""

    rid: bytes
    model: str
    t_submit: float
    t_sent: float = 0.0
    t_done: float = 0.0
    route: Route | None = None
    input_bytes: int = 0
    output_bytes: int = 0
    trace: list[list[Any]] = field(default_factory=list)  # protocol.TRACE_FIELDS per hop, when traced
    user: str = ""
    deadline_ms: float | None = None  # submitted with a deadline: it went through admission
    admitted: bool | None = None  # the admission's answer (None: not asked, or no answer)
    plan: dict[str, Any] = field(default_factory=dict)  # the admission's plan: send_in_ms, upload_ms, end_ms, ...
    late_ms: float = 0.0  # > 0: the result came this long after the deadline (DeadlineMissed)

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_submit) * 1000


@dataclass
class _Req:
    rid: bytes
    model: str
    x: torch.Tensor  # kept until the result arrives: the client is the last keeper of every input
    future: concurrent.futures.Future
    deadline: float  # monotonic, stamped at submit
    trace: bool
    info: RequestInfo
    att: int = 0  # sends so far minus one
    endpoint: str | None = None  # the first-stage worker it was last sent to
    acked: bool = False  # that worker took custody
    lost_at: float | None = None  # replay then unless the result came
    lost_reason: str = ""
    not_before: float = 0.0  # wait before (re)sending (the worker said OVERLOADED, or the admission's send time)
    due: float | None = None  # monotonic: the deadline the admission planned for (None: not scheduled)
    scheduled: bool = False  # admitted: sent when the plan says, to the route's planned first worker
    admitted_at: float = 0.0  # monotonic: when the admission's answer came (the plan's times count from it)
    overloaded: int = 0  # OVERLOADED answers so far (the retry backs off)

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass
class _Call:
    future: concurrent.futures.Future
    deadline: float
    what: str


class Client:
    """A connection to a cluster: requests, routes, the worker registry, deploys."""

    def __init__(self, cfg: ClientConfig = ClientConfig(), **overrides: Any) -> None:
        self.cfg = from_mapping(ClientConfig, overrides, cfg) if overrides else cfg
        check_endpoint(self.cfg.coordinator, "coordinator")  # else zmq takes it and the io thread dies later
        self.ident = b"c-" + P.new_rid()[:8].hex().encode()
        self.ctx = zmq.Context(io_threads=1)
        host = self.cfg.reply_host or local_address_towards(self.cfg.coordinator)
        bind = f"tcp://{host}:{self.cfg.reply_port or '*'}"
        keys = load_keys(self.cfg.keys) if self.cfg.keys else None
        self._coordinator_key = keys.coordinator_key() if keys is not None else None
        check_exposure("the client's result socket", bind, keys is not None, self.cfg.insecure)
        self._nag = InsecureNag("the client's result socket", bind, keys is None and not is_loopback(bind))
        self.sec = Security(self.ctx, keys, {RESULTS: CONNECT[RESULTS]})
        try:
            self._results, bound = router(self.ctx, bind, SocketOptions(hwm_msgs=max(P.DATA_HWM_MSGS, 64),
                                                                        max_frame_bytes=self.cfg.max_frame_bytes),
                                          sec=self.sec, domain=RESULTS)
        except ConfigError:
            self.sec.close()
            self.ctx.destroy(linger=0)
            raise
        self.reply_endpoint = advertised(bound, host)
        self._slots = threading.BoundedSemaphore(self.cfg.max_in_flight)
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._waker = Waker()
        self._closed = threading.Event()
        self.routes: dict[str, Route] = {}
        self.placements: dict[str, Placement] = {}  # planned deploys: the placement with its predictions
        self.measurements: dict[str, Measurements] = {}  # planned deploys: what the plan was made from
        self.forged = 0  # results and errors refused: not from a worker of the request's route (keyed)
        self._thread = threading.Thread(target=self._io_loop, name="client-io", daemon=True)
        self._thread.start()

    # --- public API ------------------------------------------------------------------------------
    def submit(self, model: str, x: torch.Tensor, timeout_ms: int | None = None, trace: bool = False,
               deadline_ms: float | None = None, user: str = "") -> concurrent.futures.Future:
        """Send one input; the future resolves to the output tensor or raises the request's error.

        Args:
            model: model name in the coordinator's store (deployed).
            x: input batch, e.g. ``(B, 3, 224, 224)`` float32.
            timeout_ms: deadline (default ``cfg.timeout_ms``); the request fails with ``RequestTimeout`` after it.
            trace: ask every stage to record its timings (``future.info.trace``).
            deadline_ms: schedule the request: the result is due this long after now. The
                coordinator's admission answers first: ``DeadlineUnmeetable`` (with the reason) when
                it cannot be met, else the input is sent when the plan says (an upload slot). A
                result after the deadline raises ``DeadlineMissed`` (its ``result`` and ``late_ms``).
            user: who asks (scheduled requests; the coordinator plans per user).
        Returns:
            A ``concurrent.futures.Future``; ``future.info`` is the request's :class:`RequestInfo`.
        """
        if self._closed.is_set():
            raise RuntimeFailure("client is closed; connect again")
        if deadline_ms is not None and not deadline_ms > 0:
            raise ValueError(f"deadline_ms must be > 0, got {deadline_ms}")
        budget = self.cfg.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + budget / 1000.0  # stamped now: waiting for a slot counts too
        if not self._slots.acquire(timeout=budget / 1000.0):
            raise Overloaded(f"{self.cfg.max_in_flight} requests already in flight for {budget} ms; "
                             "wait for results or raise max_in_flight")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.add_done_callback(lambda _: self._slots.release())
        rid = P.new_rid()
        info = RequestInfo(rid, model, time.time(), user=str(user), deadline_ms=deadline_ms)
        fut.info = info  # type: ignore[attr-defined]
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        req = _Req(rid, model, x, fut, deadline, trace, info)
        if deadline_ms is not None:
            req.due = deadline - budget / 1000.0 + deadline_ms / 1000.0
        self._cmds.put(("submit", req))
        self._wake()
        return fut

    def infer(self, model: str, x: torch.Tensor, timeout_ms: int | None = None) -> torch.Tensor:
        """Run one input through the deployed model and return the output (raises the request's error)."""
        return self.submit(model, x, timeout_ms).result()

    def route(self, model: str, refresh: bool = False) -> Route:
        """The model's route (cached; ``refresh`` asks the coordinator again)."""
        if refresh or model not in self.routes:
            msg = self._call(Msg.ROUTE, {"mdl": model}, what=f"route of {model}")
            self.routes[model] = Route.from_msg(P.body_get(msg.body, "route", dict))
        return self.routes[model]

    def coordinator(self) -> dict[str, Any]:
        """Who the coordinator is (endpoint, workers, heartbeat), its ``admission`` counters and decision times, and
        what it ``refused`` (by reason: rate, role, plan_id; handshakes: keys it does not list)."""
        return dict(self._call(Msg.HELLO, {}, what="hello").body)

    def workers(self) -> list[WorkerInfo]:
        """Registered workers with their last telemetry, stage statistics and cache counters."""
        msg = self._call(Msg.WORKERS, {}, what="worker list")
        rows = P.unpack_blob(msg.blob(0)) if msg.frames else []
        if not isinstance(rows, list):
            raise ProtocolError("bad message: WORKERS payload is a list")
        return [WorkerInfo.from_msg(r) for r in rows]

    def models(self) -> list[dict[str, Any]]:
        """Models in the coordinator's store: name, n_blocks, size_bytes, input_shape, route (workers or None)."""
        msg = self._call(Msg.MODELS, {}, what="model list")
        rows = P.unpack_blob(msg.blob(0)) if msg.frames else []
        if not isinstance(rows, list):
            raise ProtocolError("bad message: MODELS payload is a list")
        return rows

    def deploy(self, model: str, workers: Sequence[str] | None = None, n_stages: int | None = None,
               splits: Sequence[int] | None = None, stages: Sequence[tuple[str, int, int]] | None = None,
               links: Sequence[dict[str, Any] | None] | None = None, timeout_ms: int | None = None,
               replicas: int = 1, load: bool = True) -> Route:
        """Deploy a layer-wise plan and wait until every worker has loaded its stages.

        With none of ``workers``, ``n_stages``, ``splits``, ``stages`` (and one replica), the plan
        is the planner's (:meth:`plan`: measured on the workers, for throughput); the placement
        is kept in ``placements[model]``, the measurements in ``measurements[model]``
        (``runtime.calibrate`` plans again from them with what the deployed plan showed).

        Args:
            model: model name in the coordinator's store.
            workers: worker names to use, in stage order (default: every live worker, by name).
            n_stages: number of stages (default: one per worker; more than workers = round robin).
            splits: block indices where a stage starts (default: the splits stored at partition time
                when their count fits, else balance the manifest's profiled block times).
            stages: an explicit plan ``[(worker, start, end), ...]`` instead of the three above.
            links: per cut (stages - 1 entries), its codec ``{"codec", "budget", "wire_dtype"}`` (default
                raw); ``codec`` names a trained codec in the manifest's ``extra["codecs"]`` or a kind of
                ``edgesplit.compression`` (e.g. "identity" with wire_dtype "fp16").
            timeout_ms: deadline (default ``cfg.deploy_timeout_ms``).
            replicas: workers per stage; a request whose worker is lost is replayed on a replica.
            load: load the stages into the workers' memory now (False: register them only; the
                first request or a :meth:`prefetch` loads them).
        Returns:
            The model's new route; ``route.loaded`` says per worker what the deploy fetched, loaded
            and freed (bytes) and how long it took.
        Raises:
            DeployError: e.g. the stages on some worker exceed its memory budget (refused before
                anything is fetched; the message gives the bytes needed and the budget).
        """
        if stages is None and workers is None and n_stages is None and splits is None and replicas == 1:
            m = self.measure(model)
            placement = self.plan(model, measurements=m)  # the planner picks stages, workers, order and codecs
            stages, planned_links = deploy_args(placement)
            links = planned_links if links is None else links
            self.placements[model], self.measurements[model] = placement, m
        else:
            self.placements.pop(model, None)
            self.measurements.pop(model, None)
        body: dict[str, Any] = {"model": model}
        if replicas != 1:
            body["replicas"] = int(replicas)
        if stages is not None:
            body["stages"] = [[str(w), int(a), int(b)] for w, a, b in stages]
        else:
            if workers is not None:
                body["workers"] = list(workers)
            if n_stages is not None:
                body["n_stages"] = int(n_stages)
            if splits is not None:
                body["splits"] = [int(s) for s in splits]
        if links is not None:
            body["links"] = list(links)
        if not load:
            body["load"] = False
        msg = self._call(Msg.PLAN, {"body": body}, timeout_ms=timeout_ms or self.cfg.deploy_timeout_ms,
                         what=f"deploy of {model}")
        route = dataclasses.replace(Route.from_msg(P.body_get(msg.body, "route", dict)),
                                    loaded=_per_worker(msg.body.get("loaded")))
        self.routes[model] = route
        return route

    def measure(self, model: str, workers: Sequence[str] | None = None, batches: Sequence[int] = (1,),
                reps: int = 10, probe_s: float = 0.5, refresh: bool = False,
                timeout_ms: int | None = None) -> Measurements:
        """Profile ``model``'s blocks on each worker's own device and measure the links a plan may use.

        Each worker times every block (random weights, warm, ``reps`` runs, median) at each of
        ``batches`` (cached on the worker per model, device and settings unless ``refresh``)
        and probes its link to every other listed worker for ``probe_s`` seconds; workers on
        one host take turns. This client then probes its own link to each worker.
        """
        self.coordinator()  # a coordinator that does not answer fails within the control timeout, not MEASURE's
        body: dict[str, Any] = {"model": model, "batches": [int(b) for b in batches], "reps": int(reps),
                                "probe_s": float(probe_s), "refresh": bool(refresh)}
        if workers is not None:
            body["workers"] = list(workers)
        msg = self._call(Msg.MEASURE, {"body": body}, timeout_ms=timeout_ms or MEASURE_TIMEOUT_MS,
                         what=f"measuring {model}")
        answer = P.unpack_blob(msg.blob(0)) if msg.specs else None
        m = Measurements.from_msg(answer)
        if not m.workers:
            raise DeployError(f"no worker measured {model}: " + "; ".join(f"{w}: {e}" for w, e in m.errors.items()))
        for name in m.workers:
            endpoint, key = answer["endpoints"][name]
            try:
                r = probe_link(self.ctx, endpoint, probe_s, self.sec if self.sec.keyed else None, key or None)
                m.client_links[name] = (r.rate_bps, r.rtt_ms)
            except (RuntimeFailure, ProtocolError, zmq.ZMQError) as e:
                m.client_links[name] = (-1.0, -1.0)
                m.errors[f"client->{name}"] = str(e)
        return m

    def plan(self, model: str, objective: str = "throughput", workers: Sequence[str] | None = None,
             batch: int = 1, max_accuracy_cost: float = 0.0, measurements: Measurements | None = None,
             **measure: Any) -> Placement:
        """The planner's placement of ``model``: stages, workers, their order and codecs, with predicted times.

        Args:
            objective: "throughput" (smallest bottleneck) or "latency" (smallest sum).
            workers: the workers it may use (default: every live worker).
            batch: samples per message the plan is for.
            max_accuracy_cost: accuracy points the chosen codecs may cost together.
            measurements: reuse these instead of measuring (e.g. to plan both objectives).
            measure: options of :meth:`measure` (``reps``, ``probe_s``, ``refresh``).
        """
        m = measurements or self.measure(model, workers, batches=(batch,), **measure)
        try:
            placement = plan_placement(m.problem(batch, max_accuracy_cost, workers), objective)
        except PlacementError as e:
            raise DeployError(f"no plan for {model}: {e}") from None
        failed = [f"{h.src}->{h.dst}" for h in placement.hops if m.unusable(h.src, h.dst)]
        if failed:  # the best left uses a link that could not be measured: say so rather than deploy it
            raise DeployError(f"no plan for {model} avoids the links whose probes failed ({', '.join(failed)}): "
                              + "; ".join(f"{k}: {v}" for k, v in m.errors.items()))
        return placement

    def undeploy(self, model: str, timeout_ms: int | None = None) -> dict[str, dict[str, Any]]:
        """Release a model everywhere: its plan is forgotten and every worker frees its blocks.

        Returns:
            Per worker, ``freed_bytes`` and ``resident_bytes`` after (blocks that another hosted
            model shares stay resident).
        """
        msg = self._call(Msg.UNDEPLOY, {"body": {"model": model}},
                         timeout_ms=timeout_ms or self.cfg.deploy_timeout_ms, what=f"undeploy of {model}")
        self.routes.pop(model, None)
        return _per_worker(msg.body.get("loaded"))

    def prefetch(self, model: str, hint: Sequence[str] = (), workers: Sequence[str] | None = None,
                 timeout_ms: int | None = None) -> dict[str, dict[str, Any]]:
        """Make a deployed model resident on its workers now, loading only the blocks they lack.

        Args:
            model: a deployed model.
            hint: the models expected next, soonest first: blocks of models not named (then
                those named last) are evicted first when room is needed.
            workers: only these of the model's workers (default: all of them).
        Returns:
            Per worker: ``loaded_bytes``, ``load_ms`` (reading and placing them), ``ms`` (the whole
            order on the worker) and ``resident_bytes`` after.
        """
        body: dict[str, Any] = {"model": model, "hint": list(hint)}
        if workers is not None:
            body["workers"] = [str(w) for w in workers]
        msg = self._call(Msg.PREFETCH, {"body": body},
                         timeout_ms=timeout_ms or self.cfg.deploy_timeout_ms, what=f"prefetch of {model}")
        return _per_worker(msg.body.get("loaded"))

    def set_link(self, model: str, cut: int, redeploy: bool = False, **changes: Any) -> dict[str, Any]:
        """Change the settings of a deployed link live (no redeploy, but for a new codec); the next request uses them.

        With no ``changes`` it only reads the link's settings from the sending worker. A link's
        *codec* is loaded by both workers at deploy time, so changing it (``codec=NAME`` with
        ``redeploy=True``) re-deploys the model's current stages on the same workers, with the
        other cuts' links as they are now and this one's codec replaced (its budget, dtype and
        rate start afresh unless given): each worker fetches only the blocks it lacks (the
        codec's), nothing restarts, and requests in flight on the old plan are replayed on the
        new one (``NOT_DEPLOYED``), not lost. The next request uses the new codec.

        Args:
            model: a deployed model.
            cut: which link, 0 = between stage 0 and stage 1.
            redeploy: allow a codec change (a re-deploy of the same stages; the plan id changes).
            changes: any of ``budget`` (channels kept, None = full width; with ``rate``: the most
                kept), ``wire_dtype`` ("fp32", "fp16", "int8"), ``rate`` (bytes/s allocated to the
                link, or "measured" for the sender's own measurement, so the sender picks the
                budget per transfer; None = fixed budget),
                ``share`` (fraction of a request's remaining time the transfer may take) and, with
                ``redeploy``, ``codec`` (a name in the manifest's ``extra["codecs"]``, a registered
                kind, or "raw").
        Returns:
            The link's settings now (``{"codec", "budget", "wire_dtype", "rate", "share"}``, as the
            sending worker reports them); after a re-deploy also ``redeployed``: ``{"plan", "fetched_bytes"}``
            (bytes each worker fetched).
        Raises:
            BadInput: the link's codec cannot take them (e.g. a budget it does not serve, a raw link, a
                codec change without ``redeploy``).
            DeployError: no such cut, or the re-deploy failed (e.g. an unknown codec name).
        """
        if redeploy and "codec" in changes:
            now = self._link_now(model, cut)
            if changes["codec"] != now["codec"]:
                return self._relink(model, cut, changes)
        msg = self._call(Msg.LINK, {"body": {"model": model, "cut": int(cut), "link": dict(changes)}},
                         what=f"link change of {model} cut {cut}")
        return dict(P.body_get(msg.body, "link", dict))

    def _link_now(self, model: str, cut: int) -> dict[str, Any]:
        """A link's settings as its sending worker has them (a LINK order that changes nothing)."""
        return self.set_link(model, cut)

    def _relink(self, model: str, cut: int, changes: dict[str, Any]) -> dict[str, Any]:
        """``set_link(..., codec=..., redeploy=True)``: the same stages again, one link's codec replaced."""
        route = self.route(model, refresh=True)
        links = [self._link_now(model, c) for c in range(len(route.hops) - 1)]
        links[cut] = {"codec": changes["codec"], **{k: v for k, v in changes.items() if k != "codec"}}
        stages = [(h.worker, h.start, h.end) for reps in route.replicas for h in reps]
        new = self.deploy(model, stages=stages, links=links)
        out = self._link_now(model, cut)
        out["redeployed"] = {"plan": new.plan,
                             "fetched_bytes": {w: v.get("fetched_bytes") for w, v in new.loaded.items()}}
        return out

    def wait_for_workers(self, n: int, timeout_s: float = 30.0) -> list[WorkerInfo]:
        """Block until at least ``n`` workers are registered; returns them."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ws = self.workers()
                if len(ws) >= n:
                    return ws
            except RequestTimeout:
                ws = []
            if time.monotonic() > deadline:
                raise RequestTimeout(f"{len(ws)} of {n} workers registered with {self.cfg.coordinator} after "
                                     f"{timeout_s:.0f} s; check that the workers run and point at this coordinator")
            time.sleep(0.1)

    def close(self) -> None:
        """Stop the client; requests still in flight fail with ``RuntimeFailure``."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._waker.wake()
        self._thread.join(timeout=5)
        self.sec.close()
        self.ctx.destroy(linger=0)
        self._waker.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, mtype: Msg, fields: dict[str, Any], timeout_ms: int | None = None, what: str = "") -> P.Message:
        if self._closed.is_set():
            raise RuntimeFailure("client is closed; connect again")
        timeout_ms = timeout_ms or self.cfg.control_timeout_ms
        fut: concurrent.futures.Future = concurrent.futures.Future()
        rid = P.new_rid()
        self._cmds.put(("call", rid, P.encode(Msg(mtype), rid, timeout_ms, fields),
                        _Call(fut, time.monotonic() + timeout_ms / 1000.0, what)))
        self._wake()
        return fut.result()

    def _wake(self) -> None:
        self._waker.wake()
        if self._closed.is_set() and not self._thread.is_alive():  # closed meanwhile: nobody will serve it
            self._fail_everything(RuntimeFailure("client is closed; connect again"))

    # --- io thread -------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        """The client's one loop; whatever ends it, every waiting caller gets an error."""
        try:
            self._loop()
        finally:
            self._closed.set()
            self._fail_everything(RuntimeFailure("client closed before the request finished"))

    def _connect_coordinator(self) -> zmq.Socket:
        self._ctl_out.clear()  # what the old connection did not send is stale; calls time out by themselves
        return dealer(self.ctx, self.cfg.coordinator, self.ident,
                      SocketOptions(hwm_msgs=P.CONTROL_HWM_MSGS, max_frame_bytes=P.BLOB_MAX_BYTES),
                      self.sec, self._coordinator_key)

    def _loop(self) -> None:
        self._pending: dict[bytes, _Req] = {}  # every request not yet ended
        self._queues: dict[str, list[tuple[float, int, _Req]]] = {}  # model -> heap of requests to send (EDF)
        self._delayed: list[tuple[float, int, _Req]] = []  # (not_before, seq, req): retry after OVERLOADED
        self._unacked: collections.Counter[str] = collections.Counter()  # first-stage endpoint -> window used
        self._calls: dict[bytes, _Call] = {}
        self._admitting: dict[bytes, _Req] = {}  # ADMIT asked, no answer yet
        self._held: dict[bytes, _Req] = {}  # admitted, waiting for the coordinator's release
        self._asked: dict[bytes, str] = {}  # ROUTE rid -> model
        self._route_retry: dict[str, float] = {}  # model -> when to ask for its route again
        self._ctl_out: collections.deque = collections.deque(maxlen=256)  # control messages not yet taken
        self._seq = itertools.count()
        self._link = CoordinatorLink(self._connect_coordinator, self.cfg.heartbeat_ms, self.cfg.liveness,
                                     f"coordinator {self.cfg.coordinator}", log)
        self._links = PeerLinks(self.ctx, b"c~" + P.new_rid()[:4].hex().encode(),
                                SocketOptions(max_frame_bytes=self.cfg.max_frame_bytes),
                                max_outbox_msgs=max(self.cfg.window, 1),
                                protected=lambda ep: self._unacked[ep] > 0, sec=self.sec, key_of=self._worker_key)
        interval = self.cfg.heartbeat_ms / 1000.0
        next_hello = next_sweep = 0.0
        while not self._closed.is_set():
            coord = self._link.sock
            poller = zmq.Poller()
            if coord is not None:
                poller.register(coord, zmq.POLLIN)
            poller.register(self._results, zmq.POLLIN)
            poller.register(self._waker, zmq.POLLIN)
            for sock, flags in self._links.poll_flags():
                poller.register(sock, flags)
            wait_ms = 5 if self._ctl_out else 20
            if self._delayed:  # a planned send time: wake for it (to the millisecond)
                wait_ms = min(wait_ms, max(0, int((self._delayed[0][0] - time.monotonic()) * 1000)))
            events = dict(poller.poll(wait_ms))
            if self._waker.fileno() in events:
                self._waker.drain()
            self._drain_commands()
            if coord is not None and coord in events:
                drain(coord, self._from_coordinator)
            if self._results in events:
                drain(self._results, lambda route, frames: self._on_result(route[0], frames), n_route=1, batch=256)
            self._links.serve(events, self._on_link_reply)
            coord = self._link.sock
            while coord is not None and self._ctl_out and send(coord, self._ctl_out[0]):
                self._ctl_out.popleft()
            now = time.monotonic()
            if now >= next_hello:
                next_hello = now + interval
                if not self._ctl_out:  # a HELLO behind a backlog would add nothing
                    self._to_coordinator(P.encode(Msg.HELLO, P.new_rid(), self.cfg.heartbeat_ms))
            self._link.tick(now, require_heard=True)
            self._nag.tick(now)
            self._pump(now)
            if now >= next_sweep:
                next_sweep = now + 0.02
                self._sweep(now)
        self._links.close_all()
        self._link.close()

    def _fail_everything(self, exc: RuntimeFailure) -> None:
        for req in list(getattr(self, "_pending", {}).values()):
            _fail(req.future, exc)
        for call in getattr(self, "_calls", {}).values():
            _fail(call.future, exc)
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            _fail(cmd[1].future if cmd[0] == "submit" else cmd[3].future, exc)

    def _to_coordinator(self, frames: list[Any]) -> None:
        sock = self._link.sock
        if self._ctl_out or sock is None or not send(sock, frames):
            self._ctl_out.append(frames)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "submit":
                req: _Req = cmd[1]
                self._pending[req.rid] = req
                if req.due is None:
                    self._enqueue(req)
                else:
                    self._ask_admission(req)
            elif cmd[0] == "call":
                _, rid, frames, call = cmd
                self._calls[rid] = call
                self._to_coordinator(frames)

    # --- sending -------------------------------------------------------------------------------
    def _ask_admission(self, req: _Req) -> None:
        """ADMIT under the request's own id: the answer says when to send it, or why not."""
        left_ms = (req.due - time.monotonic()) * 1000  # type: ignore[operator]
        try:
            frames = P.encode(Msg.ADMIT, req.rid, self.cfg.control_timeout_ms, {
                "mdl": req.model, "body": {"user": req.info.user[:P.MAX_USER_CHARS], "deadline_ms": max(left_ms, 0.001),
                                           "bytes": int(req.x.numel() * req.x.element_size())}})
        except ProtocolError as e:
            self._finish(req.rid, UnknownModel(f"bad model name: {e}"))
            return
        self._admitting[req.rid] = req
        self._to_coordinator(frames)

    def _enqueue(self, req: _Req) -> None:
        if req.not_before > time.monotonic():
            heapq.heappush(self._delayed, (req.not_before, next(self._seq), req))
        else:
            heapq.heappush(self._queues.setdefault(req.model, []), (req.deadline, next(self._seq), req))

    def _pump(self, now: float) -> None:
        """Send queued requests, earliest deadline first, while a first-stage worker has window room."""
        while self._delayed and self._delayed[0][0] <= now:
            req = heapq.heappop(self._delayed)[2]
            heapq.heappush(self._queues.setdefault(req.model, []), (req.deadline, next(self._seq), req))
        for model, heap in list(self._queues.items()):
            while heap and heap[0][2].done:
                heapq.heappop(heap)
            if not heap:
                del self._queues[model]
                continue
            route = self.routes.get(model)
            if route is None:
                self._ask_route(model, now)
                continue
            while heap:
                req = heap[0][2]
                if req.done or now > req.deadline:
                    heapq.heappop(heap)
                    self._expire(req)
                    continue
                hop = route.hops[0] if req.scheduled else self._pick(route)  # admitted: the planned worker, now
                if hop is None:
                    break  # every first-stage worker has its window full: wait for ACKs
                heapq.heappop(heap)
                self._send(req, route, hop)

    def _pick(self, route: Route) -> RouteHop | None:
        """The first-stage replica with the most window room (None when all are full)."""
        best = min(route.replicas[0], key=lambda h: self._unacked[h.endpoint])
        return best if self._unacked[best.endpoint] < self.cfg.window else None

    def _ask_route(self, model: str, now: float) -> None:
        if model in self._asked.values() or now < self._route_retry.get(model, 0.0):
            return
        rid = P.new_rid()
        try:
            frames = P.encode(Msg.ROUTE, rid, self.cfg.control_timeout_ms, {"mdl": model})
        except ProtocolError as e:
            self._fail_model(model, UnknownModel(f"bad model name: {e}"))
            return
        self._asked[rid] = model
        self._route_retry[model] = now + self.cfg.control_timeout_ms / 1000.0  # one question at a time
        self._to_coordinator(frames)

    def _fail_model(self, model: str, exc: RuntimeFailure, replays_wait: bool = False) -> None:
        """Fail the requests queued for ``model`` (a route question failed); replays wait when asked to."""
        heap = self._queues.get(model, [])
        keep = []
        for item in heap:
            req = item[2]
            if replays_wait and req.att > 0 and not req.done:
                keep.append(item)  # a replay waits out a re-plan until its deadline
            else:
                self._finish(req.rid, exc)
        if keep:
            heapq.heapify(keep)
            self._queues[model] = keep
            self._route_retry[model] = time.monotonic() + 0.2
        else:
            self._queues.pop(model, None)

    def _send(self, req: _Req, route: Route, hop0: RouteHop) -> None:
        budget_ms = int((req.deadline - time.monotonic()) * 1000)
        fields: dict[str, Any] = {"mdl": req.model, "hop": 0, "rep": self.reply_endpoint, "pln": route.plan}
        if req.att:
            fields["att"] = min(req.att, 255)
        if req.trace:
            fields["trc"] = []
        try:
            frames = P.encode(Msg.RUN, req.rid, budget_ms, fields, [req.x])
        except (ProtocolError, TypeError) as e:
            self._finish(req.rid, P.error_from_wire(Err.BAD_INPUT, f"input for {req.model} cannot be sent: {e}"))
            return
        req.info.route = route
        req.info.input_bytes = P.total_bytes(frames[1:])
        req.info.t_sent = time.time()
        req.endpoint, req.acked, req.lost_at = hop0.endpoint, False, None
        self._unacked[hop0.endpoint] += 1
        if not self._links.send(hop0.endpoint, frames, req.deadline):  # cannot happen within the window
            self._release(req)
            self._finish(req.rid, P.error_from_wire(Err.OVERLOADED, f"outbox to {hop0.worker} is full"))

    def _release(self, req: _Req) -> None:
        """Give back the window slot ``req`` holds at its first-stage worker."""
        if req.endpoint is not None and not req.acked:
            self._unacked[req.endpoint] -= 1
            if self._unacked[req.endpoint] <= 0:
                del self._unacked[req.endpoint]
        req.acked = True

    def _replay(self, req: _Req, exc: RuntimeFailure, delay_s: float = 0.0, refresh_route: bool = True,
                new_attempt: bool = True) -> None:
        """Send ``req`` again if attempts and time are left; else fail it with ``exc``.

        A replay after a loss is a new attempt (``att`` + 1, at most ``max_attempts`` sends); a
        retry after OVERLOADED is not (the worker refused it before taking it on).
        """
        now = time.monotonic()
        self._release(req)
        if req.done or now + delay_s >= req.deadline or (new_attempt and req.att + 1 >= self.cfg.max_attempts):
            self._finish(req.rid, exc)
            return
        req.att += int(new_attempt)
        req.endpoint, req.acked, req.lost_at, req.not_before = None, False, None, now + delay_s
        if refresh_route and req.info.route is not None and self.routes.get(req.model) is req.info.route:
            del self.routes[req.model]  # ask the coordinator again: it knows who is alive
            self._route_retry.pop(req.model, None)
        self._enqueue(req)

    # --- receiving -----------------------------------------------------------------------------
    def _from_coordinator(self, _: list[bytes], frames: list[Any]) -> None:
        self._link.heard()  # any message is life
        self._on_coordinator(frames)

    def _on_coordinator(self, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames, max_frame_bytes=P.BLOB_MAX_BYTES)
        except ProtocolError as e:
            log.warning("W: bad message from the coordinator: %s", e)
            return
        if msg.type == Msg.NOTICE:
            self._on_notice(msg)
            return
        model = self._asked.pop(msg.rid, None)
        if model is not None:  # a route we asked for on behalf of queued requests
            self._route_retry.pop(model, None)
            if msg.type == Msg.ERROR:
                code, reason = msg.get("err")
                # NOT_DEPLOYED: a re-plan is under way, so replays wait for it; anything else ends them
                self._fail_model(model, P.error_from_wire(code, reason), replays_wait=code == Err.NOT_DEPLOYED)
                return
            try:
                self.routes[model] = Route.from_msg(P.body_get(msg.body, "route", dict))
            except ProtocolError as e:
                self._fail_model(model, e)
            return
        req = self._admitting.pop(msg.rid, None) or self._held.pop(msg.rid, None)
        if req is not None:
            self._on_admission(req, msg)
            return
        call = self._calls.pop(msg.rid, None)
        if call is None:
            return  # HELLO replies and late answers
        if msg.type == Msg.ERROR:
            code, reason = msg.get("err")
            _fail(call.future, P.error_from_wire(code, reason))
        else:
            _resolve(call.future, msg)

    def _on_admission(self, req: _Req, msg: P.Message) -> None:
        """The admission's answer: refused (its reason), or sent when the plan says."""
        if req.done:
            return
        if msg.type == Msg.ERROR:
            code, reason = msg.get("err")
            req.info.admitted = False if code == Err.DEADLINE_UNMEETABLE else None
            self._finish(req.rid, P.error_from_wire(code, reason))
            return
        req.info.admitted, req.info.plan = True, {k: v for k, v in msg.body.items() if isinstance(v, (int, float, str))}
        now = time.monotonic()
        if not req.admitted_at:
            req.admitted_at = now
        if req.model not in self.routes:
            self._ask_route(req.model, now)  # known by the send time
        if msg.body.get("go") is True:  # released: send now
            req.scheduled = True
            req.not_before = now
            self._enqueue(req)
        else:
            self._held[req.rid] = req  # admitted: held until the coordinator releases it

    def _on_notice(self, msg: P.Message) -> None:
        name = str(msg.body.get("lost", ""))
        endpoint = msg.body.get("lost_endpoint")
        if not isinstance(endpoint, str):
            if isinstance(msg.body.get("alive_endpoint"), str):
                self.routes.clear()  # a worker is back: let the next sends spread over it again
            return
        for model, route in list(self.routes.items()):
            if name in route.workers:
                del self.routes[model]
        self._links.drop_outbox(endpoint)
        self._links.close(endpoint)
        now = time.monotonic()
        for req in list(self._pending.values()):
            if req.endpoint == endpoint and not req.acked:  # we still hold its input: it never left that worker
                self._replay(req, WorkerLost(f"worker {name} ({endpoint}), stage 0 of {req.model}'s route, was lost "
                                             "before acknowledging the request"))
            elif req.lost_at is None and req.endpoint is not None and req.info.route is not None \
                    and name in req.info.route.workers:
                # it may have been in the lost worker's custody (its output not yet taken by the next stage)
                req.lost_at = now + self.cfg.lost_grace_ms / 1000.0
                req.lost_reason = (f"worker {name} on the route of {req.model} ({req.info.route.describe()}) "
                                   "was lost and no result arrived")

    def _worker_key(self, endpoint: str) -> str | None:
        """Keyed: the key of the worker serving ``endpoint``, as the coordinator's routes give it."""
        for route in list(self.routes.values()):
            for h in route.replicas[0]:
                if h.endpoint == endpoint and h.key:
                    return h.key
        return None

    def _from_route(self, req: _Req, frames: list[Any], last_only: bool) -> bool:
        """Keyed: whether the sender is a worker of ``req``'s route (its last hop, for a RESULT)."""
        peer = self.sec.peer_of(frames[0])
        route = req.info.route
        if peer is None or route is None:
            return False
        hops = route.replicas[-1:] if last_only else route.replicas
        return any(h.key == peer.key for reps in hops for h in reps)

    def _on_result(self, ident: bytes, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames, max_frame_bytes=self.cfg.max_frame_bytes)
        except ProtocolError as e:
            log.warning("W: bad message on the result socket from %r: %s", ident[:32], e)
            return
        req = self._pending.get(msg.rid)
        if req is None or msg.type not in (Msg.RESULT, Msg.ERROR):
            return  # already ended (deadline, an earlier copy of a replayed request) or not for us
        if self.sec.keyed and not self._from_route(req, frames, last_only=msg.type == Msg.RESULT):
            self.forged += 1
            log.warning("W: refused a %s for %s from %r: not a worker of its route's %s", msg.type.name, req.model,
                        ident[:32], "last stage" if msg.type == Msg.RESULT else "stages")
            return
        if msg.type == Msg.ERROR:
            self._on_error(req, msg)
            return
        try:  # the last link (to the client) is raw
            y = decode_link(None, LinkSpec(), msg.get("cod", "raw"), msg.get("cmeta", {}), msg.tensors, None)
        except RuntimeFailure as e:
            self._finish(msg.rid, e)
            return
        req.info.output_bytes = msg.payload_bytes
        req.info.trace = list(msg.get("trc", []))
        if req.scheduled:  # the coordinator keeps its plan honest with how late against it the result came
            end = req.info.plan.get("end_ms")
            if isinstance(end, (int, float)):
                lag_ms = (time.monotonic() - req.admitted_at) * 1000 - end
                self._to_coordinator(P.encode(Msg.DONE, req.rid, 0, {"body": {"lag_ms": round(lag_ms, 3)}}))
        late_s = time.monotonic() - req.due if req.due is not None else 0.0
        if late_s > 0:  # never a late result handed out as on time
            req.info.late_ms = late_s * 1000
            self._finish(msg.rid, DeadlineMissed(
                f"the result for {req.model} came {late_s * 1000:.1f} ms after its deadline of "
                f"{req.info.deadline_ms:g} ms (planned end {req.info.plan.get('end_ms', '?')} ms after admission); "
                "it is in this exception's .result", late_s * 1000, y))
            return
        self._finish(msg.rid, None, y)

    def _on_error(self, req: _Req, msg: P.Message, current: bool = False) -> None:
        """A worker's ERROR for ``req``: replay what a live replica or a re-plan can still serve, else fail.

        ``current``: the reply came on the link the request was last sent on, so it is about this attempt.
        """
        code, reason = msg.get("err")
        if not current and msg.get("att", 0) < req.att:
            return  # news of an attempt already replayed
        exc = P.error_from_wire(code, reason)
        if code == Err.WORKER_LOST:
            self._replay(req, exc)
        elif code == Err.NOT_DEPLOYED:  # a re-plan, or a worker fetching a block again: give it a moment
            self._replay(req, exc, delay_s=min(NOT_DEPLOYED_RETRY_S * 2 ** req.att, 1.0))
        elif code == Err.OVERLOADED and msg.get("hop", 0) == 0:  # backs off: a full worker is not hammered
            req.overloaded += 1
            self._replay(req, exc, delay_s=min(OVERLOADED_RETRY_S * 2 ** min(req.overloaded - 1, 6), 0.5),
                         refresh_route=False, new_attempt=False)
        else:
            self._finish(req.rid, exc)

    def _on_link_reply(self, endpoint: str, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ProtocolError as e:
            log.warning("W: bad reply from %s: %s", endpoint, e)
            return
        if msg.type == Msg.ACK:
            for rid, _ in msg.acked():
                req = self._pending.get(rid)
                if req is not None and req.endpoint == endpoint:  # else: an earlier attempt's, or ended
                    self._release(req)
            return
        req = self._pending.get(msg.rid)
        if msg.type == Msg.ERROR and req is not None and req.endpoint == endpoint:
            self._on_error(req, msg, current=True)

    def _expire(self, req: _Req) -> None:
        if req.info.route is None and req.model not in self.routes:
            exc = RequestTimeout(f"no route for {req.model} from the coordinator {self.cfg.coordinator} before the "
                                 "deadline; is it running?")
        else:
            route = req.info.route.describe() if req.info.route else "?"
            sent = "sent" if req.endpoint else "still waiting to be sent (the first-stage workers were busy)"
            exc = RequestTimeout(f"request for {req.model} got no result within its deadline; it was {sent} "
                                 f"(route {route}, attempt {req.att + 1}); check the workers with `edgesplit "
                                 "workers` or raise timeout_ms")
        self._finish(req.rid, exc)

    def _finish(self, rid: bytes, exc: BaseException | None, result: Any = None) -> None:
        req = self._pending.pop(rid, None)
        if req is None:
            return
        self._admitting.pop(rid, None)
        self._held.pop(rid, None)
        self._release(req)
        req.x = None  # type: ignore[assignment]  # the input is no longer needed for a replay
        req.info.t_done = time.time()
        if exc is not None:
            _fail(req.future, exc)
        else:
            _resolve(req.future, result)

    def _sweep(self, now: float) -> None:
        for req in list(self._pending.values()):
            if now > req.deadline:
                self._expire(req)
            elif req.due is not None and now > req.due and (req.rid in self._admitting or req.rid in self._held):
                if req.rid in self._admitting:
                    why = (f"the coordinator {self.cfg.coordinator} did not answer its admission before the deadline; "
                           "is it running?")
                else:
                    why = ("it was admitted, but its server fell behind the plan and the coordinator had not released "
                           "it by the deadline (nothing was sent)")
                self._finish(req.rid, DeadlineMissed(f"request for {req.model} missed its deadline of "
                                                     f"{req.info.deadline_ms:g} ms: {why}", 0.0))
            elif req.lost_at is not None and now > req.lost_at:
                self._replay(req, WorkerLost(req.lost_reason))
        self._links.expire(now)
        for rid, call in list(self._calls.items()):
            if now > call.deadline:
                del self._calls[rid]
                _fail(call.future, RequestTimeout(f"coordinator {self.cfg.coordinator} did not answer the "
                                                  f"{call.what or 'call'} in time; is it running and reachable?"))
        for rid, model in list(self._asked.items()):
            if now > self._route_retry.get(model, 0.0):
                del self._asked[rid]  # unanswered: the next pump asks again


def _resolve(fut: concurrent.futures.Future, value: Any) -> None:
    try:
        if not fut.done():
            fut.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass  # the caller cancelled it


def _fail(fut: concurrent.futures.Future, exc: BaseException) -> None:
    try:
        if not fut.done():
            fut.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass  # resolved by another thread a moment ago


def connect(coordinator: str | None = None, **overrides: Any) -> Client:
    """A client of the cluster whose coordinator is at ``coordinator`` (any ``ClientConfig`` field as keyword).

    Settings not given come from ``EDGESPLIT_*`` variables (``EDGESPLIT_COORDINATOR``,
    ``EDGESPLIT_KEYS``, ...) as for the CLI, else the defaults (``tcp://127.0.0.1:5555``), so
    one script serves every cluster its environment names.
    """
    cfg = from_env(ClientConfig)
    if coordinator is not None:
        cfg = dataclasses.replace(cfg, coordinator=coordinator)
    return Client(cfg, **overrides)


def _per_worker(v: Any) -> dict[str, dict[str, Any]]:
    """A reply's ``{worker: {figure: value}}`` map, keeping only well-formed entries."""
    if not isinstance(v, dict):
        return {}
    return {str(k): {str(a): b for a, b in r.items()} for k, r in v.items() if isinstance(r, dict)}
