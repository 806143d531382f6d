"""The worker daemon: hosts stages, runs them, sends activations straight to the next stage's worker.

Run one per board::

    edgesplit worker --coordinator tcp://10.0.0.1:5555 --bind tcp://*:5600 --store /var/lib/edgesplit \\
        --device cuda --memory-budget 2GiB --name jetson-1
    # on one machine, for a try: edgesplit up --workers 3

Three threads, so receiving, computing and sending overlap (pipelining) and heartbeats
never wait behind a forward pass:

- control (main thread): registers with the coordinator, heartbeats with telemetry,
  reconnects with backoff, takes DEPLOY orders, fetches missing blocks in chunks and
  has the loader thread verify and build stages;
- io: owns the data ROUTER (RUN in, ACK/ERROR back to the sender) and one DEALER per
  downstream peer; keeps every output it sent until the next hop ACKs it (the kept
  table, bounded; a later issue replays from it on a replica);
- compute: takes jobs from a bounded queue (full queue -> io stops reading -> ZeroMQ's
  HWM pushes back on the sender), decodes the link codec, runs the stage, encodes.

ACK semantics: a worker ACKs hop k to its sender once its own output for that request
exists (kept here) or the request ended in an error it reported. So for every request
in flight exactly one party keeps its latest input: when the coordinator announces a lost
worker, the keeper of each request that was waiting on it reports WORKER_LOST to the
requester at once.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import re
import signal
import socket as pysocket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq
from torch import nn

from edgesplit.partitioner import BlockStore, EdgesplitError, ModelManifest, build_blocks

from . import dummy  # noqa: F401  (registers the "dummy" builder used by routing tests and benchmarks)
from . import protocol as P
from .cache import BlockCache
from .config import opt
from .errors import BadInput, ConfigError, ProtocolError, RuntimeFailure
from .links import LinkCodec, LinkSpec, RateMeter, check_link, codec_block, create_link_codec, decode_link, encode_link
from .liveness import Backoff
from .protocol import Err, Msg
from .telemetry import Telemetry
from .transport import PeerLinks, SocketOptions, Waker, advertised, dealer, local_address_towards, router, send
from .types import StageInfo

log = logging.getLogger("edgesplit.worker")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class WorkerConfig:
    """A worker daemon's settings (``edgesplit worker --help`` lists them as flags)."""

    coordinator: str = opt("tcp://127.0.0.1:5555", "coordinator endpoint to register with")
    bind: str = opt("tcp://*:5600", "data endpoint to bind; activations arrive here (tcp://HOST:* = any free port)")
    advertise: str | None = opt(None, "endpoint peers connect to (default: the bound address, with * replaced by "
                                      "this host's address towards the coordinator)")
    store: str = opt("./worker-store", "local block store; blocks it lacks are fetched from the coordinator into it")
    device: str = opt("cpu", "where stages run: cpu, cuda or cuda:N")
    memory_budget_bytes: int = opt(2 * 1024**3, "bytes of block tensors kept resident (e.g. 2GiB)", alias="--memory-budget")
    name: str | None = opt(None, "worker name, unique in the cluster (default: HOST-PORT)")
    torch_threads: int = opt(0, "torch intra-op threads for compute (0 = torch's default)")
    queue_depth: int = opt(4, "requests queued for compute before the worker stops reading (back-pressure)")
    max_kept: int = opt(64, "outputs kept until the next hop acknowledges them; when full, compute waits")
    max_frame_bytes: int = opt(P.MAX_FRAME_BYTES, "largest tensor payload accepted per message (a larger frame "
                                                  "makes libzmq drop the peer; a larger declared size is refused)")
    heartbeat_ms: int = opt(P.HEARTBEAT_INTERVAL_MS, "heartbeat interval to the coordinator")
    liveness: int = opt(P.HEARTBEAT_LIVENESS, "silent heartbeat intervals before the coordinator is presumed dead")
    crash_after: int = opt(0, "fault injection: exit abruptly after computing N requests (0 = off)")
    stall_ms: int = opt(0, "fault injection: sleep this long before each compute (0 = off)")
    log_level: str = opt("info", "logging level", choices=["debug", "info", "warning", "error"])


@dataclass
class Stage:
    """A hosted stage: its place on the route, the module, its block ids, and the codecs of its two links."""

    info: StageInfo
    module: nn.Module
    block_ids: list[str]
    in_shape: list[int]  # per-sample input shape
    link_in: LinkSpec  # how its input arrives (the previous cut)
    link_out: LinkSpec  # how its output leaves (the next cut)
    codec_in: LinkCodec | None  # None = raw
    codec_out: LinkCodec | None


@dataclass
class _Job:
    msg: P.Message
    upstream: list[bytes]  # ROUTER route back to the sender
    t_recv: float  # wall clock, for traces
    deadline: float  # monotonic


