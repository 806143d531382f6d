"""The wire format: every constant, the version prefix, one encoder and one validating decoder.

A message is a ZeroMQ multipart message (after any ROUTER routing-id frames)::

    F0  VERSION (b"ESP3")          protocol id + version, 4 bytes; anything else is refused
        + msgpack header (<= 16 KiB) {"t": type, "rid": 16-byte id, "bud": budget ms, ...}
    F1… one raw frame per tensor   C-contiguous little-endian bytes, len == prod(shape) * itemsize

The version is a prefix of the header frame, not a frame of its own (ESP1 sent it alone):
every frame costs a send and a receive call in pyzmq and a ZMTP frame, and most messages
have one payload frame or none. An ESP1 peer is refused with a message saying so.

Nothing outside this module writes a message-type or error-code literal. The decoder
is the only door for bytes from the network: it either returns a fully validated
:class:`Message` or raises :class:`ProtocolError` (msgpack limits, a dtype allow-list,
ndim and size caps, shape x itemsize == declared bytes == frame length, and the shape
with empty dimensions counted as 1 within the frame cap, so no stride overflows). Tensor frames
are turned into tensors *without copying*: a received tensor borrows the frame's memory,
so treat it as read-only and keep it (not the frame) alive as long as you use it.

ACKs are cumulative: one ACK message may take custody of up to ``MAX_ACKS`` (rid, hop)
pairs, so a receiver answers each sender once for everything it took on in a short interval
(``acks.AckBatch``: 1 ms).
The first pair travels in the usual ``rid``/``hop`` keys (a single ACK is exactly the
plain ACK it always was); the others, if any, in ``acks`` as ``[[rid, hop], ...]``
(msgpack bin 16 + positive fixint, 20 B a pair, so 256 pairs fit a 5 KiB header).
Build them with :func:`encode_acks`; read them with :meth:`Message.acked`, which also
reads a plain ACK. Every pair is validated like ``rid`` and ``hop`` themselves.

The decoder's checks run on every data-plane message, so they are written as one cheap
exact test per value with the precise error built only on failure; validated model
names and endpoints are remembered (strings are immutable, so a remembered one passed
the very same check).
"""
from __future__ import annotations

import functools
import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np
import torch

from .errors import (BadInput, DeadlineUnmeetable, DeployError, Forbidden, NotDeployed, Overloaded, ProtocolError,
                     RequestTimeout, RuntimeFailure, UnknownModel, WorkerLost)

if sys.byteorder != "little":  # tensor frames are little-endian raw bytes
    raise ImportError("edgesplit's wire format needs a little-endian host")

# --- framing ---------------------------------------------------------------------------------
VERSION = b"ESP3"  # like zguide's MDPW01: bump on any incompatible header change; the header frame's first bytes
_VLEN = len(VERSION)
RID_BYTES = 16  # request ids are uuid4-sized random bytes
HEADER_MAX_BYTES = 16 * 1024  # msgpack part of the header frame (after VERSION); bounds msgpack amplification
MAX_PAYLOAD_FRAMES = 16  # tensors (or byte blobs) per message
MAX_NDIM = 8
MAX_HOPS = 64  # stages on one route
KEY_Z85_CHARS = 40  # a CURVE public key as z85 text (keyed clusters)
MAX_ACKS = 256  # (rid, hop) pairs one ACK message acknowledges (20 B each in the header)
MAX_HELD_US = 2**31 - 1  # an ACK's per-pair hold time, microseconds
# Samples in one RUN's input tensor (its first dimension): one request may not make a stage compute, and hold
# activations for, an unbounded batch; the worker's own batching concatenates requests, each within this.
MAX_BATCH = 64
MAX_HINT_MODELS = 64  # models named in a PREFETCH hint (the upcoming order, soonest first)
MAX_FRAME_BYTES = 256 * 1024 * 1024  # default payload cap per frame and per message (ZMQ_MAXMSGSIZE per frame)
# Payload frames below this are copied into the message, larger ones sent zero-copy (every edgesplit
# socket's pyzmq ``copy_threshold``; pyzmq's default is 64 KiB). A zero-copy frame costs pyzmq a
# round trip through its garbage-collector thread, which takes the GIL from the loop that sends:
# measured on 2 cores, copying a 64 or 96 KiB frame saves the sending process a quarter to a third
# of its CPU per message, while from 128 KiB on (glibc malloc's mmap threshold) the copy costs more.
ZERO_COPY_MIN_BYTES = 128 * 1024
UNPACK_LIMITS = dict(max_str_len=4096, max_bin_len=64, max_array_len=4096, max_map_len=64, max_ext_len=0)

