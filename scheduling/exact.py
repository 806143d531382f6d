"""Exact solver for small instances: dynamic programming over subsets of requests (the test oracle)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .builder import Builder
from .errors import ScheduleError
from .problem import TIME_TOL_S, Compiled, Problem
from .schedule import Schedule, finish
from .timeline import BUDGET_REL_TOL

@dataclass(frozen=True)
class ExactConfig:
    """Options of the exact solver."""

    max_requests: int = 14  # it enumerates subsets: 2^K states; refuse larger instances


def pareto_insert(labels: list[tuple], new: tuple) -> None:
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
    job, time the next load may start if it may overlap: the later of the loader being
    free and the memory gate). The future depends on nothing else:
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
            link = Builder(c)
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
                    # next load's earliest start: the loader and the memory gate (timeline.memory_gates);
                    # another job of the same model leaves both where they were
                    nlf = (lf if f == m else max(le, e)) if ovl else max(le, e)
                    new = (end, nlf if use_loader else 0.0, k, lab)
                    bucket = nxt.setdefault(key, [])
                    pareto_insert(bucket, new)
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
            pareto_insert(layer.setdefault((1 << k, f), []), (-s, w, k, None))
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
                    pareto_insert(nxt.setdefault((mask | 1 << j, g), []), (-s, w, j, lab))
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
    return finish(problem, "exact", order, len(order))


