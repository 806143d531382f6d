"""Replicas, durable plans and repairs: the pure parts, then the coordinator keeping a cluster on its plans.

The pure parts (placement, re-plan choice, plan files, reconcile) get hand-built inputs and
exact expected outputs. The in-process part runs the coordinator and workers as threads
with fast heartbeats (a silent worker is lost in 0.6 s) and checks the same behaviours end
to end: replicas in the route, a stage that loses its only worker moved to a live one, a
restarted worker given its stages back, a coordinator restart with a worker restarted
while it was down -- all without anybody calling deploy again.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from edgesplit.partitioner import BlockEntry, ModelManifest
from edgesplit.runtime.errors import DeployError, RuntimeFailure
from edgesplit.runtime.links import LinkSpec
from edgesplit.runtime.plan import (PlannedHop, PlannedStage, group_replicas, layerwise_hops, place_replicas,
                                    replace_lost)
from edgesplit.runtime.plans import LiveWorker, PlanRecord, PlanStore, reconcile
from edgesplit.runtime.types import StageInfo

EP = {w: f"tcp://10.0.0.{i + 1}:5600" for i, w in enumerate("abcdef")}


def _manifest(n: int = 6) -> ModelManifest:
    blocks = [BlockEntry(f"b{i}", f"{i:064x}", 1, 100, [4], 16) for i in range(n)]
    return ModelManifest("m", {"builder": "dummy"}, [4], blocks)


# --- placement ---------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_replicas_fill_slots_round_robin_and_stay_distinct():
    spans = [(0, 3), (3, 6)]
    assert place_replicas(spans, list("abcd"), 2) == [PlannedHop(0, 3, ("a", "b")), PlannedHop(3, 6, ("c", "d"))]
    # fewer workers than slots: workers host stages of several hops, never one stage twice
    assert place_replicas(spans, list("abc"), 2) == [PlannedHop(0, 3, ("a", "b")), PlannedHop(3, 6, ("c", "a"))]
    assert place_replicas(spans, list("ab"), 1) == [PlannedHop(0, 3, ("a",)), PlannedHop(3, 6, ("b",))]
    with pytest.raises(DeployError, match="3 replicas per stage need at least 3 workers, 2 given"):
        place_replicas(spans, list("ab"), 3)
    with pytest.raises(DeployError, match="names a worker twice"):
        place_replicas(spans, list("aab"), 1)
    with pytest.raises(DeployError, match="replicas must be 1..16"):
        place_replicas(spans, list("ab"), 0)


@pytest.mark.timeout(10)
def test_layerwise_hops_default_to_one_stage_per_group_of_replicas():
    m = _manifest(6)
    assert layerwise_hops(m, list("abcd"), replicas=2) == [PlannedHop(0, 3, ("a", "b")), PlannedHop(3, 6, ("c", "d"))]
    assert layerwise_hops(m, list("abc"), n_stages=3) == [PlannedHop(0, 2, ("a",)), PlannedHop(2, 4, ("b",)),
                                                         PlannedHop(4, 6, ("c",))]
    assert layerwise_hops(m, list("abcd"), splits=[1], replicas=2)[0] == PlannedHop(0, 1, ("a", "b"))
    with pytest.raises(DeployError, match="no workers"):
        layerwise_hops(m, [], replicas=1)


@pytest.mark.timeout(10)
def test_explicit_stages_listed_twice_are_replicas():
    stages = [PlannedStage("a", 0, 3), PlannedStage("c", 3, 6), PlannedStage("b", 0, 3), PlannedStage("d", 3, 6)]
    assert group_replicas(stages, 6, "m") == [PlannedHop(0, 3, ("a", "b")), PlannedHop(3, 6, ("c", "d"))]
    assert group_replicas(stages, 6, "m", replicas=2) == group_replicas(stages, 6, "m")
    with pytest.raises(DeployError, match=r"asks for 3 replicas, but its explicit stages list \[2, 2\]"):
        group_replicas(stages, 6, "m", replicas=3)
    with pytest.raises(DeployError, match="lists worker a twice"):
        group_replicas([PlannedStage("a", 0, 6), PlannedStage("a", 0, 6)], 6, "m")
    with pytest.raises(DeployError, match="must start at block 3"):
        group_replicas([PlannedStage("a", 0, 3), PlannedStage("b", 4, 6)], 6, "m")
    with pytest.raises(DeployError, match="must start at block 2"):  # overlapping spans are not replicas
        group_replicas([PlannedStage("a", 0, 2), PlannedStage("b", 0, 3), PlannedStage("c", 3, 6)], 6, "m")


# --- re-plan choice ------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_replace_lost_moves_a_stage_to_the_least_loaded_live_worker_with_room():
    hops = [PlannedHop(0, 3, ("a",)), PlannedHop(3, 6, ("b",))]
    sizes = [300, 300]
    # b lost; c hosts less than a; d would be emptier but has no room
    got = replace_lost(hops, ["a", "c", "d"], {"a": 300, "c": 100, "d": 0}, {"d": 200}, sizes)
    assert got == [PlannedHop(0, 3, ("a",)), PlannedHop(3, 6, ("c",))]
    # ties go by name; a worker of the plan may take another of its stages
    assert replace_lost(hops, ["a"], {}, {}, sizes) == [PlannedHop(0, 3, ("a",)), PlannedHop(3, 6, ("a",))]
    assert replace_lost(hops, ["a", "e", "c"], {}, {}, sizes)[1] == PlannedHop(3, 6, ("a",))
    # nobody can hold it: no re-plan
    assert replace_lost(hops, ["a"], {"a": 300}, {"a": 500}, sizes) is None
    assert replace_lost(hops, [], {}, {}, sizes) is None
    # a stage that keeps a live replica stays as it is (its lost worker gets it back on return)
    rep = [PlannedHop(0, 3, ("a", "b")), PlannedHop(3, 6, ("c", "d"))]
    assert replace_lost(rep, ["a", "c"], {}, {}, sizes) == rep
    # every replica lost: each slot gets its own live worker while there are some, loads counted as they grow
    assert replace_lost(rep, ["a", "b", "e"], {"b": 50}, {}, sizes) == [rep[0], PlannedHop(3, 6, ("a", "e"))]


# --- plan records and files ----------------------------------------------------------------------
def _record(plan: int = 7, hops: tuple[PlannedHop, ...] | None = None) -> PlanRecord:
    hops = hops or (PlannedHop(0, 3, ("a", "b")), PlannedHop(3, 6, ("c", "d")))
    names = {w for h in hops for w in h.workers}
    return PlanRecord("m", plan, 6, hops, (LinkSpec("identity", None, "fp16"),), {w: EP[w] for w in names}, 2)


@pytest.mark.timeout(10)
def test_a_record_derives_every_workers_stages_with_all_next_replicas():
    rec = _record()
    nxt = (EP["c"], EP["d"])
    assert rec.stages_of("a") == {StageInfo("m", 0, 0, 3, 6, 7, nxt)} == rec.stages_of("b")
    assert rec.stages_of("c") == {StageInfo("m", 1, 3, 6, 6, 7, ())}
    body = rec.deploy_body("a")
    assert body["links_in"] == [LinkSpec().to_msg()] and body["links_out"] == [LinkSpec("identity", None, "fp16").to_msg()]
    assert rec.deploy_body("z") == {"model": "m", "plan": 7, "stages": [], "links_in": [], "links_out": []}
    assert rec.workers == ["a", "b", "c", "d"]
    with pytest.raises(DeployError, match="need 1 link specs, got 0"):
        rec.changed(links=())
    with pytest.raises(DeployError, match=r"no endpoint for workers \['e'\]"):
        rec.changed(hops=(PlannedHop(0, 3, ("e",)), PlannedHop(3, 6, ("c",))))


@pytest.mark.timeout(10)
def test_plan_store_round_trip_and_corrupt_files_are_skipped_by_name(tmp_path: Path, caplog):
    store = PlanStore(tmp_path / "plans")
    rec = _record()
    store.save(rec)
    store.save(rec.changed(plan=8))  # replaced atomically, no temporary file left behind
    assert [p.name for p in store.root.iterdir()] == ["m.json"]
    assert store.load() == {"m": rec.changed(plan=8)}
    text = (store.root / "m.json").read_text()
    assert json.loads(text)["workers"]["a"]["stages"] == [StageInfo("m", 0, 0, 3, 6, 8, (EP["c"], EP["d"])).to_msg()]
    (store.root / "half.json").write_text(text[: len(text) // 2])  # a torn write
    (store.root / "other.json").write_text(text)  # a plan of m under another name
    edited = json.loads(text)
    edited["workers"]["a"]["stages"][0][2] = 1  # per-worker stages edited by hand, disagreeing with hops
    (store.root / "edited.json").write_text(json.dumps(edited))
    (store.root / "gap.json").write_text(text.replace('"hops": [\n  [\n   0,', '"hops": [\n  [\n   1,'))
    (store.root / "bytes.json").write_bytes(b"\xff\xfe\x00garbage")
    (store.root / "list.json").write_text("[1, 2]")
    (store.root / "deep.json").write_text("[" * 100_000)
    with caplog.at_level(logging.WARNING, logger="edgesplit.coordinator.plans"):
        assert store.load() == {"m": rec.changed(plan=8)}
    for name in ("half.json", "other.json", "edited.json", "gap.json", "bytes.json", "list.json", "deep.json"):
        assert name in caplog.text, f"{name} should be named in the log"
    store.remove("m")
    assert "m" not in store.load()


# --- reconcile -----------------------------------------------------------------------------------
def _live(rec: PlanRecord, names: str, hosting: str = "", **endpoints: str) -> dict[str, LiveWorker]:
    """Live workers ``names``; those in ``hosting`` host their stages of ``rec``."""
    return {w: LiveWorker(endpoints.get(w, EP[w]), rec.stages_of(w) if w in hosting else frozenset())
            for w in names}


@pytest.mark.timeout(10)
def test_reconcile_decides_resend_reapply_replan_and_undeploy():
    rec = _record()
    sizes = [300, 300]
    assert reconcile(rec, _live(rec, "abcd", "abcd"), 99, sizes) is None
    # a worker restarted at its endpoint: the same plan, to it alone
    r = reconcile(rec, _live(rec, "abcd", "acd"), 99, sizes)
    assert (r.kind, r.record, r.targets) == ("resend", rec, ("b",))
    # one replica lost: nothing to do, the other serves
    assert reconcile(rec, _live(rec, "acd", "acd"), 99, sizes) is None
    # back at a new endpoint: the whole plan again under a new id, the stage before sends there
    r = reconcile(rec, _live(rec, "abcd", "abcd", c="tcp://10.0.0.9:5601"), 99, sizes)
    assert r.kind == "reapply" and r.record.plan == 99 and r.targets == ("a", "b", "c", "d")
    assert r.record.stages_of("a") == {StageInfo("m", 0, 0, 3, 6, 99, ("tcp://10.0.0.9:5601", EP["d"]))}
    # one replica per stage and its worker lost: moved to the live worker hosting least, new id
    one = _record(hops=(PlannedHop(0, 3, ("a",)), PlannedHop(3, 6, ("b",))))
    live = {"a": LiveWorker(EP["a"], one.stages_of("a"), 0, 300), "e": LiveWorker(EP["e"])}
    r = reconcile(one, live, 100, sizes)
    assert r.kind == "replan" and r.record.hops[1] == PlannedHop(3, 6, ("e",)) and r.targets == ("a", "e")
    assert r.record.endpoints == {"a": EP["a"], "e": EP["e"]} and r.record.plan == 100
    assert r.record.stages_of("a") == {StageInfo("m", 0, 0, 3, 6, 100, (EP["e"],))}
    assert reconcile(one, live, 100, sizes, may_replan=False) is None  # right after a restart: wait
    assert reconcile(one, {"a": live["a"]}, 100, sizes, may_replan=True).record.hops[1].workers == ("a",)
    assert reconcile(one, {}, 100, sizes) is None  # nobody left: keep the plan
    # a worker the plan does not name, hosting the model: undeployed
    old = StageInfo("m", 0, 0, 6, 6, 3, ())
    live = {**_live(rec, "abcd", "abcd"), "e": LiveWorker(EP["e"], frozenset({old}))}
    r = reconcile(rec, live, 99, sizes)
    assert (r.kind, r.targets) == ("resend", ("e",)) and rec.deploy_body("e")["stages"] == []


# --- routes --------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_routes_list_live_replicas_in_plan_order_and_say_why_a_stage_is_down():
    from edgesplit.runtime.errors import NotDeployed, UnknownModel, WorkerLost
    from edgesplit.runtime.routes import route_of_plan, route_of_reports

    m, rec = _manifest(6), _record()
    r = route_of_plan(m, rec, _live(rec, "dcba", "dcba"))
    assert [[h.worker for h in reps] for reps in r.replicas] == [["a", "b"], ["c", "d"]]
    assert [h.worker for h in r.hops] == ["a", "c"] and r.plan == 7 and r.replicas[1][1].endpoint == EP["d"]
    r = route_of_plan(m, rec, _live(rec, "bcd", "bcd"))  # a lost: its replica serves alone
    assert r.workers == ["b", "c", "d"] and r.hops[0].worker == "b"
    with pytest.raises(WorkerLost, match=r"no live worker hosts stage 1 .* \['c', 'd'\] were lost; no live worker"):
        route_of_plan(m, rec, _live(rec, "ab", "ab"))
    with pytest.raises(NotDeployed, match="being re-planned"):  # clients keep their replays for it
        route_of_plan(m, rec, _live(rec, "ab", "ab"), deploying=True)
    with pytest.raises(NotDeployed, match="have not registered since the coordinator started"):
        route_of_plan(m, rec, _live(rec, "ab", "ab"), settling=True)
    with pytest.raises(NotDeployed, match=r"stage 1 .* not loaded on \['c'\] yet"):
        route_of_plan(m, rec, _live(rec, "abc", "ab"))
    with pytest.raises(UnknownModel, match="deploy it again"):
        route_of_plan(_manifest(7), rec, _live(rec, "abcd", "abcd"))
    # without a kept plan: the newest plan the workers report
    r = route_of_reports(m, _live(rec, "abcd", "abcd"), {})
    assert r.plan == 7 and r.workers == ["a", "b", "c", "d"]
    with pytest.raises(WorkerLost, match=r"\['c', 'd'\] hosting plan 7 were lost"):
        route_of_reports(m, _live(rec, "ab", "ab"), {("m", 7): ["c", "d"]})
    with pytest.raises(UnknownModel, match="deployed on no live worker"):
        route_of_reports(m, {}, {})


# --- the coordinator keeping a cluster on its plans (threads, fast heartbeats) -------------------
HB_MS = 200


class _Cluster:
    """A coordinator and named workers in this process; workers can be stopped and started again on their port."""

    def __init__(self, model_store: dict, tmp_path: Path) -> None:
        self.root, self.tmp = str(model_store["root"]), tmp_path
        self.coord = None
        self.endpoint = "tcp://127.0.0.1:*"
        self.workers: dict = {}
        self.threads: dict = {}
        self.binds: dict[str, str] = {}

    def start_coordinator(self) -> None:
        from edgesplit.runtime import Coordinator, CoordinatorConfig

        self.coord = Coordinator(CoordinatorConfig(bind=self.endpoint, store=self.root, heartbeat_ms=HB_MS,
                                                   plan_dir=str(self.tmp / "plans"))).start()
        self.endpoint = self.coord.endpoint

    def start_worker(self, name: str) -> None:
        from edgesplit.runtime import Worker, WorkerConfig

        w = Worker(WorkerConfig(coordinator=self.endpoint, bind=self.binds.get(name, "tcp://127.0.0.1:*"),
                                store=str(self.tmp / name), name=name, heartbeat_ms=HB_MS))
        self.binds[name] = w.endpoint  # a restart binds the same port, as systemd or K3s would
        self.workers[name] = w
        self.threads[name] = threading.Thread(target=w.run, daemon=True)
        self.threads[name].start()

    def stop_worker(self, name: str) -> None:
        self.workers.pop(name).stop()
        self.threads.pop(name).join(timeout=10)

    def close(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        if self.coord is not None:
            self.coord.stop()


@pytest.fixture
def inproc(model_store, tmp_path):
    torch.set_num_threads(1)
    c = _Cluster(model_store, tmp_path)
    c.start_coordinator()
    try:
        yield c
    finally:
        c.close()


def _until(what: str, fn, timeout_s: float = 20.0):
    """``fn()`` once it returns something other than None/False without raising a RuntimeFailure."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got is not None and got is not False:
                return got
        except RuntimeFailure as e:
            last = e
        time.sleep(0.05)
    pytest.fail(f"{what} within {timeout_s} s (last error: {last})")


