"""The Python API with every component in this process (threads): scripts, restarts, deploy errors.

Same code as the daemons, without process start-up cost, so coordinator restarts and
re-registration can be tested quickly (short heartbeats).
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from edgesplit.runtime import Coordinator, CoordinatorConfig, Worker, WorkerConfig, connect
from edgesplit.runtime.errors import DeployError, RequestTimeout, UnknownModel

HB_MS = 200  # fast heartbeats: a silent peer is noticed in 0.6 s


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _start_workers(endpoint: str, tmp_path, n: int, **kw) -> list[Worker]:
    workers = []
    for i in range(n):
        w = Worker(WorkerConfig(coordinator=endpoint, bind="tcp://127.0.0.1:*", store=str(tmp_path / f"w{i}"),
                                name=f"t{i}", heartbeat_ms=HB_MS, **kw))
        threading.Thread(target=w.run, daemon=True).start()
        workers.append(w)
    return workers


@pytest.mark.timeout(60)
def test_coordinator_restart_relearns_routes_from_worker_heartbeats(model_store, tmp_path):
    cfg = CoordinatorConfig(bind="tcp://127.0.0.1:*", store=str(model_store["root"]), heartbeat_ms=HB_MS)
    coord = Coordinator(cfg).start()
    endpoint = coord.endpoint
    workers = _start_workers(endpoint, tmp_path, 2)
    try:
        with connect(endpoint, heartbeat_ms=HB_MS) as cl:
            cl.wait_for_workers(2, timeout_s=20)
            route = cl.deploy("dummy6", n_stages=2, workers=["t0", "t1"])
            assert torch.equal(cl.infer("dummy6", torch.zeros(1, 4)), torch.full((1, 4), 6.0))
            coord.stop()  # the coordinator goes away; workers keep their stages
            time.sleep(4 * HB_MS / 1000)
            coord = Coordinator(CoordinatorConfig(bind=endpoint, store=str(model_store["root"]),
                                                  heartbeat_ms=HB_MS)).start()
            deadline = time.monotonic() + 20
            while True:  # workers re-register (DISCONNECT -> READY with their stages); no redeploy needed
                try:
                    again = cl.route("dummy6", refresh=True)
                    break
                except UnknownModel:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            assert again.workers == route.workers and again.plan == route.plan
            assert torch.equal(cl.infer("dummy6", torch.ones(1, 4)), torch.full((1, 4), 7.0))
    finally:
        for w in workers:
            w.stop()
        coord.stop()


@pytest.mark.timeout(60)
def test_memory_budget_refuses_a_stage_that_does_not_fit(model_store, tmp_path):
    coord = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:*", store=str(model_store["root"]),
                                          heartbeat_ms=HB_MS)).start()
    workers = _start_workers(coord.endpoint, tmp_path, 1, memory_budget_bytes=64 * 1024)
    try:
        with connect(coord.endpoint, heartbeat_ms=HB_MS) as cl:
            cl.wait_for_workers(1, timeout_s=20)
            with pytest.raises(DeployError, match="memory budget"):
                cl.deploy("resnet18", n_stages=1)  # ~45 MiB of weights into a 64 KiB budget
            route = cl.deploy("dummy3", n_stages=1)  # the worker is fine afterwards
            assert route.workers == ["t0"]
            assert torch.equal(cl.infer("dummy3", torch.zeros(2, 4)), torch.full((2, 4), 3.0))
            w = cl.workers()[0]
            assert w.memory_budget_bytes == 64 * 1024
    finally:
        for w in workers:
            w.stop()
        coord.stop()


@pytest.mark.timeout(60)
def test_deadlines_end_requests_when_a_stage_is_too_slow_or_nobody_answers(model_store, tmp_path):
    coord = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:*", store=str(model_store["root"]),
                                          heartbeat_ms=HB_MS)).start()
    workers = _start_workers(coord.endpoint, tmp_path, 1, stall_ms=400)
    try:
        with connect(coord.endpoint, heartbeat_ms=HB_MS) as cl:
            cl.wait_for_workers(1, timeout_s=20)
            cl.deploy("dummy3", n_stages=1)
            t0 = time.monotonic()
            with pytest.raises(RequestTimeout, match="deadline"):
                cl.infer("dummy3", torch.zeros(1, 4), timeout_ms=150)
            assert time.monotonic() - t0 < 1.0
            assert torch.equal(cl.infer("dummy3", torch.zeros(1, 4), timeout_ms=5000), torch.full((1, 4), 3.0))
    finally:
        for w in workers:
            w.stop()
        coord.stop()
    with connect("tcp://127.0.0.1:9", control_timeout_ms=300, timeout_ms=300) as cl:  # nothing listens there
        with pytest.raises(RequestTimeout, match="is it running"):
            cl.infer("dummy3", torch.zeros(1, 4))
