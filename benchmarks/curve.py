"""CURVE benchmark: what encryption costs, measured in the same run with and without it.

::

    python benchmarks/curve.py                      # both parts, defaults below
    python benchmarks/curve.py --quick              # a short run (2 pairs per size, 1 pipeline run each, 60 requests)
    python benchmarks/curve.py --part transfer --repeats 7 --sizes 64,1024
    python benchmarks/curve.py --part pipeline --requests 300 --runs 5

Part 1 (transfer): one sender process streams activations of 64 KiB, 1, 4 and 16 MiB to one
receiver process over tcp loopback through edgesplit's link exactly as ``transport.py``'s
edgesplit kind does (``PeerLinks`` DEALER -> ``transport.router`` ROUTER, validating decode to a
tensor, custody ACKs batched as a worker does, the sender keeping <= 64 messages until ACKed; its
functions are imported, not copied), once open and once keyed: the keyed link is the same
DEALER -> ROUTER with ``Security`` from ``runtime.security``, the receiver a CURVE server of
domain ``DATA`` with its ZAP allow-list (role worker, as a worker's data socket), the sender a
CURVE client dialling the receiver's public key (``PeerLinks(sec=..., key_of=...)``), and the
receiver looks up each message's sender (``Security.peer_of``) as the worker's data plane does
-- a message without an authenticated worker key ends the run with an error, so a keyed
round is proven encrypted and authenticated. Keys are made for the run with ``keygen`` (role
worker both sides) in a temporary directory per process, each holding its own secret and
both publics. Both kinds live in the same two processes and their rounds alternate (which
goes first alternates too), so each keyed round is compared with an open round next to it
in time; the ratio is the median over ``--repeats`` pairs of keyed/open throughput. Each
process's CPU time (all threads: the io thread that encrypts, the ZAP thread) per message
is printed too.

Part 2 (pipeline): ``--model`` (random weights) partitioned into a temporary store, two local
clusters of a coordinator and 2 worker processes (one torch thread each) up side by side, one
open and one keyed (``LocalClusterConfig(keyed=True)``: CURVE on every socket, roles checked;
deployed by the operator's client, requests sent by the user's), the model split into 2
stages on each. ``--runs`` timed runs per cluster of ``--requests`` inputs with
``--in-flight`` outstanding, alternating open/keyed (and which goes first), so a drift of
the machine's load hits both; throughput is the median of the runs, and the ratio the
median over pairs of keyed/open. The idle cluster only heartbeats meanwhile.

Writes ``benchmarks/out/curve.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# the transfer method of the transport benchmark (this folder is on sys.path)
from transport import (ROUND_BYTES, SIZES, _edgesplit_send, _n_messages, _per_msg, _per_request_ms, _receive_round,
                       _summary, _thread_cpu, _TransferPair, worker_credit)

OUT = Path(__file__).resolve().parent / "out"
KINDS = ("open", "curve")
_RECEIVER, _SENDER = "receiver", "sender"  # the two processes' key names


# --- part 1: transfer --------------------------------------------------------------------------
def make_keys(root: Path) -> dict[str, str]:
    """A worker key pair per process; each process's directory holds its own secret and both publics."""
    from edgesplit.runtime.security import keygen

    made = root / "made"
    for name in (_RECEIVER, _SENDER):
        keygen("worker", made, name)
    dirs = {}
    for name in (_RECEIVER, _SENDER):
        d = root / name
        d.mkdir(parents=True)
        for pub in made.glob("*.key"):
            shutil.copy(pub, d / pub.name)
        shutil.copy(made / f"{name}.key_secret", d / f"{name}.key_secret")
        dirs[name] = str(d)
    return dirs


