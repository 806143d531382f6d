"""Placement from measured profiles, on a real loopback cluster: MEASURE, the planner's deploy, `edgesplit plan`.

Three workers; w2 runs with ``--slowdown 3`` (every forward pass takes three times as long,
the extra asleep), so the profiles the workers take on their own must say so and the
planner must give w2 less work. The model is a 6-block ViT at 64 px so profiling is quick.
"""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

SLOW = 3.0


@pytest.fixture(scope="module")
def vit_store(tmp_path_factory):
    import timm

    from edgesplit.partitioner import BlockStore, partition, timm_recipe

    root = tmp_path_factory.mktemp("placement-store")
    torch.manual_seed(0)
    recipe = timm_recipe("vit_tiny_patch16_224", depth=6, img_size=64)
    model = timm.create_model(recipe["arch"], pretrained=False, **recipe["kwargs"]).eval()
    partition(model, "vit6", recipe, BlockStore(root), profile=False)
    return root, model


@pytest.fixture(scope="module")
def slow_cluster(vit_store):
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    lc = LocalCluster(LocalClusterConfig(workers=3, port=0, torch_threads=1), store=vit_store[0],
                      worker_args={2: ["--slowdown", str(SLOW)]})
    lc.start(timeout_s=90)
    try:
        yield lc
    finally:
        lc.stop()


@pytest.fixture(scope="module")
def measured(slow_cluster):
    cl = slow_cluster.client(control_timeout_ms=120_000)
    return cl.measure("vit6", reps=7, probe_s=0.3)


def _after_runs(cluster, cl, stages, x, n: int) -> dict:
    """Deploy vit6 as ``stages``, run ``x`` through it ``n`` times; the workers' records once heartbeats count them.

    The coordinator's record is a worker's last heartbeat: read at once, it can still describe the plan before
    (an earlier test's shorter stage 1 on w2 read as this one's). So wait for a heartbeat whose run count of the
    last stage includes these ``n``, then one more interval for the other workers' heartbeats.
    """
    import time

    hb_s = cluster.cfg.heartbeat_ms / 1000
    cl.deploy("vit6", stages=stages)
    last = (stages[-1][0], len(stages) - 1)

    def runs() -> int:
        return {w.name: w for w in cl.workers()}[last[0]].stage_stats().get(("vit6", last[1]), {}).get("n", 0)

    time.sleep(2 * hb_s)  # every run before this deploy is in a heartbeat by now
    before = runs()
    for _ in range(n):
        cl.infer("vit6", x)
    deadline = time.monotonic() + 10 * hb_s
    while runs() < before + n:
        assert time.monotonic() < deadline, f"no heartbeat from {last[0]} counted {n} runs in {10 * hb_s:.0f} s"
        time.sleep(hb_s / 5)
    time.sleep(hb_s)
    return {w.name: w for w in cl.workers()}


def test_workers_profile_their_own_device_and_probe_links(slow_cluster, measured):
    m = measured
    assert sorted(m.workers) == ["w0", "w1", "w2"] and not m.errors, m.errors
    n = len(m.block_bytes)
    assert n == 8  # patch embed, 6 blocks, head
    totals = {name: sum(w.profiles[1]) for name, w in m.workers.items()}
    for name, w in m.workers.items():
        assert len(w.profiles[1]) == n and all(ms > 0 for ms in w.profiles[1])
        assert len(w.first[1]) == n and all(ms > 0 for ms in w.first[1])  # each block also as a stage's first
        assert sorted(w.links) == sorted(set(m.workers) - {name})  # every other worker, measured to receipt
        assert all(rate > 1e6 and rtt > 0 for rate, rtt in w.links.values())  # loopback: well above 1 MB/s
    assert m.workers["w2"].slowdown == SLOW
    fast = (totals["w0"] + totals["w1"]) / 2
    # w2's own profile shows its slowdown (above it, not below: on sub-millisecond blocks the sleep that
    # emulates it overshoots, in serving as in the profile)
    assert 0.7 * SLOW < totals["w2"] / fast < 2.5 * SLOW, totals
    assert sorted(m.client_links) == ["w0", "w1", "w2"] and all(r > 1e6 for r, _ in m.client_links.values())
    # cached per model, device and settings in each worker's store
    assert list((slow_cluster.workdir / "w2" / "profiles").glob("*.json"))


