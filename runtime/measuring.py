"""A client's MEASURE order at the coordinator: which worker measures when, and what came back.

Each listed worker profiles the model's blocks on its device and probes its links to the
other listed workers. Workers on one host measure one after another (two profiles at once
on one CPU would time each other, and two probes would share its loopback); hosts go in
parallel. Each worker's turn has its own request id, so replies and errors map back to it.
Pure bookkeeping: the coordinator sends the frames this returns.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from . import protocol as P


@dataclass
class MeasureOrder:
    """One client's MEASURE: the workers still to measure, per host, and the replies so far."""

    client: bytes
    rid: bytes
    model: str
    deadline: float
    queues: dict[str, collections.deque[str]]  # host -> workers not yet asked
    running: dict[bytes, str] = field(default_factory=dict)  # a worker's turn's rid -> worker
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return not self.running and not any(self.queues.values())

    def next_turns(self) -> list[tuple[str, bytes]]:
        """Workers to ask now: the head of each host's queue whose host has no turn running."""
        busy = {self.host_of.get(w) for w in self.running.values()}
        out = []
        for host, queue in self.queues.items():
            if queue and host not in busy:
                name = queue.popleft()
                rid = P.new_rid()
                self.running[rid] = name
                out.append((name, rid))
        return out

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
        """``name`` will never answer (lost): its turn ends, or it is taken off its queue."""
        for turn, w in list(self.running.items()):
            if w == name:
                self.finish(turn, None, why)
        for queue in self.queues.values():
            if name in queue:
                queue.remove(name)
                self.errors[name] = why

    def body(self) -> dict[str, Any]:
        return {**self.summary, "model": self.model, "workers": self.replies, "errors": self.errors}

    host_of: dict[str, str] = field(default_factory=dict)  # every listed worker -> its host
    request: dict[str, Any] = field(default_factory=dict)  # the client's settings, passed on to each worker
    manifest: bytes = b""  # the model's manifest JSON, sent with each turn
    summary: dict[str, Any] = field(default_factory=dict)  # what the planner needs of the model, for the client


def new_order(client: bytes, rid: bytes, model: str, deadline: float, hosts: dict[str, str]) -> MeasureOrder:
    """An order over ``hosts`` (worker -> host), workers of a host queued by name."""
    queues: dict[str, collections.deque[str]] = {}
    for name in sorted(hosts):
        queues.setdefault(hosts[name], collections.deque()).append(name)
    return MeasureOrder(client, rid, model, deadline, queues, host_of=dict(hosts))
