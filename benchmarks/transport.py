"""Transport benchmark: edgesplit's worker->worker link against raw pyzmq, and 2-stage pipeline throughput.

::

    python benchmarks/transport.py                  # both parts, defaults below
    python benchmarks/transport.py --part transfer --repeats 7
    python benchmarks/transport.py --part pipeline --requests 300 --in-flight 8

Part 1 (transfer): one sender process streams activations of 64 KiB, 1, 4 and 16 MiB to one
receiver process over tcp loopback, (a) through edgesplit's link exactly as a worker sends
a hop -- ``protocol.encode`` of a RUN with the tensor frame zero-copy, the worker's DEALER
options, the receiver's validating ``decode`` to a tensor and an ACK per message, the
sender's bounded kept table -- and (b) through raw pyzmq PUSH/PULL with the same
high-water marks, measured in the same run. Median of ``--repeats`` timed rounds after a
warm-up; the ratio edgesplit / raw is printed.

Part 2 (pipeline): a coordinator and 2 worker processes (one torch thread each), a model
split into 2 stages, ``--requests`` inputs streamed with ``--in-flight`` outstanding.
Throughput is compared with the bottleneck stage's rate, 1 / (slowest stage's median
compute time), both as the workers measured it during the run and as measured alone in
this process before the run.

Writes ``benchmarks/out/transport.json`` (and a plot when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = [64 * 1024, 1 << 20, 4 << 20, 16 << 20]
OUT = Path(__file__).resolve().parent / "out"


def _n_messages(size: int) -> int:
    return max(16, min(1000, (64 << 20) // size))  # about 64 MiB per timed round


# --- part 1: transfer --------------------------------------------------------------------------
def _receiver(kind: str, size: int, rounds: int, warmup: int, q: mp.Queue) -> None:
    import numpy as np
    import zmq

    from edgesplit.runtime import protocol as P
    from edgesplit.runtime.transport import SocketOptions, router

    ctx = zmq.Context()
    n = _n_messages(size)
    ctx.setsockopt(zmq.RCVTIMEO, 60_000)  # a lost message ends the run with an error, not a hang
    if kind == "raw":
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, P.DATA_HWM_MSGS)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        q.put(f"tcp://127.0.0.1:{port}")

        def take() -> None:
            f = sock.recv(copy=False)
            np.frombuffer(f.buffer, dtype=np.float32)
    else:
        sock, endpoint = router(ctx, "tcp://127.0.0.1:*", SocketOptions())
        q.put(endpoint)

        def take() -> None:
            frames = sock.recv_multipart(copy=False)
            msg = P.decode(frames[1:])
            msg.tensor(0)  # a tensor over the frame, as the worker's compute gets it
            sock.send_multipart([frames[0].bytes, *P.encode(P.Msg.ACK, msg.rid, 0, {"hop": msg.get("hop")})])

    for _ in range(warmup):
        take()
    times = []
    for _ in range(rounds):
        take()  # the clock starts at a message's arrival, so the pipe is full
        t0 = time.perf_counter()
        for _ in range(n - 1):
            take()
        times.append(time.perf_counter() - t0)
    q.put(times)
    sock.setsockopt(zmq.LINGER, 2000)  # let the last ACKs out
    sock.close()
    ctx.term()


def _sender(kind: str, size: int, rounds: int, warmup: int, endpoint: str) -> None:
    import collections

    import numpy as np
    import torch
    import zmq

    from edgesplit.runtime import protocol as P
    from edgesplit.runtime.transport import PeerLinks, SocketOptions

    total = warmup + rounds * _n_messages(size)
    ctx = zmq.Context()
    if kind == "raw":
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, P.DATA_HWM_MSGS)
        sock.setsockopt(zmq.LINGER, -1)  # deliver everything before close returns
        sock.connect(endpoint)
        buf = np.ones(size // 4, dtype=np.float32)
        for _ in range(total):
            sock.send(buf, copy=False)
        sock.close()
    else:
        links = PeerLinks(ctx, b"bench-sender", SocketOptions(), max_outbox_msgs=64)
        x = torch.ones(size // 4)
        kept: collections.OrderedDict = collections.OrderedDict()
        link = links.link(endpoint)
        sent = acked = 0
        max_kept = 64  # the worker's default kept-table bound
        last_progress = time.monotonic()
        while acked < total and time.monotonic() - last_progress < 10:  # the receiver may exit before the last ACKs
            while sent < total and len(kept) < max_kept and links.pending(endpoint) == 0:
                rid = P.new_rid()
                frames = P.encode(P.Msg.RUN, rid, 10_000, {"mdl": "bench", "hop": 1, "rep": endpoint}, [x])
                links.send(endpoint, frames)
                kept[rid] = frames
                sent += 1
            if link.poll(5, zmq.POLLIN | (zmq.POLLOUT if links.pending(endpoint) else 0)) & zmq.POLLOUT:
                links.flush(endpoint)
            while True:
                try:
                    reply = P.decode(link.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
                if kept.pop(reply.rid, None) is not None:
                    acked += 1
                    last_progress = time.monotonic()
        links.close_all()
    ctx.term()


def measure_transfer(kind: str, size: int, rounds: int, warmup: int) -> list[float]:
    """Seconds per timed round (``_n_messages(size)`` messages) for one link kind."""
    spawn = mp.get_context("spawn")
    q = spawn.Queue()
    recv = spawn.Process(target=_receiver, args=(kind, size, rounds, warmup, q))
    recv.start()
    endpoint = q.get(timeout=60)
    send = spawn.Process(target=_sender, args=(kind, size, rounds, warmup, endpoint))
    send.start()
    times = q.get(timeout=300)
    send.join(60)
    recv.join(60)
    return times


def run_transfer(args: argparse.Namespace) -> list[dict]:
    rows = []
    print(f"\n[transfer] tcp loopback, HWM {8} msgs, {args.repeats} timed rounds of ~64 MiB after "
          f"{args.warmup} warm-up messages; medians")
    print(f"{'size':>8}  {'raw pyzmq GB/s':>15} {'ms/msg':>8}  {'edgesplit GB/s':>15} {'ms/msg':>8}  {'ratio':>6}")
    for size in SIZES:
        n = _n_messages(size)
        res = {}
        for kind in ("raw", "edgesplit"):
            times = measure_transfer(kind, size, args.repeats, args.warmup)
            med = statistics.median(times)
            res[kind] = {"gb_per_s": (n - 1) * size / med / 1e9, "ms_per_msg": med / (n - 1) * 1e3,
                         "rounds_s": times}
        ratio = res["edgesplit"]["gb_per_s"] / res["raw"]["gb_per_s"]
        label = f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
        print(f"{label:>8}  {res['raw']['gb_per_s']:>15.2f} {res['raw']['ms_per_msg']:>8.3f}  "
              f"{res['edgesplit']['gb_per_s']:>15.2f} {res['edgesplit']['ms_per_msg']:>8.3f}  {ratio:>6.2f}")
        rows.append({"size_bytes": size, "messages_per_round": n, **res, "ratio": ratio})
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
            stage_ms = [statistics.median((f.info.trace[k][4] - f.info.trace[k][3]) * 1000 for f in futs)
                        for k in range(2)]
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


def _plot(transfer: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sizes = [r["size_bytes"] / (1 << 20) for r in transfer]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sizes, [r["raw"]["gb_per_s"] for r in transfer], "o-", label="raw pyzmq PUSH/PULL")
    ax.plot(sizes, [r["edgesplit"]["gb_per_s"] for r in transfer], "s-", label="edgesplit link (+decode, ACK)")
    ax.set_xscale("log")
    ax.set_xlabel("activation size (MiB)")
    ax.set_ylabel("GB/s, tcp loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "transport.png", dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "transfer", "pipeline"], default="all", help="what to measure")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per size and link kind (median reported)")
    p.add_argument("--warmup", type=int, default=16, help="warm-up messages before timing")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model for the pipeline part")
    p.add_argument("--requests", type=int, default=200, help="timed requests per pipeline run")
    p.add_argument("--warmup-requests", type=int, default=20, help="untimed requests before the pipeline runs")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight for the pipelined run (1 is also run)")
    p.add_argument("--split", type=int, default=0, help="block where stage 2 starts (default: half the blocks)")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"config: {vars(args)}; cpus {os.cpu_count()}; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    out: dict = {"config": vars(args), "load_start": load0}
    if args.part in ("all", "transfer"):
        out["transfer"] = run_transfer(args)
        OUT.mkdir(parents=True, exist_ok=True)
        _plot(out["transfer"])
    if args.part in ("all", "pipeline"):
        out["pipeline"] = run_pipeline(args)
    out["load_end"] = os.getloadavg()
    print(f"\nload average at end {out['load_end'][0]:.2f} {out['load_end'][1]:.2f} {out['load_end'][2]:.2f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "transport.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT / 'transport.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
