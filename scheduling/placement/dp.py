"""The exact DP's machinery: a problem compiled to numpy tables (``_Chain``), its passes, and their backtrack."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .price import _cut_bytes
from .problem import _INF, ACCURACY_TOL, CLIENT, CutCodec, PlacementError, PlacementProblem, _infeasible

MAX_DP_CELLS = 24_000_000  # float cells the exact DP may hold (~190 MB); beyond that it refuses


# --- the exact DP ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """One DP pass: per position, A (the activation leaving a stage at cut e, its codec chosen) and B (a stage
    starting at cut c on its worker); values are indexed (codec option, accuracy level, pair of worker set and
    last worker)."""

    comps: list[tuple[Callable, Any, list]]  # (combine, A, B) per value: (add,), (maximum,) or (add, maximum)
    final: list[np.ndarray]  # per value: (accuracy level, pair) after the hop back to the client
    sc: np.ndarray
    hop: np.ndarray
    hin: np.ndarray
    near_tie: bool = False  # lexicographic pass only: two latencies came within rounding of each other


class _Ends:
    """The A values of one pass: the raw option of every position in one array (so a stage's every end is
    updated at once), each codec option in an array of its own cut. Indexed (accuracy level, pair)."""

    def __init__(self, ch: "_Chain") -> None:
        self.kat = ch.kat
        self.raw = np.full((ch.n + 1, ch.kat[ch.n], ch.P + 1), _INF)
        self.coded = {e: np.full((ch.Q[e] - 1, ch.kat[e], ch.P + 1), _INF) for e in range(1, ch.n) if ch.Q[e] > 1}

    def at(self, c: int) -> np.ndarray:
        """(option, accuracy level, pair) at cut c."""
        raw = self.raw[c, None, :self.kat[c]]
        return np.concatenate([raw, self.coded[c]]) if c in self.coded else raw

    def value(self, e: int, q: int, k: int, p: int) -> float:
        return float(self.raw[e, k, p] if q == 0 else self.coded[e][q - 1, k, p])


class _Chain:
    """A problem compiled to numpy tables in the DP's layout.

    Positions 0..n; position c (1..n-1) is the cut before block c, with options 0 (raw) and the
    codecs there that can matter (within the accuracy budget, not dominated). A state's worker set
    and last worker are one "pair" index. The accuracy spent so far is a level: an index into
    ``vals``, every total of codec costs (summed in cut order) within the budget; the levels
    reachable by cut c are ``vals[:kat[c]]``.
    """

    def __init__(self, p: PlacementProblem) -> None:
        self.p = p
        self.n = p.n_blocks
        self.widx = [i for i, w in enumerate(p.workers) if not 0 < w.memory_bytes < min(p.block_bytes)]
        if not self.widx:
            raise _infeasible(p)
        self.W = len(self.widx)
        self.kmax = min(self.W, p.stage_limit)
        self._options()
        self._levels()
        self._tables_from(p)
        self._pairs()

    def _options(self) -> None:
        p, budget = self.p, self.p.max_accuracy_cost + ACCURACY_TOL
        self.opts: list[list[CutCodec | None]] = [[None] for _ in range(self.n + 1)]
        for c in range(1, self.n):
            cand = [d for d in p.codecs
                    if d.cut == c and d.accuracy_cost <= budget and d.bytes_per_sample < p.act_bytes[c - 1]]
            costs = [(d.bytes_per_sample, d.encode_ms, d.decode_ms, d.accuracy_cost) for d in cand]
            # a codec no better than another in bytes, encode, decode and accuracy never helps (ties: keep the first)
            self.opts[c] += [d for i, d in enumerate(cand)
                             if not any(all(x <= y for x, y in zip(costs[j], costs[i]))
                                        and (costs[j] != costs[i] or j < i) for j in range(len(cand)) if j != i)]
        self.Q = [len(o) for o in self.opts]

    def _levels(self) -> None:
        """Accuracy levels and, per (cut, codec option), the level maps k -> k' (in rounds with distinct targets)."""
        n, W, budget = self.n, self.W, self.p.max_accuracy_cost + ACCURACY_TOL
        self.n_pairs = sum(math.comb(W, size) * size for size in range(1, self.kmax + 1))
        max_levels = MAX_DP_CELLS // (2 * (self.n_pairs + 1) * (n + 1))
        if max_levels < 1:
            raise PlacementError(f"{W} workers with up to {self.kmax} stages are too many for the exact planner "
                                 f"({self.n_pairs} worker-set states per cut); set max_stages or offer fewer workers")
        vals, index = [0.0], {0.0: 0}
        self.kat = [1] * (n + 1)
        self.level_maps: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.rounds: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        for c in range(1, n):
            before = len(vals)
            for q in range(1, self.Q[c]):
                cost = self.opts[c][q].accuracy_cost
                pairs = []
                for k in range(before):
                    v = vals[k] + cost
                    if v <= budget:
                        if v not in index:
                            index[v] = len(vals)
                            vals.append(v)
                        pairs.append((k, index[v]))
                self.level_maps[(c, q)] = pairs
                seen: dict[int, int] = {}
                by_round: list[list[tuple[int, int]]] = []
                for s, d in pairs:
                    r = seen[d] = seen.get(d, -1) + 1
                    if r == len(by_round):
                        by_round.append([])
                    by_round[r].append((s, d))
                self.rounds[(c, q)] = [(np.array([s for s, _ in rr]), np.array([d for _, d in rr]))
                                       for rr in by_round]
            self.kat[c] = len(vals)
            if len(vals) > max_levels:
                raise PlacementError(f"the codecs' accuracy costs combine into more than {max_levels} distinct "
                                     f"totals within the budget; the exact planner cannot track them with {W} "
                                     "workers: use fewer codecs, round their accuracy costs, or lower "
                                     "max_accuracy_cost")
        self.kat[n] = len(vals)
        self.vals = np.array(vals)
        cells = 2 * (self.n_pairs + 1) * ((n + 1) * len(vals) + 2 * sum(q * k for q, k in zip(self.Q, self.kat)))
        if cells > MAX_DP_CELLS:
            raise PlacementError(f"the exact planner would need {cells} DP cells (limit {MAX_DP_CELLS}): "
                                 f"{W} workers, {len(vals)} accuracy levels; use fewer workers or codecs")

    def _tables_from(self, p: PlacementProblem) -> None:
        """sc[c, e, q_in, q_out, v] (inf if [c, e) does not fit v), hop[c, q, u, v], hin[v], hout[u]."""
        n, W, Qm, inf = self.n, self.W, max(self.Q), _INF
        ws = [p.workers[i] for i in self.widx]
        base = np.full((n + 1, n + 1, W), inf)
        bm = np.array([w.block_ms for w in ws], dtype=float).T  # (n, W)
        fm = np.array([w.first_ms for w in ws], dtype=float).T  # (n, W): a block as a stage's first
        for c in range(n):  # accumulate adds in order, as _seq_sum does
            run = bm[c:].copy()
            run[0] = fm[c]
            base[c, c + 1:] = np.add.accumulate(run, axis=0)
        pre = np.concatenate([[0], np.cumsum(np.array(p.block_bytes, dtype=np.int64))])
        need = pre[None, :] - pre[:, None]  # (n+1, n+1): weight bytes of [c, e)
        mem = np.array([w.memory_bytes for w in ws], dtype=np.int64)
        base[(mem > 0) & (need[:, :, None] > mem)] = inf
        dec, enc = np.full((n + 1, Qm), inf), np.full((n + 1, Qm), inf)
        nb = np.zeros((n + 1, Qm))
        dec[:, 0] = enc[:, 0] = 0.0
        for c in range(1, n):
            for q, d in enumerate(self.opts[c]):
                if d is not None:
                    dec[c, q], enc[c, q] = d.decode_ms, d.encode_ms
                nb[c, q] = _cut_bytes(p, c, d)
        self.sc = base[:, :, None, None, :] + dec[:, None, :, None, None] + enc[None, :, None, :, None]
        names = [w.name for w in ws]
        rate = np.array([[p.rate(a, b) for b in names] for a in names]).reshape(W, W)
        self.hop = p.hop_ms + 1000.0 * nb[:, :, None, None] / rate[None, None]
        self.hop[:, :, np.arange(W), np.arange(W)] = inf
        self.hop[~(np.arange(Qm)[None, :] < np.array(self.Q)[:, None])] = inf
        self.hop[0] = self.hop[n] = inf
        self.hin = np.array([p.transfer_ms(CLIENT, a, p.input_bytes * p.batch) for a in names])
        self.hout = np.array([p.transfer_ms(a, CLIENT, p.act_bytes[-1] * p.batch) for a in names])

    def _pairs(self) -> None:
        """Pairs p = (worker set S, last worker w in S), |S| <= kmax, plus a dummy P that stays inf; the hop gather."""
        W = self.W
        pairs = [(sum(1 << u for u in members), w) for size in range(1, self.kmax + 1)
                 for members in itertools.combinations(range(W), size) for w in members]
        P = self.P = len(pairs)
        self.plast = np.array([w for _, w in pairs] + [0])
        self.psize = np.array([bin(S).count("1") for S, _ in pairs] + [0])
        pidx = {pw: i for i, pw in enumerate(pairs)}
        self.single = np.array([pidx[(1 << v, v)] for v in range(W)])
        # B[(S, v)] = min over u in S - v of A[(S - v, u)] + hop[u, v]: sources per slot, padded with the dummy
        width = max(1, self.kmax - 1)
        self.hsrc = np.full((width, P + 1), P)  # (source slot, pair): reductions run over the leading axis
        self.hidx = np.zeros((width, P + 1), dtype=np.int64)
        for i, (S, v) in enumerate(pairs):
            rest = S ^ (1 << v)
            for j, u in enumerate(u for u in range(W) if rest >> u & 1):
                self.hsrc[j, i], self.hidx[j, i] = pidx[(rest, u)], u * W + v

    def candidates(self) -> np.ndarray:
        """Every finite stage or hop cost: the bottleneck of any plan is one of them."""
        parts = [self.sc[np.isfinite(self.sc)], self.hop[np.isfinite(self.hop)], self.hin, self.hout]
        return np.unique(np.concatenate([x.ravel() for x in parts]))

    def _tables(self, limit: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if limit is None:
            return self.sc, self.hop, self.hin, self.hout
        return tuple(np.where(x <= limit, x, _INF) for x in (self.sc, self.hop, self.hin, self.hout))

    def _start(self, hin: np.ndarray) -> tuple[_Ends, list]:
        """A: the stage ends (``_Ends``); B: one array (option, accuracy, pair) per position."""
        A = _Ends(self)
        B: list = [None] * self.n
        B[0] = np.full((1, 1, self.P + 1), _INF)
        B[0][0, 0, self.single] = hin
        return A, B

    def _codec_targets(self, c: int):
        """(e, q, rounds) for every codec option at a cut after c: the only targets that move the accuracy index."""
        return [(e, q, self.rounds[(e, q)]) for e in range(c + 1, self.n) for q in range(1, self.Q[e])]

    def _hop_costs(self, hop: np.ndarray, c: int) -> np.ndarray:
        """(option, 1, source slot, pair) hop costs into each pair at cut c, in the hop gather's layout."""
        q = self.Q[c]
        return hop[c, :q].reshape(q, self.W * self.W)[:, self.hidx][:, None]

    def run(self, op: Callable, limit: float | None = None) -> _Run:
        """One value per state: ``op=np.add`` for least latency, ``np.maximum`` for the least bottleneck;
        only stages and hops costing at most ``limit`` are allowed."""
        sc, hop, hin, hout = self._tables(limit)
        n, last = self.n, self.plast
        A, B = self._start(hin)
        for c in range(n):
            if c:
                B[c] = op(A.at(c)[..., self.hsrc], self._hop_costs(hop, c)).min(axis=-2)
            b = B[c]
            if b.min() == _INF:
                continue
            qc, kc = b.shape[:2]
            # raw outgoing activation, every end e > c at once
            cand = op(b[None], sc[c, c + 1:, :qc, 0][..., None, last])
            cand = cand.min(axis=1) if qc > 1 else cand[:, 0]
            tgt = A.raw[c + 1:, :kc]
            np.minimum(tgt, cand, out=tgt)
            # a codec at the end cut: its accuracy moves the index k -> k'
            for e, q, rounds in self._codec_targets(c):
                cq = op(b, sc[c, e, :qc, q][:, None, last]).min(axis=0)
                for src, dst in rounds:
                    m = int(np.searchsorted(src, kc))
                    if m:
                        s, d = src[:m], dst[:m]
                        A.coded[e][q - 1, d] = np.minimum(A.coded[e][q - 1, d], cq[s])
        final = op(A.raw[n], hout[last])
        return _Run([(op, A, B)], [final], sc, hop, hin)

    def run_lex(self) -> _Run:
        """Least (latency, then bottleneck) per state: both values, merged lexicographically."""
        sc, hop, hin, hout = self.sc, self.hop, self.hin, self.hout
        n, last = self.n, self.plast
        finite = [x[np.isfinite(x)] for x in (sc, hop, hin, hout)]
        top = max((float(x.max()) for x in finite if x.size), default=0.0)
        from . import _Lex  # the package's, looked up per call: tests swap ``placement._Lex``
        lex = _Lex(8.0 * (2 * n + 2) ** 2 * np.finfo(float).eps * top)  # (2n+1) elements, each <= top
        AL, BL = self._start(hin)
        AB, BB = self._start(hin)
        for c in range(n):
            if c:
                h = self._hop_costs(hop, c)
                BL[c], BB[c] = lex.min(AL.at(c)[..., self.hsrc] + h, np.maximum(AB.at(c)[..., self.hsrc], h), axis=-2)
            bl, bb = BL[c], BB[c]
            if bl.min() == _INF:
                continue
            qc, kc = bl.shape[:2]
            cost = sc[c, c + 1:, :qc, 0][..., None, last]
            cl, cb = bl[None] + cost, np.maximum(bb[None], cost)
            cl, cb = lex.min(cl, cb, axis=1) if qc > 1 else (cl[:, 0], cb[:, 0])
            lex.into(AL.raw[c + 1:, :kc], AB.raw[c + 1:, :kc], cl, cb)
            for e, q, rounds in self._codec_targets(c):
                cost = sc[c, e, :qc, q][:, None, last]
                cl, cb = lex.min(bl + cost, np.maximum(bb, cost), axis=0)
                for src, dst in rounds:
                    m = int(np.searchsorted(src, kc))
                    if m:
                        s, d = src[:m], dst[:m]
                        xl, xb = AL.coded[e][q - 1, d], AB.coded[e][q - 1, d]
                        lex.into(xl, xb, cl[s], cb[s])
                        AL.coded[e][q - 1, d], AB.coded[e][q - 1, d] = xl, xb
        finals = [AL.raw[n] + hout[last], np.maximum(AB.raw[n], hout[last])]
        return _Run([(np.add, AL, BL), (np.maximum, AB, BB)], finals, sc, hop, hin, lex.near_tie)

    def select(self, primary: np.ndarray, secondary: np.ndarray | None = None) -> tuple[int, int] | None:
        """The final state (accuracy index, pair) that ranks first; None if none is finite."""
        flat = primary.ravel()
        best = flat.min()
        if not math.isfinite(best):
            return None
        idx = np.flatnonzero(flat == best)
        if secondary is not None:
            sec = secondary.ravel()[idx]
            idx = idx[sec == sec.min()]
        ks, ps = np.unravel_index(idx, primary.shape)
        i = min(range(len(idx)), key=lambda j: (self.vals[ks[j]], self.psize[ps[j]], ks[j], ps[j]))
        return int(ks[i]), int(ps[i])

    def backtrack(self, run: _Run, state: tuple[int, int]) -> tuple[list[tuple[str, int, int]], dict[int, str]]:
        """The plan behind a final state: walk back through predecessors whose values reproduce each state's."""
        k, p = state
        e, qe = self.n, 0
        names = [self.p.workers[i].name for i in self.widx]
        stages: list[tuple[str, int, int]] = []
        codecs: dict[int, str] = {}
        while True:
            w = int(self.plast[p])
            want = [A.value(e, qe, k, p) for _, A, _ in run.comps]
            step = None
            for c in range(e):
                kc = self.kat[c] if c else 1
                if qe == 0:
                    srcs = [k] if k < kc else []
                else:
                    srcs = [s for s, d in self.level_maps[(e, qe)] if d == k and s < kc]
                for qc, ks in itertools.product(range(self.Q[c] if c else 1), srcs):
                    cost = float(run.sc[c, e, qc, qe, w])
                    if all(float(op(float(B[c][qc, ks, p]), cost)) == t for (op, _, B), t in zip(run.comps, want)):
                        step = (c, qc, ks)
                        break
                if step:
                    break
            if step is None:  # pragma: no cover - the DP's values always have a predecessor
                raise PlacementError("internal error: the DP's plan could not be traced back")
            c, qc, ks = step
            stages.append((names[w], c, e))
            if 0 < e < self.n and qe:
                codecs[e] = self.opts[e][qe].name
            if c == 0:
                break
            want = [float(B[c][qc, ks, p]) for _, _, B in run.comps]
            for src, h in zip(self.hsrc[:, p], self.hidx[:, p]):
                u = int(h) // self.W
                if src < self.P and all(float(op(A.value(c, qc, ks, src), float(run.hop[c, qc, u, w]))) == t
                                        for (op, A, _), t in zip(run.comps, want)):
                    break
            else:  # pragma: no cover
                raise PlacementError("internal error: the DP's plan could not be traced back")
            e, qe, k, p = c, qc, ks, int(src)
        return stages[::-1], codecs


class _Lex:
    """Lexicographic (latency, bottleneck) merges that notice near-ties.

    Merging keeps the lower latency. Float sums are monotone, so that is exact unless two latencies
    differ by less than what later roundings can erase (``tau``): then a tie at the end could hide a
    lower bottleneck, and ``near_tie`` tells the caller to confirm with exact single-value passes.
    """

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.near_tie = False

    def min(self, lat: np.ndarray, bn: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Along ``axis``: the least latency, and the least bottleneck among the entries that reach it."""
        m = lat.min(axis=axis, keepdims=True)
        eq = lat == m
        if not self.near_tie:
            self.near_tie = bool(np.count_nonzero(lat <= m + self.tau) != np.count_nonzero(eq))
        return m.squeeze(axis), np.where(eq, bn, _INF).min(axis=axis)

    def into(self, tl: np.ndarray, tb: np.ndarray, cl: np.ndarray, cb: np.ndarray) -> None:
        """Where (cl, cb) is lexicographically below (tl, tb), overwrite the targets in place."""
        eq = cl == tl
        if not self.near_tie:
            close = cl <= tl + self.tau
            close &= tl <= cl + self.tau
            self.near_tie = bool(np.count_nonzero(close) != np.count_nonzero(eq))
        better = cl < tl
        better |= eq & (cb < tb)
        np.copyto(tl, cl, where=better)
        np.copyto(tb, cb, where=better)
