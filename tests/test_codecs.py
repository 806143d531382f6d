"""Codecs, wire format, budget policy and codec storage (compression module).

Everything here is pure or loopback: no training. The socket test counts the bytes that
really cross a TCP connection between two ZeroMQ sockets.
"""
from __future__ import annotations

import json
import math
import selectors
import socket
import threading

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesplit.compression import (
    CodecError,
    WireFormatError,
    budget_penalty,
    choose_budget,
    create_codec,
    decode_activation,
    encode_activation,
    kept_channels,
    list_codecs,
    load_codec,
    plan_transfer,
    reset_deprune,
    save_codec,
    split_time_share,
)
from edgesplit.compression import wire
from edgesplit.partitioner import BlockHashMismatch, BlockStore

torch.set_num_threads(1)
DTYPES = ("fp32", "fp16", "int8")


def _fmap(r: int = 1, channels: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return create_codec("fmap", channels=channels, r=r)


# --- registry ------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_registry_lists_and_rejects_unknown():
    assert list_codecs() == ["fmap", "identity", "tokens"]
    assert list_codecs("t*") == ["tokens"]
    with pytest.raises(CodecError, match="unknown codec 'nope'"):
        create_codec("nope")
    with pytest.raises(CodecError, match="bad arguments for codec 'fmap'"):
        create_codec("fmap", chanels=8)
    assert not create_codec("tokens", dim=8).training  # ready for inference


# --- round trips -----------------------------------------------------------------------------------
@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fmap-r1", "fmap-r2", "tokens"])
@pytest.mark.parametrize("budget", [None, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_equals_simulated_link(kind, budget, dtype):
    torch.manual_seed(1)
    if kind == "tokens":
        codec, x = create_codec("tokens", dim=32), torch.randn(3, 9, 32)
    else:
        codec, x = _fmap(r=int(kind[-1])), torch.rand(3, 32, 5, 7)
    header, frames = codec.encode(x, budget=budget, wire_dtype=dtype)
    # what travels: msgpack-able header, only the kept channels in the frames
    header = msgpack.unpackb(msgpack.packb(header))
    shape = header["shape"]
    k = shape[codec.axis] if budget is None else budget
    assert header["kept"] is None if budget is None else len(header["kept"]) == budget
    assert [f.nbytes for f in frames] == wire.parse_header(header).frame_nbytes()
    assert sum(f.nbytes for f in frames) == wire.payload_nbytes(shape, codec.axis, k, dtype)
    assert wire.message_nbytes(header, frames) == codec.wire_nbytes(x.shape, budget, dtype)
    out = codec.decode(header, [bytes(f) for f in frames])
    assert out.shape == x.shape
    assert torch.equal(out, codec(x, budget, dtype))  # bit for bit the simulated link


@pytest.mark.timeout(10)
def test_fmap_r2_halves_spatial_size_on_the_wire():
    codec = _fmap(r=2)
    header, frames = codec.encode(torch.rand(2, 32, 4, 4), budget=8, wire_dtype="fp16")
    assert header["shape"] == [2, 32, 3, 3] and header["meta"] == {"out_hw": [4, 4]}
    assert frames[0].nbytes == 2 * 8 * 3 * 3 * 2


@pytest.mark.timeout(10)
def test_quantisation_error_is_bounded():
    torch.manual_seed(2)
    x = torch.randn(4, 6, 5) * torch.arange(1, 7).reshape(1, 6, 1)  # channel scales differ
    ident = create_codec("identity", axis=1)
    exact = ident.decode(*ident.encode(x, wire_dtype="fp32"))
    assert torch.equal(exact, x)
    half = ident.decode(*ident.encode(x, wire_dtype="fp16"))
    assert torch.allclose(half, x, rtol=1e-3, atol=1e-4)
    q = ident.decode(*ident.encode(x, wire_dtype="int8"))
    step = x.abs().amax(dim=(0, 2), keepdim=True) / 127  # one scale per channel
    assert bool(((q - x).abs() <= step / 2 + 1e-6).all())


@pytest.mark.timeout(10)
def test_identity_codec_any_tensor_and_its_limits():
    ident = create_codec("identity")
    for x in (torch.randn(7), torch.randn(2, 3, 2, 2, 2)):
        for dt in DTYPES:
            h, f = encode_activation(ident, x, wire_dtype=dt)
            assert decode_activation(ident, h, f).shape == x.shape
    with pytest.raises(CodecError, match="no channel filter"):
        ident.encode(torch.randn(2, 3), budget=4)
    h, f = ident.encode(torch.randn(2, 3))
    with pytest.raises(WireFormatError, match="every channel"):
        ident.decode({**h, "kept": [0]}, f)
    with pytest.raises(WireFormatError, match="list of byte buffers"):
        ident.decode(h, None)
    with pytest.raises(CodecError, match="float tensors"):
        ident.encode(torch.arange(6))
    with pytest.raises(CodecError, match="overflows fp16"):
        ident.encode(torch.full((2, 2), 1e6), wire_dtype="fp16")
    with pytest.raises(CodecError, match="NaN or inf"):
        ident.encode(torch.tensor([1.0, float("nan")]))


# --- budgets and the filter ----------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_budgets_are_nested_and_exact():
    codec = _fmap(channels=64)
    assert codec.budgets == (4, 8, 16, 32)
    with torch.no_grad():
        codec.filter_logits.copy_(torch.linspace(-3, 3, 64).flip(0))
        codec.filter_logits[10] = codec.filter_logits[11]  # a tie: the lower index wins
    kept = {b: set(kept_channels(codec.filter_logits, b).tolist()) for b in (4, 8, 16, 32, 64)}
    assert kept[4] == {0, 1, 2, 3}
    for b in (4, 8, 16, 32):
        assert len(kept[b]) == b and kept[b] <= kept[2 * b]
    assert 10 in kept[16] and 11 in kept[16] and 10 in set(kept_channels(codec.filter_logits, 11).tolist())
    kept4, mask = codec.mask(4)
    w = torch.sigmoid(codec.filter_logits.detach()) ** 2
    assert torch.equal(mask[kept4], w[kept4]) and int((mask != 0).sum()) == 4  # mask value is w, as VCCprune
    for bad in (0, 5, 64, 65, 2.5, True):
        with pytest.raises(CodecError, match="budget must be one of"):
            codec.mask(bad)
    with pytest.raises(CodecError, match="budget must be an int"):
        kept_channels(codec.filter_logits, 65)


@pytest.mark.timeout(10)
def test_penalty_and_reset_follow_the_reference():
    p = torch.zeros(8, requires_grad=True)  # sigmoid(0)^2 = 0.25 each, total 2
    pen = budget_penalty(p, budget=2.0, eps=1000, delta=0.01)
    assert float(pen.detach()) == pytest.approx(2000.0)  # 2 eps cosh(0)
    pen2 = budget_penalty(p, budget=1.0)
    assert float(pen2.detach()) == pytest.approx(2000 * math.cosh(0.01))
    pen2.backward()
    assert bool((p.grad > 0).all())  # over budget: pushes every p down
    q = torch.tensor([-1.0, 0.5, 0.9, 3.0, 14.0])
    reset_deprune(q, generator=torch.Generator().manual_seed(0))
    assert q[2:].tolist() == [15.0, 15.0, 15.0]
    assert bool(((q[:2] >= 0) & (q[:2] < 3)).all())


# --- the wire on a real socket ---------------------------------------------------------------------------
class _CountingProxy(threading.Thread):
    """Forwards one TCP connection and counts the bytes sent from the client side."""

    def __init__(self, target_port: int) -> None:
        super().__init__(daemon=True)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn, _ = self.listener.accept()
        up = socket.create_connection(("127.0.0.1", self.target_port))
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, up)
        sel.register(up, selectors.EVENT_READ, conn)
        while not self.stop.is_set():
            for key, _ in sel.select(timeout=0.05):
                data = key.fileobj.recv(1 << 16)
                if not data:
                    return
                if key.fileobj is conn:
                    self.upstream_bytes += len(data)
                key.data.sendall(data)


def _zmtp_bytes(frame_lengths: list[int]) -> int:
    """ZMTP 3 framing: 1 flag byte + 1 size byte (<= 255) or 8 size bytes, per frame."""
    return sum(n + (2 if n <= 255 else 9) for n in frame_lengths)


@pytest.mark.timeout(20)
def test_bytes_on_the_socket_match_the_header_accounting():
    zmq = pytest.importorskip("zmq")
    codec = _fmap(channels=64)
    x = torch.rand(4, 64, 4, 4)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    proxy = _CountingProxy(port)
    proxy.start()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(f"tcp://127.0.0.1:{proxy.port}")
    pull.rcvtimeo = push.sndtimeo = 5000
    try:
        push.send(b"hello")  # handshake first, so only message bytes are counted below
        assert pull.recv() == b"hello"
        seen = {}
        for budget in (None, 32, 8, 4):
            for dt in DTYPES:
                header, frames = codec.encode(x, budget, dt)
                hbytes = msgpack.packb(header)
                before = proxy.upstream_bytes
                push.send_multipart([hbytes, *frames], copy=False)
                got = pull.recv_multipart(copy=False)
                on_socket = proxy.upstream_bytes - before
                accounted = wire.message_nbytes(header, frames)
                lengths = [len(hbytes), *(f.nbytes for f in frames)]
                assert on_socket == _zmtp_bytes(lengths)
                assert on_socket - (_zmtp_bytes(lengths) - sum(lengths)) == accounted  # only framing on top
                assert sum(len(f.buffer) for f in got) == accounted
                assert accounted == codec.wire_nbytes(x.shape, budget, dt)
                out = codec.decode(msgpack.unpackb(got[0].bytes), got[1:])  # zmq frames, no copies made
                assert torch.equal(out, codec(x, budget, dt))
                seen[(budget, dt)] = on_socket / x.shape[0]
        # fewer channels, fewer bytes: b=4 int8 is far below full fp32 on the socket
        assert seen[(4, "int8")] * 40 < seen[(None, "fp32")]
        assert seen[(None, "fp32")] > seen[(32, "fp32")] > seen[(8, "fp32")] > seen[(4, "fp32")]
    finally:
        proxy.stop.set()
        push.close()
        pull.close()
        ctx.term()
        proxy.join(timeout=2)


# --- untrusted input --------------------------------------------------------------------------------------
def _good(budget=8, dtype="int8"):
    codec = _fmap(channels=32)
    header, frames = codec.encode(torch.rand(2, 32, 4, 4), budget, dtype)
    return codec, msgpack.unpackb(msgpack.packb(header)), [bytes(f) for f in frames]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mutate, match", [
    (lambda h, f: h.update(extra=1), "unknown"),
    (lambda h, f: h.pop("meta"), "missing"),
    (lambda h, f: h.update(v=2), "version"),
    (lambda h, f: h.update(v=True), "version"),
    (lambda h, f: h.update(dtype="fp64"), "not allowed"),
    (lambda h, f: h.update(codec="tokens"), "encoded by codec 'tokens'"),
    (lambda h, f: h.update(shape=[2, 32, 4]), "expects a 4-d tensor"),
    (lambda h, f: h.update(shape=[2, 32, 4, -4]), "shape must be"),
    (lambda h, f: h.update(shape=[2, 32, 4, True]), "shape must be"),
    (lambda h, f: h.update(shape=[1 << 20, 32, 1 << 12, 4]), "more than the limit"),
    (lambda h, f: h.update(axis=4), "channel axis"),
    (lambda h, f: h.update(kept=[5, 3, 7, 8, 9, 10, 11, 12]), "strictly increasing"),
    (lambda h, f: h.update(kept=[1, 1, 2, 3, 4, 5, 6, 7]), "strictly increasing"),
    (lambda h, f: h.update(kept=[1, 2, 3, 4, 5, 6, 7, 32]), "strictly increasing"),
    (lambda h, f: h.update(kept=[]), "kept must be"),
    (lambda h, f: h.update(kept=[0, 1, 2, 3, 4, 5, 6, 2 ** 70]), "strictly increasing"),
    (lambda h, f: h.update(kept=list(range(7))), "serves budgets"),
    (lambda h, f: h.update(kept=list(range(4))), "frame lengths"),
    (lambda h, f: h.update(meta={"out_hw": [9, 9]}), "out_hw"),
    (lambda h, f: f.pop(), "frame"),
    (lambda h, f: f.__setitem__(0, f[0][:-1]), "frame lengths"),
    (lambda h, f: f.__setitem__(1, np.full(8, np.nan, dtype="<f4").tobytes()), "scales"),
    (lambda h, f: f.__setitem__(1, np.zeros(8, dtype="<f4").tobytes()), "scales"),
    (lambda h, f: f.__setitem__(0, 123), "bytes-like"),
])
def test_malformed_input_gives_a_clear_error(mutate, match):
    codec, header, frames = _good()
    mutate(header, frames)
    with pytest.raises(WireFormatError, match=match):
        codec.decode(header, frames)


