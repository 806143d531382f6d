"""The client: submit inputs, get results or explicit errors; plus the coordinator-script API.

::

    from edgesplit.runtime import connect
    with connect("tcp://127.0.0.1:5555") as cl:
        print(cl.workers())                                   # the registry, with telemetry
        cl.deploy("vit_tiny_patch16_224", n_stages=3)         # a layer-wise plan over the live workers
        y = cl.infer("vit_tiny_patch16_224", x)               # one request
        futures = [cl.submit("vit_tiny_patch16_224", xi) for xi in xs]   # many in flight (pipelined)

The client asks the coordinator for a model's route once, then sends each input straight
to the first stage's worker; the last stage sends the result to the client's own result
socket. Every request ends exactly once: a tensor, or an exception naming the reason
(``UnknownModel``, ``BadInput``, ``WorkerLost``, ``RequestTimeout``, ...) -- never a hang:

- each request has a deadline (``timeout_ms``), enforced here whatever the cluster does;
- the client keeps each input until the first worker ACKs it, and fails it at once when
  the coordinator announces that worker lost;
- workers keep their outputs until the next hop ACKs, and report WORKER_LOST for those
  when its worker is announced lost;
- for a request past those points, a lost worker on its route fails it ``lost_grace_ms``
  after the notice unless its result arrives first.

A result tensor borrows the receive buffer (no copy); it is yours, but clone it if you
need it resizable.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import zmq

from . import protocol as P
from .config import from_mapping, opt
from .errors import Overloaded, ProtocolError, RequestTimeout, RuntimeFailure, UnknownModel, WorkerLost
from .links import LinkSpec, decode_link
from .protocol import Err, Msg
from .transport import PeerLinks, SocketOptions, Waker, advertised, dealer, local_address_towards, router, send
from .types import Route, WorkerInfo

log = logging.getLogger("edgesplit.client")


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
    lost_grace_ms: int = opt(500, "after a lost-worker notice, how long a request through it may still deliver")
    heartbeat_ms: int = opt(P.HEARTBEAT_INTERVAL_MS, "interval of the client's HELLO to the coordinator")
    liveness: int = opt(P.HEARTBEAT_LIVENESS, "silent intervals before the client reconnects to the coordinator")
    max_frame_bytes: int = opt(P.MAX_FRAME_BYTES, "largest result frame accepted")


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

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_submit) * 1000


@dataclass
class _Req:
    rid: bytes
    model: str
    x: torch.Tensor
    future: concurrent.futures.Future
    deadline: float  # monotonic
    trace: bool
    info: RequestInfo
    endpoint: str | None = None  # hop 0's worker, once sent
    lost_at: float | None = None
    lost_reason: str = ""


@dataclass
class _Call:
    future: concurrent.futures.Future
    deadline: float
    what: str


class Client:
    """A connection to a cluster: requests, routes, the worker registry, deploys."""

    def __init__(self, cfg: ClientConfig = ClientConfig(), **overrides: Any) -> None:
        self.cfg = from_mapping(ClientConfig, overrides, cfg) if overrides else cfg
        self.ident = b"c-" + P.new_rid()[:8].hex().encode()
        self.ctx = zmq.Context(io_threads=1)
        host = self.cfg.reply_host or local_address_towards(self.cfg.coordinator)
        self._results, bound = router(self.ctx, f"tcp://{host}:{self.cfg.reply_port or '*'}",
                                      SocketOptions(hwm_msgs=max(P.DATA_HWM_MSGS, 64),
                                                    max_frame_bytes=self.cfg.max_frame_bytes))
        self.reply_endpoint = advertised(bound, host)
        self._slots = threading.BoundedSemaphore(self.cfg.max_in_flight)
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._waker = Waker()
        self._closed = threading.Event()
        self.routes: dict[str, Route] = {}
        self._thread = threading.Thread(target=self._io_loop, name="client-io", daemon=True)
        self._thread.start()

    # --- public API ------------------------------------------------------------------------------
    def submit(self, model: str, x: torch.Tensor, timeout_ms: int | None = None,
               trace: bool = False) -> concurrent.futures.Future:
        """Send one input; the future resolves to the output tensor or raises the request's error.

        Args:
            model: model name in the coordinator's store (deployed).
            x: input batch, e.g. ``(B, 3, 224, 224)`` float32.
            timeout_ms: deadline (default ``cfg.timeout_ms``); the request fails with ``RequestTimeout`` after it.
            trace: ask every stage to record its timings (``future.info.trace``).
        Returns:
            A ``concurrent.futures.Future``; ``future.info`` is the request's :class:`RequestInfo`.
        """
        if self._closed.is_set():
            raise RuntimeFailure("client is closed; connect again")
        budget = self.cfg.timeout_ms if timeout_ms is None else timeout_ms
        if not self._slots.acquire(timeout=budget / 1000.0):
            raise Overloaded(f"{self.cfg.max_in_flight} requests already in flight for {budget} ms; "
                             "wait for results or raise max_in_flight")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.add_done_callback(lambda _: self._slots.release())
        rid = P.new_rid()
        info = RequestInfo(rid, model, time.time())
        fut.info = info  # type: ignore[attr-defined]
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        self._cmds.put(("submit", _Req(rid, model, x, fut, time.monotonic() + budget / 1000.0, trace, info)))
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
               links: Sequence[dict[str, Any] | None] | None = None, timeout_ms: int | None = None) -> Route:
        """Deploy a layer-wise plan and wait until every worker has loaded its stages.

        Args:
            model: model name in the coordinator's store.
            workers: worker names to use, in stage order (default: every live worker, by name).
            n_stages: number of stages (default: one per worker; more than workers = round robin).
            splits: block indices where a stage starts (default: balance the profiled block times).
            stages: an explicit plan ``[(worker, start, end), ...]`` instead of the three above.
            links: per cut (stages - 1 entries), its codec ``{"codec", "budget", "wire_dtype"}`` (default
                raw); ``codec`` names a trained codec in the manifest's ``extra["codecs"]`` or a kind of
                ``edgesplit.compression`` (e.g. "identity" with wire_dtype "fp16").
            timeout_ms: deadline (default ``cfg.deploy_timeout_ms``).
        Returns:
            The model's new route.
        """
        body: dict[str, Any] = {"model": model}
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
        msg = self._call(Msg.PLAN, {"body": body}, timeout_ms=timeout_ms or self.cfg.deploy_timeout_ms,
                         what=f"deploy of {model}")
        route = Route.from_msg(P.body_get(msg.body, "route", dict))
        self.routes[model] = route
        return route

    def set_link(self, model: str, cut: int, **changes: Any) -> dict[str, Any]:
        """Change the settings of a deployed link live: no redeploy, the next request uses them.

        Args:
            model: a deployed model.
            cut: which link, 0 = between stage 0 and stage 1.
            changes: any of ``budget`` (channels kept, None = full width; with ``rate``: the most
                kept), ``wire_dtype`` ("fp32", "fp16", "int8"), ``rate`` (bytes/s allocated to the
                link, or "measured" for the sender's own measurement, so the sender picks the
                budget per transfer; None = fixed budget) and
                ``share`` (fraction of a request's remaining time the transfer may take).
        Returns:
            The link's settings now (``{"codec", "budget", "wire_dtype", "rate", "share"}``).
        Raises:
            BadInput: the link's codec cannot take them (e.g. a budget it does not serve, a raw link).
            DeployError: no such cut.
        """
        msg = self._call(Msg.LINK, {"body": {"model": model, "cut": int(cut), "link": dict(changes)}},
                         what=f"link change of {model} cut {cut}")
        return dict(P.body_get(msg.body, "link", dict))

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

    def _loop(self) -> None:
        coord = dealer(self.ctx, self.cfg.coordinator, self.ident, SocketOptions(hwm_msgs=P.CONTROL_HWM_MSGS,
                                                                                max_frame_bytes=P.BLOB_MAX_BYTES))
        links = PeerLinks(self.ctx, self.ident, SocketOptions(max_frame_bytes=self.cfg.max_frame_bytes),
                          max_outbox_msgs=self.cfg.max_in_flight)
        self._pending: dict[bytes, _Req] = {}
        self._kept: dict[bytes, str] = {}  # rid -> hop 0 endpoint, until that worker ACKs
        self._calls: dict[bytes, _Call] = {}
        self._waiting: dict[str, list[_Req]] = {}  # model -> requests waiting for its route
        self._asked: dict[bytes, str] = {}  # ROUTE rid -> model
        self._ctl_out: collections.deque = collections.deque(maxlen=256)  # control messages not yet taken (oldest dropped)
        self._acks: collections.deque = collections.deque()
        interval = self.cfg.heartbeat_ms / 1000.0
        ttl = interval * self.cfg.liveness
        last_heard = time.monotonic()
        heard = False  # before first contact libzmq keeps reconnecting by itself; nothing to recover
        next_hello = 0.0
        self._coord = coord
        self._links = links
        while not self._closed.is_set():
            poller = zmq.Poller()
            poller.register(coord, zmq.POLLIN)
            poller.register(self._results, zmq.POLLIN)
            poller.register(self._waker, zmq.POLLIN)
            for sock, flags in links.poll_flags():
                poller.register(sock, flags)
            timeout = 5 if (self._ctl_out or self._acks) else 20
            events = dict(poller.poll(timeout))
            if self._waker.fileno() in events:
                self._waker.drain()
            self._drain_commands()
            if coord in events:
                for _ in range(64):
                    try:
                        frames = coord.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    last_heard, heard = time.monotonic(), True
                    self._on_coordinator(frames)
            if self._results in events:
                for _ in range(64):
                    try:
                        frames = self._results.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_result(frames[0].bytes, frames[1:])
            for sock, ev in events.items():
                ep = links.endpoint_of(sock) if isinstance(sock, zmq.Socket) else None
                if ep is None:
                    continue
                if ev & zmq.POLLIN:
                    for _ in range(64):
                        try:
                            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_link_reply(ep, frames)
                if ev & zmq.POLLOUT:
                    links.flush(ep)
            while self._ctl_out and send(coord, self._ctl_out[0]):
                self._ctl_out.popleft()
            while self._acks and send(self._results, self._acks[0][1], route=self._acks[0][0]):
                self._acks.popleft()
            now = time.monotonic()
            if now >= next_hello:
                next_hello = now + interval
                if not self._ctl_out:  # a HELLO behind a backlog would add nothing
                    self._to_coordinator(P.encode(Msg.HELLO, P.new_rid(), self.cfg.heartbeat_ms))
            if heard and now - last_heard > ttl:
                log.warning("coordinator %s silent for %.1f s; reconnecting", self.cfg.coordinator, now - last_heard)
                coord.close(0)
                coord = self._coord = dealer(self.ctx, self.cfg.coordinator, self.ident,
                                             SocketOptions(hwm_msgs=P.CONTROL_HWM_MSGS, max_frame_bytes=P.BLOB_MAX_BYTES))
                self._ctl_out.clear()
                last_heard, heard = now, False
            self._sweep(now)
        links.close_all()
        coord.close(0)

    def _fail_everything(self, exc: RuntimeFailure) -> None:
        for req in list(getattr(self, "_pending", {}).values()) + [r for rs in getattr(self, "_waiting", {}).values()
                                                                  for r in rs]:
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
        if self._ctl_out or not send(self._coord, frames):
            self._ctl_out.append(frames)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "submit":
                req: _Req = cmd[1]
                route = self.routes.get(req.model)
                if route is not None:
                    self._send(req, route)
                else:
                    self._wait_route(req)
            elif cmd[0] == "call":
                _, rid, frames, call = cmd
                self._calls[rid] = call
                self._to_coordinator(frames)

    def _wait_route(self, req: _Req) -> None:
        waiting = self._waiting.setdefault(req.model, [])
        waiting.append(req)
        if len(waiting) == 1 and req.model not in self._asked.values():
            rid = P.new_rid()
            self._asked[rid] = req.model
            try:
                frames = P.encode(Msg.ROUTE, rid, self.cfg.control_timeout_ms, {"mdl": req.model})
            except ProtocolError as e:
                del self._asked[rid]
                self._fail_waiting(req.model, UnknownModel(f"bad model name: {e}"))
                return
            self._to_coordinator(frames)

    def _fail_waiting(self, model: str, exc: RuntimeFailure) -> None:
        for req in self._waiting.pop(model, []):
            _fail(req.future, exc)

    def _send(self, req: _Req, route: Route) -> None:
        hop0 = route.hops[0]
        budget_ms = int((req.deadline - time.monotonic()) * 1000)
        if budget_ms <= 0:
            _fail(req.future, RequestTimeout(f"request for {req.model} timed out before it was sent"))
            return
        fields: dict[str, Any] = {"mdl": req.model, "hop": 0, "rep": self.reply_endpoint, "pln": route.plan}
        if req.trace:
            fields["trc"] = []
        try:
            frames = P.encode(Msg.RUN, req.rid, budget_ms, fields, [req.x])
        except (ProtocolError, TypeError) as e:
            _fail(req.future, P.error_from_wire(Err.BAD_INPUT, f"input for {req.model} cannot be sent: {e}"))
            return
        req.info.route = route
        req.info.input_bytes = P.total_bytes(frames[2:])
        req.info.t_sent = time.time()
        req.endpoint = hop0.endpoint
        if not self._links.send(hop0.endpoint, frames):
            _fail(req.future, P.error_from_wire(Err.OVERLOADED, f"outbox to {hop0.worker} is full"))
            return
        req.x = None  # the frames hold the data now; drop our reference
        self._pending[req.rid] = req
        self._kept[req.rid] = hop0.endpoint

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
        if model is not None:  # a route we asked for on behalf of waiting requests
            if msg.type == Msg.ERROR:
                code, reason = msg.get("err")
                self._fail_waiting(model, P.error_from_wire(code, reason))
                return
            try:
                route = Route.from_msg(P.body_get(msg.body, "route", dict))
            except ProtocolError as e:
                self._fail_waiting(model, e)
                return
            self.routes[model] = route
            for req in self._waiting.pop(model, []):
                self._send(req, route)
            return
        call = self._calls.pop(msg.rid, None)
        if call is None:
            return  # HELLO replies and late answers
        if msg.type == Msg.ERROR:
            code, reason = msg.get("err")
            _fail(call.future, P.error_from_wire(code, reason))
        else:
            _resolve(call.future, msg)

    def _on_notice(self, msg: P.Message) -> None:
        name = str(msg.body.get("lost", ""))
        endpoint = msg.body.get("lost_endpoint")
        for model, route in list(self.routes.items()):
            if name in route.workers:
                del self.routes[model]
        now = time.monotonic()
        for rid, req in list(self._pending.items()):
            if self._kept.get(rid) == endpoint:  # we still hold its input: it never left that worker
                self._finish(rid, WorkerLost(f"worker {name} ({endpoint}), stage 0 of {req.model}'s route, was lost "
                                             "before acknowledging the request"))
            elif req.info.route is not None and name in req.info.route.workers and req.lost_at is None:
                req.lost_at = now + self.cfg.lost_grace_ms / 1000.0
                req.lost_reason = (f"worker {name} on the route of {req.model} ({' -> '.join(req.info.route.workers)}) "
                                   "was lost and no result arrived")
        if isinstance(endpoint, str):
            self._links.drop_outbox(endpoint)
            self._links.close(endpoint)

    def _on_result(self, ident: bytes, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames, max_frame_bytes=self.cfg.max_frame_bytes)
        except ProtocolError as e:
            log.warning("W: bad message on the result socket from %r: %s", ident[:32], e)
            return
        if msg.type not in (Msg.RESULT, Msg.ERROR):
            return
        if msg.type == Msg.RESULT:
            self._ack(ident, msg)
        req = self._pending.get(msg.rid)
        if req is None:
            return  # already failed (deadline, notice) or a duplicate
        if msg.type == Msg.ERROR:
            code, reason = msg.get("err")
            if code == Err.NOT_DEPLOYED:
                self.routes.pop(req.model, None)
            self._finish(msg.rid, P.error_from_wire(code, reason))
            return
        try:  # the last link (to the client) is raw
            y = decode_link(None, LinkSpec(), msg.get("cod", "raw"), msg.get("cmeta", {}), msg.tensors, None)
        except RuntimeFailure as e:
            self._finish(msg.rid, e)
            return
        req.info.output_bytes = msg.payload_bytes
        req.info.trace = list(msg.get("trc", []))
        self._finish(msg.rid, None, y)

    def _ack(self, ident: bytes, msg: P.Message) -> None:
        frames = P.encode(Msg.ACK, msg.rid, 0, {"hop": msg.get("hop", 0)})
        if self._acks or not send(self._results, frames, route=[ident]):
            self._acks.append(([ident], frames))

    def _on_link_reply(self, endpoint: str, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ProtocolError as e:
            log.warning("W: bad reply from %s: %s", endpoint, e)
            return
        if msg.type == Msg.ACK:
            self._kept.pop(msg.rid, None)
        elif msg.type == Msg.ERROR:
            req = self._pending.get(msg.rid)
            if req is None:
                return
            code, reason = msg.get("err")
            if code == Err.NOT_DEPLOYED:
                self.routes.pop(req.model, None)
            self._finish(msg.rid, P.error_from_wire(code, reason))

    def _finish(self, rid: bytes, exc: BaseException | None, result: Any = None) -> None:
        req = self._pending.pop(rid, None)
        self._kept.pop(rid, None)
        if req is None:
            return
        req.info.t_done = time.time()
        if exc is not None:
            _fail(req.future, exc)
        else:
            _resolve(req.future, result)

    def _sweep(self, now: float) -> None:
        for rid, req in list(self._pending.items()):
            if now > req.deadline:
                route = " -> ".join(req.info.route.workers) if req.info.route else "?"
                self._finish(rid, RequestTimeout(f"request for {req.model} got no result within its deadline "
                                                 f"(route {route}); check the workers with `edgesplit workers` "
                                                 "or raise timeout_ms"))
            elif req.lost_at is not None and now > req.lost_at:
                self._finish(rid, WorkerLost(req.lost_reason))
        for model, reqs in list(self._waiting.items()):
            for req in [r for r in reqs if now > r.deadline]:
                reqs.remove(req)
                _fail(req.future, RequestTimeout(f"no route for {req.model} from the coordinator "
                                                 f"{self.cfg.coordinator} before the deadline; is it running?"))
            if not reqs:
                del self._waiting[model]
                for rid in [r for r, m in self._asked.items() if m == model]:
                    del self._asked[rid]
        for rid, call in list(self._calls.items()):
            if now > call.deadline:
                del self._calls[rid]
                _fail(call.future, RequestTimeout(f"coordinator {self.cfg.coordinator} did not answer the "
                                                  f"{call.what or 'call'} in time; is it running and reachable?"))


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


def connect(coordinator: str = "tcp://127.0.0.1:5555", **overrides: Any) -> Client:
    """A client of the cluster whose coordinator is at ``coordinator`` (any ``ClientConfig`` field as keyword)."""
    return Client(ClientConfig(coordinator=coordinator), **overrides)
