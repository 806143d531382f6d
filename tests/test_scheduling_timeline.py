"""Problem model and timeline evaluator: hand-worked timelines, residency, uplink policies."""
import itertools
import math
import random
from dataclasses import replace

import pytest

from edgesplit.partitioner.errors import EdgesplitError
from edgesplit.scheduling import (ModelLibrary, Problem, Request, ScheduleError, ServerConfig, UplinkConfig,
                                  backbone_structure, evaluate, solve_exact)

V = 100.0  # load rate, bytes/s: sizes below are small so that times are round numbers


def _library() -> ModelLibrary:
    # cluster c: backbone 400 B, A adds 100 B, B adds 200 B; cluster d: backbone 300 B, X adds 50 B
    return ModelLibrary.from_backbones({"c": ([400], {"A": [100], "B": [200]}), "d": ([300], {"X": [50]})})


def _problem(server=None, uplink=None, deadlines=(10.0, 20.0, 30.0)) -> Problem:
    reqs = (Request("r0", "u0", "A", 300, 1.0, deadlines[0]),
            Request("r1", "u1", "B", 100, 1.0, deadlines[1]),
            Request("r2", "u2", "X", 0, 0.5, deadlines[2]))
    return Problem(_library(), reqs, server or ServerConfig(V), uplink or UplinkConfig())


def _times(tl):
    return [t for j in tl.jobs for t in (j.load_start_s, j.load_end_s, j.start_s, j.end_s)]


def _flat(rows):
    return pytest.approx([t for row in rows for t in row])


@pytest.mark.timeout(10)
def test_timeline_no_overlap_by_hand():
    tl = evaluate(_problem(), [0, 1, 2])
    # A loads all 500 B (5 s); B only its private 200 B (2 s); X crosses clusters: 350 B (3.5 s)
    assert _times(tl) == _flat([(0, 5, 5, 6), (6, 8, 8, 9), (9, 12.5, 12.5, 13)])
    assert [j.load_bytes for j in tl.jobs] == [500, 200, 350] and tl.loaded_bytes == 1050
    assert tl.feasible and tl.served == 3 and tl.order == (0, 1, 2)


@pytest.mark.timeout(10)
def test_timeline_with_overlap_and_memory_budget():
    tl = evaluate(_problem(ServerConfig(V, overlap_load=True)), [0, 1, 2])
    # B loads while A runs (from 5, when the loader is free); X loads from 7, while B runs
    assert _times(tl) == _flat([(0, 5, 5, 6), (5, 7, 7, 8), (7, 10.5, 10.5, 11)])
    # 800 B of memory: A u B (700 B) may overlap, B u X (950 B) may not: X waits for B to end
    tl = evaluate(_problem(ServerConfig(V, overlap_load=True, memory_budget_bytes=800)), [0, 1, 2])
    assert _times(tl)[8:] == pytest.approx([8, 11.5, 11.5, 12])
    # a model larger than memory cannot be served
    tl = evaluate(_problem(ServerConfig(V, memory_budget_bytes=550)), [1])
    assert not tl.feasible and "memory" in tl.violations[0]


def _old_rule_ends(p: Problem, order) -> list[float]:
    """End times under the overlap rule before issue 17 (load waits for the job two back), no uplink."""
    lib, srv = p.library, p.server
    ends, e1, e2, le, prev = [], srv.start_s, srv.start_s, srv.start_s, None
    for n, k in enumerate(order):
        r = p.requests[k]
        blocks = lib.models[r.model]
        if prev is None:
            start, load = srv.start_s, lib.blocks_bytes(blocks - srv.resident_blocks)
        else:
            load = lib.blocks_bytes(blocks - lib.models[prev])
            start = max(le, e2) if lib.blocks_bytes(blocks | lib.models[prev]) <= srv.memory_budget_bytes else e1
        le = start + load / srv.load_rate_bytes_per_s
        e2, e1 = e1, max(le, e1) + r.infer_s
        ends.append(e1)
        prev = r.model
    return ends


def _best_count(p: Problem, feasible) -> int:
    return max((n for n in range(len(p.requests) + 1)
                for sub in itertools.permutations(range(len(p.requests)), n) if feasible(list(sub))), default=0)


