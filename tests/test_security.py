"""A keyed cluster under attack: every attack found on the open cluster, replayed, is refused.

The cluster is real (a coordinator and two workers as processes on 127.0.0.1, every socket
CURVE, ZAP allow-lists per role). Attackers use plain pyzmq and the project's own encoder,
as a hostile host on the LAN would: a stranger without keys, one with a key nobody listed,
and insiders holding listed keys of the wrong role (a user, a worker key not on the route,
a worker key used as a client). After each attack the registry, the route and the kept
plans are unchanged, the refused peer learned no names or endpoints, and a valid request
still returns the model's output.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
import torch
import zmq

from edgesplit.runtime import protocol as P
from edgesplit.runtime.errors import Forbidden
from edgesplit.runtime.protocol import Err, Msg
from edgesplit.runtime.security import Security, keygen, load_keys
from edgesplit.runtime.transport import dealer

MODEL = "dummy6"
NO_REPLY_S = 0.6  # how long a refused stranger waits for an answer that must not come


class Peer:
    """A hostile or misusing peer: one DEALER to one endpoint, keyed by a key directory (or not at all)."""

    def __init__(self, endpoint: str, keys: Path | None = None, server_key: str | bytes | None = None,
                 ident: bytes | None = None, stranger_key: bool = False) -> None:
        self.ctx = zmq.Context()
        ident = ident or b"x-" + os.urandom(4).hex().encode()
        if stranger_key:  # a CURVE key pair nobody listed
            self.sock = self.ctx.socket(zmq.DEALER)
            pub, sec = zmq.curve_keypair()
            self.sock.curve_publickey, self.sock.curve_secretkey = pub, sec
            self.sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
            self.sock.setsockopt(zmq.IDENTITY, ident)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(endpoint)
            self.sec = None
        else:
            self.sec = Security(self.ctx, load_keys(keys)) if keys is not None else None
            self.sock = dealer(self.ctx, endpoint, ident, sec=self.sec, server_key=server_key)

    def send(self, frames: list, wait_s: float = 3.0) -> bool:
        """Send once the link is up; False when it never comes up (the handshake was refused)."""
        if not self.sock.poll(int(wait_s * 1000), zmq.POLLOUT):
            return False
        self.sock.send_multipart(frames, zmq.NOBLOCK)
        return True

    def ask(self, frames: list, wait_s: float = 3.0) -> P.Message | None:
        if not self.send(frames, wait_s) or not self.sock.poll(int(wait_s * 1000)):
            return None
        return P.decode(self.sock.recv_multipart())

    def close(self) -> None:
        if self.sec is not None:
            self.sec.close()
        self.ctx.destroy(linger=0)


def _state(cl, ctl) -> tuple:
    """What an attack must not change: who is registered where, the route, the kept plans on disk."""
    workers = sorted((w.name, w.endpoint, w.pid) for w in ctl.workers())
    route = ctl.route(MODEL, refresh=True)
    plans = sorted((p.name, p.read_text()) for p in (cl.workdir / "plans").glob("*.json"))
    return workers, route.to_msg(), plans


def _learns_nothing(cl, reply: P.Message | None) -> None:
    """An error reply may say what was refused; it names no worker and no endpoint."""
    if reply is None:
        return
    text = repr(reply.header)
    assert "tcp://" not in text and not any(n in text for n in cl.names), text


@pytest.fixture(scope="module")
def keyed(model_store: dict):
    """A keyed 2-worker cluster with dummy6 on w0 -> w1 (w1 stalls 1 s, so a request can be caught in flight),
    plus a listed worker key ``rogue`` that no plan uses (an insider: a board taken over)."""
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1, keyed=True), store=model_store["root"],
                      worker_args={1: ["--stall-ms", "1000"]})
    lc.coordinator_args = ["--no-replan", "--plan-dir", str(lc.workdir / "plans")]  # the shared store's plans are others'
    rogue = lc.add_key("rogue", "worker")
    lc.start(timeout_s=90)
    try:
        ctl = lc.client()
        ctl.deploy(MODEL, workers=["w0", "w1"], n_stages=2)
        yield lc, ctl, rogue
    finally:
        lc.stop()


def _keys(lc, name: str) -> Path:
    return lc.key_dir(name)


def _coordinator_key(lc) -> bytes:
    return load_keys(lc.key_dir("user")).coordinator_key()


def _valid_request(lc, model_store) -> None:
    x = torch.randn(3, 4)
    with lc.client(keys=str(lc.key_dir("user"))) as user:
        y = user.infer(MODEL, x, timeout_ms=20_000)
    assert torch.allclose(y, model_store["models"][MODEL](x), atol=1e-6)


def test_strangers_get_no_answer_and_change_nothing(keyed, model_store):
    lc, ctl, _ = keyed
    before = _state(lc, ctl)
    ready = P.encode(Msg.READY, P.new_rid(), 3000, {"body": {
        "name": "w0", "endpoint": "tcp://127.0.0.1:1", "device": "cpu", "memory_budget_bytes": 1 << 30,
        "stages": [[MODEL, 0, 0, 6, 6, 2**60, []]]}})
    asks = [ready, P.encode(Msg.WORKERS, P.new_rid(), 3000), P.encode(Msg.MODELS, P.new_rid(), 3000),
            P.encode(Msg.ROUTE, P.new_rid(), 3000, {"mdl": MODEL}),
            P.encode(Msg.PLAN, P.new_rid(), 3000, {"body": {"model": MODEL, "n_stages": 1}}),
            P.encode(Msg.FETCH, P.new_rid(), 3000, {"body": {"id": "0" * 64, "off": 0, "len": 1024}})]
    for how in ("no keys", "unlisted key"):
        p = Peer(lc.endpoint, ident=b"w0/deadbeef", server_key=_coordinator_key(lc), stranger_key=how != "no keys") \
            if how != "no keys" else Peer(lc.endpoint, ident=b"w0/deadbeef")
        try:
            for frames in asks:
                assert p.ask(frames, NO_REPLY_S) is None, f"a stranger ({how}) got an answer to {frames[0][:12]!r}"
        finally:
            p.close()
    # the data sockets too: a RUN from nowhere is never taken
    for name in lc.names:
        p = Peer(lc.worker_endpoint(name))
        try:
            run = P.encode(Msg.RUN, P.new_rid(), 3000, {"mdl": MODEL, "hop": 0, "rep": "tcp://127.0.0.1:9"},
                           [torch.zeros(1, 4)])
            assert p.ask(run, NO_REPLY_S) is None
        finally:
            p.close()
    assert _state(lc, ctl) == before
    _valid_request(lc, model_store)


def test_users_cannot_register_fetch_deploy_or_read_the_registry(keyed, model_store):
    lc, ctl, _ = keyed
    before = _state(lc, ctl)
    user = Peer(lc.endpoint, _keys(lc, "user"), _coordinator_key(lc), ident=b"w0/cafe")
    try:
        for frames in (
                P.encode(Msg.READY, P.new_rid(), 3000, {"body": {"name": "w0", "endpoint": "tcp://127.0.0.1:1",
                                                                 "device": "cpu", "memory_budget_bytes": 1}}),
                P.encode(Msg.HEARTBEAT, P.new_rid(), 3000, {"body": {}}),
                P.encode(Msg.FETCH, P.new_rid(), 3000, {"body": {"id": "0" * 64, "off": 0, "len": 1024}}),
                P.encode(Msg.PLAN, P.new_rid(), 3000, {"body": {"model": MODEL, "n_stages": 1}}),
                P.encode(Msg.UNDEPLOY, P.new_rid(), 3000, {"body": {"model": MODEL}}),
                P.encode(Msg.LINK, P.new_rid(), 3000, {"body": {"model": MODEL, "cut": 0, "link": {}}}),
                P.encode(Msg.PREFETCH, P.new_rid(), 3000, {"body": {"model": MODEL}}),
                P.encode(Msg.MEASURE, P.new_rid(), 3000, {"body": {"model": MODEL}}),  # would make boards profile
                P.encode(Msg.WORKERS, P.new_rid(), 3000), P.encode(Msg.MODELS, P.new_rid(), 3000)):
            reply = user.ask(frames)
            assert reply is not None and reply.type == Msg.ERROR and reply.get("err")[0] == Err.FORBIDDEN, reply
            _learns_nothing(lc, reply)
    finally:
        user.close()
    with lc.client(keys=str(lc.key_dir("user"))) as cl:
        with pytest.raises(Forbidden):
            cl.deploy(MODEL, n_stages=1)
        with pytest.raises(Forbidden):
            cl.deploy(MODEL)  # the planned deploy measures first: refused there
    assert _state(lc, ctl) == before
    _valid_request(lc, model_store)


def test_a_worker_key_cannot_deploy_or_run_requests(keyed, model_store):
    lc, ctl, rogue = keyed
    before = _state(lc, ctl)
    with lc.client(keys=str(lc.key_dir("w0"))) as cl:
        with pytest.raises(Forbidden):
            cl.deploy(MODEL, n_stages=1)
        with pytest.raises(Forbidden):
            cl.infer(MODEL, torch.zeros(1, 4), timeout_ms=5000)  # ROUTE refused
    # straight to a worker's data socket, hop 0, as if it were a user
    route = ctl.route(MODEL)
    for who in ("w0", "rogue"):
        keys = lc.key_dir(who) if who != "rogue" else _rogue_dir(lc, rogue)
        p = Peer(route.hops[0].endpoint, keys, route.hops[0].key)
        try:
            run = P.encode(Msg.RUN, P.new_rid(), 3000, {"mdl": MODEL, "hop": 0, "rep": "tcp://127.0.0.1:9",
                                                        "pln": route.plan}, [torch.zeros(1, 4)])
            reply = p.ask(run)
            assert reply is not None and reply.get("err")[0] == Err.FORBIDDEN, reply
        finally:
            p.close()
    assert _state(lc, ctl) == before
    _valid_request(lc, model_store)


def _rogue_dir(lc, rogue: Path) -> Path:
    """The rogue worker's key directory: its secret and every public key of the cluster."""
    return rogue


