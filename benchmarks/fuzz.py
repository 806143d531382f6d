"""Fuzz every socket a daemon reads from the network, on a live local cluster, with hypothesis-generated messages.

::

    .venv/bin/python benchmarks/fuzz.py                  # 10,000 messages per socket (a few minutes on 2 cores)
    .venv/bin/python benchmarks/fuzz.py --n 2000 --seed 1
    .venv/bin/python benchmarks/fuzz.py --impersonate     # also let messages pose as the cluster's own members
    .venv/bin/python benchmarks/fuzz.py --keyed           # a keyed cluster (CURVE + roles), fuzzed by key holders

The input-hardening acceptance: ">= 10,000 generated messages per socket, 0 crashes, bounded
memory". ``tests/test_fuzz.py`` runs this very code with a smaller count; this script gives the figure.

The cluster: a coordinator and two workers (``LocalCluster``, separate processes on 127.0.0.1),
a store with two dummy models, ``dummy3`` deployed raw on w0 + w1 (the canary: its output for a
fixed input must never change) and ``dummy6`` on w0 + w1 with the weightless ``identity`` codec
(fp16) on its cut, so a RUN can reach a codec's decoder. Sockets fuzzed, one after the other:

- ``w0``, ``w1``: the workers' data ROUTERs (RUN mostly, for the stages they host, with the
  current plan id, so a good share passes every check and is computed and forwarded; some to
  the codec link; results go to a sink socket this script drains, or to endpoints that lead nowhere);
- ``client``: the result ROUTER of a ``Client`` (RESULT and ERROR, half of them naming a request
  the client is waiting for at that moment: "victims" submitted just before each batch, which must
  each end, with a tensor or an exception, never hang);
- ``coordinator``: its control ROUTER (every type it handles, from DEALERs whose identities look
  like workers, so READY registers them and HEARTBEAT/DEPLOYED/FETCH/ERROR reach the worker
  handlers, and like clients). Orders that change what runs (PLAN, UNDEPLOY, LINK) name the
  playground model, never the canary; without ``--impersonate`` no message claims a member's name
  or endpoint (the cluster here is unkeyed, so its control plane authenticates nobody: a peer that
  can reach the coordinator may register a worker, which is not what this fuzzes).

``--keyed``: the same messages to a keyed cluster (CURVE on every socket, ZAP allow-lists, roles
checked per message), sent by authenticated insiders, which is where the handlers sit behind the
role checks: the coordinator gets them from two extra worker keys (``fz0``, ``fz1``: the worker-like
identities, so READY registers them and HEARTBEAT/FETCH/... reach the worker handlers) and an extra
operator key (``fzop``: PLAN, LINK, ...); w0's data socket from the cluster's user key (hop 0); w1's
from w0's own key (the plan's previous hop, so hop 1 gets past the route check) and the user key; the
client's result socket from w1's key (its routes' last hop: RESULTs are taken) and w0's (ERRORs only).
A message whose type or hop the drawn sender's key may not send goes, four times in five, from a
sender whose key may (``KEYED_REROUTE``); the rest are answered FORBIDDEN (the client drops them
silently, counted as forged), counted in the table's ``forbidden`` column. RUNs mostly carry an
``rk`` (the requester's key, which hop 1 takes from its sender): mostly the key of the sink, a CURVE
result socket holding the user's secret, so results come back there; else other members' keys, keys
no one holds, or malformed ones.

Messages are templates drawn by hypothesis: a version prefix, a msgpack header over the known
header keys and a payload frame per declared tensor. Most are structurally valid (right version,
a type the socket takes, its required keys, payload frames that match ``ten``) with fields drawn
from valid-looking and wild values (huge ints, NaN, nested maps, wrong types, long strings, deep
nesting), so they get past the decoder into the handlers; the rest have keys dropped or replaced,
an unknown key, a wrong or old version, a cut or padded header, or are random bytes.

After every batch (``--batch`` messages) a probe round trip proves the daemon handled it (HELLO
to the coordinator, HEARTBEAT to a worker's data socket, on each fuzzing DEALER); every
``--canary-every`` batches, and at the end, the canary request must return its first output.

Reported per socket: messages sent, replies received (by type and error code), crashes (a daemon
exited, missed a probe or logged a Python traceback; the client's io thread died or it logged a
traceback; a canary failed; a victim ended more than ``VICTIM_GRACE_S`` after its deadline), RSS of
every daemon before (after a warm-up of ``--warmup`` messages), after and at its largest, seconds,
and the ERROR lines the daemons logged (states their code did not foresee; reported, not counted as
crashes). The client runs in this process, so its RSS row is this process's: the harness and
hypothesis included. Needs the test extra (hypothesis). Writes ``benchmarks/out/fuzz.json``.

Measured (2 cores, ``--n 10000 --seed 7``, 167 s): 10,000 messages per socket, 0 crashes, every
victim ended; daemon RSS grew by at most 2.0 MiB from the warm-up to the end of its socket's run
(w0 +2.0, w1 +1.7, coordinator +1.0 MiB), and by at most 0.7 MiB while another socket was fuzzed.

Measured later (2 cores, ``--n 10000``, random seeds; ``--keyed`` writes ``benchmarks/out/fuzz_keyed.json``):
keyed, 144 s: w0, w1 and the client 10,000 messages each, 0 crashes, every victim ended, daemon RSS growth
<= 1.8 MiB; FORBIDDEN 862 (w0), 1,851 (w1), 629 forged (client), 453 (coordinator). The coordinator exited
after 8,550 messages, and in the open run (133 s) after 3,180: a registered worker's HEARTBEAT whose
``cache.load_bytes_per_s`` is a string, then any ADMIT: ``Coordinator._admit`` calls ``float()`` on it
outside its try (ValueError in the loop). Keyed, it takes a listed worker key (an insider); open, anyone.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import msgpack
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from edgesplit.runtime import protocol as P
from edgesplit.runtime.protocol import Msg

OUT = Path(__file__).resolve().parent / "out"
MIB = 1024**2
CANARY, PLAYGROUND = "dummy3", "dummy6"
FRAME_CAP = 256 * 1024  # largest payload frame sent: under every socket's MAXMSGSIZE (libzmq would drop the link)
PROBE_TIMEOUT_S = 10.0  # a daemon that does not answer its probe within this is counted as crashed (hung)
ERROR_LINE = re.compile(r"\S+ \S+ \S+ (ERROR|CRITICAL) ")  # the daemons' log format: date time logger level
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Exception in thread|Fatal Python error|Segmentation")


# --- templates: a message with values that are only known when it is sent ---------------------------------------
@dataclass(frozen=True)
class Ref:
    """A header value filled in at send time: ``rid`` (the id of a request the client waits for), ``new`` (a fresh
    request id), ``plan`` (a model's current plan id)."""

    kind: str
    arg: Any = None


@dataclass(frozen=True)
class Template:
    """One generated message; :meth:`frames` renders it (Refs resolved, mutations applied, header packed)."""

    sender: int  # which fuzzing DEALER sends it
    header: Any  # a dict, or any msgpack value
    payload: tuple[tuple[int, int], ...] = ()  # (length, seed) per payload frame: bytes made at send time
    mutations: tuple[tuple[str, str, Any], ...] = ()  # ("drop", key, None) / ("set", key, value)
    version: bytes = P.VERSION
    cut: int = 0  # bytes cut off the end of the packed header
    trailer: bytes = b""  # bytes after the packed header
    raw: tuple[tuple[int, int], ...] | None = None  # random frames (length, seed) instead of all the above

    def frames(self, resolve: Callable[[Ref], Any] = lambda r: None) -> list[bytes | memoryview]:
        if self.raw is not None:
            return [_blob(n, s) for n, s in self.raw]
        header = _resolved(self.header, resolve)
        if isinstance(header, dict):
            for op, key, value in self.mutations:
                if op == "drop":
                    header.pop(key, None)
                else:
                    header[key] = _resolved(value, resolve)
        packed = msgpack.packb(header, use_bin_type=True)
        if self.cut:
            packed = packed[:max(0, len(packed) - self.cut)]
        return [self.version + packed + self.trailer, *[_blob(n, s) for n, s in self.payload]]



def zmq_public_key() -> str:
    """A fresh CURVE public key that no member holds."""
    import zmq

    return zmq.curve_keypair()[0].decode()


def describe(frames: Sequence[bytes | memoryview]) -> str:
    """A message as sent, to reproduce it: the first frame as a bytes literal, payload frames by length and head."""
    return repr([bytes(frames[0]), *[f"<{len(f)} B: {bytes(f[:16])!r}...>" for f in frames[1:]]])


_RANDOM = memoryview(random.Random(20_251_129).randbytes(FRAME_CAP + 4096))
_ZEROS = memoryview(bytes(FRAME_CAP + 4096))


def _blob(n: int, s: int) -> memoryview:
    """``n`` payload bytes for seed ``s`` (0: zeros, else random ones from offset ``s``): one hypothesis draw per
    frame, and views of one buffer instead of a new one per frame (this process's heap would grow in a long run)."""
    return _ZEROS[:n] if s == 0 else _RANDOM[s % 4096:s % 4096 + n]


def _resolved(v: Any, resolve: Callable[[Ref], Any]) -> Any:
    if isinstance(v, Ref):
        return resolve(v)
    if isinstance(v, dict):
        return {k: _resolved(x, resolve) for k, x in v.items()}
    if isinstance(v, list):
        return [_resolved(x, resolve) for x in v]
    return v


# --- what the strategies know about the cluster -----------------------------------------------------------------
@dataclass
class Env:
    """Names and endpoints the strategies draw from (the defaults serve the decoder-only fuzz)."""

    models: tuple[str, ...] = (CANARY, PLAYGROUND)
    protected: frozenset[str] = frozenset({CANARY})  # no PLAN/UNDEPLOY/LINK names these (unless impersonating)
    hops: tuple[int, ...] = (0, 1)  # the stages the fuzzed worker hosts (RUNs name these mostly)
    workers: tuple[str, ...] = ("w0", "w1")
    worker_endpoints: tuple[str, ...] = ("tcp://127.0.0.1:1",)
    coordinator: str = "tcp://127.0.0.1:2"
    client_reply: str = "tcp://127.0.0.1:3"
    sink: str = "tcp://127.0.0.1:4"
    fake_names: tuple[str, ...] = ("fz0", "fz1")  # worker-like identities of the fuzzing DEALERs (name/tag)
    block_ids: tuple[str, ...] = ("0" * 64,)
    impersonate: bool = False
    rk_keys: tuple[str, ...] = ()  # keyed: public keys a RUN's ``rk`` names (the sink's first); empty: no rk drawn

    @property
    def dead_ends(self) -> list[str]:
        """Endpoints that pass the decoder's pattern but lead nowhere (or cannot even be connected to)."""
        return ["tcp://127.0.0.1:9", "tcp://*:5", "tcp://-:5", "ipc:///nonexistent/edgesplit-fuzz",
                "inproc://nowhere", "tcp://[::1]:1", "tcp://10.255.255.1:5555"]

    def rep_endpoints(self) -> list[str]:
        eps = [self.sink] * 12 + [self.client_reply] * 2 + list(self.worker_endpoints) + self.dead_ends
        return eps + [self.coordinator] if self.impersonate else eps

    def ready_endpoints(self) -> list[str]:
        return self.dead_ends + (list(self.worker_endpoints) if self.impersonate else [])

    def changeable_models(self) -> list[str]:
        return [m for m in self.models if self.impersonate or m not in self.protected] + ["nosuch"]


# --- value strategies ----------------------------------------------------------------------------------------------
_INT64 = st.integers(-(2**63), 2**64 - 1)
_SCALARS = (st.none() | st.booleans() | _INT64 | st.floats() | st.text(max_size=24) | st.binary(max_size=24))


def _nested(depth: int) -> Any:
    v: Any = 0
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


# wild: any msgpack value; one in nine hits an unpacker limit (long, many, deep) or is a nasty constant
_SMALL_WILD = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)
_BIG_WILD = st.one_of(
    st.integers(4000, 20_000).map(lambda n: "x" * n),
    st.integers(60, 5000).map(lambda n: list(range(n))),
    st.integers(60, 300).map(lambda n: {str(i): i for i in range(n)}),
    st.integers(60, 100).map(lambda n: b"b" * n),
    st.integers(20, 400).map(_nested),
    st.sampled_from([2**63 - 1, 2**64 - 1, -(2**63), float("nan"), float("inf"), -0.0, 1e308, True, ""]),
)
WILD = st.one_of(*[_SMALL_WILD] * 8, _BIG_WILD)