# --- timing ----------------------------------------------------------------------------------
HEARTBEAT_INTERVAL_MS = 1000  # wired LAN; Wi-Fi: 2000
HEARTBEAT_LIVENESS = 3  # silent intervals before a peer is dead; 3..5 is reasonable (zguide)
RECONNECT_INIT_MS = 100  # reconnect backoff starts here, doubles, with jitter ...
RECONNECT_MAX_MS = 2000  # ... up to here
ZMTP_HEARTBEAT_IVL_MS = 1000  # libzmq-level PING: kills dead TCP links, not hung Python threads
ZMTP_HEARTBEAT_TIMEOUT_MS = 3000
ZMTP_HEARTBEAT_TTL_MS = 3000
HANDSHAKE_IVL_MS = 5000
MAX_USER_CHARS = 64  # a user label on ADMIT
DEFAULT_BUDGET_MS = 30_000  # a request's deadline when the caller gives none
MAX_BUDGET_MS = 24 * 3600 * 1000

# --- queues and transfers --------------------------------------------------------------------
DATA_HWM_MSGS = 8  # activations per socket queue: a slow peer causes back-pressure, not RSS growth
CONTROL_HWM_MSGS = 256  # control messages are small
MAX_REPORTED_ROWS = 4096  # statistics rows / cache counters kept from one worker report
CONTROL_RATE_PER_S = 5000.0  # control messages one peer may send per second (a client's ADMIT and DONE per request)
CHUNK_BYTES = 1024 * 1024  # block transfer chunk: never one message that starves heartbeats
FETCH_CREDIT = 4  # chunks a worker may have requested and not yet received


class Msg(IntEnum):
    """Message types (header key ``t``)."""

    READY = 1  # worker -> coordinator: register (name, endpoint, device, budget, hosted stages)
    HEARTBEAT = 2  # both ways; a worker's carries telemetry and per-stage statistics
    DISCONNECT = 3  # coordinator -> worker: I do not know you, send READY again
    DEPLOY = 4  # coordinator -> worker: host these stages of a model (payload: manifest JSON)
    DEPLOYED = 5  # worker -> coordinator: the stages are loaded (or ERROR)
    FETCH = 6  # worker -> coordinator: bytes [off, off + len) of a block file
    CHUNK = 7  # coordinator -> worker: those bytes
    RUN = 8  # data: run stage ``hop`` of model ``mdl`` on the payload tensors
    ACK = 9  # data, link reply: custody of (rid, hop) taken, the sender may drop its kept input
    RESULT = 10  # last worker -> requester: the model's output
    ERROR = 11  # the request failed; ``err`` = [code, reason]
    HELLO = 12  # client -> coordinator: register/ping; the reply says who the coordinator is
    ROUTE = 13  # client -> coordinator: the route of ``mdl``; the reply carries it in ``body``
    WORKERS = 14  # client -> coordinator: the worker registry
    PLAN = 15  # client -> coordinator: deploy a plan; the reply carries the new route
    MODELS = 16  # client -> coordinator: models in its store
    NOTICE = 17  # coordinator -> clients and workers: a worker was lost
    LINK = 18  # client -> coordinator -> a cut's sending worker: change the link's settings live; reply: the new ones
    PREFETCH = 19  # client -> coordinator -> the model's workers: make its stages resident now; reply: bytes and time
    UNDEPLOY = 20  # client -> coordinator: release a model everywhere (workers free its blocks); reply: bytes freed
    ADMIT = 21  # client -> coordinator: may this request (model, user, deadline, input bytes) run? reply: when to send
    DONE = 22  # client -> coordinator: an admitted request's result came, ``lag_ms`` after its planned end (no reply)
    MEASURE = 23  # client -> coordinator -> workers: profile a model's blocks, probe links; reply: profiles, rates
    PROBE = 24  # data: one message of a link probe train (payload: filler); answered at once by a header-only PROBE


class Err(IntEnum):
    """Error codes (first element of header key ``err``)."""

    INTERNAL = 1
    BAD_MESSAGE = 2  # wire format violated
    UNKNOWN_MODEL = 3  # not in the store
    NOT_DEPLOYED = 4  # in the store, but this worker/route does not host it
    BAD_INPUT = 5  # tensor does not fit the stage, or the stage raised
    WORKER_LOST = 6  # a worker on the route died
    TIMEOUT = 7  # budget exhausted
    OVERLOADED = 8  # bounded queue full
    DEPLOY_FAILED = 9
    MISSING_BLOCK = 10  # a block is in no store reachable
    TOO_LARGE = 11  # message above the size cap
    SHUTTING_DOWN = 12
    NAME_TAKEN = 13  # a READY under a worker name that another live worker holds
    DEADLINE_UNMEETABLE = 14  # admission: the request cannot finish by its deadline (the reason says why)
    FORBIDDEN = 15  # keyed cluster: the sender's role or route position may not send this


MSG_NAMES = {m.value: m.name for m in Msg}
_MSG_BY_CODE = {m.value: m for m in Msg}  # Msg(t) costs a function call into enum
ERR_NAMES = {e.value: e.name for e in Err}


def msg_name(code: int) -> str:
    return MSG_NAMES.get(code, f"UNKNOWN_TYPE_{code}")


def err_name(code: int) -> str:
    return ERR_NAMES.get(code, f"UNKNOWN_ERROR_{code}")