def _curve_receiver(hwm: int, key_dir: str, ctl: Any, out: Any) -> None:
    """Owns an open and a keyed ROUTER (CURVE server, domain DATA); receives one round per job from ``ctl``."""
    import zmq

    from edgesplit.runtime import protocol as P
    from edgesplit.runtime.acks import AckBatch
    from edgesplit.runtime.security import Security, load_keys
    from edgesplit.runtime.security.roles import CONNECT, DATA
    from edgesplit.runtime.transport import SocketOptions, recv, router, send

    ctx = zmq.Context()
    keys = load_keys(key_dir)
    sec = Security(ctx, keys, {DATA: CONNECT[DATA]})
    opts = SocketOptions(hwm_msgs=hwm)
    socks = {"open": router(ctx, "tcp://127.0.0.1:*", opts),
             "curve": router(ctx, "tcp://127.0.0.1:*", opts, sec=sec, domain=DATA)}
    out.put({"endpoints": {k: ep for k, (_, ep) in socks.items()}, "key": keys.public.decode()})
    acks = AckBatch.for_credit(worker_credit())  # transport.py's receiver: the worker's custody ACKs

    def handlers(kind: str) -> tuple[Any, Any, Any, Any]:
        """(socket, receive, take, flush) of one kind: transport.py's edgesplit receiver, keyed or not."""
        rtr = socks[kind][0]

        def receive() -> tuple[list[bytes], list]:
            return recv(rtr, 1)

        def take(msg: tuple[list[bytes], list]) -> None:
            route, frames = msg
            if kind == "curve":  # the worker's data plane asks who signed each RUN (ZAP User-Id -> key ring)
                peer = sec.peer_of(frames[0])
                if peer is None or peer.role != "worker":
                    raise RuntimeError(f"keyed receiver: a message from {peer} (no authenticated worker key)")
            m = P.decode(frames)
            m.tensor(0)
            acks.add(tuple(route), m.rid, m.get("hop"), time.time())

        def flush(force: bool) -> float | None:
            for route, ack in acks.take(time.monotonic(), force):
                send(rtr, ack, route=route, block=True)
            return acks.wait_s(time.monotonic())

        return rtr, receive, take, flush

    by_kind = {k: handlers(k) for k in KINDS}
    for kind, total, warmup in iter(ctl.get, None):
        out.put(_receive_round(*by_kind[kind], total, warmup))
    for rtr, _ in socks.values():
        rtr.close()
    sec.close()  # the ZAP thread, before the context goes
    ctx.term()


