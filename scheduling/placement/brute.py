"""``brute_force_placement``: every plan enumerated and ranked as ``plan_placement`` ranks them (the test oracle)."""
from __future__ import annotations

import itertools

from .price import Placement, _check_objective, _cut_bytes, _seq_sum, evaluate_placement
from .problem import ACCURACY_TOL, CLIENT, CutCodec, PlacementProblem, _infeasible


# --- the oracle ------------------------------------------------------------------------------------
def brute_force_placement(problem: PlacementProblem, objective: str = "throughput") -> Placement:
    """Enumerate every plan (stage counts, cut sets, worker orders, codec choices): the test oracle.

    Exponential; meant for a handful of blocks and workers. Ranks as ``plan_placement`` does.
    """
    _check_objective(objective)
    p, n = problem, problem.n_blocks
    ws = p.workers
    bound = p.max_accuracy_cost + ACCURACY_TOL
    options: dict[int, list[CutCodec | None]] = {
        c: [None] + [d for d in p.codecs if d.cut == c] for c in range(1, n)}
    stage_cache: dict[tuple[int, int, int], float] = {}
    hop_cache: dict[tuple[int, int, int, str | None], float] = {}
    fits = {(v, a, b): not 0 < ws[v].memory_bytes < sum(p.block_bytes[a:b])
            for v in range(len(ws)) for a in range(n) for b in range(a + 1, n + 1)}

    def stage_ms(v: int, a: int, b: int) -> float:
        key = (v, a, b)
        if key not in stage_cache:
            stage_cache[key] = _seq_sum(ws[v].stage_blocks(a, b))
        return stage_cache[key]

    def hop(src: int, dst: int, cut: int, codec: CutCodec | None) -> float:
        """src/dst -1: the client; cut 0: the input, cut n: the output."""
        key = (src, dst, cut, codec.name if codec else None)
        if key not in hop_cache:
            nbytes = (p.input_bytes * p.batch if cut == 0 else p.act_bytes[-1] * p.batch if cut == n
                      else _cut_bytes(p, cut, codec))
            hop_cache[key] = p.transfer_ms(ws[src].name if src >= 0 else CLIENT,
                                           ws[dst].name if dst >= 0 else CLIENT, nbytes)
        return hop_cache[key]

    best: tuple | None = None
    for k in range(1, p.stage_limit + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            spans = list(zip(bounds, bounds[1:]))
            for order in itertools.permutations(range(len(ws)), k):
                if not all(fits[(v, a, b)] for v, (a, b) in zip(order, spans)):
                    continue
                for choice in itertools.product(*(options[c] for c in cuts)):
                    acc = 0.0
                    for d in choice:
                        if d is not None:
                            acc += d.accuracy_cost
                    if acc > bound:
                        continue
                    lat, worst, prev = 0.0, 0.0, -1
                    for i, (v, (a, b)) in enumerate(zip(order, spans)):
                        cin = choice[i - 1] if i else None
                        cout = choice[i] if i < k - 1 else None
                        h = hop(prev, v, a, cin)
                        s = stage_ms(v, a, b) + (cin.decode_ms if cin else 0.0) + (cout.encode_ms if cout else 0.0)
                        lat += h
                        lat += s
                        worst = max(worst, h, s)
                        prev = v
                    h = hop(prev, -1, n, None)
                    lat += h
                    worst = max(worst, h)
                    primary, secondary = (worst, lat) if objective == "throughput" else (lat, worst)
                    key = (primary, secondary, acc, k, order, cuts, tuple(-1 if d is None else p.codecs.index(d)
                                                                           for d in choice))
                    if best is None or key < best[0]:
                        best = (key, order, spans, choice)
    if best is None:
        raise _infeasible(p)
    _, order, spans, choice = best
    stages = [(ws[v].name, a, b) for v, (a, b) in zip(order, spans)]
    codecs = {a: d.name for (a, _), d in zip(spans[1:], choice) if d is not None}
    return evaluate_placement(p, stages, codecs, objective)
