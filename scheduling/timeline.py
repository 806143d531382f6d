"""The timeline of an ordered served set, and whether it meets every constraint (pure).

**Residency (what is in accelerator memory).** At the planning time t0 the blocks R0
are resident. While model m runs, memory holds J_m: switching from a to b loads
J_b \\ J_a (cost sum S_j / v over those blocks) and evicts J_a \\ J_b once the last job
of a has finished. The first load is J_{m_1} \\ R0 (R0's other blocks are evicted
first). Every model must fit the memory budget M. With overlap (``overlap_load``) the
loader works while inference runs, but memory holds at most two models, the one in use
and the one loading, so a pair may overlap only if |J_a u J_b| <= M.

**Timeline** (positions n = 1..N, times absolute, seconds). Consecutive jobs of one model
form a *run*; g_n is the end of the last job before the run that contains job n-1
(g_n = t0 when that run is the first one): by g_n every model other than m_{n-1} has
left memory.

- load_start_n = t0 for n = 1; else e_{n-1} (no overlap), or, when overlap is allowed
  and the pair fits, max(l_{n-1}, g_n): the loader is free and only m_{n-1} is resident.
  l_n = load_start_n + L(m_{n-1} -> m_n).
- the upload of request k is released at r_k = max(a_k, t0) and ends at u_n;
- s_n = max(l_n, e_{n-1}, u_n); e_n = s_n + tau_n; require e_n <= T_n.

NOTE (overlap rule): until issue 17 the overlap gate was e_{n-2}, the end of the job two
back, even when that job ran the same model as job n-1 and so held no memory of its own;
that only ever served fewer (``tests/test_scheduling_timeline.py`` shows a case).

**Uplink policies** (``UplinkConfig.policy``):

- ``"edf"``: one shared link of rate B bytes/s; uploads are served preemptively in
  service order (= earliest due time first, see ``uplink``); u_n is what that link
  delivers, and the timeline is the earliest one. B = inf means uploads never wait.
- ``"static"``: each served user holds a constant share for its whole window, just
  enough to finish when its inference starts (closed forms in ``uplink``). For a
  fixed order every share is smallest when every start is as late as possible, so the
  timeline is the latest (ALAP) one and the order is feasible iff the earliest timeline
  meets the deadlines and the ALAP shares sum to at most B (bytes/s, or Hz with the
  Shannon rate model). This is why scheduling and allocation can be solved in sequence.

On one link with a linear rate, "edf" is feasible whenever "static" is (proof in
``uplink``), so "edf" is the default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from . import uplink as bw
from .errors import ScheduleError
from .problem import TIME_TOL_S, Compiled, Problem

BUDGET_REL_TOL = 1e-9  # uplink budget comparisons


@dataclass(frozen=True)
class JobTiming:
    """When one served request loads, uploads, runs and ends."""

    request_index: int
    request_id: str
    model: str
    load_bytes: int
    load_start_s: float
    load_end_s: float
    upload_end_s: float
    start_s: float
    end_s: float
    deadline_s: float

    @property
    def slack_s(self) -> float:
        return self.deadline_s - self.end_s


@dataclass(frozen=True)
class Timeline:
    """An evaluated order: its jobs' times, whether every constraint holds, and why not."""

    jobs: tuple[JobTiming, ...]
    feasible: bool
    violations: tuple[str, ...]
    uplink_used: float  # static: sum of shares; edf: the link rate if anything is uploaded
    uplink_budget: float

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(j.request_index for j in self.jobs)

    @property
    def served(self) -> int:
        """Requests served by their deadlines (0 unless the whole order is feasible)."""
        return len(self.jobs) if self.feasible else 0

    @property
    def loaded_bytes(self) -> int:
        return sum(j.load_bytes for j in self.jobs)


def check_order(c: Compiled, order: Sequence[int]) -> list[int]:
    """Validate an order of request indices.

    Args:
        c: compiled problem.
        order: request indices in service order.
    Returns:
        The order as a list of ints.
    Raises:
        ScheduleError: on a repeated or out-of-range index.
    """
    out = [int(k) for k in order]
    if len(set(out)) != len(out):
        raise ScheduleError(f"order serves a request twice: {out}")
    bad = [k for k in out if not 0 <= k < c.n_requests]
    if bad:
        raise ScheduleError(f"order names requests {bad} outside 0..{c.n_requests - 1}")
    return out


