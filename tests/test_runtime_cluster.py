"""Real multi-process tests: a coordinator and 4 worker daemons on 127.0.0.1 (the session ``cluster``).

Split inference over real sockets must equal the unsplit model (atol 1e-5, raw fp32
links), many requests in flight must each come back matched to their own input, and
garbage on a worker's socket must be answered or dropped without harming it.
"""
from __future__ import annotations

import os
import socket
import time

import msgpack
import pytest
import torch
import zmq
from conftest import store_codec

from edgesplit.runtime import protocol as P
from edgesplit.runtime.errors import BadInput, RuntimeFailure, UnknownModel
from edgesplit.runtime.protocol import Err, Msg

ATOL = 1e-5  # raw fp32 links: the same float ops as the unsplit model


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # 2 shared cores; the workers need them


@pytest.fixture(scope="module")
def client(cluster):
    cl = cluster.client(timeout_ms=60_000)
    yield cl
    cl.close()


def _assert_alive(cluster) -> None:
    alive = cluster.alive()
    assert all(alive[n] for n in ("coordinator", "w0", "w1", "w2", "w3")), f"a daemon died: {alive}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch,n_stages,workers", [
    ("vit_tiny_patch16_224", 2, ["w0", "w1"]),
    ("vit_tiny_patch16_224", 3, ["w1", "w2", "w3"]),
    ("vit_tiny_patch16_224", 4, ["w0", "w1", "w2", "w3"]),
    ("resnet18", 2, ["w2", "w3"]),
    ("resnet18", 3, ["w0", "w1", "w2"]),
    ("resnet18", 4, ["w3", "w0"]),  # 4 stages on 2 workers: each hosts two, round robin
])
def test_split_equals_unsplit(cluster, client, model_store, arch, n_stages, workers):
    route = client.deploy(arch, workers=workers, n_stages=n_stages)
    assert [h.worker for h in route.hops] == [workers[i % len(workers)] for i in range(n_stages)]
    assert route.hops[0].start == 0 and route.hops[-1].end == route.n_blocks
    model = model_store["models"][arch]
    g = torch.Generator().manual_seed(n_stages)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 224, 224, generator=g)
        y = client.infer(arch, x)
        with torch.inference_mode():
            ref = model(x)
        assert y.shape == ref.shape
        diff = float((y - ref).abs().max())
        assert diff <= ATOL, f"{arch} in {n_stages} stages differs from the unsplit model by {diff}"
    _assert_alive(cluster)


@pytest.mark.timeout(120)
def test_fifty_in_flight_each_matched_to_its_input(cluster, client, model_store):
    arch = "vit_tiny_patch16_224"
    client.deploy(arch, workers=["w0", "w1", "w2"], n_stages=3)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(50)]
    futures = [client.submit(arch, x) for x in xs]  # all 50 submitted before any is read
    outs = [f.result(timeout=90) for f in futures]
    model = model_store["models"][arch]
    with torch.inference_mode():
        for i, (x, y) in enumerate(zip(xs, outs)):
            diff = float((model(x) - y).abs().max())
            assert diff <= ATOL, f"request {i} got an output that is not its own input's (diff {diff})"
    # the rows are distinct, so a swapped pair could not pass the check above
    assert len({round(float(o[0, 0]), 4) for o in outs}) > 40


@pytest.mark.timeout(60)
def test_dummy_routing_many_stages_and_trace(cluster, client):
    route = client.deploy("dummy6", n_stages=6, workers=["w0", "w1", "w2", "w3"])
    assert len(route.hops) == 6
    xs = [torch.full((2, 4), float(i)) for i in range(30)]
    futures = [client.submit("dummy6", x, trace=True) for x in xs]
    for i, f in enumerate(futures):
        assert torch.equal(f.result(timeout=30), xs[i] + 6)  # every block ran exactly once, in order
    info = futures[0].info
    assert [rec[0] for rec in info.trace] == list(range(6))
    assert [rec[1] for rec in info.trace] == route.workers
    for hop, worker, t_recv, t_start, t_end, t_send, nbytes in info.trace:
        assert t_recv <= t_start <= t_end <= t_send and nbytes == 2 * 4 * 4
    assert info.t_sent <= info.trace[0][2] and info.t_done >= info.trace[-1][5]


