"""``edgesplit plan MODEL``: measure the workers, plan the split, print it; optionally deploy and check it.

::

    edgesplit plan vit_tiny_patch16_224 --coordinator tcp://10.0.0.1:5555          # throughput plan
    edgesplit plan vit_tiny_patch16_224 --objective latency --workers a,b --json   # for scripts
    edgesplit plan vit_tiny_patch16_224 --deploy --requests 100   # deploy, run 100, measured beside predicted
    edgesplit plan vit_tiny_patch16_224 --deploy --calibrate      # then plan again with what the run showed
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from .config import human_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _add_client

    p.add_argument("model", help="a model in the coordinator's store")
    p.add_argument("--objective", choices=["throughput", "latency"], default="throughput",
                   help="throughput: the smallest bottleneck (stage compute or link transfer) for a stream of "
                        "requests; latency: the smallest end-to-end time of one request")
    p.add_argument("--workers", default=None, metavar="A,B,...", help="workers the plan may use (default: all live)")
    p.add_argument("--batch", type=int, default=1, help="samples per request the plan is for (profiled at it)")
    p.add_argument("--max-accuracy-cost", type=float, default=0.0,
                   help="accuracy points the chosen codecs may cost together (manifest codecs with measured points)")
    p.add_argument("--reps", type=int, default=10, help="timed runs per block on each worker (median kept)")
    p.add_argument("--probe-s", type=float, default=0.5, help="seconds each link probe runs")
    p.add_argument("--refresh", action="store_true", help="profile again even where a worker has a cached profile")
    p.add_argument("--json", action="store_true", help="print JSON (measurements, plan, equal-block prediction)")
    p.add_argument("--deploy", action="store_true",
                   help="deploy the plan, run --requests random inputs, print measured times beside the prediction")
    p.add_argument("--requests", type=int, default=50, help="with --deploy: requests to run before comparing")
    p.add_argument("--calibrate", action="store_true",
                   help="with --deploy: scale each worker's profile by its stages' measured/predicted compute in "
                        "that run, plan again, deploy the new plan if it differs, run and compare again")
    _add_client(p)


def equal_split(problem: Any, workers: list[str]) -> Any:
    """The prediction for equal block counts over ``workers`` in the given order (the reference a plan beats)."""
    from edgesplit.scheduling.placement import PlacementError, evaluate_placement

    n, k = len(problem.block_bytes), min(len(workers), len(problem.block_bytes))
    bounds = [round(i * n / k) for i in range(k + 1)]
    try:
        return evaluate_placement(problem, [(workers[i], bounds[i], bounds[i + 1]) for i in range(k)])
    except PlacementError:
        return None  # e.g. a worker cannot hold its equal share


def _print_plan(placement: Any, title: str) -> None:
    print(f"\n{title}: {placement.objective} objective, bottleneck {placement.bottleneck}")
    print(f"  {'stage':<8}{'worker':<14}{'blocks':<10}{'weights':>10}{'compute ms':>12}")
    for k, s in enumerate(placement.stages):
        print(f"  {k:<8}{s.worker:<14}{f'[{s.start}:{s.end})':<10}{human_size(s.weight_bytes):>10}"
              f"{s.compute_ms:>12.2f}")
    print(f"  {'hop':<24}{'codec':<14}{'bytes':>10}{'transfer ms':>12}")
    for h in placement.hops:
        print(f"  {h.src + ' -> ' + h.dst:<24}{h.codec or 'raw':<14}{h.bytes:>10}{h.transfer_ms:>12.2f}")
    print(f"  latency {placement.latency_ms:.2f} ms, bottleneck {placement.bottleneck_ms:.2f} ms, "
          f"throughput {placement.throughput:.1f}/s, accuracy cost {placement.accuracy_cost:g}")


def _print_compare(rows: list[dict[str, Any]]) -> None:
    print(f"  {'':<48}{'predicted ms':>13}{'measured ms':>13}{'error':>8}")
    for row in rows:
        meas = f"{row['measured_ms']:.2f}" if row["measured_ms"] is not None else "-"
        err = f"{100 * row['error']:+.0f}%" if row["error"] is not None else "-"
        print(f"  {row['what']:<48}{row['predicted_ms']:>13.2f}{meas:>13}{err:>8}")


def _finite(v: Any) -> Any:
    """JSON has no infinity: a rate too fast to time (or a bottleneck of nothing) becomes null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def run(args: argparse.Namespace) -> int:
    from .cli import _build
    from .client import Client, ClientConfig
    from .errors import ConfigError
    from .calibrate import calibrate, run_and_compare
    from .placement import deploy_args
    from edgesplit.scheduling.placement import plan_placement

    workers = [w for w in args.workers.split(",") if w] if args.workers else None
    if args.batch < 1 or args.reps < 1 or args.requests < 1:
        raise ConfigError("--batch, --reps and --requests must be at least 1")
    if args.calibrate and not args.deploy:
        raise ConfigError("--calibrate needs --deploy: it plans again from what a deployed run measured")
    with Client(_build(ClientConfig, args, "client")) as cl:
        if not args.json:
            print(f"measuring {args.model} on {', '.join(workers) if workers else 'every live worker'} "
                  f"(profiles, then link probes)...", file=sys.stderr)
        m = cl.measure(args.model, workers, batches=(args.batch,), reps=args.reps, probe_s=args.probe_s,
                       refresh=args.refresh)
        problem = m.problem(args.batch, args.max_accuracy_cost, workers)
        placement = plan_placement(problem, args.objective)
        reference = equal_split(problem, [w.name for w in problem.workers])
        out: dict[str, Any] = {"measurements": m.to_dict(), "plan": placement.to_dict(),
                               "equal_split": reference.to_dict() if reference is not None else None}
        if args.deploy:
            stages, links = deploy_args(placement)
            cl.deploy(args.model, stages=stages, links=links)
            out["run"], out["compare"] = run_and_compare(cl, args.model, placement, problem.hop_ms, args.requests,
                                                         args.batch)
            if args.calibrate:
                c = calibrate(cl, args.model, m, placement, out["compare"], args.requests, args.batch,
                              args.max_accuracy_cost, workers)
                out["calibrated"] = c.to_dict()
    if args.json:
        print(json.dumps(_finite(out), indent=1, default=str, allow_nan=False))
        return 0
    print(f"\n{'worker':<14}{'device':<8}{'slowdown':>9}{'blocks ms':>11}{'budget':>10}  links (MiB/s)")
    for name, w in sorted(m.workers.items()):
        links = ", ".join(f"{p} {r / 2**20:.1f}" for p, (r, _) in sorted(w.links.items()))
        client = m.client_links.get(name)
        print(f"{name:<14}{w.device:<8}{w.slowdown:>9g}{sum(w.profiles[args.batch]):>11.2f}"
              f"{human_size(w.memory_budget_bytes):>10}  {links}"
              + (f"; from client {client[0] / 2**20:.1f}" if client else ""))
    for k, v in m.errors.items():
        print(f"  {k}: {v}")
    _print_plan(placement, "plan")
    if reference is not None:
        print(f"\nequal blocks over {', '.join(w.name for w in problem.workers)}: latency "
              f"{reference.latency_ms:.2f} ms, bottleneck {reference.bottleneck_ms:.2f} ms "
              f"({reference.bottleneck}); the plan's {args.objective} is "
              + (f"{reference.bottleneck_ms / placement.bottleneck_ms:.2f}x" if args.objective == "throughput"
                 else f"{reference.latency_ms / placement.latency_ms:.2f}x") + " better")
    if args.deploy:
        r = out["run"]
        print(f"\ndeployed; {r['requests']} requests in {r['seconds']:.2f} s: {r['throughput']:.1f}/s"
              + (f", latency p50 {r['latency_ms_p50']:.2f} ms" if "latency_ms_p50" in r else "")
              + f" (predicted {placement.throughput:.1f}/s, {placement.latency_ms:.2f} ms)")
        _print_compare(out["compare"])
    if args.calibrate:
        print_calibrated(c)
    return 0


def print_calibrated(c: Any) -> None:
    """What ``runtime.calibrate.calibrate`` found: factors, the plan, its run and measured beside predicted."""
    print("\ncalibration (measured / predicted compute per worker): "
          + (", ".join(f"{w} {f:.2f}" for w, f in sorted(c.factors.items())) or "nothing measured"))
    print("the calibrated plan differs; deployed it" if c.replanned else "the calibrated plan is the same")
    _print_plan(c.placement, "calibrated plan")
    r = c.run
    print(f"\n{r['requests']} requests in {r['seconds']:.2f} s: {r['throughput']:.1f}/s"
          + (f", latency p50 {r['latency_ms_p50']:.2f} ms" if "latency_ms_p50" in r else ""))
    _print_compare(c.compare)