# A template's chaos: 0 = every field valid-looking (the message reaches the handlers), 1 = now and then a field
# is invalid or wild, 2 = often. Drawn per message: about half are 0.
CHAOS_ODDS = {1: 12, 2: 3}


@dataclass(frozen=True)
class Field:
    """A field's valid-looking values and its invalid ones (small wild values are always among the invalid)."""

    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any] = _SMALL_WILD


def _one_in(draw: st.DrawFn, k: int) -> bool:
    """True about one time in ``k``: the middle of the range, as hypothesis favours its ends (0 most)."""
    return draw(st.integers(0, k - 1)) == k // 2


def _pick(draw: st.DrawFn, f: Field | st.SearchStrategy[Any], chaos: int) -> Any:
    if not isinstance(f, Field):
        return draw(f)
    if chaos and _one_in(draw, CHAOS_ODDS[chaos]):
        return draw(f.invalid | _SMALL_WILD)  # the unpacker's limits are for mutations and whole headers
    return draw(f.valid)


def _rid(live: bool) -> Field:
    # mostly a fresh random id at send time (hypothesis repeats examples; a repeated id is a duplicate the worker
    # only ACKs), sometimes all zeros (duplicates on purpose) or drawn
    valid = st.one_of(*[st.just(Ref("new"))] * 8, st.just(bytes(P.RID_BYTES)),
                      st.binary(min_size=P.RID_BYTES, max_size=P.RID_BYTES))
    if live:  # the client: mostly requests it waits for
        valid = st.integers(0, 7).map(lambda i: Ref("rid", i)) | st.integers(0, 7).map(lambda i: Ref("rid", i)) | valid
    return Field(valid, st.binary(max_size=40).filter(lambda b: len(b) != P.RID_BYTES))


_BUD = Field(st.one_of(*[st.integers(2000, 30_000)] * 6, st.integers(1, 5000), st.just(0),
                       st.integers(0, P.MAX_BUDGET_MS)),
             st.integers(P.MAX_BUDGET_MS + 1, 2**64 - 1) | st.integers(-(2**63), -1) | st.floats())
_ATT = Field(st.integers(0, 3), st.integers(256, 2**64 - 1))
_ERR = Field(st.tuples(st.sampled_from([int(e) for e in P.Err]) | st.integers(0, 65535),
                       st.text(max_size=40)).map(list),
             st.tuples(st.integers(65536, 2**64 - 1) | WILD, st.text(max_size=40)).map(list)
             | st.integers(1025, 3000).map(lambda n: [1, "r" * n]))
_CODECS = st.sampled_from(["raw", "identity", "tokens", "fmap", "nope", "", "i" * 65])
_TRACE_REC = st.tuples(st.integers(0, 70), st.text(max_size=12), st.floats(), st.floats(), st.floats(),
                       st.floats(), st.integers(0, 2**40)).map(list)
_TRACE = Field(st.lists(_TRACE_REC, max_size=4),
               st.lists(_TRACE_REC, min_size=66, max_size=70) | st.lists(WILD, min_size=1, max_size=3))
_ACKS = Field(st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, P.MAX_HOPS)).map(list),
                       max_size=6),
              st.integers(256, 300).map(lambda n: [[bytes(16), 0]] * n)
              | st.lists(st.tuples(st.binary(max_size=20), st.integers(-1, 70)).map(list), min_size=1, max_size=3))