@dataclass
class _Done:
    job: _Job
    stage: Stage | None
    payload: list[Any] = field(default_factory=list)
    cmeta: dict[str, Any] = field(default_factory=dict)
    t_start: float = 0.0
    t_end: float = 0.0
    error: tuple[Err, str] | None = None


@dataclass
class _Kept:
    """An output sent downstream and not yet acknowledged (replayable)."""

    dest: str
    frames: list[Any]
    rep: str
    model: str
    hop: int
    deadline: float
    nbytes: int  # payload bytes, for the link's rate meter
    t_send: float  # monotonic


class StageStats:
    """Recent compute times per stage, read by the heartbeat (thread-safe)."""

    def __init__(self, window: int = 512) -> None:
        self._lock = threading.Lock()
        self._ms: dict[tuple[str, int], collections.deque] = {}
        self._count: collections.Counter = collections.Counter()
        self._errors: collections.Counter = collections.Counter()

    def add(self, key: tuple[str, int], ms: float | None) -> None:
        with self._lock:
            if ms is None:
                self._errors[key] += 1
                return
            self._ms.setdefault(key, collections.deque(maxlen=512)).append(ms)
            self._count[key] += 1

    def report(self) -> list[list[Any]]:
        """``[[model, hop, n, compute_ms_p50, compute_ms_mean, errors], ...]``."""
        with self._lock:
            out = []
            for key in sorted(set(self._ms) | set(self._errors)):
                ms = sorted(self._ms.get(key, ()))
                p50 = ms[len(ms) // 2] if ms else 0.0
                mean = sum(ms) / len(ms) if ms else 0.0
                out.append([key[0], key[1], self._count[key], round(p50, 4), round(mean, 4), self._errors[key]])
            return out

    def reset(self) -> None:
        with self._lock:
            self._ms.clear()
            self._count.clear()
            self._errors.clear()


class _Deploy:
    """A DEPLOY order in progress: fetch missing blocks chunk by chunk, then build the stages."""

    def __init__(self, rid: bytes, manifest: ModelManifest, plan: int, stages: list[StageInfo],
                 links: list[tuple[LinkSpec, LinkSpec]], missing: list[str]) -> None:
        self.rid, self.manifest, self.plan, self.stages, self.links = rid, manifest, plan, stages, links
        self.missing = collections.deque(missing)
        self.current: str | None = None
        self.buf: bytearray | None = None
        self.size = -1
        self.next_off = 0
        self.received = 0
        self.outstanding = 0
        self.fetched_bytes = 0
        self.verifying: list[concurrent.futures.Future] = []
        self.build: concurrent.futures.Future | None = None
        self.t0 = time.monotonic()


class Worker:
    """A worker daemon. ``run()`` blocks until ``stop()`` (or SIGINT/SIGTERM in the CLI)."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device} asked for, but torch sees no CUDA device; use --device cpu")
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.store = BlockStore(cfg.store)
        self.cache = BlockCache(self.store, cfg.memory_budget_bytes, self.device)
        self.ctx = zmq.Context(io_threads=1)
        self.opts = SocketOptions(hwm_msgs=P.DATA_HWM_MSGS, max_frame_bytes=cfg.max_frame_bytes)
        self.data, bound = router(self.ctx, cfg.bind, self.opts)
        self.endpoint = cfg.advertise or advertised(bound, local_address_towards(cfg.coordinator))
        self.name = cfg.name or f"{pysocket.gethostname()}-{bound.rpartition(':')[2]}"
        if not _NAME.fullmatch(self.name):
            self.ctx.destroy(linger=0)
            raise ConfigError(f"worker name {self.name!r} must be 1-64 of letters, digits and . _ - (it is the "
                              "worker's ZeroMQ identity); pass --name")
        self.log = logging.getLogger(f"edgesplit.worker.{self.name}")
        self.stages: dict[tuple[str, int], Stage] = {}
        self.stats = StageStats()
        # next stages' endpoints -> measured link rate (the io thread adds and updates; others only .get)
        self.rates: collections.defaultdict[str, RateMeter] = collections.defaultdict(RateMeter)
        self.telemetry = Telemetry(cfg.device)
        self.inq: queue.Queue[_Job | None] = queue.Queue(maxsize=max(1, cfg.queue_depth))
        self.outq: queue.Queue[_Done] = queue.Queue(maxsize=max(1, cfg.queue_depth))
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.waker = Waker()
        self._stop = threading.Event()
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loader")
        self._deploys: dict[bytes, _Deploy] = {}
        self._n_computed = 0
        self._need_ready = True
        self.failed = False  # set when a thread died: run_worker exits non-zero
        self.counters: collections.Counter[str] = collections.Counter()

    # --- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self.waker.wake()

    def run(self) -> None:
        """Serve until stopped: io and compute threads, control loop in the calling thread."""
        io = threading.Thread(target=self._guarded, args=(self._io_loop,), name="io", daemon=True)
        compute = threading.Thread(target=self._guarded, args=(self._compute_loop,), name="compute", daemon=True)
        io.start()
        compute.start()
        self.log.info("worker %s serving %s (device %s, budget %d B, store %s), coordinator %s", self.name,
                      self.endpoint, self.device, self.cfg.memory_budget_bytes, self.store.root, self.cfg.coordinator)
        try:
            self._control_loop()
        finally:
            self._stop.set()
            self.waker.wake()
            try:
                self.inq.put_nowait(None)
            except queue.Full:
                pass  # compute sees the stop flag after its current job
            io.join(timeout=2.0)
            compute.join(timeout=2.0)
            self._loader.shutdown(wait=False, cancel_futures=True)
            self.ctx.destroy(linger=0)
            self.waker.close()
            self.log.info("worker %s stopped", self.name)

    def _guarded(self, loop: Any) -> None:
        """Run a thread's loop; if it ends while the worker should run, stop the whole worker.

        A worker whose io or compute thread died would still heartbeat and look alive while
        serving nothing; exiting instead lets the coordinator declare it lost. (The exception
        itself propagates to threading's excepthook, which prints the traceback.)
        """
        try:
            loop()
        finally:
            if not self._stop.is_set():
                self.log.critical("the %s thread ended unexpectedly; stopping the worker", threading.current_thread().name)
                self.failed = True
                self.stop()

    # --- control: coordinator link ------------------------------------------------------------
    def _ready_body(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "device": str(self.device),
                "memory_budget_bytes": self.cfg.memory_budget_bytes, "host": pysocket.gethostname(),
                "pid": os.getpid(), "stages": [s.info.to_msg() for s in self.stages.values()]}

    def _heartbeat_body(self) -> dict[str, Any]:
        rates = {f"link_rate_bps {ep}": m.rate for ep, m in list(self.rates.items()) if m.rate is not None}
        return {"stages": [s.info.to_msg() for s in self.stages.values()],
                "telemetry": {**self.telemetry.sample(), **rates},
                "stats": self.stats.report(), "cache": self.cache.report(),
                "counters": dict(self.counters), "queue": self.inq.qsize(), "kept": len(getattr(self, "_kept", ()))}

    def _connect(self) -> zmq.Socket:
        sock = dealer(self.ctx, self.cfg.coordinator, self.name.encode(),
                      SocketOptions(hwm_msgs=P.CONTROL_HWM_MSGS, max_frame_bytes=P.CHUNK_BYTES * 2))
        self._need_ready = True  # sent by the loop once the link is up (IMMEDIATE refuses sends before)
        return sock

    def _ttl_ms(self) -> int:
        return self.cfg.heartbeat_ms * self.cfg.liveness

    def _control_loop(self) -> None:
        interval = self.cfg.heartbeat_ms / 1000.0
        ttl = interval * self.cfg.liveness
        backoff = Backoff()
        sock = self._connect()
        last_heard = time.monotonic()
        connected = True  # so the first silence is reported
        next_hb = time.monotonic() + interval
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            now = time.monotonic()
            timeout_ms = max(0, min(5 if self._deploys else 50 if self._need_ready else 100, int((next_hb - now) * 1000)))
            if dict(poller.poll(timeout_ms)).get(sock):
                for _ in range(64):
                    try:
                        _, frames = _recv(sock)
                    except zmq.Again:
                        break
                    last_heard, connected = time.monotonic(), True
                    backoff.reset()
                    self._on_control(sock, frames)
            if self._need_ready and send(sock, P.encode(Msg.READY, P.new_rid(), self._ttl_ms(),
                                                        {"body": self._ready_body()})):
                self._need_ready = False
            self._advance_deploys(sock)
            now = time.monotonic()
            if now >= next_hb:
                send(sock, P.encode(Msg.HEARTBEAT, P.new_rid(), self._ttl_ms(), {"body": self._heartbeat_body()}))
                next_hb = now + interval
            if now - last_heard > ttl:
                delay = backoff.next_delay_s()
                if connected:  # warn once per outage, not once per attempt
                    self.log.warning("coordinator %s silent for %.1f s; reconnecting (backoff up to %d ms)",
                                     self.cfg.coordinator, now - last_heard, P.RECONNECT_MAX_MS)
                else:
                    self.log.debug("no answer from coordinator %s; retrying in %.2f s", self.cfg.coordinator, delay)
                connected = False
                poller.unregister(sock)
                sock.close(0)
                for d in list(self._deploys.values()):  # fetch state is tied to the old connection
                    self._deploys.pop(d.rid, None)
                if self._stop.wait(delay):
                    break
                sock = self._connect()
                poller.register(sock, zmq.POLLIN)
                last_heard = time.monotonic()
        sock.close(0)

    def _on_control(self, sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames, max_frame_bytes=P.CHUNK_BYTES * 2)
        except ProtocolError as e:
            self.log.warning("W: bad message from coordinator: %s", e)
            return
        try:
            self._dispatch_control(sock, msg)
        except (EdgesplitError, ValueError, TypeError, KeyError, IndexError) as e:  # a malformed control body
            self.log.warning("W: refused %s from coordinator: %s", msg.type.name, e)

    def _dispatch_control(self, sock: zmq.Socket, msg: P.Message) -> None:
        t = msg.type
        if t == Msg.HEARTBEAT:
            return
        if t == Msg.DISCONNECT:
            self.log.info("coordinator does not know us (restarted, or it declared us lost); registering again")
            self._need_ready = True
        elif t == Msg.DEPLOY:
            self._start_deploy(sock, msg)
        elif t == Msg.CHUNK:
            self._on_chunk(sock, msg)
        elif t == Msg.LINK:
            self._on_link(sock, msg)
        elif t == Msg.NOTICE:
            lost = msg.body.get("lost_endpoint")
            if isinstance(lost, str):
                self.events.put(("lost", (lost, str(msg.body.get("lost", "?")))))
                self.waker.wake()
        elif t == Msg.ERROR:
            d = self._deploys.pop(msg.rid, None)
            if d is not None:
                code, reason = msg.get("err")
                self._reply(sock, P.encode_error(d.rid, Err(code) if code in P.ERR_NAMES else Err.DEPLOY_FAILED,
                                                 f"worker {self.name}: {reason}"))
        else:
            self.log.warning("W: unexpected %s from coordinator", P.msg_name(t))

    def _reply(self, sock: zmq.Socket, frames: list[Any]) -> None:
        if not send(sock, frames):
            self.log.warning("W: coordinator queue full; reply dropped (it will time out)")

    def _on_link(self, sock: zmq.Socket, msg: P.Message) -> None:
        """A LINK order: new settings for the output link of a hosted stage, from the next request on."""
        body = msg.body
        model, hop = P.body_get(body, "model", str), P.body_get(body, "hop", int)
        stage = self.stages.get((model, hop))
        if stage is None or P.body_get(body, "plan", int, stage.info.plan) != stage.info.plan:
            self._reply(sock, P.encode_error(msg.rid, Err.NOT_DEPLOYED, f"worker {self.name} does not host stage "
                                             f"{hop} of {model} (plan {body.get('plan')})"))
            return
        try:
            new = stage.link_out.changed(body.get("link"))
            check_link(stage.codec_out, new)
        except (ProtocolError, ConfigError) as e:
            self._reply(sock, P.encode_error(msg.rid, Err.BAD_INPUT, f"worker {self.name}, cut after stage {hop} "
                                             f"of {model}: {e}"))
            return
        stage.link_out = new  # one attribute swap: a request in compute uses the old spec or the new one
        self.log.info("link after stage %d of %s now %s", hop, model, new.to_msg())
        self._reply(sock, P.encode(Msg.LINK, msg.rid, 0, {"body": {"model": model, "hop": hop,
                                                                     "link": new.to_msg()}}))

    # --- control: deploy ---------------------------------------------------------------------
    def _start_deploy(self, sock: zmq.Socket, msg: P.Message) -> None:
        try:
            body = msg.body
            plan = P.body_get(body, "plan", int)
            stages = [StageInfo.from_msg(s) for s in P.body_get(body, "stages", list)]
            links_in = [LinkSpec.from_msg(l) for l in P.body_get(body, "links_in", list, [None] * len(stages))]
            links_out = [LinkSpec.from_msg(l) for l in P.body_get(body, "links_out", list, [None] * len(stages))]
            if not len(links_in) == len(links_out) == len(stages):
                raise ProtocolError("bad message: DEPLOY needs one link spec in and out per stage")
            links = list(zip(links_in, links_out))
            model = P.check_model_name(P.body_get(body, "model", str))
            manifest = ModelManifest.from_json(bytes(msg.blob(0)).decode())
            if manifest.name != model or any(s.model != model or s.n_blocks != manifest.n_blocks for s in stages):
                raise ProtocolError(f"bad message: DEPLOY of {model} carries a manifest of {manifest.name}")
        except (EdgesplitError, UnicodeDecodeError) as e:
            self._reply(sock, P.encode_error(msg.rid, Err.DEPLOY_FAILED, f"worker {self.name}: bad DEPLOY: {e}"))
            return
        needed = list(dict.fromkeys([b.id for s in stages for b in manifest.blocks[s.start:s.end]]
                                    + [c for pair in links for c in map(lambda l: codec_block(l, manifest), pair) if c]))
        missing = [bid for bid in needed if bid not in self.cache and not self.store.has(bid)]
        d = _Deploy(msg.rid, manifest, plan, stages, links, missing)
        self._deploys[msg.rid] = d
        self.log.info("deploy %s plan %d: stages %s; %d of %d blocks to fetch", model, plan,
                      [(s.hop, s.start, s.end) for s in stages], len(missing), len(needed))

    def _on_chunk(self, sock: zmq.Socket, msg: P.Message) -> None:
        d = self._deploys.get(msg.rid)
        if d is None or d.current is None:
            return  # a late chunk of a cancelled deploy
        try:
            bid = P.body_get(msg.body, "id", str)
            off = P.body_get(msg.body, "off", int)
            size = P.body_get(msg.body, "size", int)
        except ProtocolError as e:
            self.log.warning("W: bad CHUNK: %s", e)
            return
        data = msg.blob(0)
        if bid != d.current or off < 0 or size < 0 or off + len(data) > size or (d.size >= 0 and size != d.size):
            self._deploys.pop(d.rid, None)
            self._reply(sock, P.encode_error(d.rid, Err.DEPLOY_FAILED,
                                             f"worker {self.name}: inconsistent chunk of block {bid[:12]}"))
            return
        if d.buf is None:
            if size > self.cfg.memory_budget_bytes + P.CHUNK_BYTES:
                self._deploys.pop(d.rid, None)
                self._reply(sock, P.encode_error(d.rid, Err.DEPLOY_FAILED, f"worker {self.name}: block {bid[:12]} "
                                                 f"is {size} B, above the memory budget of {self.cfg.memory_budget_bytes} B"))
                return
            d.size, d.buf = size, bytearray(size)
        d.buf[off:off + len(data)] = data
        d.received += len(data)
        d.outstanding -= 1

    def _advance_deploys(self, sock: zmq.Socket) -> None:
        for d in list(self._deploys.values()):
            try:
                self._advance(sock, d)
            except (EdgesplitError, RuntimeError, ValueError, OSError) as e:
                self._deploys.pop(d.rid, None)
                self.log.error("deploy of %s failed: %s", d.manifest.name, e)
                self._reply(sock, P.encode_error(d.rid, Err.DEPLOY_FAILED, f"worker {self.name}: {e}"))

    def _advance(self, sock: zmq.Socket, d: _Deploy) -> None:
        """One step of a deploy: request chunks within the credit, verify whole blocks, then build."""
        if d.current is not None and d.size >= 0 and d.received >= d.size:
            data = bytes(d.buf)
            bid = d.current
            d.fetched_bytes += len(data)
            d.verifying.append(self._loader.submit(self.store.put_bytes, bid, data))  # hash check off-thread
            d.current, d.buf, d.size, d.next_off, d.received, d.outstanding = None, None, -1, 0, 0, 0
        if d.current is None and d.missing:
            d.current = d.missing.popleft()
        if d.current is not None:
            # the first chunk tells the size; after it, keep FETCH_CREDIT requests outstanding
            limit = 1 if d.size < 0 else P.FETCH_CREDIT
            while d.outstanding < limit and (d.size < 0 and d.next_off == 0 or 0 <= d.next_off < d.size):
                frames = P.encode(Msg.FETCH, d.rid, self._ttl_ms(),
                                  {"body": {"id": d.current, "off": d.next_off, "len": P.CHUNK_BYTES}})
                if not send(sock, frames):
                    break
                d.next_off += P.CHUNK_BYTES
                d.outstanding += 1
            return
        for f in d.verifying:
            if not f.done():
                return
            f.result()  # raises BlockHashMismatch for a corrupt transfer
        if d.build is None:
            d.build = self._loader.submit(self._build, d)
            return
        if not d.build.done():
            return
        stages = d.build.result()
        self._deploys.pop(d.rid, None)
        self._install(d.manifest.name, stages)
        load_ms = (time.monotonic() - d.t0) * 1000
        self.log.info("deployed %s plan %d: hops %s in %.0f ms (%d B fetched)", d.manifest.name, d.plan,
                      [s.info.hop for s in stages], load_ms, d.fetched_bytes)
        self._reply(sock, P.encode(Msg.DEPLOYED, d.rid, 0, {"body": {
            "model": d.manifest.name, "plan": d.plan, "stages": [s.info.to_msg() for s in stages],
            "load_ms": load_ms, "fetched_bytes": d.fetched_bytes}}))

    def _build(self, d: _Deploy) -> list[Stage]:
        """Loader thread: blocks through the cache, stage modules aliasing the cached tensors."""
        out = []
        for info, (link_in, link_out) in zip(d.stages, d.links):
            entries = d.manifest.blocks[info.start:info.end]
            tensors = {b.id: self.cache.get(b.id) for b in entries}
            module = build_blocks(self.store, d.manifest, info.start, info.end, self.device, tensors=tensors)
            for child, entry in zip(module.children(), entries):
                child.load_state_dict(tensors[entry.id], strict=True, assign=True)  # share the cache's memory
            in_shape = list(d.manifest.input_shape if info.start == 0 else d.manifest.blocks[info.start - 1].out_shape)
            with torch.inference_mode():
                module(torch.zeros(1, *in_shape, device=self.device))  # warm-up: first-call allocations
            codec_in = create_link_codec(link_in, d.manifest, self.store, self.device)
            codec_out = create_link_codec(link_out, d.manifest, self.store, self.device)
            check_link(codec_out, link_out)
            out.append(Stage(info, module.eval(), [b.id for b in entries], in_shape, link_in, link_out,
                             codec_in, codec_out))
        return out

    def _install(self, model: str, stages: list[Stage]) -> None:
        new = {k: v for k, v in self.stages.items() if k[0] != model}
        for s in stages:
            self.cache.pin(s.block_ids)
            new[(model, s.info.hop)] = s
        for k, old in self.stages.items():
            if k[0] == model:
                self.cache.unpin(old.block_ids)
        self.stages = new  # one reference swap: io and compute threads see old or new, never half
        for s in stages:  # a plan that routes to an endpoint says it is alive (again)
            if s.info.next is not None:
                self.events.put(("alive", (s.info.next, "")))
        self.waker.wake()

    # --- compute ---------------------------------------------------------------------------------
    def _compute_loop(self) -> None:
        while True:
            job = self.inq.get()
            if job is None or self._stop.is_set():
                return
            done = self._compute(job)
            while not self._stop.is_set():
                try:
                    self.outq.put(done, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self.waker.wake()
            self._n_computed += 1
            if self.cfg.crash_after and self._n_computed >= self.cfg.crash_after:
                self.log.error("fault injection: crashing after %d requests", self._n_computed)
                logging.shutdown()
                os._exit(70)

    def _compute(self, job: _Job) -> _Done:
        msg = job.msg
        key = (msg.get("mdl"), msg.get("hop"))
        stage = self.stages.get(key)
        t_start = time.time()
        if stage is None or msg.get("pln", stage.info.plan) != stage.info.plan:
            return _Done(job, None, error=(Err.NOT_DEPLOYED, f"worker {self.name} no longer hosts stage {key[1]} of "
                                                             f"{key[0]} (redeployed meanwhile); resend the request"))
        if time.monotonic() > job.deadline:
            return _Done(job, stage, error=(Err.TIMEOUT, f"deadline passed while queued at worker {self.name} "
                                                         f"(stage {key[1]} of {key[0]})"))
        try:
            x = decode_link(stage.codec_in, stage.link_in, msg.get("cod", "raw"), msg.get("cmeta", {}),
                            msg.tensors, lambda: [msg.blob(i) for i in range(len(msg.specs))])
            _check_input(x, stage, self.name)
            if self.cfg.stall_ms:
                time.sleep(self.cfg.stall_ms / 1000.0)
            x = x.to(self.device, non_blocking=True)
            with torch.inference_mode():
                y = stage.module(x)
            meter = self.rates.get(stage.info.next) if stage.info.next else None
            cmeta, payload = encode_link(stage.codec_out, stage.link_out, y, job.deadline - time.monotonic(),
                                         meter.rate if meter else None)
        except (RuntimeFailure, EdgesplitError) as e:
            self.stats.add(key, None)
            return _Done(job, stage, error=(Err.BAD_INPUT, str(e)))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # torch reports shape errors as these
            self.stats.add(key, None)
            return _Done(job, stage, error=(Err.BAD_INPUT, f"stage {key[1]} of {key[0]} on {self.name} failed "
                                                           f"on the input: {type(e).__name__}: {e}"))
        t_end = time.time()
        self.stats.add(key, (t_end - t_start) * 1000)
        return _Done(job, stage, payload, cmeta, t_start, t_end)

    # --- io --------------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        """Owns the data ROUTER and the peer DEALERs; nothing else touches them."""
        self._links = PeerLinks(self.ctx, self.name.encode(), self.opts, max_outbox_msgs=self.cfg.max_kept)
        self._kept: collections.OrderedDict[tuple[bytes, int], _Kept] = collections.OrderedDict()
        self._recent: collections.OrderedDict[tuple[bytes, int, int], bool] = collections.OrderedDict()
        self._acks: collections.deque = collections.deque()  # link replies the ROUTER could not take yet
        self._lost_peers: dict[str, str] = {}  # endpoint -> name, announced lost (cleared by a deploy naming it)
        held: collections.deque[_Done] = collections.deque()  # outputs waiting for outbox room
        next_sweep = time.monotonic()
        while not self._stop.is_set():
            poller = zmq.Poller()
            reading = not self.inq.full()
            if reading:
                poller.register(self.data, zmq.POLLIN)
            poller.register(self.waker, zmq.POLLIN)
            for sock, flags in self._links.poll_flags():
                poller.register(sock, flags)
            timeout = 100 if reading and not self._acks and not held else 5
            events = dict(poller.poll(timeout))
            if self.waker.fileno() in events:
                self.waker.drain()
            if self.data in events:
                for _ in range(32):
                    if self.inq.full():
                        break
                    try:
                        route, frames = _recv(self.data, 1)
                    except zmq.Again:
                        break
                    self._on_inbound(route, frames)
            for sock, ev in events.items():
                ep = self._links.endpoint_of(sock) if isinstance(sock, zmq.Socket) else None
                if ep is None:
                    continue
                if ev & zmq.POLLIN:
                    for _ in range(64):
                        try:
                            _, frames = _recv(sock)
                        except zmq.Again:
                            break
                        self._on_link_reply(ep, frames)
                if ev & zmq.POLLOUT:
                    self._links.flush(ep)
            while len(self._kept) < self.cfg.max_kept:  # compute's outputs go downstream while there is room
                if held:
                    done = held.popleft()
                else:
                    try:
                        done = self.outq.get_nowait()
                    except queue.Empty:
                        break
                if not self._forward(done):
                    held.appendleft(done)
                    break
            while self._acks and send(self.data, self._acks[0][1], route=self._acks[0][0]):
                self._acks.popleft()
            while True:
                try:
                    kind, arg = self.events.get_nowait()
                except queue.Empty:
                    break
                if kind == "lost":
                    self._on_peer_lost(*arg)
                elif kind == "alive":
                    self._lost_peers.pop(arg[0], None)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.1
                self._expire(now)
        self._links.close_all()

    def _reply_link(self, route: list[bytes], frames: list[Any]) -> None:
        """A link reply (ACK/ERROR) to the sender; parked if its queue is full, dropped past a bound."""
        if (self._acks or not send(self.data, frames, route=route)) and len(self._acks) < 16 * self.cfg.max_kept:
            self._acks.append((route, frames))

    def _on_inbound(self, route: list[bytes], frames: list[Any]) -> None:
        t_recv = time.time()
        try:
            msg = P.decode(frames, max_frame_bytes=self.cfg.max_frame_bytes)
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            self.log.warning("W: refused a message from %r: %s", route[0][:32], e)
            self._reply_link(route, P.encode_error(_salvage_rid(frames), Err.BAD_MESSAGE, f"worker {self.name}: {e}"))
            return
        if msg.type == Msg.HEARTBEAT:  # a liveness probe on the data socket
            self._reply_link(route, P.encode(Msg.HEARTBEAT, msg.rid, 0, {"body": {"name": self.name}}))
            return
        if msg.type != Msg.RUN:
            self.counters["bad_messages"] += 1
            self._reply_link(route, P.encode_error(msg.rid, Err.BAD_MESSAGE,
                                                   f"worker {self.name}'s data socket takes RUN, got {msg.type.name}"))
            return
        hop, model = msg.get("hop"), msg.get("mdl")
        key = (msg.rid, hop, msg.get("att", 0))
        if key in self._recent:  # a duplicate: ACK again if finished; if in progress its ACK will come
            if self._recent[key]:
                self._reply_link(route, P.encode(Msg.ACK, msg.rid, 0, {"hop": hop}))
            return
        stage = self.stages.get((model, hop))
        if stage is None:
            hosted = sorted(f"{m}/{h}" for m, h in self.stages)
            self._reply_link(route, P.encode_error(
                msg.rid, Err.NOT_DEPLOYED, f"worker {self.name} does not host stage {hop} of {model} "
                f"(hosts {hosted}); deploy the model or refresh the route", hop=hop))
            return
        if msg.get("pln", stage.info.plan) != stage.info.plan:
            self._reply_link(route, P.encode_error(
                msg.rid, Err.NOT_DEPLOYED, f"{model} was redeployed: the request follows plan {msg.get('pln')}, "
                f"worker {self.name} hosts plan {stage.info.plan}; refresh the route and resend", hop=hop))
            return
        self._recent[key] = False
        while len(self._recent) > 4096:
            self._recent.popitem(last=False)
        self.counters["received"] += 1
        self.inq.put_nowait(_Job(msg, route, t_recv, time.monotonic() + msg.budget_ms / 1000.0))

    def _forward(self, done: _Done) -> bool:
        """Send a computed output on (or report its error), then ACK upstream. False: outbox full, retry."""
        job, msg = done.job, done.job.msg
        rid, hop, model, rep = msg.rid, msg.get("hop"), msg.get("mdl"), msg.get("rep")
        if done.error is not None:
            self._report(rep, rid, hop, *done.error)
        else:
            stage = done.stage
            budget_ms = int((job.deadline - time.monotonic()) * 1000)
            fields: dict[str, Any] = {"mdl": model, "hop": hop + 1, "pln": stage.info.plan}
            if not stage.link_out.is_raw:
                fields["cod"], fields["cmeta"] = stage.link_out.codec, done.cmeta
            if "trc" in msg.header:
                nbytes = sum(P.to_wire(p)[0].nbytes for p in done.payload)
                fields["trc"] = [*msg.get("trc"), P.trace_record(hop, self.name, job.t_recv, done.t_start, done.t_end,
                                                                 time.time(), nbytes)]
            if stage.info.is_last:
                dest, mtype = rep, Msg.RESULT
            else:
                dest, mtype = stage.info.next, Msg.RUN
                fields["rep"] = rep
            if dest in self._lost_peers:  # announced dead: fail now rather than at the deadline
                self._report(rep, rid, hop + 1, Err.WORKER_LOST, f"the next stage's worker "
                             f"{self._lost_peers[dest]} ({dest}) of {model} was lost; redeploy the model")
                self._reply_link(job.upstream, P.encode(Msg.ACK, rid, 0, {"hop": hop}))
                return True
            frames = P.encode(mtype, rid, budget_ms, fields, done.payload)
            if not self._links.send(dest, frames):
                return False
            self._kept[(rid, hop + 1)] = _Kept(dest, frames, rep, model, hop + 1, job.deadline + 1.0,
                                               sum(memoryview(f).nbytes for f in frames[2:]), time.monotonic())
            self.counters["sent"] += 1
        key = (rid, hop, msg.get("att", 0))
        if key in self._recent:
            self._recent[key] = True
        self._reply_link(job.upstream, P.encode(Msg.ACK, rid, 0, {"hop": hop}))
        return True

    def _on_link_reply(self, endpoint: str, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames)
        except ProtocolError as e:
            self.log.warning("W: bad reply from %s: %s", endpoint, e)
            return
        hop = msg.get("hop")
        if msg.type == Msg.ACK:
            k = self._kept.pop((msg.rid, hop), None)
            if k is not None and k.dest != k.rep:  # a next stage's ACK: time the link to it
                self.rates[k.dest].observe(k.nbytes, k.t_send, time.monotonic())
        elif msg.type == Msg.ERROR:
            k = self._kept.pop((msg.rid, hop), None)
            if k is not None:  # the next hop refused our output: the requester must hear it
                code, reason = msg.get("err")
                self._report(k.rep, msg.rid, k.hop, Err(code) if code in P.ERR_NAMES else Err.INTERNAL, reason)

    def _on_peer_lost(self, endpoint: str, name: str) -> None:
        self._lost_peers[endpoint] = name
        while len(self._lost_peers) > 256:
            del self._lost_peers[next(iter(self._lost_peers))]
        lost = [key for key, k in self._kept.items() if k.dest == endpoint]
        for key in lost:
            k = self._kept.pop(key)
            self._report(k.rep, key[0], k.hop, Err.WORKER_LOST,
                         f"worker {name} ({endpoint}) running stage {k.hop} of {k.model} was lost before finishing")
        self._links.drop_outbox(endpoint)
        self._links.close(endpoint)
        if lost:
            self.log.warning("peer %s lost: %d request(s) reported failed to their requesters", name, len(lost))

    def _expire(self, now: float) -> None:
        """Kept outputs past their deadline: the requester has given up; report and free the memory."""
        for key, k in list(self._kept.items()):
            if now > k.deadline:
                del self._kept[key]
                self._links.discard(k.dest, k.frames)  # if it never left, it never will in time
                self._report(k.rep, key[0], k.hop, Err.TIMEOUT,
                             f"{k.dest} did not acknowledge stage {k.hop} of {k.model} before the deadline")

    def _report(self, rep: str | None, rid: bytes, hop: int, code: Err, reason: str) -> None:
        """Send a request's ERROR to its requester (best effort: the requester also has a deadline)."""
        self.counters["errors"] += 1
        if rep:
            self._links.send(rep, P.encode_error(rid, code, reason, hop=hop))


def _check_input(x: torch.Tensor, stage: Stage, worker: str) -> None:
    if x.dim() != len(stage.in_shape) + 1 or list(x.shape[1:]) != stage.in_shape:
        raise BadInput(f"stage {stage.info.hop} of {stage.info.model} on {worker} expects input (B, "
                       f"{', '.join(map(str, stage.in_shape))}), got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise BadInput(f"stage {stage.info.hop} of {stage.info.model} expects float32 input, got {x.dtype}")


def _recv(sock: zmq.Socket, n_route: int = 0) -> tuple[list[bytes], list[Any]]:
    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    return [f.bytes for f in frames[:n_route]], frames[n_route:]


def _salvage_rid(frames: list[Any]) -> bytes:
    """The request id of an invalid message when its header still parses, so the sender can match the error."""
    try:
        if len(frames) >= 2 and len(frames[1]) <= P.HEADER_MAX_BYTES:
            h = msgpack.unpackb(frames[1].bytes if hasattr(frames[1], "bytes") else bytes(frames[1]),
                                raw=False, **P.UNPACK_LIMITS)
            rid = h.get("rid") if isinstance(h, dict) else None
            if isinstance(rid, bytes) and len(rid) == P.RID_BYTES:
                return rid
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        pass
    return bytes(P.RID_BYTES)


def run_worker(cfg: WorkerConfig) -> int:
    """Run a worker in this process until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = Worker(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run()
    return 1 if worker.failed else 0