def memory_gates(c: Compiled, order: Sequence[int], ends: Sequence[float]) -> list[float]:
    """g_n per position: when every model but the previous job's has left memory (see the module docstring).

    Args:
        c: compiled problem.
        order: request indices in service order.
        ends: end time per position (only positions before the last are read).
    Returns:
        One time per position (t0 for the first two runs' jobs).
    """
    gates = []
    gate = c.start_s
    for n, k in enumerate(order):
        if n >= 2 and c.model_of[order[n - 1]] != c.model_of[order[n - 2]]:
            gate = ends[n - 2]  # job n-1 starts a new run
        gates.append(gate)
    return gates


def earliest_times(c: Compiled, order: Sequence[int], upload_end_s: Sequence[float] | None
                   ) -> tuple[list[float], list[float], list[float]]:
    """The earliest timeline: (load_start, load_end, start) per position.

    Args:
        c: compiled problem.
        order: request indices in service order.
        upload_end_s: per position, when the input is there (None: uploads never wait).
    Returns:
        Three lists indexed by position.
    """
    ls, le, st = [], [], []
    prev_m = -1
    e1 = gate = c.start_s  # end of the previous job; g_n (memory holds only m_{n-1} from then on)
    for n, k in enumerate(order):
        m = c.model_of[k]
        if n == 0:
            load_start = c.start_s
            load = c.switch_s[-1][m]
        else:
            load = c.switch_s[prev_m][m]
            load_start = max(le[-1], gate) if c.overlap_ok[prev_m][m] else e1
        load_end = load_start + load
        s = max(load_end, e1 if n else c.start_s)
        if upload_end_s is not None:
            s = max(s, upload_end_s[n])
        ls.append(load_start)
        le.append(load_end)
        st.append(s)
        if n and m != prev_m:
            gate = e1  # a new run starts: the previous model leaves memory when its last job ends
        e1 = s + c.infer_s[k]
        prev_m = m
    return ls, le, st


def latest_starts(c: Compiled, order: Sequence[int]) -> tuple[list[float], list[float]]:
    """The latest (ALAP) timeline meeting every deadline: (latest load end, latest start) per position.

    The timeline constraints are difference constraints that only point forward in
    service order, so the pointwise latest solution is one backward pass. It is a valid
    timeline iff the earliest one meets the deadlines (then latest >= earliest).

    Args:
        c: compiled problem.
        order: request indices in service order (non-empty).
    Returns:
        Two lists indexed by position: latest load end, latest start.
    """
    n_jobs = len(order)
    lat_load = [0.0] * n_jobs
    lat_start = [0.0] * n_jobs
    models = [c.model_of[k] for k in order]
    load = [c.switch_s[-1][models[0]]] + [c.switch_s[models[n - 1]][models[n]] for n in range(1, n_jobs)]
    ovl = [False] + [c.overlap_ok[models[n - 1]][models[n]] for n in range(1, n_jobs)]
    # gated[n]: the load whose memory gate is the end of job n, i.e. the one right after the next run starts
    gated = [n_jobs] * n_jobs
    nxt_run = n_jobs
    for n in range(n_jobs - 1, -1, -1):
        if n + 1 < n_jobs and models[n + 1] != models[n]:
            nxt_run = n + 1
        gated[n] = nxt_run + 1
    for n in range(n_jobs - 1, -1, -1):
        k = order[n]
        end = c.deadline_s[k]
        if n + 1 < n_jobs:
            end = min(end, lat_start[n + 1])  # one job at a time
            if not ovl[n + 1]:
                end = min(end, lat_load[n + 1] - load[n + 1])  # next load starts after this job
        p = gated[n]
        if p < n_jobs and ovl[p]:
            end = min(end, lat_load[p] - load[p])  # that load needs this job's model out of memory
        lat_start[n] = end - c.infer_s[k]
        lat_load[n] = lat_start[n]
        if n + 1 < n_jobs and ovl[n + 1]:
            lat_load[n] = min(lat_load[n], lat_load[n + 1] - load[n + 1])  # one loader
    return lat_load, lat_start


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


