"""The compute loop: jobs from the bounded input queue, through the stage, onto the output queue.

A job whose deadline has passed is dropped before it costs a forward pass (its requester
has already failed it); so is one that cannot finish in time by the stage's median
compute time. Both are counted (``expired``) and reported in heartbeats.
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
    """Runs stages one job at a time; its counters are its own (read by the heartbeat)."""

    def __init__(self, worker: "Worker") -> None:
        self.w = worker
        self.counters: collections.Counter[str] = collections.Counter()
        self.log = logging.getLogger(f"edgesplit.worker.{worker.name}.compute")

    def run(self) -> None:
        w = self.w
        n = 0
        while True:
            job = w.inq.get()
            if job is None or w.stopping.is_set():
                return
            done = self.compute(job)
            while not w.stopping.is_set():
                try:
                    w.outq.put(done, timeout=0.1)
                    break
                except queue.Full:
                    continue
            w.waker.wake()
            if not done.expired:
                n += 1
            if w.cfg.crash_after and n >= w.cfg.crash_after:
                self.log.error("fault injection: crashing after %d requests", n)
                logging.shutdown()
                os._exit(70)

    def compute(self, job: Job) -> Done:
        w, msg = self.w, job.msg
        key = (msg.get("mdl"), msg.get("hop"))
        stage = w.stages.get(key)
        if stage is None or msg.get("pln", stage.info.plan) != stage.info.plan:
            return Done(job, None, error=(Err.NOT_DEPLOYED, f"worker {w.name} no longer hosts stage {key[1]} of "
                                                            f"{key[0]} (redeployed meanwhile); resend the request"))
        if time.monotonic() + w.stats.p50_ms(key) / 1000.0 > job.deadline:
            self.counters["expired"] += 1
            return Done(job, stage, expired=True)
        t_start = time.time()
        try:
            x = decode_link(stage.codec_in, stage.link_in, msg.get("cod", "raw"), msg.get("cmeta", {}),
                            msg.tensors, lambda: [msg.blob(i) for i in range(len(msg.specs))])
            check_input(x, stage, w.name)
            if w.cfg.stall_ms:
                time.sleep(w.cfg.stall_ms / 1000.0)
            x = x.to(w.device, non_blocking=True)
            with torch.inference_mode():
                y = stage.module(x)
            rates = [r for r in (w.rates[ep].rate for ep in stage.info.next if ep in w.rates) if r is not None]
            cmeta, payload = encode_link(stage.codec_out, stage.link_out, y, job.deadline - time.monotonic(),
                                         min(rates) if rates else None)
        except (RuntimeFailure, EdgesplitError) as e:
            w.stats.add(key, None)
            return Done(job, stage, error=(Err.BAD_INPUT, str(e)))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # torch reports shape errors as these
            w.stats.add(key, None)
            return Done(job, stage, error=(Err.BAD_INPUT, f"stage {key[1]} of {key[0]} on {w.name} failed "
                                                          f"on the input: {type(e).__name__}: {e}"))
        t_end = time.time()
        w.stats.add(key, (t_end - t_start) * 1000)
        self.counters["computed"] += 1
        return Done(job, stage, payload, cmeta, t_start, t_end)
