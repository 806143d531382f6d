"""Request lifecycle with real processes: departed clients, floods of dead requesters, duplicate
names, restarts, and a short soak with replicas (issue 15's acceptance tests).

Each test starts its own loopback cluster (a coordinator and workers as processes on
127.0.0.1, over a private copy of the session's models, so plans it deploys and keeps
touch no other test) and always tears it down. Oracles:

- a client that leaves never holds back another client's results;
- a worker's open files stay bounded whatever requesters its requests name;
- a second worker under a taken name is refused, loudly; nothing else is harmed;
- a restarted coordinator or worker is served again without anybody calling deploy;
- with 2 replicas per stage, a SIGKILLed worker costs no request: every request ends in
  its correct result (the unsplit model's output, exactly for the dummy model).
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import zmq

from edgesplit.runtime import protocol as P
from edgesplit.runtime.client import Client, ClientConfig
from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig, stable_port
from edgesplit.runtime.errors import RuntimeFailure
from edgesplit.runtime.protocol import Msg

NEW_CLIENT_BOUND_S = 5.0  # acceptance: after a client departs, a new one gets a result within this
FD_BOUND = 200  # acceptance: a worker's open files after 2,000 RUNs naming distinct dead requesters
FLOOD_BOUND_S = 60.0  # ... which it takes (ACKs or refuses) within this
N_FLOOD = 2000  # requests of the departed client; RUNs of the flood
RECOVERY_BOUND_S = 30.0  # a restarted daemon serves again within this (nobody calls deploy)
SOAK_STALL_MS = 30  # per-request compute stall of the soak's workers: keeps requests in flight, costs no CPU
ATOL = 0.0  # dummy models add integers to integer-valued floats: the split output is exact


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # 2 shared cores; the daemons need them


@pytest.fixture
def store(model_store: dict, tmp_path: Path) -> Path:
    """The session store's blocks and manifests (hard links), without plans another coordinator kept there."""
    root = tmp_path / "store"
    src = Path(model_store["root"])
    for sub in ("blocks", "models"):
        (root / sub).mkdir(parents=True)
        for f in (src / sub).iterdir():
            try:
                os.link(f, root / sub / f.name)
            except OSError:  # another file system
                (root / sub / f.name).write_bytes(f.read_bytes())
    return root


@contextmanager
def _cluster(store: Path, workers: int, worker_args: dict[int, list[str]] | None = None,
             heartbeat_ms: int = 1000) -> Iterator[LocalCluster]:
    lc = LocalCluster(LocalClusterConfig(workers=workers, port=0, torch_threads=1, heartbeat_ms=heartbeat_ms),
                      store=store, worker_args=worker_args)
    lc.start(timeout_s=90)
    try:
        yield lc
    finally:
        lc.stop()


def _assert_alive(lc: LocalCluster) -> None:
    alive = lc.alive()
    assert all(alive.values()), f"a daemon died: {alive}"


def _fresh_client(lc: LocalCluster, timeout_ms: int) -> Client:
    return Client(ClientConfig(coordinator=lc.endpoint, control_timeout_ms=2000, timeout_ms=timeout_ms))


def _counter(lc: LocalCluster, name: str, counter: str) -> float:
    """A worker's telemetry counter from its last heartbeat (missing: -1)."""
    with _fresh_client(lc, 2000) as cl:
        for w in cl.workers():
            if w.name == name:
                return float(w.telemetry.get(counter, -1))
    return -1.0


def _open_files(pid: int) -> int | None:
    """Open file descriptors of ``pid`` (None once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _unreachable_ports(n: int) -> list[int]:
    """``n`` loopback ports below the ephemeral range that nobody listens on (connecting is refused)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 3 and cols[3] == "0A":  # LISTEN
                listening.add(int(cols[1].rsplit(":", 1)[1], 16))
    ports = [p for p in range(20_000, 32_000) if p not in listening]
    assert len(ports) >= n, "not enough free loopback ports for the flood"
    return ports[:n]