def evaluate(problem: Problem, order: Sequence[int]) -> Timeline:
    """Turn an ordered served set into load/upload/start/end times and check every constraint.

    Args:
        problem: the instance.
        order: indices into ``problem.requests`` in service order.
    Returns:
        The timeline (earliest for "edf", latest for "static"), feasibility, violations.
    Raises:
        ScheduleError: if the order repeats a request or names an unknown one.
    """
    c = problem.compiled
    order = check_order(c, order)
    violations = []
    for k in order:
        if not c.fits[c.model_of[k]]:
            violations.append(f"{problem.requests[k].request_id}: model {c.model_names[c.model_of[k]]} does not "
                              f"fit the memory budget of {problem.server.memory_budget_bytes} bytes")
    used = 0.0
    if c.policy == "edf":
        upload = bw.edf_upload_completions([c.release_s[k] for k in order], [c.input_bytes[k] for k in order],
                                           c.uplink_budget)
        load_start, load_end, start = earliest_times(c, order, upload)
        if any(c.input_bytes[k] > 0 for k in order) and not math.isinf(c.uplink_budget):
            used = c.uplink_budget
    else:
        released = [c.release_s[k] for k in order]  # no input before its user arrives
        _, _, early = earliest_times(c, order, released)
        late_load, start = latest_starts(c, order) if order else ([], [])
        if any(e > s + TIME_TOL_S for e, s in zip(early, start)):
            # the earliest timeline misses a deadline; report it (the ALAP one is not a timeline)
            load_start, load_end, start = earliest_times(c, order, released)
        else:
            load_start, load_end, _ = _loads_given_starts(c, order, start)
        upload = list(start)
        shares = [c.uplink_share(k, s - c.release_s[k]) for k, s in zip(order, start)]
        used = math.fsum(shares)
        if used > c.uplink_budget * (1 + BUDGET_REL_TOL):
            violations.append(f"static uplink split needs {used:.6g} "
                              f"{'bytes/s' if c.rate_model == 'linear' else 'Hz'} in total, budget is "
                              f"{c.uplink_budget:.6g}")
    jobs = []
    prev_m = None
    for n, k in enumerate(order):
        m = c.model_of[k]
        end = start[n] + c.infer_s[k]
        if end > c.deadline_s[k] + TIME_TOL_S:
            violations.append(f"{problem.requests[k].request_id}: ends at {end:.6f} s, deadline "
                              f"{c.deadline_s[k]:.6f} s")
        jobs.append(JobTiming(
            request_index=k, request_id=problem.requests[k].request_id, model=c.model_names[m],
            load_bytes=c.switch_bytes[-1 if prev_m is None else prev_m][m],
            load_start_s=load_start[n], load_end_s=load_end[n], upload_end_s=upload[n],
            start_s=start[n], end_s=end, deadline_s=c.deadline_s[k]))
        prev_m = m
    return Timeline(tuple(jobs), not violations, tuple(violations), used, c.uplink_budget)


def _loads_given_starts(c: Compiled, order: Sequence[int], start: Sequence[float]
                        ) -> tuple[list[float], list[float], list[float]]:
    """Load each model as early as the residency rules allow, given every job's start."""
    ls, le = [], []
    ends = [s + c.infer_s[k] for s, k in zip(start, order)]
    gates = memory_gates(c, order, ends)
    prev_m = -1
    for n, k in enumerate(order):
        m = c.model_of[k]
        if n == 0:
            s0, load = c.start_s, c.switch_s[-1][m]
        else:
            load = c.switch_s[prev_m][m]
            s0 = max(le[-1], gates[n]) if c.overlap_ok[prev_m][m] else ends[n - 1]
        ls.append(s0)
        le.append(s0 + load)
        prev_m = m
    return ls, le, list(start)


def allocate_static(problem: Problem, timeline: Timeline) -> bw.StaticSplit:
    """The static split for a schedule: each served user's window ends when its inference starts.

    Args:
        problem: the scheduling problem (its uplink's rate model and budget are used).
        timeline: a timeline from ``evaluate`` (any policy).
    Returns:
        Shares per served request, in service order.
    """
    reqs = [problem.requests[j.request_index] for j in timeline.jobs]
    release = [max(r.arrival_s, problem.server.start_s) for r in reqs]
    window = [j.start_s - rel for j, rel in zip(timeline.jobs, release)]
    sizes = [r.input_bytes for r in reqs]
    if problem.uplink.rate_model == "shannon":
        return bw.static_split_shannon(sizes, window, [r.link_gain_hz for r in reqs],
                                       problem.uplink.total_bandwidth_hz)
    return bw.static_split_linear(sizes, window, problem.uplink.total_rate_bytes_per_s)