_ERROR_CLASSES: dict[Err, type[RuntimeFailure]] = {
    Err.BAD_MESSAGE: ProtocolError, Err.TOO_LARGE: ProtocolError,
    Err.UNKNOWN_MODEL: UnknownModel, Err.NOT_DEPLOYED: NotDeployed,
    Err.BAD_INPUT: BadInput, Err.WORKER_LOST: WorkerLost, Err.TIMEOUT: RequestTimeout,
    Err.OVERLOADED: Overloaded, Err.DEPLOY_FAILED: DeployError, Err.MISSING_BLOCK: DeployError,
    Err.DEADLINE_UNMEETABLE: DeadlineUnmeetable, Err.FORBIDDEN: Forbidden,
}


def error_from_wire(code: int, reason: str) -> RuntimeFailure:
    """The exception a caller raises for an ERROR message's ``[code, reason]``."""
    err = Err(code) if code in ERR_NAMES else Err.INTERNAL
    return _ERROR_CLASSES.get(err, RuntimeFailure)(f"{reason} [{err_name(code)}]")


def error_code(exc: RuntimeFailure) -> Err:
    """The wire code an exception travels as."""
    return Err[exc.code_name]


# --- dtypes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WireDtype:
    code: int
    name: str
    torch: torch.dtype
    numpy: np.dtype  # what numpy reads the bytes as (bf16 as int16, then re-viewed)
    itemsize: int


_DTYPES = [
    WireDtype(1, "float32", torch.float32, np.dtype("<f4"), 4),
    WireDtype(2, "float16", torch.float16, np.dtype("<f2"), 2),
    WireDtype(3, "bfloat16", torch.bfloat16, np.dtype("<i2"), 2),
    WireDtype(4, "int8", torch.int8, np.dtype("i1"), 1),
    WireDtype(5, "uint8", torch.uint8, np.dtype("u1"), 1),
    WireDtype(6, "int16", torch.int16, np.dtype("<i2"), 2),
    WireDtype(7, "int32", torch.int32, np.dtype("<i4"), 4),
    WireDtype(8, "int64", torch.int64, np.dtype("<i8"), 8),
    WireDtype(9, "float64", torch.float64, np.dtype("<f8"), 8),
    WireDtype(10, "bool", torch.bool, np.dtype("?"), 1),
]
DTYPE_BY_CODE = {d.code: d for d in _DTYPES}
DTYPE_BY_TORCH = {d.torch: d for d in _DTYPES}
UINT8 = DTYPE_BY_CODE[5]


@dataclass(frozen=True)
class TensorSpec:
    """One payload frame as the header declares it."""

    dtype: WireDtype
    shape: tuple[int, ...]
    nbytes: int

    def to_msg(self) -> list[Any]:
        return [self.dtype.code, list(self.shape), self.nbytes]


# --- header schema ---------------------------------------------------------------------------
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_ENDPOINT = re.compile(r"(tcp://[A-Za-z0-9.\-\[\]:*]{1,200}:[0-9]{1,5}|ipc://[^\x00]{1,200}|inproc://[^\x00]{1,200})")
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{" + str(KEY_Z85_CHARS) + "}")  # a CURVE public key
_SHORT = 64
_REASON = 1024

HEADER_KEYS = {
    "t": "message type (Msg)",
    "rid": "request id, 16 random bytes",
    "bud": "remaining deadline budget in ms (relative, so board clocks need not agree)",
    "hop": "stage index on the route",
    "att": "attempt number of this hop (0-based; replays on a replica count up)",
    "mdl": "model name",
    "pln": "plan id the request's route belongs to (a worker hosting another plan refuses it)",
    "ten": "payload frames: [[dtype_code, shape, nbytes], ...]",
    "rep": "requester's result endpoint (the last stage sends RESULT/ERROR there)",
    "cod": "link codec name (absent = raw tensors)",
    "cmeta": "link codec metadata (map, the codec's own)",
    "err": "[error code, reason]",
    "body": "control payload (map)",
    "trc": "per-hop trace records when tracing is on",
    "rk": "requester's public key (z85, keyed clusters): the first worker sets it from the requester's CURVE key; "
          "results and errors go only to a result socket holding its secret",
    "acks": "ACK only: the pairs acknowledged besides (rid, hop), [[rid, hop], ...], at most MAX_ACKS - 1",
    "held": "ACK only: per acknowledged pair, microseconds the receiver held it before this ACK (so the sender "
            "times its link to receipt, not to the next stage's compute)",
}
_KNOWN_KEYS = frozenset(HEADER_KEYS)
REQUIRED_KEYS: dict[Msg, frozenset[str]] = {
    Msg.RUN: frozenset({"mdl", "hop", "rep", "ten"}),
    Msg.ACK: frozenset({"hop"}),
    Msg.RESULT: frozenset({"mdl", "ten"}),
    Msg.ERROR: frozenset({"err"}),
    Msg.DEPLOY: frozenset({"body", "ten"}),
    Msg.FETCH: frozenset({"body"}),
    Msg.CHUNK: frozenset({"body", "ten"}),
    Msg.ROUTE: frozenset({"mdl"}),
    Msg.READY: frozenset({"body"}),
    Msg.LINK: frozenset({"body"}),
    Msg.ADMIT: frozenset({"body"}),  # and "mdl" when a client asks
    Msg.DONE: frozenset({"body"}),
}
TRACE_FIELDS = ("hop", "worker", "t_recv", "t_start", "t_end", "t_send", "bytes_out")