@pytest.mark.timeout(90)
def test_replicas_survive_a_loss_and_a_restarted_worker_gets_its_stages_back(inproc):
    from edgesplit.runtime import connect

    for name in ("r0", "r1", "r2", "r3"):
        inproc.start_worker(name)
    with connect(inproc.endpoint, heartbeat_ms=HB_MS) as cl:
        cl.wait_for_workers(4, timeout_s=20)
        route = cl.deploy("dummy6", stages=[("r0", 0, 3), ("r1", 0, 3), ("r2", 3, 6), ("r3", 3, 6)],
                          links=[{"codec": "identity", "wire_dtype": "fp16"}])
        assert [[h.worker for h in reps] for reps in route.replicas] == [["r0", "r1"], ["r2", "r3"]]
        assert torch.equal(cl.infer("dummy6", torch.zeros(1, 4)), torch.full((1, 4), 6.0))
        # a live link change reaches every replica of the sending stage, and the kept plan
        assert cl.set_link("dummy6", 0, wire_dtype="fp32")["wire_dtype"] == "fp32"
        sent = [f.result(timeout=20) is not None and f.info.trace[0]
                for f in [cl.submit("dummy6", torch.zeros(1, 4), trace=True) for _ in range(8)]]
        assert {t[1] for t in sent} == {"r0", "r1"} and {t[6] for t in sent} == {4 * 4}, sent  # fp32 from both
        kept = json.loads((inproc.tmp / "plans" / "dummy6.json").read_text())
        assert kept["links"][0]["wire_dtype"] == "fp32" and kept["plan"] == route.plan
        inproc.stop_worker("r2")
        again = _until("the route without r2", lambda: (r := cl.route("dummy6", refresh=True)).workers == [
            "r0", "r1", "r3"] and r)
        assert again.plan == route.plan  # one replica left: no re-plan
        assert torch.equal(cl.infer("dummy6", torch.ones(1, 4)), torch.full((1, 4), 7.0))
        inproc.start_worker("r2")  # same name, same port: the same plan is sent to it again
        back = _until("r2 serving again", lambda: (r := cl.route("dummy6", refresh=True)).workers == [
            "r0", "r1", "r2", "r3"] and r)
        assert back.plan == route.plan
        plan_file = json.loads((inproc.tmp / "plans" / "dummy6.json").read_text())
        assert plan_file["plan"] == route.plan and plan_file["replicas"] == 2


