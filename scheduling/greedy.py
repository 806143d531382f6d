"""Greedy scheduler for arbitrary block sharing: fast, feasible, near-optimal.

Appends one request at a time by a rule (least loading with a stranding look-ahead,
earliest deadline, soonest end), then inserts left-out requests wherever the schedule
stays feasible; see ``solve_greedy``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .builder import Builder, ScalarCandidates, VecBuilder, request_arrays, servable_alone
from .errors import ScheduleError
from .problem import TIME_TOL_S, Compiled, Problem
from .schedule import Schedule, finish
from .timeline import fast_feasible

GREEDY_RULES = ("min_load", "edf", "min_end")


@dataclass(frozen=True)
class GreedyConfig:
    """Options of the greedy scheduler."""

    rules: tuple[str, ...] = ("min_load", "edf")  # construction rules tried (GREEDY_RULES); the best is kept
    lookahead: int = 8  # min_load: among this many cheapest candidates, take one stranding the fewest
    insertion_max_requests: int = 20  # afterwards insert left-out requests anywhere feasible, up to this many
    exchange_max_requests: int = 10  # then ban one served request and rebuild (K rebuilds each), up to this many
    keep_oblivious: bool = True  # also plan sharing-obliviously and keep it if it serves more (never worse)


def _construct(c: Compiled, rule: str, lookahead: int, arrays: dict | None = None, banned: int = -1) -> list[int]:
    """Append one request at a time by ``rule`` until no request fits (never request ``banned``)."""
    if rule not in GREEDY_RULES:
        raise ScheduleError(f"greedy rule {rule!r} unknown; use one of {GREEDY_RULES}")
    a = arrays if arrays is not None else request_arrays(c)
    b = VecBuilder(c, a) if c.policy == "edf" else ScalarCandidates(Builder(c))
    todo = np.array([k for k in range(c.n_requests) if c.fits[c.model_of[k]] and k != banned], dtype=np.int64)
    while todo.size:
        # drop requests whose deadline is out of reach even with nothing to load
        todo = todo[np.maximum(b.e1, a["release"][todo]) + a["infer"][todo] <= a["deadline"][todo] + TIME_TOL_S]
        if not todo.size:
            break
        ends = b.ends(todo)
        ok = np.isfinite(ends)
        if not ok.any():
            break
        cand, cend = todo[ok], ends[ok]
        dl = a["deadline"][cand]
        load = a["switch"][b.m, a["model"][cand]]
        if rule == "edf":
            k = int(cand[np.lexsort((cand, load, dl))[0]])
        elif rule == "min_end":
            k = int(cand[np.lexsort((cand, dl, cend))[0]])
        else:  # min_load, with lookahead
            ranked = cand[np.lexsort((cand, dl, load))]
            k = int(ranked[0])
            if lookahead > 1 and ranked.size > 1:
                lost = b.lost_after(ranked[:lookahead], cand)
                k = int(ranked[int(np.argmin(lost))])  # first of the least-stranding ones
        b.append(k)
        todo = todo[todo != k]
    return b.order


def _insert_left_out(c: Compiled, order: list[int]) -> list[int]:
    """Insert left-out requests (earliest deadline first) at the first position that keeps feasibility.

    Every position is tried, each with a full check: O(K^3) in all, so the greedy only
    runs this pass on small instances (``GreedyConfig.insertion_max_requests``).
    """
    served = set(order)
    left = sorted((k for k in range(c.n_requests) if k not in served and c.fits[c.model_of[k]]),
                  key=lambda k: (c.deadline_s[k], k))
    changed = True
    while changed and left:
        changed = False
        for k in list(left):
            for pos in range(len(order) + 1):
                trial = order[:pos] + [k] + order[pos:]
                if fast_feasible(c, trial):
                    order = trial
                    left.remove(k)
                    changed = True
                    break
    return order


def _exchange(c: Compiled, order: list[int], rule: str, lookahead: int, arrays: dict) -> list[int]:
    """Local search: ban one served request, rebuild by the same rule, re-insert; keep it when it serves more.

    Repairs the construction's typical mistake, one urgent request taken early that
    blocks two or more later ones (the insertion pass alone can only add). Each
    improvement costs up to K constructions, so only on small instances
    (``GreedyConfig.exchange_max_requests``).
    """
    improved = True
    while improved:
        improved = False
        for k in order:
            trial = _insert_left_out(c, _construct(c, rule, lookahead, arrays, banned=k))
            if len(trial) > len(order):
                order, improved = trial, True
                break
    return order


def _better(c: Compiled, a: list[int] | None, b: list[int]) -> bool:
    """Is order b better than a: serves more, then loads fewer bytes."""
    if a is None or len(b) != len(a):
        return a is None or len(b) > len(a)

    def loaded(o: list[int]) -> int:
        prev = -1
        total = 0
        for k in o:
            total += c.switch_bytes[prev][c.model_of[k]]
            prev = c.model_of[k]
        return total

    return loaded(b) < loaded(a)


def greedy_order(c: Compiled, config: GreedyConfig) -> list[int]:
    """The best order over the construction rules, after insertion and (small instances) exchange."""
    best, best_rule = None, config.rules[0] if config.rules else "min_load"
    arrays = request_arrays(c)
    for rule in config.rules:
        order = _construct(c, rule, config.lookahead, arrays)
        if c.n_requests <= config.insertion_max_requests:
            order = _insert_left_out(c, order)
        if _better(c, best, order):
            best, best_rule = order, rule
    if best and c.n_requests <= config.exchange_max_requests:
        best = _exchange(c, best, best_rule, config.lookahead, arrays)
    return best or []


def solve_greedy(problem: Problem, config: GreedyConfig = GreedyConfig()) -> Schedule:
    """Greedy scheduler for arbitrary block sharing.

    Construction (each rule in ``config.rules``): repeatedly append, among the requests
    whose append keeps every deadline and the uplink budget, the one the rule prefers:

    - ``min_load``: the one that adds the least loading (most of its blocks resident),
      ties by earliest deadline. Refinement: among the ``lookahead`` cheapest it takes
      the one whose append leaves the most other requests appendable (the plain rule
      strands an urgent request of another model to keep reusing the resident one);
    - ``edf``: the earliest deadline (wins when the uplink, not loading, is the limit);
    - ``min_end``: the one that finishes soonest.

    Then, on instances of at most ``insertion_max_requests`` requests, each left-out
    request is inserted wherever the schedule stays feasible; on at most
    ``exchange_max_requests``, the best order is improved by exchange (ban one served
    request, rebuild, re-insert; keep it if it serves more). The best order over the
    rules is kept. With ``keep_oblivious`` the same greedy also runs on the
    sharing-oblivious costs; its order stays feasible under the true (never larger)
    costs, gets the same insertion pass, and wins if it serves more. So the greedy never
    serves fewer than the oblivious greedy, by construction.

    Cost per rule: K appends, each checking every candidate (one vectorised pass on the
    EDF link, O(K) each under the static split) plus a (lookahead x K) stranding check.

    Args:
        problem: the instance.
        config: rules and refinements.
    Returns:
        A feasible schedule.
    """
    c = problem.compiled
    order = greedy_order(c, config)
    alone = servable_alone(c)  # a (weak) upper bound on the optimum
    if config.keep_oblivious and len(order) < alone:
        ob = greedy_order(problem.oblivious().compiled, replace(config, keep_oblivious=False))
        if c.n_requests <= config.insertion_max_requests:
            ob = _insert_left_out(c, ob)
        if _better(c, order, ob):
            order = ob
    return finish(problem, "greedy", order, alone)


