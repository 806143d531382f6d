"""Exact placement of a layer-wise split: which worker runs which block span, and which codec each cut uses.

``runtime.plan.balanced_splits`` balances compute on identical workers; real edge clusters have
workers of different speeds and memory, links of different rates, and codecs that shrink an
activation for some accuracy. This module picks the plan that is best for a pipeline
(``objective="throughput"``: the slowest stage or link, then latency) or for one request
(``"latency"``: the sum of every stage and hop, then the slowest element), exactly.

A model is a chain of blocks ``0..n-1``; a plan is contiguous stages ``[start, end)``, each on
a distinct worker. Requests go client -> first stage -> ... -> last stage -> client; at each cut
the activation travels raw or through one codec available there (its encode/decode time is
charged to the sending/receiving stage). Costs are per batch, in ms (see ``PlacementProblem``).

``plan_placement`` is a DP along the chain whose states are (cut, codec there, accuracy level
spent, set of used workers, last worker); numpy updates every state of a cut, and every end of a
stage, at once. Throughput: a min-max pass gives the least bottleneck B*, then a least-latency
pass that may only use stages and hops costing <= B*. Latency: one pass keeps the least
(latency, bottleneck) per state; should two latencies meet within rounding, exact single-value
passes confirm (or search) the bottleneck. The accuracy level is a discrete index over every
total of codec costs within the budget, so the budget and the "lower accuracy cost" tie-break
stay exact. ``brute_force_placement`` enumerates every plan (the test oracle);
``evaluate_placement`` prices a given plan (e.g. the equal-block split). All three add in path
order with the same float operations, so their numbers agree to the bit.
Pure: no sockets, no torch, nothing of the runtime package (it imports this one).

Layout, one job per module:

- ``problem``: the inputs (``PlacementProblem``, ``WorkerProfile``, ``CutCodec``), their validation, ``PlacementError``.
- ``price``: the outputs (``Placement``, ``StagePlan``, ``HopPlan``) and ``evaluate_placement``, which prices a plan.
- ``brute``: ``brute_force_placement``, the enumerating test oracle.
- ``dp``: the exact DP's numpy tables and passes (``_Chain``, ``_Lex``).
- ``solve``: ``plan_placement``: which DP passes each objective runs, and the plan they give.
- ``bench``: ``bench_problem`` and ``_bench`` (``python -m edgesplit.scheduling.placement``).
"""
from .problem import (ACCURACY_TOL, CLIENT, OBJECTIVES, CutCodec, PlacementError, PlacementProblem,
                      WorkerProfile)
from .price import HopPlan, Placement, StagePlan, _key, evaluate_placement
from .brute import brute_force_placement
from .dp import MAX_DP_CELLS, _Chain, _Lex
from .solve import _solve, plan_placement
from .bench import _bench, bench_problem

__all__ = [
    "ACCURACY_TOL", "CLIENT", "CutCodec", "HopPlan", "MAX_DP_CELLS", "OBJECTIVES", "Placement", "PlacementError",
    "PlacementProblem", "StagePlan", "WorkerProfile", "bench_problem", "brute_force_placement", "evaluate_placement",
    "plan_placement",
]
__all__ += ["_Chain", "_Lex", "_bench", "_key", "_solve"]  # private, re-exported: the tests and the bench command
