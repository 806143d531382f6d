"""``edgesplit status`` (alias ``edgesplit workers``): what a coordinator knows, as tables or one JSON document.

::

    edgesplit status --coordinator tcp://10.0.0.1:5555          # workers, memory, latency, errors, models
    edgesplit status --json | jq '.models[] | select(.deployed)'

Everything comes from the coordinator's registry, which the workers' heartbeats refresh
(once a second by default): state and last-seen time, telemetry, resident bytes against the
budget, per-stage compute times and the workers' outcome counters since they started.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any, Sequence

from .config import human_size
from .types import WorkerInfo, WorkerState

LATE_HEARTBEATS = 2  # a live worker unheard for more than this many intervals is shown as "late"
OUTCOMES = ("received", "computed", "results", "errors", "expired", "overloaded", "replies_dropped", "bad_messages",
            "forbidden")  # worker counters (``count_*`` telemetry) shown as its outcomes, in this order


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _add_client

    p.add_argument("--json", action="store_true", help="print one JSON document (coordinator, workers, models) "
                                                       "for scripts instead of tables")
    _add_client(p)


def health(w: WorkerInfo, heartbeat_ms: float) -> str:
    """``ok``, ``late`` (live, but unheard for more than LATE_HEARTBEATS intervals) or ``lost``."""
    if w.state == WorkerState.LOST:
        return "lost"
    return "late" if w.last_seen_s * 1000 > LATE_HEARTBEATS * heartbeat_ms else "ok"


def outcomes(w: WorkerInfo) -> dict[str, int]:
    """The worker's outcome counters since it started (absent ones: 0)."""
    return {k: int(w.telemetry.get(f"count_{k}", 0)) for k in OUTCOMES}


def worker_doc(w: WorkerInfo, heartbeat_ms: float) -> dict[str, Any]:
    """One worker as the status JSON gives it: its record plus health, memory, stage figures and outcomes."""
    stats, resident = w.stage_stats(), {(m, h) for m, h in w.resident}
    stages = [{"model": s.model, "hop": s.hop, "start": s.start, "end": s.end, "plan": s.plan,
               "resident": (s.model, s.hop) in resident, **stats.get((s.model, s.hop), {})} for s in w.stages]
    return {"name": w.name, "endpoint": w.endpoint, "device": w.device, "host": w.host, "pid": w.pid,
            "state": w.state.value, "health": health(w, heartbeat_ms), "last_seen_s": w.last_seen_s,
            "resident_bytes": int(w.cache.get("resident_bytes", 0)),
            "budget_bytes": int(w.cache.get("budget_bytes", w.memory_budget_bytes)),
            "stages": stages, "outcomes": outcomes(w), "telemetry": w.telemetry, "cache": w.cache}


def collect(cl: Any) -> tuple[dict[str, Any], list[WorkerInfo]]:
    """The status document (the coordinator's hello, every worker, every stored model with its route) and the
    worker records it was made from."""
    from .errors import RuntimeFailure

    hello = cl.coordinator()
    heartbeat_ms = float(hello.get("heartbeat_ms", 1000) or 1000)
    workers, models = cl.workers(), cl.models()
    out_models = []
    for m in models:
        doc: dict[str, Any] = {"name": m["name"], "n_blocks": m["n_blocks"], "size_bytes": m["size_bytes"],
                               "input_shape": m.get("input_shape"), "deployed": bool(m["route"]), "route": None}
        if m["route"]:
            try:
                r = cl.route(m["name"], refresh=True)
                doc["route"] = {"plan": r.plan, "workers": r.workers,
                                "hops": [{"hop": k, "start": reps[0].start, "end": reps[0].end,
                                          "workers": [h.worker for h in reps]} for k, reps in enumerate(r.replicas)]}
            except RuntimeFailure as e:  # redeployed or lost between the two questions
                doc["route_error"] = str(e)
        out_models.append(doc)
    doc = {"coordinator": hello, "workers": [worker_doc(w, heartbeat_ms) for w in workers], "models": out_models}
    return doc, workers


