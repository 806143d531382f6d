"""The wire format: round trips, zero-copy frames, and a decoder that only ever raises ProtocolError."""
from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesplit.runtime import protocol as P
from edgesplit.runtime.errors import BadInput, ProtocolError, RequestTimeout, RuntimeFailure, WorkerLost
from edgesplit.runtime.protocol import Err, Msg


def _run(payload=(), **fields):
    base = {"mdl": "m", "hop": 0, "rep": "tcp://127.0.0.1:5000"}
    base.update(fields)
    return P.encode(Msg.RUN, P.new_rid(), 1000, base, payload)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
                                   torch.int16, torch.int32, torch.int64, torch.float64, torch.bool])
def test_round_trip_every_dtype(dtype):
    x = (torch.randn(2, 3, 5) * 10).to(dtype)
    msg = P.decode(_run([x, x[:1]]))
    assert msg.type == Msg.RUN and msg.get("mdl") == "m" and msg.budget_ms == 1000
    ys = msg.tensors()
    assert ys[0].dtype == dtype and torch.equal(ys[0], x) and torch.equal(ys[1], x[:1])


@pytest.mark.timeout(30)
def test_empty_and_blob_payloads():
    msg = P.decode(P.encode(Msg.CHUNK, P.new_rid(), 0, {"body": {"id": "a"}}, [torch.zeros(0, 4), b"abc"]))
    assert msg.tensor(0).shape == (0, 4)
    assert bytes(msg.blob(1)) == b"abc"


@pytest.mark.timeout(30)
def test_send_side_shares_the_tensor_memory():
    x = torch.randn(256, 1024)
    frames = _run([x])
    assert len(frames) == 2 and frames[0].startswith(P.VERSION)  # the version prefixes the header: one frame less
    assert frames[1].ctypes.data == x.data_ptr()  # contiguous CPU tensors go out without a copy


@pytest.mark.timeout(30)
def test_receive_side_borrows_the_frame_memory():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://zc")
    b.connect("inproc://zc")
    x = torch.randn(512, 512)  # 1 MiB: above the zero-copy threshold
    a.send_multipart(_run([x]), copy=False)
    frames = b.recv_multipart(copy=False)
    msg = P.decode(frames)
    y = msg.tensor(0)
    assert torch.equal(x, y)
    assert y.data_ptr() == np.frombuffer(frames[1].buffer, np.uint8).ctypes.data  # a view, not a copy
    a.close(0)
    b.close(0)
    ctx.term()


def _hdr(**over):
    h = {"t": int(Msg.RUN), "rid": bytes(16), "bud": 10, "mdl": "m", "hop": 0, "rep": "tcp://h:1",
         "ten": [[1, [2, 2], 16]]}
    h.update(over)
    return h