def test_hop_k_runs_only_from_the_plans_previous_hop(keyed, model_store):
    lc, ctl, rogue = keyed
    route = ctl.route(MODEL)
    last = route.hops[1]
    x = torch.zeros(1, 4)
    for who, keys in (("user", lc.key_dir("user")), ("rogue", _rogue_dir(lc, rogue))):
        p = Peer(last.endpoint, keys, last.key)
        try:
            run = P.encode(Msg.RUN, P.new_rid(), 3000, {"mdl": MODEL, "hop": 1, "rep": "tcp://127.0.0.1:9",
                                                        "pln": route.plan}, [x])
            reply = p.ask(run)
            assert reply is not None and reply.get("err")[0] == Err.FORBIDDEN, (who, reply)
            _learns_nothing(lc, reply)
        finally:
            p.close()
    _valid_request(lc, model_store)


def test_a_listed_worker_cannot_take_over_a_name_or_a_route(keyed, model_store):
    lc, ctl, rogue = keyed
    before = _state(lc, ctl)
    rdir = _rogue_dir(lc, rogue)
    # under w0's name with another endpoint; then under its own name claiming a huge plan id for every stage
    for name in ("w0", "rogue"):
        p = Peer(lc.endpoint, rdir, _coordinator_key(lc), ident=f"{name}/0badc0de".encode())
        try:
            reply = p.ask(P.encode(Msg.READY, P.new_rid(), 3000, {"body": {
                "name": name, "endpoint": "tcp://127.0.0.1:2", "device": "cpu", "memory_budget_bytes": 1 << 30,
                "stages": [[MODEL, 0, 0, 3, 6, 2**60, ["tcp://127.0.0.1:2"]], [MODEL, 1, 3, 6, 6, 2**60, []]]}}))
            if name == "w0":
                assert reply is not None and reply.get("err")[0] == Err.NAME_TAKEN, reply
            else:
                route = ctl.route(MODEL, refresh=True)
                assert "rogue" not in route.workers and route.plan < 2**60
        finally:
            p.close()
    workers, route, plans = _state(lc, ctl)
    assert (route, plans) == before[1:]
    assert [w for w in workers if w[0] != "rogue"] == before[0]
    _valid_request(lc, model_store)


