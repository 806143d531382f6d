"""Serving benchmark: many users, Poisson arrivals and deadlines, live admission policies on a real cluster.

::

    python benchmarks/serving.py                           # every policy, one arrival trace (~8 min)
    python benchmarks/serving.py --seeds 3                 # three traces: mean and spread of aware / FIFO (~25 min)
    python benchmarks/serving.py --policies fcfs,auto --duration-s 30 --window-ms 5,100
    python benchmarks/serving.py --calibrate-only          # compute and switch costs, and the offered load

Live, on the local multi-process cluster: a coordinator and 2 worker processes on loopback
(one torch thread each). Eight models (random weights, ``--arch`` at ``--img-size``), each
deployed as ONE stage on one worker; the coordinator schedules each worker as one server:

- w0: family A (A0, A1, A2: one ViT whose blocks 9-11, final norm and head each variant takes
  from its own freshly initialised donor, so the three share the embedding and blocks 0-8)
  and UA (the same architecture, every weight its own: shares nothing);
- w1: family B (B0, B1, B2: blocks 6-11 onwards their own, sharing the embedding and blocks
  0-5) and UB (unrelated).

Each family is backbone-shaped (every block is in all its variants or in one), the case where
the capped DP applies. A worker's block budget (``--budget-x`` x the largest model) cannot
hold its four models: an unrelated model evicts most of a family, and family B does not fit
whole. A store read-rate cap (``--read-rate``, like a board's SD card) makes loading cost:
switching between unrelated models reloads a whole model (hundreds of ms) while switching
between variants loads only their private blocks.

Users (``--users``, each bound to one model; models' popularity skewed by ``--weights``)
share one client process and label their requests (``user=``). Each user sends a Poisson
stream; the trace (arrival time, user, deadline uniform in ``--deadline-ms``) is drawn once
per seed and replayed, the same, against every policy. Every policy gets a fresh cluster
(``--scheduler NAME``): ``fcfs`` (FIFO admission), ``oblivious-greedy`` (sharing-oblivious),
``greedy`` and ``auto`` (sharing-aware; auto = the DP capped at 8 ms per window, greedy
fallback; ``dp``, the uncapped DP, can be asked for), and
``none`` (admit everything at once, no planning). Before the trace, each model serves a few
sequential requests (it is loaded once, and its compute time measured).

The admission window (``--window-ms``, default 5 ms, the coordinator's default) gathers asks
for one decision; the coordinator re-plans every request it admitted and has not released
yet together with each window's new asks, so a sharing-aware order exists even when a window
holds a single ask (before that re-planning landed, a 5 ms window left every policy FIFO in
effect: auto / fcfs = 1.04 at 5 ms, 1.75 at 500 ms). ``--window-ms 5,100`` runs both.

Every request ends in a result within its deadline, an explicit rejection
(``DeadlineUnmeetable``), an admitted-but-late result (``DeadlineMissed``, with ``late_ms``) or
another error; reported per policy, with the lateness of the late as % of their deadline
(max, p95) and Jain's fairness index over users of (served within deadline / submitted):
1 = every user gets the same share, 1/n = one user gets everything.

Offered load. The first cluster also measures, per worker, the compute time of each model and
the switch cost (``Client.prefetch`` of each model in a fixed sequence, one worker at a time;
ms against the MB the worker lacked, fitted as in ``switching.py``). From those, the trace is
costed two ways per worker: in arrival order (what FIFO must do: every request its compute
plus the blocks it lacks, under the budget, LRU) and grouped by model within windows of the
shortest deadline (what a sharing-aware order can do). Busy seconds per second of trace > 1
means the worker cannot keep up that way. At the default rate (40/s) FIFO's figure is 1.4-1.9
and the grouped one 0.8-1.0: FIFO cannot serve the load, a sharing-aware order about can.

Without the admission API (before issue 17 lands: no ``DeadlineUnmeetable``, ``Client.submit``
without ``deadline_ms``) it replays the trace with plain ``submit(..., timeout_ms=deadline)``
on a coordinator without ``--scheduler`` (policy ``plain``) for calibration.

Writes ``benchmarks/out/serving.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from switching import fit_line  # the same fit as the switching benchmark (this folder is on sys.path)

OUT = Path(__file__).resolve().parent / "out"
# model -> (worker, family or None, first re-drawn block of a variant, weight seed)
MODELS: dict[str, tuple[str, str | None, int, int]] = {
    "A0": ("w0", "A", 9, 100), "A1": ("w0", "A", 9, 101), "A2": ("w0", "A", 9, 102), "UA": ("w0", None, 0, 200),
    "B0": ("w1", "B", 6, 300), "B1": ("w1", "B", 6, 301), "B2": ("w1", "B", 6, 302), "UB": ("w1", None, 0, 400),
}
FAMILY_SEED = {"A": 1, "B": 2}
DEFAULT_WEIGHTS = "A0=5,A1=3,A2=2,UA=2,B0=5,B1=3,B2=2,UB=2"
POLICIES = ("fcfs", "oblivious-greedy", "greedy", "auto", "none")
OUTCOME_FIELDS = ["t_s", "user", "model", "deadline_ms", "kind", "latency_ms", "late_ms", "admitted",
                  "planned_end_ms", "method", "error"]  # one row per request in the JSON's "outcomes"
SWITCH_SEQUENCE = ["UA", "A0", "A1", "A2", "A0", "UA", "A1", "A2", "A0", "UA", "A2"]  # prefetch orders, per family


@dataclass(frozen=True)
class User:
    """A simulated user: all its requests are for one model."""

    name: str
    model: str


@dataclass(frozen=True)
class Arrival:
    """One request of the trace: when it is submitted (s after the start), whose, its deadline."""

    t_s: float
    user: str
    model: str
    deadline_ms: int


@dataclass
class Outcome:
    """What became of one arrival (times: monotonic seconds)."""

    arrival: Arrival
    t_submit: float = 0.0
    t_done: float = 0.0
    kind: str = "hung"  # served | rejected | late | timeout | error | hung
    late_ms: float = 0.0  # DeadlineMissed.late_ms (kind == "late"), else 0
    error: str = ""
    admitted: bool | None = None
    reason: str = ""  # the rejection's message
    planned_end_ms: float | None = None  # the admission's planned result, ms after its decision (ADMIT's end_ms)
    method: str = ""  # the schedule that admitted it

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_submit) * 1000 if self.t_done else math.nan


# ---------------------------------------------------------------- models and store

def _variant(base: Any, donor: Any, first: int) -> Any:
    """``base`` with blocks ``first``.. and the final norm and head taken from ``donor`` (shares everything below).

    The donor is a freshly initialised model of the same architecture (timm's own init), so a
    variant computes like any other model (re-drawing LayerNorm weights around 0 instead made
    subnormal activations and tripled a forward pass on this CPU).
    """
    m = copy.deepcopy(base)
    for i in range(first, len(m.blocks)):
        m.blocks[i].load_state_dict(donor.blocks[i].state_dict())
    m.norm.load_state_dict(donor.norm.state_dict())
    m.head.load_state_dict(donor.head.state_dict())
    return m


def build_store(root: Path, arch: str, img_size: int) -> dict[str, dict[str, Any]]:
    """Partition the eight models into ``root``; per model: worker, family, bytes, block ids and sizes."""
    import timm
    import torch

    from edgesplit.partitioner import BlockStore, partition, timm_recipe

    store = BlockStore(root)
    kwargs = {"img_size": img_size}
    bases = {}
    for fam, seed in FAMILY_SEED.items():
        torch.manual_seed(seed)
        bases[fam] = timm.create_model(arch, pretrained=False, **kwargs).eval()
    out: dict[str, dict[str, Any]] = {}
    for name, (worker, fam, first, seed) in MODELS.items():
        torch.manual_seed(seed)
        m = timm.create_model(arch, pretrained=False, **kwargs).eval()
        if fam is not None:
            m = _variant(bases[fam], m, first)
        man = partition(m, name, timm_recipe(arch, **kwargs), store, input_shape=[3, img_size, img_size],
                        profile=False)
        out[name] = {"worker": worker, "family": fam, "bytes": man.size_bytes, "n_blocks": man.n_blocks,
                     "blocks": {b.id: b.size_bytes for b in man.blocks}}
        print(f"  {name} on {worker}: {man.n_blocks} blocks, {man.size_bytes / 1e6:.1f} MB"
              + (f", family {fam} (re-drawn from block {first})" if fam else ", unrelated"), flush=True)
    return out


def shared_mb(models: dict[str, dict[str, Any]], a: str, b: str) -> float:
    """MB of blocks that models ``a`` and ``b`` share."""
    ba, bb = models[a]["blocks"], models[b]["blocks"]
    return sum(ba[i] for i in ba.keys() & bb.keys()) / 1e6


# ---------------------------------------------------------------- workload

def parse_weights(spec: str) -> dict[str, float]:
    """``"A0=5,A1=3"`` -> {"A0": 5.0, "A1": 3.0}; every model must be named."""
    out = {}
    for part in spec.split(","):
        name, _, w = part.partition("=")
        out[name.strip()] = float(w)
    missing = sorted(set(MODELS) - out.keys())
    if missing or set(out) - set(MODELS):
        raise SystemExit(f"--weights must name each of {sorted(MODELS)} once; missing {missing}, "
                         f"unknown {sorted(set(out) - set(MODELS))}")
    return out


def make_users(n_users: int, weights: dict[str, float]) -> list[User]:
    """``n_users`` users, at least one per model, the rest split by ``weights`` (largest remainders)."""
    if n_users < len(weights):
        raise SystemExit(f"--users must be >= {len(weights)} (one per model)")
    total = sum(weights.values())
    share = {m: 1 + (n_users - len(weights)) * w / total for m, w in weights.items()}
    counts = {m: int(s) for m, s in share.items()}
    for m in sorted(share, key=lambda m: share[m] - counts[m], reverse=True)[: n_users - sum(counts.values())]:
        counts[m] += 1
    users, i = [], 0
    for m in weights:
        for _ in range(counts[m]):
            users.append(User(f"u{i:02d}", m))
            i += 1
    return users


def make_trace(users: Sequence[User], rate_per_s: float, duration_s: float, deadline_ms: tuple[int, int],
               seed: int) -> list[Arrival]:
    """Poisson arrivals, ``rate_per_s`` in all split evenly over users; deadlines uniform in ``deadline_ms``."""
    rng = random.Random(seed)
    per_user = rate_per_s / len(users)
    trace = []
    for u in users:
        t = rng.expovariate(per_user)
        while t < duration_s:
            trace.append(Arrival(round(t, 6), u.name, u.model, rng.randint(*deadline_ms)))
            t += rng.expovariate(per_user)
    trace.sort(key=lambda a: a.t_s)
    return trace


# ---------------------------------------------------------------- offered load

def _lru_cost(models: dict[str, dict[str, Any]], order: Sequence[str], budget: int, ms_per_mb: float,
              intercept_ms: float) -> tuple[float, int]:
    """Load ms of serving ``order`` on one worker (LRU blocks under ``budget``) and the number of loads."""
    cache: OrderedDict[str, int] = OrderedDict()
    total_ms, loads = 0.0, 0
    for m in order:
        blocks = models[m]["blocks"]
        missing = {b: s for b, s in blocks.items() if b not in cache}
        for b in blocks:
            if b in cache:
                cache.move_to_end(b)
        if missing:
            loads += 1
            total_ms += intercept_ms + ms_per_mb * sum(missing.values()) / 1e6
            for b, s in missing.items():
                cache[b] = s
            while sum(cache.values()) > budget:
                victim = next(b for b in cache if b not in blocks)
                del cache[victim]
    return total_ms, loads


def offered_load(models: dict[str, dict[str, Any]], trace: Sequence[Arrival], duration_s: float, budget: int,
                 compute_ms: dict[str, float], fit: dict[str, float], window_s: float) -> dict[str, dict[str, float]]:
    """Per worker: busy seconds per second of trace, in arrival order and grouped by model per window."""
    out = {}
    for w in sorted({v["worker"] for v in models.values()}):
        mine = [a for a in trace if models[a.model]["worker"] == w]
        comp = sum(compute_ms[a.model] for a in mine)
        fifo_ms, fifo_loads = _lru_cost(models, [a.model for a in mine], budget, fit["ms_per_mb"], fit["intercept_ms"])
        grouped: list[str] = []
        for k in range(int(math.ceil(duration_s / window_s))):
            in_win = [a.model for a in mine if k * window_s <= a.t_s < (k + 1) * window_s]
            # a family together, largest group first: what a sharing-aware order can do at least
            grouped += sorted(set(in_win), key=lambda m: (models[m]["family"] or m, m))
        grp_ms, grp_loads = _lru_cost(models, grouped, budget, fit["ms_per_mb"], fit["intercept_ms"])
        out[w] = {"requests": len(mine), "rate_per_s": len(mine) / duration_s, "compute_s_per_s": comp / 1000 / duration_s,
                  "fifo_busy_s_per_s": (comp + fifo_ms) / 1000 / duration_s, "fifo_loads": fifo_loads,
                  "grouped_busy_s_per_s": (comp + grp_ms) / 1000 / duration_s, "grouped_loads": grp_loads}
    return out


# ---------------------------------------------------------------- cluster

def code_digest() -> str:
    """SHA-256 (first 12 hex) of the runtime and scheduling sources this run imports: ties results to code."""
    import hashlib

    import edgesplit.runtime
    import edgesplit.scheduling

    h = hashlib.sha256()
    for pkg in (edgesplit.runtime, edgesplit.scheduling):
        root = Path(pkg.__file__).resolve().parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def admission_api() -> bool:
    """Whether this tree has issue 17's admission (``DeadlineUnmeetable`` and ``submit(deadline_ms=...)``)."""
    try:
        from edgesplit.runtime import errors
        from edgesplit.runtime.client import Client
    except ImportError:
        return False
    params = inspect.signature(Client.submit).parameters
    return hasattr(errors, "DeadlineUnmeetable") and "deadline_ms" in params and "user" in params


def cluster_args(args: argparse.Namespace, policy: str, window_ms: float, budget: int
                 ) -> tuple[list[str], dict[int, list[str]]]:
    """Coordinator and worker flags of one policy's cluster."""
    coord = ["--no-replan"]
    if policy != "plain":
        coord += ["--scheduler", policy, "--admission-window-ms", str(window_ms),
                  "--uplink-rate", str(args.uplink_rate)]
    wargs = ["--memory-budget", str(budget), "--torch-threads", "1", "--store-read-rate", str(args.read_rate)]
    return coord, {0: wargs, 1: wargs}


def deploy_all(cl: Any, models: dict[str, dict[str, Any]]) -> None:
    """Each model as one stage on its worker, registered without loading."""
    for m, info in models.items():
        cl.deploy(m, stages=[(info["worker"], 0, info["n_blocks"])], load=False, timeout_ms=600_000)


def warm_up(cl: Any, models: dict[str, dict[str, Any]], x: Any, reps: int) -> dict[str, float]:
    """``reps`` sequential requests per model (the first loads it); median ms of the rest, client-side."""
    out = {}
    for m in models:
        cl.infer(m, x, timeout_ms=60_000)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            cl.infer(m, x, timeout_ms=60_000)
            ts.append((time.perf_counter() - t0) * 1000)
        out[m] = statistics.median(ts)
    return out


def worker_compute_ms(cl: Any, models: Sequence[str], limit_s: float = 10.0) -> dict[str, float]:
    """Per model: the worker's own median compute ms (stage statistics, once every model's have come in)."""
    deadline = time.monotonic() + limit_s
    while True:
        out = {}
        for w in cl.workers():
            for row in w.stats:
                if isinstance(row, list) and len(row) >= 4:
                    out[str(row[0])] = float(row[3])
        if set(models) <= out.keys() or time.monotonic() > deadline:
            return out
        time.sleep(0.25)


def measure_switches(cl: Any, models: dict[str, dict[str, Any]], reps: int) -> list[dict[str, Any]]:
    """PREFETCH a fixed sequence per worker (the sequence's families mapped onto that worker's models)."""
    rows = []
    for w in sorted({v["worker"] for v in models.values()}):
        mine = [m for m in models if models[m]["worker"] == w]
        fam = [m for m in mine if models[m]["family"]]
        unrel = [m for m in mine if not models[m]["family"]]
        rename = {"A0": fam[0], "A1": fam[1], "A2": fam[2], "UA": unrel[0]}
        prev = None
        for _ in range(reps):
            for to in (rename[s] for s in SWITCH_SEQUENCE):
                r = cl.prefetch(to, hint=[to], workers=[w])[w]
                rows.append({"worker": w, "from": prev or "-", "to": to, "loaded_mb": r["loaded_bytes"] / 1e6,
                             "ms": r["ms"], "load_ms": r["load_ms"], "resident_mb": r["resident_bytes"] / 1e6})
                prev = to
    return rows


def cpu_seconds(lc: Any) -> dict[str, float]:
    """CPU seconds (user + system) so far of each daemon and of this process (the client)."""
    import psutil

    out = {}
    for name, p in lc.procs.items():
        try:
            t = psutil.Process(p.pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    t = psutil.Process().cpu_times()
    out["client"] = t.user + t.system
    return out


# ---------------------------------------------------------------- replay

def _classify(out: Outcome, fut: Any, t_done: float, plain: bool) -> None:
    from edgesplit.runtime import errors as E

    out.t_done = t_done
    info = getattr(fut, "info", None)
    out.admitted = getattr(info, "admitted", None)
    plan = getattr(info, "plan", None) or {}
    out.planned_end_ms = plan.get("end_ms")
    out.method = str(plan.get("method", ""))
    exc = fut.exception()
    if exc is None:
        late = out.latency_ms - out.arrival.deadline_ms
        out.kind = "served" if (not plain or late <= 0) else "late"  # plain: the client enforces the deadline itself
        out.late_ms = max(0.0, late) if out.kind == "late" else 0.0
    elif hasattr(E, "DeadlineUnmeetable") and isinstance(exc, E.DeadlineUnmeetable):
        out.kind, out.reason = "rejected", str(exc)
    elif hasattr(E, "DeadlineMissed") and isinstance(exc, E.DeadlineMissed):
        out.kind, out.late_ms = "late", float(getattr(exc, "late_ms", 0.0))
    elif isinstance(exc, E.RequestTimeout):
        out.kind, out.error = "timeout", str(exc)[:200]
    else:
        out.kind, out.error = "error", f"{type(exc).__name__}: {str(exc)[:200]}"


def replay(cl: Any, trace: Sequence[Arrival], xs: list[Any], plain: bool, grace_s: float) -> list[Outcome]:
    """Submit the trace on its clock from one thread; wait until each request ends (or ``grace_s`` past its deadline)."""
    outs = [Outcome(a) for a in trace]
    lock = threading.Lock()

    def done(i: int, fut: Any) -> None:
        t = time.monotonic()
        with lock:
            _classify(outs[i], fut, t, plain)

    futures = []
    t0 = time.monotonic()
    for i, a in enumerate(trace):
        delay = t0 + a.t_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        outs[i].t_submit = time.monotonic()
        x = xs[i % len(xs)]
        if plain:
            f = cl.submit(a.model, x, timeout_ms=a.deadline_ms)
        else:
            # the hard timeout (grace past the deadline) only bounds a late result's wait: nothing hangs
            f = cl.submit(a.model, x, deadline_ms=a.deadline_ms, user=a.user,
                          timeout_ms=a.deadline_ms + int(grace_s * 1000))
        f.add_done_callback(lambda fut, i=i: done(i, fut))
        futures.append(f)
    for i, f in enumerate(futures):
        wait = outs[i].t_submit + trace[i].deadline_ms / 1000 + grace_s + 2.0 - time.monotonic()
        try:
            f.exception(timeout=max(0.0, wait))
        except Exception:  # noqa: BLE001 -- concurrent.futures.TimeoutError: counted as hung below
            pass
    with lock:
        return [copy.copy(o) for o in outs]


# ---------------------------------------------------------------- summary

def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n sum x^2); 1 = equal shares."""
    sq = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * sq) if sq else math.nan


def pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def reason_kind(reason: str) -> str:
    """A rejection's message with its numbers and model names taken out, so that like counts with like."""
    words = []
    for w in reason.split():
        if w.rstrip(":,") in MODELS:
            w = "M" + w[len(w.rstrip(":,")):]
        elif any(c.isdigit() for c in w):
            w = "#"
        words.append(w)
    return " ".join(words)[:160]


def summarise(outs: Sequence[Outcome], users: Sequence[User]) -> dict[str, Any]:
    """Counts per outcome, lateness of the late (% of deadline), Jain's index over users, per-model served."""
    kinds = {k: sum(o.kind == k for o in outs) for k in ("served", "rejected", "late", "timeout", "error", "hung")}
    late_pct = [100 * o.late_ms / o.arrival.deadline_ms for o in outs if o.kind == "late"]
    per_user = {u.name: [0, 0] for u in users}
    per_model: dict[str, list[int]] = {}
    for o in outs:
        per_user[o.arrival.user][0] += 1
        per_user[o.arrival.user][1] += o.kind == "served"
        pm = per_model.setdefault(o.arrival.model, [0, 0])
        pm[0] += 1
        pm[1] += o.kind == "served"
    shares = [s / n for n, s in per_user.values() if n]
    errors: dict[str, int] = {}
    for o in outs:
        if o.kind == "error":
            key = o.error.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    lat = [o.latency_ms for o in outs if o.kind == "served"]
    reasons: dict[str, int] = {}
    for o in outs:
        if o.kind == "rejected":
            key = reason_kind(o.reason)
            reasons[key] = reasons.get(key, 0) + 1
    return {"submitted": len(outs), **kinds, "admitted": len(outs) - kinds["rejected"],
            "late_pct_max": max(late_pct, default=0.0), "late_pct_p95": pct(late_pct, 0.95) if late_pct else 0.0,
            "late_over_10pct": sum(p > 10 for p in late_pct),
            "jain": jain(shares), "users_starved": sum(s == 0 for s in shares),
            "latency_ms_p50": pct(lat, 0.5), "latency_ms_p95": pct(lat, 0.95),
            "per_model": {m: {"submitted": n, "served": s} for m, (n, s) in sorted(per_model.items())},
            "errors": errors, "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5])}


# ---------------------------------------------------------------- one policy

def run_policy(root: Path, args: argparse.Namespace, policy: str, window_ms: float, models: dict[str, dict[str, Any]],
               budget: int, trace: Sequence[Arrival], users: Sequence[User], calibrate: bool) -> dict[str, Any]:
    """A fresh cluster with ``--scheduler policy``: deploy, warm up, (calibrate), replay the trace."""
    import torch

    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig
    from edgesplit.runtime.errors import RuntimeFailure

    coord, wargs = cluster_args(args, policy, window_ms, budget)
    label = policy if len(args.window_list) == 1 else f"{policy}@{window_ms:g}ms"
    cfg = LocalClusterConfig(workers=2, port=0, torch_threads=1, heartbeat_ms=500)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 3, args.img_size, args.img_size, generator=g) for _ in range(8)]
    res: dict[str, Any] = {"policy": policy, "window_ms": window_ms, "label": label, "code": code_digest(),
                           "coordinator_args": coord,
                           "worker_args": wargs[0], "load_average_before": os.getloadavg()[0]}
    t_start = time.monotonic()
    with LocalCluster(cfg, root, worker_args=wargs, coordinator_args=coord) as lc:
        cl = lc.client(control_timeout_ms=120_000, max_in_flight=100_000, timeout_ms=60_000)
        deploy_all(cl, models)
        if calibrate:
            res["switches"] = measure_switches(cl, models, args.switch_reps)
        res["warm_ms"] = warm_up(cl, models, xs[0], args.warmup)
        res["compute_ms"] = worker_compute_ms(cl, list(models))
        res["setup_s"] = time.monotonic() - t_start
        print(f"  [{label}] cluster up, warm in {res['setup_s']:.1f} s; replaying {len(trace)} requests "
              f"over {args.duration_s:.0f} s ...", flush=True)
        cpu0 = cpu_seconds(lc)
        outs = replay(cl, trace, xs, policy == "plain", args.grace_s)
        res["cpu_s"] = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu_seconds(lc).items()}
        res["replay_s"] = time.monotonic() - t_start - res["setup_s"]
        res["load_average_after"] = os.getloadavg()[0]
        res["alive_after"] = lc.alive()
        try:
            res["worker_telemetry"] = {w.name: {k: v for k, v in w.telemetry.items() if k.startswith("count_")}
                                       for w in cl.workers()}
        except RuntimeFailure as e:  # the coordinator stopped answering: say so, keep the outcomes
            res["worker_telemetry"] = {}
            res["coordinator_error"] = f"{type(e).__name__}: {e}"
            print(f"  [{label}] after the trace the coordinator did not answer: {e}", flush=True)
        if policy != "plain" and "coordinator_error" not in res:
            try:  # counters and the decision time per window, as the live coordinator measured them
                res["admission"] = cl.coordinator().get("admission", {})
            except RuntimeFailure as e:
                res["admission"] = {"error": f"{type(e).__name__}: {e}"}
        n_log = 20_000 if args.keep_logs or "coordinator_error" in res else 2000
        res["logs"] = {n: lc.log_tail(n, n_log) for n in ["coordinator", *lc.names]}
    res["summary"] = summarise(outs, users)
    res["outcomes"] = [[o.arrival.t_s, o.arrival.user, o.arrival.model, o.arrival.deadline_ms, o.kind,
                        round(o.latency_ms, 2) if o.t_done else None, round(o.late_ms, 2), o.admitted,
                        o.planned_end_ms, o.method or None, o.error or o.reason or None] for o in outs]
    s = res["summary"]
    print(f"  [{label}] served {s['served']}/{s['submitted']}, rejected {s['rejected']}, late {s['late']}, "
          f"timeout {s['timeout']}, errors {s['error']}, hung {s['hung']}; Jain {s['jain']:.3f}; CPU s in the replay "
          + ", ".join(f"{k} {v:.1f}" for k, v in res["cpu_s"].items()), flush=True)
    adm = res.get("admission", {})
    if "decision_ms_p99" in adm:
        print(f"  [{label}] admission: {adm['windows']} windows (last 2,048), decision ms p50 {adm['decision_ms_p50']}, "
              f"p99 {adm['decision_ms_p99']}, max {adm['decision_ms_max']}; re-plans kept {adm['replans_kept']} of "
              f"{adm['replans']}; lag reports that moved a plan {adm['lagged']}", flush=True)
    return res