_DTYPE_CODE = st.sampled_from(sorted(P.DTYPE_BY_CODE))


def _hop(env: Env) -> Field:
    return Field(st.one_of(*[st.sampled_from(env.hops)] * 5, st.integers(0, 3)),
                 st.integers(P.MAX_HOPS + 1, 2**64 - 1) | st.integers(-(2**63), -1))


def _model(env: Env, changeable: bool = False) -> Field:
    names = env.changeable_models() if changeable else [*env.models] * 4 + ["nosuch"]
    return Field(st.one_of(*[st.sampled_from(names)] * 9, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}",
                                                                        fullmatch=True)),
                 st.sampled_from(["bad/name", "-x", "y" * 129, "", "a b"]))


def _endpoint(pool: Sequence[str]) -> Field:
    return Field(st.sampled_from(list(pool)),
                 st.sampled_from(["", "tcp://h", "http://x:1", "tcp://a b:1", "ipc://", "tcp://h:123456", "t" * 300]))


Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def _rk(env: Env) -> Field:
    """A requester key: mostly the sink's, else a member's, a z85 string no one holds (or not a key at all)."""
    return Field(st.one_of(*[st.sampled_from([env.rk_keys[0]] * 6 + list(env.rk_keys))] * 5,
                           st.text(Z85, min_size=P.KEY_Z85_CHARS, max_size=P.KEY_Z85_CHARS)),
                 st.sampled_from(["", "a" * 39, "a" * 41, " " * 40, "\u00e9" * 40, env.rk_keys[0] + "\n"])
                 | st.binary(min_size=32, max_size=32))


def _plan_id(model: Any) -> Field:
    return Field(st.just(Ref("plan", model)), st.integers(0, 2**62 + 1) | st.integers(2**62 + 1, 2**64 - 1))


@st.composite
def _payload(draw: st.DrawFn, chaos: int, input_like: bool = False) -> tuple[Any, tuple[tuple[int, int], ...]]:
    """(``ten`` specs, payload frames as (length, seed)): consistent at chaos 0, else sometimes lying or wild.

    ``input_like``: most tensors are what the dummy models take, float32 (B, 4).
    """
    n = draw(st.sampled_from([1] * 12 + [0, 2, 3]) if chaos == 0 else st.sampled_from([1] * 6 + [0, 2, 3, 16, 17]))
    specs: list[Any] = []
    frames: list[tuple[int, int]] = []
    for _ in range(n):
        if input_like and draw(st.integers(0, 9)) < 7:
            code, shape = 1, [draw(st.integers(1, 8) | st.just(0)), draw(st.sampled_from([4, 4, 4, 4, 5, 0, 1]))]
        else:
            code = draw(_DTYPE_CODE)
            shape = draw(st.lists(st.integers(0, 64), max_size=4) | st.lists(st.integers(0, 3), max_size=8))
        nbytes = P.DTYPE_BY_CODE[code].itemsize * math.prod(shape)
        length = nbytes if nbytes <= FRAME_CAP else draw(st.integers(0, 1024))
        spec: Any = [code, shape, nbytes]
        if chaos and _one_in(draw, CHAOS_ODDS[chaos]):
            spec = draw(st.sampled_from([
                [code, shape, nbytes + 1], [code, shape, 2**64 - 1], [code, [2**40, 2**40], 2**63 - 1],
                [code, [-1, 4], 16], [code, [0, 2**27, 2**27, 2**27], 0],
                [code, [1] * 9, P.DTYPE_BY_CODE[code].itemsize], [0, shape, nbytes], [11, shape, nbytes],
                [True, shape, nbytes], [code, shape], [code, tuple(shape), nbytes],
            ]) | WILD)
        elif chaos and _one_in(draw, CHAOS_ODDS[chaos]):
            length = draw(st.integers(0, 4096))
        specs.append(spec)
        frames.append((length, draw(st.sampled_from([0, 1, 2, 3]) | st.integers(4, 2**32))))
    if chaos and _one_in(draw, 10):
        if frames and draw(st.booleans()):
            frames.pop()  # one frame fewer than declared
        else:
            frames.append((draw(st.integers(0, 64)), 1))  # one more
    return specs, tuple(frames)


@st.composite
def _identity_link(draw: st.DrawFn, chaos: int) -> tuple[dict[str, Any], Any, tuple[tuple[int, int], ...]]:
    """(``cod``/``cmeta`` fields, specs, frames) of an activation for the identity codec's decoder."""
    dtype = draw(st.sampled_from(["fp16", "fp16", "fp32", "int8"]) if chaos == 0 else
                 st.sampled_from(["fp16", "fp32", "int8", "bf16", "FP16"]))
    shape = draw(st.just([1, 4]) | st.just([draw(st.integers(0, 8)), 4]) | st.lists(st.integers(0, 9), min_size=1,
                                                                                        max_size=4))
    axis = draw(st.integers(0, 1) | st.integers(0, 4))
    item = {"fp16": 2, "fp32": 4, "int8": 1}.get(dtype, 2)
    sizes = [item * math.prod(shape)]
    if dtype == "int8":
        sizes.append(4 * shape[min(axis, len(shape) - 1)])
    fields: dict[str, Field] = {
        "v": Field(st.just(1), st.integers(2, 9) | st.just(True)),
        "codec": Field(st.just("identity"), _CODECS),
        "dtype": Field(st.just(dtype)),
        "shape": Field(st.just(shape), st.lists(st.integers(-1, 2**40), max_size=9)),
        "axis": Field(st.just(axis), st.integers(-1, 99)),
        "kept": Field(st.none(), st.lists(st.integers(-1, 9), max_size=4) | st.just([0, 0])),
        "meta": Field(st.just({}), st.dictionaries(st.text(max_size=4), _INT64, min_size=1, max_size=2)),
    }
    meta = {k: _pick(draw, f, chaos) for k, f in fields.items()}
    if chaos:
        for key in list(meta):
            if _one_in(draw, CHAOS_ODDS[chaos] * 2):
                del meta[key]
        if _one_in(draw, CHAOS_ODDS[chaos]):
            sizes = [draw(st.integers(0, 256)) for _ in range(draw(st.integers(0, 3)))]
    specs = [[5, [n], n] for n in sizes]
    frames = tuple((n, draw(st.sampled_from([0, 1, 7]))) for n in sizes)
    return {"cod": _pick(draw, Field(st.just("identity"), _CODECS), chaos), "cmeta": meta}, specs, frames


@st.composite
def _map(draw: st.DrawFn, fields: dict[str, Field | st.SearchStrategy[Any]], required: Sequence[str],
         chaos: int) -> dict:
    """A map of some of ``fields`` (all of ``required`` unless chaos drops one), maybe a stray key."""
    out: dict[str, Any] = {}
    for key, f in fields.items():
        if key in required or draw(st.booleans()):
            out[key] = _pick(draw, f, chaos)
    if chaos:
        for key in list(out):
            if key in required and _one_in(draw, CHAOS_ODDS[chaos] * 2):
                del out[key]
        if _one_in(draw, CHAOS_ODDS[chaos]):
            out[draw(st.text(max_size=8))] = draw(WILD)
    return out


def _stage(env: Env) -> st.SearchStrategy[list[Any]]:
    """A StageInfo as a worker reports it: [model, hop, start, end, n_blocks, plan, next endpoints]."""
    return st.tuples(st.sampled_from([*env.models, "nosuch"]), st.integers(0, 6), st.integers(0, 6),
                     st.integers(0, 7), st.integers(0, 7), st.integers(0, 50),
                     st.none() | st.lists(st.sampled_from(env.ready_endpoints()), max_size=3)).map(list)


def _numbers() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=12), _INT64 | st.floats(), max_size=6)