def new_rid() -> bytes:
    """A fresh random request id."""
    return os.urandom(RID_BYTES)


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"bad message: {what}")


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(f"{name} must be an int in [{lo}, {hi}], got {v!r:.80}")
    return v


def _str(v: Any, name: str, limit: int, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(v, str) or len(v) > limit or (pattern is not None and not pattern.fullmatch(v)):
        raise _bad(f"{name} must be a string of at most {limit} characters"
                   + (f" matching {pattern.pattern}" if pattern else "") + f", got {v!r:.80}")
    return v


_SEEN_MAX = 1024  # remembered valid names/endpoints per kind; forgotten all at once beyond


def _str_seen(v: Any, name: str, limit: int, pattern: re.Pattern[str], seen: set[str]) -> str:
    """``_str`` for values that repeat on every message (model names, endpoints): a regex once per value."""
    if type(v) is str and v in seen:
        return v
    _str(v, name, limit, pattern)
    if len(seen) >= _SEEN_MAX:
        seen.clear()
    seen.add(v)
    return v


_SEEN_MODELS: set[str] = set()
_SEEN_KEYS: set[str] = set()
_SEEN_ENDPOINTS: set[str] = set()


def _spec(v: Any, max_frame_bytes: int) -> TensorSpec:
    """A payload spec; the loop is the common case (exact ints, in range), ``_spec_checked`` says what is wrong."""
    if type(v) is list and len(v) == 3:
        code, shape, nbytes = v
        dt = DTYPE_BY_CODE.get(code) if type(code) is int else None
        if dt is not None and type(shape) is list and len(shape) <= MAX_NDIM and type(nbytes) is int:
            n = dt.itemsize
            for d in shape:
                if type(d) is not int or not 0 < d <= max_frame_bytes:  # empty dims: the checked path
                    break
                n *= d
                if n > max_frame_bytes:
                    break
            else:
                if n == nbytes:
                    return TensorSpec(dt, tuple(shape), nbytes)
    return _spec_checked(v, max_frame_bytes)


def _spec_checked(v: Any, max_frame_bytes: int) -> TensorSpec:
    if not (isinstance(v, list) and len(v) == 3):
        raise _bad(f"a payload spec is [dtype_code, shape, nbytes], got {v!r:.80}")
    code, shape, nbytes = v
    if not isinstance(code, int) or code not in DTYPE_BY_CODE:
        raise _bad(f"dtype code {code!r:.20} is not one of {sorted(DTYPE_BY_CODE)}")
    dt = DTYPE_BY_CODE[code]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _bad(f"shape must be a list of at most {MAX_NDIM} dims, got {shape!r:.80}")
    n = span = dt.itemsize
    for d in shape:
        _int(d, "a dimension", 0, max_frame_bytes)
        n *= d
        span *= max(d, 1)  # bounds the strides too: [0, 2**27, 2**27, 2**27] is empty, but torch cannot stride it
        if span > max_frame_bytes:
            raise ProtocolError(f"declared tensor of shape {shape} x {dt.itemsize} B exceeds the "
                                f"{max_frame_bytes} B frame cap")
    _int(nbytes, "nbytes", 0, max_frame_bytes)
    if n != nbytes:
        raise _bad(f"shape {shape} x {dt.itemsize} B = {n} B, but nbytes says {nbytes}")
    return TensorSpec(dt, tuple(shape), nbytes)


def _trace(v: Any) -> list[list[Any]]:
    if not isinstance(v, list) or len(v) > MAX_HOPS + 1:
        raise _bad("trc must be a list of at most one record per hop")
    for rec in v:
        if not (isinstance(rec, list) and len(rec) == len(TRACE_FIELDS)):
            raise _bad(f"a trace record is {list(TRACE_FIELDS)}")
        if not all(isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in rec):
            raise _bad("trace record values are numbers or a worker name")
    return v


def _acks(v: Any) -> list[list[Any]]:
    """``acks``: [[rid, hop], ...], each rid ``RID_BYTES`` bytes and each hop in [0, MAX_HOPS]."""
    if type(v) is not list or len(v) > MAX_ACKS - 1:
        raise _bad(f"acks must be a list of at most {MAX_ACKS - 1} [rid, hop] pairs")
    for pair in v:
        if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is bytes and len(pair[0]) == RID_BYTES
                and type(pair[1]) is int and 0 <= pair[1] <= MAX_HOPS):
            raise _bad(f"an acks entry is [{RID_BYTES}-byte rid, hop in [0, {MAX_HOPS}]], got {pair!r:.80}")
    return v


