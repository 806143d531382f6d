"""ACKs owed to senders, batched in time: one ACK message per sender per ``ACK_DELAY_S``, not one per RUN.

Custody does not change: a sender keeps each RUN until an ACK names it, and the receiver
acknowledges exactly what it has taken on. Only when the ACK leaves changes. Each ACK message
costs a wake-up of the io thread and of the loop at both ends; on a board with two to six
cores those wake-ups are taken from the io threads that copy the activations, and at 1 MiB
per message on loopback one ACK per RUN cost about 40 us a message (of about 300).
Waiting ``ACK_DELAY_S`` for company turns that into one ACK per few RUNs at full rate, and
changes nothing at low rates but the 1 ms (the sender's credit comes back 1 ms later; its
link meter is not fooled, since each pair says how long it was held here).

The wait must not starve a sender of credit: a worker sends to a next-stage replica only while
fewer than its ``queue_depth`` RUNs await that replica's ACK. With 8 of credit and ACKs held 1 ms,
a 64 KiB stream stalled at 8 RUNs per millisecond (0.14-0.16 of raw pyzmq). So a sender owed half
its credit is acknowledged at once (:meth:`AckBatch.for_credit`).
"""
from __future__ import annotations

import time
from typing import Any

from . import protocol as P

ACK_DELAY_S = 0.001  # the oldest owed pair waits at most this long for others to share its ACK message


class AckBatch:
    """Pairs (rid, hop) owed to each sender, with when each was taken on, until they are due."""

    def __init__(self, delay_s: float = ACK_DELAY_S, due_pairs: int = P.MAX_ACKS) -> None:
        """``due_pairs``: pairs owed to one sender that make the ACKs due at once (else ``delay_s`` after the oldest)."""
        self.delay_s = delay_s
        self.due_pairs = max(1, due_pairs)
        self.owed: dict[tuple[bytes, ...], list[tuple[bytes, int, float]]] = {}
        self.count = 0
        self.since = 0.0  # monotonic time the oldest owed pair was added
        self.due = False  # some sender is owed due_pairs

    @classmethod
    def for_credit(cls, credit: int) -> AckBatch:
        """A worker's: each sender may have ``credit`` RUNs awaiting ACK here; owed half of them, it hears at once."""
        return cls(due_pairs=credit // 2)  # __init__ makes it at least 1

    def __len__(self) -> int:
        return self.count

    def add(self, route: tuple[bytes, ...], rid: bytes, hop: int, t_recv: float) -> None:
        """Owe (rid, hop) to the sender at ``route``; ``t_recv``: wall-clock time of receipt (for ``held``)."""
        if not self.count:
            self.since = time.monotonic()
        owed = self.owed.setdefault(route, [])
        owed.append((rid, hop, t_recv))
        self.count += 1
        if len(owed) >= self.due_pairs:
            self.due = True

    def wait_s(self, now: float) -> float | None:
        """Seconds until the owed ACKs are due (0: now); None when nothing is owed."""
        if not self.count:
            return None
        if self.due or self.count >= P.MAX_ACKS:
            return 0.0
        return max(0.0, self.since + self.delay_s - now)

    def take(self, now: float, force: bool = False) -> list[tuple[list[bytes], list[Any]]]:
        """The ACK messages due now (all of them when ``force``), as (route, frames); empty when none is."""
        wait = self.wait_s(now)
        if wait is None or (wait > 0 and not force):
            return []
        t_wall = time.time()
        out = []
        for route, items in self.owed.items():
            pairs = [(rid, hop) for rid, hop, _ in items]
            for frames in P.encode_acks(pairs, [int((t_wall - t) * 1e6) for _, _, t in items]):
                out.append((list(route), frames))
        self.owed.clear()
        self.count = 0
        self.due = False
        return out