def _body_fields(env: Env, t: Msg, me: str) -> tuple[dict[str, Field | st.SearchStrategy[Any]], tuple[str, ...]]:
    """A control body's fields for type ``t`` (from a sender whose identity names it ``me``) and required keys."""
    stages = Field(st.lists(_stage(env), max_size=3), st.lists(WILD, min_size=1, max_size=3))
    workers = st.lists(st.sampled_from([*env.workers, *env.fake_names, "nobody"]), max_size=4)
    link = Field(st.fixed_dictionaries({}, optional={
        "codec": _CODECS, "budget": st.none() | st.integers(1, 300), "wire_dtype": st.sampled_from(["fp16", "fp32",
                                                                                                      "int8", None]),
        "rate": st.none() | st.just("measured") | st.floats(1, 1e9), "share": st.floats(0.01, 1)}),
        st.fixed_dictionaries({"budget": st.integers(-5, 0) | st.booleans()}) | st.fixed_dictionaries(
            {"share": st.floats()}) | st.fixed_dictionaries({"rate": st.floats() | st.text(max_size=4)}))
    names = [me] * 4 + [*env.fake_names, ""] + (list(env.workers) if env.impersonate else [])
    count = Field(st.integers(0, 2**40), st.integers(-(2**63), -1) | st.floats())
    fields: dict[Msg, dict[str, Field | st.SearchStrategy[Any]]] = {
        Msg.READY: {"name": Field(st.sampled_from(names), st.text(min_size=65, max_size=70)),
                    "endpoint": _endpoint(env.ready_endpoints()),
                    "device": st.sampled_from(["cpu", "cuda:0"]), "memory_budget_bytes": count,
                    "host": st.text(max_size=8), "pid": count, "stages": stages,
                    "state": Field(st.sampled_from(["live", "deploying"]), st.text(max_size=5)),
                    "telemetry": _numbers(), "last_seen_s": st.floats(), "stats": st.lists(WILD, max_size=3),
                    "cache": _numbers(), "resident": st.lists(st.lists(WILD, min_size=2, max_size=2), max_size=3)},
        Msg.HEARTBEAT: {"stages": stages, "telemetry": _numbers(), "kept": count, "queue": count,
                        "counters": _numbers(), "stats": st.lists(WILD, max_size=3),
                        "cache": _numbers() | st.fixed_dictionaries({"load_bytes_per_s": st.floats() | st.text()}),
                        "resident": st.lists(st.lists(st.sampled_from(env.models) | st.integers(0, 2), min_size=2,
                                                      max_size=2), max_size=3)},
        Msg.DEPLOYED: {"model": _model(env), "stages": stages, "load_ms": st.floats(),
                       "fetched_bytes": count, "loaded_bytes": count},
        Msg.FETCH: {"id": Field(st.sampled_from(list(env.block_ids)), st.text(max_size=70) | st.just("../plans")),
                    "off": Field(st.integers(0, 4096), st.integers(-5, -1) | st.integers(2**62, 2**63 - 1)),
                    "len": Field(st.integers(1, P.CHUNK_BYTES), st.integers(-1, 0) | st.just(P.CHUNK_BYTES + 1))},
        Msg.PLAN: {"model": _model(env, changeable=True), "stages": Field(st.lists(st.tuples(
                       st.sampled_from([*env.workers, *env.fake_names, "nobody"]), st.integers(0, 7),
                       st.integers(0, 7)).map(list), max_size=4)), "workers": workers,
                   "n_stages": Field(st.integers(1, 8), st.integers(-1, 0) | st.integers(9, 2**64 - 1)),
                   "splits": st.lists(st.integers(-1, 8), max_size=4),
                   "replicas": Field(st.integers(1, 3), st.integers(-1, 20)),
                   "links": st.lists(st.none() | link.valid, max_size=4), "load": st.booleans()},
        Msg.LINK: {"model": _model(env, changeable=True), "cut": Field(st.integers(0, 1), st.integers(-1, 9)),
                   "link": link},
        Msg.PREFETCH: {"model": _model(env), "hint": st.lists(st.sampled_from(env.models), max_size=4),
                       "workers": workers, "loaded_bytes": count},
        Msg.UNDEPLOY: {"model": _model(env, changeable=True)},
        Msg.ADMIT: {"user": st.text(max_size=80),
                    "deadline_ms": Field(st.floats(1, 1e6) | st.integers(1, 10**6), st.floats() | st.integers(-5, 0)),
                    "bytes": count},
        Msg.DONE: {"lag_ms": Field(st.floats(-1e4, 1e4) | st.integers(-10**4, 10**4), st.floats() | _INT64)},
        Msg.NOTICE: {"lost": st.text(max_size=8), "lost_endpoint": _endpoint(env.dead_ends),
                     "alive": st.text(max_size=8), "alive_endpoint": _endpoint(env.dead_ends)},
    }
    required = {Msg.READY: ("name", "endpoint"), Msg.FETCH: ("id", "off", "len"), Msg.PLAN: ("model",),
                Msg.LINK: ("model", "cut", "link"), Msg.UNDEPLOY: ("model",), Msg.ADMIT: ("deadline_ms",),
                Msg.DONE: ("lag_ms",), Msg.PREFETCH: ("model",), Msg.DEPLOYED: ("model",)}
    return fields.get(t, {"x": WILD}), required.get(t, ())


# message types each socket is fuzzed with (drawn evenly, then one in ten of any type)
COORDINATOR_TYPES = [Msg.HEARTBEAT, Msg.DEPLOYED, Msg.ERROR, Msg.FETCH, Msg.HELLO, Msg.READY, Msg.ROUTE, Msg.WORKERS,
                     Msg.MODELS, Msg.PLAN, Msg.LINK, Msg.PREFETCH, Msg.UNDEPLOY, Msg.ADMIT, Msg.DONE]
KINDS = ("coordinator", "worker", "client", "any")
SENDERS = {"coordinator": 3, "worker": 2, "client": 2, "any": 1}


def _type(kind: str) -> st.SearchStrategy[Msg]:
    if kind == "coordinator":
        usual = st.sampled_from(COORDINATOR_TYPES)
    elif kind == "worker":
        usual = st.sampled_from([Msg.RUN] * 8 + [Msg.HEARTBEAT, Msg.ACK])
    elif kind == "client":
        usual = st.sampled_from([Msg.RESULT, Msg.ERROR])
    else:
        return st.sampled_from(list(Msg))
    return st.integers(0, 9).flatmap(lambda i: st.sampled_from(list(Msg)) if i == 5 else usual)


