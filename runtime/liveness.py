"""Liveness, written once (zguide's Paranoid Pirate): an expiry-ordered peer table, a backoff, and
the reconnecting link to the coordinator that the worker and the client share.

Any message from a peer refreshes it; a peer silent for ``interval x liveness`` is
expired and purged from the front of the table (oldest first, O(expired)). A component
that lost its peer reconnects after a capped, jittered, doubling delay.
"""
from __future__ import annotations

import collections
import logging
import random
import time
from typing import Callable, Generic, Hashable, Iterator, TypeVar

import zmq

from . import protocol as P

K = TypeVar("K", bound=Hashable)


class PeerTable(Generic[K]):
    """Peers ordered by expiry: refresh moves a peer to the back, purge pops expired ones off the front."""

    def __init__(self, interval_ms: int = P.HEARTBEAT_INTERVAL_MS, liveness: int = P.HEARTBEAT_LIVENESS) -> None:
        self.ttl_s = interval_ms * liveness / 1000.0
        self._expiry: collections.OrderedDict[K, float] = collections.OrderedDict()

    def refresh(self, peer: K, now: float | None = None) -> bool:
        """Record traffic from ``peer``; True when it was not known (a new or returning peer)."""
        now = time.monotonic() if now is None else now
        new = peer not in self._expiry
        self._expiry[peer] = now + self.ttl_s
        self._expiry.move_to_end(peer)
        return new

    def remove(self, peer: K) -> None:
        self._expiry.pop(peer, None)

    def purge(self, now: float | None = None) -> list[K]:
        """Remove and return the peers whose expiry has passed."""
        now = time.monotonic() if now is None else now
        dead = []
        while self._expiry:
            peer, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            self._expiry.popitem(last=False)
            dead.append(peer)
        return dead

    def next_expiry(self) -> float | None:
        """Monotonic time of the earliest expiry, to bound the poll timeout."""
        return next(iter(self._expiry.values()), None)

    def __contains__(self, peer: object) -> bool:
        return peer in self._expiry

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._expiry))

    def __len__(self) -> int:
        return len(self._expiry)


class Backoff:
    """Capped doubling delay with +-25% jitter (so restarted peers do not reconnect in lockstep)."""

    def __init__(self, init_ms: int = P.RECONNECT_INIT_MS, max_ms: int = P.RECONNECT_MAX_MS,
                 rng: random.Random | None = None) -> None:
        self.init_ms, self.max_ms = init_ms, max_ms
        self._next_ms = init_ms
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        """The delay before the next attempt; each call doubles the following one up to the cap."""
        base = self._next_ms
        self._next_ms = min(self._next_ms * 2, self.max_ms)
        return base * self._rng.uniform(0.75, 1.25) / 1000.0

    def reset(self) -> None:
        self._next_ms = self.init_ms


class CoordinatorLink:
    """A DEALER to the coordinator that reconnects on silence (the worker's and the client's, written once).

    Any message from the coordinator counts as life (``heard``). Silent for ``interval x
    liveness`` after it was once heard, the socket is closed and, after a capped
    jittered backoff, a fresh one is connected (``sock`` is None in between: send nothing,
    poll nothing). ``on_connect`` runs for each fresh socket (a worker sends READY again).
    Never blocks: the caller's loop calls :meth:`tick` every iteration.
    """

    def __init__(self, connect: Callable[[], zmq.Socket], interval_ms: int, liveness: int, what: str,
                 log: logging.Logger) -> None:
        self._connect, self.what, self.log = connect, what, log
        self.ttl_s = interval_ms * liveness / 1000.0
        self.backoff = Backoff()
        self.sock: zmq.Socket | None = connect()
        self.last_heard = time.monotonic()
        self.ever_heard = False
        self.connected = True  # until the first silence: warn once per outage, not per attempt
        self._retry_at = 0.0
        self.reconnects = 0

    def heard(self) -> None:
        self.last_heard = time.monotonic()
        self.ever_heard = self.connected = True
        self.backoff.reset()

    def tick(self, now: float, require_heard: bool = False) -> bool:
        """Reconnect when due; True when a fresh socket was connected in this call."""
        if self.sock is None:
            if now < self._retry_at:
                return False
            self.sock = self._connect()
            self.last_heard = now
            self.reconnects += 1
            return True
        if now - self.last_heard <= self.ttl_s or (require_heard and not self.ever_heard):
            return False
        delay = self.backoff.next_delay_s()
        if self.connected:
            self.log.warning("%s silent for %.1f s; reconnecting (backoff up to %d ms)", self.what,
                             now - self.last_heard, P.RECONNECT_MAX_MS)
        else:
            self.log.debug("no answer from %s; retrying in %.2f s", self.what, delay)
        self.connected = False
        self.sock.close(0)
        self.sock = None
        self._retry_at = now + delay
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
