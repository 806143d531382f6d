"""Collecting a batch: queued jobs for one stage, gathered within a bounded wait.

Kept apart from the compute loop because it is policy (what joins a batch, how long to wait
for more, what is held back for the next one), and the compute loop reads best as decode ->
one forward -> encode. The rules:

- A batch is jobs for one stage, ``(model, hop)``; each job's plan is checked when it runs,
  so a job of a replaced plan fails alone. ``max_batch`` counts requests, not samples: a
  request carrying B samples is one request (the queue depth, the upstream credit and the
  help text all count requests; a batch holds at most ``max_batch`` x the largest B samples).
- The oldest job starts the batch; queued jobs for the same stage join. Jobs for other stages
  taken from the queue meanwhile wait in ``pending`` and are served next, oldest first, before
  anything newer from the queue: nothing taken is lost or starved, and one that expires there
  is dropped (and counted) by the compute loop like any other.
- Half, not all: a batch takes at most half of the jobs waiting for its stage (rounded up;
  the rest are served next). A stage that took them all would leave the stages before and
  after it idle while it runs, and a pipeline settles into one convoy, stage after stage:
  at 8 in flight in 2 stages that halved throughput (measured: ``benchmarks/batching.py``).
  Half keeps two groups alternating, so every stage has work. With the default queue depth
  (8) and client window (8) a first stage batches at most 4; raise both for larger batches.
- Waiting: only while the stage is busy (its last collection found more than one request, or
  began with one left over from an earlier batch), so the first request after a quiet spell,
  or a lone stream at one in flight, never waits. A
  wait lasts at most ``wait_s`` and never past any collected job's deadline minus twice the
  stage's median compute time (a pending job's: minus twice both stages' medians).
- Only where it pays: the compute loop reports each pass's forward time (``observe``), and
  while a batched pass costs more than ``GAIN_MIN`` of a batch-1 pass per sample, the stage
  runs batch 1 (one collection in ``PROBE_EVERY`` still batches, to notice when that changes).
  On a CPU a ViT's per-sample time hardly falls with the batch (vit_tiny, one thread: about
  5 %), and batches then only add latency and bubbles; on a GPU it falls several-fold.
- Bound: the loop holds at most ``max(2 x max_batch, queue_depth)`` jobs outside the queue.
"""
from __future__ import annotations

import collections
import queue
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .compute import Job

StageKey = tuple[str, int]  # (model, hop)
MARGIN_S = 0.001  # a wait ends this long before the latest start its jobs' deadlines allow
GAIN_MIN = 0.9  # batch while a batched pass costs at most this fraction of a batch-1 pass, per sample
PROBE_EVERY = 64  # collections between two batched tries while batching does not pay
EWMA = 0.2  # weight of the newest pass in the per-sample cost estimates


def stage_key(job: "Job") -> StageKey:
    return (job.msg.get("mdl"), job.msg.get("hop"))


