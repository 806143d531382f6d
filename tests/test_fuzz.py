"""Property-based fuzzing (hypothesis) of the decoder and of every socket a daemon reads from the network.

Acceptance (input hardening): ">= 10,000 generated messages per socket, 0 crashes, bounded memory".
These tests run the generator and harness of ``benchmarks/fuzz.py`` at a smaller count
(``EDGESPLIT_FUZZ_N`` messages per socket, default 500); ``python benchmarks/fuzz.py`` runs the
same code at 10,000 per socket for the figure.

- the decoder: a generated message (a version prefix, a header over the known keys mixing valid and
  invalid values, payload frames matching ``ten`` or not, or random frames) is either a
  :class:`Message` whose every part is usable (tensors of the declared shapes, well-formed ACK
  pairs) or a :class:`ProtocolError`, never another exception, and quickly;
- the daemons: a real coordinator and two workers (plus a client in this process) get generated
  messages from plain DEALERs on their sockets. Every daemon must stay alive and answer a probe
  after every batch, log no Python traceback, serve the canary request with its very first
  output, and grow its RSS by less than ``RSS_GROWTH_MIB`` after a warm-up. Twice: an open cluster,
  and a keyed one (CURVE, roles checked per message) fuzzed by authenticated insiders whose keys
  get past the role checks (``fuzz.KEYED_SENDERS``: extra worker and operator keys on the
  coordinator, the user's key on w0, w0's own key on w1, w1's and w0's on the client's result
  socket), at ``EDGESPLIT_FUZZ_KEYED_N`` messages per socket (default ``N``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesplit.runtime import protocol as P
from edgesplit.runtime.errors import ProtocolError


def _load_bench(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` as a module (that folder is not a package; sys.path is left alone)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"edgesplit_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_bench("fuzz")

N = int(os.environ.get("EDGESPLIT_FUZZ_N", "500"))  # messages per socket (the acceptance figure: 10,000)
KEYED_N = int(os.environ.get("EDGESPLIT_FUZZ_KEYED_N", str(N)))  # the same, for the keyed cluster
DECODE_EXAMPLES = max(100, N // 2)  # hypothesis examples of 10 messages each for the decoder alone
DECODE_MAX_S = 0.25  # "quickly": a decode is microseconds; this only catches an algorithmic blow-up
WARMUP = min(100, N // 3)  # messages before the RSS baseline: first-time allocations are not growth
# RSS growth after the warm-up, per daemon and socket. What a daemon keeps for its senders is bounded
# (HWM queues, max_kept outboxes on at most max_peers links, MAX_LINK_REPLIES parked replies,
# RECENT_RUNS ids, MAX_ROUTE_WAITERS, 256 lost entries) and generated frames are at most FRAME_CAP
# (256 KiB), so what remains is allocator noise: glibc arenas and pymalloc pools touched by a burst of
# large frames, torch's first kernels for a new shape. Measured on 2 cores: <= 4 MiB per daemon at 500
# messages per socket, and <= 2 MiB from 500 to 10,000 (benchmarks/fuzz.py). At this count the bound
# catches a daemon that keeps large frames; a small per-message leak shows in the long run's figure.
RSS_GROWTH_MIB = 16
SOCKETS = ["w0", "w1", "client", "coordinator"]  # the coordinator last: its fuzz changes the playground's plan


# --- the decoder ---------------------------------------------------------------------------------------------------
_ENV = fuzz.Env(rk_keys=(fuzz.zmq_public_key(), fuzz.zmq_public_key()))  # with rk: as the keyed fuzz sends


def _resolve(ref: "fuzz.Ref") -> object:
    return 7 if ref.kind == "plan" else os.urandom(P.RID_BYTES)


def _as(kind: str, frames: list) -> list:
    """The frames as a daemon may hold them: bytes, zmq.Frame (what recv gives), memoryview or numpy."""
    if kind == "frame":
        return [zmq.Frame(bytes(f)) for f in frames]
    if kind == "memoryview":
        return [memoryview(f) for f in frames]
    if kind == "numpy":
        return [bytes(frames[0]), *[np.frombuffer(f, dtype=np.uint8) for f in frames[1:]]]
    return [bytes(f) for f in frames]


@pytest.mark.timeout(300)
@settings(max_examples=DECODE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(msgs=fuzz.templates(_ENV, "any", 10), as_=st.sampled_from(["bytes", "frame", "memoryview", "numpy"]),
       # caps the daemons use, and small ones (not below 8 B: a 0-d tensor of up to 8 B passes any cap)
       cap=st.sampled_from([P.MAX_FRAME_BYTES, 2 * P.CHUNK_BYTES, 4096, 64]))
def test_decoder_returns_a_usable_message_or_raises_protocol_error(msgs: list, as_: str, cap: int) -> None:
    """Every daemon hands received frames to ``decode`` and uses what it returns without further checks."""
    for tpl in msgs:
        raw = tpl.frames(_resolve)
        frames = _as(as_, raw)
        t0 = time.perf_counter()
        try:
            msg = P.decode(frames, max_frame_bytes=cap)
        except ProtocolError:
            msg = None
        took = time.perf_counter() - t0
        assert took < DECODE_MAX_S, f"decode took {took:.3f} s on {fuzz.describe(raw)[:300]}"
        rid = P.salvage_rid(frames)  # what a daemon calls on a refused message
        assert type(rid) is bytes and len(rid) == P.RID_BYTES
        if msg is None:
            continue
        assert isinstance(msg.type, P.Msg) and set(msg.header) <= set(P.HEADER_KEYS)
        assert type(msg.rid) is bytes and len(msg.rid) == P.RID_BYTES and 0 <= msg.budget_ms <= P.MAX_BUDGET_MS
        assert len(msg.specs) == len(msg.frames) and msg.payload_bytes <= cap
        for spec, x in zip(msg.specs, msg.tensors()):
            assert x.dtype == spec.dtype.torch and tuple(x.shape) == spec.shape
            assert x.numel() * x.element_size() == spec.nbytes <= cap
        for pair_rid, hop in msg.acked():
            assert type(pair_rid) is bytes and len(pair_rid) == P.RID_BYTES and 0 <= hop <= P.MAX_HOPS
        if msg.type is P.Msg.ERROR:
            code, reason = msg.get("err")
            assert isinstance(P.error_from_wire(code, reason), Exception)


@pytest.mark.timeout(120)
@settings(max_examples=DECODE_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.binary(max_size=4096) | fuzz.WILD.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_blobs_decode_or_raise_protocol_error(data: bytes) -> None:
    """WORKERS and MODELS replies carry msgpack blobs the client unpacks: the same contract as headers."""
    try:
        P.unpack_blob(data)
    except ProtocolError:
        pass


# --- the daemons ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["open", "keyed"])
def fuzz_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """One cluster for the four sockets (a start costs seconds); the coordinator's fuzz runs last. Open, then
    keyed (the keyed one fuzzed by key holders whose roles reach the handlers)."""
    torch.set_num_threads(1)
    fc = fuzz.FuzzCluster(tmp_path_factory.mktemp("fuzz"), keyed=request.param == "keyed").start()
    fz = fuzz.Fuzzer(fc)
    try:
        yield fc, fz
    finally:
        fc.stop()
        fz.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", SOCKETS)
def test_daemon_socket_survives_generated_messages(fuzz_cluster: tuple, target: str) -> None:
    """No crash, no hang, the canary's output unchanged, bounded RSS: after ``N`` generated messages."""
    fc, fz = fuzz_cluster
    n = KEYED_N if fc.keyed else N
    report = fz.run(target, n, batch=10, warmup=min(WARMUP, n // 3), canary_every=5)
    fuzz.print_table([report])
    assert report.sent >= n
    for crash in report.crashes:
        batch = "\n".join(crash.get("batch", []))[:6000]
        logs = "\n".join(f"--- {k} ---\n{v}" for k, v in (crash.get("tracebacks") or crash.get("logs", {})).items())
        pytest.fail(f"{target}: {crash['problem']} after {crash['after_sent']} messages; last batch:\n{batch}\n{logs}")
    assert fc.dead() == []
    assert fc.canary() is None  # a valid request still gets its very first output (torch.equal)
    assert report.victims.get("hung", 0) == 0, f"requests named by generated replies never ended: {report.victims}"
    # the client lives in this process: its row (checked when it is the target) is pytest's RSS, hypothesis included
    grew = {k: v / fuzz.MIB for k, v in report.growth().items() if k != "client" or target == "client"}
    assert all(g < RSS_GROWTH_MIB for g in grew.values()), f"RSS grew (MiB) {grew}; bound {RSS_GROWTH_MIB} MiB"
    if fc.keyed:  # the keys got past the handshakes and the role checks, into the handlers: what only they get
        a = report.answers
        reached = {"w0": a.get("sink RESULT", 0),  # hop 0 from the user's key, computed to the end, to the sink's key
                   "w1": a.get("sink RESULT", 0),  # hop 1 from w0's key (the plan's previous hop)
                   "client": report.victims.get("fuzzed result", 0),  # a generated RESULT from w1's key, taken
                   # READYs from the fuzz worker keys answered, and the operator's WORKERS or MODELS
                   "coordinator": min(a.get("HEARTBEAT", 0), a.get("WORKERS", 0) + a.get("MODELS", 0))}[target]
        assert reached > 0, f"{target}: nothing got past the role checks ({report.senders}): {a}, {report.victims}"
        assert report.forbidden < report.sent / 2, f"{report.forbidden} of {report.sent} refused by role checks"
    else:
        assert report.forbidden == 0  # an open cluster checks no roles
