"""One registry of schedulers by name: ``create_scheduler("greedy")``, ``list_schedulers("oblivious-*")``.

Callers never import a concrete solver: they name it, as timm's ``create_model`` does.
A scheduler is a function ``(problem, **options) -> Schedule`` registered with
``register_scheduler``; the built-in ones are registered below.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

from .baselines import solve_edf, solve_fcfs, solve_oblivious, solve_random
from .dp import DPConfig, dp_preconditions, solve_dp
from .errors import ScheduleError
from .exact import solve_exact
from .greedy import solve_greedy
from .problem import Problem
from .schedule import Schedule

Scheduler = Callable[..., Schedule]
_SCHEDULERS: dict[str, Scheduler] = {}


def register_scheduler(name: str) -> Callable[[Scheduler], Scheduler]:
    """Decorator: register ``fn(problem, **options) -> Schedule`` under ``name`` (names are unique)."""
    def add(fn: Scheduler) -> Scheduler:
        if name in _SCHEDULERS:
            raise ScheduleError(f"scheduler {name!r} is already registered ({_SCHEDULERS[name].__name__}); "
                                "pick another name")
        _SCHEDULERS[name] = fn
        return fn
    return add


def list_schedulers(pattern: str = "*") -> list[str]:
    """Names accepted by ``create_scheduler``, filtered by an fnmatch ``pattern``."""
    return sorted(n for n in _SCHEDULERS if fnmatch.fnmatch(n, pattern))


def create_scheduler(name: str, **options) -> Callable[[Problem], Schedule]:
    """A scheduler by name, with its options bound (e.g. ``create_scheduler("random", seed=3)``).

    Args:
        name: one of ``list_schedulers()``.
        options: keyword arguments of that scheduler (``config=...``, ``seed=...``, ``cap_ms=...``).
    Returns:
        A function Problem -> Schedule.
    """
    if name not in _SCHEDULERS:
        raise ScheduleError(f"scheduler {name!r} unknown; choose one of {list_schedulers()}")
    fn = _SCHEDULERS[name]

    def run(problem: Problem) -> Schedule:
        return fn(problem, **options)

    run.__name__ = f"schedule_{name.replace('-', '_')}"
    return run


@register_scheduler("auto")
def solve_auto(problem: Problem, cap_ms: float | None = 8.0) -> Schedule:
    """What a coordinator should call per decision window: the capped DP where it is exact, else the greedy.

    Args:
        problem: the instance.
        cap_ms: the DP's decision-time cap (None: uncapped).
    Returns:
        The DP's schedule ("dp" or "greedy-fallback"), or the greedy's where the DP's case does not hold.
    """
    if not dp_preconditions(problem):
        return solve_dp(problem, DPConfig(cap_ms=cap_ms))
    return solve_greedy(problem)


register_scheduler("dp")(solve_dp)
register_scheduler("greedy")(solve_greedy)
register_scheduler("exact")(solve_exact)
register_scheduler("fcfs")(solve_fcfs)
register_scheduler("edf")(solve_edf)
register_scheduler("random")(solve_random)


@register_scheduler("oblivious-greedy")
def _oblivious_greedy(problem: Problem) -> Schedule:
    """The greedy on sharing-oblivious costs (every switch reloads the whole model)."""
    return solve_oblivious(problem, "greedy")


@register_scheduler("oblivious-dp")
def _oblivious_dp(problem: Problem, config: DPConfig | None = None) -> Schedule:
    """The DP on sharing-oblivious costs (uncapped unless ``config`` says otherwise)."""
    return solve_oblivious(problem, "dp", config)
