"""PartialLoading schedulers: who is served, in which order (pure: no sockets, no clock).

Problem, residency and timeline: ``partial_loading`` (and DESIGN.md, "Scheduling
model"). Every scheduler returns a ``Schedule`` whose order the evaluator has checked;
none ever returns an infeasible one. Randomness only from a ``seed`` argument.

- ``dp``: exact dynamic programme (see ``solve_dp`` for its case, recurrence, cost).
- ``greedy``: for arbitrary sharing (see ``solve_greedy``).
- ``exact``: subset dynamic programme over requests, the test oracle for small K.
- baselines: ``oblivious-greedy`` / ``oblivious-dp`` (plan as if every switch reloads
  the whole model), ``fcfs``, ``edf``, ``random`` (an order, admitting what fits).

Registry: ``list_schedulers()``, ``create_scheduler(name, **options)``.
"""
from __future__ import annotations

import bisect
import math
import random as _random
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from . import bandwidth as bw
from .partial_loading import (TIME_TOL_S, Compiled, Problem, ScheduleError, Timeline, earliest_times, evaluate,
                              latest_starts)

BUDGET_REL_TOL = 1e-9  # uplink budget comparisons


@dataclass(frozen=True)
class Schedule:
    """A scheduler's answer: the served requests in service order, and their checked timeline."""

    method: str
    order: tuple[int, ...]  # indices into problem.requests
    timeline: Timeline

    @property
    def served(self) -> int:
        return len(self.order)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(j.request_id for j in self.timeline.jobs)


def _finish(problem: Problem, method: str, order: Sequence[int]) -> Schedule:
    """Evaluate an order and refuse to hand out an infeasible one."""
    tl = evaluate(problem, order)
    if not tl.feasible:
        raise ScheduleError(f"internal error: {method} built an infeasible order {list(order)}: "
                            f"{'; '.join(tl.violations[:3])}. Please report this instance.")
    return Schedule(method, tuple(order), tl)


# --- feasibility, fast ------------------------------------------------------------------------------------------

def fast_feasible(c: Compiled, order: Sequence[int]) -> bool:
    """Same verdict as ``evaluate(problem, order).feasible``, without building the timeline.

    Args:
        c: compiled problem (``problem.compiled``).
        order: request indices in service order.
    Returns:
        Whether every deadline, the memory budget and the uplink budget hold.
    """
    if not order:
        return True
    if not all(c.fits[c.model_of[k]] for k in order):
        return False
    if c.policy == "edf":
        upload = bw.edf_upload_completions([c.release_s[k] for k in order], [c.input_bytes[k] for k in order],
                                           c.uplink_budget)
        _, _, start = earliest_times(c, order, upload)
        return all(s + c.infer_s[k] <= c.deadline_s[k] + TIME_TOL_S for s, k in zip(start, order))
    _, _, early = earliest_times(c, order, [c.release_s[k] for k in order])
    _, late = latest_starts(c, order)
    if any(e > s + TIME_TOL_S for e, s in zip(early, late)):
        return False
    used = math.fsum(c.uplink_share(k, s - c.release_s[k]) for k, s in zip(order, late))
    return used <= c.uplink_budget * (1 + BUDGET_REL_TOL)


class _Builder:
    """Appends requests to the end of a schedule, checking each append in O(1) (EDF link) or O(n) (static)."""

    __slots__ = ("c", "order", "m", "e1", "e2", "le", "gaps", "rate")

    def __init__(self, c: Compiled) -> None:
        self.c = c
        self.order: list[int] = []
        self.m = -1  # last model; -1 selects the start row of switch_s
        self.e1 = self.e2 = self.le = c.start_s
        self.rate = c.uplink_budget
        self.gaps: list[tuple[float, float]] = [(c.start_s, math.inf)]  # idle time of the shared link

    def copy(self) -> "_Builder":
        b = _Builder.__new__(_Builder)
        b.c, b.order, b.m, b.e1, b.e2, b.le, b.gaps, b.rate = (self.c, list(self.order), self.m, self.e1, self.e2,
                                                               self.le, list(self.gaps), self.rate)
        return b

    def _upload_end(self, k: int) -> float:
        """When k's upload ends as the lowest-priority user of the link's idle time."""
        r = self.c.release_s[k]
        d = self.c.input_bytes[k]
        if d == 0 or math.isinf(self.rate):
            return r
        need = d / self.rate
        for a, b in self.gaps:
            if b <= r:
                continue
            s = max(a, r)
            if b - s >= need:
                return s + need
            need -= b - s
        return math.inf  # unreachable: the last gap is unbounded

    def _consume(self, k: int) -> None:
        r = self.c.release_s[k]
        d = self.c.input_bytes[k]
        if d == 0 or math.isinf(self.rate):
            return
        need = d / self.rate
        out = []
        for a, b in self.gaps:
            if need <= 0 or b <= r:
                out.append((a, b))
                continue
            s = max(a, r)
            if s > a:
                out.append((a, s))
            take = min(need, b - s)
            need -= take
            if s + take < b:
                out.append((s + take, b))
        self.gaps = out

    def try_end(self, k: int) -> float | None:
        """End time of k if appended now, or None when that breaks a constraint."""
        c = self.c
        m = c.model_of[k]
        if not c.fits[m]:
            return None
        if self.order:
            load_start = max(self.le, self.e2) if c.overlap_ok[self.m][m] else self.e1
        else:
            load_start = c.start_s
        s = max(load_start + c.switch_s[self.m][m], self.e1)
        s = max(s, self._upload_end(k) if c.policy == "edf" else c.release_s[k])
        e = s + c.infer_s[k]
        if e > c.deadline_s[k] + TIME_TOL_S:
            return None
        if c.policy == "static" and not fast_feasible(c, self.order + [k]):
            return None
        return e

    def append(self, k: int) -> None:
        c = self.c
        m = c.model_of[k]
        if self.order:
            load_start = max(self.le, self.e2) if c.overlap_ok[self.m][m] else self.e1
        else:
            load_start = c.start_s
        self.le = load_start + c.switch_s[self.m][m]
        s = max(self.le, self.e1)
        if c.policy == "edf":
            s = max(s, self._upload_end(k))
            self._consume(k)
        else:
            s = max(s, c.release_s[k])
        self.e2, self.e1 = self.e1, s + c.infer_s[k]
        self.m = m
        self.order.append(k)

    def dead(self, k: int) -> bool:
        """True when k can never be appended any more (its deadline is out of reach even with no load)."""
        return max(self.e1, self.c.release_s[k]) + self.c.infer_s[k] > self.c.deadline_s[k] + TIME_TOL_S