def check_batch(shape: Sequence[int]) -> None:
    """Refuse a RUN input whose batch (first dimension) is above ``MAX_BATCH``; a 0-d shape has no batch.

    ``shape`` is the input tensor's: a raw link's payload spec, or on a codec link the codec header's
    ``cmeta["shape"]`` (untrusted, hence the type checks), not the shape of its byte frames.
    """
    if not isinstance(shape, (list, tuple)):
        raise _bad(f"an input shape is a list of ints, got {shape!r:.80}")
    if shape and (type(shape[0]) is not int or not 0 <= shape[0] <= MAX_BATCH):
        raise _bad(f"input batch {shape[0]!r:.40} (shape {str(list(shape)):.120}) is not an int in [0, MAX_BATCH "
                   f"{MAX_BATCH}]; split the request into batches of at most that")


_INT_KEYS = (("bud", 0, MAX_BUDGET_MS), ("hop", 0, MAX_HOPS), ("att", 0, 255), ("pln", 0, 2**62))


def _validate_header(h: Any, n_frames: int, max_frame_bytes: int) -> tuple[Msg, list[TensorSpec]]:
    if not isinstance(h, dict):
        raise _bad(f"header must be a map, got {type(h).__name__}")
    if not _KNOWN_KEYS.issuperset(h):
        unknown = set(h) - _KNOWN_KEYS
        raise _bad(f"unknown header keys {sorted(map(str, unknown))[:8]}; protocol {VERSION!r} knows {sorted(HEADER_KEYS)}")
    for key in ("t", "rid", "bud"):
        if key not in h:
            raise _bad(f"header lacks {key!r} ({HEADER_KEYS[key]})")
    t = h["t"]
    mtype = _MSG_BY_CODE.get(t) if type(t) is int else None  # type(): bool is not a message type
    if mtype is None:
        _int(t, "t", 0, 255)
        raise _bad(f"unknown message type {t}")
    rid = h["rid"]
    if type(rid) is not bytes or len(rid) != RID_BYTES:
        raise _bad(f"rid must be {RID_BYTES} bytes")
    for key, lo, hi in _INT_KEYS:  # the exact test inline, ``_int`` only to word the error
        if key in h:
            v = h[key]
            if type(v) is not int or not lo <= v <= hi:
                _int(v, key, lo, hi)
    required = REQUIRED_KEYS.get(mtype)
    if required is not None and not required.issubset(h):
        raise _bad(f"{mtype.name} needs header keys {sorted(required - set(h))}")
    if "mdl" in h:
        _str_seen(h["mdl"], "mdl", 128, _MODEL_NAME, _SEEN_MODELS)
    if "rep" in h:
        _str_seen(h["rep"], "rep", 256, _ENDPOINT, _SEEN_ENDPOINTS)
    if "rk" in h:
        _str_seen(h["rk"], "rk", KEY_Z85_CHARS, _Z85_KEY, _SEEN_KEYS)
    if "cod" in h:
        _str(h["cod"], "cod", _SHORT)
    for key in ("cmeta", "body"):
        if key in h and not isinstance(h[key], dict):
            raise _bad(f"{key} must be a map")
    if "err" in h:
        e = h["err"]
        if not (isinstance(e, list) and len(e) == 2):
            raise _bad("err must be [code, reason]")
        _int(e[0], "error code", 0, 65535)
        _str(e[1], "error reason", _REASON)
    if "trc" in h:
        _trace(h["trc"])
    if "acks" in h:
        if mtype is not Msg.ACK:
            raise _bad(f"acks belongs on ACK, not {mtype.name}")
        _acks(h["acks"])
    if "held" in h:
        held = h["held"]
        if mtype is not Msg.ACK or type(held) is not list or len(held) != 1 + len(h.get("acks", ())) or not all(
                type(v) is int and 0 <= v <= MAX_HELD_US for v in held):
            raise _bad(f"held is an ACK's list of one int in [0, {MAX_HELD_US}] per acknowledged pair")
    specs_raw = h.get("ten", [])
    if type(specs_raw) is not list or len(specs_raw) > MAX_PAYLOAD_FRAMES:
        raise _bad(f"ten must list at most {MAX_PAYLOAD_FRAMES} payload frames")
    if len(specs_raw) != n_frames:
        raise _bad(f"header declares {len(specs_raw)} payload frames, message has {n_frames}")
    specs = [_spec(s, max_frame_bytes) for s in specs_raw]
    if len(specs) > 1 and sum(s.nbytes for s in specs) > max_frame_bytes:  # one spec is within the cap already
        total = sum(s.nbytes for s in specs)
        raise ProtocolError(f"message declares {total} B of payload, the cap is {max_frame_bytes} B per message")
    return mtype, specs


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


# keyword arguments bound once: parsing them is a third of unpacking a small header
_unpack_header = functools.partial(msgpack.unpackb, raw=False, strict_map_key=True, ext_hook=_reject_ext,
                                   **UNPACK_LIMITS)


