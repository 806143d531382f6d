"""ZeroMQ sockets with the options every edgesplit socket needs, and outbound peer links.

Every socket gets linger 0 (shutdown never hangs), bounded high-water marks (a slow
peer causes back-pressure, not unbounded memory), ``MAXMSGSIZE`` (libzmq drops a peer
that sends a larger frame), ZMTP heartbeats (dead TCP links die fast), capped reconnect
backoff and a fixed identity where one is given. Data links are DEALER -> ROUTER: the
sender's DEALER carries its identity, the receiver's ROUTER replies (ACK/ERROR) on the
same connection. :class:`PeerLinks` keeps one DEALER per remote endpoint, sends without
blocking and parks what the peer cannot take yet in a bounded outbox.
"""
from __future__ import annotations

import collections
import math
import os
import socket as pysocket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zmq

from . import protocol as P
from .errors import ConfigError
from .security import Security

RESTAMP_AFTER_S = 0.002  # a message parked longer than this leaves with its remaining budget re-stamped


@dataclass(frozen=True)
class SocketOptions:
    """Options applied to a socket; defaults come from ``protocol``."""

    hwm_msgs: int = P.DATA_HWM_MSGS
    max_frame_bytes: int = P.MAX_FRAME_BYTES
    zmtp_heartbeat: bool = True


def new_context(io_threads: int = 1) -> zmq.Context:
    """A private context (one per component, so closing it never touches another's sockets)."""
    return zmq.Context(io_threads=io_threads)


def _apply(sock: zmq.Socket, opts: SocketOptions, identity: bytes | None) -> None:
    sock.copy_threshold = P.ZERO_COPY_MIN_BYTES  # pyzmq's, not libzmq's: smaller payload frames are copied
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, opts.hwm_msgs)
    sock.setsockopt(zmq.RCVHWM, opts.hwm_msgs)
    sock.setsockopt(zmq.MAXMSGSIZE, opts.max_frame_bytes + P.HEADER_MAX_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, P.RECONNECT_INIT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, P.RECONNECT_MAX_MS)
    sock.setsockopt(zmq.HANDSHAKE_IVL, P.HANDSHAKE_IVL_MS)
    if opts.zmtp_heartbeat:
        sock.setsockopt(zmq.HEARTBEAT_IVL, P.ZMTP_HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, P.ZMTP_HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, P.ZMTP_HEARTBEAT_TTL_MS)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)


def router(ctx: zmq.Context, bind: str, opts: SocketOptions = SocketOptions(),
           identity: bytes | None = None, sec: Security | None = None, domain: str = "") -> tuple[zmq.Socket, str]:
    """A bound ROUTER (``ROUTER_MANDATORY``: unroutable sends raise instead of vanishing).

    Args:
        bind: e.g. ``tcp://*:5555`` or ``tcp://127.0.0.1:*`` (any free port).
        sec, domain: a keyed component's CURVE server settings and the allow-list it serves.
    Returns:
        The socket and the endpoint actually bound (port resolved).
    """
    sock = ctx.socket(zmq.ROUTER)
    _apply(sock, opts, identity)
    if sec is not None:
        sec.serve(sock, domain)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # open: a peer reconnecting under its old id replaces the stale link. Keyed: never, since ids are chosen by
    # peers, another key holder could take a live peer's traffic over by connecting under its id
    sock.setsockopt(zmq.ROUTER_HANDOVER, 0 if sec is not None and sec.keyed else 1)
    try:
        sock.bind(bind)
    except zmq.ZMQError as e:
        sock.close(0)
        raise ConfigError(f"cannot bind {bind}: {e}; pick another port or use tcp://HOST:* for any free port") from None
    return sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def dealer(ctx: zmq.Context, connect: str, identity: bytes, opts: SocketOptions = SocketOptions(),
           sec: Security | None = None, server_key: bytes | str | None = None) -> zmq.Socket:
    """A DEALER connected to ``connect`` with a fixed identity (``IMMEDIATE``: no queueing to a link not up).

    Keyed (``sec`` holds keys): CURVE to the holder of ``server_key`` only.
    """
    sock = ctx.socket(zmq.DEALER)
    _apply(sock, opts, identity)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    if sec is not None:
        try:
            sec.dial(sock, server_key)
        except (ConfigError, zmq.ZMQError):  # ZMQError: a key that is not z85
            sock.close(0)
            raise
    sock.connect(connect)
    return sock


