"""A client's MEASURE order at the coordinator: which worker measures when, and what came back.

Each listed worker profiles the model's blocks on its device and probes its links to the
other listed workers. One worker measures at a time, across every order: two profiles at
once on one machine would time each other, and two probes into one worker would share its
link. Each worker's turn has its own request id, so replies and errors map back to it.
Pure bookkeeping: the coordinator sends the frames.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from . import protocol as P

MAX_MEASURED_WORKERS = 16  # workers one order may list (the exact planner's reach; each probes the others)


@dataclass
class MeasureOrder:
    """One client's MEASURE: the workers still to measure and the replies so far."""

    client: bytes
    rid: bytes
    model: str
    deadline: float
    workers: list[str]  # every listed worker, in turn order
    waiting: collections.deque[str] = field(default_factory=collections.deque)  # not yet asked
    running: dict[bytes, str] = field(default_factory=dict)  # a worker's turn's rid -> worker
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)  # the client's settings, passed on to each worker
    manifest: bytes = b""  # the model's manifest JSON, sent with each turn
    summary: dict[str, Any] = field(default_factory=dict)  # what the planner needs of the model, for the client

    def __post_init__(self) -> None:
        self.waiting.extend(self.workers)

    @property
    def done(self) -> bool:
        return not self.running and not self.waiting

    def next_turn(self) -> tuple[str, bytes] | None:
        """The next worker to ask and its turn's rid (None: nobody left); the caller checks nobody measures."""
        if not self.waiting:
            return None
        name = self.waiting.popleft()
        rid = P.new_rid()
        self.running[rid] = name
        return name, rid

    def finish(self, turn: bytes, reply: dict[str, Any] | None, error: str | None = None) -> bool:
        """A worker's turn ended (its reply or why not); False when ``turn`` is not one of ours."""
        name = self.running.pop(turn, None)
        if name is None:
            return False
        if reply is not None:
            self.replies[name] = reply
        else:
            self.errors[name] = error or "no reply"
        return True

    def drop(self, name: str, why: str) -> None:
        """``name`` will never answer (lost, or the order ran out of time): its turn ends, or it is not asked."""
        for turn, w in list(self.running.items()):
            if w == name:
                self.finish(turn, None, why)
        if name in self.waiting:
            self.waiting.remove(name)
            self.errors[name] = why

    def body(self) -> dict[str, Any]:
        return {**self.summary, "model": self.model, "workers": self.replies, "errors": self.errors}