# ---------------------------------------------------------------- printing

def print_calibration(models: dict[str, dict[str, Any]], res: dict[str, Any], fit: dict[str, float],
                      load: dict[str, dict[str, float]], budget: int) -> None:
    print(f"\nmodels (budget per worker {budget / 1e6:.1f} MB):")
    print(f"{'model':<6}{'worker':<8}{'MB':>7}{'shares MB with':>40}{'compute ms':>12}{'client ms':>11}")
    for m, info in models.items():
        sh = ", ".join(f"{o} {shared_mb(models, m, o):.1f}" for o in models
                       if o != m and shared_mb(models, m, o) > 0) or "-"
        print(f"{m:<6}{info['worker']:<8}{info['bytes'] / 1e6:>7.1f}{sh:>40}"
              f"{res['compute_ms'].get(m, math.nan):>12.1f}{res['warm_ms'].get(m, math.nan):>11.1f}")
    if res.get("switches"):
        print(f"\nswitches (PREFETCH, one worker at a time): ms = {fit['intercept_ms']:.1f} + "
              f"{fit['ms_per_mb']:.2f} x missing MB (R^2 {fit['r2']:.3f}, {fit['n']} points)")
        print(f"{'worker':<8}{'switch':<10}{'missing MB':>11}{'ms':>9}{'resident MB':>13}")
        for r in res["switches"]:
            print(f"{r['worker']:<8}{r['from'] + '>' + r['to']:<10}{r['loaded_mb']:>11.1f}{r['ms']:>9.1f}"
                  f"{r['resident_mb']:>13.1f}")
    print("\noffered load per worker (busy s per s of trace; > 1: cannot keep up that way):")
    print(f"{'worker':<8}{'req/s':>7}{'compute':>9}{'FIFO order':>12}{'loads':>7}{'grouped':>9}{'loads':>7}")
    for w, l in load.items():
        print(f"{w:<8}{l['rate_per_s']:>7.1f}{l['compute_s_per_s']:>9.2f}{l['fifo_busy_s_per_s']:>12.2f}"
              f"{l['fifo_loads']:>7}{l['grouped_busy_s_per_s']:>9.2f}{l['grouped_loads']:>7}")


