"""The compute loop: batches from the bounded input queue, through the stage, onto the output queue.

Dynamic batching: queued requests for the same stage run as one forward pass (up to
``--max-batch`` requests, waiting at most ``--batch-wait-ms`` for more, never past a
deadline; ``batcher.py`` has the rules), then the output is split and each request goes on
alone. A request's output equals its unbatched output (the same ops on more rows); one
with a bad input fails alone, the rest of its batch runs.

A job whose deadline has passed is dropped before it costs a forward pass (its requester
has already failed it); so is one that cannot finish in time by the stage's median
compute time. Both are counted (``expired``) and reported in heartbeats.

Statistics: each request of a batch records the batch's compute time (decode, forward,
encode of the whole batch, not the wait for missing blocks), the time it spent in compute; so ``StageStats`` counts
requests and its median is what a request waits for a pass, as the expiry check needs.
Counters (heartbeats, ``count_*`` in the coordinator's telemetry): ``computed`` requests,
``batches`` forward passes, ``batched`` requests that ran with others, ``batch_max`` the
largest batch; mean batch size = ``computed / batches``.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from edgesplit.partitioner import EdgesplitError

from .. import protocol as P
from ..errors import RuntimeFailure
from ..links import decode_link, encode_link
from ..protocol import Err
from .batcher import Batcher, stage_key
from .profile import slowed
from .stage import Stage, check_input

if TYPE_CHECKING:
    from .daemon import Worker


@dataclass
class Job:
    """A RUN taken into custody: the message, the way back to its sender, and its absolute deadline."""

    msg: P.Message
    upstream: list[bytes]  # ROUTER route back to the sender
    t_recv: float  # wall clock, for traces
    deadline: float  # monotonic


@dataclass
class Done:
    """A job's outcome: the encoded output, an error to report, or ``expired`` (dropped unrun)."""

    job: Job
    stage: Stage | None
    payload: list[Any] = field(default_factory=list)
    cmeta: dict[str, Any] = field(default_factory=dict)
    t_start: float = 0.0
    t_end: float = 0.0
    error: tuple[Err, str] | None = None
    expired: bool = False