@pytest.mark.timeout(90)
def test_one_replica_lost_is_replanned_onto_a_live_worker(inproc):
    from edgesplit.runtime import connect

    for name in ("p0", "p1", "p2"):
        inproc.start_worker(name)
    with connect(inproc.endpoint, heartbeat_ms=HB_MS) as cl:
        cl.wait_for_workers(3, timeout_s=20)
        route = cl.deploy("dummy6", stages=[("p0", 0, 3), ("p1", 3, 6)])
        inproc.stop_worker("p1")
        # nobody calls deploy: the coordinator moves blocks [3, 6) to p2, which hosts nothing
        moved = _until("the re-plan", lambda: (r := cl.route("dummy6", refresh=True)).workers == ["p0", "p2"] and r)
        assert moved.plan > route.plan
        assert torch.equal(cl.infer("dummy6", torch.zeros(1, 4)), torch.full((1, 4), 6.0))
        inproc.start_worker("p1")  # back, but the plan no longer names it: it stays idle
        time.sleep(6 * HB_MS / 1000)
        assert cl.route("dummy6", refresh=True).workers == ["p0", "p2"]


@pytest.mark.timeout(90)
def test_coordinator_restart_with_a_worker_restarted_while_it_was_down(inproc):
    from edgesplit.runtime import connect

    for name in ("q0", "q1", "q2"):
        inproc.start_worker(name)
    with connect(inproc.endpoint, heartbeat_ms=HB_MS) as cl:
        cl.wait_for_workers(3, timeout_s=20)
        route = cl.deploy("dummy3", stages=[("q0", 0, 2), ("q1", 2, 3)])
        inproc.coord.stop()
        inproc.stop_worker("q1")
        inproc.start_worker("q1")  # it comes back empty while the coordinator is down
        t0 = time.monotonic()
        inproc.start_coordinator()  # same endpoint, same plan files
        again = _until("the route after both restarts", lambda: cl.route("dummy3", refresh=True))
        assert again.plan == route.plan and again.workers == ["q0", "q1"]
        assert torch.equal(_until("a result", lambda: cl.infer("dummy3", torch.zeros(1, 4), timeout_ms=2000)),
                           torch.full((1, 4), 3.0))
        print(f"served again {time.monotonic() - t0:.2f} s after the coordinator restarted")
        # again, but q1 does not come back: after the start-up grace its stage moves to the idle q2
        inproc.coord.stop()
        inproc.stop_worker("q1")
        inproc.start_coordinator()
        moved = _until("the re-plan after the restart", lambda: (r := cl.route("dummy3", refresh=True)).workers == [
            "q0", "q2"] and r)
        assert moved.plan > route.plan
        assert torch.equal(cl.infer("dummy3", torch.ones(1, 4), timeout_ms=5000), torch.full((1, 4), 4.0))