# --- a. a departed client -------------------------------------------------------------------------
_DEPARTING_CLIENT = r"""
import os, sys, time
import torch
from edgesplit.runtime import connect

coordinator, n, timeout_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cl = connect(coordinator, max_in_flight=n + 16, timeout_ms=timeout_ms, control_timeout_ms=10_000)
cl.route("dummy3")  # the route is known: every submit goes straight to the first stage
futures = [cl.submit("dummy3", torch.full((1, 4), float(i))) for i in range(n)]
time.sleep(1.0)  # on the wire; the last stage (stalled) has returned only a few
print(sum(f.done() for f in futures), flush=True)
os._exit(0)  # like a crash: no close, its result socket just disappears
"""


@pytest.mark.timeout(120)
def test_departed_client_does_not_hold_back_a_new_one(store):
    with _cluster(store, workers=2, worker_args={1: ["--stall-ms", "3"]}) as lc:
        cl = lc.client(timeout_ms=10_000)
        cl.deploy("dummy3", stages=[("w0", 0, 2), ("w1", 2, 3)])  # w1 sends every result to its requester
        assert torch.equal(cl.infer("dummy3", torch.zeros(1, 4)), torch.full((1, 4), 3.0))
        proc = subprocess.run([sys.executable, "-c", _DEPARTING_CLIENT, lc.endpoint, str(N_FLOOD), "4000"],
                              capture_output=True, text=True, timeout=60)
        t_exit = time.monotonic()
        assert proc.returncode == 0, f"the departing client failed:\n{proc.stderr[-2000:]}"
        finished = int(proc.stdout.strip() or 0)
        print(f"departed with {N_FLOOD - finished} of {N_FLOOD} requests unfinished")

        fresh = lc.client(timeout_ms=int(NEW_CLIENT_BOUND_S * 1000))
        errors: list[str] = []
        got = None
        while got is None:
            left_ms = int((t_exit + NEW_CLIENT_BOUND_S - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            try:
                got = fresh.infer("dummy3", torch.full((1, 4), 7.0), timeout_ms=left_ms)
            except RuntimeFailure as e:  # e.g. Overloaded while the backlog drains: a client may retry
                errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.1)
        waited = time.monotonic() - t_exit
        assert got is not None, (f"no result for a new client within {NEW_CLIENT_BOUND_S} s of the old one's exit; "
                                 f"errors: {errors[-3:]}\nw1 log:\n{lc.log_tail('w1')}")
        assert torch.equal(got, torch.full((1, 4), 10.0))
        print(f"new client's first result {waited:.2f} s after the old client exited ({len(errors)} refusals)")

        # the results nobody takes are dropped and counted, and the worker keeps serving everyone
        deadline = time.monotonic() + 15
        while (dropped := _counter(lc, "w1", "count_replies_dropped")) <= 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dropped > 0, "w1 reports no results dropped for the departed requester (count_replies_dropped)"
        xs = [torch.full((1, 4), float(i)) for i in range(20)]
        futures = [fresh.submit("dummy3", x, timeout_ms=10_000) for x in xs]
        for x, f in zip(xs, futures):
            assert torch.equal(f.result(timeout=15), x + 3)
        print(f"w1 dropped {dropped:.0f} replies for the departed client")
        _assert_alive(lc)


# --- b. a flood of requests naming dead requesters ----------------------------------------------
@pytest.mark.timeout(120)
def test_flood_of_unreachable_requesters_keeps_open_files_bounded(store):
    with _cluster(store, workers=1) as lc:
        cl = lc.client(timeout_ms=10_000)
        route = cl.deploy("dummy3", stages=[("w0", 0, 3)])  # one stage: w0 sends results to each `rep`
        pid = lc.pid("w0")
        assert {w.name: w.pid for w in cl.workers()}["w0"] in (pid, 0)
        baseline = _open_files(pid)
        ctx = zmq.Context()
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.SNDTIMEO, 3000)
        d.connect(lc.worker_endpoint("w0"))
        peak, sent, taken, refused = baseline or 0, 0, 0, 0
        todo = collections.deque(_unreachable_ports(N_FLOOD))  # each RUN names its own dead requester
        waiting: dict[bytes, int] = {}  # rid -> port, sent and not yet answered
        window = 8  # RUNs awaiting their ACK: the worker computes them (an OVERLOADED one is sent again)
        t0 = time.monotonic()
        try:
            while todo or waiting:
                if time.monotonic() > t0 + FLOOD_BOUND_S:
                    pytest.fail(f"w0 took only {taken} of {N_FLOOD} RUNs in {FLOOD_BOUND_S:.0f} s (open files "
                                f"{_open_files(pid)}, peak {peak}); log:\n{lc.log_tail('w0')}")
                while todo and len(waiting) < window:
                    port, rid = todo.popleft(), P.new_rid()
                    frames = P.encode(Msg.RUN, rid, 3000, {"mdl": "dummy3", "hop": 0, "pln": route.plan,
                                                           "rep": f"tcp://127.0.0.1:{port}"},
                                      [torch.full((1, 4), float(port))])
                    try:
                        d.send_multipart(frames, copy=False)
                    except zmq.Again:
                        pytest.fail(f"w0 stopped taking messages after {sent} RUNs (alive: {lc.alive()['w0']}, "
                                    f"open files {_open_files(pid)}); log:\n{lc.log_tail('w0')}")
                    waiting[rid] = port
                    sent += 1
                    if sent % 10 == 0:
                        n = _open_files(pid)
                        assert n is not None, f"w0 died after {sent} RUNs; log:\n{lc.log_tail('w0')}"
                        peak = max(peak, n)
                if not d.poll(200):  # no answer in time: count them taken and go on
                    taken += len(waiting)
                    waiting.clear()
                    continue
                while d.poll(0):
                    msg = P.decode(d.recv_multipart())
                    port = waiting.pop(msg.rid, None)
                    if port is None:
                        continue
                    if msg.type == Msg.ERROR and msg.get("err")[0] == P.Err.OVERLOADED:
                        refused += 1
                        todo.append(port)
                    else:
                        taken += 1
            settle = time.monotonic() + 4.0  # the worker's reconnect attempts go on after the last RUN
            while time.monotonic() < settle:
                n = _open_files(pid)
                assert n is not None, f"w0 died after the flood; log:\n{lc.log_tail('w0')}"
                peak = max(peak, n)
                while d.poll(0):
                    d.recv_multipart()
                time.sleep(0.1)
        finally:
            d.close(0)
            ctx.term()
        print(f"w0 open files: {baseline} before, peak {peak} during {N_FLOOD} RUNs to distinct dead requesters "
              f"in {time.monotonic() - t0:.1f} s ({sent} sent, {refused} refused as overloaded and sent again)")
        assert peak <= FD_BOUND, f"w0 held {peak} open files (bound {FD_BOUND}, {baseline} before the flood)"
        assert lc.alive()["w0"], f"w0 died; log:\n{lc.log_tail('w0')}"
        assert "w0" in {w.name for w in cl.workers()}
        with _fresh_client(lc, 10_000) as fresh:
            assert torch.equal(fresh.infer("dummy3", torch.full((1, 4), 2.0)), torch.full((1, 4), 5.0))