@st.composite
def template(draw: st.DrawFn, env: Env, kind: str = "any") -> Template:
    """One message for a socket of ``kind`` (see ``KINDS``)."""
    sender = draw(st.integers(0, SENDERS[kind] - 1))
    form = draw(st.integers(0, 39))  # 15-23: broken framing or header; else structurally valid
    if form == 15:  # random frames
        return Template(sender, None, raw=tuple(draw(st.lists(st.tuples(st.integers(0, 600), st.integers(1, 2**32)),
                                                              min_size=1, max_size=4))))
    if form == 16:  # a header that is not a map, or over the size cap
        return Template(sender, draw(WILD | st.integers(17_000, 30_000).map(lambda n: {"body": "z" * n})))
    chaos = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 1, 1, 2, 2]))
    t = draw(_type(kind))
    header: dict[str, Any] = {"t": int(t), "rid": _pick(draw, _rid(live=kind == "client"), chaos),
                              "bud": _pick(draw, _BUD, chaos)}
    payload: tuple[tuple[int, int], ...] = ()
    specs: Any = []

    def some(key: str, f: Field | st.SearchStrategy[Any], one_in: int = 2) -> None:
        if _one_in(draw, one_in):
            header[key] = _pick(draw, f, chaos)

    if t in (Msg.RUN, Msg.RESULT):
        model = _pick(draw, _model(env), chaos)
        header.update({"mdl": model, "hop": _pick(draw, _hop(env), chaos),
                       "rep": _pick(draw, _endpoint(env.rep_endpoints()), chaos)})
        if t == Msg.RUN and draw(st.integers(0, 5)) or t == Msg.RESULT and draw(st.booleans()):
            header["pln"] = _pick(draw, _plan_id(model), chaos)
        if t == Msg.RUN and model == PLAYGROUND and 1 in env.hops and draw(st.booleans()):
            fields, specs, payload = draw(_identity_link(chaos))  # an activation for dummy6's codec link
            header.update(fields, hop=_pick(draw, Field(st.just(1)), chaos))
        else:
            specs, payload = draw(_payload(chaos, input_like=True))
            some("cod", Field(st.just("raw"), _CODECS), 6)
            some("cmeta", Field(st.just({}), st.dictionaries(st.text(max_size=6), WILD, min_size=1, max_size=4)), 6)
        some("att", _ATT, 4)
        some("trc", _TRACE, 4)
        if env.rk_keys and t == Msg.RUN and not _one_in(draw, 10):  # keyed only: open draws stay as they were
            header["rk"] = _pick(draw, _rk(env), chaos)
    elif t == Msg.ACK:
        header["hop"] = _pick(draw, _hop(env), chaos)
        some("acks", _ACKS)
    elif t == Msg.ERROR:
        header["err"] = _pick(draw, _ERR, chaos)
        some("hop", _hop(env))
        some("att", _ATT)
        some("mdl", _model(env))
    else:
        if t in (Msg.ROUTE, Msg.ADMIT):
            header["mdl"] = _pick(draw, _model(env), chaos)
        if "body" in P.REQUIRED_KEYS.get(t, ()) or draw(st.booleans()):
            fields, required = _body_fields(env, t, env.fake_names[sender % len(env.fake_names)])
            header["body"] = draw(_map(fields, required, chaos))
        if t in (Msg.DEPLOY, Msg.CHUNK) or _one_in(draw, 10):
            specs, payload = draw(_payload(chaos))
    if specs or payload:
        header["ten"] = specs
    if chaos:  # a required key dropped now and then
        for key in sorted(P.REQUIRED_KEYS.get(t, ())):
            if _one_in(draw, CHAOS_ODDS[chaos] * 2):
                header.pop(key, None)
    mutations: list[tuple[str, str, Any]] = []
    if form in (17, 18, 19, 20):
        keys = sorted(P.HEADER_KEYS)
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["drop", "set", "set", "unknown"]))
            if op == "drop":
                mutations.append(("drop", draw(st.sampled_from(keys)), None))
            elif op == "set":
                mutations.append(("set", draw(st.sampled_from(keys)), draw(WILD)))
            else:
                mutations.append(("set", draw(st.text(min_size=1, max_size=6)), draw(WILD)))
    version, cut, trailer = P.VERSION, 0, b""
    if form == 21:
        version = draw(st.sampled_from([b"ESP1", b"", b"ESP3", b"ESP", b"esp2", b"\x00" * 4]) | st.binary(max_size=6))
    elif form == 22:
        cut = draw(st.integers(1, 40))
    elif form == 23:
        trailer = draw(st.binary(min_size=1, max_size=8))
    return Template(sender, header, payload, tuple(mutations), version, cut, trailer)


def templates(env: Env, kind: str, n: int) -> st.SearchStrategy[list[Template]]:
    return st.lists(template(env, kind), min_size=n, max_size=n)

# --- the cluster ---------------------------------------------------------------------------------------------------
FUZZ_KEYS = {"fz0": "worker", "fz1": "worker", "fzop": "operator"}  # keyed: extra key holders of the fuzzer
# keyed: whose keys send on each socket, one per fuzzing DEALER (SENDERS of its kind). The coordinator's worker-like
# senders hold the keys named like their identities (Env.fake_names); "user", "w0", "w1": the cluster's own keys
KEYED_SENDERS = {"coordinator": ("fz0", "fz1", "fzop"), "w0": ("user", "user"), "w1": ("w0", "user"),
                 "client": ("w1", "w0")}
KEYED_REROUTE = 0.8  # keyed: a message the drawn sender's key may not send goes from one whose key may, this often


class FuzzCluster:
    """A coordinator, two workers and a client on 127.0.0.1; the canary and the playground model deployed.

    ``keyed``: CURVE and roles on every socket (``LocalCluster`` makes the keys), plus ``FUZZ_KEYS`` listed in every
    daemon's key directory; the client holds the operator's key.
    """

    def __init__(self, workdir: str | os.PathLike[str], keyed: bool = False) -> None:
        self.workdir = Path(workdir)
        self.keyed = keyed
        self.lc: Any = None
        self.client: Any = None

    def start(self) -> "FuzzCluster":
        import torch

        from edgesplit.partitioner import BlockStore, partition
        from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig
        from edgesplit.runtime.dummy import build_dummy, dummy_recipe

        store = BlockStore(self.workdir / "store")
        for name, n in ((CANARY, 3), (PLAYGROUND, 6)):
            partition(build_dummy(n_blocks=n), name, dummy_recipe(n), store, input_shape=[4], profile=False)
        self.block_ids = tuple(b.id for m in (CANARY, PLAYGROUND) for b in store.manifest(m).blocks)
        self.lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1, keyed=self.keyed),
                               store=store.root, workdir=str(self.workdir / "cluster"))
        if self.keyed:
            for name, role in FUZZ_KEYS.items():
                self.lc.add_key(name, role)
        self.lc.start(timeout_s=90)
        self.client = self.lc.client(timeout_ms=10_000)
        self.routes = {CANARY: self.client.deploy(CANARY, stages=[("w0", 0, 2), ("w1", 2, 3)]),
                       PLAYGROUND: self.client.deploy(PLAYGROUND, stages=[("w0", 0, 3), ("w1", 3, 6)],
                                                      links=[{"codec": "identity", "wire_dtype": "fp16"}])}
        self.canary_x = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 3
        self.canary_y = self.client.infer(CANARY, self.canary_x).clone()
        return self

    def stop(self) -> None:
        if self.lc is not None:
            self.lc.stop()

    def env(self, impersonate: bool = False) -> Env:
        rk_keys = (self.public_key("user"), self.public_key("operator"), self.public_key("w1"),
                   zmq_public_key()) if self.keyed else ()  # the sink holds the user's key: rk_keys[0]
        return Env(worker_endpoints=tuple(self.lc.worker_endpoint(w) for w in ("w0", "w1")),
                   coordinator=self.lc.endpoint, client_reply=self.client.reply_endpoint, sink="",
                   block_ids=self.block_ids, impersonate=impersonate, rk_keys=rk_keys)

    def public_key(self, holder: str) -> str:
        """Keyed: the public key (z85) of a key holder (a daemon, ``operator``, ``user`` or one of ``FUZZ_KEYS``)."""
        from edgesplit.runtime.security import load_keys

        return load_keys(self.lc.key_dir(holder)).me.key

    def server_key(self, target: str) -> str:
        """Keyed: the public key of the socket ``target`` serves (the client's result socket: its own key)."""
        return self.public_key({"client": "operator"}.get(target, target))

    def plans(self) -> dict[str, int]:
        """Each model's current plan id (a fuzzed PLAN of the playground may have changed it)."""
        from edgesplit.runtime.errors import RuntimeFailure

        out = {}
        for m in (CANARY, PLAYGROUND):
            try:
                out[m] = self.client.route(m, refresh=True).plan
            except RuntimeFailure:
                out[m] = self.routes[m].plan
        return out

    def daemons(self) -> dict[str, int]:
        return {n: self.lc.pid(n) for n in ("coordinator", "w0", "w1")}

    def rss(self) -> dict[str, int]:
        """RSS in bytes of every daemon and of this process (where the client lives); 0 for a dead one."""
        import psutil

        out = {}
        for name, pid in {**self.daemons(), "client": os.getpid()}.items():
            try:
                out[name] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                out[name] = 0
        return out

    def dead(self) -> list[str]:
        """Daemons that exited, and the client if its io thread ended."""
        alive = self.lc.alive()
        out = [n for n in ("coordinator", "w0", "w1") if not alive.get(n, False)]
        return out + ([] if self.client._thread.is_alive() else ["client"])  # noqa: SLF001 - its one io thread

    def canary(self, timeout_ms: int = 10_000) -> str | None:
        """None when the canary request returns its first output again, else what went wrong."""
        import torch

        from edgesplit.runtime.errors import RuntimeFailure

        try:
            y = self.client.infer(CANARY, self.canary_x, timeout_ms=timeout_ms)
        except RuntimeFailure as e:
            return f"{type(e).__name__}: {e}"
        return None if torch.equal(y, self.canary_y) else f"canary output changed: {y.tolist()}"

    def log_sizes(self) -> dict[str, int]:
        return {n: (self.lc.log_dir / f"{n}.log").stat().st_size if (self.lc.log_dir / f"{n}.log").exists() else 0
                for n in ("coordinator", "w0", "w1")}

    def log_errors(self, since: dict[str, int]) -> dict[str, list[str]]:
        """ERROR-level lines each daemon logged after ``since``: states its code did not foresee (not crashes)."""
        out = {}
        for name, offset in since.items():
            path = self.lc.log_dir / f"{name}.log"
            text = path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""
            lines = [ln for ln in text.splitlines() if ERROR_LINE.match(ln)]
            if lines:
                out[name] = lines
        return out

    def tracebacks(self, since: dict[str, int]) -> dict[str, str]:
        """Daemon log text with a Python traceback (or fatal error) written after ``since`` (log sizes)."""
        out = {}
        for name, offset in since.items():
            path = self.lc.log_dir / f"{name}.log"
            text = path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""
            m = TRACEBACK.search(text)
            if m:
                out[name] = text[max(0, m.start() - 2000):m.start() + 4000]
        return out