@pytest.mark.timeout(60)
def test_a_deploy_that_loads_but_does_not_route_fails_at_once(model_store, tmp_path):
    """A worker that answers DEPLOYED with other stages than it was given: the client's deploy fails now, not at its timeout."""
    import zmq

    from edgesplit.runtime import Coordinator, CoordinatorConfig, connect
    from edgesplit.runtime import protocol as P
    from edgesplit.runtime.errors import DeployError

    coord = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:*", store=str(model_store["root"]),
                                          plan_dir=str(tmp_path / "plans"))).start()
    ctx = zmq.Context()
    fake = ctx.socket(zmq.DEALER)
    fake.setsockopt(zmq.IDENTITY, b"fake/0001")
    fake.setsockopt(zmq.LINGER, 0)
    fake.connect(coord.endpoint)
    stop = threading.Event()

    def serve() -> None:  # registers, then answers every DEPLOY with an empty stage list
        fake.send_multipart(P.encode(P.Msg.READY, P.new_rid(), 3000, {"body": {
            "name": "fake", "endpoint": "tcp://127.0.0.1:9", "device": "cpu", "memory_budget_bytes": 0,
            "host": "h", "pid": 1, "stages": []}}))
        while not stop.is_set():
            if fake.poll(50):
                msg = P.decode(fake.recv_multipart())
                if msg.type == P.Msg.DEPLOY:
                    fake.send_multipart(P.encode(P.Msg.DEPLOYED, msg.rid, 0, {"body": {
                        "model": msg.body["model"], "plan": msg.body["plan"], "stages": []}}))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with connect(coord.endpoint) as cl:
            cl.wait_for_workers(1, timeout_s=10)
            t0 = time.monotonic()
            with pytest.raises(DeployError, match="not loaded on"):
                cl.deploy("dummy3", stages=[("fake", 0, 3)], timeout_ms=30_000)
            assert time.monotonic() - t0 < 5.0
            assert not (tmp_path / "plans" / "dummy3.json").exists()  # a plan that does not route is not kept
    finally:
        stop.set()
        t.join(timeout=5)
        fake.close(0)
        ctx.term()
        coord.stop()


