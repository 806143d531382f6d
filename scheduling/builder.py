"""Appending requests to the end of a schedule, checked in O(1) each: what the greedy and the baselines build with.

``Builder`` follows the timeline rules of ``timeline`` job by job (the uplink as the
idle intervals of the shared link); ``VecBuilder`` checks every candidate append at once
with numpy. Both keep exactly the state the future depends on: the last model, the end
of the last job, the memory gate, when the loader is free, and the link's idle time.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .problem import TIME_TOL_S, Compiled
from .timeline import fast_feasible

class Builder:
    """Appends requests to the end of a schedule, checking each append in O(1) (EDF link) or O(n) (static)."""

    __slots__ = ("c", "order", "m", "e1", "gate", "le", "gaps", "rate")

    def __init__(self, c: Compiled) -> None:
        self.c = c
        self.order: list[int] = []
        self.m = -1  # last model; -1 selects the start row of switch_s
        self.e1 = self.gate = self.le = c.start_s  # gate: see timeline.memory_gates
        self.rate = c.uplink_budget
        self.gaps: list[tuple[float, float]] = [(c.start_s, math.inf)]  # idle time of the shared link

    def copy(self) -> "Builder":
        b = Builder.__new__(Builder)
        b.c, b.order, b.m, b.e1, b.gate, b.le, b.gaps, b.rate = (self.c, list(self.order), self.m, self.e1,
                                                                 self.gate, self.le, list(self.gaps), self.rate)
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
            load_start = max(self.le, self.gate) if c.overlap_ok[self.m][m] else self.e1
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
        self.le = _load_end(c, self.order, self.m, m, self.le, self.gate, self.e1)
        s = max(self.le, self.e1)
        if c.policy == "edf":
            s = max(s, self._upload_end(k))
            self._consume(k)
        else:
            s = max(s, c.release_s[k])
        _commit(self, s, k, m)

    def dead(self, k: int) -> bool:
        """True when k can never be appended any more (its deadline is out of reach even with no load)."""
        return max(self.e1, self.c.release_s[k]) + self.c.infer_s[k] > self.c.deadline_s[k] + TIME_TOL_S


def admit_in_order(c: Compiled, order: Sequence[int]) -> list[int]:
    """Walk a priority order and append each request whose append keeps the schedule feasible."""
    b = Builder(c)
    for k in order:
        if b.try_end(k) is not None:
            b.append(k)
    return b.order



class VecBuilder:
    """``Builder`` for the EDF link, checking every candidate append at once with numpy."""

    __slots__ = ("c", "a", "order", "m", "e1", "gate", "le", "gaps", "_idle")

    def __init__(self, c: Compiled, arrays: dict) -> None:
        self.c, self.a = c, arrays
        self.order: list[int] = []
        self.m = c.n_models  # the start row of switch
        self.e1 = self.gate = self.le = c.start_s
        self.gaps = [(c.start_s, math.inf)]
        self._idle = None

    def copy(self) -> "VecBuilder":
        b = VecBuilder.__new__(VecBuilder)
        b.c, b.a, b.order, b.m, b.e1, b.gate, b.le, b.gaps, b._idle = (
            self.c, self.a, list(self.order), self.m, self.e1, self.gate, self.le, self.gaps, self._idle)
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
            load_start = np.where(a["overlap"][self.m, mc], max(self.le, self.gate), self.e1)
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
            ls_t = np.where(a["overlap"][self.m, mt], max(self.le, self.gate), self.e1)
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
        gate_t = np.where((mt != self.m) & bool(self.order), self.e1, self.gate)  # t starts a new run or not
        load_start = np.where(a["overlap"][pair], np.maximum(le_t, gate_t)[:, None], end_t)
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
        self.le = _load_end(c, self.order, self.m, m, self.le, self.gate, self.e1)
        s = max(self.le, self.e1)
        if self.a["finite_link"]:
            s = max(s, float(self._uploads(np.array([k]))[0]))
            sb = Builder(c)
            sb.gaps = self.gaps
            sb._consume(k)
            self.gaps = sb.gaps
            self._idle = None
        else:
            s = max(s, c.release_s[k])
        _commit(self, s, k, m)


def _load_end(c: Compiled, order: list[int], prev: int, m: int, le: float, gate: float, e1: float) -> float:
    """When model ``m`` is loaded if its job is appended now: loading overlaps the previous run
    when memory allows it (after ``gate``), else it waits for the previous job to end."""
    if not order:
        return c.start_s + c.switch_s[-1][m]
    start = max(le, gate) if c.overlap_ok[prev][m] else e1
    return start + c.switch_s[prev][m]


def _commit(b: "Builder | VecBuilder", s: float, k: int, m: int) -> None:
    """Append job ``k`` of model ``m`` starting at ``s``."""
    if b.order and m != b.m:
        b.gate = b.e1  # a new run: the previous model leaves memory when its last job ends
    b.e1 = s + b.c.infer_s[k]
    b.m = m
    b.order.append(k)


class ScalarCandidates:
    """The ``VecBuilder`` interface over ``Builder`` (static split: each check is O(n))."""

    __slots__ = ("b",)

    def __init__(self, b: Builder) -> None:
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

    def copy(self) -> "ScalarCandidates":
        return ScalarCandidates(self.b.copy())

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


def request_arrays(c: Compiled) -> dict:
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


def servable_alone(c: Compiled) -> int:
    """How many requests could each be served if they were the only one: an upper bound on any schedule."""
    b = Builder(c)
    return sum(1 for k in range(c.n_requests) if b.try_end(k) is not None)