# --- messages --------------------------------------------------------------------------------
@dataclass
class Message:
    """A decoded, validated message. ``frames`` are the payload frames (zmq.Frame or bytes)."""

    type: Msg
    header: dict[str, Any]
    specs: list[TensorSpec] = field(default_factory=list)
    frames: list[Any] = field(default_factory=list)

    @property
    def rid(self) -> bytes:
        return self.header["rid"]

    @property
    def budget_ms(self) -> int:
        return self.header["bud"]

    @property
    def body(self) -> dict[str, Any]:
        return self.header.get("body", {})

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)

    @property
    def payload_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def tensor(self, i: int = 0) -> torch.Tensor:
        """Payload ``i`` as a tensor that borrows the frame's memory (no copy)."""
        return frame_to_tensor(self.frames[i], self.specs[i])

    def tensors(self) -> list[torch.Tensor]:
        return [self.tensor(i) for i in range(len(self.specs))]

    def blob(self, i: int = 0) -> memoryview:
        """Payload ``i`` as raw bytes (manifests, block chunks)."""
        return _buffer(self.frames[i])

    def acked(self) -> list[tuple[bytes, int]]:
        """The (rid, hop) pairs an ACK takes custody of (a plain ACK: one); empty for other types."""
        if self.type is not Msg.ACK:
            return []
        h = self.header
        first = (h["rid"], h["hop"])
        more = h.get("acks")
        return [first, *[(rid, hop) for rid, hop in more]] if more else [first]

    def held_s(self) -> list[float]:
        """Per acknowledged pair, seconds the receiver held it before acknowledging (0s when not said)."""
        held = self.header.get("held")
        return [v / 1e6 for v in held] if held else [0.0] * len(self.acked())


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)


def frame_to_tensor(frame: Any, spec: TensorSpec) -> torch.Tensor:
    """A tensor over ``frame``'s bytes; copies only when the buffer is read-only or misaligned."""
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.dtype.torch)
    buf = _buffer(frame)
    if not buf.readonly:  # torch.frombuffer: a third of numpy's path, and it keeps the frame alive too
        t = torch.frombuffer(buf, dtype=spec.dtype.torch)
        if t.data_ptr() % spec.dtype.itemsize == 0:
            return t if len(spec.shape) == 1 else t.view(spec.shape)
    # bytes objects (tests, tiny frames) are read-only; unaligned SIMD is unsafe on ARM: copy
    t = torch.from_numpy(np.frombuffer(buf, dtype=spec.dtype.numpy).copy())
    if spec.dtype.torch is torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(spec.shape)


def to_wire(x: torch.Tensor | np.ndarray | bytes | bytearray | memoryview) -> tuple[TensorSpec, Any]:
    """A payload item as (spec, buffer to send). Tensors are made CPU-contiguous (no copy if already)."""
    dt, shape, nbytes, buf = _wire_parts(x)
    return TensorSpec(dt, tuple(shape), nbytes), buf


def _wire_parts(x: Any) -> tuple[WireDtype, list[int], int, Any]:
    """(dtype, shape, nbytes, buffer) of a payload item; ``encode`` needs no TensorSpec object."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        n = memoryview(x).nbytes
        return UINT8, [n], n, x
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"payload items are tensors, arrays or bytes, got {type(x).__name__}")
    dt = DTYPE_BY_TORCH.get(x.dtype)
    if dt is None:
        raise ProtocolError(f"dtype {x.dtype} cannot go on the wire; allowed: {[d.name for d in _DTYPES]}")
    t = x.detach() if x.requires_grad else x  # detach costs as much as the rest; numpy() only needs no grad
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    arr = (t.view(torch.int16) if dt.torch is torch.bfloat16 else t).numpy()
    return dt, list(t.shape), arr.nbytes, arr


_local = threading.local()


def _packb(header: dict[str, Any]) -> bytes:
    """msgpack bytes of a header with a per-thread Packer (``packb`` builds one per call)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    packed = packer.pack(header)
    if len(packed) > HEADER_MAX_BYTES:
        _local.packer = None  # a Packer's buffer never shrinks: do not keep an oversized one
    return packed


def encode(mtype: Msg, rid: bytes, budget_ms: int, fields: Mapping[str, Any] | None = None,
           payload: Sequence[Any] = ()) -> list[Any]:
    """Build a message's frames: ``[VERSION + header, *payload buffers]``.

    Args:
        mtype: message type.
        rid: request id (``new_rid()``), 16 bytes.
        budget_ms: remaining deadline budget; clamped to ``[0, MAX_BUDGET_MS]``.
        fields: other header keys (see ``HEADER_KEYS``); ``ten`` is filled from ``payload``.
        payload: tensors, arrays or byte blobs, one frame each.
    Returns:
        Frames for ``socket.send_multipart(frames, copy=False)``.
    """
    if len(payload) > MAX_PAYLOAD_FRAMES:
        raise ProtocolError(f"{len(payload)} payload frames, at most {MAX_PAYLOAD_FRAMES}")
    header: dict[str, Any] = {"t": int(mtype), "rid": rid, "bud": max(0, min(int(budget_ms), MAX_BUDGET_MS))}
    if fields:
        header.update(fields)
    bufs = []
    if payload:
        specs = []
        for item in payload:
            dt, shape, nbytes, buf = _wire_parts(item)
            specs.append([dt.code, shape, nbytes])
            bufs.append(buf)
        header["ten"] = specs
    packed = _packb(header)
    if len(packed) > HEADER_MAX_BYTES:
        raise ProtocolError(f"{mtype.name} header is {len(packed)} B, the limit is {HEADER_MAX_BYTES} B; "
                            "move bulk data into a payload frame")
    return [VERSION + packed, *bufs]