def test_a_listed_worker_cannot_claim_stages_of_a_real_plan_or_a_planned_endpoint(keyed, model_store):
    """The plan id is no secret (a worker on the route knows it): stages count only where the plan put them."""
    lc, ctl, rogue = keyed
    before = _state(lc, ctl)
    route = ctl.route(MODEL)
    stages = [[MODEL, h.hop, h.start, h.end, 6, route.plan, [route.hops[1].endpoint] if h.hop == 0 else []]
              for h in route.hops]
    p = Peer(lc.endpoint, rogue, _coordinator_key(lc), ident=b"rogue/12345678")
    try:
        reply = p.ask(P.encode(Msg.READY, P.new_rid(), 3000, {"body": {
            "name": "rogue", "endpoint": "tcp://127.0.0.1:2", "device": "cpu", "memory_budget_bytes": 1 << 30,
            "stages": stages}}))
        assert reply is not None and reply.type == Msg.HEARTBEAT  # registered, but its claims count for nothing
        assert p.send(P.encode(Msg.HEARTBEAT, P.new_rid(), 3000, {"body": {"stages": stages}}))
        time.sleep(0.3)
        assert ctl.route(MODEL, refresh=True).workers == ["w0", "w1"]
    finally:
        p.close()
    # w1's endpoint under another name: refused, so no worker is told that another key serves there
    p = Peer(lc.endpoint, rogue, _coordinator_key(lc), ident=b"rogue2/12345678")
    try:
        reply = p.ask(P.encode(Msg.READY, P.new_rid(), 3000, {"body": {
            "name": "rogue2", "endpoint": route.hops[1].endpoint, "device": "cpu", "memory_budget_bytes": 1 << 30,
            "stages": stages[1:]}}))
        assert reply is not None and reply.get("err")[0] == Err.NAME_TAKEN, reply
    finally:
        p.close()
    workers, route_now, plans = _state(lc, ctl)
    assert (route_now, plans) == before[1:]
    _valid_request(lc, model_store)
    bound = json.loads((lc.workdir / "plans" / "worker-keys.bound").read_text())  # names stay with their keys
    assert bound["w0"] == load_keys(lc.key_dir("w0")).me.key and bound["w1"] == load_keys(lc.key_dir("w1")).me.key