@pytest.mark.timeout(10)
def test_nan_values_are_refused():
    codec, header, frames = _good(dtype="fp16")
    bad = bytearray(frames[0])
    bad[0:2] = np.array([np.nan], dtype="<f2").tobytes()
    with pytest.raises(WireFormatError, match="NaN"):
        codec.decode(header, [bytes(bad)])


_json = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


@pytest.mark.timeout(40)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(wire.HEADER_KEYS)), value=_json, cut=st.integers(0, 64), drop=st.booleans())
def test_fuzzed_headers_decode_or_raise_wire_errors(key, value, cut, drop):
    codec, header, frames = _good(budget=4)
    header[key] = value
    if drop:
        frames[0] = frames[0][cut:]
    try:
        out = codec.decode(header, frames)
    except WireFormatError:
        return
    assert out.shape == (2, 32, 4, 4)


# --- policy -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_choose_budget_picks_the_largest_that_fits():
    sizes = {None: 16000, 64: 4000, 32: 2000, 16: 1000, 8: 500, 4: 250}
    budgets = list(sizes)
    assert choose_budget(1e6, 1.0, budgets, sizes) is None  # plenty of time: full width
    assert choose_budget(1000, 2.0, budgets, sizes) == 32  # 2000 B allowed
    assert choose_budget(1000, 1.999, budgets, sizes) == 16
    assert choose_budget(1000, 0.3, budgets, sizes) == 4  # 300 B: only b=4 fits
    late = plan_transfer(1000, 0.1, budgets, sizes)  # nothing fits: cheapest, flagged
    assert (late.budget, late.fits, late.nbytes) == (4, False, 250)
    assert choose_budget(1000, 2.0, budgets, sizes.__getitem__, headroom=0.5) == 16
    assert choose_budget(float("inf"), 1.0, [4, 8], {4: 1, 8: 2}) == 8
    assert choose_budget(100, 0.0, [4, 8], {4: 1, 8: 2}) == 4
    for bad in ({"rate_bytes_per_s": -1}, {"time_share_s": float("nan")}):
        args = {"rate_bytes_per_s": 1.0, "time_share_s": 1.0, **bad}
        with pytest.raises(CodecError):
            choose_budget(args["rate_bytes_per_s"], args["time_share_s"], budgets, sizes)
    with pytest.raises(CodecError, match="no entry for budget 2"):
        choose_budget(1, 1, [2], sizes)
    with pytest.raises(CodecError, match="no candidate"):
        choose_budget(1, 1, [], sizes)


