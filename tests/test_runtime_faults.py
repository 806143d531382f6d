"""Fault tests with real processes: a worker killed (SIGKILL) or crashing mid-stream.

Oracle: every request in flight ends exactly once -- a correct result, or an explicit
error naming the lost worker -- within 5 s of the fault; nothing hangs. Workers here
use fault-injection flags: ``--stall-ms`` keeps requests in flight at a stage,
``--crash-after N`` exits abruptly after N computed requests.
"""
from __future__ import annotations

import concurrent.futures
import signal
import time

import pytest
import torch
import zmq

from edgesplit.runtime import protocol as P
from edgesplit.runtime.errors import RuntimeFailure, WorkerLost

FAULT_BOUND_S = 5.0  # acceptance: in-flight requests end within this after the fault


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fault_cluster(cluster):
    """The session cluster; its w4 stalls 150 ms per request and w5 crashes after 4 requests."""
    return cluster


def _wait_all(futures: list[concurrent.futures.Future], t_fault: float) -> list[tuple[float, object]]:
    """(seconds after the fault when it ended, result or exception) per future; fails if any hangs."""
    out = []
    for f in futures:
        try:
            res: object = f.result(timeout=max(0.0, t_fault + FAULT_BOUND_S + 1.0 - time.monotonic()))
        except concurrent.futures.TimeoutError:
            pytest.fail(f"a request did not end within {FAULT_BOUND_S} s of the fault")
        except RuntimeFailure as e:
            res = e
        out.append((time.monotonic() - t_fault, res))
    return out


@pytest.mark.timeout(60)
def test_sigkill_in_flight_requests_end_with_explicit_errors(fault_cluster):
    lc = fault_cluster
    cl = lc.client(timeout_ms=60_000)  # far beyond the bound: the error must come from loss detection
    route = cl.deploy("dummy3", stages=[("w0", 0, 1), ("w4", 1, 2), ("w2", 2, 3)])
    assert torch.equal(cl.infer("dummy3", torch.zeros(1, 4)), torch.full((1, 4), 3.0))
    xs = [torch.full((1, 4), float(i)) for i in range(16)]
    futures = [cl.submit("dummy3", x) for x in xs]
    time.sleep(0.6)  # some pass the stalled stage, the rest wait at or before it
    t_kill = time.monotonic()
    lc.kill("w4", signal.SIGKILL)
    ended = _wait_all(futures, t_kill)
    done_before = [r for t, r in ended if isinstance(r, torch.Tensor)]
    errors = [(t, r) for t, r in ended if not isinstance(r, torch.Tensor)]
    assert errors, "the kill came too late to catch any request in flight"
    for i, (t, r) in enumerate(ended):
        if isinstance(r, torch.Tensor):
            assert torch.equal(r, xs[i] + 3)  # a result is still the right one
    for t, e in errors:
        assert isinstance(e, WorkerLost), f"expected WorkerLost, got {type(e).__name__}: {e}"
        assert "w4" in str(e)
        assert t <= FAULT_BOUND_S, f"error came {t:.2f} s after the kill"
    print(f"{len(done_before)} results, {len(errors)} WorkerLost errors, last after {max(t for t, _ in errors):.2f} s")
    alive = lc.alive()
    assert not alive["w4"] and alive["w0"] and alive["w2"] and alive["coordinator"]
    with pytest.raises(WorkerLost, match="w4"):  # the route is known broken until redeployed
        cl.infer("dummy3", torch.zeros(1, 4), timeout_ms=10_000)
    # a request already past the client (stale route) is failed by w0 at once, not at its deadline
    ctx = zmq.Context()
    rep_sock = ctx.socket(zmq.ROUTER)
    rep = f"tcp://127.0.0.1:{rep_sock.bind_to_random_port('tcp://127.0.0.1')}"
    d = ctx.socket(zmq.DEALER)
    d.connect(route.hops[0].endpoint)
    rid = P.new_rid()
    d.send_multipart(P.encode(P.Msg.RUN, rid, 60_000, {"mdl": "dummy3", "hop": 0, "rep": rep, "pln": route.plan},
                              [torch.zeros(1, 4)]))
    assert rep_sock.poll(3000), "w0 should report the lost next hop at once"
    err = P.decode(rep_sock.recv_multipart()[1:])
    assert err.rid == rid and err.get("err")[0] == P.Err.WORKER_LOST and "w4" in err.get("err")[1]
    d.close(0)
    rep_sock.close(0)
    ctx.term()
    cl.deploy("dummy3", stages=[("w0", 0, 2), ("w2", 2, 3)])  # and a redeploy on the survivors serves again
    assert torch.equal(cl.infer("dummy3", torch.ones(1, 4)), torch.full((1, 4), 4.0))


@pytest.mark.timeout(60)
def test_crashing_worker_mid_stream(fault_cluster):
    lc = fault_cluster
    cl = lc.client(timeout_ms=60_000)
    cl.deploy("dummy6", stages=[("w0", 0, 3), ("w5", 3, 6)])  # w5 exits after computing 4 requests
    xs = [torch.full((1, 4), float(i)) for i in range(10)]
    futures = [cl.submit("dummy6", x) for x in xs]
    deadline = time.monotonic() + 20
    while lc.alive()["w5"] and time.monotonic() < deadline:
        time.sleep(0.02)
    t_crash = time.monotonic()
    assert not lc.alive()["w5"], "w5 should have crashed after 4 requests"
    ended = _wait_all(futures, t_crash)
    results = [r for _, r in ended if isinstance(r, torch.Tensor)]
    errors = [(t, r) for t, r in ended if not isinstance(r, torch.Tensor)]
    assert len(results) <= 4 and len(results) + len(errors) == len(xs)
    for t, e in errors:
        assert isinstance(e, WorkerLost) and "w5" in str(e), f"{type(e).__name__}: {e}"
        assert t <= FAULT_BOUND_S
    assert lc.alive()["w0"] and lc.alive()["coordinator"]