# --- c. a second worker under a taken name ---------------------------------------------------------
@pytest.mark.timeout(120)
def test_duplicate_worker_name_is_refused(store, tmp_path):
    with _cluster(store, workers=2) as lc:
        cl = lc.client(timeout_ms=10_000)
        cl.deploy("dummy3", stages=[("w0", 0, 1), ("w1", 1, 3)])
        original = {w.name: (w.pid, w.endpoint) for w in cl.workers()}
        log_path = tmp_path / "duplicate.log"
        with open(log_path, "wb") as log:
            dup = subprocess.Popen([sys.executable, "-m", "edgesplit.runtime.cli",
                                    *lc.worker_argv("w1", stable_port(), store=tmp_path / "dup-store")],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            code = dup.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if dup.poll() is None:
                os.killpg(dup.pid, signal.SIGKILL)
                dup.wait(timeout=5)
        out = log_path.read_text(errors="replace")
        assert code is not None, (f"a second worker named w1 was not refused: still running after 30 s "
                                  f"(coordinator alive: {lc.alive()['coordinator']}); its log:\n{out[-2000:]}")
        assert code != 0, f"the second w1 exited with 0; its log:\n{out[-2000:]}"
        assert "w1" in out and "already" in out.lower(), f"the refusal does not name the conflict:\n{out[-2000:]}"
        print(f"second w1 exited with {code}: " + next((ln for ln in out.splitlines() if "already" in ln.lower()), ""))
        time.sleep(2 * lc.cfg.heartbeat_ms / 1000)  # a registration flip would show within two heartbeats
        _assert_alive(lc)
        now = {w.name: (w.pid, w.endpoint) for w in cl.workers()}
        assert now["w1"] == original["w1"], f"w1's registration changed: {original['w1']} -> {now['w1']}"
        assert torch.equal(cl.infer("dummy3", torch.ones(1, 4)), torch.full((1, 4), 4.0))


# --- d. restarts without a deploy --------------------------------------------------------------------
def _time_to_serve(lc: LocalCluster, t0: float, bound_s: float) -> float:
    """Seconds after ``t0`` when a fresh client first got a correct result (fails past ``bound_s``)."""
    last = ""
    while time.monotonic() < t0 + bound_s:
        try:
            with _fresh_client(lc, 2000) as cl:
                if torch.equal(cl.infer("dummy3", torch.full((1, 4), 1.0)), torch.full((1, 4), 4.0)):
                    return time.monotonic() - t0
        except RuntimeFailure as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    pytest.fail(f"the cluster did not serve within {bound_s:.0f} s; last error: {last}\n"
                f"coordinator log:\n{lc.log_tail('coordinator')}")


@pytest.mark.timeout(150)
def test_restarted_coordinator_and_worker_serve_without_a_deploy(store):
    with _cluster(store, workers=2) as lc:
        user = lc.client(timeout_ms=5000)  # a client that lives through both restarts
        user.deploy("dummy3", stages=[("w0", 0, 2), ("w1", 2, 3)])
        assert torch.equal(user.infer("dummy3", torch.zeros(1, 4)), torch.full((1, 4), 3.0))

        t_kill = time.monotonic()
        lc.kill("coordinator")
        up_s = lc.restart("coordinator")
        coord_s = _time_to_serve(lc, t_kill, RECOVERY_BOUND_S)
        print(f"coordinator SIGKILL -> restarted and workers registered {up_s:.2f} s -> serving {coord_s:.2f} s")

        t_kill = time.monotonic()
        lc.kill("w1")
        t_restart = time.monotonic()
        up_s = lc.restart("w1")
        worker_s = _time_to_serve(lc, t_kill, RECOVERY_BOUND_S)
        print(f"w1 SIGKILL -> registered again {t_restart - t_kill + up_s:.2f} s -> serving {worker_s:.2f} s "
              f"({worker_s - (t_restart - t_kill + up_s):.2f} s after it registered)")

        deadline = time.monotonic() + 10  # the long-lived client recovers too
        while True:
            try:
                assert torch.equal(user.infer("dummy3", torch.ones(1, 4)), torch.full((1, 4), 4.0))
                break
            except RuntimeFailure as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the client from before the restarts does not recover: {e}") from e
                time.sleep(0.2)
        _assert_alive(lc)


# --- e. a short soak: replicas, SIGKILL, restart -----------------------------------------------------
class _Stream:
    """Bursts of requests from a thread: ``burst`` every ``period_s``; each remembers its input."""

    def __init__(self, cl: Client, model: str, burst: int = 8, period_s: float = 0.5, timeout_ms: int = 15_000):
        self.cl, self.model, self.burst, self.period_s, self.timeout_ms = cl, model, burst, period_s, timeout_ms
        self.sent: list[tuple[torch.Tensor, concurrent.futures.Future, float]] = []
        self.burst_done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            for _ in range(self.burst):
                x = torch.full((1, 4), float(i))
                self.sent.append((x, self.cl.submit(self.model, x, timeout_ms=self.timeout_ms), time.monotonic()))
                i += 1
            self.burst_done.set()
            self._stop.wait(self.period_s)

    def start(self) -> "_Stream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def in_flight(self) -> int:
        return sum(not f.done() for _, f, _ in list(self.sent))

    def after_burst(self, delay_s: float = 0.1) -> None:
        """Return ``delay_s`` after the next burst went out (its requests are then queued at the stages)."""
        self.burst_done.clear()
        self.burst_done.wait(timeout=5)
        time.sleep(delay_s)


def _wait_healthy(cl: Client, model: str, replicas: int, worker: str, bound_s: float) -> float:
    """Seconds until the route lists ``replicas`` workers per hop again, ``worker`` among them."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() < t0 + bound_s:
        try:
            last = cl.route(model, refresh=True)
            if (all(len(reps) == replicas for reps in last.replicas)
                    and worker in {h.worker for reps in last.replicas for h in reps}):
                return time.monotonic() - t0
        except RuntimeFailure:
            pass
        time.sleep(0.2)
    pytest.fail(f"{model}'s route did not get {worker} back within {bound_s:.0f} s: "
                f"{[[h.worker for h in reps] for reps in last.replicas] if last else 'no route'}")


@pytest.mark.timeout(180)
def test_soak_with_replicas_loses_nothing_to_a_kill(store, model_store):
    model = "dummy6"
    stall = ["--stall-ms", str(SOAK_STALL_MS)]
    with _cluster(store, workers=4, worker_args={i: stall for i in range(4)}) as lc:
        cl = lc.client(timeout_ms=15_000, max_in_flight=4096)
        route = cl.deploy(model, n_stages=2, replicas=2)
        placed = [[h.worker for h in reps] for reps in route.replicas]
        assert [len(set(ws)) for ws in placed] == [2, 2] and len({w for ws in placed for w in ws}) == 4, placed
        stream = _Stream(cl, model).start()
        kills = []
        replayed = 0.0
        try:
            time.sleep(2.0)
            # a replica of stage 1 (its inputs are replayed from stage 0's kept outputs), then one of
            # stage 0 (the client replays what that worker had not acknowledged)
            for victim in (placed[1][0], placed[0][0]):
                stream.after_burst()
                in_flight = stream.in_flight()
                t_kill = time.monotonic()
                lc.kill(victim)
                time.sleep(max(0.0, t_kill + 5.0 - time.monotonic()))
                lc.restart(victim)
                registered_s = time.monotonic() - t_kill
                heal_s = _wait_healthy(cl, model, 2, victim, RECOVERY_BOUND_S)
                kills.append((victim, in_flight, registered_s, heal_s))
                if victim == placed[1][0]:  # stage 0's workers replayed what they had sent to it
                    time.sleep(1.5 * lc.cfg.heartbeat_ms / 1000)  # a heartbeat with the counters
                    replayed = sum(max(0.0, _counter(lc, w, "count_replayed")) for w in placed[0])
                time.sleep(1.0)
            time.sleep(1.0)
        finally:
            stream.stop()
        outcomes: dict[str, int] = {}
        errors = []
        reference = model_store["models"][model]
        worst = 0.0
        for x, f, t_submit in stream.sent:
            try:
                y = f.result(timeout=max(0.0, t_submit + stream.timeout_ms / 1000 + 1.0 - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pytest.fail(f"a request hung past its deadline ({stream.timeout_ms} ms + 1 s)")
            except RuntimeFailure as e:
                outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
                errors.append(f"{type(e).__name__}: {e}")
                continue
            outcomes["result"] = outcomes.get("result", 0) + 1
            with torch.inference_mode():
                worst = max(worst, float((y - reference(x)).abs().max()))
        print(f"{len(stream.sent)} requests: {outcomes}; max |split - unsplit| = {worst}")
        for victim, in_flight, registered_s, heal_s in kills:
            print(f"  {victim}: SIGKILL with {in_flight} requests in flight; restarted 5 s later, registered "
                  f"{registered_s:.2f} s after the kill, route healthy {heal_s:.2f} s after that")
        print(f"  stage 0 replayed {replayed:.0f} outputs to the surviving stage-1 replica")
        assert all(in_flight > 0 for _, in_flight, _, _ in kills), "a kill came when no request was in flight"
        assert replayed > 0, f"killing {placed[1][0]} caught no request in flight there: nothing was replayed"
        assert not errors, f"{len(errors)} requests failed across the kills (replicas should replay them): {errors[:3]}"
        assert worst <= ATOL
        _assert_alive(lc)