class Batcher:
    """Takes jobs off the input queue in batches for one stage (compute thread only).

    Args:
        inq: the worker's input queue (``None`` in it means stop).
        max_batch: most requests in one batch (1 = no batching, no waiting).
        wait_s: longest a batch waits for more requests once the stage is busy.
        p50_s: a stage's median compute time, seconds (0 when never run).
        hold: most jobs held outside the queue (batch + pending), at least ``2 x max_batch``.
    """

    def __init__(self, inq: "queue.Queue[Job | None]", max_batch: int, wait_s: float,
                 p50_s: Callable[[StageKey], float], hold: int) -> None:
        self.inq = inq
        self.max_batch = max(1, max_batch)
        self.gather = 2 * self.max_batch  # jobs of one stage looked at; half of them (at most max_batch) run
        self.wait_s = max(0.0, wait_s)
        self.p50_s = p50_s
        self.hold = max(self.gather, hold)
        self.pending: list[Job] = []  # taken and not yet run, oldest first (by receipt)
        self.cost: dict[StageKey, list[float]] = {}  # stage -> forward ms per sample [at batch 1, batched]; 0 = unknown
        self.skipped: collections.Counter[StageKey] = collections.Counter()  # collections run alone since a try
        self.busy: dict[StageKey, bool] = {}  # stage -> its last collection found company, or was left over
        self.stopped = False

    def next_batch(self) -> list["Job"] | None:
        """The next batch (oldest job first); blocks until there is one. None: the worker stops."""
        if self.stopped:
            return None
        left_over = bool(self.pending)  # the head waited behind a batch: the worker is busy
        if left_over:
            head = self.pending.pop(0)
        else:
            head = self.inq.get()
            if head is None:
                self.stopped = True
                return None
        key = stage_key(head)
        batch = [head]
        if self.max_batch > 1 and self._pays(key):
            self._join_pending(key, batch)
            self._drain(key, batch)
            if self.busy.get(key) and self.wait_s > 0:
                self._wait(key, batch, time.monotonic())
            self.busy[key] = len(batch) > 1 or left_over
            keep = min(self.max_batch, (len(batch) + 1) // 2)
            if keep < len(batch):  # the rest run next, in their places by age
                self.pending = sorted(self.pending + batch[keep:], key=lambda j: j.t_recv)
                del batch[keep:]
        return batch

    def observe(self, key: StageKey, samples: int, forward_ms: float) -> None:
        """A pass's forward time over ``samples`` samples (the compute loop reports every pass)."""
        cost = self.cost.setdefault(key, [0.0, 0.0])
        i = 0 if samples == 1 else 1
        per = forward_ms / max(1, samples)
        cost[i] = per if not cost[i] else (1 - EWMA) * cost[i] + EWMA * per

    def _pays(self, key: StageKey) -> bool:
        """Whether a batch may form now: batching is cheaper per sample, not yet known, or due a try."""
        one, many = self.cost.get(key, (0.0, 0.0))
        if not one or not many or many <= GAIN_MIN * one:
            return True
        if self.inq.empty() and not any(stage_key(j) == key for j in self.pending):
            return False  # no company now: a try would learn nothing
        self.skipped[key] += 1
        if self.skipped[key] < PROBE_EVERY:
            return False
        self.skipped[key] = 0
        return True

    def _join_pending(self, key: StageKey, batch: list["Job"]) -> None:
        """Pending jobs of the same stage join, in order; the others keep their places."""
        rest = []
        for job in self.pending:
            if len(batch) < self.gather and stage_key(job) == key:
                batch.append(job)
            else:
                rest.append(job)
        self.pending = rest

    def _room(self, batch: list["Job"]) -> bool:
        return len(batch) < self.gather and len(batch) + len(self.pending) < self.hold

    def _take(self, key: StageKey, batch: list["Job"], job: "Job | None") -> None:
        if job is None:  # stop: this batch still runs (the loop checks the stop flag), then nothing more
            self.stopped = True
        elif stage_key(job) == key:
            batch.append(job)
        else:
            self.pending.append(job)

    def _drain(self, key: StageKey, batch: list["Job"]) -> None:
        """Everything already queued, without waiting."""
        while self._room(batch) and not self.stopped:
            try:
                job = self.inq.get_nowait()
            except queue.Empty:
                return
            self._take(key, batch, job)

    def _wait(self, key: StageKey, batch: list["Job"], t0: float) -> None:
        """More of the same stage, until full, ``wait_s`` after ``t0``, or the first deadline forbids."""
        p50 = self.p50_s(key)
        while self._room(batch) and not self.stopped:
            left = min(t0 + self.wait_s, self._latest_start(batch, p50)) - time.monotonic()
            if left <= 0:
                return
            try:
                job = self.inq.get(timeout=left)
            except queue.Empty:
                return
            self._take(key, batch, job)

    def _latest_start(self, batch: list["Job"], p50: float) -> float:
        """When the batch must start so that no collected job misses its deadline by waiting.

        Twice the median (plus 1 ms): the batch grows while it waits and may take longer than
        the median pass, and the expiry check that follows (start + median > deadline) must not
        drop a job because the wait brought it to the edge.
        """
        latest = float("inf")
        for job in batch:
            latest = min(latest, job.deadline - 2 * p50 - MARGIN_S)
        for job in self.pending:  # they run after this batch: its time and theirs
            latest = min(latest, job.deadline - 2 * (p50 + self.p50_s(stage_key(job))) - MARGIN_S)
        return latest