@pytest.mark.timeout(10)
def test_policy_with_a_codec_and_time_shares():
    codec = _fmap(channels=64)
    sizes = codec.bytes_per_budget((1, 64, 4, 4), "fp16")
    assert set(sizes) == {None, 4, 8, 16, 32}
    assert sizes[None] > sizes[32] > sizes[16] > sizes[8] > sizes[4]
    # a link that slows down picks smaller budgets on the next transfer, same codec
    rates = [sizes[b] / 0.01 for b in (None, 32, 8, 4)] + [(sizes[32] - 1) / 0.01, 1.0]
    picks = [choose_budget(rate, 0.01, list(sizes), sizes) for rate in rates]
    assert picks == [None, 32, 8, 4, 16, 4]
    assert split_time_share(1.0, 0.4, [300, 100, 200]) == pytest.approx([0.3, 0.1, 0.2])
    assert split_time_share(0.2, 0.4, [1, 1]) == [0.0, 0.0]


# --- storage -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_save_and_load_codec_through_the_block_store(tmp_path):
    store = BlockStore(tmp_path / "store")
    torch.manual_seed(3)
    codec = create_codec("tokens", dim=16)
    codec.train()(torch.randn(4, 5, 16))  # move BN statistics off their defaults
    codec.eval()
    desc = save_codec(store, codec)
    assert json.loads(json.dumps(desc)) == desc
    assert desc["kind"] == "tokens" and desc["budgets"] == [4, 8] and store.has(desc["block"])
    loaded = load_codec(store, desc)
    x = torch.randn(2, 5, 16)
    for b in (None, 4, 8):
        h, f = codec.encode(x, b, "int8")
        assert torch.equal(loaded.decode(h, f), codec.decode(h, f))
        assert torch.equal(loaded(x, b, "fp16"), codec(x, b, "fp16"))
    assert save_codec(store, loaded)["block"] == desc["block"]  # same tensors, same id
    with pytest.raises(CodecError, match="does not fit"):
        load_codec(store, {**desc, "kwargs": {**desc["kwargs"], "dim": 8}})
    with pytest.raises(CodecError, match="not a codec description"):
        load_codec(store, {"kind": "tokens"})
    path = store.path(desc["block"])
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(BlockHashMismatch):
        load_codec(store, desc)