@pytest.mark.timeout(10)
def test_overlap_waits_only_for_models_in_memory():
    """Issue 17: with overlap, the next load waits for what occupies memory, not for the job two back.

    A is resident; two A jobs (5 s, 1 s) then B (3 s to load). Both A jobs hold one model, so B may
    load from t=0 while A runs: it is ready at 3 and runs 6..7. The old rule made B's load wait for
    the first A job (t=5): ready at 8, too late. Brute force over every ordered subset: the old rule
    serves 2 of 3, the new one 3, and the evaluator and the exact solver agree the 3 are feasible.
    """
    lib = ModelLibrary({"a": 300, "b": 300}, {"A": frozenset({"a"}), "B": frozenset({"b"})})
    reqs = (Request("a1", "u0", "A", 0, 5.0, 5.0), Request("a2", "u1", "A", 0, 1.0, 6.0),
            Request("b1", "u2", "B", 0, 1.0, 7.0))
    p = Problem(lib, reqs, ServerConfig(V, resident_blocks=frozenset({"a"}), overlap_load=True,
                                        memory_budget_bytes=600))
    old = _best_count(p, lambda o: all(e <= p.requests[k].deadline_s + 1e-9 for k, e in zip(o, _old_rule_ends(p, o))))
    new = _best_count(p, lambda o: evaluate(p, o).feasible)
    tl = evaluate(p, [0, 1, 2])
    print(f"\noverlap rule, 3 requests: old rule serves {old}, new rule serves {new}; "
          f"B loads {tl.jobs[2].load_start_s:g}..{tl.jobs[2].load_end_s:g} s, ends {tl.jobs[2].end_s:g} s")
    assert (old, new) == (2, 3)
    assert _times(tl) == _flat([(0, 0, 0, 5), (0, 0, 5, 6), (0, 3, 6, 7)]) and tl.feasible
    assert solve_exact(p).served == 3
    # memory still binds: A u B (600 B) does not fit in 500 B, so B loads after the last A job
    tight = replace(p, server=replace(p.server, memory_budget_bytes=500))
    assert evaluate(tight, [0, 1, 2]).jobs[2].load_start_s == pytest.approx(6.0)
    assert solve_exact(tight).served == 2
    # a different model in between does hold memory: A(5 s), C, B waits for A's end as before
    lib3 = ModelLibrary({"a": 300, "b": 300, "c": 0}, {"A": frozenset({"a"}), "B": frozenset({"b"}),
                                                       "C": frozenset({"c"})})
    p3 = Problem(lib3, (reqs[0], Request("c1", "u1", "C", 0, 1.0, 6.0), reqs[2]), p.server)
    assert evaluate(p3, [0, 1, 2]).jobs[2].load_start_s == pytest.approx(5.0)


@pytest.mark.timeout(10)
def test_resident_blocks_at_start():
    lib = _library()
    backbone_c = frozenset(b for b in lib.block_bytes if b.startswith("c/bb"))
    tl = evaluate(_problem(ServerConfig(V, resident_blocks=backbone_c)), [1, 0])
    assert [j.load_bytes for j in tl.jobs] == [200, 100]
    assert _times(tl) == _flat([(0, 2, 2, 3), (3, 4, 4, 5)])


@pytest.mark.timeout(10)
def test_edf_link_delays_starts():
    tl = evaluate(_problem(uplink=UplinkConfig("edf", total_rate_bytes_per_s=50.0)), [0, 1, 2])
    # uploads in service order: r0's 300 B end at 6, r1's 100 B at 8
    assert [j.upload_end_s for j in tl.jobs] == pytest.approx([6, 8, 0])
    assert _times(tl) == _flat([(0, 5, 6, 7), (7, 9, 9, 10), (10, 13.5, 13.5, 14)])


@pytest.mark.timeout(10)
def test_static_split_uses_latest_timeline():
    p = _problem(uplink=UplinkConfig("static", total_rate_bytes_per_s=40.0))
    tl = evaluate(p, [0, 1, 2])
    # latest starts: X at 29.5; B must end by min(20, 29.5 - 3.5) -> 19; A by min(10, 19 - 2) -> 9
    assert [j.start_s for j in tl.jobs] == pytest.approx([9, 19, 29.5])
    assert [j.load_start_s for j in tl.jobs] == pytest.approx([0, 10, 20])
    assert tl.uplink_used == pytest.approx(300 / 9 + 100 / 19)
    assert tl.feasible
    tight = evaluate(replace(p, uplink=UplinkConfig("static", total_rate_bytes_per_s=38.0)), [0, 1, 2])
    assert not tight.feasible and "uplink" in tight.violations[0]


@pytest.mark.timeout(10)
def test_deadline_violation_is_reported():
    tl = evaluate(_problem(deadlines=(5.5, 20.0, 30.0)), [0, 1, 2])
    assert not tl.feasible and tl.served == 0
    assert tl.violations == ("r0: ends at 6.000000 s, deadline 5.500000 s",)


@pytest.mark.timeout(10)
def test_malformed_input_raises():
    p = _problem()
    with pytest.raises(ScheduleError, match="twice"):
        evaluate(p, [0, 0])
    with pytest.raises(ScheduleError, match="outside"):
        evaluate(p, [3])
    with pytest.raises(EdgesplitError, match="not in the library"):
        Problem(_library(), (Request("r", "u", "nope", 1, 1.0, 1.0),), ServerConfig(V))
    with pytest.raises(ScheduleError, match="appears twice"):
        Problem(_library(), (Request("r", "u", "A", 1, 1.0, 1.0),) * 2, ServerConfig(V))
    with pytest.raises(ScheduleError, match="unknown blocks"):
        ModelLibrary({"a": 1}, {"m": frozenset({"a", "b"})})
    with pytest.raises(ScheduleError, match="linear"):
        UplinkConfig("edf", "shannon")
    assert p.index_of(["r2", "r0"]) == [2, 0]


