"""The worker daemon: hosts stages, runs them, sends activations straight to the next stage's worker.

Run one per board::

    edgesplit worker --coordinator tcp://10.0.0.1:5555 --bind tcp://*:5600 --store /var/lib/edgesplit \\
        --device cuda --memory-budget 2GiB          # name: the host name (unique per cluster)
    # on one machine, for a try: edgesplit up --workers 3

Three threads, one loop per file, so receiving, computing and sending overlap (pipelining)
and heartbeats never wait behind a forward pass:

- control (``control.py``, the main thread): registration, heartbeats, orders from the
  coordinator; deploys (``deploy.py``) advance inside it;
- data plane (``dataplane.py``): RUN in, outputs to the next stage's replicas, results to
  requesters, custody (kept table, replay on a replica, bounded replies);
- compute (``compute.py``): jobs from a bounded queue through the stage.

This module holds what the three share: the settings, the hosted stages (replaced in one
reference swap), the block cache, the queues between the threads and their counters.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import re
import signal
import socket as pysocket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import zmq

from edgesplit.partitioner import BlockStore, MissingBlocksError

from .. import dummy
from .. import protocol as P
from ..allocator import keep_freed_buffers
from ..cache import BlockCache
from ..config import opt
from ..errors import ConfigError
from ..links import RateMeter
from ..telemetry import Telemetry
from ..security import InsecureNag, Security, check_exposure, is_loopback, load_keys
from ..security.roles import CONNECT, DATA
from ..transport import SocketOptions, Waker, advertised, local_address_towards, router
from .compute import ComputeLoop, Done, Job
from .control import ControlLoop
from .dataplane import DataPlane
from .residency import Load, Residency
from .stage import Stage, StageStats

log = logging.getLogger("edgesplit.worker")
_REGISTERED = (dummy,)  # imported to register the "dummy" builder (routing tests, benchmarks)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEVICE = re.compile(r"(cpu|cuda|mps)(?::([0-9]{1,3}))?")  # what a worker computes on (torch takes more kinds)


@dataclass(frozen=True)
class WorkerConfig:
    """A worker daemon's settings (``edgesplit worker --help`` lists them as flags)."""

    coordinator: str = opt("tcp://127.0.0.1:5555", "coordinator endpoint to register with")
    bind: str = opt("tcp://*:5600", "data endpoint to bind; activations arrive here (tcp://HOST:* = any free port)")
    advertise: str | None = opt(None, "endpoint peers connect to (default: the bound address, with * replaced by "
                                      "this host's address towards the coordinator)")
    store: str = opt("./worker-store", "local block store; blocks it lacks are fetched from the coordinator into it")
    device: str = opt("cpu", "where stages run: cpu, cuda, cuda:N or mps (checked at start)")
    memory_budget_bytes: int = opt(2 * 1024**3, "bytes of block tensors kept resident (e.g. 2GiB); stages of "
                                                "several models share it, least needed blocks evicted first",
                                   alias="--memory-budget")
    store_read_bytes: int = opt(0, "cap on store reads per second, to emulate a board's storage (e.g. 100MB for "
                                   "an SD card, 300MB for eMMC; 0 = no cap)", alias="--store-read-rate")
    name: str | None = opt(None, "worker name, unique in the cluster (default: this host's name); a second worker "
                                 "under a live worker's name is refused")
    torch_threads: int = opt(0, "torch intra-op threads for compute (0 = torch's default)")
    queue_depth: int = opt(8, "requests queued for compute; beyond that a RUN is answered OVERLOADED at once")
    max_batch: int = opt(8, "most queued requests for one stage run together as one batch (1 = no batching)")
    batch_wait_ms: float = opt(2.0, "longest a request waits for others to fill a batch (never past its deadline)")
    max_kept: int = opt(64, "outputs kept until the next hop acknowledges them; when full, compute waits")
    max_peers: int = opt(64, "open connections to peers and requesters (least recently used closed beyond)")
    max_frame_bytes: int = opt(P.MAX_FRAME_BYTES, "largest tensor payload accepted per message (a larger frame "
                                                  "makes libzmq drop the peer; a larger declared size is refused)")
    heartbeat_ms: int = opt(P.HEARTBEAT_INTERVAL_MS, "heartbeat interval to the coordinator")
    liveness: int = opt(P.HEARTBEAT_LIVENESS, "silent heartbeat intervals before the coordinator is presumed dead")
    keys: str | None = opt(None, "key directory (`edgesplit keygen --role worker`): this worker's secret key, the "
                                 "coordinator's public key and the keys of the workers and users it serves; every "
                                 "connection is then CURVE-encrypted and checked by role and route")
    insecure: bool = opt(False, "allow binding beyond loopback without --keys (anyone who reaches the port may "
                                "inject inputs and read activations; logged every minute)")
    crash_after: int = opt(0, "fault injection: exit abruptly after computing N requests (0 = off)")
    stall_ms: int = opt(0, "fault injection: sleep this long before each compute (0 = off)")
    slowdown: float = opt(1.0, "emulate a slower board: every forward pass (and profile) takes this many times the "
                               "CPU time, the extra spent asleep (tests and benchmarks of placement, with "
                               "--torch-threads 1; 1 = off)")
    log_level: str = opt("info", "logging level", choices=["debug", "info", "warning", "error"])


