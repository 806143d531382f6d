"""Transport benchmark: edgesplit's worker->worker link against raw pyzmq, and 2-stage pipeline throughput.

::

    python benchmarks/transport.py                  # both parts, defaults below
    python benchmarks/transport.py --part transfer --repeats 7 --sizes 64,1024 --hwm 8
    python benchmarks/transport.py --part transfer --sizes 1024 --kinds edgesplit,bare,bare-noack
    python benchmarks/transport.py --part pipeline --requests 300 --in-flight 8

Part 1 (transfer): one sender process streams activations of 64 KiB, 1, 4 and 16 MiB to one
receiver process over tcp loopback, (a) through edgesplit's link as a worker sends a hop --
``protocol.encode`` of a RUN through ``PeerLinks`` (the worker's DEALER options, so a tensor frame
under ``protocol.ZERO_COPY_MIN_BYTES`` is copied and a larger one goes zero-copy, and its
non-blocking outbox), the receiver's ``transport.recv`` and
validating ``decode`` to a tensor, custody ACKs batched as a worker batches them (``AckBatch.for_credit``:
one ACK message per sender for everything taken on within ``ACK_DELAY_S``, at once when it is owed
half its credit), and the sender keeping every message until an ACK names it, with at most the
worker's credit (``queue_depth``, 8) awaiting ACK, as a worker sends to one next-stage replica
(the receiver takes each RUN on at once: no compute) -- and (b) through raw pyzmq PUSH/PULL with
pyzmq's defaults, one frame per message sent with ``copy=False`` (zero-copy from pyzmq's 64 KiB
``COPY_THRESHOLD`` on) and received zero-copy (``recv(copy=False)``, the cheapest receive pyzmq
has), from the same kind of memory (a torch tensor's: numpy would back a large array with huge
pages) and with the same high-water marks
(``--hwm``, default ``protocol.DATA_HWM_MSGS``). Both kinds share the two processes and their rounds
alternate, so each edgesplit round is compared with a raw round next to it in time (both
processes run with a worker's malloc settings, ``allocator.keep_freed_buffers``, so raw gets them too); the
ratio is the median over ``--repeats`` such pairs, each round moving about 1 GiB. Each process's
CPU time (all threads) per message is printed too: on a loaded machine it moves much less than
the rates; and how much of it Python's threads took and how much libzmq's io threads (which copy
the bytes), both processes together. That split is by thread: loopback's packet processing runs
in whichever thread the kernel interrupts, so a loop that wakes more often is charged some of it.

``--kinds edgesplit,bare,bare-noack`` adds two floors, timed in turn with the others: edgesplit's
sockets and send loop with none of its protocol code. "bare" keeps custody (the header packed once,
each message given its rid; ACKs batched as above, unpacked unchecked), "bare-noack" has no custody.
What edgesplit loses beyond "bare" is its protocol code; what "bare" loses is the link's pattern.

Part 2 (pipeline): a coordinator and 2 worker processes (one torch thread each), a model
split into 2 stages, ``--requests`` inputs streamed with ``--in-flight`` outstanding.
Throughput is compared with the bottleneck stage's rate, 1 / (slowest stage's median
compute time per request), both as the workers measured it during the run (a batch's time
shared by the requests in it) and as measured alone in this process, batch 1, before and after the run.

Writes ``benchmarks/out/transport.json`` (``--out``; and a plot beside it when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = [64 * 1024, 1 << 20, 4 << 20, 16 << 20]
OUT = Path(__file__).resolve().parent / "out"


ROUND_BYTES = 1 << 30  # per timed round: a quarter to half a second here; 64 MiB rounds (~20 ms) were mostly noise


def _n_messages(size: int) -> int:
    return max(64, min(16384, ROUND_BYTES // size))


# --- part 1: transfer --------------------------------------------------------------------------
KINDS = ("raw", "edgesplit")
FLOORS = ("bare", "bare-noack")  # what edgesplit's sockets cost without its protocol code (``--kinds``)


def _thread_cpu() -> dict[str, float] | None:
    """CPU seconds of this process's threads so far: libzmq's io threads ("ZMQbg/...") and the rest (Python's).

    Both kinds' main loops share the two cores with the io threads that copy the bytes, so where
    the CPU goes says more than the process total. None where ``/proc/self/task/*/schedstat`` is absent.
    """
    out = {"python": 0.0, "io": 0.0}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile; or no schedstats: no split
            if not os.path.exists(f"/proc/self/task/{tid}"):
                continue
            return None
        out["io" if name.startswith("ZMQbg/") else "python"] += ns / 1e9
    return out if out["python"] + out["io"] > 0 else None  # a kernel without schedstats reads zeros


def _per_msg(before: dict[str, float] | None, n: int) -> dict[str, float]:
    after = _thread_cpu()
    if before is None or after is None:
        return {}
    return {k: (after[k] - before[k]) / n for k in after}


def _drain(receive: Any, take: Any, limit: int) -> int:
    """Take every message readable now (at most ``limit``), as a worker's io loop does per poll cycle."""
    import zmq

    n = 0
    while n < limit:
        try:
            msg = receive()
        except zmq.Again:
            break
        take(msg)
        n += 1
    return n


def _receive_round(sock: Any, receive: Any, take: Any, flush: Any, total: int, warmup: int) -> dict[str, float]:
    """Receive ``total`` messages; time and CPU from the first drained batch past ``warmup`` (the pipe is full)."""
    from edgesplit.runtime import protocol as P

    got = batches = 0
    t0 = cpu0 = None
    got0 = 0
    quiet_since = time.monotonic()
    while got < total:
        wait = flush(False)  # seconds until owed ACKs are due (None: none owed)
        if not sock.poll(60_000 if wait is None else int(wait * 1000 + 0.999)):
            if wait is None or time.monotonic() - quiet_since > 60:  # a lost message ends the run with an error
                raise TimeoutError(f"receiver: nothing for 60 s after {got} of {total} messages")
            continue
        quiet_since = time.monotonic()
        got += _drain(receive, take, P.MAX_ACKS)
        batches += 1
        if t0 is None and got >= warmup:
            t0, cpu0, got0, threads0 = time.perf_counter(), time.process_time(), got, _thread_cpu()
    flush(True)  # the sender waits for every ACK
    n = max(1, got - got0)
    return {"s_per_msg": (time.perf_counter() - t0) / n, "recv_cpu": (time.process_time() - cpu0) / n,
            "recv_threads": _per_msg(threads0, n), "msgs_per_batch": got / batches}


def _transfer_receiver(hwm: int, ctl: Any, out: Any) -> None:
    """Owns a PULL (raw) and a ROUTER (edgesplit and the floors) socket; receives one round per job from ``ctl``."""
    import msgpack
    import numpy as np
    import zmq

    from edgesplit.runtime import protocol as P
    from edgesplit.runtime.acks import AckBatch
    from edgesplit.runtime.allocator import keep_freed_buffers
    from edgesplit.runtime.transport import SocketOptions, recv, router, send

    keep_freed_buffers()  # as a worker process runs (both kinds of link share this process)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, hwm)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    rtr, endpoint = router(ctx, "tcp://127.0.0.1:*", SocketOptions(hwm_msgs=hwm))
    out.put({"raw": f"tcp://127.0.0.1:{port}", "edgesplit": endpoint})
    acks = AckBatch.for_credit(worker_credit())  # the worker's: within ACK_DELAY_S, or at half a sender's credit
    acks_sent = [0]

    def receive_raw() -> Any:
        return pull.recv(zmq.NOBLOCK, copy=False)  # one frame: no RCVMORE to ask about

    def take_raw(frame: Any) -> None:
        np.frombuffer(frame.buffer, dtype=np.float32)

    def receive_edgesplit() -> tuple[list[bytes], list]:
        return recv(rtr, 1)  # the worker's receive: (routing id, frames)

    def take_edgesplit(msg: tuple[list[bytes], list]) -> None:
        route, frames = msg
        m = P.decode(frames)
        m.tensor(0)  # a tensor over the frame, as the worker's compute gets it
        acks.add(tuple(route), m.rid, m.get("hop"), time.time())

    def ack_due(force: bool) -> float | None:
        for route, ack in acks.take(time.monotonic(), force):  # one ACK message per sender
            send(rtr, ack, route=route, block=True)  # the worker parks what cannot go; here nothing is lost
            acks_sent[0] += 1
        return acks.wait_s(time.monotonic())

    def take_bare(msg: tuple[list[bytes], list]) -> None:  # a floor: the header unpacked, nothing checked
        route, frames = msg
        h = msgpack.unpackb(frames[0].bytes[len(P.VERSION):])
        np.frombuffer(frames[1].buffer, dtype=np.float32)
        acks.add(tuple(route), h["rid"], h["hop"], time.time())

    def take_bare_noack(msg: tuple[list[bytes], list]) -> None:  # a floor without custody
        np.frombuffer(msg[1][1].buffer, dtype=np.float32)

    takes = {"edgesplit": (take_edgesplit, ack_due), "bare": (take_bare, ack_due),
             "bare-noack": (take_bare_noack, lambda force: None)}
    for kind, total, warmup in iter(ctl.get, None):
        if kind == "raw":
            out.put(_receive_round(pull, receive_raw, take_raw, lambda force: None, total, warmup))
        else:
            acks_sent[0] = 0
            res = _receive_round(rtr, receive_edgesplit, *takes[kind], total, warmup)
            out.put({**res, "msgs_per_ack": total / acks_sent[0] if acks_sent[0] else 0.0})
    pull.close()
    rtr.close()
    ctx.term()


def _transfer_sender(hwm: int, endpoints: dict[str, str], ctl: Any, out: Any) -> None:
    """Owns a PUSH (raw) and edgesplit's PeerLinks; sends one round per job from ``ctl``."""
    import torch
    import zmq

    from edgesplit.runtime.allocator import keep_freed_buffers
    from edgesplit.runtime.transport import PeerLinks, SocketOptions

    keep_freed_buffers()  # as a worker process runs (both kinds of link share this process)
    # one torch thread, as a worker runs: the tensor made per round (torch.ones) would otherwise leave an
    # OpenMP thread spinning through the round from 1 MiB on, about 95 us of CPU per message on 2 cores
    torch.set_num_threads(1)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, hwm)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoints["raw"])
    links = PeerLinks(ctx, b"bench-sender", SocketOptions(hwm_msgs=hwm), max_outbox_msgs=64)
    for kind, size, total in iter(ctl.get, None):
        cpu0, threads0 = time.process_time(), _thread_cpu()
        if kind == "raw":
            buf = torch.ones(size // 4).numpy()  # torch's memory, as edgesplit's: numpy would madvise huge pages
            for _ in range(total):
                push.send(buf, copy=False)
        else:
            _edgesplit_send(links, endpoints["edgesplit"], torch.ones(size // 4), total, kind)
        out.put(((time.process_time() - cpu0) / total, _per_msg(threads0, total)))
    links.close_all()
    push.close()
    ctx.term()


def worker_credit() -> int:
    """RUNs a worker lets await one next-stage replica's ACK (``queue_depth``: room in that replica's input queue)."""
    from edgesplit.runtime.worker.daemon import WorkerConfig

    return WorkerConfig().queue_depth


def _edgesplit_send(links: Any, endpoint: str, x: Any, total: int, kind: str = "edgesplit") -> None:
    """Send ``total`` RUNs of ``x`` as a worker sends a hop: each kept until an ACK names it, at most
    ``worker_credit()`` awaiting their ACK at a time (the worker's credit per next-stage replica).

    The link's replies are taken as the worker takes them (``PeerLinks.serve``: drained when the
    poll says so). The floors (``FLOORS``) send over the same link, but with the header packed once
    (each message gets only its rid) and ACKs unpacked unchecked ("bare"), or with no custody at all.
    """
    import msgpack
    import zmq

    from edgesplit.runtime import protocol as P

    fields = {"mdl": "bench", "hop": 1, "rep": endpoint}
    if kind == "edgesplit":
        def frames_of(rid: bytes) -> list:
            return P.encode(P.Msg.RUN, rid, 10_000, fields, [x])

        def acked(frames: list) -> list:
            return P.decode(frames).acked()
    else:
        mark = P.new_rid()
        head, arr = P.encode(P.Msg.RUN, mark, 10_000, fields, [x])
        pre, post = head.split(mark)

        def frames_of(rid: bytes) -> list:
            return [pre + rid + post, arr]

        def acked(frames: list) -> list:
            h = msgpack.unpackb(frames[0].bytes[len(P.VERSION):])
            return [(h["rid"], h["hop"]), *map(tuple, h.get("acks", ()))]
    custody, credit = kind != "bare-noack", worker_credit()
    link = links.link(endpoint)
    kept: dict[tuple[bytes, int], list] = {}
    sent = done = 0
    left, last_progress = total + 1, time.monotonic()  # messages not yet acknowledged (or, no custody, not sent)

    def on_reply(_endpoint: str, frames: list) -> None:
        nonlocal done
        for pair in acked(frames):
            if kept.pop(pair, None) is not None:
                done += 1

    while left and time.monotonic() - last_progress < 60:  # a lost ACK ends the run with an error
        while sent < total and len(kept) < credit and not links.pending(endpoint):
            rid = P.new_rid()
            frames = frames_of(rid)
            links.send(endpoint, frames)
            sent += 1
            if custody:
                kept[(rid, 1)] = frames
            else:
                done += 1
        flags = zmq.POLLIN | (zmq.POLLOUT if links.pending(endpoint) else 0)
        links.serve({link: link.poll(5, flags)}, on_reply)
        now_left = total - done + links.pending(endpoint)
        if now_left < left:
            left, last_progress = now_left, time.monotonic()
    if left:
        raise RuntimeError(f"nothing for 60 s: of {total} messages {total - sent} not sent, {links.pending(endpoint)} "
                           f"waiting for the peer to take them" + (f", {len(kept)} sent but never acknowledged"
                                                                    if custody else ""))


class _TransferPair:
    """A sender and a receiver process, each holding both kinds of link, so rounds of the two kinds alternate."""

    def __init__(self, hwm: int) -> None:
        spawn = mp.get_context("spawn")
        self.recv_ctl, self.recv_out, self.send_ctl, self.send_out = (spawn.Queue() for _ in range(4))
        self.recv = spawn.Process(target=_transfer_receiver, args=(hwm, self.recv_ctl, self.recv_out), daemon=True)
        self.recv.start()
        endpoints = self.recv_out.get(timeout=120)
        self.send = spawn.Process(target=_transfer_sender, args=(hwm, endpoints, self.send_ctl, self.send_out),
                                  daemon=True)
        self.send.start()

    def round(self, kind: str, size: int, total: int, warmup: int) -> dict[str, float]:
        """One timed round: seconds and CPU seconds (each process, all its threads) per message."""
        self.recv_ctl.put((kind, total, warmup))
        self.send_ctl.put((kind, size, total))
        res = self._get(self.recv_out)
        res["send_cpu"], res["send_threads"] = self._get(self.send_out)
        return res

    def _get(self, q: Any, timeout_s: float = 600) -> Any:
        """The next result, or an error as soon as either process has died (its traceback is on stderr)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return q.get(timeout=1)
            except queue.Empty:
                if not (self.send.is_alive() and self.recv.is_alive()):
                    raise RuntimeError(f"a transfer process died (sender exit {self.send.exitcode}, "
                                       f"receiver exit {self.recv.exitcode})") from None
        raise TimeoutError(f"no transfer result in {timeout_s} s")

    def close(self) -> None:
        self.send_ctl.put(None)
        self.recv_ctl.put(None)
        self.send.join(30)
        self.recv.join(30)


def measure_transfer(size: int, repeats: int, warmup: int, hwm: int,
                     kinds: tuple[str, ...] = KINDS) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` rounds of each kind at ``size``, in turn (the order reversed every other pair), one pair at a time.

    Other programs' load on a small machine changes from second to second; neighbouring
    rounds see nearly the same, so the ratio is taken within each pair.
    """
    pair = _TransferPair(hwm)
    total = warmup + _n_messages(size)
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    try:
        for kind in kinds:  # untimed: connections up, buffers and caches warm
            pair.round(kind, size, warmup * 2, warmup)
        for r in range(repeats):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                res[kind].append(pair.round(kind, size, total, warmup))
    finally:
        pair.close()
    return res


def _summary(size: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median(r["s_per_msg"] for r in rounds)
    out = {"gb_per_s": size / med / 1e9, "us_per_msg": med * 1e6,
           "send_cpu_us": statistics.median(r["send_cpu"] for r in rounds) * 1e6,
           "recv_cpu_us": statistics.median(r["recv_cpu"] for r in rounds) * 1e6,
           "msgs_per_batch": statistics.median(r["msgs_per_batch"] for r in rounds),
           "msgs_per_ack": statistics.median(r.get("msgs_per_ack", 0.0) for r in rounds), "rounds": rounds}
    if all(r["send_threads"] and r["recv_threads"] for r in rounds):  # us per message, both processes
        out["python_us"], out["io_us"] = (statistics.median((r["send_threads"][k] + r["recv_threads"][k]) * 1e6
                                                            for r in rounds) for k in ("python", "io"))
    return out


def run_transfer(args: argparse.Namespace) -> list[dict]:
    from edgesplit.runtime import protocol as P
    from edgesplit.runtime.acks import ACK_DELAY_S

    rows = []
    print(f"\n[transfer] tcp loopback, HWM {args.hwm} msgs on all kinds' sockets, {args.repeats} rounds of each kind "
          f"per size (~{ROUND_BYTES >> 20} MiB each, after {args.warmup} messages that fill the pipe), kinds in turn; "
          f"medians.\n"
          f"edgesplit: RUN encode + frame (copied under {P.ZERO_COPY_MIN_BYTES >> 10} KiB), validating decode to a "
          f"tensor, custody ACKs batched as a worker does (one message per sender within {ACK_DELAY_S * 1e3:g} ms, "
          f"at once when owed half its credit), sender keeps each until ACKed, <= {worker_credit()} awaiting ACK (the "
          f"worker's credit per replica).\n"
          f"ratio = median over neighbouring rounds of kind/raw throughput; CPU = sender+receiver process CPU (all "
          f"threads) per message; py / io = of that, Python's threads / libzmq's io threads")
    print(f"{'size':>8}  {'kind':>10}  {'GB/s':>6} {'us/msg':>7} {'CPU us':>9} {'py / io':>9} {'msgs/ACK':>8}  "
          f"{'ratio':>5} {'(min-max)':>11}  {'CPU ratio':>9}")
    for size in args.sizes:
        m = measure_transfer(size, args.repeats, args.warmup, args.hwm, args.kinds)
        res = {k: _summary(size, m[k]) for k in args.kinds}
        raw = res["raw"]
        row: dict[str, Any] = {"size_bytes": size, "messages_per_round": _n_messages(size), **res}
        label = f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
        for kind in args.kinds:
            r = res[kind]
            split = f"{r['python_us']:.0f} / {r['io_us']:.0f}" if "python_us" in r else "-"
            line = (f"{label:>8}  {kind:>10}  {r['gb_per_s']:>6.2f} {r['us_per_msg']:>7.1f} "
                    f"{r['send_cpu_us']:>4.0f}+{r['recv_cpu_us']:<4.0f} {split:>9}")
            if kind != "raw":
                ratios = [a["s_per_msg"] / b["s_per_msg"] for a, b in zip(m["raw"], m[kind])]
                cpu_ratio = (raw["send_cpu_us"] + raw["recv_cpu_us"]) / (r["send_cpu_us"] + r["recv_cpu_us"])
                r.update(ratio=statistics.median(ratios), pair_ratios=ratios, cpu_ratio=cpu_ratio)
                per_ack = f"{r['msgs_per_ack']:.1f}" if r["msgs_per_ack"] else "-"
                line += (f" {per_ack:>8}  {r['ratio']:>5.2f} ({min(ratios):.2f}-{max(ratios):.2f})  "
                         f"{cpu_ratio:>9.2f}")
            print(line, flush=True)
        if "edgesplit" in res:  # the figure, where older readers of the JSON look for it
            row.update(ratio=res["edgesplit"]["ratio"], pair_ratios=res["edgesplit"]["pair_ratios"],
                       cpu_ratio=res["edgesplit"]["cpu_ratio"])
        rows.append(row)
    return rows


# --- part 2: pipeline --------------------------------------------------------------------------
def _stage_ms_alone(manifest, store, splits: list, reps: int) -> list[float]:
    import torch

    from edgesplit.partitioner import build_blocks

    bounds = [0, *splits, manifest.n_blocks]
    out = []
    x = torch.randn(1, *manifest.input_shape)
    with torch.inference_mode():
        for a, b in zip(bounds, bounds[1:]):
            stage = build_blocks(store, manifest, a, b)
            y = stage(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                stage(x)
                times.append(time.perf_counter() - t0)
            out.append(statistics.median(times) * 1000)
            x = y
    return out


def _per_request_ms(records: list[list[Any]]) -> float:
    """Median compute ms per request at one stage, from trace records.

    A worker batches what waits together (``runtime/worker/batcher.py``): the requests of one batch share
    its start and end, so each is charged the batch's time divided by how many shared it.
    """
    batch = collections.Counter((r[1], r[3], r[4]) for r in records)  # (worker, t_start, t_end)
    return statistics.median((r[4] - r[3]) * 1000 / batch[r[1], r[3], r[4]] for r in records)


def run_pipeline(args: argparse.Namespace) -> dict:
    import timm
    import torch

    from edgesplit.partitioner import BlockStore, partition, timm_recipe
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-bench-"))
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    store = BlockStore(tmp / "store")
    manifest = partition(model, args.model, timm_recipe(args.model), store, profile=False)
    del model
    splits = [args.split or manifest.n_blocks // 2]
    alone_before = _stage_ms_alone(manifest, store, splits, reps=30)  # measured while our cluster is not running
    lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1), store=tmp / "store",
                      workdir=str(tmp / "cluster"))
    with lc:
        cl = lc.client(timeout_ms=120_000, max_in_flight=max(64, args.in_flight))
        cl.deploy(args.model, splits=splits)
        xs = [torch.randn(1, *manifest.input_shape) for _ in range(16)]
        for i in range(args.warmup_requests):
            cl.infer(args.model, xs[i % len(xs)])
        result = {"model": args.model, "splits": splits, "runs": []}
        for in_flight in sorted({1, args.in_flight}):
            futs, t0 = [], time.perf_counter()
            pending: list = []
            for i in range(args.requests):
                pending.append(cl.submit(args.model, xs[i % len(xs)], trace=True))
                if len(pending) >= in_flight:
                    futs.append(pending.pop(0))
                    futs[-1].result()
            for f in pending:
                f.result()
                futs.append(f)
            wall = time.perf_counter() - t0
            stage_ms = [_per_request_ms([f.info.trace[k] for f in futs]) for k in range(2)]
            thr = args.requests / wall
            result["runs"].append({"in_flight": in_flight, "throughput_rps": thr, "stage_ms_in_run": stage_ms,
                                   "ratio_in_run": thr * max(stage_ms) / 1000,
                                   "latency_ms_p50": statistics.median(f.info.latency_ms for f in futs)})
    alone_after = _stage_ms_alone(manifest, store, splits, reps=30)
    alone = [min(a, b) for a, b in zip(alone_before, alone_after)]  # the less disturbed of two measurements
    result["stage_ms_alone"] = alone
    result["stage_ms_alone_before_after"] = [alone_before, alone_after]
    for r in result["runs"]:
        r["ratio_alone"] = r["throughput_rps"] * max(alone) / 1000
    print(f"\n[pipeline] {args.model} in 2 stages (blocks [0,{splits[0]}) | [{splits[0]},{manifest.n_blocks})), "
          f"2 worker processes x 1 torch thread, {args.requests} requests of batch 1 after {args.warmup_requests} warm-up")
    print(f"stage compute ms alone (this process, 1 thread, median of 30; min of before/after the run): "
          f"{alone[0]:.2f} | {alone[1]:.2f}   (before {alone_before[0]:.2f} | {alone_before[1]:.2f}, "
          f"after {alone_after[0]:.2f} | {alone_after[1]:.2f})")
    print(f"{'in flight':>9}  {'req/s':>7}  {'stage ms in run':>17}  {'bound req/s':>11}  {'ratio (run)':>11}  "
          f"{'ratio (alone)':>13}  {'p50 ms':>7}")
    for r in result["runs"]:
        s = r["stage_ms_in_run"]
        print(f"{r['in_flight']:>9}  {r['throughput_rps']:>7.1f}  {s[0]:>8.2f} | {s[1]:>6.2f}  "
              f"{1000 / max(s):>11.1f}  {r['ratio_in_run']:>11.2f}  {r['ratio_alone']:>13.2f}  {r['latency_ms_p50']:>7.1f}")
    return result


def _plot(transfer: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sizes = [r["size_bytes"] / (1 << 20) for r in transfer]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sizes, [r["raw"]["gb_per_s"] for r in transfer], "o-", label="raw pyzmq PUSH/PULL")
    if "edgesplit" in transfer[0]:
        ax.plot(sizes, [r["edgesplit"]["gb_per_s"] for r in transfer], "s-",
                label="edgesplit link (+decode, batched ACKs)")
    ax.set_xscale("log")
    ax.set_xlabel("activation size (MiB)")
    ax.set_ylabel("GB/s, tcp loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "transfer", "pipeline"], default="all", help="what to measure")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per size and link kind (median reported)")
    p.add_argument("--warmup", type=int, default=16, help="warm-up messages before timing")
    p.add_argument("--sizes", type=lambda v: [int(float(x) * 1024) for x in v.split(",")], default=SIZES,
                   help="transfer sizes in KiB, comma-separated (default: 64,1024,4096,16384)")
    p.add_argument("--hwm", type=int, default=None,
                   help="send/receive high-water mark of all kinds' sockets (default: protocol.DATA_HWM_MSGS)")
    p.add_argument("--kinds", type=lambda v: tuple(dict.fromkeys(("raw", *filter(None, v.split(","))))), default=KINDS,
                   help=f"links to time against raw, comma-separated, from edgesplit,{','.join(FLOORS)} (default: "
                        f"edgesplit). The floors send over edgesplit's sockets with none of its protocol code: "
                        f"'bare' keeps custody (batched ACKs, the header packed once, nothing checked), 'bare-noack' "
                        f"has none; they bound what a faster codec could win")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model for the pipeline part")
    p.add_argument("--requests", type=int, default=200, help="timed requests per pipeline run")
    p.add_argument("--warmup-requests", type=int, default=20, help="untimed requests before the pipeline runs")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight for the pipelined run (1 is also run)")
    p.add_argument("--split", type=int, default=0, help="block where stage 2 starts (default: half the blocks)")
    p.add_argument("--out", type=Path, default=OUT / "transport.json", help="JSON file to write (a plot beside it)")
    args = p.parse_args()
    from edgesplit.runtime import protocol as P

    unknown = [k for k in args.kinds if k not in (*KINDS, *FLOORS)]
    if unknown or len(args.kinds) < 2:
        p.error(f"--kinds: {'unknown ' + ', '.join(unknown) if unknown else 'nothing to time against raw'}; choose "
                f"from {', '.join((*KINDS[1:], *FLOORS))}")
    if args.out.suffix == ".png":
        p.error(f"--out is the JSON file (the plot goes beside it, as .png); got {args.out}")
    bad = [s for s in args.sizes if not 4 <= s <= P.MAX_FRAME_BYTES]
    if bad:  # a frame over the cap is refused by the receiving socket: the round would only time out
        p.error(f"--sizes are in KiB, each from 0.004 to {P.MAX_FRAME_BYTES >> 10} (protocol.MAX_FRAME_BYTES); "
                f"got {', '.join(f'{s / 1024:.10g}' for s in bad)}")
    if args.hwm is None:
        args.hwm = P.DATA_HWM_MSGS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"config: {vars(args)}; cpus {os.cpu_count()}; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    out: dict = {"config": {**vars(args), "out": str(args.out)}, "load_start": load0}
    if args.part in ("all", "transfer"):
        out["transfer"] = run_transfer(args)
        _plot(out["transfer"], args.out.with_suffix(".png"))
    if args.part in ("all", "pipeline"):
        out["pipeline"] = run_pipeline(args)
    out["load_end"] = os.getloadavg()
    print(f"\nload average at end {out['load_end'][0]:.2f} {out['load_end'][1]:.2f} {out['load_end'][2]:.2f}")
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