BAD = {
    "no frames": [],
    "version alone": [P.VERSION],
    "wrong version": [b"ESP0" + msgpack.packb(_hdr()), bytes(16)],
    "no version": [msgpack.packb(_hdr()), bytes(16)],
    "ESP1 peer": [b"ESP1", msgpack.packb(_hdr()), bytes(16)],
    "header not msgpack": [P.VERSION + b"\xc1\xc1\xc1", bytes(16)],
    "header too large": [P.VERSION + b"\x00" * (P.HEADER_MAX_BYTES + 1), bytes(16)],
    "trailing bytes": [P.VERSION + msgpack.packb(_hdr()) + b"\x00", bytes(16)],
    "not a map": [P.VERSION + msgpack.packb([1]), bytes(16)],
    "missing rid": [P.VERSION + msgpack.packb({k: v for k, v in _hdr().items() if k != "rid"}), bytes(16)],
    "short rid": [P.VERSION + msgpack.packb(_hdr(rid=b"x")), bytes(16)],
    "negative budget": [P.VERSION + msgpack.packb(_hdr(bud=-1)), bytes(16)],
    "unknown type": [P.VERSION + msgpack.packb(_hdr(t=200)), bytes(16)],
    "bool as int": [P.VERSION + msgpack.packb(_hdr(hop=True)), bytes(16)],
    "unknown key": [P.VERSION + msgpack.packb(_hdr(zz=1)), bytes(16)],
    "RUN without rep": [P.VERSION + msgpack.packb({k: v for k, v in _hdr().items() if k != "rep"}), bytes(16)],
    "bad endpoint": [P.VERSION + msgpack.packb(_hdr(rep="http://x")), bytes(16)],
    "bad model name": [P.VERSION + msgpack.packb(_hdr(mdl="../etc")), bytes(16)],
    "bad dtype": [P.VERSION + msgpack.packb(_hdr(ten=[[0, [2, 2], 16]])), bytes(16)],
    "too many dims": [P.VERSION + msgpack.packb(_hdr(ten=[[5, [1] * 9, 1]])), bytes(1)],
    "negative dim": [P.VERSION + msgpack.packb(_hdr(ten=[[1, [-2, -2], 16]])), bytes(16)],
    "nbytes mismatch": [P.VERSION + msgpack.packb(_hdr(ten=[[1, [2, 2], 15]])), bytes(15)],
    "frame shorter": [P.VERSION + msgpack.packb(_hdr()), bytes(15)],
    "frame count": [P.VERSION + msgpack.packb(_hdr()), bytes(16), bytes(16)],
    "huge declared": [P.VERSION + msgpack.packb(_hdr(ten=[[1, [1 << 30, 1 << 30], 1 << 62]])), bytes(16)],
    "empty but huge": [P.VERSION + msgpack.packb(_hdr(ten=[[1, [0, 1 << 27, 1 << 27, 1 << 27], 0]]))],
    "ext type": [P.VERSION + msgpack.packb(_hdr(mdl=msgpack.ExtType(1, b"x"))), bytes(16)],
    "timestamp ext": [P.VERSION + msgpack.packb(_hdr(cmeta={"t": msgpack.Timestamp(1)})), bytes(16)],
    "int map key": [P.VERSION + msgpack.packb({1: 2}), bytes(16)],
    "err not a pair": [P.VERSION + msgpack.packb({"t": int(Msg.ERROR), "rid": bytes(16), "bud": 0, "err": [1]})],
    "too many frames": [P.VERSION + msgpack.packb(_hdr())] + [b""] * (P.MAX_PAYLOAD_FRAMES + 1),
    "deep nesting": [P.VERSION + b"\x91" * 100 + b"\xc0", bytes(16)],
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_messages_raise_protocol_error(case):
    with pytest.raises(ProtocolError):
        P.decode(BAD[case])


@pytest.mark.timeout(30)
def test_an_esp1_peer_is_told_to_upgrade():
    with pytest.raises(ProtocolError, match="protocol ESP1 peer; upgrade it"):
        P.decode([b"ESP1", msgpack.packb(_hdr()), bytes(16)])
    with pytest.raises(ProtocolError, match="expected b'ESP3'"):
        P.decode([b"ESP0" + msgpack.packb(_hdr()), bytes(16)])


@pytest.mark.timeout(30)
def test_header_cap_counts_the_msgpack_part_only():
    body = {f"k{i}": "a" * 3200 for i in range(5)}
    pad = P.HEADER_MAX_BYTES - len(P.encode(Msg.HELLO, bytes(16), 0, {"body": body})[0]) + len(P.VERSION)
    body["k0"] += "a" * pad  # k0 stays within the decoder's 4096-character string limit
    frames = P.encode(Msg.HELLO, bytes(16), 0, {"body": body})
    assert len(frames[0]) == len(P.VERSION) + P.HEADER_MAX_BYTES
    assert P.decode(frames).body == body
    body["k0"] += "a"
    with pytest.raises(ProtocolError, match="header is"):
        P.encode(Msg.HELLO, bytes(16), 0, {"body": body})
    with pytest.raises(ProtocolError, match="header is"):
        P.decode([frames[0] + b"\xc0"])


@pytest.mark.timeout(30)
def test_frame_cap_is_enforced_from_the_header():
    frames = _run([torch.zeros(100, 100)])
    with pytest.raises(ProtocolError, match="frame cap"):
        P.decode(frames, max_frame_bytes=1000)


@pytest.mark.timeout(30)
def test_encoder_refuses_oversized_header_and_unknown_dtype():
    with pytest.raises(ProtocolError, match="header is"):
        P.encode(Msg.HELLO, P.new_rid(), 0, {"body": {"x": "a" * (P.HEADER_MAX_BYTES + 10)}})
    with pytest.raises(ProtocolError, match="cannot go on the wire"):
        P.encode(Msg.RESULT, P.new_rid(), 0, {"mdl": "m"}, [torch.zeros(2, dtype=torch.complex64)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=20))
@pytest.mark.timeout(60)
def test_random_frames_only_ever_raise_protocol_error(frames):
    try:
        P.decode(frames)
    except ProtocolError:
        pass


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(P.HEADER_KEYS) + ["zz"]), _msgpack_values, max_size=10),
       st.lists(st.binary(max_size=64), max_size=3))
@pytest.mark.timeout(60)
def test_structured_garbage_headers_only_raise_protocol_error(header, payload):
    try:
        P.decode([P.VERSION + msgpack.packb(header), *payload])
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
@pytest.mark.timeout(60)
def test_mutated_valid_messages_only_raise_protocol_error(data):
    frames = [bytes(f) if not isinstance(f, np.ndarray) else f.tobytes() for f in _run([torch.ones(2, 3)])]
    i = data.draw(st.integers(0, len(frames) - 1))
    raw = bytearray(frames[i])
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    frames[i] = bytes(raw[: data.draw(st.integers(0, len(raw)))])
    try:
        msg = P.decode(frames)
        msg.tensors()
    except ProtocolError:
        pass


