"""Schedulers against the exact oracle: DP optimal, greedy near-optimal, sharing never hurts."""
import itertools
import math
import random
import statistics

import numpy as np
import pytest

from edgesplit import scheduling as sch
from edgesplit.scheduling import builder
from edgesplit.scheduling import dp as dp_module
from edgesplit.scheduling import (ModelLibrary, Problem, Request, ScheduleError, ServerConfig, UplinkConfig,
                                  backbone_structure, evaluate)

LOAD_RATE = 1000.0  # bytes/s; block sizes are hundreds of bytes, so loads take 0.1 .. 3 s


def backbone_problem(rng: random.Random, n_requests: int, uplink: str = "edf") -> Problem:
    """Random backbone-sharing instance in the DP's case: clusters of models with a shared
    backbone and private blocks; requests of a model differ only in their deadlines."""
    n_models = rng.randint(1, 4)
    n_clusters = rng.randint(1, n_models)
    clusters: dict = {}
    for m in range(n_models):
        backbone, models = clusters.setdefault(f"c{m % n_clusters}", ([rng.randint(1, 10) * 100 for _ in range(
            rng.randint(1, 3))], {}))
        models[f"m{m}"] = [rng.randint(0, 5) * 100 for _ in range(rng.randint(1, 2))]
    lib = ModelLibrary.from_backbones(clusters)
    kind = {f"m{m}": (rng.randint(0, 5) * 100, rng.uniform(0.05, 0.5), rng.uniform(2e3, 2e4))
            for m in range(n_models)}
    reqs = []
    for k in range(n_requests):
        m = f"m{rng.randrange(n_models)}"
        size, infer, gain = kind[m]
        reqs.append(Request(f"r{k}", f"u{k}", m, size, infer, rng.uniform(0.3, 6.0), link_gain_hz=gain))
    srv = ServerConfig(LOAD_RATE, resident_blocks=frozenset(b for b in lib.block_bytes if rng.random() < 0.3),
                       memory_budget_bytes=rng.choice([math.inf, math.inf, 2500]))
    if uplink == "edf":
        up = UplinkConfig("edf", total_rate_bytes_per_s=rng.choice([math.inf, 400.0, 1500.0, 5000.0]))
    elif uplink == "static":
        up = UplinkConfig("static", total_rate_bytes_per_s=rng.choice([1000.0, 3000.0, 10000.0]))
    else:
        up = UplinkConfig("static", "shannon", total_bandwidth_hz=rng.choice([300.0, 1000.0, 5000.0]))
    return Problem(lib, tuple(reqs), srv, up)


def general_problem(rng: random.Random, n_requests: int, arrivals: bool = False, overlap: bool = False,
                    policy: str = "edf", uniform: bool = False) -> Problem:
    """Random instance with arbitrary sharing: each model is a random subset of the blocks."""
    sizes = {f"b{i}": rng.randint(1, 10) * 100 for i in range(rng.randint(3, 10))}
    n_models = rng.randint(2, 5)
    models = {f"m{m}": {b for b in sizes if rng.random() < 0.5} or {rng.choice(list(sizes))}
              for m in range(n_models)}
    kind = {m: (rng.randint(1, 5) * 100, rng.uniform(0.05, 0.5)) for m in models}
    reqs = []
    for k in range(n_requests):
        m = rng.choice(list(models))
        size, infer = kind[m] if uniform else (rng.randint(0, 5) * 100, rng.uniform(0.05, 0.5))
        arrival = rng.uniform(0, 2.0) if arrivals else 0.0
        reqs.append(Request(f"r{k}", f"u{k}", m, size, infer, arrival + rng.uniform(0.3, 6.0), arrival))
    srv = ServerConfig(LOAD_RATE, overlap_load=overlap, memory_budget_bytes=rng.choice([math.inf, 4000]))
    rates = [math.inf, 500.0, 1500.0, 5000.0] if policy == "edf" else [1000.0, 3000.0, 10000.0]
    return Problem(ModelLibrary(sizes, models), tuple(reqs), srv,
                   UplinkConfig(policy, total_rate_bytes_per_s=rng.choice(rates)))


def _brute_force(p: Problem) -> int:
    """Most requests servable, by trying every ordered subset (tiny K only)."""
    for size in range(len(p.requests), 0, -1):
        if any(evaluate(p, sub).feasible for sub in itertools.permutations(range(len(p.requests)), size)):
            return size
    return 0