def _fcfs_served(runs: Sequence[dict[str, Any]], window_ms: float) -> int:
    """Served within deadline by fcfs at the same admission window (0 when fcfs did not run)."""
    return next((r["summary"]["served"] for r in runs if r["policy"] == "fcfs" and r["window_ms"] == window_ms), 0)


def print_table(seed: int, n_requests: int, load: dict[str, dict[str, float]], runs: list[dict[str, Any]]) -> None:
    print(f"\nseed {seed}: {n_requests} requests; busy s per s, FIFO order / grouped: "
          + ", ".join(f"{w} {v['fifo_busy_s_per_s']:.2f} / {v['grouped_busy_s_per_s']:.2f}" for w, v in load.items()))
    print(f"{'policy':<24}{'submitted':>10}{'served':>8}{'x fcfs':>8}{'rejected':>9}{'late':>6}{'late max%':>10}"
          f"{'p95%':>7}{'>10%':>6}{'timeout':>8}{'errors':>7}{'hung':>5}{'Jain':>7}{'starved':>8}{'p50 ms':>8}")
    for r in runs:
        s = r["summary"]
        base = _fcfs_served(runs, r["window_ms"])
        ratio = f"{s['served'] / base:.2f}" if base else "-"
        print(f"{r['label']:<24}{s['submitted']:>10}{s['served']:>8}{ratio:>8}{s['rejected']:>9}{s['late']:>6}"
              f"{s['late_pct_max']:>10.1f}{s['late_pct_p95']:>7.1f}{s['late_over_10pct']:>6}{s['timeout']:>8}"
              f"{s['error']:>7}{s['hung']:>5}{s['jain']:>7.3f}{s['users_starved']:>8}{s['latency_ms_p50']:>8.0f}")
    print("  CPU seconds during the replay (coordinator, workers, client; 2 cores):")
    for r in runs:
        cpu = r.get("cpu_s", {})
        print(f"    {r['label']:<24} " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
              + f" of {r['replay_s']:.0f} s")
    for r in runs:
        s = r["summary"]
        if s["errors"]:
            print(f"  {r['label']}: errors {s['errors']}")
        for why, n in s["reject_reasons"].items():
            print(f"  {r['label']}: {n} rejected: {why}")
    print("  served / submitted per model:")
    for r in runs:
        print(f"    {r['label']:<24} " + " ".join(f"{m} {v['served']}/{v['submitted']}"
                                              for m, v in r["summary"]["per_model"].items()))


