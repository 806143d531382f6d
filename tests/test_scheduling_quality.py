"""Decision quality against the exact optimum, and the DP's time cap (issue 17, item 4).

Instances are in the capped DP's case (requests of a model share input size and inference
time) but otherwise hard: a different deadline per request, a finite shared uplink, arbitrary
block sharing. The DP's cap runs on an injected clock that advances a fixed step per read,
so "how far the DP got before the cap" is the same on every machine.
"""
from __future__ import annotations

import random
import statistics

import pytest

from edgesplit import scheduling as sch
from edgesplit.scheduling import ModelLibrary, Problem, Request, ServerConfig, UplinkConfig, evaluate

LOAD_RATE = 1000.0  # bytes/s; blocks of 100..1000 B load in 0.1..1 s
N_INSTANCES = 240
SEED = 20260417  # not the seeds the floors were measured on (those were 1..3)
GREEDY_MEAN_FLOOR = 0.985  # measured 0.992-0.994 on seeds 1..3 (0.984-0.993 before the exchange pass)
GREEDY_WORST_FLOOR = 0.6  # measured 0.60-0.75 (3 of 5 served at worst)
DP_MEAN_FLOOR = 0.995  # capped DP, ~256 states before its cap on the test clock: 0.9995-1.000, 2-5 fallbacks
DP_WORST_FLOOR = 0.6  # where it falls back it is its greedy (measured 0.875-1.000)


def step_clock(step_s: float):
    """A clock that advances ``step_s`` per read: the cap becomes a fixed number of reads."""
    now = [0.0]

    def read() -> float:
        now[0] += step_s
        return now[0]
    return read


def hard_problem(rng: random.Random, n_requests: int, n_models: int) -> Problem:
    """Arbitrary sharing, per-request deadlines, a finite EDF uplink; one size and tau per model."""
    sizes = {f"b{i}": rng.randint(1, 10) * 100 for i in range(rng.randint(3, 8))}
    models = {f"m{m}": {b for b in sizes if rng.random() < 0.5} or {rng.choice(list(sizes))}
              for m in range(n_models)}
    kind = {m: (rng.randint(1, 5) * 100, rng.uniform(0.05, 0.4)) for m in models}
    reqs = []
    for k in range(n_requests):
        m = rng.choice(list(models))
        reqs.append(Request(f"r{k}", f"u{k}", m, kind[m][0], kind[m][1], rng.uniform(0.3, 5.0)))
    srv = ServerConfig(LOAD_RATE, resident_blocks=frozenset(b for b in sizes if rng.random() < 0.2))
    return Problem(ModelLibrary(sizes, models), tuple(reqs), srv,
                   UplinkConfig("edf", total_rate_bytes_per_s=rng.choice([300.0, 600.0, 1500.0])))