_ACK_CODE = int(Msg.ACK)


def encode_acks(pairs: Sequence[tuple[bytes, int]], held_us: Sequence[int] | None = None) -> list[list[Any]]:
    """ACK messages taking custody of ``pairs`` [(rid, hop)], ``MAX_ACKS`` pairs per message.

    ``held_us`` (one per pair): how long this end held each pair since receipt, so the sender
    can time its link to receipt rather than to the ACK (header ``held``).

    One message per sender per ``acks.ACK_DELAY_S`` instead of one per RUN is what makes custody cheap:
    the sender still drops nothing until the pair comes back (:meth:`Message.acked`).
    Returns:
        A list of messages (each a frame list for ``send_multipart``); empty for no pairs.
    Raises:
        ValueError: a pair that is not (``RID_BYTES`` bytes, hop in [0, ``MAX_HOPS``]).
    """
    for rid, hop in pairs:  # one bad pair would make the receiver refuse the whole message, good pairs with it
        if type(rid) is not bytes or len(rid) != RID_BYTES or type(hop) is not int or not 0 <= hop <= MAX_HOPS:
            raise ValueError(f"an ACK pair is ({RID_BYTES}-byte rid, hop in [0, {MAX_HOPS}]), got {(rid, hop)!r:.80}")
    out = []
    for i in range(0, len(pairs), MAX_ACKS):
        chunk = pairs[i:i + MAX_ACKS]
        rid, hop = chunk[0]
        header: dict[str, Any] = {"t": _ACK_CODE, "rid": rid, "bud": 0, "hop": hop}
        if len(chunk) > 1:
            header["acks"] = [[r, h] for r, h in chunk[1:]]
        if held_us is not None:
            header["held"] = [max(0, min(int(v), MAX_HELD_US)) for v in held_us[i:i + MAX_ACKS]]
        out.append([VERSION + _packb(header)])
    return out


def encode_error(rid: bytes, code: Err, reason: str, **fields: Any) -> list[Any]:
    """An ERROR message (reason truncated to fit the header limits)."""
    return encode(Msg.ERROR, rid, 0, {"err": [int(code), reason[:_REASON]], **fields})