@pytest.mark.timeout(10)
def test_backbone_structure_detection():
    st = backbone_structure(_library())
    assert st is not None
    assert st.cluster_of["A"] == st.cluster_of["B"] != st.cluster_of["X"]
    assert sorted(st.backbone_bytes) == [350, 400]  # a one-model cluster is all backbone
    assert dict(st.private_bytes) == {"A": 100, "B": 200, "X": 0}
    # a block shared by two of a cluster's three models breaks the case
    ring = ModelLibrary({"a": 1, "b": 1, "c": 1}, {"m1": {"a", "b"}, "m2": {"b", "c"}, "m3": {"a", "c"}})
    assert backbone_structure(ring) is None


@pytest.mark.timeout(10)
def test_oblivious_view_reloads_whole_models():
    p = _problem()
    ob = p.oblivious()
    tl = evaluate(ob, [0, 1, 2])
    assert [j.load_bytes for j in tl.jobs] == [500, 600, 350]
    # a model wholly resident at the start stays free in the oblivious view, a partial one does not
    lib = _library()
    a_blocks = lib.models["A"]
    p0 = _problem(ServerConfig(V, resident_blocks=a_blocks))
    assert [j.load_bytes for j in evaluate(p0.oblivious(), [0, 1]).jobs] == [0, 600]
    assert [j.load_bytes for j in evaluate(p0.oblivious(), [1]).jobs] == [600]
    assert [j.load_bytes for j in evaluate(p0, [1]).jobs] == [200]


def _random_problem(rng: random.Random) -> Problem:
    sizes = {f"b{i}": rng.randint(1, 9) * 100 for i in range(rng.randint(2, 8))}
    models = {f"m{i}": {b for b in sizes if rng.random() < 0.5} or {rng.choice(list(sizes))}
              for i in range(rng.randint(1, 4))}
    reqs = []
    for k in range(rng.randint(1, 7)):
        arrival = rng.choice([0.0, rng.uniform(0, 2)])
        reqs.append(Request(f"r{k}", f"u{k}", rng.choice(list(models)), rng.randint(0, 5) * 100,
                            rng.uniform(0.05, 0.5), arrival + rng.uniform(0.2, 6), arrival))
    srv = ServerConfig(1000.0, start_s=rng.choice([0.0, 0.5]), overlap_load=rng.random() < 0.5,
                       memory_budget_bytes=rng.choice([math.inf, 3000]),
                       resident_blocks=frozenset(b for b in sizes if rng.random() < 0.3))
    return Problem(ModelLibrary(sizes, models), tuple(reqs), srv,
                   UplinkConfig("static", total_rate_bytes_per_s=rng.choice([300.0, 1000.0, 5000.0])))


@pytest.mark.timeout(30)
def test_random_timelines_hold_their_constraints():
    """Whatever the policy, a feasible timeline obeys every rule of the model, and the
    static split's feasibility implies the EDF link's (same rate, same order)."""
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        p = _random_problem(rng)
        order = list(range(len(p.requests)))
        rng.shuffle(order)
        order = order[:rng.randint(1, len(order))]
        static = evaluate(p, order)
        edf = evaluate(replace(p, uplink=UplinkConfig("edf", total_rate_bytes_per_s=p.uplink.total_rate_bytes_per_s)),
                       order)
        if static.feasible:
            assert edf.feasible, order
        for tl in (static, edf):
            if not tl.feasible:
                continue
            checked += 1
            jobs = tl.jobs
            for n, j in enumerate(jobs):
                req = p.requests[j.request_index]
                assert j.end_s <= j.deadline_s + 1e-9
                assert j.start_s >= max(j.load_end_s, j.upload_end_s) - 1e-9
                assert j.start_s >= max(req.arrival_s, p.server.start_s) - 1e-9
                assert j.load_end_s == pytest.approx(j.load_start_s + j.load_bytes / p.server.load_rate_bytes_per_s)
                if n:
                    assert j.start_s >= jobs[n - 1].end_s - 1e-9
                    overlap = p.server.overlap_load and p.library.blocks_bytes(
                        p.library.models[j.model] | p.library.models[jobs[n - 1].model]) <= \
                        p.server.memory_budget_bytes
                    assert j.load_start_s >= (jobs[n - 1].load_end_s if overlap else jobs[n - 1].end_s) - 1e-9
                    if overlap:  # memory holds two models: every job before the previous model's run has ended
                        q = n - 1
                        while q > 0 and jobs[q - 1].model == jobs[n - 1].model:
                            q -= 1
                        if q > 0:
                            assert j.load_start_s >= jobs[q - 1].end_s - 1e-9
            assert tl.uplink_used <= tl.uplink_budget * (1 + 1e-9)
        # sharing-oblivious costs are never below the true ones
        ob = evaluate(p.oblivious(), order)
        if ob.feasible:
            assert static.feasible
    assert checked > 500
