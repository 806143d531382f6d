"""Burst benchmark: 2,000 submits at once, each with a 10 s deadline, against a 2-worker, 2-stage cluster.

::

    python benchmarks/burst.py                                  # defaults below
    python benchmarks/burst.py --requests 500 --timeout-ms 5000

    # the "before" figure: the same script against the tree before issue 15
    git worktree add /tmp/before 145ec01
    mkdir -p /tmp/before-pkg/edgesplit && touch /tmp/before-pkg/edgesplit/__init__.py
    for d in runtime partitioner compression; do ln -s /tmp/before/$d /tmp/before-pkg/edgesplit/$d; done
    PYTHONPATH=/tmp/before-pkg python benchmarks/burst.py --out benchmarks/out/burst_before.json

A coordinator and 2 worker processes (one torch thread each) on loopback; the model
(random weights) split into 2 stages, one per worker. After a warm-up, ``--requests``
inputs are submitted as fast as the client takes them, all in flight at once, each with
the deadline ``--timeout-ms`` counted from its submit. Every request ends in a result or
an error; reported per outcome: results within the deadline, timeouts, overloaded
refusals, other errors.

What the cluster spent is read from the workers' own counters once they are idle again:
``count_computed`` from their heartbeat telemetry, or, for code that lacks that counter,
the stage statistics' ``n`` (``Client.workers()[i].stats`` rows ``[model, hop, n, ...]``).
The bottleneck worker is the one that spent the most compute time in the burst (requests
computed x median compute time). Goodput = results within the deadline / requests the
bottleneck worker computed: 1.0 means no compute went to a request its client had already
given up on.

Writes ``benchmarks/out/burst.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


def _computed(cl: Any, model: str) -> dict[str, dict[str, Any]]:
    """Per worker: requests computed so far (and where the figure comes from), median compute ms."""
    out = {}
    for w in cl.workers():
        rows = [r for r in w.stats if isinstance(r, list) and len(r) >= 4 and r[0] == model]
        n_stats = sum(int(r[2]) for r in rows)
        p50 = max((float(r[3]) for r in rows), default=0.0)
        if "count_computed" in w.telemetry:
            out[w.name] = {"computed": int(w.telemetry["count_computed"]), "source": "count_computed", "p50_ms": p50}
        else:
            out[w.name] = {"computed": n_stats, "source": "stats n", "p50_ms": p50}
        out[w.name]["telemetry"] = {k: v for k, v in w.telemetry.items() if k.startswith("count_")}
    return out


def _settled(cl: Any, model: str, heartbeat_s: float, limit_s: float) -> dict[str, dict[str, Any]]:
    """Counters once they stop moving (two heartbeats apart), or after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    last = _computed(cl, model)
    while time.monotonic() < deadline:
        time.sleep(1.5 * heartbeat_s)
        now = _computed(cl, model)
        if {k: v["computed"] for k, v in now.items()} == {k: v["computed"] for k, v in last.items()}:
            return now
        last = now
    return last


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import timm
    import torch

    import edgesplit.runtime
    from edgesplit.partitioner import BlockStore, partition, timm_recipe
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig
    from edgesplit.runtime.errors import Overloaded, RequestTimeout, RuntimeFailure

    torch.set_num_threads(1)
    code = str(Path(edgesplit.runtime.__file__).resolve().parent)
    print(f"edgesplit.runtime from {code}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-burst-"))
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    manifest = partition(model, args.model, timm_recipe(args.model), BlockStore(tmp / "store"), profile=False)
    del model
    split = args.split or manifest.n_blocks // 2
    cfg = LocalClusterConfig(workers=2, port=0, torch_threads=args.torch_threads, heartbeat_ms=args.heartbeat_ms)
    max_in_flight = args.max_in_flight or args.requests + 64
    with LocalCluster(cfg, store=tmp / "store", workdir=str(tmp / "cluster")) as lc:
        cl = lc.client(timeout_ms=args.timeout_ms, max_in_flight=max_in_flight)
        cl.deploy(args.model, workers=["w0", "w1"], splits=[split])
        g = torch.Generator().manual_seed(args.seed)
        xs = [torch.randn(1, *manifest.input_shape, generator=g) for _ in range(16)]
        t0 = time.perf_counter()
        for i in range(args.warmup):
            cl.infer(args.model, xs[i % len(xs)], timeout_ms=60_000)
        one_ms = (time.perf_counter() - t0) * 1000 / max(1, args.warmup)
        hb_s = args.heartbeat_ms / 1000
        before = _settled(cl, args.model, hb_s, 30)

        ends: dict[int, tuple[float, Any]] = {}
        lock = threading.Lock()

        def on_done(i: int, fut: Any) -> None:
            t = time.monotonic()
            exc = fut.exception()
            with lock:
                ends[i] = (t, exc if exc is not None else "result")

        starts: list[float] = []
        futures = []
        t_burst = time.monotonic()
        for i in range(args.requests):
            f = cl.submit(args.model, xs[i % len(xs)], timeout_ms=args.timeout_ms)
            starts.append(time.monotonic())  # the deadline counts from here (a capped client waits in submit first)
            f.add_done_callback(lambda fut, i=i: on_done(i, fut))
            futures.append(f)
        submit_s = time.monotonic() - t_burst
        hung = 0
        for i, f in enumerate(futures):
            try:
                f.exception(timeout=max(0.0, starts[i] + args.timeout_ms / 1000 + 2.0 - time.monotonic()))
            except concurrent.futures.TimeoutError:
                hung += 1
        t_all_done = time.monotonic()
        after = _settled(cl, args.model, hb_s, 120)
        t_idle = time.monotonic()

    outcomes: dict[str, int] = {}
    latencies = []
    within = late = 0
    for i in range(args.requests):
        t_end, what = ends.get(i, (None, "hung"))
        if what == "result":
            lat = t_end - starts[i]
            if lat <= args.timeout_ms / 1000:
                within += 1
                latencies.append(lat * 1000)
            else:
                late += 1
            continue
        if isinstance(what, RequestTimeout):
            key = "timeout"
        elif isinstance(what, Overloaded):
            key = "overloaded"
        elif isinstance(what, RuntimeFailure):
            key = f"other: {type(what).__name__}"
        else:
            key = str(what) if isinstance(what, str) else f"other: {type(what).__name__}"
        outcomes[key] = outcomes.get(key, 0) + 1
    workers = {}
    for name in after:
        done = after[name]["computed"] - before.get(name, {}).get("computed", 0)
        workers[name] = {"computed": done, "source": after[name]["source"], "p50_ms": after[name]["p50_ms"],
                         "busy_ms": done * after[name]["p50_ms"], "telemetry": after[name]["telemetry"]}
    bottleneck = max(workers, key=lambda n: (workers[n]["busy_ms"], workers[n]["computed"]))
    computed = workers[bottleneck]["computed"]
    last_end = max((t for t, _ in ends.values()), default=t_all_done)
    return {
        "config": vars(args), "code": code, "split": split, "n_blocks": manifest.n_blocks,
        "one_request_ms_warm": one_ms, "submit_s": submit_s, "burst_s": last_end - t_burst,
        "workers_idle_after_s": t_idle - t_burst,
        "results_within_deadline": within, "results_late": late, "timeouts": outcomes.pop("timeout", 0),
        "overloaded": outcomes.pop("overloaded", 0), "hung": hung, "other_errors": outcomes,
        "latency_ms_p50": _pct(latencies, 0.5), "latency_ms_p99": _pct(latencies, 0.99),
        "workers": workers, "bottleneck": bottleneck, "bottleneck_computed": computed,
        "goodput": within / computed if computed else float("nan"),
        "goodput_per_worker": {n: within / w["computed"] if w["computed"] else float("nan")
                               for n, w in workers.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model (random weights)")
    p.add_argument("--requests", type=int, default=2000, help="requests in the burst")
    p.add_argument("--timeout-ms", type=int, default=10_000, help="deadline of each request, from its submit")
    p.add_argument("--max-in-flight", type=int, default=0,
                   help="client's in-flight cap (0 = the whole burst: every submit returns at once)")
    p.add_argument("--warmup", type=int, default=10, help="sequential requests before the burst")
    p.add_argument("--split", type=int, default=0, help="block where stage 2 starts (default: half the blocks)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--heartbeat-ms", type=int, default=1000, help="heartbeat interval of the daemons")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument("--out", default=str(OUT / "burst.json"), help="JSON file to write")
    args = p.parse_args()
    print(f"config: {vars(args)}; cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    res = run(args)
    print(f"\n[burst] {args.requests} submits in {res['submit_s']:.2f} s, deadline {args.timeout_ms} ms each; "
          f"{args.model} in 2 stages (blocks [0,{res['split']}) | [{res['split']},{res['n_blocks']})) on 2 workers; "
          f"one request alone {res['one_request_ms_warm']:.0f} ms")
    print(f"{'results within deadline':>26}: {res['results_within_deadline']}")
    print(f"{'timeouts':>26}: {res['timeouts']}")
    print(f"{'overloaded':>26}: {res['overloaded']}")
    print(f"{'other errors':>26}: {sum(res['other_errors'].values())} {res['other_errors'] or ''}")
    if res["results_late"] or res["hung"]:
        print(f"{'late results / hung':>26}: {res['results_late']} / {res['hung']}")
    print(f"{'latency of results':>26}: p50 {res['latency_ms_p50']:.0f} ms, p99 {res['latency_ms_p99']:.0f} ms; "
          f"last outcome {res['burst_s']:.1f} s after the first submit, workers idle after "
          f"{res['workers_idle_after_s']:.1f} s")
    for name, w in sorted(res["workers"].items()):
        mark = "  <- bottleneck" if name == res["bottleneck"] else ""
        print(f"{name:>26}: computed {w['computed']} ({w['source']}), median {w['p50_ms']:.1f} ms, "
              f"busy {w['busy_ms'] / 1000:.1f} s{mark}")
    print(f"{'goodput':>26}: {res['goodput']:.3f} = {res['results_within_deadline']} results within the deadline / "
          f"{res['bottleneck_computed']} computed by {res['bottleneck']} (per worker: "
          + ", ".join(f"{n} {g:.3f}" for n, g in sorted(res["goodput_per_worker"].items())) + ")")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
