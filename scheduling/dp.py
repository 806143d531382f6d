"""Dynamic programme: the optimal schedule when requests of a model are interchangeable, under a time cap.

Exact in the case ``solve_dp`` states (no overlap, uploads released together, one input
size and inference time per model), polynomial in the requests for a fixed number of
models. Anytime: under ``DPConfig.cap_ms`` it returns the best schedule in hand when the
cap passes (the greedy's, or better), says so (``method="greedy-fallback"``) and gives
an upper bound on the optimum, so the gap is known.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Callable

from .builder import servable_alone
from .errors import ScheduleError
from .exact import pareto_insert
from .greedy import GreedyConfig, solve_greedy
from .problem import TIME_TOL_S, Compiled, Problem
from .schedule import Schedule, finish
from .timeline import BUDGET_REL_TOL

CLOCK_EVERY = 8  # states expanded between two clock reads under a cap (a read costs ~0.1 us, a state ~5-20 us)


@dataclass(frozen=True)
class DPConfig:
    """Options of the dynamic programme."""

    max_states: int = 20_000_000  # uncapped runs refuse when prod_f (n_f + 1) * F exceeds this (memory and time)
    incumbent: bool = True  # start from the greedy's count and prune states that cannot beat it
    max_visits: int | None = None  # depth-first search: give up (ScheduleError) after this many states
    # decision-time cap in ms, greedy incumbent included; past it, the best schedule in hand is returned
    # (method "greedy-fallback"). None: run to the end (exact, however long it takes).
    cap_ms: float | None = 8.0
    clock: Callable[[], float] = time.perf_counter  # seconds; only read when cap_ms is set (tests inject one)
    # the incumbent and fallback, kept cheap so the search gets the time: without the sharing-oblivious second
    # pass (4 vs 8 ms at 50 users, 6 models; it served the same on the benchmark's windows) and without the
    # exchange pass (10x the greedy's time at 8-12 requests, where the DP finishes anyway)
    greedy: GreedyConfig = GreedyConfig(keep_oblivious=False, exchange_max_requests=0)


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

    **Case.** Residency as in ``timeline`` (memory holds the current model; a
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

    **Time cap (anytime).** With ``config.cap_ms`` (default 8 ms) the clock
    (``config.clock``) is read every ``CLOCK_EVERY`` states; the cap runs from the start
    of the call, compiling and the greedy included, and only the final check of the
    answer comes after it (~0.5 ms at 50 requests). When the cap passes, the answer is the best schedule in hand: a
    better one the search found, else the greedy's; its method is "greedy-fallback" and
    its ``bound`` an upper bound on the optimum (the root relaxation of ``_PrefixBound``,
    at most the requests servable alone). A finished run says "dp" and is optimal
    (``bound == served``). ``cap_ms=None`` is the uncapped, always exact DP.

    Args:
        problem: the instance; must satisfy ``dp_preconditions``.
        config: state-space, visit and time limits.
    Returns:
        An optimal schedule ("dp"), or under the cap possibly the best one in hand ("greedy-fallback").
    Raises:
        ScheduleError: when a precondition fails, or (uncapped) the state space exceeds the limit.
    """
    timer = _Timer(config.clock, config.cap_ms) if config.cap_ms is not None else None  # the cap covers set-up too
    reasons = dp_preconditions(problem)
    if reasons:
        raise ScheduleError("the DP is exact only when loading does not overlap inference, uploads start "
                            "together and requests of a model are interchangeable; here: "
                            + "; ".join(reasons) + ". Use solve_greedy (or create_scheduler('auto')).")
    states = dp_state_count(problem)
    if config.cap_ms is None and states > config.max_states:
        raise ScheduleError(f"DP state space {states} exceeds max_states={config.max_states}; fewer models "
                            "per decision, a time cap (DPConfig.cap_ms) or solve_greedy")
    c = problem.compiled
    greedy = list(solve_greedy(problem, config.greedy).order) if config.incumbent or timer is not None else None
    if timer is not None and timer.expired():
        return finish(problem, "greedy-fallback", greedy, servable_alone(c))
    incumbent = len(greedy) if config.incumbent else None
    result = _dp_order(c, incumbent, config.max_visits, timer)
    order = result.order if result.order is not None else greedy  # None: nothing beats the incumbent
    if not result.finished:
        return finish(problem, "greedy-fallback", order, result.bound)
    return finish(problem, "dp", order, len(order))


class _OutOfTime(Exception):
    """Unwinds a DP evaluation when the decision-time cap has passed (never leaves this module)."""


def _visit(expanded: int, limit: int, floor: int, timer: "_Timer | None") -> int:
    """One more state expanded: the cap's timer ticks, and past the visit limit the search gives up."""
    if timer is not None:
        timer.tick()
    if expanded + 1 > limit:
        raise ScheduleError(f"DP search gave up after its visit limit (best so far serves {floor}); "
                            "raise DPConfig.max_visits or use solve_greedy")
    return expanded + 1


