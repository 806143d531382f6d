"""A local cluster: one coordinator and N workers as separate processes on loopback.

The same daemons as on real boards (``python -m edgesplit.runtime.cli worker ...``), each
in its own process group, so stopping is exact: SIGTERM to each group, SIGKILL after a
grace period, nothing left behind. Used by ``edgesplit up``, ``edgesplit demo``, the
multi-process tests and the benchmarks.

Every daemon binds a port chosen once, at start, so a daemon that died can be started
again with the same arguments, port and store (``restart``), as systemd or K3s would
restart it on a board: its peers find it where it was.

::

    with LocalCluster(LocalClusterConfig(workers=3), store="./store") as lc:
        cl = lc.client()
        cl.deploy("vit_tiny_patch16_224", n_stages=3)
        lc.kill("w1")         # SIGKILL to its process group
        lc.restart("w1")      # same flags, port and store; returns once it registered again
"""
from __future__ import annotations

import concurrent.futures
import os
import random
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
COORDINATOR = "coordinator"  # the coordinator's name in ``procs``, ``kill`` and ``restart``
_BIND_FAILED = ("cannot bind", "Address already in use")  # what a daemon's log says when its port is taken
_PORT_TRIES = 200


@dataclass(frozen=True)
class LocalClusterConfig:
    """How ``edgesplit up`` / ``demo`` lay out the local cluster."""

    workers: int = opt(3, "worker processes to start")
    host: str = opt("127.0.0.1", "address every daemon binds to")
    port: int = opt(5555, "coordinator port (0 = any free port)")
    worker_port: int = opt(0, "data port of worker 0; worker i binds worker_port + i (0 = free ports chosen at "
                              "start; either way a restarted worker keeps its port)")
    torch_threads: int = opt(0, "torch threads per worker (0 = the machine's cores divided among the workers)")
    memory_budget_bytes: int = opt(2 * 1024**3, "block memory budget per worker", alias="--memory-budget")
    heartbeat_ms: int = opt(1000, "heartbeat interval of every daemon")
    log_dir: str | None = opt(None, "where daemon logs go (default: the cluster's temporary directory)")
    keyed: bool = opt(False, "make keys for every daemon, an operator and a user, and run the cluster keyed "
                             "(CURVE on every socket, roles checked), as on a network")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the coordinator retries on a clash)."""
    with pysocket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def stable_port(host: str = "127.0.0.1", taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port outside the kernel's ephemeral range, for a daemon that may be restarted on it.

    A port from the ephemeral range (what ``free_port`` returns) can be taken, while its daemon
    is down, as the source port of some outgoing connection -- even of a peer reconnecting to
    that very endpoint, which on loopback then connects to itself -- and the restart could not
    bind it again. Ports below the range are only ever bound on purpose.
    """
    lo, _ = _ephemeral_range()
    first, last = (10_000, lo - 1) if lo > 11_000 else (1024, max(1025, lo - 1))
    rng = random.Random()
    for _ in range(_PORT_TRIES):
        port = rng.randint(first, last)
        if port in taken:
            continue
        with pysocket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    return free_port(host)  # a crowded machine: any free port beats none