@pytest.mark.timeout(30)
def test_error_codes_map_to_exception_types():
    assert isinstance(P.error_from_wire(Err.WORKER_LOST, "x"), WorkerLost)
    assert isinstance(P.error_from_wire(Err.TIMEOUT, "x"), RequestTimeout)
    assert isinstance(P.error_from_wire(Err.BAD_INPUT, "x"), BadInput)
    unknown = P.error_from_wire(999, "x")
    assert type(unknown) is RuntimeFailure and "UNKNOWN_ERROR_999" in str(unknown)
    assert P.error_code(WorkerLost("x")) == Err.WORKER_LOST
    assert P.msg_name(Msg.RUN) == "RUN" and P.msg_name(77) == "UNKNOWN_TYPE_77"
    assert set(P.ERR_NAMES.values()) == {e.name for e in Err}


@pytest.mark.timeout(30)
def test_error_message_round_trip_and_salvaged_fields():
    rid = os.urandom(16)
    msg = P.decode(P.encode_error(rid, Err.BAD_INPUT, "x" * 5000, hop=3))
    code, reason = msg.get("err")
    assert msg.rid == rid and code == Err.BAD_INPUT and len(reason) <= 1024 and msg.get("hop") == 3


@pytest.mark.timeout(30)
def test_salvage_rid_reads_a_refused_messages_header_or_gives_zeros():
    rid = P.new_rid()
    assert P.salvage_rid([P.VERSION + msgpack.packb(_hdr(rid=rid)), bytes(9)]) == rid  # frame too short, rid fine
    for frames in ([], [b"ESP1", msgpack.packb(_hdr(rid=rid)), bytes(16)], [P.VERSION + b"\xc1"],
                   [P.VERSION + msgpack.packb(_hdr(rid=b"x"))], [P.VERSION + b"\x00" * (P.HEADER_MAX_BYTES + 1)]):
        assert P.salvage_rid(frames) == bytes(P.RID_BYTES)


@pytest.mark.timeout(30)
def test_blobs_are_bounded():
    assert P.unpack_blob(P.pack_blob([{"a": 1}])) == [{"a": 1}]
    with pytest.raises(ProtocolError):
        P.unpack_blob(b"\xdd\xff\xff\xff\xff")  # an array declaring 4 G elements
    with pytest.raises(ProtocolError):
        P.unpack_blob(msgpack.packb(msgpack.ExtType(3, b"")))


@pytest.mark.timeout(30)
def test_body_get_checks_types():
    assert P.body_get({"a": 1}, "a", int) == 1
    assert P.body_get({}, "a", int, 5) == 5
    with pytest.raises(ProtocolError):
        P.body_get({"a": "1"}, "a", int)
    with pytest.raises(ProtocolError):
        P.body_get({"a": True}, "a", int)
    with pytest.raises(ProtocolError):
        P.body_get({}, "a", int)


# --- batched ACKs -------------------------------------------------------------------------------
def _ack_hdr(**over):
    h = {"t": int(Msg.ACK), "rid": bytes(16), "bud": 0, "hop": 1, "acks": [[b"\x01" * 16, 2]]}
    h.update(over)
    return h


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n", [1, 2, P.MAX_ACKS, P.MAX_ACKS + 1, 3 * P.MAX_ACKS + 5])
def test_batched_acks_round_trip_in_order(n):
    pairs = [(P.new_rid(), i % (P.MAX_HOPS + 1)) for i in range(n)]
    messages = P.encode_acks(pairs)
    assert len(messages) == -(-n // P.MAX_ACKS)
    got = []
    for frames in messages:
        assert len(frames) == 1 and len(frames[0]) <= len(P.VERSION) + P.HEADER_MAX_BYTES
        msg = P.decode(frames)
        assert msg.type == Msg.ACK and (msg.rid, msg.get("hop")) == pairs[len(got)]  # first pair: a plain ACK's keys
        got += msg.acked()
    assert got == pairs and all(type(p) is tuple for p in got)


@pytest.mark.timeout(30)
def test_acks_carry_how_long_the_receiver_held_each_pair():
    """``held`` lets the sender time its link to receipt, not to the next stage's compute."""
    pairs = [(P.new_rid(), 1) for _ in range(P.MAX_ACKS + 3)]
    held = [i * 1000 for i in range(len(pairs))]
    got = []
    for frames in P.encode_acks(pairs, held):
        got += P.decode(frames).held_s()
    assert got == pytest.approx([h / 1e6 for h in held])
    assert P.decode(P.encode_acks(pairs[:2])[0]).held_s() == [0.0, 0.0]  # not said: nothing to subtract


@pytest.mark.timeout(30)
def test_plain_ack_is_a_batch_of_one_and_other_types_ack_nothing():
    rid = P.new_rid()
    assert P.decode(P.encode(Msg.ACK, rid, 0, {"hop": 3})).acked() == [(rid, 3)]
    assert P.encode_acks([(rid, 3)])[0] == P.encode(Msg.ACK, rid, 0, {"hop": 3})  # same bytes on the wire
    assert P.encode_acks([]) == []
    assert P.decode(P.encode_error(rid, Err.BAD_INPUT, "x", hop=3)).acked() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pair", [(b"x", 1), (bytes(16), -1), (bytes(16), P.MAX_HOPS + 1), (bytes(16), True),
                                  ("a" * 16, 1), (bytes(16), 1.0)])