def _curve_sender(hwm: int, key_dir: str, receiver: dict[str, Any], ctl: Any, out: Any) -> None:
    """Owns an open and a keyed ``PeerLinks`` (CURVE client of the receiver's key); sends one round per job."""
    import torch
    import zmq

    from edgesplit.runtime.security import Security, load_keys
    from edgesplit.runtime.transport import PeerLinks, SocketOptions

    torch.set_num_threads(1)  # as transport.py's sender: no OpenMP thread spinning through a round
    ctx = zmq.Context()
    sec = Security(ctx, load_keys(key_dir))
    opts = SocketOptions(hwm_msgs=hwm)
    endpoints, server_key = receiver["endpoints"], receiver["key"]
    links = {"open": PeerLinks(ctx, b"bench-open", opts, max_outbox_msgs=64),
             "curve": PeerLinks(ctx, b"bench-curve", opts, max_outbox_msgs=64, sec=sec, key_of=lambda ep: server_key)}
    sock = links["curve"].link(endpoints["curve"])
    if sock is None or sock.getsockopt(zmq.MECHANISM) != zmq.CURVE:
        raise RuntimeError(f"the keyed link is not CURVE: {sock and sock.getsockopt(zmq.MECHANISM)}")
    for kind, size, total in iter(ctl.get, None):
        cpu0, threads0 = time.process_time(), _thread_cpu()
        _edgesplit_send(links[kind], endpoints[kind], torch.ones(size // 4), total)
        out.put(((time.process_time() - cpu0) / total, _per_msg(threads0, total)))
    for pl in links.values():
        pl.close_all()
    sec.close()
    ctx.term()


class _CurvePair(_TransferPair):
    """transport.py's pair of processes (its ``round``, ``_get``, ``close``), each holding an open and a keyed link."""

    def __init__(self, hwm: int, key_dirs: dict[str, str]) -> None:  # not super().__init__: other processes
        spawn = mp.get_context("spawn")
        self.recv_ctl, self.recv_out, self.send_ctl, self.send_out = (spawn.Queue() for _ in range(4))
        self.recv = spawn.Process(target=_curve_receiver, args=(hwm, key_dirs[_RECEIVER], self.recv_ctl,
                                                                self.recv_out), daemon=True)
        self.recv.start()
        self.send = self.recv  # until the sender starts, ``_get`` watches the receiver alone
        receiver = self._get(self.recv_out, 120)
        self.send = spawn.Process(target=_curve_sender, args=(hwm, key_dirs[_SENDER], receiver, self.send_ctl,
                                                              self.send_out), daemon=True)
        self.send.start()


def measure_curve(size: int, repeats: int, warmup: int, hwm: int,
                  key_dirs: dict[str, str]) -> dict[str, list[dict[str, float]]]:
    """``repeats`` rounds of each kind at ``size``, open/keyed alternating (and which goes first), a pair at a time."""
    pair = _CurvePair(hwm, key_dirs)
    total = warmup + _n_messages(size)
    res: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    try:
        for kind in KINDS:  # untimed: connections up (the CURVE handshake), buffers and caches warm
            pair.round(kind, size, warmup * 2, warmup)
        for r in range(repeats):
            for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
                res[kind].append(pair.round(kind, size, total, warmup))
    finally:
        pair.close()
    return res


def _label(size: int) -> str:
    return f"{size >> 10} KiB" if size < (1 << 20) else f"{size / (1 << 20):g} MiB"


def run_transfer(args: argparse.Namespace) -> list[dict]:
    from edgesplit.runtime.security.roles import CONNECT, DATA

    print(f"\n[transfer] tcp loopback, edgesplit's link (transport.py's edgesplit kind) open and CURVE, HWM {args.hwm} "
          f"msgs, {args.repeats} pairs of timed rounds (~{ROUND_BYTES >> 20} MiB each, after {args.warmup} messages), "
          f"kinds alternating;"
          f" medians.\nCURVE: receiver a CURVE server of domain {DATA!r} (ZAP allows {sorted(CONNECT[DATA])}), sender "
          f"a CURVE client; the receiver checks each message's authenticated key (peer_of).\n"
          f"ratio = median over pairs of CURVE/open throughput; CPU = sender+receiver process CPU (all threads) per "
          f"message; CPU x = CURVE CPU / open CPU")
    print(f"{'size':>8}  {'open MiB/s':>10} {'us/msg':>8} {'CPU us':>11}  {'CURVE MiB/s':>11} {'us/msg':>8} "
          f"{'CPU us':>11}  {'ratio':>5} {'(min-max)':>11}  {'CPU x':>5}")
    rows = []
    root = Path(tempfile.mkdtemp(prefix="edgesplit-curve-keys-"))
    try:
        key_dirs = make_keys(root)
        for size in args.sizes:
            m = measure_curve(size, args.repeats, args.warmup, args.hwm, key_dirs)
            res = {k: _summary(size, m[k]) for k in KINDS}
            for r in res.values():
                r["mib_per_s"] = size / (r["us_per_msg"] / 1e6) / (1 << 20)
            ratios = [o["s_per_msg"] / c["s_per_msg"] for o, c in zip(m["open"], m["curve"])]
            ratio = statistics.median(ratios)
            op, cu = res["open"], res["curve"]
            cpu_x = (cu["send_cpu_us"] + cu["recv_cpu_us"]) / (op["send_cpu_us"] + op["recv_cpu_us"])
            print(f"{_label(size):>8}  {op['mib_per_s']:>10.0f} {op['us_per_msg']:>8.1f} "
                  f"{op['send_cpu_us']:>5.0f}+{op['recv_cpu_us']:<5.0f}  {cu['mib_per_s']:>11.0f} "
                  f"{cu['us_per_msg']:>8.1f} {cu['send_cpu_us']:>5.0f}+{cu['recv_cpu_us']:<5.0f}  {ratio:>5.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f})  {cpu_x:>5.2f}", flush=True)
            rows.append({"size_bytes": size, "messages_per_round": _n_messages(size), **res, "ratio": ratio,
                         "pair_ratios": ratios, "cpu_ratio_curve_over_open": cpu_x})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


# --- part 2: pipeline --------------------------------------------------------------------------
def _timed_run(cl: Any, model: str, xs: list, requests: int, in_flight: int) -> dict[str, Any]:
    """``requests`` inputs with ``in_flight`` outstanding (transport.py's loop); throughput and per-stage compute."""
    futs, pending = [], []
    t0 = time.perf_counter()
    for i in range(requests):
        pending.append(cl.submit(model, xs[i % len(xs)], trace=True))
        if len(pending) >= in_flight:
            futs.append(pending.pop(0))
            futs[-1].result()
    for f in pending:
        f.result()
        futs.append(f)
    wall = time.perf_counter() - t0
    stage_ms = [_per_request_ms([f.info.trace[k] for f in futs]) for k in range(2)]
    return {"throughput_rps": requests / wall, "stage_ms_in_run": stage_ms,
            "latency_ms_p50": statistics.median(f.info.latency_ms for f in futs)}


def run_pipeline(args: argparse.Namespace) -> dict:
    import timm
    import torch

    from edgesplit.partitioner import BlockStore, partition, timm_recipe
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-curve-"))
    try:
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False).eval()
        manifest = partition(model, args.model, timm_recipe(args.model), BlockStore(tmp / "store-open"), profile=False)
        del model
        shutil.copytree(tmp / "store-open", tmp / "store-curve")  # each coordinator keeps its plans in its store
        splits = [args.split or manifest.n_blocks // 2]
        clusters = {kind: LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1, keyed=kind == "curve"),
                                       store=tmp / f"store-{kind}", workdir=str(tmp / kind)) for kind in KINDS}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        with clusters["open"], clusters["curve"]:
            clients = {}
            for kind, lc in clusters.items():
                lc.client(timeout_ms=120_000).deploy(args.model, splits=splits)  # keyed: the operator deploys
                runner = {"keys": str(lc.key_dir("user"))} if kind == "curve" else {}  # keyed: a user runs requests
                clients[kind] = lc.client(timeout_ms=120_000, max_in_flight=max(64, args.in_flight), **runner)
            xs = [torch.randn(1, *manifest.input_shape) for _ in range(16)]
            for kind, cl in clients.items():
                for i in range(args.warmup_requests):
                    cl.infer(args.model, xs[i % len(xs)])
            for r in range(args.runs):
                for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
                    runs[kind].append(_timed_run(clients[kind], args.model, xs, args.requests, args.in_flight))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [c["throughput_rps"] / o["throughput_rps"] for o, c in zip(runs["open"], runs["curve"])]
    res = {kind: {"throughput_rps": statistics.median(r["throughput_rps"] for r in runs[kind]),
                  "stage_ms_in_run": [statistics.median(r["stage_ms_in_run"][k] for r in runs[kind]) for k in range(2)],
                  "latency_ms_p50": statistics.median(r["latency_ms_p50"] for r in runs[kind]), "runs": runs[kind]}
           for kind in KINDS}
    ratio = statistics.median(ratios)
    print(f"\n[pipeline] {args.model} in 2 stages (blocks [0,{splits[0]}) | [{splits[0]},{manifest.n_blocks})), "
          f"2 worker processes x 1 torch thread per cluster, {args.runs} runs per cluster of {args.requests} requests "
          f"of batch 1 with {args.in_flight} in flight, open/keyed alternating; medians.\n"
          f"keyed: CURVE on every socket, deployed by the operator, requests by a user; ratio = median over pairs of "
          f"keyed/open req/s")
    print(f"{'cluster':>8}  {'req/s':>7}  {'runs req/s':>24}  {'stage ms in run':>17}  {'p50 ms':>7}")
    for kind in KINDS:
        r, s = res[kind], res[kind]["stage_ms_in_run"]
        each = " ".join(f"{x['throughput_rps']:.1f}" for x in r["runs"])
        print(f"{'open' if kind == 'open' else 'keyed':>8}  {r['throughput_rps']:>7.1f}  {each:>24}  "
              f"{s[0]:>8.2f} | {s[1]:>6.2f}  {r['latency_ms_p50']:>7.1f}")
    print(f"ratio keyed/open: {ratio:.3f} (pairs {' '.join(f'{x:.3f}' for x in ratios)})")
    return {"model": args.model, "splits": splits, "in_flight": args.in_flight, "requests": args.requests, **res,
            "ratio": ratio, "pair_ratios": ratios}