def _admit_in_order(c: Compiled, order: Sequence[int]) -> list[int]:
    """Walk a priority order and append each request whose append keeps the schedule feasible."""
    b = _Builder(c)
    for k in order:
        if b.try_end(k) is not None:
            b.append(k)
    return b.order


# --- greedy -----------------------------------------------------------------------------------------------------

GREEDY_RULES = ("min_load", "edf", "min_end")


@dataclass(frozen=True)
class GreedyConfig:
    """Options of the greedy scheduler."""

    rules: tuple[str, ...] = ("min_load", "edf")  # construction rules tried (GREEDY_RULES); the best is kept
    lookahead: int = 8  # min_load: among this many cheapest candidates, take one stranding the fewest
    insertion_max_requests: int = 20  # afterwards insert left-out requests anywhere feasible, up to this many
    keep_oblivious: bool = True  # also plan sharing-obliviously and keep it if it serves more (never worse)


class _VecBuilder:
    """``_Builder`` for the EDF link, checking every candidate append at once with numpy."""

    __slots__ = ("c", "a", "order", "m", "e1", "e2", "le", "gaps", "_idle")

    def __init__(self, c: Compiled, arrays: dict) -> None:
        self.c, self.a = c, arrays
        self.order: list[int] = []
        self.m = c.n_models  # the start row of switch
        self.e1 = self.e2 = self.le = c.start_s
        self.gaps = [(c.start_s, math.inf)]
        self._idle = None

    def copy(self) -> "_VecBuilder":
        b = _VecBuilder.__new__(_VecBuilder)
        b.c, b.a, b.order, b.m, b.e1, b.e2, b.le, b.gaps, b._idle = (
            self.c, self.a, list(self.order), self.m, self.e1, self.e2, self.le, self.gaps, self._idle)
        return b

    def _uploads(self, cands: np.ndarray) -> np.ndarray:
        """Upload ends of ``cands``, each as the lowest-priority user of the link's idle time."""
        a = self.a
        rel = a["release"][cands]
        work = a["work"][cands]  # seconds of link time
        if len(self.gaps) == 1:  # the link is idle from gaps[0][0] on
            return np.where(work > 0, np.maximum(rel, self.gaps[0][0]) + work, rel)
        if self._idle is None:
            gs = np.array([g[0] for g in self.gaps])
            ge = np.array([g[1] for g in self.gaps])
            cum = np.concatenate(([0.0], np.cumsum(ge - gs)))  # idle time before each gap; last is inf
            self._idle = (gs, ge, cum)
        gs, ge, cum = self._idle
        i = np.searchsorted(ge, rel, side="right")  # first gap ending after the release
        before = cum[i] + np.maximum(0.0, rel - gs[i])  # idle time up to the release
        target = before + work
        j = np.searchsorted(cum, target, side="left") - 1
        j = np.maximum(j, 0)
        done = gs[j] + (target - cum[j])
        return np.where(work > 0, np.maximum(done, rel), rel)

    def ends(self, cands: np.ndarray) -> np.ndarray:
        """End time of each candidate if appended now (inf where that breaks a constraint)."""
        a, c = self.a, self.c
        mc = a["model"][cands]
        if self.order:
            load_start = np.where(a["overlap"][self.m, mc], max(self.le, self.e2), self.e1)
        else:
            load_start = c.start_s
        s = np.maximum(load_start + a["switch"][self.m, mc], self.e1)
        if a["finite_link"]:
            s = np.maximum(s, self._uploads(cands))
        else:
            s = np.maximum(s, a["release"][cands])
        e = s + a["infer"][cands]
        return np.where((e <= a["deadline"][cands] + TIME_TOL_S) & a["fits"][cands], e, np.inf)

    def lost_after(self, top: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """For each request in ``top``: how many others in ``cand`` could not be appended right after it.

        One (len(top), len(cand)) evaluation when the link's idle time is a single
        interval that every candidate is released into (uploads released together);
        otherwise one append and check per request in ``top``.
        """
        a = self.a
        finite = a["finite_link"]
        gs0 = self.gaps[0][0]
        if len(self.gaps) != 1 or (finite and a["release"][cand].max() > gs0):
            out = []
            for t in top:
                nb = self.copy()
                nb.append(int(t))
                others = cand[cand != t]
                out.append(int(np.count_nonzero(~np.isfinite(nb.ends(others)))))
            return np.array(out)
        mt = a["model"][top]
        if self.order:
            ls_t = np.where(a["overlap"][self.m, mt], max(self.le, self.e2), self.e1)
        else:
            ls_t = np.full(top.shape, self.c.start_s)
        le_t = ls_t + a["switch"][self.m, mt]
        s_t = np.maximum(le_t, self.e1)
        if finite:
            link_t = gs0 + a["work"][top]  # the link is idle from then on, after t's upload
            s_t = np.maximum(s_t, link_t)
        else:
            s_t = np.maximum(s_t, a["release"][top])
        end_t = (s_t + a["infer"][top])[:, None]
        mj = a["model"][cand]
        pair = (mt[:, None], mj[None, :])
        load_start = np.where(a["overlap"][pair], np.maximum(le_t, self.e1)[:, None], end_t)
        s = np.maximum(load_start + a["switch"][pair], end_t)
        if finite:
            s = np.maximum(s, link_t[:, None] + a["work"][cand][None, :])
        else:
            s = np.maximum(s, a["release"][cand][None, :])
        bad = s + a["infer"][cand][None, :] > a["deadline"][cand][None, :] + TIME_TOL_S
        bad &= top[:, None] != cand[None, :]
        return bad.sum(axis=1)

    def append(self, k: int) -> None:
        c = self.c
        m = c.model_of[k]
        if self.order:
            load_start = max(self.le, self.e2) if c.overlap_ok[self.m][m] else self.e1
        else:
            load_start = c.start_s
        self.le = load_start + c.switch_s[self.m if self.order else -1][m]
        s = max(self.le, self.e1)
        if self.a["finite_link"]:
            s = max(s, float(self._uploads(np.array([k]))[0]))
            sb = _Builder(c)
            sb.gaps = self.gaps
            sb._consume(k)
            self.gaps = sb.gaps
            self._idle = None
        else:
            s = max(s, c.release_s[k])
        self.e2, self.e1 = self.e1, s + c.infer_s[k]
        self.m = m
        self.order.append(k)


class _ScalarCandidates:
    """The ``_VecBuilder`` interface over ``_Builder`` (static split: each check is O(n))."""

    __slots__ = ("b",)

    def __init__(self, b: _Builder) -> None:
        self.b = b

    @property
    def order(self) -> list[int]:
        return self.b.order

    @property
    def m(self) -> int:
        return self.b.m if self.b.order else self.b.c.n_models

    @property
    def e1(self) -> float:
        return self.b.e1

    def copy(self) -> "_ScalarCandidates":
        return _ScalarCandidates(self.b.copy())

    def ends(self, cands: np.ndarray) -> np.ndarray:
        out = [self.b.try_end(int(k)) for k in cands]
        return np.array([math.inf if e is None else e for e in out])

    def append(self, k: int) -> None:
        self.b.append(k)

    def lost_after(self, top: np.ndarray, cand: np.ndarray) -> np.ndarray:
        out = []
        for t in top:
            nb = self.copy()
            nb.append(int(t))
            out.append(int(np.count_nonzero(~np.isfinite(nb.ends(cand[cand != t])))))
        return np.array(out)


def _arrays(c: Compiled) -> dict:
    """Per-request and per-model numpy arrays for the vectorised builder."""
    switch = np.array(c.switch_s)  # (F+1, F); row F is the start
    overlap = np.zeros((c.n_models + 1, c.n_models), dtype=bool)
    overlap[:c.n_models] = np.array(c.overlap_ok, dtype=bool).reshape(c.n_models, c.n_models)
    rate = c.uplink_budget
    return {
        "model": np.array(c.model_of, dtype=np.int64),
        "infer": np.array(c.infer_s),
        "fits": np.array([c.fits[m] for m in c.model_of], dtype=bool),
        "deadline": np.array(c.deadline_s),
        "release": np.array(c.release_s),
        "work": np.array(c.input_bytes, dtype=float) / rate if c.policy == "edf" else None,
        "switch": switch,
        "overlap": overlap,
        "finite_link": c.policy == "edf" and not math.isinf(rate),
    }


def _construct(c: Compiled, rule: str, lookahead: int, arrays: dict | None = None) -> list[int]:
    """Append one request at a time by ``rule`` until no request fits."""
    if rule not in GREEDY_RULES:
        raise ScheduleError(f"greedy rule {rule!r} unknown; use one of {GREEDY_RULES}")
    a = arrays if arrays is not None else _arrays(c)
    b = _VecBuilder(c, a) if c.policy == "edf" else _ScalarCandidates(_Builder(c))
    todo = np.array([k for k in range(c.n_requests) if c.fits[c.model_of[k]]], dtype=np.int64)
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


def _greedy_order(c: Compiled, config: GreedyConfig) -> list[int]:
    best = None
    arrays = _arrays(c)
    for rule in config.rules:
        order = _construct(c, rule, config.lookahead, arrays)
        if c.n_requests <= config.insertion_max_requests:
            order = _insert_left_out(c, order)
        if _better(c, best, order):
            best = order
    return best or []


def _servable_alone(c: Compiled) -> int:
    """How many requests could each be served if they were the only one: an upper bound on any schedule."""
    b = _Builder(c)
    return sum(1 for k in range(c.n_requests) if b.try_end(k) is not None)


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
    request is inserted wherever the schedule stays feasible. The best order over the
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
    order = _greedy_order(c, config)
    if config.keep_oblivious and len(order) < _servable_alone(c):
        ob = _greedy_order(problem.oblivious().compiled, replace(config, keep_oblivious=False))
        if c.n_requests <= config.insertion_max_requests:
            ob = _insert_left_out(c, ob)
        if _better(c, order, ob):
            order = ob
    return _finish(problem, "greedy", order)


# --- baselines --------------------------------------------------------------------------------------------------

def solve_fcfs(problem: Problem) -> Schedule:
    """First come, first served: by arrival, admitting each request that still fits."""
    c = problem.compiled
    order = sorted(range(c.n_requests), key=lambda k: (problem.requests[k].arrival_s, k))
    return _finish(problem, "fcfs", _admit_in_order(c, order))


def solve_edf(problem: Problem) -> Schedule:
    """Earliest deadline first, admitting each request that still fits (blind to loading)."""
    c = problem.compiled
    order = sorted(range(c.n_requests), key=lambda k: (c.deadline_s[k], k))
    return _finish(problem, "edf", _admit_in_order(c, order))


def solve_random(problem: Problem, seed: int = 0) -> Schedule:
    """A random order (from ``seed``), admitting each request that still fits."""
    c = problem.compiled
    order = list(range(c.n_requests))
    _random.Random(seed).shuffle(order)
    return _finish(problem, "random", _admit_in_order(c, order))


def solve_oblivious(problem: Problem, planner: str = "greedy", dp_config: "DPConfig | None" = None) -> Schedule:
    """Sharing-oblivious baseline: plan as if every switch reloaded the whole model.

    The planner (``"greedy"`` without its oblivious fallback, or ``"dp"`` with
    ``dp_config``) runs on ``problem.oblivious()``; the order it picks is then timed under
    the true costs, which are never larger, so it stays feasible.
    """
    ob = problem.oblivious()
    if planner == "greedy":
        order = _greedy_order(ob.compiled, GreedyConfig(keep_oblivious=False))
    elif planner == "dp":
        order = list(solve_dp(ob, dp_config or DPConfig()).order)
    else:
        raise ScheduleError(f"oblivious planner {planner!r} unknown; use 'greedy' or 'dp'")
    return _finish(problem, f"oblivious-{planner}", order)


# --- exact solver (test oracle) ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExactConfig:
    """Options of the exact solver."""

    max_requests: int = 14  # it enumerates subsets: 2^K states; refuse larger instances


def _pareto_insert(labels: list[tuple], new: tuple) -> None:
    """Keep ``labels`` a Pareto front: entries (a, b, ...) with both a and b to be minimised."""
    a, b = new[0], new[1]
    for old in labels:
        if old[0] <= a and old[1] <= b:
            return
    labels[:] = [old for old in labels if not (a <= old[0] and b <= old[1])]
    labels.append(new)


def _exact_forward(c: Compiled) -> list[int]:
    """Subset DP in service order (EDF link, with or without overlap, any arrivals).

    State: (set S of served requests, model of the last one). Label: (end of the last
    job, time the loader may start the next load). The future depends on nothing else:
    remaining requests and the link's idle time are functions of S (a work-conserving
    link's busy periods do not depend on the priority order, and a later job has lower
    priority than all of S), residency is the last model, and every later time is a
    non-decreasing function of the two label values. So Pareto-minimal labels suffice.
    """
    K = c.n_requests
    t0 = c.start_s
    use_loader = any(any(row) for row in c.overlap_ok)
    gaps_of: dict[int, list[tuple[float, float]]] = {0: [(t0, math.inf)]}
    layer: dict[tuple[int, int], list[tuple]] = {(0, -1): [(t0, t0, -1, None)]}
    best = None
    while layer:
        nxt: dict[tuple[int, int], list[tuple]] = {}
        for (mask, m), labels in layer.items():
            best = labels[0]  # layers grow by one request: the last non-empty layer is optimal
            link = _Builder(c)
            link.gaps = gaps_of[mask]
            for k in range(K):
                if mask >> k & 1 or not c.fits[c.model_of[k]]:
                    continue
                f = c.model_of[k]
                u = link._upload_end(k) if c.policy == "edf" else c.release_s[k]
                load = c.switch_s[m][f]
                ovl = m >= 0 and c.overlap_ok[m][f]
                key = (mask | 1 << k, f)
                for lab in labels:
                    e, lf = lab[0], lab[1]
                    le = (lf if ovl else e) + load
                    end = max(le, e, u) + c.infer_s[k]
                    if end > c.deadline_s[k] + TIME_TOL_S:
                        continue
                    new = (end, max(le, e) if use_loader else 0.0, k, lab)
                    bucket = nxt.setdefault(key, [])
                    _pareto_insert(bucket, new)
                if key in nxt and key[0] not in gaps_of:
                    nb = link.copy()
                    nb._consume(k)
                    gaps_of[key[0]] = nb.gaps
        layer = nxt
    order = []
    lab = best
    while lab is not None and lab[2] >= 0:
        order.append(lab[2])
        lab = lab[3]
    return order[::-1]


def _exact_backward(c: Compiled) -> list[int]:
    """Subset DP against service order for the static split (no overlap).

    State: (set S of the last |S| served requests, model of the first of them). Label:
    (latest start of that first job, uplink share the suffix uses). A prefix only sees
    the suffix through its latest start (later is better for deadlines and for the
    prefix's own shares) and its share total (smaller is better).
    """
    K = c.n_requests
    t0 = c.start_s
    budget = c.uplink_budget * (1 + BUDGET_REL_TOL)
    layer: dict[tuple[int, int], list[tuple]] = {}
    for k in range(K):
        f = c.model_of[k]
        if not c.fits[f]:
            continue
        s = c.deadline_s[k] - c.infer_s[k]
        w = c.uplink_share(k, s - c.release_s[k])
        if s >= c.release_s[k] - TIME_TOL_S and w <= budget:
            _pareto_insert(layer.setdefault((1 << k, f), []), (-s, w, k, None))
    best = None
    while layer:
        nxt: dict[tuple[int, int], list[tuple]] = {}
        for (mask, f), labels in layer.items():
            for lab in labels:
                if -lab[0] >= t0 + c.switch_s[-1][f] - TIME_TOL_S:
                    best = lab
                    break
            for j in range(K):
                if mask >> j & 1 or not c.fits[c.model_of[j]]:
                    continue
                g = c.model_of[j]
                load = c.switch_s[g][f]
                for lab in labels:
                    s = min(c.deadline_s[j], -lab[0] - load) - c.infer_s[j]
                    if s < c.release_s[j] - TIME_TOL_S:
                        continue
                    w = lab[1] + c.uplink_share(j, s - c.release_s[j])
                    if w > budget:
                        continue
                    _pareto_insert(nxt.setdefault((mask | 1 << j, g), []), (-s, w, j, lab))
        layer = nxt
    order = []
    lab = best
    while lab is not None:
        order.append(lab[2])
        lab = lab[3]
    return order


def solve_exact(problem: Problem, config: ExactConfig = ExactConfig()) -> Schedule:
    """Optimal schedule for small instances, by dynamic programming over subsets of requests.

    Makes no assumption about sharing, request sizes or arrivals. With the EDF link it
    runs in service order (any overlap setting); with the static split it runs backwards
    from the last job (overlap not supported). Cost O(2^K * K * F * P), P the Pareto
    front size. Used as the oracle that the DP and the greedy are tested against.

    Args:
        problem: the instance, at most ``config.max_requests`` requests.
        config: size limit.
    Returns:
        A schedule serving the most requests possible.
    """
    c = problem.compiled
    if c.n_requests > config.max_requests:
        raise ScheduleError(f"exact solver: {c.n_requests} requests exceed max_requests={config.max_requests} "
                            "(it enumerates 2^K subsets); use solve_dp or solve_greedy")
    if c.policy == "edf":
        order = _exact_forward(c)
    elif any(any(row) for row in c.overlap_ok):
        raise ScheduleError("exact solver: the static split with overlapping loads is not supported; "
                            "set server.overlap_load=False or use the 'edf' uplink policy")
    else:
        order = _exact_backward(c)
    return _finish(problem, "exact", order)


# --- dynamic programme ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DPConfig:
    """Options of the dynamic programme."""

    max_states: int = 20_000_000  # refuse when prod_f (n_f + 1) * F exceeds this (memory and time)
    incumbent: bool = True  # start from the greedy's count and prune states that cannot beat it
    max_visits: int | None = None  # depth-first search: give up (ScheduleError) after this many states


def dp_preconditions(problem: Problem) -> list[str]:
    """Why the DP would not be exact on ``problem`` (empty list: it is exact).

    Args:
        problem: the instance.
    Returns:
        Human-readable reasons, one per violated condition.
    """
    c = problem.compiled
    reasons = []
    if any(any(row) for row in c.overlap_ok):
        reasons.append("loading may overlap inference (server.overlap_load with models that fit together)")
    late = [problem.requests[k].request_id for k in range(c.n_requests) if c.release_s[k] != c.start_s]
    if late:
        reasons.append(f"requests {late[:3]} arrive after the planning time, so uploads are released at "
                       "different times")
    sig: dict[int, tuple] = {}
    for k in range(c.n_requests):
        f = c.model_of[k]
        key = (c.input_bytes[k], c.infer_s[k], c.link_gain_hz[k] if c.rate_model == "shannon" else None)
        if sig.setdefault(f, key) != key:
            reasons.append(f"requests for model {c.model_names[f]} differ in input size, inference time or "
                           "link gain")
    return reasons


def dp_state_count(problem: Problem) -> int:
    """Number of DP states, prod_f (n_f + 1) * F: what bounds the DP's time and memory.

    Args:
        problem: the instance.
    Returns:
        The state count (requests of models that do not fit memory are left out).
    """
    c = problem.compiled
    counts = [0] * c.n_models
    for k in range(c.n_requests):
        if c.fits[c.model_of[k]]:
            counts[c.model_of[k]] += 1
    return math.prod(n + 1 for n in counts) * max(1, c.n_models)


def solve_dp(problem: Problem, config: DPConfig = DPConfig()) -> Schedule:
    """Exact dynamic programme: the most requests served, for the case defined below.

    **Case.** Residency as in ``partial_loading`` (memory holds the current model; a
    switch a -> b loads J_b \\ J_a), so the loading time depends only on consecutive
    models: L(a -> b) = S(J_b \\ J_a) / v, and L(start -> b) = S(J_b \\ R0) / v. The DP
    is exact when, in addition,
    (i) loading does not overlap inference;
    (ii) all uploads are released at the planning time t0 (arrival <= t0);
    (iii) requests for one model differ only in their deadlines (same D, tau and, for the
          Shannon model, link gain): one model, one input format, one inference time;
    and the uplink is the EDF link (B may be inf) or the static split (linear or Shannon).
    Sharing can be arbitrary. The **backbone-sharing** case of the paper, clusters whose
    models share a bottom backbone and add private blocks (see ``backbone_structure``),
    is the one where L takes the cluster form 0 / private(b) / backbone(b) + private(b);
    the DP needs no more than the matrix L (the pruning bound below uses the cluster
    form when it is there). ``dp_preconditions`` lists what fails. Requests whose model
    does not fit the memory budget are never served.

    **Dominance lemma.** Under (iii), if s_f requests of model f are served they can be
    the s_f latest-deadline ones, in deadline order: the slots model f occupies are
    fixed by the model sequence alone, and the sorted latest s_f deadlines dominate any
    other s_f deadlines position by position. Requests of one model need *not* be
    contiguous (loads of 5 s, inference 1 s: A(d=6) B(d=12) A(d=100) serves all three,
    AAB and BAA two), so the DP keeps every interleaving. Count-only states are exact here only because requests
    of a model are interchangeable; with unequal tau or D they are not, hence (iii).

    **Recurrence** (built backwards, from the last job). Sort model f's requests by
    deadline, d_f[1] <= ... <= d_f[n_f]. A state (r, g) is a suffix of the schedule
    serving the r_f latest-deadline requests of each model f, whose first job is of
    model g. Its labels are Pareto-optimal pairs (S, X): S the latest start of its first
    job, X the uplink slack (EDF: the most bytes all jobs before it may upload,
    P = min over suffix jobs n of B (S_n - t0) - bytes up to n; static: the share total
    W, to minimise). Prepending model f:

        S' = min(d_f[n_f - r_f], S - L(f -> g)) - tau_f        (S = inf for the empty suffix)
        P' = min(P, B (S' - t0)) - D_f        or        W' = W + share_f(S' - t0)

    alive iff S' >= t0 and P' >= 0 (W' <= B). A state is a whole schedule iff
    S >= t0 + L(start -> g). Answer: the largest sum(r) over whole schedules. Times
    only grow forward, so latest starts are exact (no release times other than t0),
    and a feasible order's latest timeline is feasible; the EDF slack is exact because
    with common release t0 the n-th upload ends at t0 + (bytes of jobs 1..n) / B.

    **Cost.** O(F * prod_f (n_f + 1)) states, F transitions each, times the Pareto
    size squared (1 when the uplink is unconstrained): polynomial in K for a fixed
    number of models F, exponential in F (with F part of the input the problem is
    NP-hard, as the paper says). 50 requests over 6 models is up to ~9^6 * 6 states.

    **Evaluation.** Without ``config.incumbent`` every state is evaluated layer by layer
    (number of requests served), exactly as written above. With it (default) the
    greedy's schedule is the incumbent, and a state whose relaxation bound
    (``_PrefixBound``) cannot beat the best schedule found so far is not expanded. The
    recurrence is first explored depth-first for up to ``DFS_VISITS`` states (dominated
    labels dropped, stop as soon as a schedule serves every request that could be served
    alone): fast when the greedy is at or near the optimum. If that budget runs out, the
    layered evaluation runs with the pruning, so the worst case stays one pass over the
    state space. ``config.max_visits`` caps the states expanded in all.

    Args:
        problem: the instance; must satisfy ``dp_preconditions``.
        config: state-space limit.
    Returns:
        An optimal schedule.
    Raises:
        ScheduleError: when a precondition fails or the state space exceeds the limit.
    """
    reasons = dp_preconditions(problem)
    if reasons:
        raise ScheduleError("the DP is exact only when loading does not overlap inference, uploads start "
                            "together and requests of a model are interchangeable; here: "
                            + "; ".join(reasons) + ". Use solve_greedy (or create_scheduler('auto')).")
    states = dp_state_count(problem)
    if states > config.max_states:
        raise ScheduleError(f"DP state space {states} exceeds max_states={config.max_states}; fewer models "
                            "per decision or solve_greedy")
    c = problem.compiled
    incumbent = list(solve_greedy(problem).order) if config.incumbent else None
    order = _dp_order(c, len(incumbent) if incumbent is not None else None, config.max_visits)
    if order is None:  # nothing beats the incumbent, so it is optimal
        order = incumbent
    return _finish(problem, "dp", order)


class _PrefixBound:
    """Upper bound on how many more requests fit before a suffix state (for pruning the DP).

    The requests left for the prefix are each model's earliest-deadline ones. Drop those
    that cannot end by their deadline even alone (first load from R0, then inference).
    The rest must fit in [t0, S] together with their loads, all without overlap:

    - backbone case: everything the prefix and the suffix's first model g use must be
      loaded after t0 (only R0 is resident then), so the loads cover g's blocks, the
      backbone of every cluster used and the private blocks of every model used. The
      bound tries each set of clusters (their backbones paid in full) and, inside it, the
      LP relaxation of the private loads (spread over each model's jobs), filling the
      cheapest jobs first;
    - otherwise: each model used costs at least its cheapest switch-in, same LP.

    On the EDF link the prefix's uploads must also fit in the slack P: fill the smallest
    inputs first. All are relaxations, so the bound never cuts an optimal schedule.
    """

    def __init__(self, c: Compiled, active, n, stride, dl, tau, size) -> None:
        F = c.n_models
        self.t0 = c.start_s
        self.active, self.n, self.stride, self.tau, self.size = active, n, stride, tau, size
        self.first = c.switch_s[-1]  # loading each model from R0
        self.thr = [bisect.bisect_left(dl[f], self.t0 + self.first[f] + tau[f] - TIME_TOL_S) for f in range(F)]
        self.lmin = [min(c.switch_s[h][f] for h in range(F + 1) if h != f) for f in range(F)]
        self.clusters = c.clusters
        self.by_size = sorted(active, key=lambda f: size[f])

    def extra(self, ridx: int, g: int, latest_start: float, byte_slack: float | None) -> int:
        """Bound on the requests a prefix can add in front of state (ridx, g) with latest start S."""
        horizon = latest_start - self.t0 + TIME_TOL_S
        avail = {}
        for f in self.active:
            a = self.n[f] - ridx // self.stride[f] % (self.n[f] + 1) - self.thr[f]
            if a > 0 and self.first[f] + self.tau[f] <= horizon:
                avail[f] = a
        bound = self._capacity(avail, horizon, g)
        if byte_slack is not None:
            bound = min(bound, self._by_bytes(avail, byte_slack))
        return bound

    def _capacity(self, avail: dict[int, int], horizon: float, g: int) -> int:
        """Most of the ``avail`` jobs that fit in ``horizon`` with their loads and g's."""
        if horizon < 0:
            return 0
        if self.clusters is None:
            return self._fill(sorted((self.tau[f] + self.lmin[f] / a, a, 0) for f, a in avail.items()), horizon,
                              None)
        cluster_of, backbone_s, private_s = self.clusters
        home = cluster_of[g]
        horizon -= backbone_s[home] + private_s[g]  # g itself must be in memory by S
        if horizon < 0:
            return 0
        others = sorted({cluster_of[f] for f in avail} - {home})
        items = sorted((self.tau[f] + (0.0 if f == g else private_s[f] / a), a, cluster_of[f])
                       for f, a in avail.items())
        bound = 0
        for pick in range(1 << len(others)):
            cap = horizon
            allowed = 1 << home
            for i, cl in enumerate(others):
                if pick >> i & 1:
                    cap -= backbone_s[cl]
                    allowed |= 1 << cl
            if cap >= 0:
                bound = max(bound, self._fill(items, cap, allowed))
        return bound

    def _by_bytes(self, avail: dict[int, int], byte_slack: float) -> int:
        """Most of the ``avail`` jobs whose inputs fit in ``byte_slack``, smallest first."""
        count = 0
        for f in self.by_size:
            a = avail.get(f, 0)
            if not a:
                continue
            if self.size[f] <= 0:
                count += a
                continue
            take = min(a, int(byte_slack / self.size[f] + 1e-9))
            count += take
            byte_slack -= take * self.size[f]
            if take < a:
                break
        return count

    @staticmethod
    def _fill(items: list[tuple[float, int, int]], cap: float, allowed: int | None) -> int:
        """Most jobs (fractional, then floored) of the allowed groups (bit mask; None: all) fitting in ``cap``."""
        total = 0.0
        for cost, a, group in items:
            if allowed is not None and not allowed >> group & 1:
                continue
            take = a if cost <= 0 else min(a, cap / cost)
            total += take
            cap -= take * cost
            if take < a:
                break
        return int(total + 1e-9)


_MAX_DEPTH = 800  # depth-first evaluation recurses once per request served; beyond this, layer by layer
DFS_VISITS = 50_000  # depth-first first (fast when the greedy is near optimal), then layer by layer


def _dp_order(c: Compiled, incumbent: int | None, max_visits: int | None = None) -> list[int] | None:
    """Service order of an optimal schedule, or None when none serves more than ``incumbent``."""
    F = c.n_models
    t0 = c.start_s
    reqs = [[] for _ in range(F)]
    for k in range(c.n_requests):
        if c.fits[c.model_of[k]]:
            reqs[c.model_of[k]].append(k)
    for f in range(F):
        reqs[f].sort(key=lambda k: (c.deadline_s[k], k))
    n = [len(r) for r in reqs]
    dl = [[c.deadline_s[k] for k in r] for r in reqs]
    tau = [c.infer_s[r[0]] if r else 0.0 for r in reqs]
    size = [c.input_bytes[r[0]] if r else 0 for r in reqs]
    rep = [r[0] if r else -1 for r in reqs]
    stride = [1] * F
    for f in range(1, F):
        stride[f] = stride[f - 1] * (n[f - 1] + 1)
    edf = c.policy == "edf"
    rate = c.uplink_budget
    unlimited = edf and math.isinf(rate)
    budget = rate * (1 + BUDGET_REL_TOL)
    load0 = c.switch_s[-1]
    active = [f for f in range(F) if n[f]]

    def aux_of(f: int, s: float, prev: float | None) -> float | None:
        """Uplink slack of a suffix whose first job (model f) starts at latest s; None if dead."""
        if unlimited:
            return 0.0
        if edf:
            p = rate * (s - t0) - size[f]
            if prev is not None:
                p = min(p, -prev - size[f])  # labels store -P so that both entries are minimised
            return None if p < -TIME_TOL_S * rate else -p
        w = c.uplink_share(rep[f], s - t0) + (prev or 0.0)
        return None if w > budget else w

    limit = math.inf if max_visits is None else max_visits
    byte_slack = edf and not unlimited
    bound = _PrefixBound(c, active, n, stride, dl, tau, size) if incumbent is not None else None
    models = None
    if bound is not None and c.n_requests < _MAX_DEPTH:
        finished, models, incumbent = _dp_search(F, active, n, stride, dl, tau, c.switch_s, load0, t0, aux_of,
                                                 bound, incumbent, byte_slack, _servable_alone(c),
                                                 min(DFS_VISITS, limit))
        limit -= DFS_VISITS
        if finished:
            return None if models is None else _assign(models, reqs, n, F)
    if limit <= 0:
        raise ScheduleError(f"DP search gave up after max_visits={max_visits} states (best so far serves "
                            f"{incumbent}); raise DPConfig.max_visits or use solve_greedy")
    if unlimited:
        better = _dp_scalar(F, active, n, stride, dl, tau, c.switch_s, load0, t0, bound, incumbent, limit)
    else:
        better = _dp_pareto(F, active, n, stride, dl, tau, c.switch_s, load0, t0, aux_of, bound, incumbent,
                            byte_slack, limit)
    models = better if better is not None else models
    return None if models is None else _assign(models, reqs, n, F)


def _assign(models: list[int], reqs: list[list[int]], n: list[int], F: int) -> list[int]:
    """Turn a model sequence into requests: each model's latest-deadline ones, in deadline order."""
    total = [models.count(f) for f in range(F)]
    seen = [0] * F
    order = []
    for f in models:
        order.append(reqs[f][n[f] - total[f] + seen[f]])
        seen[f] += 1
    return order


def _dp_search(F, active, n, stride, dl, tau, switch, load0, t0, aux_of, bound, incumbent, byte_slack, target,
               max_visits) -> tuple[bool, list[int] | None, int]:
    """The DP's recurrence evaluated depth-first, with dominance memo and bound pruning.

    Same states and labels as the layered evaluation; a label is expanded only if no label
    of its state seen before dominates it, and a state is cut when even ``bound`` cannot
    lift it above the best count found so far (the greedy's at the start). Pruning only
    removes states that cannot beat a schedule already in hand, so the result stays
    optimal; it stops at once when a schedule reaches ``target`` (requests servable at
    all). Recursion depth is the number of requests served. Returns (finished within
    ``max_visits``, best model sequence found or None, its count).
    """
    memo: dict[int, list[tuple[float, float]]] = {}
    best: list = [incumbent, None]
    path: list[int] = []
    visits = [0]

    def admit(key: int, s: float, x: float) -> bool:
        labels = memo.get(key)
        if labels is None:
            memo[key] = [(-s, x)]
            return True
        for a, b in labels:
            if a <= -s and b <= x:
                return False
        labels[:] = [lab for lab in labels if not (-s <= lab[0] and x <= lab[1])]
        labels.append((-s, x))
        return True

    def visit(ridx: int, g: int, start: float, x: float, served: int) -> bool:
        """Explore the prefixes of one suffix label; True once a schedule reaches ``target``."""
        visits[0] += 1
        if visits[0] > max_visits:
            raise _OutOfVisits
        if served > best[0] and start >= t0 + load0[g] - TIME_TOL_S:
            best[0], best[1] = served, list(path)
            if served >= target:
                return True
        if served + bound.extra(ridx, g, start, -x if byte_slack else None) <= best[0]:
            return False
        options = []
        for f in active:
            rf = ridx // stride[f] % (n[f] + 1)
            if rf == n[f]:
                continue
            s = min(dl[f][n[f] - rf - 1], start - switch[f][g]) - tau[f]
            if s < t0 - TIME_TOL_S:
                continue
            nx = aux_of(f, s, x)
            if nx is not None:
                options.append((f != g, -s, f, s, nx))  # same model first (no load), then latest start
        options.sort()
        for _, _, f, s, nx in options:
            nidx = ridx + stride[f]
            if admit(nidx * F + f, s, nx):
                path.append(f)
                done = visit(nidx, f, s, nx, served + 1)
                path.pop()
                if done:
                    return True
        return False

    roots = []
    for f in active:
        s = dl[f][-1] - tau[f]
        x = aux_of(f, s, None)
        if s >= t0 - TIME_TOL_S and x is not None:
            roots.append((-s, f, x))
    finished = True
    try:
        for neg_s, f, x in sorted(roots):
            if admit(stride[f] * F + f, -neg_s, x):
                path.append(f)
                done = visit(stride[f], f, -neg_s, x, 1)
                path.pop()
                if done:
                    break
    except _OutOfVisits:
        finished = False
    return finished, None if best[1] is None else best[1][::-1], best[0]


class _OutOfVisits(Exception):
    """Unwinds the depth-first search when it has used its visit budget (never leaves this module)."""


def _dp_scalar(F, active, n, stride, dl, tau, switch, load0, t0, bound=None, incumbent=None, limit=math.inf
               ) -> list[int] | None:
    """The DP's recurrence when the uplink never binds: one number (latest start) per state.

    With ``bound`` and ``incumbent``, states that cannot beat the incumbent are not
    expanded and None means nothing beats it.
    """
    rdl = [dl[f][::-1] for f in range(F)]  # rdl[f][r] = deadline of the (r+1)-th latest
    parent: dict[int, int] = {}
    layer: dict[int, float] = {}
    for f in active:
        s = rdl[f][0] - tau[f]
        if s >= t0 - TIME_TOL_S:
            layer[stride[f] * F + f] = s
            parent[stride[f] * F + f] = -1
    best = -1
    steps = [(f, stride[f], n[f] + 1, n[f], rdl[f], tau[f], stride[f] * F) for f in active]
    served, expanded = 1, 0
    floor = -1 if incumbent is None else incumbent
    while layer:
        nxt: dict[int, float] = {}
        for key, start in layer.items():
            ridx, g = divmod(key, F)
            if served > floor and start >= t0 + load0[g] - TIME_TOL_S:
                best, floor = key, served
            if bound is not None and served + bound.extra(ridx, g, start, None) <= floor:
                continue
            expanded += 1
            if expanded > limit:
                raise ScheduleError(f"DP search gave up after its visit limit (best so far serves {floor}); "
                                    "raise DPConfig.max_visits or use solve_greedy")
            base = key - g
            for f, st, radix, nf, rd, tf, jump in steps:
                rf = ridx // st % radix
                if rf == nf:
                    continue
                late = start - switch[f][g]
                d = rd[rf]
                s = (d if d < late else late) - tf
                if s < t0 - TIME_TOL_S:
                    continue
                nkey = base + jump + f
                old = nxt.get(nkey)
                if old is None or s > old:
                    nxt[nkey] = s
                    parent[nkey] = key
        layer = nxt
        served += 1
    if best < 0:
        return None if incumbent is not None else []
    models = []
    while best >= 0:
        models.append(best % F)
        best = parent[best]
    return models


def _dp_pareto(F, active, n, stride, dl, tau, switch, load0, t0, aux_of, bound=None, incumbent=None,
               byte_slack=False, limit=math.inf) -> list[int] | None:
    """The DP's recurrence with a finite uplink: Pareto labels (latest start, uplink slack) per state.

    Pruning as in ``_dp_scalar``.
    """
    # labels: (-S, X, model, parent); both entries minimised; X = -P (EDF) or W (static)
    layer: dict[int, list[tuple]] = {}
    for f in active:
        s = dl[f][-1] - tau[f]
        x = aux_of(f, s, None)
        if s >= t0 - TIME_TOL_S and x is not None:
            layer[stride[f] * F + f] = [(-s, x, f, None)]
    best = None
    served, expanded = 1, 0
    floor = -1 if incumbent is None else incumbent
    while layer:
        nxt: dict[int, list[tuple]] = {}
        for key, labels in layer.items():
            ridx, g = divmod(key, F)
            if served > floor:
                for lab in labels:
                    if -lab[0] >= t0 + load0[g] - TIME_TOL_S:
                        best, floor = lab, served
                        break
            if bound is not None:
                slack = -min(lab[1] for lab in labels) if byte_slack else None
                if served + bound.extra(ridx, g, -min(lab[0] for lab in labels), slack) <= floor:
                    continue
            expanded += 1
            if expanded > limit:
                raise ScheduleError(f"DP search gave up after its visit limit (best so far serves {floor}); "
                                    "raise DPConfig.max_visits or use solve_greedy")
            for f in active:
                rf = ridx // stride[f] % (n[f] + 1)
                if rf == n[f]:
                    continue
                d = dl[f][n[f] - rf - 1]
                load = switch[f][g]
                nkey = (ridx + stride[f]) * F + f
                for lab in labels:
                    s = min(d, -lab[0] - load) - tau[f]
                    if s < t0 - TIME_TOL_S:
                        continue
                    x = aux_of(f, s, lab[1])
                    if x is None:
                        continue
                    bucket = nxt.get(nkey)
                    if bucket is None:
                        nxt[nkey] = [(-s, x, f, lab)]
                    else:
                        _pareto_insert(bucket, (-s, x, f, lab))
        layer = nxt
        served += 1
    if best is None and incumbent is not None:
        return None
    models = []
    lab = best
    while lab is not None:
        models.append(lab[2])
        lab = lab[3]
    return models
# --- registry ---------------------------------------------------------------------------------------------------

def solve_auto(problem: Problem, max_dp_states: int = 200_000) -> Schedule:
    """The DP when it is exact and its state space is small (decisions in milliseconds), else the greedy."""
    if not dp_preconditions(problem) and dp_state_count(problem) <= max_dp_states:
        return solve_dp(problem)
    return solve_greedy(problem)


_SCHEDULERS: dict[str, Callable[..., Schedule]] = {
    "auto": solve_auto,
    "dp": solve_dp,
    "greedy": solve_greedy,
    "exact": solve_exact,
    "oblivious-greedy": lambda problem: solve_oblivious(problem, "greedy"),
    "oblivious-dp": lambda problem, config=None: solve_oblivious(problem, "dp", config),
    "fcfs": solve_fcfs,
    "edf": solve_edf,
    "random": solve_random,
}


def list_schedulers() -> list[str]:
    """Names accepted by ``create_scheduler``."""
    return sorted(_SCHEDULERS)


def create_scheduler(name: str, **options) -> Callable[[Problem], Schedule]:
    """A scheduler by name, with its options bound (e.g. ``create_scheduler("random", seed=3)``).

    Args:
        name: one of ``list_schedulers()``.
        options: keyword arguments of that scheduler (``config=...``, ``seed=...``).
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
