"""A per-peer token bucket: how many messages a peer may send, so one peer cannot flood a loop.

Each peer (a ROUTER routing id, an address: any bytes or str) has a bucket of at most
``burst`` tokens that refills at ``rate_per_s``; a message takes one token or is refused.
The limiter is pure: the caller passes a monotonic ``now`` (``time.monotonic()``), so it
holds no clock and no socket, and tests drive it with simulated time. Every call is O(1).

Memory is bounded: beyond ``max_peers`` the least recently seen peer is forgotten. That is
safe because a forgotten peer comes back with a full bucket, the same as a peer never
seen, so forgetting never refuses anyone it should not; it only lets a peer that was
silent while ``max_peers`` others spoke burst again. Not thread-safe: one loop owns it.
"""
from __future__ import annotations

import collections
import math

from ..errors import ConfigError

Peer = bytes | str
_EPS = 1e-9  # refills summed from float time steps may fall a rounding error short of the token they add up to


class RateLimiter:
    """Token bucket per peer: ``burst`` messages at once, ``rate_per_s`` sustained."""

    def __init__(self, rate_per_s: float, burst: int, max_peers: int = 4096) -> None:
        """
        Args:
            rate_per_s: tokens a bucket regains per second (the sustained message rate).
            burst: bucket size, and the tokens a new (or forgotten) peer starts with.
            max_peers: peers remembered; the least recently seen is forgotten beyond it.
        """
        if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float)) \
                or not math.isfinite(rate_per_s) or rate_per_s <= 0:
            raise ConfigError(f"rate_per_s must be a finite number > 0, got {rate_per_s!r}")
        for name, v in (("burst", burst), ("max_peers", max_peers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        self.rate_per_s, self.burst, self.max_peers = float(rate_per_s), burst, max_peers
        self.refused = 0  # messages refused since creation (all peers)
        # peer -> [tokens, time of last refill]; order = least recently seen first
        self._buckets: collections.OrderedDict[Peer, list[float]] = collections.OrderedDict()

    def allow(self, peer: Peer, now: float) -> bool:
        """Take one token from ``peer``'s bucket: True if the message may go on, False (and counted) if not.

        Args:
            peer: who sent it.
            now: monotonic seconds; a clock that goes back refills nothing (and is not remembered).
        """
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= self.max_peers:
                self._buckets.popitem(last=False)
            b = self._buckets[peer] = [float(self.burst), now]
        else:
            self._buckets.move_to_end(peer)
            if now > b[1]:
                b[0] = min(float(self.burst), b[0] + (now - b[1]) * self.rate_per_s)
                b[1] = now
        if b[0] >= 1.0 - _EPS:
            b[0] -= 1.0
            return True
        self.refused += 1
        return False

    def tokens(self, peer: Peer, now: float) -> float:
        """Tokens ``peer`` would have at ``now`` (``burst`` for a peer not remembered); changes nothing."""
        b = self._buckets.get(peer)
        if b is None:
            return float(self.burst)
        return min(float(self.burst), b[0] + max(0.0, now - b[1]) * self.rate_per_s)

    def __contains__(self, peer: object) -> bool:
        return peer in self._buckets

    def __len__(self) -> int:
        """Peers remembered (at most ``max_peers``)."""
        return len(self._buckets)
