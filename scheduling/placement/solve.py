"""``plan_placement``: which DP passes each objective runs, and the placement they give."""
from __future__ import annotations

import math

import numpy as np

from .dp import _Chain
from .price import Placement, _check_objective, evaluate_placement
from .problem import _INF, PlacementProblem, _infeasible


def _solve(problem: PlacementProblem, objective: str) -> tuple[Placement, tuple[float, float]]:
    """The best placement and the DP's own (primary, secondary) values for it (tests compare the two)."""
    _check_objective(objective)
    ch = _Chain(problem)
    if objective == "throughput":
        # the least bottleneck B* (min-max DP), then the least latency using only costs <= B*
        bstar = float(ch.run(np.maximum).final[0].min())
        if not math.isfinite(bstar):
            raise _infeasible(problem)
        run = ch.run(np.add, bstar)
        state = ch.select(run.final[0])
        values = (bstar, float(run.final[0][state]))
    else:
        # least (latency, bottleneck) per state, exact unless two latencies met within rounding (see _Lex);
        # then B* is confirmed by a pass restricted below it (searched if that pass still reaches L*), and a
        # last pass restricted to B* ranks the plans reaching L* by accuracy and stages exactly
        run = ch.run_lex()
        state = ch.select(run.final[0], run.final[1])
        if state is None:
            raise _infeasible(problem)
        lat, bn = float(run.final[0][state]), float(run.final[1][state])
        if run.near_tie:
            if ch.run(np.add, float(np.nextafter(bn, -_INF))).final[0].min() == lat:
                cands = ch.candidates()
                cands = cands[cands < bn]
                lo, hi = 0, len(cands) - 1  # the pass at cands[hi] reaches L*; find the first that does
                while lo < hi:
                    mid = (lo + hi) // 2
                    if ch.run(np.add, float(cands[mid])).final[0].min() == lat:
                        hi = mid
                    else:
                        lo = mid + 1
                bn = float(cands[lo])
            run = ch.run(np.add, bn)
            state = ch.select(run.final[0])
        values = (float(run.final[0][state]), bn)
    stages, codecs = ch.backtrack(run, state)
    return evaluate_placement(problem, stages, codecs, objective), values


def plan_placement(problem: PlacementProblem, objective: str = "throughput") -> Placement:
    """The best plan, exactly.

    ``"throughput"`` minimises (bottleneck, latency), ``"latency"`` (latency, bottleneck); then the
    lower accuracy cost, then fewer stages. Raises ``PlacementError`` when no plan fits the workers'
    memory within the stage limit, or on an unknown objective.
    """
    return _solve(problem, objective)[0]