QUICK = {"repeats": 2, "runs": 1, "requests": 60, "warmup_requests": 10}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1].replace("::\n\n", "", 1),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "transfer", "pipeline"], default="all", help="what to measure")
    p.add_argument("--quick", action="store_true",
                   help="a short run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                        + " (options given explicitly still win)")
    p.add_argument("--repeats", type=int, default=None, help="pairs of timed open/CURVE rounds per size (default 5)")
    p.add_argument("--warmup", type=int, default=16, help="warm-up messages before timing a round")
    p.add_argument("--sizes", type=lambda v: [int(float(x) * 1024) for x in v.split(",")], default=SIZES,
                   help="transfer sizes in KiB, comma-separated (default: 64,1024,4096,16384)")
    p.add_argument("--hwm", type=int, default=None,
                   help="send/receive high-water mark of the links (default: protocol.DATA_HWM_MSGS)")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model for the pipeline part")
    p.add_argument("--requests", type=int, default=None, help="timed requests per pipeline run (default 200)")
    p.add_argument("--runs", type=int, default=None, help="timed pipeline runs per cluster (default 3)")
    p.add_argument("--warmup-requests", type=int, default=None, help="untimed requests per cluster (default 20)")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight in the pipeline runs")
    p.add_argument("--split", type=int, default=0, help="block where stage 2 starts (default: half the blocks)")
    p.add_argument("--out", type=Path, default=OUT / "curve.json", help="JSON file to write")
    args = p.parse_args()
    defaults = {"repeats": 5, "runs": 3, "requests": 200, "warmup_requests": 20}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK[k] if args.quick else v)
    if args.hwm is None:
        from edgesplit.runtime import protocol as P

        args.hwm = P.DATA_HWM_MSGS
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    print(f"config: {vars(args)}; cpus {os.cpu_count()}; load average at start {load0[0]:.2f} {load0[1]:.2f} "
          f"{load0[2]:.2f}")
    out: dict = {"config": {**vars(args), "out": str(args.out)}, "load_start": load0}
    if args.part in ("all", "transfer"):
        out["transfer"] = run_transfer(args)
    if args.part in ("all", "pipeline"):
        out["pipeline"] = run_pipeline(args)
    out["load_end"] = os.getloadavg()
    out["wall_s"] = time.perf_counter() - t0
    print(f"\nload average at end {out['load_end'][0]:.2f} {out['load_end'][1]:.2f} {out['load_end'][2]:.2f}; "
          f"wall {out['wall_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
