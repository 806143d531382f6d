"""Link probes: the rate and round trip of one link, measured to receipt at the far end.

A worker's data socket answers each PROBE at once with a header-only PROBE (no queue, no
compute), so the time between answers is the time the link took to carry a message: the
rate comes out of the spacing of the answers while a window of messages keeps the link
busy, free of the fixed latency and of whatever the far end computes meanwhile. The first
messages are tiny and time the round trip alone.

The probe owns a short-lived DEALER in the calling thread, so it never touches a loop's
sockets: the worker runs it on its measuring thread, the client in the caller's thread.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import zmq

from . import protocol as P
from .errors import RuntimeFailure
from .security import Security
from .transport import SocketOptions, dealer, recv, send

PROBE_CHUNK_BYTES = 64 * 1024  # one train message
PROBE_WINDOW = 4  # train messages in flight: enough to keep a link busy, few enough for a tbf queue
RTT_PINGS = 5  # tiny probes timing the round trip (median)


@dataclass(frozen=True)
class LinkRate:
    """One measured link: bytes/s to receipt, round trip of an empty message, and what was sent."""

    endpoint: str
    rate_bps: float
    rtt_ms: float
    bytes_sent: int
    seconds: float

    def to_msg(self) -> dict[str, float]:
        return {"rate_bps": self.rate_bps, "rtt_ms": self.rtt_ms, "bytes": self.bytes_sent, "seconds": self.seconds}


def probe_link(ctx: zmq.Context, endpoint: str, seconds: float = 0.5, sec: Security | None = None,
               server_key: bytes | str | None = None, max_bytes: int = 64 * 1024 * 1024,
               timeout_s: float = 10.0) -> LinkRate:
    """Measure the link to a worker's data socket at ``endpoint``.

    Args:
        ctx: the caller's zmq context.
        endpoint: the worker's data endpoint.
        seconds: how long the train runs (it stops earlier past ``max_bytes``); longer trains
            see through a token bucket's burst.
        sec, server_key: keyed clusters: this process's keys and the worker's public key.
        max_bytes: most bytes one train sends.
        timeout_s: the far end must answer within this (else RuntimeFailure).
    """
    sock = dealer(ctx, endpoint, b"probe~" + os.urandom(6).hex().encode(),
                  SocketOptions(hwm_msgs=PROBE_WINDOW * 4), sec, server_key)
    try:
        return _run(sock, endpoint, seconds, max_bytes, timeout_s)
    finally:
        sock.close(0)


def _await(sock: zmq.Socket, rid: bytes | None, until: float, endpoint: str) -> bytes:
    """The next PROBE answer (its rid); RuntimeFailure at ``until``."""
    while True:
        left = until - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
            if time.monotonic() >= until:
                raise RuntimeFailure(f"link probe to {endpoint}: no answer in time (is a worker serving there, and "
                                     "does it accept this key?)")
            continue
        _, frames = recv(sock)
        msg = P.decode(frames, max_frame_bytes=0)
        if msg.type == P.Msg.ERROR:
            raise RuntimeFailure(f"link probe to {endpoint} refused: {msg.get('err')[1]}")
        if msg.type == P.Msg.PROBE and (rid is None or msg.rid == rid):
            return msg.rid


def _run(sock: zmq.Socket, endpoint: str, seconds: float, max_bytes: int, timeout_s: float) -> LinkRate:
    t_begin = time.monotonic()
    rtts = []
    for _ in range(RTT_PINGS):  # the first also waits for the connection (IMMEDIATE: sends fail until it is up)
        rid = P.new_rid()
        frames = P.encode(P.Msg.PROBE, rid, 0)
        until = time.monotonic() + timeout_s
        while not send(sock, frames):
            if time.monotonic() >= until:
                raise RuntimeFailure(f"link probe to {endpoint}: could not connect within {timeout_s:.0f} s")
            time.sleep(0.005)
        t0 = time.monotonic()
        _await(sock, rid, t0 + timeout_s, endpoint)
        rtts.append(time.monotonic() - t0)
    filler = bytes(PROBE_CHUNK_BYTES)
    sent = answered = 0
    t_first = t_last = 0.0
    t_train = time.monotonic()
    while True:
        now = time.monotonic()
        stop = (now - t_train >= seconds and answered >= 4) or sent * PROBE_CHUNK_BYTES >= max_bytes
        while not stop and sent - answered < PROBE_WINDOW:
            if not send(sock, P.encode(P.Msg.PROBE, P.new_rid(), 0, None, [filler])):
                break
            sent += 1
        if answered == sent and (stop or sent == 0):
            break
        _await(sock, None, time.monotonic() + timeout_s, endpoint)
        t_last = time.monotonic()
        if answered == 0:
            t_first = t_last
        answered += 1
    span = t_last - t_first
    rate = (answered - 1) * PROBE_CHUNK_BYTES / span if answered > 1 and span > 0 else float("inf")
    rtts.sort()
    return LinkRate(endpoint, rate, 1000 * rtts[len(rtts) // 2], sent * PROBE_CHUNK_BYTES,
                    time.monotonic() - t_begin)
