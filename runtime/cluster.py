"""A local cluster: one coordinator and N workers as separate processes on loopback.

The same daemons as on real boards (``python -m edgesplit.runtime.cli worker ...``), each
in its own process group, so stopping is exact: SIGTERM to each group, SIGKILL after a
grace period, nothing left behind. Used by ``edgesplit up``, ``edgesplit demo``, the
multi-process tests and the benchmarks.

::

    with LocalCluster(LocalClusterConfig(workers=3), store="./store") as lc:
        cl = lc.client()
        cl.deploy("vit_tiny_patch16_224", n_stages=3)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket as pysocket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .client import Client, ClientConfig
from .config import opt
from .errors import ConfigError, RuntimeFailure

PARENT_ENV = "EDGESPLIT_PARENT_PID"  # children exit when this process dies (see cli._die_with_parent)


@dataclass(frozen=True)
class LocalClusterConfig:
    """How ``edgesplit up`` / ``demo`` lay out the local cluster."""

    workers: int = opt(3, "worker processes to start")
    host: str = opt("127.0.0.1", "address every daemon binds to")
    port: int = opt(5555, "coordinator port (0 = any free port)")
    torch_threads: int = opt(0, "torch threads per worker (0 = the machine's cores divided among the workers)")
    memory_budget_bytes: int = opt(2 * 1024**3, "block memory budget per worker", alias="--memory-budget")
    heartbeat_ms: int = opt(1000, "heartbeat interval of every daemon")
    log_dir: str | None = opt(None, "where daemon logs go (default: the cluster's temporary directory)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the coordinator retries on a clash)."""
    with pysocket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalCluster:
    """Processes of a loopback cluster. ``start()`` returns once every worker has registered.

    Args:
        cfg: layout (worker count, ports, threads).
        store: the coordinator's block store (models partitioned into it); workers start
            with empty stores of their own and fetch blocks from the coordinator.
        worker_args: extra command-line flags per worker index (e.g. fault injection).
        workdir: directory for worker stores and logs (default: a temporary one, removed by ``stop()``).
    """

    def __init__(self, cfg: LocalClusterConfig, store: str | os.PathLike[str],
                 worker_args: dict[int, Sequence[str]] | None = None, workdir: str | None = None) -> None:
        if cfg.workers < 1:
            raise ConfigError(f"a local cluster needs at least 1 worker, got {cfg.workers}")
        self.cfg, self.store = cfg, Path(store)
        self.worker_args = worker_args or {}
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgesplit-cluster-"))
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else self.workdir / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.endpoint = ""
        self._clients: list[Client] = []

    @property
    def names(self) -> list[str]:
        return [f"w{i}" for i in range(self.cfg.workers)]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        try:
            return subprocess.Popen([sys.executable, "-m", "edgesplit.runtime.cli", *args], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        finally:
            log.close()

    def start(self, timeout_s: float = 60.0) -> "LocalCluster":
        """Start the coordinator and the workers; wait until all workers registered."""
        threads = self.cfg.torch_threads or max(1, (os.cpu_count() or 1) // self.cfg.workers)
        hb = str(self.cfg.heartbeat_ms)
        for attempt in range(3):
            port = self.cfg.port or free_port(self.cfg.host)
            self.endpoint = f"tcp://{self.cfg.host}:{port}"
            self.procs["coordinator"] = self._spawn("coordinator", [
                "coordinator", "--bind", self.endpoint, "--store", str(self.store), "--heartbeat-ms", hb])
            for i, name in enumerate(self.names):
                self.procs[name] = self._spawn(name, [
                    "worker", "--coordinator", self.endpoint, "--bind", f"tcp://{self.cfg.host}:*", "--name", name,
                    "--store", str(self.workdir / name), "--torch-threads", str(threads),
                    "--memory-budget-bytes", str(self.cfg.memory_budget_bytes), "--heartbeat-ms", hb,
                    *self.worker_args.get(i, ())])
            try:
                self._wait_registered(timeout_s)
                return self
            except _CoordinatorExited:
                if self.cfg.port:  # a fixed port that is taken: say so
                    self.stop()
                    raise ConfigError(f"the coordinator could not start on {self.endpoint}:\n{self.log_tail('coordinator')}"
                                      "\nis another cluster running? pick --port or stop it") from None
                self._stop_procs()  # a free port taken meanwhile: try another
        self.stop()
        raise RuntimeFailure(f"the coordinator did not start; log:\n{self.log_tail('coordinator')}")

    def _wait_registered(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        cl = self.client()
        while True:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if "coordinator" in dead:
                raise _CoordinatorExited()
            if dead:
                self.stop()
                raise RuntimeFailure(f"{dead[0]} exited with code {self.procs[dead[0]].returncode} during start-up; "
                                     f"log:\n{self.log_tail(dead[0])}")
            try:
                if len(cl.workers()) >= self.cfg.workers:
                    return
            except RuntimeFailure:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeFailure(f"workers did not register within {timeout_s:.0f} s; coordinator log:\n"
                                     f"{self.log_tail('coordinator')}")
            time.sleep(0.1)

    def client(self, **overrides: Any) -> Client:
        """A client of this cluster (closed by ``stop()``)."""
        cl = Client(ClientConfig(coordinator=self.endpoint, control_timeout_ms=2000), **overrides)
        self._clients.append(cl)
        return cl

    def alive(self) -> dict[str, bool]:
        """Which processes are running (like ``kill -0``)."""
        return {n: p.poll() is None for n, p in self.procs.items()}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one daemon's process group (fault injection)."""
        p = self.procs[name]
        if p.poll() is None:
            os.killpg(p.pid, sig)

    def log_tail(self, name: str, n_bytes: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        try:
            return path.read_bytes()[-n_bytes:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def _stop_procs(self, grace_s: float = 5.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        self.procs.clear()

    def stop(self) -> None:
        """Close clients, stop every process (SIGTERM, then SIGKILL), remove the temporary directory."""
        for cl in self._clients:
            cl.close()
        self._clients.clear()
        self._stop_procs()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start() if not self.procs else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _CoordinatorExited(RuntimeFailure):
    """The coordinator process ended during start-up (typically: its port was taken)."""
