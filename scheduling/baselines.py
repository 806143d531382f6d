"""Baselines the schedulers are measured against: FCFS, EDF, random order, sharing-oblivious planning."""
from __future__ import annotations

import random as _random

from .builder import admit_in_order
from .dp import DPConfig, solve_dp
from .errors import ScheduleError
from .greedy import GreedyConfig, greedy_order
from .problem import Problem
from .schedule import Schedule, finish

def solve_fcfs(problem: Problem) -> Schedule:
    """First come, first served: by arrival, admitting each request that still fits."""
    c = problem.compiled
    order = sorted(range(c.n_requests), key=lambda k: (problem.requests[k].arrival_s, k))
    return finish(problem, "fcfs", admit_in_order(c, order))


def solve_edf(problem: Problem) -> Schedule:
    """Earliest deadline first, admitting each request that still fits (blind to loading)."""
    c = problem.compiled
    order = sorted(range(c.n_requests), key=lambda k: (c.deadline_s[k], k))
    return finish(problem, "edf", admit_in_order(c, order))


def solve_random(problem: Problem, seed: int = 0) -> Schedule:
    """A random order (from ``seed``), admitting each request that still fits."""
    c = problem.compiled
    order = list(range(c.n_requests))
    _random.Random(seed).shuffle(order)
    return finish(problem, "random", admit_in_order(c, order))


def solve_oblivious(problem: Problem, planner: str = "greedy", dp_config: DPConfig | None = None) -> Schedule:
    """Sharing-oblivious baseline: plan as if every switch reloaded the whole model.

    The planner (``"greedy"`` without its oblivious fallback, or ``"dp"`` with
    ``dp_config``) runs on ``problem.oblivious()``; the order it picks is then timed under
    the true costs, which are never larger, so it stays feasible.
    """
    ob = problem.oblivious()
    if planner == "greedy":
        order = greedy_order(ob.compiled, GreedyConfig(keep_oblivious=False))
    elif planner == "dp":
        order = list(solve_dp(ob, dp_config or DPConfig(cap_ms=None)).order)
    else:
        raise ScheduleError(f"oblivious planner {planner!r} unknown; use 'greedy' or 'dp'")
    return finish(problem, f"oblivious-{planner}", order)