def ratios(all_runs: dict[int, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per policy (label): served / fcfs's served at the same window, per seed, with mean and sd."""
    out: dict[str, dict[str, Any]] = {}
    for seed, runs in all_runs.items():
        for r in runs:
            base = _fcfs_served(runs, r["window_ms"])
            if base:
                out.setdefault(r["label"], {"per_seed": []})["per_seed"].append(r["summary"]["served"] / base)
    for v in out.values():
        xs = v["per_seed"]
        v.update(mean=statistics.fmean(xs), sd=statistics.stdev(xs) if len(xs) > 1 else 0.0, min=min(xs), max=max(xs))
    return out


# ---------------------------------------------------------------- main

def write_json(path: Path, result: dict[str, Any]) -> None:
    """Indented JSON, with each request's outcome (a row of ``OUTCOME_FIELDS``) on one line."""
    runs = [r for seed in result["seeds"].values() for r in seed["runs"]]
    held = [r.pop("outcomes", None) for r in runs]
    for k, r in enumerate(runs):
        r["outcomes"] = f"@outcomes{k}@"  # a placeholder, replaced by the rows below
    try:
        text = json.dumps(result, indent=1, default=str)
    finally:
        for r, rows in zip(runs, held):
            r["outcomes"] = rows
    for k, rows in enumerate(held):
        body = ",\n    ".join(json.dumps(row, default=str) for row in rows or [])
        text = text.replace(f'"@outcomes{k}@"', f"[\n    {body}\n   ]" if rows else "[]", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from edgesplit.runtime.config import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for the setup.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="coordinator --scheduler values, one fresh cluster each (fcfs first: the others are "
                         "compared with it); 'plain' = no admission (plain submit with timeout_ms)")
    ap.add_argument("--seeds", type=int, default=1, help="arrival traces (seed 0, 1, ...); every policy runs each")
    ap.add_argument("--users", type=int, default=60, help="simulated users, each bound to one model")
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS, help="models' popularity (users split in proportion)")
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second, all users together (Poisson)")
    ap.add_argument("--duration-s", type=float, default=60.0, help="seconds of arrivals per policy")
    ap.add_argument("--deadline-ms", default="1000,3000", help="per-request deadline range LO,HI (uniform)")
    ap.add_argument("--arch", default="vit_tiny_patch16_224", help="timm ViT with 12 blocks (random weights)")
    ap.add_argument("--img-size", type=int, default=112, help="input side (smaller = less compute per request)")
    ap.add_argument("--read-rate", type=parse_size, default=parse_size("100MB"),
                    help="workers' store read-rate cap per second (a board's storage)")
    ap.add_argument("--budget-x", type=float, default=1.6, help="worker block budget, x the largest model")
    ap.add_argument("--window-ms", default="5",
                    help="coordinator --admission-window-ms; a comma-separated list runs every policy at each")
    ap.add_argument("--uplink-rate", type=parse_size, default=0, help="coordinator --uplink-rate (0 = unlimited)")
    ap.add_argument("--warmup", type=int, default=5, help="sequential requests per model before the trace")
    ap.add_argument("--switch-reps", type=int, default=2, help="repetitions of the switch sequence (first cluster)")
    ap.add_argument("--grace-s", type=float, default=10.0, help="wait this long past a deadline before 'hung'")
    ap.add_argument("--calibrate-only", action="store_true", help="measure costs and the offered load; no replay")
    ap.add_argument("--keep-logs", action="store_true", help="keep the last 20 kB of each daemon's log in the JSON (else 2 kB)")
    ap.add_argument("--out", type=Path, default=OUT / "serving.json")
    args = ap.parse_args(argv)
    lo, hi = (int(v) for v in args.deadline_ms.split(","))
    args.deadline = (lo, hi)
    args.policy_list = [p.strip() for p in args.policies.split(",") if p.strip()]
    args.window_list = [float(w) for w in str(args.window_ms).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    api = admission_api()
    if not api and args.policy_list != ["plain"]:
        print("this tree has no admission API yet (DeadlineUnmeetable, submit(deadline_ms=, user=)): "
              "running policy 'plain' only", flush=True)
        args.policy_list = ["plain"]
    print(f"config: {json.dumps({k: v for k, v in vars(args).items() if k != 'out'}, default=str)}; "
          f"cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    weights = parse_weights(args.weights)
    users = make_users(args.users, weights)
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "admission_api": api,
                              "outcome_fields": OUTCOME_FIELDS, "code": code_digest(), "users": [asdict(u) for u in users], "seeds": {}}
    print(f"runtime + scheduling code {result['code']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgesplit-serving-") as tmp:
        root = Path(tmp) / "store"
        print(f"partitioning {len(MODELS)} {args.arch} models at {args.img_size} px (random weights) ...", flush=True)
        models = build_store(root, args.arch, args.img_size)
        budget = int(args.budget_x * max(v["bytes"] for v in models.values()))
        result["models"] = {m: {k: v for k, v in info.items() if k != "blocks"} for m, info in models.items()}
        result["budget_bytes"] = budget
        all_runs: dict[int, list[dict[str, Any]]] = {}
        calib: dict[str, Any] | None = None
        for seed in range(args.seeds):
            trace = make_trace(users, args.rate, args.duration_s, args.deadline, seed)
            runs = []
            for window_ms in ([] if args.calibrate_only else args.window_list):
                for policy in args.policy_list:
                    r = run_policy(root, args, policy, window_ms, models, budget, trace, users,
                                   calibrate=calib is None)
                    calib = calib or r
                    runs.append(r)
                    result["seeds"][seed] = {"requests": len(trace), "runs": runs}
                    write_json(args.out, result)  # what is done so far survives a failure later
            if args.calibrate_only and calib is None:
                calib = run_policy(root, args, "plain", 0, models, budget, [], users, calibrate=True)
            fit = fit_line([(s["loaded_mb"], s["ms"]) for s in calib["switches"] if s["loaded_mb"] > 0])
            load = offered_load(models, trace, args.duration_s, budget, {**calib["warm_ms"], **calib["compute_ms"]}, fit,
                                args.deadline[0] / 1000)
            if seed == 0:
                print_calibration(models, calib, fit, load, budget)
                result["calibration"] = {"switches": calib["switches"], "fit": fit, "compute_ms": calib["compute_ms"],
                                         "client_ms": calib["warm_ms"]}
            result["seeds"][seed] = {"requests": len(trace), "offered_load": load, "runs": runs}
            all_runs[seed] = runs
            if runs:
                print_table(seed, len(trace), load, runs)
    if any(all_runs.values()):
        result["ratio_to_fcfs"] = ratios(all_runs)
        if result["ratio_to_fcfs"]:
            print(f"\nserved within deadline / fcfs's, over {args.seeds} seed(s):")
            for p, v in result["ratio_to_fcfs"].items():
                print(f"  {p:<18} mean {v['mean']:.2f}  sd {v['sd']:.2f}  min {v['min']:.2f}  max {v['max']:.2f}"
                      f"  ({', '.join(f'{x:.2f}' for x in v['per_seed'])})")
    result["code_after"] = code_digest()
    if result["code_after"] != result["code"]:
        print(f"\nWARNING: the runtime or scheduling sources changed during the run ({result['code']} -> "
              f"{result['code_after']}): clusters started after the change ran the new code", flush=True)
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