def decode(frames: Sequence[Any], max_frame_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Validate and decode one message (routing-id frames already stripped).

    Args:
        frames: ``[VERSION + header, *payload]`` as bytes or ``zmq.Frame``.
        max_frame_bytes: largest payload frame accepted.
    Returns:
        The message; its tensors borrow the payload frames' memory.
    Raises:
        ProtocolError: for anything that is not a well-formed message of this protocol version.
    """
    n = len(frames)
    if n == 0 or n > 1 + MAX_PAYLOAD_FRAMES:
        raise _bad(f"expected [{VERSION.decode()} + header, payload...] with at most {MAX_PAYLOAD_FRAMES} payload "
                   f"frames, got {n} frame(s)")
    first = frames[0]
    size = frame_len(first)
    if size > _VLEN + HEADER_MAX_BYTES:
        raise _bad(f"header is {size - _VLEN} B, the limit is {HEADER_MAX_BYTES} B")
    raw = _frame_bytes(first, _VLEN + HEADER_MAX_BYTES)
    if raw[:_VLEN] != VERSION:
        raise _version_error(raw)
    try:
        header = _unpack_header(raw[_VLEN:])
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        # msgpack documents that unpack may raise beyond UnpackException; these are what it raises
        raise _bad(f"header is not valid msgpack within limits ({type(e).__name__}: {e})") from None
    payload = frames[1:] if type(frames) is list else list(frames[1:])
    mtype, specs = _validate_header(header, n - 1, max_frame_bytes)
    for i, (spec, frame) in enumerate(zip(specs, payload)):
        got = frame_len(frame)
        if got != spec.nbytes:
            raise _bad(f"payload frame {i} is {got} B, header declares {spec.nbytes} B")
    return Message(mtype, header, specs, payload)


def _version_error(raw: bytes) -> ProtocolError:
    """What to say about a first frame that does not start with VERSION (an old peer gets told so)."""
    if raw == b"ESP1":  # ESP1 sent its version as a frame of its own
        return ProtocolError(f"protocol ESP1 peer; upgrade it (this end speaks {VERSION.decode()}: "
                             f"one frame of {VERSION!r} + msgpack header, then the payload frames)")
    return _bad(f"the first frame starts with {raw[:8]!r}, expected {VERSION!r} + msgpack header")


def frame_len(frame: Any) -> int:
    """Bytes in a frame (zmq.Frame, bytes, memoryview or numpy array)."""
    if isinstance(frame, (memoryview, np.ndarray)):
        return frame.nbytes
    return len(frame)


def _frame_bytes(frame: Any, limit: int) -> bytes:
    """The frame as bytes, or b"" when it is over ``limit`` (no copy of an oversized frame)."""
    if type(frame) is bytes:
        return frame if len(frame) <= limit else b""
    if frame_len(frame) > limit:
        return b""
    b = getattr(frame, "bytes", None)
    if b is not None:
        return b
    return frame.tobytes() if isinstance(frame, (np.ndarray, memoryview)) else bytes(frame)


# --- blobs: structured control payloads too large for a header (worker lists, model lists) ---
BLOB_MAX_BYTES = 4 * 1024 * 1024
BLOB_LIMITS = dict(max_str_len=4096, max_bin_len=64, max_array_len=4096, max_map_len=256, max_ext_len=0)


def pack_blob(obj: Any) -> bytes:
    """msgpack bytes of a control payload, sent as a uint8 payload frame."""
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > BLOB_MAX_BYTES:
        raise ProtocolError(f"control payload is {len(data)} B, the limit is {BLOB_MAX_BYTES} B")
    return data


def unpack_blob(buf: Any) -> Any:
    """Decode a control payload with the same kind of limits as headers."""
    if len(buf) > BLOB_MAX_BYTES:
        raise _bad(f"control payload is {len(buf)} B, the limit is {BLOB_MAX_BYTES} B")
    try:
        return msgpack.unpackb(bytes(buf), raw=False, strict_map_key=True, ext_hook=_reject_ext, **BLOB_LIMITS)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise _bad(f"control payload is not valid msgpack within limits ({type(e).__name__}: {e})") from None


# --- body accessors (control payloads are untrusted too) ------------------------------------
def body_get(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``body[key]`` checked to be of ``kind``; ProtocolError names what was wrong."""
    if key not in body:
        if default is ...:
            raise _bad(f"body lacks {key!r}")
        return default
    v = body[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, float, (int, float))):
        raise _bad(f"body[{key!r}] must be {kind}, got {type(v).__name__}")
    return v


def check_model_name(name: Any) -> str:
    return _str(name, "model name", 128, _MODEL_NAME)


def check_endpoint(ep: Any) -> str:
    return _str(ep, "endpoint", 256, _ENDPOINT)


def trace_record(hop: int, worker: str, t_recv: float, t_start: float, t_end: float, t_send: float,
                 bytes_out: int) -> list[Any]:
    """One hop's timings (wall-clock seconds of the worker's host) for ``trc``."""
    return [hop, worker, t_recv, t_start, t_end, t_send, bytes_out]


def total_bytes(frames: Iterable[Any]) -> int:
    """Bytes a message occupies on the wire (frame payloads, no ZMTP framing)."""
    return sum(frame_len(f) for f in frames)


def restamp(frames: list[Any], budget_ms: int) -> list[Any]:
    """``frames`` with the header's remaining budget set to ``budget_ms`` (a message that waited in an outbox).

    Deadlines are absolute where they are kept (monotonic, on one host) and relative on the
    wire; a message that sat in a queue must not carry the budget it had when it was encoded.
    """
    return _rewrite_header(frames, "bud", max(0, min(int(budget_ms), MAX_BUDGET_MS)))


def with_attempt(frames: list[Any], attempt: int) -> list[Any]:
    """``frames`` re-addressed as attempt ``attempt`` (a replay on a replica counts up ``att``)."""
    return _rewrite_header(frames, "att", min(int(attempt), 255))


def _rewrite_header(frames: Sequence[Any], key: str, value: Any) -> list[Any]:
    """A message this process encoded, with one header key set; the payload frames are shared, not copied."""
    header = msgpack.unpackb(_frame_bytes(frames[0], _VLEN + HEADER_MAX_BYTES)[_VLEN:], raw=False)
    header[key] = value
    return [VERSION + msgpack.packb(header, use_bin_type=True), *frames[1:]]


def salvage_rid(frames: Sequence[Any]) -> bytes:
    """The request id of a message ``decode`` refused, when its header still parses (zeros when not).

    The ERROR a receiver answers with carries it, so the sender can match the refusal to its request.
    """
    try:
        if frames and frame_len(frames[0]) <= _VLEN + HEADER_MAX_BYTES:
            raw = _frame_bytes(frames[0], _VLEN + HEADER_MAX_BYTES)
            if raw[:_VLEN] == VERSION:
                h = msgpack.unpackb(raw[_VLEN:], raw=False, **UNPACK_LIMITS)
                rid = h.get("rid") if isinstance(h, dict) else None
                if isinstance(rid, bytes) and len(rid) == RID_BYTES:
                    return rid
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        pass
    return bytes(RID_BYTES)


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
