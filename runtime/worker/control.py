"""The control loop (the worker's main thread): registration, heartbeats, orders from the coordinator.

It registers (READY) on every fresh connection, heartbeats with telemetry, reconnects with
backoff when the coordinator goes silent (:class:`~edgesplit.runtime.liveness.CoordinatorLink`,
shared with the client), and takes DEPLOY/CHUNK (through the :class:`Deployer`), LINK
orders and NOTICEs of lost or returning peers (handed to the data plane). A READY refused
because another live worker holds this name stops the worker: two workers under one name
would steal each other's registration.
"""
from __future__ import annotations

import logging
import os
import socket as pysocket
import time
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from edgesplit.partitioner import EdgesplitError

from .. import protocol as P
from ..errors import ConfigError, ProtocolError
from ..liveness import CoordinatorLink
from ..links import check_link
from ..protocol import Err, Msg
from ..transport import SocketOptions, dealer, recv, send
from .deploy import Deployer, _reply
from .measure import Measurer

HEADER_SLACK_BYTES = 256  # the heartbeat's header beside its body (type, rid, budget)

if TYPE_CHECKING:
    from .daemon import Worker


class ControlLoop:
    """The worker's link to the coordinator."""

    def __init__(self, worker: "Worker") -> None:
        self.w = worker
        self.log = logging.getLogger(f"edgesplit.worker.{worker.name}")
        self.deployer = Deployer(worker)
        self.measurer = Measurer(worker)
        self.need_ready = True
        self.refused: str | None = None  # why the coordinator refused us (the worker then exits)

    def _connect(self) -> zmq.Socket:
        w = self.w
        self.need_ready = True  # sent by the loop once the link is up (IMMEDIATE refuses sends before)
        return dealer(w.ctx, w.cfg.coordinator, w.ident,
                      SocketOptions(hwm_msgs=P.CONTROL_HWM_MSGS, max_frame_bytes=P.CHUNK_BYTES * 2),
                      w.sec, w.coordinator_key)

    def ready_body(self) -> dict[str, Any]:
        w = self.w
        return {"name": w.name, "endpoint": w.endpoint, "device": str(w.device),
                "memory_budget_bytes": w.cfg.memory_budget_bytes, "host": pysocket.gethostname(),
                "pid": os.getpid(), "stages": [s.info.to_msg() for s in w.stages.values()]}

    def heartbeat_body(self) -> dict[str, Any]:
        w = self.w
        nexts = {ep for s in w.stages.values() for ep in s.info.next}  # links of stages gone are not reported
        rates = {f"link_rate_bps {ep}": m.rate for ep, m in list(w.rates.items()) if m.rate is not None and ep in nexts}
        body = {"stages": [s.info.to_msg() for s in w.stages.values()],
                "telemetry": {**w.telemetry.sample(), **rates},
                "stats": w.stats.report(), "cache": w.cache.report(), "resident": w.resident_stages(),
                "counters": w.counters(), "queue": w.inq.qsize(), "kept": len(w.dataplane.kept)}
        body["metrics"] = self.metrics_body(P.HEADER_MAX_BYTES - HEADER_SLACK_BYTES - len(msgpack.packb(body)))
        return body

    def metrics_body(self, room: int) -> dict[str, Any]:
        """Cumulative figures for the coordinator's /metrics, in at most ``room`` packed bytes (see :func:`fit_rows`).

        ``outcomes`` [[model, outcome, n]], ``links`` [[endpoint, payload bytes, messages]] sent to next
        stages, ``hist`` [[model, hop, sum_ms, [n per bucket of COMPUTE_BUCKETS_MS, then +Inf]]]; all since start.
        """
        dp = self.w.dataplane
        return fit_rows({"outcomes": [[m, o, n] for (m, o), n in sorted(list(dp.outcomes.items()))],
                         "links": [[ep, n, dp.link_msgs[ep]] for ep, n in sorted(list(dp.link_bytes.items()))],
                         "hist": self.w.stats.histograms()}, room)

    def run(self) -> None:
        w = self.w
        interval = w.cfg.heartbeat_ms / 1000.0
        link = CoordinatorLink(self._connect, w.cfg.heartbeat_ms, w.cfg.liveness, f"coordinator {w.cfg.coordinator}",
                               self.log)
        next_hb = time.monotonic() + interval
        try:
            while not w.stopping.is_set():
                now = time.monotonic()
                w.nag.tick(now)
                if link.sock is None:
                    if link.tick(now):
                        continue
                    w.stopping.wait(0.05)
                    continue
                sock = link.sock
                loading = self.deployer.active or self.deployer.prefetching or self.measurer.active
                timeout_ms = max(0, min(5 if loading else 50 if self.need_ready else 100,
                                        int((next_hb - now) * 1000)))
                if sock.poll(timeout_ms, zmq.POLLIN):
                    for _ in range(64):
                        try:
                            _, frames = recv(sock)
                        except zmq.Again:
                            break
                        link.heard()
                        self.on_control(sock, frames)
                if self.refused:
                    raise ConfigError(self.refused)
                if self.need_ready and send(sock, P.encode(Msg.READY, P.new_rid(), w.ttl_ms(),
                                                           {"body": self.ready_body()})):
                    self.need_ready = False
                while not w.refetch.empty():
                    self.deployer.refetch(w.refetch.get())
                self.deployer.advance(sock)
                self.measurer.advance(sock)
                now = time.monotonic()
                if now >= next_hb:
                    send(sock, P.encode(Msg.HEARTBEAT, P.new_rid(), w.ttl_ms(), {"body": self.heartbeat_body()}))
                    next_hb = now + interval
                link.tick(now)
                if link.sock is None:
                    self.deployer.cancel_all()
        finally:
            link.close()
            self.deployer.loader.shutdown(wait=False, cancel_futures=True)
            self.measurer.close()

    def on_control(self, sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames, max_frame_bytes=P.CHUNK_BYTES * 2)
        except ProtocolError as e:
            self.log.warning("W: bad message from coordinator: %s", e)
            return
        try:
            self.dispatch(sock, msg)
        except (EdgesplitError, ValueError, TypeError, KeyError, IndexError) as e:  # a malformed control body
            self.log.warning("W: refused %s from coordinator: %s", msg.type.name, e)

    def dispatch(self, sock: zmq.Socket, msg: P.Message) -> None:
        w, t = self.w, msg.type
        if t == Msg.HEARTBEAT:
            return
        if t == Msg.DISCONNECT:
            self.log.info("coordinator does not know us (restarted, or it declared us lost); registering again")
            self.need_ready = True
        elif t == Msg.DEPLOY:
            self.deployer.start(sock, msg)
        elif t == Msg.CHUNK:
            self.deployer.on_chunk(sock, msg)
        elif t == Msg.PREFETCH:
            self.deployer.prefetch(sock, msg)
        elif t == Msg.LINK:
            self.on_link(sock, msg)
        elif t == Msg.MEASURE:
            self.measurer.start(sock, msg)
        elif t == Msg.NOTICE:
            lost, alive = msg.body.get("lost_endpoint"), msg.body.get("alive_endpoint")
            if isinstance(lost, str):
                w.events.put(("lost", (lost, str(msg.body.get("lost", "?"))[:64])))
            if isinstance(alive, str):
                key = msg.body.get("alive_key")
                if w.sec.keyed and isinstance(key, str) and len(key) == P.KEY_Z85_CHARS:
                    w.peer_keys[alive] = key  # the coordinator vouches for the key now serving there
                w.events.put(("alive", alive))
            w.waker.wake()
        elif t == Msg.ERROR:
            code, reason = msg.get("err")
            if code == Err.NAME_TAKEN:
                self.refused = f"the coordinator refused worker {w.name}: {reason}"
                return
            self.deployer.fail(sock, msg.rid, Err(code) if code in P.ERR_NAMES else Err.DEPLOY_FAILED, reason)
        else:
            self.log.warning("W: unexpected %s from coordinator", P.msg_name(t))

    def on_link(self, sock: zmq.Socket, msg: P.Message) -> None:
        """A LINK order: new settings for the output link of a hosted stage, from the next request on."""
        w, body = self.w, msg.body
        model, hop = P.body_get(body, "model", str), P.body_get(body, "hop", int)
        stage = w.stages.get((model, hop))
        if stage is None or P.body_get(body, "plan", int, stage.info.plan) != stage.info.plan:
            _reply(sock, P.encode_error(msg.rid, Err.NOT_DEPLOYED, f"worker {w.name} does not host stage "
                                        f"{hop} of {model} (plan {body.get('plan')})"))
            return
        try:
            new = stage.link_out.changed(body.get("link"))
            check_link(stage.codec_out, new)
        except (ProtocolError, ConfigError) as e:
            _reply(sock, P.encode_error(msg.rid, Err.BAD_INPUT, f"worker {w.name}, cut after stage {hop} "
                                        f"of {model}: {e}"))
            return
        stage.link_out = new  # one attribute swap: a request in compute uses the old spec or the new one
        self.log.info("link after stage %d of %s now %s", hop, model, new.to_msg())
        _reply(sock, P.encode(Msg.LINK, msg.rid, 0, {"body": {"model": model, "hop": hop, "link": new.to_msg()}}))


def fit_rows(sections: dict[str, list[Any]], room: int) -> dict[str, list[Any]]:
    """``sections`` with rows taken in order while their msgpack bytes fit ``room``; the rest left out.

    The heartbeat travels in one header of at most ``HEADER_MAX_BYTES``: however many models and
    stages a worker has seen, these additions never push it over.
    """
    out: dict[str, list[Any]] = {k: [] for k in sections}
    room -= len(msgpack.packb(out)) + 16  # the key naming it, and list headers growing past 15 rows
    for key, rows in sections.items():
        for row in rows:
            room -= len(msgpack.packb(row))
            if room < 0:
                return out
            out[key].append(row)
    return out
