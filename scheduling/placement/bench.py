"""A benchmark of ``plan_placement`` on random heterogeneous clusters (``bench_problem``, ``_bench``)."""
from __future__ import annotations

import time
from typing import Sequence

from .problem import _INF, CLIENT, OBJECTIVES, CutCodec, PlacementProblem, WorkerProfile
from .solve import plan_placement


# --- a benchmark: python -c "from edgesplit.scheduling.placement import _bench; _bench()" ---------
def bench_problem(n_workers: int = 6, n_blocks: int = 26, seed: int = 0,
                  max_accuracy_cost: float = 1.0) -> PlacementProblem:
    """A random heterogeneous cluster: speeds 1-4x, some memory limits, all links measured, 3 cuts x 2 codecs."""
    import random

    rng = random.Random(seed)
    block_ms = [rng.uniform(0.5, 3.0) for _ in range(n_blocks)]
    block_bytes = [rng.randint(1, 8) * 1_000_000 for _ in range(n_blocks)]
    act = [rng.choice([50_000, 100_000, 200_000, 400_000]) for _ in range(n_blocks - 1)] + [4_000]
    workers = []
    for i in range(n_workers):
        speed = rng.uniform(1.0, 4.0)
        mem = rng.choice([0, sum(block_bytes) // 2, sum(block_bytes) // 3])
        workers.append(WorkerProfile(f"w{i}", tuple(b * speed for b in block_ms), mem))
    names = [CLIENT] + [w.name for w in workers]
    rates = {(a, b): rng.uniform(5e6, 1.25e8) for a in names for b in names if a != b}
    cuts = sorted(rng.sample(range(1, n_blocks), 3))
    codecs = tuple(CutCodec(kind, c, act[c - 1] // div, round(rng.uniform(0.5, 1.5) * cost, 3), 0.05 * div, 0.025 * div)
                   for c in cuts for kind, div, cost in (("int8", 4, 0.2), ("topk", 16, 0.6)))
    return PlacementProblem(tuple(block_bytes), tuple(act), 150_528, tuple(workers), rates, hop_ms=0.3,
                            codecs=codecs, max_accuracy_cost=max_accuracy_cost, batch=4)


def _bench(runs: int = 9, seeds: Sequence[int] = (0, 1, 2)) -> dict[tuple[str, float], float]:
    """Median ms of ``plan_placement`` on ``bench_problem`` instances, per objective and accuracy budget (printed)."""
    out = {}
    for budget in (1.0, _INF):
        for objective in OBJECTIVES:
            times = []
            for seed in seeds:
                problem = bench_problem(seed=seed, max_accuracy_cost=budget)
                for _ in range(runs):
                    t0 = time.perf_counter()
                    pl = plan_placement(problem, objective)
                    times.append((time.perf_counter() - t0) * 1000.0)
            out[(objective, budget)] = med = sorted(times)[len(times) // 2]
            print(f"{objective:>10}, accuracy budget {budget}: median {med:.1f} ms, max {max(times):.1f} ms over "
                  f"{len(times)} runs; last plan: workers {pl.workers}, splits {pl.splits}, codecs {pl.codecs}, "
                  f"latency {pl.latency_ms:.2f} ms, bottleneck {pl.bottleneck_ms:.2f} ms ({pl.bottleneck})")
    return out