class _Timer:
    """The decision-time cap: ``tick`` reads the injected clock every ``CLOCK_EVERY`` calls."""

    __slots__ = ("clock", "deadline", "calls")

    def __init__(self, clock: Callable[[], float], cap_ms: float) -> None:
        self.clock = clock
        self.deadline = clock() + cap_ms / 1000.0
        self.calls = 0

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def tick(self) -> None:
        """Raise ``_OutOfTime`` once the cap has passed (checked on every ``CLOCK_EVERY``-th call)."""
        self.calls += 1
        if self.calls % CLOCK_EVERY == 0 and self.clock() >= self.deadline:
            raise _OutOfTime


@dataclass(frozen=True)
class _DPResult:
    """What an evaluation of the recurrence found."""

    order: list[int] | None  # the best order found that beats the incumbent (None: none found)
    finished: bool  # True: ``order`` (or the incumbent) is optimal
    bound: int | None  # upper bound on the optimum


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


def _dp_order(c: Compiled, incumbent: int | None, max_visits: int | None = None, timer: _Timer | None = None
              ) -> _DPResult:
    """Service order of an optimal schedule (None when none serves more than ``incumbent``), unless ``timer`` runs out.

    When it runs out, the result holds the best order found that beats the incumbent
    (or None), ``finished=False`` and an upper bound on the optimum.
    """
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
    alone = servable_alone(c)

    def upper_bound(found: int) -> int:
        """Best found so far, or what any schedule could serve: each root (last job) plus its prefix bound."""
        if bound is None:
            return max(found, alone)
        ub = 0
        for f in active:
            s = dl[f][-1] - tau[f]
            x = aux_of(f, s, None)
            if s >= t0 - TIME_TOL_S and x is not None:
                ub = max(ub, 1 + bound.extra(stride[f], f, s, -x if byte_slack else None))
        return max(found, min(ub, alone))

    models = None
    found = -1 if incumbent is None else incumbent
    if bound is not None and c.n_requests < _MAX_DEPTH:
        finished, models, found, timed_out = _dp_search(F, active, n, stride, dl, tau, c.switch_s, load0, t0,
                                                        aux_of, bound, found, byte_slack, alone,
                                                        min(DFS_VISITS, limit), timer)
        limit -= DFS_VISITS
        if finished or timed_out:
            order = None if models is None else _assign(models, reqs, n, F)
            return _DPResult(order, finished, found if finished else upper_bound(found))
    if limit <= 0:
        raise ScheduleError(f"DP search gave up after max_visits={max_visits} states (best so far serves "
                            f"{found}); raise DPConfig.max_visits or use solve_greedy")
    try:
        if unlimited:
            better = _dp_scalar(F, active, n, stride, dl, tau, c.switch_s, load0, t0, bound, incumbent, limit,
                                timer)
        else:
            better = _dp_pareto(F, active, n, stride, dl, tau, c.switch_s, load0, t0, aux_of, bound, incumbent,
                                byte_slack, limit, timer)
    except _OutOfTime:
        order = None if models is None else _assign(models, reqs, n, F)
        return _DPResult(order, False, upper_bound(found))
    models = better if better is not None else models
    order = None if models is None else _assign(models, reqs, n, F)
    return _DPResult(order, True, None)


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
               max_visits, timer=None) -> tuple[bool, list[int] | None, int, bool]:
    """The DP's recurrence evaluated depth-first, with dominance memo and bound pruning.

    Same states and labels as the layered evaluation; a label is expanded only if no label
    of its state seen before dominates it, and a state is cut when even ``bound`` cannot
    lift it above the best count found so far (the greedy's at the start). Pruning only
    removes states that cannot beat a schedule already in hand, so the result stays
    optimal; it stops at once when a schedule reaches ``target`` (requests servable at
    all). Recursion depth is the number of requests served. Returns (finished within
    ``max_visits``, best model sequence found or None, its count, stopped by ``timer``).
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
        if timer is not None:
            timer.tick()
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
    finished, timed_out = True, False
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
    except _OutOfTime:
        finished, timed_out = False, True
    return finished, None if best[1] is None else best[1][::-1], best[0], timed_out


class _OutOfVisits(Exception):
    """Unwinds the depth-first search when it has used its visit budget (never leaves this module)."""


def _dp_scalar(F, active, n, stride, dl, tau, switch, load0, t0, bound=None, incumbent=None, limit=math.inf,
               timer=None) -> list[int] | None:
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
            expanded = _visit(expanded, limit, floor, timer)
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
               byte_slack=False, limit=math.inf, timer=None) -> list[int] | None:
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
            expanded = _visit(expanded, limit, floor, timer)
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
                        pareto_insert(bucket, (-s, x, f, lab))
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