def _finite(v: Any) -> Any:
    """JSON has no infinity or NaN: such a figure becomes null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def print_workers(workers: Sequence[WorkerInfo], heartbeat_ms: float = 1000.0) -> None:
    """The worker tables: state and telemetry; memory, batching and stage latency; outcomes; measured links."""
    print(f"{'worker':<12}{'endpoint':<26}{'device':<8}{'state':<10}{'health':<7}{'seen s':>7}{'cpu %':>6}"
          f"{'rss':>11}{'queue':>6}  stages")
    for w in workers:
        stages = ", ".join(f"{s.model}/{s.hop}[{s.start}:{s.end})" for s in w.stages) or "-"
        tel = w.telemetry
        print(f"{w.name:<12}{w.endpoint:<26}{w.device:<8}{w.state.value:<10}{health(w, heartbeat_ms):<7}"
              f"{w.last_seen_s:>7.1f}{tel.get('cpu_percent', 0):>6.0f}{human_size(tel.get('proc_rss_bytes', 0)):>11}"
              f"{int(tel.get('queue', 0)):>6}  {stages}")
    print(f"\n{'worker':<12}{'resident':>11}{'budget':>11}{'load rate':>12}{'evicted':>11}{'batch avg/max':>14}  "
          "stages: compute p50 ms (* = resident)")
    for w in workers:
        c, resident, stats = w.cache, {(m, h) for m, h in w.resident}, w.stage_stats()
        stages = ", ".join(f"{s.model}/{s.hop}{'*' if (s.model, s.hop) in resident else ''} "
                           f"{stats.get((s.model, s.hop), {}).get('compute_ms_p50', 0):.1f}" for s in w.stages) or "-"
        rate = c.get("load_bytes_per_s", 0)
        print(f"{w.name:<12}{human_size(c.get('resident_bytes', 0)):>11}{human_size(c.get('budget_bytes', 0)):>11}"
              f"{(human_size(rate) + '/s') if rate else '-':>12}{human_size(c.get('bytes_evicted', 0)):>11}"
              f"{w.telemetry.get('count_computed', 0) / max(1, w.telemetry.get('count_batches', 0)):>9.1f}/"
              f"{int(w.telemetry.get('count_batch_max', 0)):<4}  {stages}")
    heads = {"replies_dropped": "dropped", "bad_messages": "bad msgs"}
    print(f"\n{'worker':<12}" + "".join(f"{heads.get(k, k):>11}" for k in OUTCOMES))  # since each started
    for w in workers:
        print(f"{w.name:<12}" + "".join(f"{v:>11}" for v in outcomes(w).values()))
    links = [(w.name, k.split(" ", 1)[1], v) for w in workers for k, v in w.telemetry.items()
             if k.startswith("link_rate_bps ")]
    if links:
        print(f"\n{'measured link':<42}{'rate':>12}")
        for name, endpoint, rate in links:
            print(f"{name + ' -> ' + endpoint:<42}{human_size(rate) + '/s':>12}")


def print_models(models: Sequence[dict[str, Any]], workers: Sequence[WorkerInfo] = ()) -> None:
    """The model table; a deployed model's hops below it with their workers and compute p50."""
    stats = {w.name: w.stage_stats() for w in workers}
    print(f"\n{'model':<28}{'blocks':>7}{'size':>11}  route")
    for m in models:
        route = m.get("route")
        if not m.get("deployed"):
            print(f"{m['name']:<28}{m['n_blocks']:>7}{human_size(m['size_bytes']):>11}  (not deployed)")
            continue
        if route is None:
            print(f"{m['name']:<28}{m['n_blocks']:>7}{human_size(m['size_bytes']):>11}  "
                  f"(deployed; route unavailable: {m.get('route_error', '?')})")
            continue
        print(f"{m['name']:<28}{m['n_blocks']:>7}{human_size(m['size_bytes']):>11}  "
              + " -> ".join("+".join(h["workers"]) for h in route["hops"]) + f"  (plan {route['plan']})")
        for h in route["hops"]:
            figures = []
            for name in h["workers"]:
                s = stats.get(name, {}).get((m["name"], h["hop"]))
                figures.append(f"{name} p50 {s['compute_ms_p50']:.2f} ms n={s['n']:.0f} errors {s['errors']:.0f}"
                               if s else f"{name} (no requests yet)")
            print(f"    hop {h['hop']} blocks [{h['start']}:{h['end']}): " + "; ".join(figures))


def run(args: argparse.Namespace) -> int:
    from .cli import _build
    from .client import Client, ClientConfig

    with Client(_build(ClientConfig, args, "client")) as cl:
        doc, workers = collect(cl)
        endpoint = cl.cfg.coordinator
    if args.json:
        print(json.dumps(_finite(doc), indent=1, default=str, allow_nan=False))
        return 0
    hello = doc["coordinator"]
    heartbeat_ms = float(hello.get("heartbeat_ms", 1000) or 1000)
    live = sum(w["health"] == "ok" for w in doc["workers"])
    print(f"coordinator {endpoint}: "
          f"{len(doc['workers'])} workers ({live} ok), heartbeat {heartbeat_ms:.0f} ms, "
          f"{sum(m['deployed'] for m in doc['models'])} of {len(doc['models'])} models deployed\n")
    print_workers(workers, heartbeat_ms)
    print_models(doc["models"], workers)
    return 0