def test_planner_gives_the_slow_worker_less_and_deploy_uses_it(slow_cluster, measured, vit_store):
    from edgesplit.scheduling.placement import plan_placement

    cl = slow_cluster.client(control_timeout_ms=120_000, timeout_ms=30_000)
    placement = plan_placement(measured.problem(), "throughput")
    per_worker = {s.worker: s.compute_ms for s in placement.stages}
    assert len(placement.stages) >= 2
    if "w2" in per_worker:  # the slow worker may get a share, never the biggest in blocks
        blocks = {s.worker: s.end - s.start for s in placement.stages}
        assert blocks["w2"] <= min(b for w, b in blocks.items() if w != "w2")
    # the default deploy path is the planner's (it measures again: the profiles are cached now)
    route = cl.deploy("vit6")
    planned = cl.placements["vit6"]
    assert [(h.worker, h.start, h.end) for h in route.hops] == [(s.worker, s.start, s.end) for s in planned.stages]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = vit_store[1](x)
    assert torch.allclose(cl.infer("vit6", x), ref, atol=1e-4)


def test_cli_plan_json_and_deploy_compare(slow_cluster, capsys):
    from edgesplit.runtime import cli

    assert cli.main(["plan", "vit6", "--coordinator", slow_cluster.endpoint, "--json", "--reps", "5",
                     "--probe-s", "0.2", "--objective", "latency"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["objective"] == "latency"
    assert out["equal_split"] is not None
    assert out["plan"]["latency_ms"] <= out["equal_split"]["latency_ms"] + 1e-9  # exact: never worse
    assert cli.main(["plan", "vit6", "--coordinator", slow_cluster.endpoint, "--reps", "5", "--probe-s", "0.2",
                     "--deploy", "--requests", "20", "--calibrate"]) == 0
    text = capsys.readouterr().out
    assert "predicted ms" in text and "measured ms" in text and "stage 0 on" in text
    assert "equal blocks over" in text
    assert "calibration (measured / predicted compute per worker):" in text and "calibrated plan" in text
    assert text.count("predicted ms") == 2  # the calibrated plan measured beside its own prediction
    assert cli.main(["plan", "vit6", "--coordinator", slow_cluster.endpoint, "--calibrate"]) == 2  # usage
    assert "--calibrate needs --deploy" in capsys.readouterr().err


def test_cli_deploy_calibrates_the_planned_deploy_by_default(slow_cluster, vit_store, capsys):
    from edgesplit.runtime import cli

    ep = slow_cluster.endpoint
    assert cli.main(["deploy", "vit6", "--coordinator", ep, "--calibrate", "-1"]) == 2
    assert "--calibrate takes a number of requests" in capsys.readouterr().err
    assert cli.main(["deploy", "vit6", "--coordinator", ep, "--calibrate", "20"]) == 0
    text = capsys.readouterr().out
    assert "calibration (measured / predicted compute per worker):" in text and "calibrated plan" in text
    assert text.count("measured ms") == 1  # the calibrated plan, measured beside its own prediction
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("stage ") and " on " in line]
    assert rows and all(r[-1].endswith("%") for r in rows), text  # every stage ran: an error in %
    cl = slow_cluster.client(timeout_ms=30_000)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = vit_store[1](x)
    assert torch.allclose(cl.infer("vit6", x), ref, atol=1e-4)  # whatever plan calibration left, it serves
    assert cli.main(["deploy", "vit6", "--coordinator", ep, "--calibrate", "0"]) == 0
    assert "calibration" not in capsys.readouterr().out


def test_calibration_scales_each_worker_by_its_stages_measured_over_predicted():
    from edgesplit.runtime.placement import Measurements, WorkerMeasure, calibration

    rows = [{"worker": "a", "predicted_ms": 10.0, "measured_ms": 13.0, "n": 20},
            {"worker": "a", "predicted_ms": 30.0, "measured_ms": 39.0, "n": 20},  # a: 52 / 40 = 1.3
            {"worker": "b", "predicted_ms": 10.0, "measured_ms": 8.0, "n": 20},
            {"worker": "c", "predicted_ms": 10.0, "measured_ms": 50.0, "n": 2},  # too few runs: no factor
            {"worker": "d", "predicted_ms": 10.0, "measured_ms": 1000.0, "n": 20},  # clamped
            {"worker": "e", "predicted_ms": 10.0, "measured_ms": None, "n": 0},
            {"what": "hop a->b", "predicted_ms": 5.0, "measured_ms": 50.0, "n": None}]  # hops are not compute
    f = calibration(rows)
    assert f == pytest.approx({"a": 1.3, "b": 0.8, "d": 4.0})
    # a worker that ran nothing is as far off as the median of those that did, not taken at its word
    assert calibration(rows, ["a", "b", "d", "z"]) == pytest.approx({"a": 1.3, "b": 0.8, "d": 4.0, "z": 1.3})
    assert calibration([], ["a"]) == {}
    w = {n: WorkerMeasure(n, f"tcp://{n}:1", "cpu", 1.0, 1 << 30, {1: [1.0, 2.0]}, {}, {1: [2.0, 3.0]}) for n in "ab"}
    m = Measurements("m", [1, 1], [4, 4], 4, w)
    s = m.scaled(f)
    assert s.workers["a"].profiles[1] == pytest.approx([1.3, 2.6]) and s.workers["b"].profiles[1] == [0.8, 1.6]
    assert s.workers["a"].first[1] == pytest.approx([2.6, 3.9])  # first-block times scale alike
    assert s.problem().workers[0].first_ms == pytest.approx((2.6, 3.9))
    assert m.workers["a"].profiles[1] == [1.0, 2.0]  # the original is untouched


def test_measure_refuses_unknown_workers_and_bad_orders(slow_cluster):
    from edgesplit.runtime.errors import RuntimeFailure
    from edgesplit.partitioner import EdgesplitError

    cl = slow_cluster.client()
    with pytest.raises((EdgesplitError, RuntimeFailure), match="not registered"):
        cl.measure("vit6", workers=["nobody"])
    with pytest.raises((EdgesplitError, RuntimeFailure), match="batches"):
        cl.measure("vit6", workers=["w0"], batches=(0,))
    with pytest.raises((EdgesplitError, RuntimeFailure), match="not in the coordinator's store"):
        cl.measure("no-such-model")


def test_serving_link_meter_times_receipt_not_the_next_stage(slow_cluster):
    """w0 -> w2 (slowed: its stage takes tens of ms): the meter must see loopback speed, not bytes / w2's compute."""
    cl = slow_cluster.client(timeout_ms=30_000)
    x = torch.randn(8, 3, 64, 64)  # 8 samples: 104 kB per message, and a stage long against its transfer
    workers = _after_runs(slow_cluster, cl, [("w0", 0, 2), ("w2", 2, 8)], x, 12)
    rate = workers["w0"].telemetry.get(f"link_rate_bps {workers['w2'].endpoint}")
    stage_ms = workers["w2"].stage_stats()[("vit6", 1)]["compute_ms_p50"]
    assert rate and stage_ms
    act_bytes = 8 * 17 * 192 * 4  # 8 x (16 patches + class token) x 192 wide, float32
    to_compute = act_bytes / (stage_ms / 1000)  # what timing to the ACK (after w2's compute) would report
    print(f"\nw0 -> w2 measured {rate / 1e6:.1f} MB/s; bytes / w2's stage time {to_compute / 1e6:.2f} MB/s")
    assert rate > 3 * to_compute  # timed to the ACK it could not exceed 1x: the ACK follows w2's compute


def test_profile_times_each_block_after_its_predecessor_and_as_a_first_block(vit_store, tmp_path):
    from edgesplit.partitioner import BlockStore
    from edgesplit.runtime.worker.profile import profile, profile_key

    manifest = BlockStore(vit_store[0]).manifest("vit6")
    cpu = torch.device("cpu")
    got = profile(manifest, cpu, tmp_path, [1], reps=3)[1]
    assert len(got.block_ms) == len(got.first_ms) == manifest.n_blocks
    assert all(ms > 0 for ms in [*got.block_ms, *got.first_ms])
    path = tmp_path / "profiles" / f"{profile_key(manifest, cpu, 1, 1.0)}.json"
    cached = json.loads(path.read_text())
    assert cached == {"block_ms": got.block_ms, "first_ms": got.first_ms}
    path.write_text(json.dumps({"block_ms": [7.0] * manifest.n_blocks, "first_ms": [9.0] * manifest.n_blocks}))
    again = profile(manifest, cpu, tmp_path, [1], reps=3)[1]
    assert again.block_ms == [7.0] * manifest.n_blocks and again.first_ms == [9.0] * manifest.n_blocks  # the cache
    path.write_text(json.dumps([7.0] * manifest.n_blocks))  # an older format, or garbage: timed again
    fresh = profile(manifest, cpu, tmp_path, [1], reps=3)[1]
    assert fresh.block_ms != [7.0] * manifest.n_blocks and len(fresh.first_ms) == manifest.n_blocks


def test_a_stage_placed_again_after_a_plan_without_it_starts_a_new_window(slow_cluster):
    """w2 runs hop 1 as 7 blocks, then no hop 1 (a plan between), then hop 1 as the head alone: its median is the
    head's, not the 7 blocks' left over from two plans before (compare() and calibration read it)."""
    cl = slow_cluster.client(timeout_ms=30_000)
    x = torch.randn(1, 3, 64, 64)

    def p50_after(stages, n):
        workers = _after_runs(slow_cluster, cl, stages, x, n)
        return workers["w2"].stage_stats().get(("vit6", 1), {}).get("compute_ms_p50", 0)

    long = p50_after([("w0", 0, 1), ("w2", 1, 8)], 12)
    p50_after([("w2", 0, 8)], 2)
    short = p50_after([("w0", 0, 7), ("w2", 7, 8)], 3)
    assert 0 < short < long / 3, (short, long)