def advertised(bound: str, host: str | None = None) -> str:
    """The endpoint peers should connect to for a socket bound at ``bound``.

    ``tcp://0.0.0.0:5601`` (from ``tcp://*:5601``) is not connectable: replace the host by
    ``host`` (e.g. the address this machine uses towards the coordinator).
    """
    if not bound.startswith("tcp://"):
        return bound
    addr, _, port = bound[len("tcp://"):].rpartition(":")
    if addr in ("0.0.0.0", "*", "[::]", "::") or host:
        addr = host or "127.0.0.1"
    return f"tcp://{addr}:{port}"


def local_address_towards(endpoint: str) -> str:
    """The local IP this host uses to reach ``endpoint``'s host (no packet is sent)."""
    if not endpoint.startswith("tcp://"):
        return "127.0.0.1"
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "*", "0.0.0.0", ""):
        return "127.0.0.1"
    s = pysocket.socket(pysocket.AF_INET, pysocket.SOCK_DGRAM)
    try:
        s.connect((host, 9))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


_BUFFER_TYPES = (bytes, zmq.Frame, memoryview, bytearray, np.ndarray)  # what protocol's frames are made of


def send(sock: zmq.Socket, frames: Sequence[Any], route: Sequence[bytes] = (), block: bool = False) -> bool:
    """Send one message without blocking; False when the peer's queue is full (retry later).

    A message routed (ROUTER) to a peer that is not connected is dropped and counts as
    done: that peer is gone, and whatever it waited for has its own deadline. Routing ids
    and the header frame are copied (small); payload frames go zero-copy from
    ``protocol.ZERO_COPY_MIN_BYTES`` on (the socket's ``copy_threshold``). One ``send`` per
    frame, as ``send_multipart`` does, without its per-call type check and slicing (a third
    of its cost for a two-frame message); the type check that keeps a half-sent message
    from ever being queued is kept, for non-protocol types only.
    """
    flags = 0 if block else zmq.NOBLOCK
    more = flags | zmq.SNDMORE
    for f in frames:
        if not isinstance(f, _BUFFER_TYPES):
            memoryview(f)  # TypeError before any frame is sent
    last = len(frames) - 1
    try:
        for r in route:
            sock.send(r, more)  # a ROUTER refuses here (EAGAIN, EHOSTUNREACH): nothing sent yet
        for i, f in enumerate(frames):
            sock.send(f, more if i < last else flags, copy=i == 0)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH:  # ROUTER_MANDATORY: that peer is not connected
            return True
        raise


def recv(sock: zmq.Socket, n_route: int = 0) -> tuple[list[bytes], list[Any]]:
    """Receive one message without copying its frames: (routing ids, frames as ``zmq.Frame``).

    Reads each frame's ``more`` flag, which pyzmq sets in C, instead of calling
    ``getsockopt(RCVMORE)`` per frame as ``recv_multipart`` does (about 1.5 us each in pyzmq 27,
    as much as the receive of a frame itself). Raises ``zmq.Again`` when nothing is queued.
    """
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        frames.append(frame)
    if not n_route:
        return [], frames
    return [f.bytes for f in frames[:n_route]], frames[n_route:]


def drain(sock: zmq.Socket, handle: Callable[[list[bytes], list[Any]], None], n_route: int = 0,
          batch: int = 64) -> None:
    """Hand up to ``batch`` queued messages to ``handle(routing ids, frames)`` (a loop's turn at one socket)."""
    for _ in range(batch):
        try:
            route, frames = recv(sock, n_route)
        except zmq.Again:
            return
        handle(route, frames)