def test_encode_acks_refuses_bad_pairs(pair):
    with pytest.raises(ValueError):
        P.encode_acks([(P.new_rid(), 0), pair])


BAD_ACKS = {
    "acks not a list": _ack_hdr(acks=b"\x01" * 17),
    "acks a map": _ack_hdr(acks={"a": 1}),
    "pair not a list": _ack_hdr(acks=[b"\x01" * 16]),
    "pair of three": _ack_hdr(acks=[[b"\x01" * 16, 1, 1]]),
    "pair of one": _ack_hdr(acks=[[b"\x01" * 16]]),
    "short rid": _ack_hdr(acks=[[b"\x01" * 15, 1]]),
    "long rid": _ack_hdr(acks=[[b"\x01" * 17, 1]]),
    "rid as str": _ack_hdr(acks=[["a" * 16, 1]]),
    "hop negative": _ack_hdr(acks=[[b"\x01" * 16, -1]]),
    "hop too large": _ack_hdr(acks=[[b"\x01" * 16, P.MAX_HOPS + 1]]),
    "hop bool": _ack_hdr(acks=[[b"\x01" * 16, True]]),
    "hop float": _ack_hdr(acks=[[b"\x01" * 16, 1.0]]),
    "hop None": _ack_hdr(acks=[[b"\x01" * 16, None]]),
    "too many pairs": _ack_hdr(acks=[[b"\x01" * 16, 1]] * P.MAX_ACKS),
    "one bad among good": _ack_hdr(acks=[[b"\x01" * 16, 1]] * 10 + [[b"\x01" * 16, 99]]),
    "acks on a RUN": _hdr(acks=[[b"\x01" * 16, 1]]),
    "acks on an ERROR": {"t": int(Msg.ERROR), "rid": bytes(16), "bud": 0, "err": [1, "x"], "acks": []},
    "batched ACK without hop": {k: v for k, v in _ack_hdr().items() if k != "hop"},
    "held shorter than the pairs": _ack_hdr(acks=[[b"\x01" * 16, 1]], held=[5]),
    "held negative": _ack_hdr(held=[-1, 0]),
    "held float": _ack_hdr(held=[1.5, 0]),
    "held not a list": _ack_hdr(held=7),
    "held on a RUN": _hdr(held=[1]),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD_ACKS))
def test_malformed_batched_acks_raise_protocol_error(case):
    h = BAD_ACKS[case]
    payload = [bytes(16)] if h.get("ten") else []
    with pytest.raises(ProtocolError):
        P.decode([P.VERSION + msgpack.packb(h), *payload])


@settings(max_examples=200, deadline=None)
@given(st.data())
@pytest.mark.timeout(60)
def test_mutated_batched_acks_only_raise_protocol_error(data):
    frames = P.encode_acks([(P.new_rid(), i % 5) for i in range(data.draw(st.integers(1, 20)))])[0]
    raw = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        msg = P.decode([bytes(raw[: data.draw(st.integers(0, len(raw)))])])
    except ProtocolError:
        return
    for rid, hop in msg.acked():  # whatever got through is well-formed
        assert type(rid) is bytes and len(rid) == P.RID_BYTES and 0 <= hop <= P.MAX_HOPS


@pytest.mark.timeout(30)
def test_remembered_names_do_not_skip_checks():
    ok = _hdr(mdl="model-a", rep="tcp://h:1")
    P.decode([P.VERSION + msgpack.packb(ok), bytes(16)])  # now remembered
    for bad in (_hdr(mdl="model-a/.."), _hdr(rep="tcp://h:1/x"), _hdr(mdl=["model-a"]), _hdr(rep=b"tcp://h:1")):
        with pytest.raises(ProtocolError):
            P.decode([P.VERSION + msgpack.packb(bad), bytes(16)])