# --- one socket's fuzz ---------------------------------------------------------------------------------------------
@dataclass
class SocketReport:
    """What fuzzing one socket did and what the cluster did meanwhile (RSS in bytes per process)."""

    socket: str
    sent: int = 0
    replies: int = 0
    answers: dict[str, int] = field(default_factory=dict)  # replies and sink messages by type (ERROR: by code)
    sink: int = 0  # results/errors the workers sent to the sink endpoint
    send_stalls: int = 0  # sends that found the socket's queue full for SEND_TIMEOUT_MS
    # keyed: refused by a role or route check (FORBIDDEN answers; the client's socket answers nothing: the RESULTs
    # and ERRORs it dropped as not from its request's route), messages rerouted to a sender whose key may send them,
    # and who sent ("name (role)" per DEALER)
    forbidden: int = 0
    rerouted: int = 0
    senders: list[str] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    victims: dict[str, int] = field(default_factory=dict)  # client only: how each victim request ended
    client_log: dict[str, int] = field(default_factory=dict)  # this process's edgesplit log records by level
    victim_late_s: float = -math.inf  # the latest a victim ended past its deadline (negative: all before it)
    daemon_errors: dict[str, list[str]] = field(default_factory=dict)  # ERROR lines in the daemons' logs
    rss_start: dict[str, int] = field(default_factory=dict)  # before the first message
    rss_before: dict[str, int] = field(default_factory=dict)  # after the warm-up
    rss_after: dict[str, int] = field(default_factory=dict)
    rss_max: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def growth(self) -> dict[str, int]:
        """RSS after minus after the warm-up, per process (bytes)."""
        return {n: self.rss_after.get(n, 0) - b for n, b in self.rss_before.items()}


SEND_TIMEOUT_MS = 2000
VICTIM_TIMEOUT_MS = 3000  # a victim's deadline; the client must end it by then, whatever it is sent
VICTIM_GRACE_S = 1.0  # ... give or take this (the client sweeps every 20 ms; this machine may be loaded)


class _LogTally(logging.Handler):
    """Counts this process's ``edgesplit`` log records (the client's) and keeps any that carry a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1
        if record.exc_info and len(self.tracebacks) < 5:
            self.tracebacks.append(logging.Formatter().format(record))


class _KeyHolder:
    """A key holder of a keyed cluster, as the fuzzer: its key ring, and a zmq context of its own with its
    :class:`Security` (a context takes one ZAP handler, so one context per holder)."""

    def __init__(self, key_dir: Path, domains: dict[str, frozenset[str]] | None = None) -> None:
        import zmq

        from edgesplit.runtime.security import Security, load_keys

        self.keys = load_keys(key_dir)
        self.ctx = zmq.Context()
        self.sec = Security(self.ctx, self.keys, domains or {})

    @property
    def label(self) -> str:
        return f"{self.keys.me.name} ({self.keys.me.role})"

    def close(self) -> None:
        self.sec.close()
        self.ctx.destroy(linger=0)


def _key_may_send(target: str, holder: str, role: str, header: Any) -> bool:
    """Keyed: whether ``target``'s role and route checks let the key of ``holder`` (of ``role``) send this message.
    A guess from the template's header (mutations may change it; a message that does not decode meets no check)."""
    from edgesplit.runtime.security.roles import RUNNERS, coordinator_takes

    h = header if isinstance(header, dict) else {}
    try:
        t = Msg(h.get("t"))
    except (ValueError, TypeError):
        return True
    if target == "coordinator":
        return coordinator_takes(role, t)
    if target == "client":  # a RESULT only from its route's last hop (w1, for both models), an ERROR from any hop
        return t != Msg.RESULT or holder == "w1"
    if t != Msg.RUN:
        return True  # the data socket's HEARTBEAT (and what it refuses as not a RUN) meet no role check
    hop = h.get("hop")
    if type(hop) is int and hop == 0:
        return role in RUNNERS
    return target == "w1" and hop == 1 and holder == "w0"  # hop 1 (hosted on w1) from the plan's previous hop