@pytest.mark.timeout(60)
def test_explicit_errors(cluster, client):
    client.deploy("dummy3", n_stages=3, workers=["w1", "w2", "w3"])
    with pytest.raises(UnknownModel, match="not in the coordinator's store"):
        client.infer("no_such_model", torch.zeros(1, 4))
    with pytest.raises(BadInput, match=r"expects input \(B, 4\), got \(1, 5\)"):
        client.infer("dummy3", torch.zeros(1, 5))
    with pytest.raises(BadInput, match="float32"):
        client.infer("dummy3", torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(RuntimeFailure, match="names workers"):
        client.deploy("dummy3", stages=[("w9", 0, 3)])
    with pytest.raises(RuntimeFailure, match="must start at block"):
        client.deploy("dummy3", stages=[("w0", 0, 1), ("w1", 2, 3)])
    assert torch.equal(client.infer("dummy3", torch.ones(1, 4)), torch.full((1, 4), 4.0))  # still serving


@pytest.mark.timeout(60)
def test_registry_telemetry_and_no_leaked_kept_entries(cluster, client):
    client.deploy("dummy3", n_stages=3, workers=["w0", "w1", "w2"])
    for f in [client.submit("dummy3", torch.zeros(1, 4)) for _ in range(20)]:
        f.result(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # heartbeats carry the state: wait for one after the traffic, and one after the last ACKs came back
        ws = {w.name: w for w in client.workers()}
        counts = {n: ws[n].stage_stats().get(("dummy3", h), {}).get("n", 0) for h, n in enumerate(["w0", "w1", "w2"])}
        # a worker's heartbeat can leave after its last output and before the next stage's ACK for it: a leak is
        # kept entries that stay, so wait (bounded) for a heartbeat that says none is kept
        settled = all(ws[n].telemetry.get("kept", -1) == 0 for n in counts)
        if (all(c >= 20 for c in counts.values()) and settled) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert {"w0", "w1", "w2", "w3"} <= set(ws)
    for name in ("w0", "w1", "w2"):
        w = ws[name]
        assert w.stage_stats()[("dummy3", ["w0", "w1", "w2"].index(name))]["n"] >= 20
        assert w.telemetry["kept"] == 0, f"{name} still keeps outputs nobody acknowledged"
        assert w.telemetry["mem_total_bytes"] > 0 and w.telemetry["proc_rss_bytes"] > 0
        assert w.cache["bytes_loaded"] > 0 and w.last_seen_s < 3
    assert any(m["name"] == "dummy3" and m["route"] == ["w0", "w1", "w2"] for m in client.models())


def _probe(sock: zmq.Socket, frames: list, timeout_ms: int = 3000) -> P.Message | None:
    sock.send_multipart(frames)
    if sock.poll(timeout_ms):
        return P.decode(sock.recv_multipart())
    return None


@pytest.mark.timeout(90)
def test_garbage_is_refused_and_the_worker_still_serves(cluster, client):
    route = client.deploy("dummy3", n_stages=3, workers=["w3", "w1", "w2"])
    target = route.hops[0].endpoint  # w3: started with --max-frame-bytes 4MiB
    ctx = zmq.Context()
    reply_sock = ctx.socket(zmq.ROUTER)  # where request-level errors (BAD_INPUT) are sent
    reply_port = reply_sock.bind_to_random_port("tcp://127.0.0.1")
    rep = f"tcp://127.0.0.1:{reply_port}"

    def dealer() -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(target)
        return s

    def run_header(**over) -> dict:
        h = {"t": int(Msg.RUN), "rid": os.urandom(16), "bud": 5000, "mdl": "dummy3", "hop": 0, "rep": rep,
             "ten": [[1, [1, 4], 16]]}
        h.update(over)
        return h

    d = dealer()
    rid = os.urandom(16)
    cases = {
        "random bytes": [os.urandom(100)],
        "random frames": [os.urandom(7), os.urandom(3000), os.urandom(5)],
        "wrong version": [b"XXX9" + msgpack.packb(run_header()), bytes(16)],
        "ESP1 peer": [b"ESP1", msgpack.packb(run_header()), bytes(16)],
        "truncated header": [P.VERSION + msgpack.packb(run_header())[:-7], bytes(16)],
        "truncated frame": [P.VERSION + msgpack.packb(run_header(rid=rid)), bytes(9)],
        "missing frame": [P.VERSION + msgpack.packb(run_header())],
        "huge declared size": [P.VERSION + msgpack.packb(run_header(ten=[[1, [1 << 20, 1 << 20], 1 << 42]])),
                               bytes(16)],
        "shape x itemsize mismatch": [P.VERSION + msgpack.packb(run_header(ten=[[1, [1, 4], 17]])), bytes(17)],
        "bad dtype code": [P.VERSION + msgpack.packb(run_header(ten=[[99, [1, 4], 16]])), bytes(16)],
        "unknown header key": [P.VERSION + msgpack.packb(run_header(evil=1)), bytes(16)],
        "ext type": [P.VERSION + msgpack.packb(run_header(mdl=msgpack.ExtType(5, b"x"))), bytes(16)],
        "not a map": [P.VERSION + msgpack.packb([1, 2, 3]), bytes(16)],
        "wrong message type": [P.VERSION + msgpack.packb({"t": int(Msg.PLAN), "rid": bytes(16), "bud": 0})],
        "unhosted stage": [P.VERSION + msgpack.packb(run_header(hop=2)), bytes(16)],
    }
    for what, frames in cases.items():
        reply = _probe(d, frames)
        assert reply is not None, f"{what}: no reply"
        assert reply.type == Msg.ERROR, f"{what}: got {reply.type.name}"
        assert reply.get("err")[0] in (Err.BAD_MESSAGE, Err.NOT_DEPLOYED), f"{what}: {reply.get('err')}"
        if what == "truncated frame":
            assert reply.rid == rid  # the sender can match the refusal to its request
    # wrong shape but a well-formed message: accepted on the link (ACK), refused by the stage (ERROR to rep)
    h = run_header(ten=[[1, [1, 5], 20]])
    reply = _probe(d, [P.VERSION + msgpack.packb(h), bytes(20)])
    assert reply is not None and reply.type == Msg.ACK
    assert reply_sock.poll(3000)
    err = P.decode(reply_sock.recv_multipart()[1:])
    assert err.type == Msg.ERROR and err.get("err")[0] == Err.BAD_INPUT and err.rid == h["rid"]
    # a frame above the worker's 4 MiB cap: libzmq drops the connection, nothing is allocated for it
    big = dealer()
    big.send_multipart([P.VERSION + msgpack.packb(run_header(ten=[[5, [5 << 20], 5 << 20]])), bytes(5 << 20)])
    assert not big.poll(1500), "an oversized frame must be dropped, not answered"
    big.close(0)
    # bytes that are not ZMTP at all, on a raw TCP socket
    host, port = target[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as raw:
        raw.sendall(os.urandom(4096))
    d.close(0)
    reply_sock.close(0)
    ctx.term()
    _assert_alive(cluster)
    for i in range(3):  # and it still serves valid requests, from the client and on a probe
        assert torch.equal(client.infer("dummy3", torch.full((1, 4), float(i))), torch.full((1, 4), i + 3.0))
    ctx2 = zmq.Context()
    d2 = ctx2.socket(zmq.DEALER)
    d2.connect(target)
    pong = _probe(d2, P.encode(Msg.HEARTBEAT, P.new_rid(), 1000))
    assert pong is not None and pong.type == Msg.HEARTBEAT and pong.body["name"] == "w3"
    d2.close(0)
    ctx2.term()
    assert {w.name: w for w in client.workers()}["w3"].state.value == "live"


@pytest.mark.timeout(60)
def test_a_lying_requester_cannot_stop_a_worker(cluster, client):
    """A RUN naming a result endpoint libzmq cannot connect to, or carrying a trace that the worker's own
    record would push over the header cap: each request fails, the worker goes on serving."""
    route = client.deploy("dummy3", n_stages=3, workers=["w3", "w1", "w2"])
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(route.hops[0].endpoint)
    reply_sock = ctx.socket(zmq.ROUTER)
    rep = f"tcp://127.0.0.1:{reply_sock.bind_to_random_port('tcp://127.0.0.1')}"
    for bad_rep in ("tcp://*:5", "tcp://-:5", "ipc://" + "x" * 200):  # pass the decoder, refused by connect()
        for shape in ([1, 4], [1, 5]):  # a valid input (its output goes on) and a wrong one (BAD_INPUT to rep)
            d.send_multipart(P.encode(Msg.RUN, P.new_rid(), 5000, {"mdl": "dummy3", "hop": 0, "rep": bad_rep,
                                                                    "pln": route.plan}, [torch.zeros(*shape)]))
    rid = P.new_rid()
    fields = {"mdl": "dummy3", "hop": 0, "rep": rep, "pln": route.plan, "ten": [[1, [1, 4], 16]]}
    trc = [P.trace_record(0, "x" * 240, 1.0, 2.0, 3.0, 4.0, 5)] * 55
    header = {"t": int(Msg.RUN), "rid": rid, "bud": 5000, **fields, "trc": trc}
    while len(msgpack.packb(header)) < P.HEADER_MAX_BYTES - 24:  # just under the cap: decodes, cannot grow
        trc = [*trc[:-1], P.trace_record(0, trc[-1][1] + "y" * 4, 1.0, 2.0, 3.0, 4.0, 5)]
        header["trc"] = trc
    del fields["ten"]
    d.send_multipart(P.encode(Msg.RUN, rid, 5000, {"mdl": "dummy3", "hop": 0, "rep": rep, "pln": route.plan,
                                                   "trc": trc}, [torch.zeros(1, 4)]))
    assert reply_sock.poll(5000), "the request with the overflowing trace must end in an error"
    err = P.decode(reply_sock.recv_multipart()[1:])
    assert err.rid == rid and err.type == Msg.ERROR and err.get("err")[0] == Err.BAD_MESSAGE
    d.close(0)
    reply_sock.close(0)
    ctx.term()
    _assert_alive(cluster)
    assert torch.equal(client.infer("dummy3", torch.ones(1, 4)), torch.full((1, 4), 4.0))


@pytest.mark.timeout(120)
def test_codec_links_trained_from_the_store_and_weightless(cluster, client, model_store):
    """The per-link codec seam: a stored (here untrained) tokens codec and the fp16 identity codec."""
    from edgesplit.compression import create_codec
    from edgesplit.partitioner import BlockStore, build_blocks

    arch, cut = "vit_tiny_patch16_224", 7
    store = BlockStore(model_store["root"])
    torch.manual_seed(3)
    codec = create_codec("tokens", dim=192)
    manifest = store_codec(store, arch, "cut7", codec)  # one more block in the coordinator's store; workers fetch it
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        h = build_blocks(store, manifest, 0, cut)(x)
        ref_tokens = build_blocks(store, manifest, cut, manifest.n_blocks)(codec(h, None, "fp32"))
        ref_plain = model_store["models"][arch](x)

    client.deploy(arch, stages=[("w0", 0, cut), ("w1", cut, manifest.n_blocks)],
                  links=[{"codec": "cut7", "budget": None, "wire_dtype": "fp32"}])
    y = client.infer(arch, x)
    assert float((y - ref_tokens).abs().max()) <= ATOL  # encoder on w0, decoder on w1, as simulated locally

    client.deploy(arch, stages=[("w0", 0, cut), ("w1", cut, manifest.n_blocks)],
                  links=[{"codec": "identity", "wire_dtype": "fp16"}])
    f = client.submit(arch, x, trace=True)
    y = f.result(timeout=60)
    assert float((y - ref_plain).abs().max()) < 0.05  # fp16 on the cut: close, not equal
    cut_bytes = f.info.trace[0][6]
    assert cut_bytes == 2 * 197 * 192 * 2  # half of the fp32 activation


@pytest.mark.timeout(120)
def test_link_budget_changes_live_without_redeploy(cluster, client, model_store):
    """Client.set_link reaches the sending worker: the next request's frames shrink, the plan stays."""
    from edgesplit.compression import create_codec
    from edgesplit.partitioner import BlockStore, build_blocks
    from edgesplit.runtime.errors import DeployError

    arch, cut = "vit_tiny_patch16_224", 7
    store = BlockStore(model_store["root"])
    torch.manual_seed(5)
    codec = create_codec("tokens", dim=192)
    manifest = store_codec(store, arch, "live", codec)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        h = build_blocks(store, manifest, 0, cut)(x)
        tail = build_blocks(store, manifest, cut, manifest.n_blocks)

    def expected(budget, wire_dtype):
        with torch.inference_mode():
            header, frames = codec.encode(h, budget=budget, wire_dtype=wire_dtype)
            return sum(P.to_wire(f)[0].nbytes for f in frames), tail(codec.decode(header, frames))

    def sent(**submit):
        f = client.submit(arch, x, trace=True, **submit)
        y = f.result(timeout=60)
        return f.info.trace[0][6], y

    route = client.deploy(arch, stages=[("w0", 0, cut), ("w1", cut, manifest.n_blocks)],
                          links=[{"codec": "live", "budget": None, "wire_dtype": "fp32"}])
    full_bytes, y = sent()
    assert full_bytes == expected(None, "fp32")[0] == 197 * 192 * 4

    now = client.set_link(arch, 0, budget=8, wire_dtype="int8")
    assert now["budget"] == 8 and now["wire_dtype"] == "int8" and now["codec"] == "live"
    nbytes, y = sent()
    want_bytes, want_y = expected(8, "int8")
    assert nbytes == want_bytes and nbytes * 20 < full_bytes, (nbytes, full_bytes)
    assert float((y - want_y).abs().max()) < 1e-3  # int8 of 8 kept channels, decoded on w1 as simulated here

    # the budget follows an allocated rate: 1 B/s fits nothing, so the smallest budget goes (late beats never)
    client.set_link(arch, 0, budget=None, rate=1.0)
    assert sent()[0] == expected(min(codec.budgets), "int8")[0]
    from edgesplit.runtime import cli  # the operator's way: `edgesplit link`
    assert cli.main(["link", "--coordinator", cluster.endpoint, "--model", arch, "--cut", "0", "--rate", "off",
                     "--budget", "full", "--wire-dtype", "fp16"]) == 0  # back to full width
    assert sent()[0] == 197 * 192 * 2
    assert client.route(arch, refresh=True).plan == route.plan  # nothing was redeployed

    with pytest.raises(BadInput, match="budgets"):
        client.set_link(arch, 0, budget=5)
    with pytest.raises(BadInput, match="cannot change live"):
        client.set_link(arch, 0, codec="identity")
    with pytest.raises(DeployError, match="no cut 1"):
        client.set_link(arch, 1, budget=8)
    client.deploy(arch, stages=[("w0", 0, cut), ("w1", cut, manifest.n_blocks)])  # raw link
    with pytest.raises(BadInput, match="raw"):
        client.set_link(arch, 0, budget=8)
    assert sent()[0] == 197 * 192 * 4
    _assert_alive(cluster)
