"""A scheduler's answer, checked by the evaluator before anyone sees it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import ScheduleError
from .problem import Problem
from .timeline import Timeline, evaluate


@dataclass(frozen=True)
class Schedule:
    """The served requests in service order, their checked timeline, and how good the answer is known to be.

    ``method`` names what produced the order ("greedy", "dp", "exact", ...; the capped DP
    says "greedy-fallback" when its time ran out). ``bound`` is an upper bound on the
    most requests any schedule serves, when the method knows one: equal to ``served``
    for the exact methods, so ``gap`` is 0 exactly when the answer is proven optimal.
    """

    method: str
    order: tuple[int, ...]  # indices into problem.requests
    timeline: Timeline
    bound: int | None = None  # upper bound on the optimum (None: not known)

    @property
    def served(self) -> int:
        return len(self.order)

    @property
    def gap(self) -> int | None:
        """Requests the optimum may serve beyond this schedule (None when no bound is known)."""
        return None if self.bound is None else self.bound - self.served

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(j.request_id for j in self.timeline.jobs)


def finish(problem: Problem, method: str, order: Sequence[int], bound: int | None = None) -> Schedule:
    """Evaluate an order and refuse to hand out an infeasible one.

    Args:
        problem: the instance.
        method: what produced the order.
        order: request indices in service order.
        bound: an upper bound on the optimum, if known (never below the order's length).
    Returns:
        The schedule.
    Raises:
        ScheduleError: if the order is infeasible (a bug in the method: report the instance).
    """
    tl = evaluate(problem, order)
    if not tl.feasible:
        raise ScheduleError(f"internal error: {method} built an infeasible order {list(order)}: "
                            f"{'; '.join(tl.violations[:3])}. Please report this instance.")
    if bound is not None:
        bound = max(bound, len(order))
    return Schedule(method, tuple(order), tl, bound)