def test_a_user_naming_a_worker_as_its_result_endpoint_breaks_nothing(keyed, model_store):
    """Errors for that user go to a link of their own (whose handshake fails), never over the custody link."""
    lc, ctl, _ = keyed
    route = ctl.route(MODEL)
    p = Peer(route.hops[0].endpoint, lc.key_dir("user"), route.hops[0].key)
    try:
        for _ in range(200):  # a wrong input shape: each one makes w0 report an error to ``rep``
            assert p.send(P.encode(Msg.RUN, P.new_rid(), 2000, {"mdl": MODEL, "hop": 0, "pln": route.plan,
                                                                "rep": route.hops[1].endpoint}, [torch.zeros(1, 5)]))
        _valid_request(lc, model_store)
    finally:
        p.close()


def test_the_client_takes_results_only_from_the_last_hop(keyed, model_store):
    lc, ctl, rogue = keyed
    x = torch.randn(2, 4)
    with lc.client(keys=str(lc.key_dir("user"))) as user:
        user.route(MODEL)
        fut = user.submit(MODEL, x, timeout_ms=20_000)  # w1 stalls 1 s: the request is in flight
        time.sleep(0.1)
        user_key = load_keys(lc.key_dir("user")).public
        for keys in (_rogue_dir(lc, rogue), lc.key_dir("w0")):  # a listed worker off the route; hop 0's worker
            p = Peer(user.reply_endpoint, keys, user_key)
            try:
                assert p.send(P.encode(Msg.RESULT, fut.info.rid, 1000, {"mdl": MODEL}, [torch.full((2, 4), 7.0)]))
            finally:
                time.sleep(0.05)
                p.close()
        y = fut.result(timeout=20)
        assert torch.allclose(y, model_store["models"][MODEL](x), atol=1e-6)
        assert user.forged == 2