@pytest.mark.timeout(60)
def test_exact_solver_matches_brute_force():
    """The oracle's oracle: the subset DP against enumerating every ordered subset."""
    rng = random.Random(10)
    for i in range(160):
        n = rng.randint(1, 5)
        kind = i % 5
        if kind == 0:
            p = backbone_problem(rng, n, rng.choice(["edf", "static", "shannon"]))
        elif kind == 1:
            p = general_problem(rng, n, arrivals=True, overlap=True)
        elif kind == 2:
            p = general_problem(rng, n, arrivals=True, policy="static")
        elif kind == 3:
            p = general_problem(rng, n, arrivals=True)
        else:
            p = general_problem(rng, n, overlap=True)
        assert sch.solve_exact(p).served == _brute_force(p), i


@pytest.mark.timeout(60)
def test_dp_equals_exact_on_backbone_instances(monkeypatch):
    """Acceptance: the DP is optimal on >= 1000 random backbone-sharing instances (K <= 9),
    and sharing-aware (DP) never serves fewer than sharing-oblivious (DP on oblivious costs)."""
    rng = random.Random(11)
    gains = []
    for i in range(1200):
        p = backbone_problem(rng, rng.randint(1, 9), ("edf", "static", "shannon")[i % 3])
        assert backbone_structure(p.library) is not None and not sch.dp_preconditions(p)
        # every evaluation path: plain layers; greedy incumbent + depth-first; incumbent + depth-first
        # cut short after 2 states, then layers with pruning
        mode = i % 4
        monkeypatch.setattr(dp_module, "DFS_VISITS", 2 if mode == 3 else 50_000)
        dp = sch.solve_dp(p, sch.DPConfig(incumbent=mode != 0, cap_ms=None))
        assert dp.served == sch.solve_exact(p).served, i
        assert dp.timeline.feasible
        oblivious = sch.solve_oblivious(p, "dp").served
        assert dp.served >= oblivious
        gains.append(dp.served - oblivious)
    assert sum(g > 0 for g in gains) > 50  # sharing mattered on a good share of them


@pytest.mark.timeout(30)
def test_dp_is_exact_for_arbitrary_sharing_too(monkeypatch):
    """The DP needs only the switch matrix, so it is also exact without a backbone shape."""
    rng = random.Random(12)
    for i in range(300):
        p = general_problem(rng, rng.randint(1, 8), uniform=True, policy=("edf", "static")[i % 2])
        monkeypatch.setattr(dp_module, "DFS_VISITS", 2 if i % 3 == 2 else 50_000)
        assert sch.solve_dp(p, sch.DPConfig(incumbent=i % 3 != 0, cap_ms=None)).served == sch.solve_exact(p).served, i


@pytest.mark.timeout(60)
def test_greedy_near_optimal_and_never_infeasible(capsys):
    """Acceptance: greedy >= 0.95 of optimal on average over >= 1000 general instances, never
    infeasible, and never fewer than the sharing-oblivious greedy."""
    rng = random.Random(13)
    ratios = []
    for i in range(1000):
        n = rng.randint(2, 9)
        kind = i % 4
        p = general_problem(rng, n, arrivals=kind in (1, 2), overlap=kind == 2,
                            policy="static" if kind == 3 else "edf")
        best = sch.solve_exact(p).served
        g = sch.solve_greedy(p)
        assert evaluate(p, g.order).feasible and g.served <= best
        assert g.served >= sch.solve_oblivious(p, "greedy").served
        ratios.append(g.served / best if best else 1.0)
    mean, worst = statistics.fmean(ratios), min(ratios)
    with capsys.disabled():
        print(f"\ngreedy / optimum over {len(ratios)} general instances: mean {mean:.4f}, worst {worst:.3f}, "
              f"below optimum on {sum(r < 1 for r in ratios)}")
    assert mean >= 0.95


@pytest.mark.timeout(10)
def test_dp_refuses_cases_where_it_is_not_exact():
    rng = random.Random(14)
    p = general_problem(rng, 5, arrivals=True)
    with pytest.raises(ScheduleError, match="arrive after"):
        sch.solve_dp(p)
    p = general_problem(rng, 6, overlap=True)
    p = Problem(p.library, p.requests, ServerConfig(LOAD_RATE, overlap_load=True), p.uplink)
    with pytest.raises(ScheduleError, match="overlap"):
        sch.solve_dp(p)
    lib = ModelLibrary({"a": 100}, {"m": {"a"}})
    mixed = Problem(lib, (Request("r0", "u", "m", 100, 0.1, 5.0), Request("r1", "u", "m", 100, 0.2, 5.0)),
                    ServerConfig(LOAD_RATE))
    with pytest.raises(ScheduleError, match="differ"):
        sch.solve_dp(mixed)
    assert sch.solve_auto(mixed).method == "greedy"
    with pytest.raises(ScheduleError, match="max_states"):
        sch.solve_dp(backbone_problem(random.Random(1), 9), sch.DPConfig(max_states=2, cap_ms=None))
    p = _two_models([("A", 6.0), ("B", 12.0), ("A", 100.0)])
    with pytest.raises(ScheduleError, match="max_visits"):
        sch.solve_dp(p, sch.DPConfig(max_visits=0))