class ComputeLoop:
    """Runs stages a batch at a time; its counters are its own (read by the heartbeat)."""

    def __init__(self, worker: "Worker") -> None:
        w = self.w = worker
        self.counters: collections.Counter[str] = collections.Counter()
        self.load_ms = 0.0  # the last pass's wait for its stage's blocks
        self.log = logging.getLogger(f"edgesplit.worker.{worker.name}.compute")
        self.batcher = Batcher(w.inq, w.cfg.max_batch, w.cfg.batch_wait_ms / 1000.0,
                               lambda key: w.stats.p50_ms(key) / 1000.0, hold=w.cfg.queue_depth)

    def run(self) -> None:
        w = self.w
        n = 0
        while True:
            batch = self.batcher.next_batch()
            if batch is None or w.stopping.is_set():
                return
            for done in self.compute(batch):
                if w.stopping.is_set():
                    return
                while not w.stopping.is_set():
                    try:
                        w.outq.put(done, timeout=0.1)
                        break
                    except queue.Full:
                        w.waker.wake()
                w.waker.wake()
                if not done.expired:
                    n += 1
                if w.cfg.crash_after and n >= w.cfg.crash_after:
                    self.log.error("fault injection: crashing after %d requests", n)
                    logging.shutdown()
                    os._exit(70)

    def compute(self, jobs: list[Job]) -> list[Done]:
        """One Done per job, in the jobs' order: outputs, errors, or ``expired``."""
        w = self.w
        key = stage_key(jobs[0])
        stage = w.stages.get(key)
        done: dict[int, Done] = {}
        run: list[int] = []
        deadline_at = time.monotonic() + w.stats.p50_ms(key) / 1000.0
        for i, job in enumerate(jobs):
            if stage is None or job.msg.get("pln", stage.info.plan) != stage.info.plan:
                done[i] = Done(job, None, error=(Err.NOT_DEPLOYED, f"worker {w.name} no longer hosts stage {key[1]} of "
                                                 f"{key[0]} (redeployed meanwhile); resend the request"))
            elif deadline_at > job.deadline:
                self.counters["expired"] += 1
                done[i] = Done(job, stage, expired=True)
            else:
                run.append(i)
        if run:
            t_start = time.time()
            xs: list[tuple[int, torch.Tensor]] = []
            for i in run:
                try:
                    xs.append((i, self._decode(jobs[i], stage)))
                except _INPUT_ERRORS as e:
                    done[i] = Done(jobs[i], stage, error=self._failed(stage, e))
                    w.stats.add(key, None)
            if xs:
                outs = self._forward(stage, [x for _, x in xs])
                for (i, _), out in zip(xs, outs):
                    done[i] = (Done(jobs[i], stage, error=out) if isinstance(out, tuple)
                               else self._encode(jobs[i], stage, out))
                t_end = time.time()
                for i, _ in xs:
                    d = done[i]
                    if d.error is None:
                        d.t_start, d.t_end = t_start, t_end
                        w.stats.add(key, (t_end - t_start) * 1000 - self.load_ms)
                        self.counters["computed"] += 1
                    else:
                        w.stats.add(key, None)
        return [done[i] for i in range(len(jobs))]

    def _decode(self, job: Job, stage: Stage) -> torch.Tensor:
        msg = job.msg
        x = decode_link(stage.codec_in, stage.link_in, msg.get("cod", "raw"), msg.get("cmeta", {}),
                        msg.tensors, lambda: [msg.blob(i) for i in range(len(msg.specs))])
        check_input(x, stage, self.w.name)
        return x

    def _forward(self, stage: Stage, xs: list[torch.Tensor]) -> list[torch.Tensor | tuple[Err, str]]:
        """One pass over the concatenated inputs, split back per request (an error where it failed).

        If the batched pass raises, each input runs alone, so only the input that fails fails.
        """
        w = self.w
        t_load = time.perf_counter()
        try:
            module = w.acquire(stage)
        except Exception as e:  # noqa: BLE001  (storage, device memory, a skeleton that does not fit: the worker serves on)
            if not isinstance(e, EdgesplitError):
                self.log.error("loading stage %d of %s failed: %s: %s", stage.info.hop, stage.info.model,
                               type(e).__name__, e)
            msg = (f"worker {w.name} could not load stage {stage.info.hop} of {stage.info.model}: "
                   f"{type(e).__name__}: {e}; resend the request (a missing block is being fetched again)")
            return [(Err.NOT_DEPLOYED, msg) for _ in xs]
        self.load_ms = (time.perf_counter() - t_load) * 1000  # not compute: the stage's statistics leave it out
        try:
            if w.cfg.stall_ms:  # a slow board: the stall is per request, as before batching
                time.sleep(w.cfg.stall_ms * len(xs) / 1000.0)
            if len(xs) > 1:
                self.counters["batches"] += 1
                self.counters["batched"] += len(xs)
                self.counters["batch_max"] = max(self.counters["batch_max"], len(xs))
                try:
                    x = torch.cat(xs)
                    t0 = time.perf_counter()
                    y = self._run(module, x)
                    self.batcher.observe(stage_key_of(stage), x.shape[0], (time.perf_counter() - t0) * 1000)
                    return list(y.split([xi.shape[0] for xi in xs]))
                except _INPUT_ERRORS:
                    self.counters["batch_fallbacks"] += 1
            else:
                self.counters["batches"] += 1
                self.counters["batch_max"] = max(self.counters["batch_max"], 1)
            out: list[torch.Tensor | tuple[Err, str]] = []
            for x in xs:
                try:
                    t0 = time.perf_counter()
                    out.append(self._run(module, x))
                    self.batcher.observe(stage_key_of(stage), x.shape[0], (time.perf_counter() - t0) * 1000)
                except _INPUT_ERRORS as e:
                    out.append(self._failed(stage, e))
            return out
        finally:
            w.release(stage)

    def _run(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.w.device, non_blocking=True)
        with torch.inference_mode():
            return slowed(lambda: module(x), self.w.cfg.slowdown, self.w.device)

    def _encode(self, job: Job, stage: Stage, y: torch.Tensor) -> Done:
        w = self.w
        rates = [r for r in (w.rates[ep].rate for ep in stage.info.next if ep in w.rates) if r is not None]
        try:
            cmeta, payload = encode_link(stage.codec_out, stage.link_out, y, job.deadline - time.monotonic(),
                                         min(rates) if rates else None)
        except _INPUT_ERRORS as e:
            return Done(job, stage, error=self._failed(stage, e))
        return Done(job, stage, payload, cmeta)

    def _failed(self, stage: Stage, e: Exception) -> tuple[Err, str]:
        """A request's own failure: its input does not fit the stage, or the stage raised on it."""
        if isinstance(e, (RuntimeFailure, EdgesplitError)):
            return Err.BAD_INPUT, str(e)
        return Err.BAD_INPUT, (f"stage {stage.info.hop} of {stage.info.model} on {self.w.name} failed on the input: "
                               f"{type(e).__name__}: {e}")


def stage_key_of(stage: Stage) -> tuple[str, int]:
    return (stage.info.model, stage.info.hop)


# a request's own failures; torch reports shape errors as RuntimeError, ValueError, TypeError, IndexError
_INPUT_ERRORS = (RuntimeFailure, EdgesplitError, RuntimeError, ValueError, TypeError, IndexError)