class LocalCluster:
    """Processes of a loopback cluster. ``start()`` returns once every worker has registered.

    Args:
        cfg: layout (worker count, ports, threads).
        store: the coordinator's block store (models partitioned into it); workers start
            with empty stores of their own and fetch blocks from the coordinator.
        worker_args: extra command-line flags per worker index (e.g. fault injection).
        coordinator_args: extra command-line flags of the coordinator (e.g. ``--no-replan``).
        workdir: directory for worker stores and logs (default: a temporary one, removed by ``stop()``).
    """

    def __init__(self, cfg: LocalClusterConfig, store: str | os.PathLike[str],
                 worker_args: dict[int, Sequence[str]] | None = None, workdir: str | None = None,
                 coordinator_args: Sequence[str] = ()) -> None:
        if cfg.workers < 1:
            raise ConfigError(f"a local cluster needs at least 1 worker, got {cfg.workers}")
        self.cfg, self.store = cfg, Path(store)
        self.worker_args = worker_args or {}
        self.coordinator_args = list(coordinator_args)
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgesplit-cluster-"))
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else self.workdir / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}  # daemon name -> the port it binds, kept across restarts
        self.argv: dict[str, list[str]] = {}  # daemon name -> its command-line arguments, for restart
        self.endpoint = ""
        self._clients: list[Client] = []
        self._ctl: Client | None = None
        if cfg.keyed:
            self._make_keys()
        # NOTE: daemons ask for SIGTERM when their parent *thread* ends (PR_SET_PDEATHSIG), so they
        # are all started from this one long-lived thread: restart() may be called from any thread.
        self._spawner: concurrent.futures.ThreadPoolExecutor | None = None

    def key_dir(self, name: str) -> Path:
        """A keyed cluster's key directory of ``name`` (a daemon, ``operator`` or ``user``): its secret key
        and every public key of the cluster."""
        return self.workdir / "keys" / name

    def _make_keys(self) -> None:
        from .security import keygen

        holders = {COORDINATOR: "coordinator", "operator": "operator", "user": "user",
                   **{n: "worker" for n in self.names}}
        made = self.workdir / "keys" / "made"
        for name, role in holders.items():
            keygen(role, made, name)
        for name in holders:
            d = self.key_dir(name)
            d.mkdir(parents=True, exist_ok=True)
            for pub in made.glob("*.key"):
                shutil.copy(pub, d / pub.name)
            shutil.copy(made / f"{name}.key_secret", d / f"{name}.key_secret")

    def add_key(self, name: str, role: str) -> Path:
        """A keyed cluster's extra key holder (a worker started by hand, a second user): makes its key, puts its
        public key in every directory (daemons read them at start, so call it before ``start``), returns its
        key directory."""
        from .security import keygen

        made = self.workdir / "keys" / "made"
        keygen(role, made, name)
        d = self.key_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        for other in (self.workdir / "keys").iterdir():
            if other.name != "made":
                shutil.copy(made / f"{name}.key", other / f"{name}.key")
        for pub in made.glob("*.key"):
            shutil.copy(pub, d / pub.name)
        shutil.copy(made / f"{name}.key_secret", d / f"{name}.key_secret")
        return d

    def _keys_args(self, name: str) -> list[str]:
        return ["--keys", str(self.key_dir(name))] if self.cfg.keyed else []

    @property
    def names(self) -> list[str]:
        return [f"w{i}" for i in range(self.cfg.workers)]

    def worker_endpoint(self, name: str) -> str:
        """The data endpoint worker ``name`` binds (the same after a restart)."""
        return f"tcp://{self.cfg.host}:{self.ports[name]}"

    def pid(self, name: str) -> int:
        """Process id of a daemon (``"coordinator"`` or a worker name); its latest incarnation."""
        return self.procs[name].pid

    def worker_argv(self, name: str, port: int, store: str | os.PathLike[str] | None = None,
                    extra: Sequence[str] = ()) -> list[str]:
        """Arguments of ``edgesplit`` that start worker ``name`` of this cluster on ``port``.

        Tests use it to start a worker of their own (e.g. a second one under a taken name).
        """
        threads = self.cfg.torch_threads or max(1, (os.cpu_count() or 1) // self.cfg.workers)
        return ["worker", "--coordinator", self.endpoint, "--bind", f"tcp://{self.cfg.host}:{port}", "--name", name,
                "--store", str(store if store is not None else self.workdir / name), "--torch-threads", str(threads),
                "--memory-budget-bytes", str(self.cfg.memory_budget_bytes), "--heartbeat-ms",
                str(self.cfg.heartbeat_ms), *self._keys_args(name), *extra]

    def _popen(self, name: str, args: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        try:
            return subprocess.Popen([sys.executable, "-m", "edgesplit.runtime.cli", *args], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        finally:
            log.close()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        if self._spawner is None:
            self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cluster-spawner")
        self.argv[name] = list(args)
        p = self._spawner.submit(self._popen, name, args).result()
        self.procs[name] = p
        return p

    def _spawn_worker(self, i: int, name: str) -> None:
        if name not in self.ports:
            self.ports[name] = (self.cfg.worker_port + i if self.cfg.worker_port
                                else stable_port(self.cfg.host, set(self.ports.values())))
        self._spawn(name, self.worker_argv(name, self.ports[name], extra=self.worker_args.get(i, ())))

    def start(self, timeout_s: float = 60.0) -> "LocalCluster":
        """Start the coordinator and the workers; wait until all workers registered."""
        for attempt in range(3):
            port = self.cfg.port or stable_port(self.cfg.host, set(self.ports.values()))
            self.ports[COORDINATOR] = port
            self.endpoint = f"tcp://{self.cfg.host}:{port}"
            self._spawn(COORDINATOR, ["coordinator", "--bind", self.endpoint, "--store", str(self.store),
                                      "--heartbeat-ms", str(self.cfg.heartbeat_ms), *self._keys_args(COORDINATOR),
                                      *self.coordinator_args])
            for i, name in enumerate(self.names):
                self._spawn_worker(i, name)
            try:
                self._wait_registered(timeout_s)
                return self
            except _CoordinatorExited:
                if self.cfg.port:  # a fixed port that is taken: say so
                    self.stop()
                    raise ConfigError(f"the coordinator could not start on {self.endpoint}:\n"
                                      f"{self.log_tail(COORDINATOR)}"
                                      "\nis another cluster running? pick --port or stop it") from None
                self._stop_procs()  # a free port taken meanwhile: try another
                self.ports.pop(COORDINATOR, None)
                if self._ctl is not None:  # it asked the old endpoint
                    self._ctl.close()
                    self._clients.remove(self._ctl)
                    self._ctl = None
        self.stop()
        raise RuntimeFailure(f"the coordinator did not start; log:\n{self.log_tail(COORDINATOR)}")

    def _wait_registered(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        respawned: dict[str, int] = {}
        while True:
            exited = [n for n, p in self.procs.items() if p.poll() is not None]
            if COORDINATOR in exited:
                raise _CoordinatorExited()
            dead = []
            for name in exited:
                # a chosen free port taken meanwhile: the worker could not bind it; give it another
                if (not self.cfg.worker_port and respawned.get(name, 0) < 3
                        and any(s in self.log_tail(name) for s in _BIND_FAILED)):
                    respawned[name] = respawned.get(name, 0) + 1
                    del self.ports[name]
                    self._spawn_worker(self.names.index(name), name)
                else:
                    dead.append(name)
            if dead:
                why = (f"{dead[0]} exited with code {self.procs[dead[0]].returncode} during start-up; "
                       f"log:\n{self.log_tail(dead[0])}")
                self.stop()
                raise RuntimeFailure(why)
            if self._registered(self.names):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeFailure(f"workers did not register within {timeout_s:.0f} s; coordinator log:\n"
                                     f"{self.log_tail(COORDINATOR)}")
            time.sleep(0.1)

    def _control(self) -> Client:
        if self._ctl is None:
            self._ctl = self.client(**self._role_keys("operator"))
        return self._ctl

    def _role_keys(self, role: str) -> dict[str, Any]:
        return {"keys": str(self.key_dir(role))} if self.cfg.keyed else {}

    def _registered(self, names: Sequence[str]) -> bool:
        """Whether the coordinator answers and lists each of ``names`` as its current process."""
        try:
            workers = {w.name: w for w in self._control().workers()}
        except RuntimeFailure:
            return False
        for name in names:
            w = workers.get(name)
            if w is None or (w.pid and w.pid != self.procs[name].pid):  # pid 0: a worker that does not say
                return False
        return True

    def restart(self, name: str, timeout_s: float = 60.0) -> float:
        """Start a daemon that died (or was killed) again: same arguments, port and store.

        Args:
            name: a worker name, or ``"coordinator"``.
            timeout_s: how long it may take to be running again.
        Returns:
            Seconds until it was running: a worker registered again (the coordinator lists its
            new pid); the coordinator answering, with every running worker registered again.
        Raises:
            ConfigError: ``name`` is not a daemon of this cluster, or it is still running.
            RuntimeFailure: it exited again, or was not running within ``timeout_s``.
        """
        if name not in self.argv:
            raise ConfigError(f"no daemon {name!r} in this cluster; its daemons are {sorted(self.argv)}")
        old = self.procs[name]
        try:
            old.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{name} (pid {old.pid}) is still running; kill it first (LocalCluster.kill)") from None
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while True:
            p = self._spawn(name, self.argv[name])
            while p.poll() is None:
                workers = [n for n in self.names if self.procs[n].poll() is None] if name == COORDINATOR else [name]
                if self._registered(workers):
                    return time.monotonic() - t0
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"{name} restarted (pid {p.pid}) but was not running within {timeout_s:.0f} s;"
                                         f" log:\n{self.log_tail(name)}\n"
                                         f"coordinator log:\n{self.log_tail(COORDINATOR)}")
                time.sleep(0.1)
            # its port may be held for a moment (a connection in TIME_WAIT, a peer's reconnect): retry
            if not any(s in self.log_tail(name, 600) for s in _BIND_FAILED) or time.monotonic() > deadline:
                raise RuntimeFailure(f"{name} exited with code {p.returncode} after its restart; "
                                     f"log:\n{self.log_tail(name)}")
            time.sleep(0.5)

    def client(self, **overrides: Any) -> Client:
        """A client of this cluster (closed by ``stop()``); keyed, it holds the operator's key (deploys) unless
        ``keys=`` names another directory (``key_dir("user")``)."""
        cl = Client(ClientConfig(coordinator=self.endpoint, control_timeout_ms=2000),
                    **{**self._role_keys("operator"), **overrides})
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
        self._ctl = None
        self._stop_procs()
        if self._spawner is not None:
            self._spawner.shutdown(wait=False)
            self._spawner = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start() if not self.procs else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _CoordinatorExited(RuntimeFailure):
    """The coordinator process ended during start-up (typically: its port was taken)."""