@pytest.mark.timeout(60)
def test_an_undeploy_outlives_a_coordinator_restart(model_store, tmp_path: Path):
    """A worker that was away during an undeploy, back after the coordinator restarted, is told to drop the model."""
    import zmq

    from edgesplit.runtime import Coordinator, CoordinatorConfig, connect
    from edgesplit.runtime import protocol as P
    from edgesplit.runtime.errors import NotDeployed
    from edgesplit.runtime.types import StageInfo

    plans = tmp_path / "plans"
    cfg = CoordinatorConfig(bind="tcp://127.0.0.1:*", store=str(model_store["root"]), plan_dir=str(plans))
    coord = Coordinator(cfg).start()
    with connect(coord.endpoint) as cl:
        assert cl.undeploy("dummy3") == {}  # hosted nowhere now: still recorded
    coord.stop()
    assert PlanStore(plans).undeployed() == {"dummy3"}

    coord = Coordinator(cfg).start()  # a restart: the record is read back
    ctx = zmq.Context()
    fake = ctx.socket(zmq.DEALER)
    fake.setsockopt(zmq.IDENTITY, b"away/0001")
    fake.setsockopt(zmq.LINGER, 0)
    fake.connect(coord.endpoint)
    try:
        stage = StageInfo("dummy3", 0, 0, 3, 3, 1).to_msg()
        fake.send_multipart(P.encode(P.Msg.READY, P.new_rid(), 3000, {"body": {
            "name": "away", "endpoint": "tcp://127.0.0.1:9", "device": "cpu", "memory_budget_bytes": 0,
            "host": "h", "pid": 1, "stages": [stage]}}))
        deadline, order = time.monotonic() + 10, None
        while order is None and time.monotonic() < deadline:
            if fake.poll(100):
                msg = P.decode(fake.recv_multipart())
                if msg.type == P.Msg.DEPLOY:
                    order = msg.body
        assert order is not None and order["model"] == "dummy3" and order["stages"] == []
        with connect(coord.endpoint) as cl:
            with pytest.raises(NotDeployed, match="undeployed"):
                cl.route("dummy3")
    finally:
        fake.close()
        ctx.term()
        coord.stop()
    store = PlanStore(plans)
    store.mark_undeployed("dummy3", False)  # what a deploy of it does
    assert store.undeployed() == set()
