"""MEASURE orders: profile a model's blocks on this device, then probe the links to the listed peers.

Not a loop of its own: the control loop calls :meth:`Measurer.advance` every iteration and
the work runs on one measuring thread, so heartbeats never wait behind it. Orders run one
at a time, in arrival order (two profiles at once would time each other).
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from edgesplit.partitioner import EdgesplitError, ModelManifest

from .. import protocol as P
from ..errors import ProtocolError, RuntimeFailure
from ..probe import probe_link
from ..protocol import Err, Msg
from ..transport import send
from .profile import profile

if TYPE_CHECKING:
    from .daemon import Worker

MAX_BATCHES = 8  # batch sizes one order may ask to profile
MAX_TARGETS = 32  # links one order may ask to probe
MAX_PROBE_S = 5.0
MAX_PENDING = 4  # orders queued here at once (the coordinator sends one at a time; this bounds anyone else)


class Measurer:
    """MEASURE orders in progress, keyed by request id."""

    def __init__(self, worker: "Worker") -> None:
        self.w = worker
        self.log = logging.getLogger(f"edgesplit.worker.{worker.name}.measure")
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="measure")
        self.active: dict[bytes, concurrent.futures.Future] = {}

    def start(self, sock: zmq.Socket, msg: P.Message) -> None:
        """Check an order and queue it on the measuring thread (a bad one is answered with an ERROR)."""
        w = self.w
        try:
            body = msg.body
            model = P.check_model_name(P.body_get(body, "model", str))
            manifest = ModelManifest.from_json(bytes(msg.blob(0)).decode())
            if manifest.name != model:
                raise ProtocolError(f"bad message: MEASURE of {model} carries a manifest of {manifest.name}")
            batches = P.body_get(body, "batches", list, [1])
            if not (1 <= len(batches) <= MAX_BATCHES
                    and all(type(b) is int and 1 <= b <= P.MAX_BATCH for b in batches)):
                raise ProtocolError(f"bad message: batches is 1..{MAX_BATCHES} sizes in [1, {P.MAX_BATCH}]")
            reps = P.body_get(body, "reps", int, 10)
            if not 1 <= reps <= 100:
                raise ProtocolError("bad message: reps must be in [1, 100]")
            targets = P.body_get(body, "targets", list, [])
            if len(targets) > MAX_TARGETS or not all(isinstance(t, list) and len(t) == 2 for t in targets):
                raise ProtocolError(f"bad message: targets is at most {MAX_TARGETS} [endpoint, key] pairs")
            targets = [(P.check_endpoint(ep), key if isinstance(key, str) and key else None) for ep, key in targets]
            probe_s = float(P.body_get(body, "probe_s", (int, float), 0.5))
            if not 0.05 <= probe_s <= MAX_PROBE_S:
                raise ProtocolError(f"bad message: probe_s must be in [0.05, {MAX_PROBE_S}]")
            refresh = P.body_get(body, "refresh", bool, False)
        except (EdgesplitError, UnicodeDecodeError, ValueError, TypeError, IndexError) as e:
            _reply(sock, P.encode_error(msg.rid, Err.BAD_INPUT, f"worker {w.name}: bad MEASURE: {e}"))
            return
        if len(self.active) >= MAX_PENDING:
            _reply(sock, P.encode_error(msg.rid, Err.OVERLOADED, f"worker {w.name}: {len(self.active)} MEASURE "
                                                                  "orders are queued already"))
            return
        deadline = time.monotonic() + msg.budget_ms / 1000.0
        self.active[msg.rid] = self.pool.submit(self._measure, manifest, batches, reps, targets, probe_s, refresh,
                                                deadline)

    def _measure(self, manifest: ModelManifest, batches: list[int], reps: int,
                 targets: list[tuple[str, str | None]], probe_s: float, refresh: bool,
                 deadline: float) -> dict[str, Any]:
        w = self.w
        if time.monotonic() > deadline:  # its asker gave up while older orders ran: do not spend the board on it
            raise RuntimeFailure("the order's deadline passed while it waited for its turn; nothing was measured")
        profiles = profile(manifest, w.device, w.store.root, batches, reps, w.cfg.slowdown, refresh,
                           budget_bytes=w.cfg.memory_budget_bytes)
        links = []
        for endpoint, key in targets:
            if endpoint == w.endpoint:
                continue
            try:
                r = probe_link(w.ctx, endpoint, probe_s, w.sec if w.sec.keyed else None, key)
                links.append([endpoint, r.rate_bps, round(r.rtt_ms, 4)])  # inf: too fast to time, not a failure
                self.log.info("link to %s: %.2f MiB/s, round trip %.2f ms", endpoint, r.rate_bps / 2**20, r.rtt_ms)
            except (RuntimeFailure, ProtocolError, zmq.ZMQError) as e:
                self.log.warning("link probe to %s failed: %s", endpoint, e)
                links.append([endpoint, -1.0, -1.0])
        return {"model": manifest.name, "name": w.name, "device": str(w.device), "slowdown": w.cfg.slowdown,
                "memory_budget_bytes": w.cfg.memory_budget_bytes,
                "profiles": [[b, [round(ms, 4) for ms in profiles[b].block_ms]] for b in batches],
                "first": [[b, [round(ms, 4) for ms in profiles[b].first_ms]] for b in batches], "links": links}

    def advance(self, sock: zmq.Socket) -> None:
        """Answer the orders whose measuring finished."""
        for rid, fut in list(self.active.items()):
            if not fut.done():
                continue
            del self.active[rid]
            try:
                _reply(sock, P.encode(Msg.MEASURE, rid, 0, {}, [P.pack_blob(fut.result())]))
            except Exception as e:  # noqa: BLE001  (a recipe that does not build here, device memory: say so, serve on)
                self.log.warning("measuring failed: %s: %s", type(e).__name__, e)
                _reply(sock, P.encode_error(rid, Err.BAD_INPUT, f"worker {self.w.name}: measuring failed: "
                                                                f"{type(e).__name__}: {e}"))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _reply(sock: zmq.Socket, frames: list[Any]) -> None:
    if not send(sock, frames):
        logging.getLogger("edgesplit.worker").warning("W: coordinator queue full; MEASURE reply dropped")