def _two_models(deadlines, infer=1.0, backbone=0, private=500) -> Problem:
    lib = ModelLibrary.from_backbones({"c": ([backbone] if backbone else [], {"A": [private], "B": [private]})})
    reqs = tuple(Request(f"r{k}", f"u{k}", m, 0, infer, d) for k, (m, d) in enumerate(deadlines))
    return Problem(lib, reqs, ServerConfig(100.0))


@pytest.mark.timeout(10)
def test_interleaving_beats_batching_by_model():
    # loads of 5 s, inference 1 s: A(6) B(12) A(100) serves all three; AAB and BAA serve two
    p = _two_models([("A", 6.0), ("B", 12.0), ("A", 100.0)])
    assert sch.solve_dp(p).order == (0, 1, 2)
    assert sch.solve_exact(p).served == 3
    assert not evaluate(p, [0, 2, 1]).feasible and not evaluate(p, [1, 0, 2]).feasible
    assert sch.solve_greedy(p).served == 3
    # without lookahead and insertion, min-load keeps reusing A and strands B
    plain = sch.GreedyConfig(rules=("min_load",), lookahead=1, insertion_max_requests=0, exchange_max_requests=0,
                             keep_oblivious=False)
    assert sch.solve_greedy(p, plain).served == 2


@pytest.mark.timeout(10)
def test_sharing_aware_serves_more_than_oblivious():
    # 900 B backbone + 100 B private at 100 B/s: a full load is 10 s, a switch inside the cluster 1 s
    p = _two_models([("A", 11.0), ("B", 13.0), ("A", 15.0)], backbone=900, private=100)
    for name in ("dp", "greedy", "exact"):
        assert sch.create_scheduler(name)(p).served == 3
    assert sch.solve_oblivious(p, "dp").served == 2
    assert sch.solve_oblivious(p, "greedy").served == 2


@pytest.mark.timeout(20)
def test_every_registered_scheduler_returns_a_feasible_schedule():
    assert {"auto", "dp", "greedy", "exact", "oblivious-greedy", "oblivious-dp", "fcfs", "edf",
            "random"} <= set(sch.list_schedulers())
    rng = random.Random(15)
    for i in range(40):
        p = backbone_problem(rng, rng.randint(1, 8), ("edf", "static")[i % 2])
        best = sch.solve_exact(p).served
        for name in sch.list_schedulers():
            s = sch.create_scheduler(name)(p)
            assert evaluate(p, s.order).feasible and s.served <= best, name
            assert s.request_ids == tuple(p.requests[k].request_id for k in s.order)
    p = backbone_problem(rng, 8)
    assert sch.solve_random(p, seed=3).order == sch.create_scheduler("random", seed=3)(p).order
    assert sch.solve_auto(p).method == "dp"
    with pytest.raises(ScheduleError, match="unknown"):
        sch.create_scheduler("nope")


@pytest.mark.timeout(30)
def test_fast_checks_agree_with_the_evaluator():
    """The greedy's incremental and vectorised checks give the evaluator's verdicts."""
    rng = random.Random(16)
    for i in range(400):
        p = general_problem(rng, rng.randint(1, 8), arrivals=i % 2 == 0, overlap=i % 3 == 0,
                            policy="static" if i % 5 == 0 else "edf")
        c = p.compiled
        order = list(range(c.n_requests))
        rng.shuffle(order)
        scalar = builder.Builder(c)
        vec = builder.VecBuilder(c, builder.request_arrays(c)) if c.policy == "edf" else None
        for n, k in enumerate(order):
            assert sch.fast_feasible(c, order[:n + 1]) == evaluate(p, order[:n + 1]).feasible
            if not sch.fast_feasible(c, scalar.order + [k]):
                assert scalar.try_end(k) is None
                continue
            end = scalar.try_end(k)
            assert end is not None
            if vec is not None:  # EDF link: the earliest timeline is the evaluator's
                assert end == pytest.approx(evaluate(p, scalar.order + [k]).jobs[-1].end_s)
                ends = vec.ends(np.arange(c.n_requests))
                assert ends[k] == pytest.approx(end)
                vec.append(k)
            scalar.append(k)