class Fuzzer:
    """Sends generated messages to one socket of a :class:`FuzzCluster` and watches the cluster.

    Keyed (the cluster is): each fuzzing DEALER holds a key (``KEYED_SENDERS``) and speaks CURVE to the target; the
    sink is a CURVE result socket holding the user's key (the ``rk`` of what the user's key runs), open to workers.
    """

    def __init__(self, fc: FuzzCluster, impersonate: bool = False) -> None:
        import zmq

        self.fc, self.zmq = fc, zmq
        self.ctx = zmq.Context()
        self.keyed = fc.keyed
        self.holders: dict[str, _KeyHolder] = {}
        if self.keyed:
            from edgesplit.runtime.security.roles import CONNECT, RESULTS

            user = self._holder("user", {RESULTS: CONNECT[RESULTS]})
            self.sink = user.ctx.socket(zmq.ROUTER)
            user.sec.serve(self.sink, RESULTS)
        else:
            self.sink = self.ctx.socket(zmq.ROUTER)
        self.sink.setsockopt(zmq.LINGER, 0)
        self.sink.setsockopt(zmq.RCVHWM, 100_000)
        self.env = fc.env(impersonate)
        self.env.sink = f"tcp://127.0.0.1:{self.sink.bind_to_random_port('tcp://127.0.0.1')}"
        self.tag = os.urandom(3).hex()
        self.log = _LogTally()
        lg = logging.getLogger("edgesplit")
        lg.addHandler(self.log)
        self._propagate, lg.propagate = lg.propagate, False  # thousands of warnings: counted, not printed

    def close(self) -> None:
        lg = logging.getLogger("edgesplit")
        lg.removeHandler(self.log)
        lg.propagate = self._propagate
        self.ctx.destroy(linger=0)
        for h in self.holders.values():
            h.close()
        self.holders.clear()

    def _holder(self, name: str, domains: dict[str, frozenset[str]] | None = None) -> _KeyHolder:
        if name not in self.holders:
            self.holders[name] = _KeyHolder(self.fc.lc.key_dir(name), domains)
        return self.holders[name]

    def _dealers(self, endpoint: str, kind: str, target: str = "") -> list[Any]:
        zmq = self.zmq
        socks = []
        for i in range(SENDERS[kind]):
            holder = self._holder(KEYED_SENDERS[target][i]) if self.keyed else None
            s = (holder.ctx if holder is not None else self.ctx).socket(zmq.DEALER)
            ident = f"{self.env.fake_names[i]}/{self.tag}" if kind == "coordinator" and i < 2 else f"c-fz{i}-{self.tag}"
            s.setsockopt(zmq.IDENTITY, ident.encode())
            for opt, v in ((zmq.LINGER, 0), (zmq.SNDHWM, 100_000), (zmq.RCVHWM, 100_000),
                           (zmq.SNDTIMEO, SEND_TIMEOUT_MS)):
                s.setsockopt(opt, v)
            if holder is not None:
                holder.sec.dial(s, self.fc.server_key(target))
            s.connect(endpoint)
            socks.append(s)
        return socks

    def _drain(self, socks: list[Any], probes: set[bytes], report: SocketReport) -> None:
        for s in socks:
            while True:
                try:
                    frames = s.recv_multipart(self.zmq.NOBLOCK)
                except self.zmq.Again:
                    break
                report.replies += 1
                rid = P.salvage_rid(frames)
                if rid in probes:
                    probes.discard(rid)
                else:
                    _count_answer(report.answers, frames)
        while True:
            try:
                frames = self.sink.recv_multipart(self.zmq.NOBLOCK)
            except self.zmq.Again:
                break
            report.sink += 1
            _count_answer(report.answers, frames[1:], "sink ")

    def _probe(self, socks: list[Any], kind: str, report: SocketReport) -> bool:
        """A round trip on every sender: the daemon has handled everything sent before it. False: no answer."""
        if kind == "client":
            return True
        mtype = Msg.HELLO if kind == "coordinator" else Msg.HEARTBEAT
        probes = set()
        for s in socks:
            rid = P.new_rid()
            probes.add(rid)
            s.send_multipart(P.encode(mtype, rid, 1000))
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        poller = self.zmq.Poller()
        for s in socks:
            poller.register(s, self.zmq.POLLIN)
        while probes and time.monotonic() < deadline:
            poller.poll(20)
            self._drain(socks, probes, report)
        return not probes

    def run(self, target: str, n: int, batch: int = 10, warmup: int = 0, canary_every: int = 10,
            rng_seed: int | None = None, on_batch: Callable[[SocketReport], None] | None = None) -> SocketReport:
        """Send ``n`` generated messages to ``target`` ("coordinator", "w0", "w1" or "client")."""
        fc = self.fc
        kind = "coordinator" if target == "coordinator" else "client" if target == "client" else "worker"
        endpoint = {"coordinator": fc.lc.endpoint, "client": fc.client.reply_endpoint}.get(target) or \
            fc.lc.worker_endpoint(target)
        socks = self._dealers(endpoint, kind, target)
        report = SocketReport(target)
        senders = [self.holders[h] for h in KEYED_SENDERS[target]] if self.keyed else []
        report.senders = [h.label for h in senders]
        reroute = random.Random(rng_seed)
        forged = fc.client.forged
        plans = fc.plans()
        victims: list[Any] = []
        live: list[bytes] = []
        named: dict[bytes, list[str]] = {}  # victim rid -> the generated messages that named it

        def resolve(ref: Ref) -> Any:
            if ref.kind == "new":
                return os.urandom(P.RID_BYTES)
            if ref.kind == "rid":
                return live[ref.arg % len(live)] if live else os.urandom(P.RID_BYTES)
            return plans.get(ref.arg, 1) if isinstance(ref.arg, str) else 1

        logs = fc.log_sizes()
        self.log.counts.clear()
        report.rss_start = fc.rss()
        report.rss_max = dict(report.rss_start)
        t0 = time.monotonic()
        state = {"batches": 0, "stop": False}

        def one_batch(batch_msgs: list[Template]) -> None:
            if state["stop"] or report.sent >= n:
                return
            if kind == "client":  # requests the client waits for while the batch names them
                import torch

                live.clear()
                for i in range(4):
                    f = fc.client.submit(CANARY, torch.full((1, 4), float(i)), timeout_ms=VICTIM_TIMEOUT_MS)
                    f.t_submit = time.monotonic()
                    f.add_done_callback(lambda f: setattr(f, "t_end", time.monotonic()))
                    victims.append((f, torch.full((1, 4), i + 3.0)))
                    live.append(f.info.rid)
            if kind == "coordinator" and state["batches"] % 20 == 0:  # keep the worker-like senders registered,
                for i, name in enumerate(self.env.fake_names):  # so HEARTBEAT, FETCH, ... reach the worker handlers
                    socks[i].send_multipart(P.encode(Msg.READY, P.new_rid(), 3000, {"body": {
                        "name": name, "endpoint": self.env.dead_ends[i], "device": "cpu",
                        "memory_budget_bytes": 1 << 30, "host": "fuzz", "pid": os.getpid(), "stages": []}}))
            rendered = []
            for tpl in batch_msgs:
                frames = tpl.frames(resolve)
                sender = tpl.sender
                if senders and not _key_may_send(target, senders[sender].keys.me.name, senders[sender].keys.me.role,
                                                 tpl.header):
                    fit = [i for i, h in enumerate(senders) if _key_may_send(target, h.keys.me.name, h.keys.me.role,
                                                                             tpl.header)]
                    if fit and reroute.random() < KEYED_REROUTE:
                        sender = reroute.choice(fit)
                        report.rerouted += 1
                rendered.append((sender, frames))
                if kind == "client":
                    rid = P.salvage_rid(frames)
                    if rid in live:
                        named.setdefault(rid, []).append(self._describe(senders, sender, frames))
                try:
                    socks[sender].send_multipart(frames, copy=True)
                except self.zmq.Again:
                    report.send_stalls += 1
                report.sent += 1
            state["batches"] += 1
            answered = self._probe(socks, kind, report)
            self._drain(socks, set(), report)
            problem = None
            dead = fc.dead()
            if dead:
                problem = f"died: {dead}"
            elif not answered:
                problem = f"{target} did not answer its probe within {PROBE_TIMEOUT_S} s"
            elif state["batches"] % canary_every == 0:
                problem = fc.canary()
                if problem:
                    problem = f"canary failed: {problem}"
            if problem is None and self.log.tracebacks:
                problem = "the client logged a traceback:\n" + "\n".join(self.log.tracebacks)
            if problem is None and state["batches"] % canary_every == 0:
                tbs = fc.tracebacks(logs)
                if tbs:
                    problem = "traceback in the log of " + ", ".join(tbs)
            if problem is not None:
                report.crashes.append({"after_sent": report.sent, "problem": problem,
                                       "batch": [self._describe(senders, i, f) for i, f in rendered],
                                       "logs": {k: fc.lc.log_tail(k, 4000) for k in ("coordinator", "w0", "w1")},
                                       "tracebacks": fc.tracebacks(logs)})
                state["stop"] = True
            rss = fc.rss()
            report.rss_max = {k: max(v, report.rss_max.get(k, 0)) for k, v in rss.items()}
            if not report.rss_before and report.sent >= warmup:
                report.rss_before = rss
            if on_batch is not None:
                on_batch(report)

        hops = {"w0": (0,), "w1": (1,)}.get(target, (0, 1))  # the stages the target hosts
        strategy = templates(replace(self.env, hops=hops), kind, batch)
        while report.sent < n and not state["stop"]:
            # at most 100 examples per run: hypothesis keeps a tree of every choice made in a run, hundreds of MiB
            # over 1,000 examples of 10 messages, which would show as this process's (the client's) RSS
            examples = min(100, math.ceil((n - report.sent) / batch))

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), print_blob=False)
            @given(strategy)
            def fuzz(batch_msgs: list[Template]) -> None:
                one_batch(batch_msgs)

            if rng_seed is not None:
                fuzz = seed(rng_seed + report.sent)(fuzz)
            fuzz()
        if victims:
            report.victims = _outcomes(victims)
            for f, _ in victims:
                late_s = getattr(f, "t_end", math.inf) - f.t_submit - VICTIM_TIMEOUT_MS / 1000
                report.victim_late_s = max(report.victim_late_s, late_s)
                if late_s > VICTIM_GRACE_S:  # a hang: what named it is the way to reproduce it
                    when = "never ended" if math.isinf(late_s) else f"ended {late_s:.1f} s after its deadline"
                    report.crashes.append({"after_sent": report.sent, "problem": f"a request the client waited for "
                                           f"(rid {f.info.rid.hex()}) {when}",
                                           "batch": named.get(f.info.rid, ["(no generated message named it)"])})
        report.client_log = dict(self.log.counts)
        report.daemon_errors = fc.log_errors(logs)
        self._drain(socks, set(), report)
        report.forbidden = sum(v for k, v in report.answers.items() if k.endswith(" FORBIDDEN"))
        if target == "client":
            report.forbidden += fc.client.forged - forged
        if not report.crashes:
            problem = fc.canary()
            dead = fc.dead()
            tbs = fc.tracebacks(logs)
            if problem or dead or tbs:
                report.crashes.append({"after_sent": report.sent, "problem": f"after the run: dead {dead}, "
                                       f"canary {problem}, tracebacks in {sorted(tbs)}", "tracebacks": tbs})
        time.sleep(0.5)  # let the last batch's work settle before the final sample
        report.rss_after = fc.rss()
        report.rss_before = report.rss_before or report.rss_start
        report.seconds = time.monotonic() - t0
        for s in socks:
            s.close(0)
        return report


    @staticmethod
    def _describe(senders: list[_KeyHolder], i: int, frames: Sequence[bytes | memoryview]) -> str:
        """A message as sent, with its sender's key when keyed (to reproduce it, send it as that key holder)."""
        return f"from {senders[i].label}: {describe(frames)}" if senders else describe(frames)