class Worker:
    """A worker daemon. ``run()`` blocks until ``stop()`` (or SIGINT/SIGTERM in the CLI)."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        # every check of the settings first: a mistake must leave no store directory and no bound socket behind
        self.device = check_device(cfg.device)
        self.name = cfg.name or pysocket.gethostname().split(".")[0]
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"worker name {self.name!r} must be 1-64 of letters, digits and . _ - ; pass --name")
        if not 1.0 <= cfg.slowdown <= 1000.0:
            raise ConfigError(f"--slowdown must be in [1, 1000], got {cfg.slowdown}")
        keys = load_keys(cfg.keys) if cfg.keys else None
        if keys is not None and keys.me.role != "worker":
            raise ConfigError(f"{keys.root}: a worker needs a worker key, this directory's secret key "
                              f"{keys.me.name} is a {keys.me.role} key")
        self.coordinator_key = keys.coordinator_key() if keys is not None else None
        check_exposure(f"worker {self.name}", cfg.bind, keys is not None, cfg.insecure)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        # the identity on every socket: the name plus a per-process tag, so two processes never share one
        self.ident = f"{self.name}/{os.urandom(4).hex()}".encode()
        # data links' ids: another random tag, so a peer that sees them (a requester) never learns the control id
        self.data_ident = f"{self.name}~{os.urandom(4).hex()}".encode()
        self.log = logging.getLogger(f"edgesplit.worker.{self.name}")
        self.store = BlockStore(cfg.store, read_rate_bps=cfg.store_read_bytes or None)
        self.cache = BlockCache(self.store, cfg.memory_budget_bytes, self.device)
        self.residency = Residency(self.cache)
        self.ctx = zmq.Context(io_threads=1)
        self.opts = SocketOptions(hwm_msgs=P.DATA_HWM_MSGS, max_frame_bytes=cfg.max_frame_bytes)
        self.sec = Security(self.ctx, keys, {DATA: CONNECT[DATA]})
        # keyed: data endpoint -> that worker's key, from the coordinator (DEPLOY orders and NOTICEs)
        self.peer_keys: dict[str, str] = {}
        try:
            self.data, bound = router(self.ctx, cfg.bind, self.opts, sec=self.sec, domain=DATA)
        except ConfigError:
            self.sec.close()
            self.ctx.destroy(linger=0)
            raise
        self.nag = InsecureNag(f"worker {self.name}", bound, keys is None and cfg.insecure and not is_loopback(bound))
        self.endpoint = cfg.advertise or advertised(bound, local_address_towards(cfg.coordinator))
        self.stages: dict[tuple[str, int], Stage] = {}
        self.stats = StageStats()
        self.load_counters: collections.Counter[str] = collections.Counter()  # loads on request (compute thread)
        # next stages' endpoints -> measured link rate (the data plane adds and updates; others only read)
        self.rates: collections.defaultdict[str, RateMeter] = collections.defaultdict(RateMeter)
        self.telemetry = Telemetry(cfg.device)
        self.inq: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, cfg.queue_depth))
        self.outq: queue.Queue[Done] = queue.Queue(maxsize=max(1, cfg.queue_depth))
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()  # control -> data plane
        self.refetch: queue.SimpleQueue[str] = queue.SimpleQueue()  # compute -> control: blocks to fetch again
        self.waker = Waker()
        self.stopping = threading.Event()
        self.failed = False  # set when a thread died or the coordinator refused us: run_worker exits non-zero
        self.compute = ComputeLoop(self)
        self.dataplane = DataPlane(self)
        self.control = ControlLoop(self)

    def ttl_ms(self) -> int:
        return self.cfg.heartbeat_ms * self.cfg.liveness

    def counters(self) -> dict[str, int]:
        """Every loop's counters, for heartbeats (each loop writes only its own)."""
        return {**self.dataplane.report_counters(), **self.compute.counters, **self.load_counters,
                "expired": self.dataplane.counters["expired"] + self.compute.counters["expired"]}

    # --- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()
        self.waker.wake()

    def run(self) -> None:
        """Serve until stopped: data plane and compute threads, control loop in the calling thread."""
        threads = [threading.Thread(target=self._guarded, args=(loop,), name=name, daemon=True)
                   for name, loop in (("io", self.dataplane.run), ("compute", self.compute.run))]
        for t in threads:
            t.start()
        self.log.info("worker %s serving %s (device %s, budget %d B, store %s), coordinator %s", self.name,
                      self.endpoint, self.device, self.cfg.memory_budget_bytes, self.store.root, self.cfg.coordinator)
        try:
            self.control.run()
        except ConfigError as e:
            self.log.critical("%s", e)
            self.failed = True
        finally:
            self.stopping.set()
            self.waker.wake()
            try:
                self.inq.put_nowait(None)
            except queue.Full:
                pass  # compute sees the stop flag after its current job
            for t in threads:
                t.join(timeout=2.0)
            self.sec.close()
            self.ctx.destroy(linger=0)
            self.waker.close()
            self.log.info("worker %s stopped", self.name)

    def _guarded(self, loop: Callable[[], None]) -> None:
        """Run a thread's loop; if it ends while the worker should run, stop the whole worker.

        A worker whose io or compute thread died would still heartbeat and look alive while
        serving nothing; exiting instead lets the coordinator declare it lost. (The exception
        itself propagates to threading's excepthook, which prints the traceback.)
        """
        try:
            loop()
        finally:
            if not self.stopping.is_set():
                self.log.critical("the %s thread ended unexpectedly; stopping the worker",
                                  threading.current_thread().name)
                self.failed = True
                self.stop()

    def acquire(self, stage: Stage) -> torch.nn.Module:
        """The stage's module with its blocks resident (loading the missing ones), held until :meth:`release`."""
        module, load = self.load(stage)
        if load.bytes:
            self.load_counters["switches"] += 1
            self.load_counters["switch_bytes"] += load.bytes
            self.load_counters["switch_ms"] += int(load.seconds * 1000)
        return module

    def load(self, stage: Stage) -> tuple[torch.nn.Module, Load]:
        """:meth:`acquire` without the request counters (deploys and prefetches load this way too)."""
        try:
            return self.residency.acquire(stage)
        except MissingBlocksError as e:  # the control loop fetches them from the coordinator again
            for bid in e.block_ids:
                self.refetch.put(bid)
            raise

    def release(self, stage: Stage) -> None:
        """End of a forward pass or a load: the stage's blocks may be evicted again."""
        self.residency.release(stage)

    def resident_stages(self) -> list[list[Any]]:
        """``[[model, hop], ...]`` of the registered stages whose blocks are all in the cache."""
        return [[m, h] for (m, h), s in sorted(self.stages.items()) if self.residency.is_resident(s)]

    def install(self, model: str, stages: list[Stage]) -> int:
        """Register ``stages`` as ``model``'s stages here, replacing its old ones; returns the bytes freed."""
        new = {k: v for k, v in self.stages.items() if k[0] != model}
        for s in stages:
            new[(model, s.info.hop)] = s
        old = [s for k, s in self.stages.items() if k[0] == model]
        for s in stages:  # recent times describe the stage as deployed: a new plan starts a new window (also
            before = self.stages.get((model, s.info.hop))  # when the plan before it did not place that hop here)
            if before is None or before.info.plan != s.info.plan:
                self.stats.forget_recent((model, s.info.hop))
        self.residency.register(stages)
        self.stages = new  # one reference swap: io and compute threads see old or new, never half
        freed = self.residency.unregister(old)
        for s in stages:  # a plan that routes to an endpoint says it is alive (again)
            for ep in s.info.next:
                self.events.put(("alive", ep))
        self.waker.wake()
        return freed


def check_device(text: str) -> torch.device:
    """``text`` as a torch device a worker can compute on: cpu, cuda, cuda:N (N < the GPUs torch sees) or mps.

    Checked at start, before anything is created, so a typo (``tpu``, ``cuda:abc``, ``gpu``) or a
    machine without the device ends with one line instead of torch's error on the first block.
    """
    m = _DEVICE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"--device {text!r} is not a device; use cpu, cuda, cuda:N (a GPU's index) or mps "
                          "(also EDGESPLIT_DEVICE)")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {text} asked for, but torch sees no CUDA device; use --device cpu")
        if index is not None and int(index) >= count:
            raise ConfigError(f"--device {text}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {text} asked for, but torch sees no MPS device; use --device cpu")
    return torch.device(text.strip())


def run_worker(cfg: WorkerConfig) -> int:
    """Run a worker in this process until SIGINT/SIGTERM; returns the exit code."""
    keep_freed_buffers()  # received activations reuse freed heap instead of faulting in fresh pages each
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = Worker(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run()
    return 1 if worker.failed else 0