def test_a_flood_of_unreachable_result_endpoints_keeps_files_bounded(keyed, model_store):
    lc, ctl, _ = keyed
    route = ctl.route(MODEL)
    proc = psutil.Process(lc.pid("w0"))
    fds_before = proc.num_fds()
    p = Peer(route.hops[0].endpoint, lc.key_dir("user"), route.hops[0].key)
    try:
        for i in range(300):  # each names another endpoint nobody listens on
            assert p.send(P.encode(Msg.RUN, P.new_rid(), 2000, {
                "mdl": MODEL, "hop": 0, "rep": f"tcp://127.0.0.1:{20000 + i}", "pln": route.plan},
                [torch.zeros(1, 4)]))
        time.sleep(3.0)
    finally:
        p.close()
    assert proc.num_fds() < fds_before + 200, (fds_before, proc.num_fds())
    _valid_request(lc, model_store)


def test_refusing_to_bind_open_beyond_loopback(tmp_path):
    from edgesplit.runtime.coordinator import Coordinator, CoordinatorConfig
    from edgesplit.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="keygen"):
        Coordinator(CoordinatorConfig(bind="tcp://*:0", store=str(tmp_path / "s")))
    keygen("coordinator", tmp_path / "k")
    c = Coordinator(CoordinatorConfig(bind="tcp://*:0", store=str(tmp_path / "s"), keys=str(tmp_path / "k")))
    c.start()
    c.stop()
    c = Coordinator(CoordinatorConfig(bind="tcp://*:0", store=str(tmp_path / "s"), insecure=True))
    c.start()
    c.stop()


def test_the_coordinator_counts_what_it_refused(keyed):
    lc, ctl, _ = keyed
    refused = ctl.coordinator()["refused"]
    assert refused.get("role", 0) >= 9 and refused.get("plan_id", 0) >= 2 and refused["handshakes"] >= 1, refused


def test_a_worker_refuses_to_bind_open_beyond_loopback(tmp_path):
    from edgesplit.runtime.errors import ConfigError
    from edgesplit.runtime.worker import Worker, WorkerConfig

    with pytest.raises(ConfigError, match="--insecure"):
        Worker(WorkerConfig(bind="tcp://0.0.0.0:0", store=str(tmp_path / "ws")))


def test_keygen_command(tmp_path, capsys):
    from edgesplit.runtime.cli import main

    assert main(["keygen", "--role", "operator", "--name", "ops", "--out", str(tmp_path)]) == 0
    assert "ops.key_secret" in capsys.readouterr().out
    assert load_keys(tmp_path).me.role == "operator"
    assert main(["keygen", "--role", "operator", "--name", "ops", "--out", str(tmp_path)]) == 2


def test_key_files(tmp_path):
    from edgesplit.runtime.errors import ConfigError

    pub, sec = keygen("worker", tmp_path, "board1")
    assert oct(sec.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="exists"):
        keygen("worker", tmp_path, "board1")
    with pytest.raises(ConfigError, match="role"):
        keygen("admin", tmp_path, "x")
    ring = load_keys(tmp_path)
    assert ring.me.role == "worker" and ring.me.name == "board1" and ring.peer(ring.me.key).role == "worker"
    with pytest.raises(ConfigError, match="coordinator public key"):
        ring.coordinator_key()
    keygen("user", tmp_path, "app")
    with pytest.raises(ConfigError, match="2 secret keys"):
        load_keys(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_keys(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