def _count_answer(counts: dict[str, int], frames: list[bytes], prefix: str = "") -> None:
    try:
        msg = P.decode(frames)
        key = msg.type.name + (f" {P.err_name(msg.get('err')[0])}" if msg.type == Msg.ERROR else "")
    except P.ProtocolError:
        key = "undecodable"
    counts[prefix + key] = counts.get(prefix + key, 0) + 1


def _outcomes(victims: list[tuple[concurrent.futures.Future, Any]]) -> dict[str, int]:
    """How each request ended: "result" (its own), "fuzzed result" (a generated RESULT's tensor), an exception's
    class name, or "hung" (no end 5 s past its deadline)."""
    import torch

    out: dict[str, int] = {}
    for f, expected in victims:
        concurrent.futures.wait([f], timeout=VICTIM_TIMEOUT_MS / 1000 + 5)
        if not f.done():
            what = "hung"
        elif f.exception() is not None:  # (RequestTimeout is a TimeoutError too: not a hang)
            what = type(f.exception()).__name__
        else:
            y = f.result()
            what = "result" if isinstance(y, torch.Tensor) and y.shape == expected.shape and torch.equal(y, expected) \
                else "fuzzed result"
        out[what] = out.get(what, 0) + 1
    return out


# --- the benchmark -------------------------------------------------------------------------------------------------
def _mib(b: int) -> str:
    return f"{b / MIB:7.1f}"


def print_table(reports: list[SocketReport]) -> None:
    print(f"\n{'socket':12} {'sent':>7} {'replies':>8} {'sink':>6} {'stalls':>6} {'forbidden':>9} {'rerouted':>8} "
          f"{'crashes':>7} {'seconds':>8}")
    for r in reports:
        print(f"{r.socket:12} {r.sent:7d} {r.replies:8d} {r.sink:6d} {r.send_stalls:6d} {r.forbidden:9d} "
              f"{r.rerouted:8d} {len(r.crashes):7d} {r.seconds:8.1f}")
    if any(r.senders for r in reports):
        print("(keyed: forbidden = refused by a role or route check: FORBIDDEN answers, and on the client RESULTs and "
              "ERRORs it dropped as not from the request's route; rerouted = sent from another key than drawn, one "
              "that may send it)")
        for r in reports:
            print(f"{r.socket} senders: {', '.join(r.senders)}")
    print("\nRSS MiB per process while fuzzing each socket (start = before its first message, before = after the "
          "warm-up, max = largest sample)")
    print(f"{'socket':12} {'process':12} {'start':>7} {'before':>7} {'after':>7} {'max':>7} {'growth':>7}")
    for r in reports:
        for name in r.rss_after:
            print(f"{r.socket:12} {name:12} {_mib(r.rss_start.get(name, 0))} {_mib(r.rss_before.get(name, 0))} "
                  f"{_mib(r.rss_after[name])} {_mib(r.rss_max.get(name, 0))} {_mib(r.growth()[name])}")
    for r in reports:
        answers = ", ".join(f"{k} {v}" for k, v in sorted(r.answers.items(), key=lambda kv: -kv[1]))
        print(f"\n{r.socket} answered: {answers or '-'}")
        if r.client_log:
            print(f"{r.socket}: the client (this process) logged {r.client_log}")
        for name, lines in r.daemon_errors.items():
            print(f"{r.socket}: {name} logged {len(lines)} ERROR line(s), e.g. {lines[0][:300]}")
        if r.victims:
            print(f"{r.socket}: victims (requests it waited for, named by generated RESULT/ERRORs): {r.victims}")
    for r in reports:
        for c in r.crashes:
            print(f"\nCRASH on {r.socket} after {c['after_sent']} messages: {c['problem']}")
            for msg in c.get("batch", []):
                print("  ", msg[:2000])
            for name, tb in c.get("tracebacks", {}).items():
                print(f"--- {name} log ---\n{tb}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="messages per socket (default 10000, the acceptance figure)")
    ap.add_argument("--sockets", nargs="+", default=["w0", "w1", "client", "coordinator"],
                    choices=["w0", "w1", "client", "coordinator"],
                    help="sockets to fuzz, in this order (the coordinator last: its fuzz changes what is deployed)")
    ap.add_argument("--batch", type=int, default=10, help="messages per hypothesis example, then a probe round trip")
    ap.add_argument("--warmup", type=int, default=500, help="messages per socket before the 'before' RSS sample")
    ap.add_argument("--canary-every", type=int, default=10, help="batches between canary requests")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    ap.add_argument("--impersonate", action="store_true",
                    help="let messages use the members' names and endpoints and change the canary's plan")
    ap.add_argument("--keyed", action="store_true",
                    help="a keyed cluster (CURVE, ZAP, roles), fuzzed by key holders whose role reaches the handlers")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/out/fuzz.json (fuzz_keyed.json)")
    args = ap.parse_args(argv)
    args.out = args.out or OUT / ("fuzz_keyed.json" if args.keyed else "fuzz.json")
    t0 = time.monotonic()
    reports: list[SocketReport] = []
    with tempfile.TemporaryDirectory(prefix="edgesplit-fuzz-") as tmp:
        fc = FuzzCluster(tmp, keyed=args.keyed).start()
        fz = Fuzzer(fc, args.impersonate)
        try:
            print(f"{'keyed' if args.keyed else 'open'} cluster up in {time.monotonic() - t0:.1f} s; fuzzing "
                  f"{args.sockets}, {args.n} messages each", flush=True)
            for target in args.sockets:
                def progress(r: SocketReport, every: int = max(args.batch, args.n // 10 // args.batch * args.batch)):
                    if r.sent % every == 0:
                        print(f"  {r.socket}: {r.sent} sent, {r.replies} replies, RSS MiB "
                              f"{ {k: round(v / MIB, 1) for k, v in fc.rss().items()} }", flush=True)

                reports.append(fz.run(target, args.n, batch=args.batch, warmup=min(args.warmup, args.n // 2),
                                      canary_every=args.canary_every, rng_seed=args.seed, on_batch=progress))
                if any(r.crashes for r in reports):
                    break
        finally:
            fc.stop()  # first: the client logs until it is closed, and the fuzzer counts those records
            fz.close()
    print_table(reports)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "seconds": time.monotonic() - t0,
                                    "reports": [{**asdict(r), "growth": r.growth()} for r in reports]}, indent=1))
    print(f"\nwrote {args.out} ({time.monotonic() - t0:.0f} s in all)")
    return 1 if any(r.crashes for r in reports) or any(r.victims.get("hung") for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
