"""Soak benchmark: 4 workers, a model in 2 stages x 2 replicas, a client at ~70% of capacity, and SIGKILLs.

::

    python benchmarks/soak.py                       # 5 minutes, a kill every 20 s
    python benchmarks/soak.py --minutes 0.5         # a quick check: one kill, one restart
    python benchmarks/soak.py --load 0.5 --kill-every-s 30 --restart-after-s 10

A coordinator and ``--workers`` worker processes on loopback; the model (random weights,
partitioned into a temporary store) deployed in ``--stages`` stages, each on ``--replicas``
workers. Capacity is measured first: ``--capacity-s`` seconds with a fixed number of
requests in flight. Then a client submits at ``--load`` x capacity (Poisson arrivals,
seeded) for ``--minutes``; every ``--kill-every-s`` a random worker gets SIGKILL, and
``--restart-after-s`` later it is started again under its name, on its port, with its
store (``LocalCluster.restart``), as systemd or K3s would. Nobody calls deploy after
the first one. The next kill waits until the route is healthy again (at most
2 x ``--kill-every-s``), so two workers are never down at once. The load goes on past
``--minutes`` until 3 s after the last restarted worker is back in the route, so its
recovery is measured under load too.

On a machine with fewer cores than daemons (the workers share them), a restarting
worker's start-up (imports, block fetch, warm-up) competes with the serving ones, and
the figures say more about the CPU than about the runtime: give each worker a core.

Reported:

- outcomes: results, and each error class by name; ``hung`` = neither by the request's
  deadline + 1 s (must be 0);
- requests lost to a kill: failed requests that were in flight at a kill, plus any
  ``WorkerLost`` (with replicas, must be 0); and, apart, requests that failed while a
  stage was short of a replica (submitted after a kill, before the route was healthy
  again): with one of R replicas down a stage has (R-1)/R of its capacity, so a load
  above that builds a backlog that deadlines cut;
- per kill: requests in flight, seconds from the kill to the replacement registered, to
  the route listing ``--replicas`` workers per stage again ("healthy"), and to the first
  result that went through the replacement (from request traces);
- latency p50/p99 of results, overall and for requests submitted in a kill window;
- results against the unsplit model (max |difference|, raw fp32 links: expected <= 1e-5).

Writes ``benchmarks/out/soak.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
ATOL = 1e-5  # raw fp32 links: the same float ops as the unsplit model
AFTER_HEALTHY_S = 3.0  # the load goes on at least this long after a restarted worker is back in the route


@dataclass
class Kill:
    """One SIGKILL and what followed (seconds after the kill; None = not seen)."""

    worker: str
    hop: int
    t: float  # seconds after the soak started
    in_flight: int
    registered_s: float | None = None
    healthy_s: float | None = None
    first_result_via_s: float | None = None
    lost: int = 0  # failed, and in flight at this kill
    failed_degraded: int = 0  # failed, submitted after this kill and before the route was healthy again
    t_mono: float = field(default=0.0, repr=False)
    t_wall: float = field(default=0.0, repr=False)
    t_restart_wall: float = field(default=0.0, repr=False)
    t_healthy_mono: float = field(default=0.0, repr=False)


@dataclass
class Sent:
    x_index: int
    future: concurrent.futures.Future
    t_submit: float  # monotonic
    t_end: float = 0.0  # monotonic, set when it ends
    t_end_wall: float = 0.0
    outcome: Any = None  # "result" or the exception


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _replicas(route: Any) -> list[list[Any]]:
    """Every worker per stage (a route without ``replicas``, from code before them: its one hop each)."""
    return getattr(route, "replicas", None) or [[h] for h in route.hops]


def _placement(route: Any) -> dict[str, int]:
    return {h.worker: k for k, reps in enumerate(_replicas(route)) for h in reps}


def _healthy(cl: Any, model: str, replicas: int, worker: str) -> bool:
    from edgesplit.runtime.errors import RuntimeFailure

    try:
        route = cl.route(model, refresh=True)
    except RuntimeFailure:
        return False
    return all(len(reps) == replicas for reps in _replicas(route)) and worker in _placement(route)


def measure_capacity(cl: Any, model: str, xs: list[Any], seconds: float, in_flight: int) -> float:
    """Results per second with ``in_flight`` requests outstanding (the first second not counted)."""
    pending: list[concurrent.futures.Future] = []
    t0 = time.monotonic()
    t_count = t0 + min(1.0, seconds / 4)
    done_after = 0
    i = 0
    while time.monotonic() < t0 + seconds:
        while len(pending) < in_flight:
            pending.append(cl.submit(model, xs[i % len(xs)]))
            i += 1
        f = pending.pop(0)
        if f.exception() is None and time.monotonic() >= t_count:  # a refused request is no capacity
            done_after += 1
    for f in pending:
        f.exception()
    return done_after / (time.monotonic() - t_count)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import timm
    import torch

    from edgesplit.partitioner import BlockStore, partition, timm_recipe
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig
    from edgesplit.runtime.errors import RuntimeFailure, WorkerLost

    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-soak-"))
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    manifest = partition(model, args.model, timm_recipe(args.model), BlockStore(tmp / "store"), profile=False)
    g = torch.Generator().manual_seed(args.seed)
    xs = [torch.randn(1, *manifest.input_shape, generator=g) for _ in range(16)]
    with torch.inference_mode():
        refs = [model(x) for x in xs]
    del model
    cfg = LocalClusterConfig(workers=args.workers, port=0, torch_threads=args.torch_threads,
                             heartbeat_ms=args.heartbeat_ms)
    with LocalCluster(cfg, store=tmp / "store", workdir=str(tmp / "cluster")) as lc:
        cl = lc.client(timeout_ms=args.timeout_ms, max_in_flight=args.max_in_flight)
        extra = {"replicas": args.replicas} if args.replicas != 1 else {}  # R = 1 also runs on code before replicas
        route = cl.deploy(args.model, n_stages=args.stages, **extra)
        placement = _placement(route)
        print("placement: " + "  ".join(f"stage {k}: {', '.join(h.worker for h in reps)}"
                                        for k, reps in enumerate(_replicas(route))), flush=True)
        for i in range(args.warmup):
            cl.infer(args.model, xs[i % len(xs)], timeout_ms=60_000)
        capacity = measure_capacity(cl, args.model, xs, args.capacity_s, args.capacity_in_flight)
        rate = args.load * capacity
        print(f"capacity {capacity:.1f} req/s ({args.capacity_in_flight} in flight, {args.capacity_s:.0f} s); "
              f"offering {rate:.1f} req/s ({args.load:.0%}) for {args.minutes * 60:.0f} s", flush=True)

        sent: list[Sent] = []
        stop = threading.Event()
        lock = threading.Lock()

        def on_done(s: Sent, fut: concurrent.futures.Future) -> None:
            s.t_end, s.t_end_wall = time.monotonic(), time.time()
            exc = fut.exception()
            s.outcome = exc if exc is not None else "result"

        def generate() -> None:
            arrivals = random.Random(args.seed + 1)
            t_next = time.monotonic()
            i = 0
            while not stop.is_set() and t_next < horizon[0]:
                if stop.wait(max(0.0, t_next - time.monotonic())):
                    break
                s = Sent(i % len(xs), None, time.monotonic())  # type: ignore[arg-type]
                s.future = cl.submit(args.model, xs[s.x_index], timeout_ms=args.timeout_ms, trace=True)
                s.future.add_done_callback(lambda fut, s=s: on_done(s, fut))
                with lock:
                    sent.append(s)
                i += 1
                t_next += arrivals.expovariate(rate)

        def in_flight() -> int:
            with lock:
                return sum(not s.future.done() for s in sent)

        t0 = time.monotonic()
        t_end = t0 + args.minutes * 60
        horizon = [t_end]  # the load runs to here: past t_end while a restarted worker is not back yet
        gen = threading.Thread(target=generate, name="load", daemon=True)
        gen.start()
        kills: list[Kill] = []
        try:
            t_next_kill = t0 + args.kill_every_s
            while t_next_kill + args.restart_after_s <= t_end and args.kill_every_s > 0:
                time.sleep(max(0.0, t_next_kill - time.monotonic()))
                victim = rng.choice(lc.names)
                k = Kill(victim, placement.get(victim, -1), time.monotonic() - t0, in_flight(),
                         t_mono=time.monotonic(), t_wall=time.time())
                horizon[0] = max(horizon[0], k.t_mono + args.restart_after_s + 2 * args.kill_every_s)
                lc.kill(victim)
                kills.append(k)
                print(f"t={k.t:6.1f} s  SIGKILL {victim} (stage {k.hop}), {k.in_flight} requests in flight", flush=True)
                time.sleep(max(0.0, k.t_mono + args.restart_after_s - time.monotonic()))
                k.t_restart_wall = time.time()
                try:
                    lc.restart(victim, timeout_s=args.kill_every_s * 3)
                    k.registered_s = time.monotonic() - k.t_mono
                except RuntimeFailure as e:
                    print(f"           restart of {victim} failed: {e}", flush=True)
                bound = time.monotonic() + args.kill_every_s * 2
                while time.monotonic() < bound and not _healthy(cl, args.model, args.replicas, victim):
                    time.sleep(0.2)
                if _healthy(cl, args.model, args.replicas, victim):
                    k.t_healthy_mono = time.monotonic()
                    k.healthy_s = k.t_healthy_mono - k.t_mono
                horizon[0] = max(t_end, time.monotonic() + AFTER_HEALTHY_S)
                print(f"t={time.monotonic() - t0:6.1f} s  {victim} restarted {args.restart_after_s:.0f} s after the "
                      f"kill: registered after {_fmt(k.registered_s)}, route healthy after {_fmt(k.healthy_s)}",
                      flush=True)
                t_next_kill = max(t_next_kill + args.kill_every_s, time.monotonic() + 1.0)
            time.sleep(max(0.0, horizon[0] - time.monotonic()))
        finally:
            stop.set()
            gen.join(timeout=10)
        t_stop = time.monotonic()
        load_s = t_stop - t0
        with lock:
            all_sent = list(sent)
        for s in all_sent:  # each ends by its deadline + 1 s, or counts as hung
            try:
                s.future.exception(timeout=max(0.0, s.t_submit + args.timeout_ms / 1000 + 1.0 - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pass
        alive = lc.alive()
        counters = {w.name: {k: v for k, v in w.telemetry.items() if k.startswith("count_")} for w in cl.workers()}

    # --- outcomes ------------------------------------------------------------------------------
    outcomes: dict[str, int] = {}
    latencies, window_latencies = [], []
    worst = 0.0
    wrong = 0
    lost_total = degraded_total = 0
    samples: dict[str, list[str]] = {}  # a few error messages per class
    for s in all_sent:
        if not s.future.done():
            outcomes["hung"] = outcomes.get("hung", 0) + 1
            continue
        name = "result" if s.outcome == "result" else type(s.outcome).__name__
        outcomes[name] = outcomes.get(name, 0) + 1
        if name != "result" and len(samples.setdefault(name, [])) < 5:
            samples[name].append(f"t={s.t_submit - t0:.1f} s: {s.outcome}")
        in_window = [k for k in kills if s.t_submit <= (k.t_healthy_mono or t_stop) and s.t_end >= k.t_mono]
        if s.outcome == "result":
            lat = (s.t_end - s.t_submit) * 1000
            latencies.append(lat)
            if in_window:
                window_latencies.append(lat)
            y = s.future.result()
            diff = float((y - refs[s.x_index]).abs().max())
            worst = max(worst, diff)
            wrong += diff > ATOL
            trace = getattr(getattr(s.future, "info", None), "trace", None) or []
            for k in kills:  # the first result through the replacement
                if k.t_restart_wall and any(len(rec) > 2 and rec[1] == k.worker and rec[2] >= k.t_restart_wall
                                            for rec in trace):
                    via = s.t_end_wall - k.t_wall
                    if k.first_result_via_s is None or via < k.first_result_via_s:
                        k.first_result_via_s = via
            continue
        at_kill = [k for k in in_window if s.t_submit < k.t_mono]
        if at_kill or isinstance(s.outcome, WorkerLost):
            lost_total += 1
            for k in (at_kill or in_window)[:1]:
                k.lost += 1
        elif in_window:
            degraded_total += 1
            in_window[0].failed_degraded += 1
    return {
        "config": vars(args), "capacity_rps": capacity, "offered_rps": rate, "load_s": load_s,
        "requests": len(all_sent),
        "outcomes": outcomes, "hung": outcomes.get("hung", 0), "lost_to_kills": lost_total,
        "failed_while_degraded": degraded_total, "error_samples": samples,
        "kills": [{k: v for k, v in asdict(x).items() if not k.startswith("t_")} for x in kills],
        "latency_ms_p50": _pct(latencies, 0.5), "latency_ms_p99": _pct(latencies, 0.99),
        "kill_window_latency_ms_p50": _pct(window_latencies, 0.5),
        "kill_window_latency_ms_p99": _pct(window_latencies, 0.99),
        "max_abs_diff_vs_unsplit": worst, "results_off_by_more_than_atol": wrong, "atol": ATOL,
        "placement": placement, "alive_at_end": alive, "worker_counters": counters,
    }


def _fmt(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long the load runs")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model (random weights)")
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--stages", type=int, default=2, help="stages of the model")
    p.add_argument("--replicas", type=int, default=2, help="workers per stage")
    p.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of the measured capacity")
    p.add_argument("--capacity-s", type=float, default=10.0, help="seconds of the capacity measurement")
    p.add_argument("--capacity-in-flight", type=int, default=8, help="requests in flight while measuring capacity")
    p.add_argument("--kill-every-s", type=float, default=20.0,
                   help="a random worker gets SIGKILL this often (0 = never)")
    p.add_argument("--restart-after-s", type=float, default=5.0, help="seconds from a kill to the restart")
    p.add_argument("--timeout-ms", type=int, default=10_000, help="deadline of each request")
    p.add_argument("--max-in-flight", type=int, default=65_536, help="client's in-flight cap (submits never wait)")
    p.add_argument("--warmup", type=int, default=10, help="sequential requests before measuring")
    p.add_argument("--torch-threads", type=int, default=0, help="torch threads per worker (0 = cores / workers)")
    p.add_argument("--heartbeat-ms", type=int, default=1000, help="heartbeat interval of the daemons")
    p.add_argument("--seed", type=int, default=0, help="weights, inputs, arrivals, victims")
    p.add_argument("--out", default=str(OUT / "soak.json"), help="JSON file to write")
    args = p.parse_args()
    print(f"config: {vars(args)}; cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    res = run(args)
    print(f"\n[soak] {args.model}, {args.stages} stages x {args.replicas} replicas on {args.workers} workers; "
          f"{res['requests']} requests at {res['offered_rps']:.1f} req/s ({args.load:.0%} of "
          f"{res['capacity_rps']:.1f}) over {res['load_s']:.0f} s, {len(res['kills'])} kills")
    for name, n in sorted(res["outcomes"].items(), key=lambda kv: (kv[0] != "result", kv[0])):
        if name == "hung":
            continue
        print(f"{name:>24}: {n}")
    print(f"{'hung':>24}: {res['hung']}")
    for name, msgs in sorted(res["error_samples"].items()):
        for m in msgs[:2]:
            print(f"{'e.g. ' + name:>24}: {m[:200]}")
    print(f"{'lost to a kill':>24}: {res['lost_to_kills']} (failed and in flight at a kill, or WorkerLost)")
    print(f"{'failed while degraded':>24}: {res['failed_while_degraded']} (submitted after a kill, before the route "
          "was healthy again)")
    print(f"{'latency of results':>24}: p50 {res['latency_ms_p50']:.0f} ms, p99 {res['latency_ms_p99']:.0f} ms; "
          f"in kill windows p50 {res['kill_window_latency_ms_p50']:.0f} ms, "
          f"p99 {res['kill_window_latency_ms_p99']:.0f} ms")
    print(f"{'vs the unsplit model':>24}: max |diff| {res['max_abs_diff_vs_unsplit']:.2g} "
          f"({res['results_off_by_more_than_atol']} results above atol {ATOL:g})")
    if res["kills"]:
        print(f"\n{'t (s)':>7} {'worker':>7} {'stage':>5} {'in flight':>9} {'registered':>11} {'healthy':>9} "
              f"{'1st result via':>15} {'lost':>5} {'degraded':>8}   (seconds after the kill)")
        for k in res["kills"]:
            print(f"{k['t']:>7.1f} {k['worker']:>7} {k['hop']:>5} {k['in_flight']:>9} {_fmt(k['registered_s']):>11} "
                  f"{_fmt(k['healthy_s']):>9} {_fmt(k['first_result_via_s']):>15} {k['lost']:>5} "
                  f"{k['failed_degraded']:>8}")
        for key in ("registered_s", "healthy_s", "first_result_via_s"):
            vals = [k[key] for k in res["kills"] if k[key] is not None]
            if vals:
                print(f"{key:>24}: median {_pct(vals, 0.5):.2f} s, max {max(vals):.2f} s")
    dead = [n for n, a in res["alive_at_end"].items() if not a]
    if dead:
        print(f"daemons not running at the end: {dead}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")
    return 0 if res["hung"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