class Waker:
    """Wakes a thread blocked in ``zmq.Poller.poll`` from any other thread (a self-pipe)."""

    def __init__(self) -> None:
        self._r, self._w = pysocket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        with self._lock:
            try:
                self._w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # a wake-up is already pending, or we are closing

    def drain(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


@dataclass
class _Parked:
    """A message the peer could not take yet, with its request's absolute deadline (monotonic; inf = none)."""

    frames: Sequence[Any]
    deadline: float
    t_parked: float


@dataclass
class _Link:
    sock: zmq.Socket
    outbox: collections.deque
    last_used: float
    server_key: bytes | str | None = None


def _keyed_name(endpoint: str, key: bytes | str) -> str:
    """A per-key link's name: the endpoint and the key (a space is in neither a z85 key nor a tcp endpoint)."""
    return f"{endpoint} {key.decode() if isinstance(key, bytes) else key}"


class PeerLinks:
    """One DEALER per remote endpoint, each with a bounded outbox of messages not yet accepted.

    Sending never blocks the calling loop: a message the peer cannot take now (its HWM is
    reached, or the link is not up) waits in the outbox, and the loop polls ``POLLOUT`` on
    that socket only while its outbox is non-empty (see :meth:`poll_flags`).

    Custody is bounded everywhere, so one peer that takes nothing (a departed client, an
    endpoint nobody listens on) can never hold back another's traffic or exhaust the
    process's files: outboxes are capped and their messages expire with their request's
    deadline; links are capped at ``max_links`` (the least recently used one is closed,
    its parked messages dropped); links idle for ``idle_close_s`` are closed. Parked
    messages get their remaining budget re-stamped when they finally leave. Whatever is
    dropped is counted in ``dropped``.

    Keyed (``sec`` holds keys), each link speaks CURVE to one server key: ``key_of(endpoint)``
    (a worker's key, from the coordinator), or the key a send names (a requester's). With
    ``per_key`` (the links to requesters), a link is one (endpoint, key) pair, so a requester
    naming another's endpoint gets a link of its own (whose handshake fails) and never touches
    the other's; without it a link asked for with another key is dialled again with that key.
    Every link has its own random id, so a peer that sees one link's id cannot pose as this
    process on another.
    """

    def __init__(self, ctx: zmq.Context, identity: bytes, opts: SocketOptions = SocketOptions(),
                 max_outbox_msgs: int = 64, max_links: int = 64, idle_close_s: float = 30.0,
                 protected: Callable[[str], bool] = lambda ep: False, sec: Security | None = None,
                 key_of: Callable[[str], bytes | str | None] = lambda ep: None, per_key: bool = False) -> None:
        self.ctx, self.identity, self.opts, self.protected = ctx, identity, opts, protected
        self.sec = sec if sec is not None and sec.keyed else None
        self.key_of = key_of
        self.per_key = per_key and self.sec is not None
        self.max_outbox_msgs, self.max_links, self.idle_close_s = max_outbox_msgs, max_links, idle_close_s
        self._links: collections.OrderedDict[str, _Link] = collections.OrderedDict()
        self._by_sock: dict[zmq.Socket, str] = {}
        self.dropped = 0  # messages dropped: outbox full, expired, or their link evicted

    def link(self, endpoint: str, server_key: bytes | str | None = None) -> zmq.Socket | None:
        """The DEALER to ``endpoint``, connected on first use (None: libzmq refuses that endpoint, or keyed
        and no key is known for it).

        Beyond ``max_links`` the least recently used link is closed, one that ``protected``
        does not name first (a next stage's link, or one with requests awaiting its ACK), so a
        flood of requesters can never close the links that carry custody.
        """
        address = endpoint
        if self.sec is not None:
            server_key = server_key or self.key_of(endpoint)
            if not server_key:
                return None
            if self.per_key:
                endpoint = _keyed_name(endpoint, server_key)
        link = self._links.get(endpoint)
        if link is not None and self.sec is not None and link.server_key != server_key:
            self.close(endpoint)
            link = None
        if link is None:
            while len(self._links) >= self.max_links:
                victim = next((ep for ep in self._links if not self.protected(ep)), next(iter(self._links)))
                self.close(victim)
            # an id per link: a peer that sees one link's id cannot pose as this process on another link
            ident = self.identity + b"." + os.urandom(4).hex().encode()
            try:
                sock = dealer(self.ctx, address, ident, self.opts, self.sec, server_key)
            except (zmq.ZMQError, ConfigError):  # e.g. tcp://*:5 passes the decoder's pattern but cannot be dialled
                return None
            link = _Link(sock, collections.deque(), time.monotonic(), server_key)
            self._links[endpoint] = link
            self._by_sock[link.sock] = endpoint
        self._links.move_to_end(endpoint)
        link.last_used = time.monotonic()
        return link.sock

    def endpoint_of(self, sock: zmq.Socket) -> str | None:
        return self._by_sock.get(sock)

    def sockets(self) -> list[zmq.Socket]:
        return [l.sock for l in self._links.values()]

    def __len__(self) -> int:
        return len(self._links)

    def pending(self, endpoint: str | None = None) -> int:
        """Messages waiting in one outbox (or all)."""
        if endpoint is not None:
            link = self._links.get(endpoint)
            return len(link.outbox) if link else 0
        return sum(len(l.outbox) for l in self._links.values())

    def full(self, endpoint: str) -> bool:
        link = self._links.get(endpoint)
        return link is not None and len(link.outbox) >= self.max_outbox_msgs

    def send(self, endpoint: str, frames: Sequence[Any], deadline: float = math.inf, droppable: bool = False,
             server_key: bytes | str | None = None) -> bool:
        """Send now, or park in the outbox until ``deadline``.

        Returns False when the outbox is full: the caller holds the message (it keeps
        custody), unless ``droppable``, when the message is dropped and counted instead
        (replies to a requester, who has its own deadline). ``server_key``: keyed, the key
        the peer at ``endpoint`` must hold (default ``key_of(endpoint)``).
        """
        sock = self.link(endpoint, server_key)
        if sock is None:
            self.dropped += 1
            return True  # nothing will ever reach it; the request's deadline ends it
        link = self._links[self.endpoint_of(sock)]
        if not link.outbox and send(sock, frames):
            return True
        if len(link.outbox) >= self.max_outbox_msgs:
            if droppable:
                self.dropped += 1
            return droppable
        link.outbox.append(_Parked(frames, deadline, time.monotonic()))
        return True

    def flush(self, endpoint: str) -> int:
        """Push parked messages while the peer takes them (expired ones are dropped); returns how many went."""
        link = self._links.get(endpoint)
        n = 0
        now = time.monotonic()
        while link is not None and link.outbox:
            item = link.outbox[0]
            frames = item.frames
            if item.deadline < math.inf:
                if now >= item.deadline:
                    link.outbox.popleft()
                    self.dropped += 1
                    continue
                if now - item.t_parked > RESTAMP_AFTER_S:
                    frames = P.restamp(list(frames), int((item.deadline - now) * 1000))
            if not send(link.sock, frames):
                break
            link.outbox.popleft()
            n += 1
        return n

    def expire(self, now: float | None = None) -> int:
        """Drop parked messages past their deadline and close links idle too long; returns how many dropped."""
        now = time.monotonic() if now is None else now
        n = 0
        for ep, link in list(self._links.items()):
            if link.outbox:
                keep = collections.deque(p for p in link.outbox if p.deadline > now)
                n += len(link.outbox) - len(keep)
                link.outbox = keep
            elif now - link.last_used > self.idle_close_s and not self.protected(ep):
                self.close(ep)
        self.dropped += n
        return n

    def discard(self, endpoint: str, frames: Sequence[Any]) -> bool:
        """Remove one parked message (this very object) from ``endpoint``'s outbox."""
        link = self._links.get(endpoint)
        if link is None:
            return False
        for i, item in enumerate(link.outbox):
            if item.frames is frames:
                del link.outbox[i]
                return True
        return False

    def drop_outbox(self, endpoint: str) -> list[Sequence[Any]]:
        """Remove and return the parked messages of ``endpoint``."""
        link = self._links.get(endpoint)
        if link is None:
            return []
        out = [p.frames for p in link.outbox]
        link.outbox.clear()
        return out

    def serve(self, events: dict[Any, int], on_reply: Callable[[str, list[Any]], None], batch: int = 64) -> None:
        """After a poll: hand each link's replies (up to ``batch`` each) to ``on_reply(endpoint, frames)``
        and push parked messages where the peer has room again."""
        for sock, ev in events.items():
            ep = self._by_sock.get(sock) if isinstance(sock, zmq.Socket) else None
            if ep is None:
                continue
            if ev & zmq.POLLIN:
                drain(sock, lambda _, frames: on_reply(ep, frames), batch=batch)
            if ev & zmq.POLLOUT and ep in self._links:
                self.flush(ep)

    def poll_flags(self) -> Iterator[tuple[zmq.Socket, int]]:
        """(socket, flags) to register: always POLLIN (replies), POLLOUT while an outbox waits."""
        for link in self._links.values():
            yield link.sock, zmq.POLLIN | (zmq.POLLOUT if link.outbox else 0)

    def close(self, endpoint: str) -> None:
        link = self._links.pop(endpoint, None)
        if link is not None:
            self.dropped += len(link.outbox)
            self._by_sock.pop(link.sock, None)
            link.sock.close(0)

    def close_all(self) -> None:
        for ep in list(self._links):
            self.close(ep)