@pytest.mark.timeout(10)
def test_budget_norm_keeps_statistics_per_budget():
    from edgesplit.compression.budget_norm import BudgetNorm

    torch.manual_seed(4)
    norm, plain = BudgetNorm(6, (4, 8), warmup=False), torch.nn.BatchNorm1d(6)
    a, b = torch.randn(32, 6) * 3 + 1, torch.randn(32, 6) * 0.1
    assert torch.allclose(norm(a, None), plain(a), atol=1e-6)  # one budget, no warm-up: plain batch norm
    assert torch.allclose(norm.running_mean[0], plain.running_mean) and torch.allclose(norm.running_var[0], plain.running_var)
    norm(b, 4)
    assert torch.allclose(norm.running_mean[0], plain.running_mean)  # full-width statistics untouched
    assert not torch.allclose(norm.running_mean[1], norm.running_mean[0])
    assert torch.equal(norm.running_mean[2], torch.zeros(6))  # budget 8 never seen
    norm.eval()
    plain.eval()
    assert torch.allclose(norm(a, None), plain(a), atol=1e-6)
    with pytest.raises(ValueError):
        norm(a, 16)


@pytest.mark.timeout(10)
def test_budget_norm_statistics_warm_up_per_row():
    """A row's first batches set its statistics as a cumulative average, then it averages exponentially."""
    from edgesplit.compression.budget_norm import BudgetNorm

    torch.manual_seed(5)
    norm = BudgetNorm(3, (4,), momentum=0.1)
    small = [torch.randn(64, 3) * 1e-2 + 5 for _ in range(3)]
    for x in small:
        norm(x, 4)
    mean = torch.stack([x.mean(0) for x in small]).mean(0)
    assert torch.allclose(norm.running_mean[1], mean, atol=1e-5)  # not 0.27 x mean, as a cold EMA gives
    assert float(norm.running_var[1].max()) < 1e-3  # not ~0.73 left over from the initial 1
    assert norm.batches_seen.tolist() == [0, 3]
    assert torch.equal(norm.running_mean[0], torch.zeros(3))  # other rows untouched
    before = norm.running_mean[1].clone()
    for _ in range(20):  # a cumulative average up to 1/momentum = 10 batches, then exponential averaging
        norm(torch.full((8, 3), 7.0) + torch.randn(8, 3) * 1e-3, 4)
    after_ten = (3 * before + 7 * 7.0) / 10
    assert torch.allclose(norm.running_mean[1], 7 + (after_ten - 7) * 0.9 ** 13, atol=1e-3)
    # state dicts from before the warm-up buffer load; rows at their initial values count as unseen
    old = {k: v for k, v in norm.state_dict().items() if k != "batches_seen"}
    back = BudgetNorm(3, (4,))
    back.load_state_dict(old)
    assert back.batches_seen[0] == 0 and back.batches_seen[1] > 1000