def quality(seed: int, n: int = N_INSTANCES) -> dict[str, list[float]]:
    """Served / optimum per instance for the greedy and the capped DP."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"greedy": [], "dp": [], "fallbacks": []}
    for _ in range(n):
        p = hard_problem(rng, rng.randint(6, 11), rng.randint(2, 5))
        assert not sch.dp_preconditions(p)
        opt = sch.solve_exact(p).served
        g = sch.solve_greedy(p)
        d = sch.solve_dp(p, sch.DPConfig(cap_ms=8.0, clock=step_clock(0.25e-3)))  # 32 reads
        for s in (g, d):
            assert evaluate(p, s.order).feasible and s.served <= opt
            assert s.bound is None or s.bound >= opt  # a bound never cuts the optimum
        if d.method == "dp":
            assert d.served == opt
        out["greedy"].append(g.served / opt if opt else 1.0)
        out["dp"].append(d.served / opt if opt else 1.0)
        out["fallbacks"].append(float(d.method == "greedy-fallback"))
        assert d.served >= sch.solve_greedy(p, sch.DPConfig().greedy).served  # never below its own incumbent
    return out


@pytest.mark.timeout(120)
def test_greedy_and_capped_dp_against_the_exact_optimum():
    """Acceptance: quality against the exact optimum on >= 200 small hard instances (mean and worst ratio)."""
    q = quality(SEED)
    g, d = q["greedy"], q["dp"]
    print(f"\n{len(g)} instances (6-11 requests, 2-5 models, per-request deadlines, finite uplink): "
          f"greedy/opt mean {statistics.fmean(g):.4f} worst {min(g):.3f} below opt on {sum(r < 1 for r in g)}; "
          f"capped DP/opt mean {statistics.fmean(d):.4f} worst {min(d):.3f} below opt on {sum(r < 1 for r in d)}, "
          f"fell back on {int(sum(q['fallbacks']))}")
    assert len(g) >= 200
    assert statistics.fmean(g) >= GREEDY_MEAN_FLOOR and min(g) >= GREEDY_WORST_FLOOR
    assert statistics.fmean(d) >= DP_MEAN_FLOOR and min(d) >= DP_WORST_FLOOR


def _big_problem(seed: int) -> Problem:
    """50 users over 6 models (the decision-time acceptance shape), small blocks."""
    rng = random.Random(seed)
    lib = ModelLibrary.from_backbones({c: ([400, 300], {f"{c}{v}": [rng.randint(1, 4) * 100] for v in range(3)})
                                       for c in ("x", "y")})
    kind = {m: (rng.randint(1, 3) * 100, rng.uniform(0.05, 0.2)) for m in lib.models}
    names = sorted(lib.models)
    reqs = tuple(Request(f"r{k}", f"u{k}", m, kind[m][0], kind[m][1], rng.uniform(0.5, 8.0))
                 for k, m in enumerate(rng.choice(names) for _ in range(50)))
    return Problem(lib, reqs, ServerConfig(LOAD_RATE), UplinkConfig("edf", total_rate_bytes_per_s=3000.0))


@pytest.mark.timeout(60)
def test_dp_cap_falls_back_to_the_greedy_and_says_so():
    p = _big_problem(5)
    greedy = sch.solve_greedy(p, sch.DPConfig().greedy)  # the DP's incumbent: no oblivious second pass
    # the clock passes the cap during the greedy: the greedy's own schedule, with a bound
    late = sch.solve_dp(p, sch.DPConfig(cap_ms=8.0, clock=step_clock(1.0)))
    assert late.method == "greedy-fallback" and late.order == greedy.order
    assert late.bound is not None and late.bound >= late.served and late.gap == late.bound - late.served
    # a few hundred states: at least the greedy's count, never infeasible, an upper bound reported
    short = sch.solve_dp(p, sch.DPConfig(cap_ms=8.0, clock=step_clock(0.5e-3)))
    assert short.method == "greedy-fallback" and short.served >= greedy.served and short.timeline.feasible
    assert short.bound >= short.served
    # a clock that never moves: the DP finishes, proves optimality (bound == served)
    small = _big_problem(5)
    small = Problem(small.library, small.requests[:14], small.server, small.uplink)
    frozen = sch.solve_dp(small, sch.DPConfig(cap_ms=8.0, clock=lambda: 0.0))
    assert frozen.method == "dp" and frozen.bound == frozen.served == sch.solve_exact(small).served
    assert frozen.gap == 0


@pytest.mark.timeout(30)
def test_auto_is_the_capped_dp_where_it_is_exact():
    p = _big_problem(6)
    s = sch.create_scheduler("auto", cap_ms=None)(p)
    assert s.method == "dp" and s.gap == 0
    s = sch.create_scheduler("dp", config=sch.DPConfig(cap_ms=1.0, clock=step_clock(1e-3)))(p)
    assert s.method in ("dp", "greedy-fallback") and s.timeline.feasible
    assert "greedy" in sch.list_schedulers("gr*") and sch.list_schedulers("oblivious-*") == [
        "oblivious-dp", "oblivious-greedy"]
