"""Upload pacing on a real rate-limited uplink: the admission's serial slots vs everyone sending at once.

Issue 17's acceptance point: clients behind a rate-limited link; with the allocation every
admitted upload ends within 15 % of its planned time; with every client sending at once,
measurably more deadlines are missed.

The set-up follows ``test_netns_link.py``: a network namespace, a veth pair and a token
bucket (tc tbf) on the near end towards the namespace. The coordinator (in this process)
and the clients are on the near address; worker "far" runs in the namespace and hosts the
whole ``dummy`` model, so every request's 200 kB input crosses the limited link while its
compute is negligible. Each user is its own ``Client`` (its own TCP connection to "far"),
as separate devices behind one uplink would be.

The same burst of requests (one per user, deadlines spread so that serial uploads meet
them all but simultaneous ones do not) is submitted twice: to a coordinator that knows the
uplink (``uplink_bytes``: slots of the link, each client sends in its slot) and to one run
with ``scheduler="none"`` (everything admitted, everyone sends at once).

Needs root, ``ip netns`` and ``tc``; skips with the reason elsewhere. Traffic goes only to
the addresses this test creates.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
from dataclasses import dataclass

import pytest
import torch
from linkbed import far_worker, limited_link

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE_BYTES_PER_S = 2_500_000  # tbf 20 mbit, and the coordinator's --uplink-rate
BURST_BYTES = 8 * 1024  # small: a 200 kB upload measures the rate, not the burst
N_FLOATS = 50_000  # per request: 200 kB of float32 input
N_USERS = 14
# deadline of the k-th (k = 0..N-1) = (k + 1.5) x (input bytes / rate) x SLACK: serial slots (87 ms each at
# 0.92 x the rate) end 20-30 ms before each deadline; sending at once ends them all within ~0.9 s in whatever
# order TCP on the FIFO token bucket happens to finish them
SLACK = 1.1
TOLERANCE = 0.15  # issue 17: every admitted upload ends within 15 % of its planned time
# misses with everyone sending at once, beyond the paced ones: 8 to 11 of 14 in 8 measured bursts, paced 0 to 1
# (the order in which the flows finish is luck; a burst that finishes the earliest deadlines first misses fewer)
EXTRA_MISSES = 5
# the burst's asks should meet in one admission window: here all clients share one process (and its GIL), so
# their ADMITs reach the coordinator 0.5-4 ms apart, now and then more; a burst split in two is re-planned
# with what the first window holds, but a slot released meanwhile is not moved again. 25 ms keeps a burst in
# one window and leaves the earliest deadline (132 ms) ~15 ms of slack after its 87 ms slot.
WINDOW_MS = 25.0
TAG = f"ep{os.getpid() % 100000}"
MODEL = "dm4"


@pytest.fixture(scope="module")
def far_link():
    """(near address, far address, namespace): a veth pair, far end in a namespace, tbf towards it."""
    with limited_link(TAG, 78, RATE_BYTES_PER_S, BURST_BYTES) as link:
        yield link


@pytest.fixture(scope="module")
def dummy_store(tmp_path_factory):
    """A store with a 4-block dummy model taking [50 000] floats (profiled: compute is tens of microseconds)."""
    from edgesplit.partitioner import BlockStore, partition
    from edgesplit.runtime.dummy import build_dummy, dummy_recipe

    root = tmp_path_factory.mktemp("pacing-store")
    partition(build_dummy(4), MODEL, dummy_recipe(4), BlockStore(root), input_shape=[N_FLOATS], profile=True)
    return root


@contextlib.contextmanager
def _cluster(far_link, store_root, tmp_path, scheduler: str):
    """A coordinator here (knowing the uplink's rate), worker "far" behind the link with the model, one client per user.

    Every client has sent one unscheduled request first, so its connection to "far" is up
    and the workers have reported their compute times before the measured burst.
    """
    from edgesplit.runtime import Client, ClientConfig
    from edgesplit.runtime.coordinator import Coordinator, CoordinatorConfig

    near, far, ns = far_link
    coord = Coordinator(CoordinatorConfig(bind=f"tcp://{near}:*", store=str(store_root),
                                          plan_dir=str(tmp_path / f"plans-{scheduler}"), scheduler=scheduler,
                                          uplink_bytes=RATE_BYTES_PER_S, admission_window_ms=WINDOW_MS,
                                          insecure=True)).start()  # open, so the timings are the uplink's alone
    clients: list = []
    try:
        with far_worker(ns, coord.endpoint, far, tmp_path / f"far-{scheduler}", ["--queue-depth", "64", "--insecure"]):
            ctl = Client(ClientConfig(coordinator=coord.endpoint, timeout_ms=60_000, insecure=True))
            clients.append(ctl)
            ctl.wait_for_workers(1, timeout_s=30)
            ctl.deploy(MODEL, stages=[("far", 0, 4)])
            users = [ctl] + [Client(ClientConfig(coordinator=coord.endpoint, timeout_ms=60_000, insecure=True))
                             for _ in range(N_USERS - 1)]
            clients[1:] = users[1:]
            x = torch.zeros(1, N_FLOATS)
            for cl in users:  # one at a time: each takes the link alone
                assert torch.equal(cl.submit(MODEL, x).result(timeout=30), x + 4)
            yield users
    finally:
        for cl in clients:
            cl.close()
        coord.stop()


@dataclass
class Outcome:
    user: str
    deadline_ms: float
    kind: str  # "ok", "late" (DeadlineMissed), "refused" (DeadlineUnmeetable), or the error's class name
    late_ms: float = 0.0
    plan: dict | None = None
    t_sent: float = 0.0
    t_recv: float = 0.0  # far's wall clock when the whole input had arrived (its trace of hop 0)
    reason: str = ""

    @property
    def upload_ms(self) -> float:
        return (self.t_recv - self.t_sent) * 1000 if self.t_recv and self.t_sent else float("nan")


def _burst(users, seed: int = 17) -> list[Outcome]:
    """One request per user, all submitted at once; deadlines (k + 1.5) x D/R x SLACK, shuffled across users."""
    from edgesplit.runtime.errors import DeadlineMissed, DeadlineUnmeetable

    slot_ms = N_FLOATS * 4 / RATE_BYTES_PER_S * 1000
    deadlines = [(k + 1.5) * slot_ms * SLACK for k in range(N_USERS)]
    random.Random(seed).shuffle(deadlines)
    x = torch.zeros(1, N_FLOATS)
    futs = [cl.submit(MODEL, x, deadline_ms=d, user=f"u{i}", trace=True, timeout_ms=30_000)
            for i, (cl, d) in enumerate(zip(users, deadlines))]
    concurrent.futures.wait(futs, timeout=30)
    out = []
    for i, (f, d) in enumerate(zip(futs, deadlines)):
        info = f.info
        o = Outcome(f"u{i}", d, "ok", plan=dict(info.plan) if info.admitted else None, t_sent=info.t_sent)
        try:
            y = f.result(timeout=0)
            assert torch.equal(y, x + 4)
        except DeadlineMissed as e:
            o.kind, o.late_ms = "late", e.late_ms
            assert torch.equal(e.result, x + 4)
        except DeadlineUnmeetable as e:
            o.kind, o.reason = "refused", str(e)
        except Exception as e:  # noqa: BLE001 -- reported and failed on by the caller
            o.kind, o.reason = type(e).__name__, str(e)
        if info.trace:
            o.t_recv = info.trace[0][2]
        out.append(o)
    return out


def _decided_at(outs: list[Outcome]) -> float:
    """The admission's decision on this host's wall clock, as the clients saw it.

    A client sends ``send_in_ms`` after the answer, and one window's answers leave together,
    so the earliest ``t_sent - send_in`` is when the first answer arrived. Planned times are
    relative to it.
    """
    return min((o.t_sent - o.plan["send_in_ms"] / 1000 for o in outs if o.plan is not None and o.t_sent),
               default=0.0)


def _table(title: str, outs: list[Outcome]) -> str:
    """Per request, in deadline order: planned vs actual upload (duration and end), the outcome."""
    admitted = [o for o in outs if o.plan is not None and o.t_sent]
    t0 = _decided_at(outs)
    rows = [f"{title}:", "  user deadline  send_in  plan_up  real_up  plan_end real_end  outcome"]
    for o in sorted(outs, key=lambda o: o.deadline_ms):
        p = o.plan or {}
        plan_end = p.get("send_in_ms", 0.0) + p.get("upload_ms", 0.0) if p else float("nan")
        real_end = (o.t_recv - t0) * 1000 if o.t_recv and admitted else float("nan")
        outcome = {"ok": "on time", "late": f"LATE by {o.late_ms:.1f} ms"}.get(o.kind, f"{o.kind} {o.reason[:100]}")
        rows.append(f"  {o.user:>4} {o.deadline_ms:8.1f} {p.get('send_in_ms', float('nan')):8.1f} "
                    f"{p.get('upload_ms', float('nan')):8.1f} {o.upload_ms:8.1f} {plan_end:8.1f} {real_end:8.1f}  "
                    f"{outcome}")
    return "\n".join(rows)


@pytest.mark.timeout(120)
def test_paced_uploads_keep_their_slots_and_unpaced_ones_miss_deadlines(far_link, dummy_store, tmp_path):
    with _cluster(far_link, dummy_store, tmp_path / "paced", "auto") as users:
        paced = _burst(users)
    paced_table = _table(f"paced (uplink {RATE_BYTES_PER_S / 1e6:g} MB/s known to the admission)", paced)
    print("\n" + paced_table)
    with _cluster(far_link, dummy_store, tmp_path / "unpaced", "none") as users:
        unpaced = _burst(users)
    unpaced_table = _table("unpaced (--scheduler none: everyone sends at once)", unpaced)
    print(unpaced_table)
    tables = paced_table + "\n" + unpaced_table

    # every request ends in a result (maybe late) or a refusal, never another error
    assert all(o.kind in ("ok", "late", "refused") for o in paced + unpaced), tables
    admitted = [o for o in paced if o.plan is not None]
    assert len(admitted) >= N_USERS // 2, f"the deadlines leave room for serial uploads of most\n{tables}"
    t0 = _decided_at(paced)
    for o in admitted:
        assert o.plan["upload_ms"] > 0 and o.t_sent > 0 and o.t_recv > 0, f"{o.user}: no slot or no trace\n{tables}"
        assert abs(o.upload_ms - o.plan["upload_ms"]) <= TOLERANCE * o.plan["upload_ms"], \
            f"{o.user}'s upload took {o.upload_ms:.1f} ms, planned {o.plan['upload_ms']:.1f} ms\n{tables}"
        plan_end, real_end = o.plan["send_in_ms"] + o.plan["upload_ms"], (o.t_recv - t0) * 1000
        assert abs(real_end - plan_end) <= TOLERANCE * plan_end, \
            f"{o.user}'s upload ended at {real_end:.1f} ms, planned {plan_end:.1f} ms\n{tables}"
    late_paced = [o for o in paced if o.kind == "late"]
    # what comes after the upload (compute, the result's way back) is not the link's: on a loaded CI machine the
    # first result of a burst once came 40 ms late after an upload that ended on plan, so lateness is counted,
    # not bounded here (benchmarks/serving.py reports it)
    assert len(late_paced) <= 2, f"paced uploads should keep nearly every deadline\n{tables}"
    late_unpaced = [o for o in unpaced if o.kind == "late"]
    print(f"deadlines missed: paced {len(late_paced)} (refused {sum(o.kind == 'refused' for o in paced)}), "
          f"unpaced {len(late_unpaced)} of {N_USERS}")
    assert all(o.kind != "refused" for o in unpaced), tables  # "none" admits everything
    assert len(late_unpaced) >= len(late_paced) + EXTRA_MISSES, tables
