"""The coordinator's Prometheus endpoint, scraped from a real cluster (coordinator + 2 workers on 127.0.0.1).

Requests that end every way a test can cause cheaply (results, a bad input, deadlines too
short for a slow stage, scheduled requests) must each show up in the family that counts
them; the INA3221 power parser reads a fake sysfs tree of each JetPack layout; a
heartbeat's metric rows stay within the header limit however many stages a worker has seen.
"""
from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from edgesplit.runtime import protocol as P
from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig, stable_port
from edgesplit.runtime.errors import BadInput, RequestTimeout
from edgesplit.runtime.metrics import ClusterMetrics, parse_bind
from edgesplit.runtime.protocol import Msg
from edgesplit.runtime.telemetry import Telemetry, find_power_rails, read_power
from edgesplit.runtime.worker.control import HEADER_SLACK_BYTES, fit_rows
from edgesplit.runtime.worker.stage import COMPUTE_BUCKETS_MS, StageStats

ARCH = "test_vit"  # timm's 0.4 M-parameter ViT: 160 x 160 input, (101, 64) tokens between blocks
STALL_MS = 100  # w1's compute stall per request: a request with less time left is dropped there, unrun
BATCH = 2
CUT_BYTES = BATCH * 101 * 64 * 4  # one fp32 activation at the cut, raw link
SCRAPE_BOUND_S = 15.0  # heartbeats every 250 ms: every figure is in /metrics well within this


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # 2 shared cores; the daemons need them


@pytest.fixture(scope="module")
def metrics_cluster(tmp_path_factory: pytest.TempPathFactory):
    import timm

    from edgesplit.partitioner import BlockStore, partition, timm_recipe

    root = tmp_path_factory.mktemp("metrics-store")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False).eval()
    partition(model, ARCH, timm_recipe(ARCH), BlockStore(root), profile=False)
    port = stable_port()
    lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1, heartbeat_ms=250), store=root,
                      worker_args={1: ["--stall-ms", str(STALL_MS)]},
                      coordinator_args=["--metrics-bind", f"127.0.0.1:{port}"])
    lc.start(timeout_s=60)
    try:
        yield lc, port, model
    finally:
        lc.stop()


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of every ``edgesplit_`` family (parsed by prometheus_client)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("edgesplit_"):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


@pytest.mark.timeout(120)
def test_every_family_counts_a_real_run(metrics_cluster):
    lc, port, model = metrics_cluster
    cl = lc.client(timeout_ms=30_000)
    route = cl.deploy(ARCH, workers=["w0", "w1"], n_stages=2)
    w1_endpoint = route.hops[1].endpoint
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 160, 160, generator=g)
    with torch.inference_mode():
        ref = model(x)
    for _ in range(4):
        assert torch.allclose(cl.infer(ARCH, x), ref, atol=1e-5)
    with pytest.raises(BadInput):
        cl.infer(ARCH, torch.randn(1, 3, 96, 96))
    late = [cl.submit(ARCH, x, timeout_ms=STALL_MS * 6 // 10) for _ in range(3)]  # w1 needs >= STALL_MS
    for f in late:
        with pytest.raises(RequestTimeout):
            f.result(timeout=30)
    for f in [cl.submit(ARCH, x, deadline_ms=20_000) for _ in range(2)]:  # scheduled: ADMIT ... DONE
        assert torch.allclose(f.result(timeout=30), ref, atol=1e-5)

    def complete(s: dict) -> bool:
        return (_value(s, "edgesplit_requests_total", worker="w1", outcome="result") >= 6
                and _value(s, "edgesplit_requests_total", outcome="deadline_dropped") >= 1
                and _value(s, "edgesplit_request_latency_seconds_count", model=ARCH) >= 2
                and _value(s, "edgesplit_link_rate_bytes_per_second", worker="w0") > 0)

    deadline = time.monotonic() + SCRAPE_BOUND_S
    s = _scrape(port)
    while not complete(s) and time.monotonic() < deadline:
        time.sleep(0.25)
        s = _scrape(port)
    figures = {k: v for k, v in s.items() if not k.endswith("_bucket")}
    print("\n".join(f"{k} {lab} {v:g}" for k, rows in sorted(figures.items()) for lab, v in rows))

    # requests by outcome, per worker and model
    req = "edgesplit_requests_total"
    assert _value(s, req, worker="w1", model=ARCH, outcome="result") >= 6
    assert _value(s, req, worker="w0", model=ARCH, outcome="forwarded") >= 6
    assert _value(s, req, worker="w0", model=ARCH, outcome="bad_input") == 1
    assert _value(s, req, model=ARCH, outcome="deadline_dropped") >= 1
    # stage compute histograms: w1's every request took at least its stall
    for worker, hop in (("w0", "0"), ("w1", "1")):
        n = _value(s, "edgesplit_stage_compute_seconds_count", worker=worker, model=ARCH, hop=hop)
        assert n >= 6 and _value(s, "edgesplit_stage_compute_seconds_sum", worker=worker, hop=hop) > 0
        assert _value(s, "edgesplit_stage_compute_seconds_bucket", worker=worker, hop=hop, le="+Inf") == n
        assert _value(s, "edgesplit_stage_compute_p50_seconds", worker=worker, hop=hop) > 0
    assert _value(s, "edgesplit_stage_compute_seconds_bucket", worker="w1", hop="1", le="0.05") == 0
    assert _value(s, "edgesplit_stage_compute_p50_seconds", worker="w1") >= STALL_MS / 1000
    assert _value(s, "edgesplit_stage_errors_total", worker="w0", hop="0") == 1  # the bad input
    # end-to-end latency of the scheduled requests, on the coordinator's clock
    assert _value(s, "edgesplit_request_latency_seconds_count", model=ARCH) == 2
    assert _value(s, "edgesplit_request_latency_seconds_sum", model=ARCH) >= 2 * STALL_MS / 1000
    assert _value(s, "edgesplit_scheduled_requests_total", model=ARCH, deadline="met") == 2
    assert _value(s, "edgesplit_admission_total", decision="admitted") == 2
    # bytes per link: every message w0 sent w1 is one raw activation of the cut
    msgs = _value(s, "edgesplit_link_sent_messages_total", worker="w0", endpoint=w1_endpoint, peer="w1")
    assert msgs >= 6
    assert _value(s, "edgesplit_link_sent_bytes_total", worker="w0", peer="w1") == msgs * CUT_BYTES
    assert _value(s, "edgesplit_link_rate_bytes_per_second", worker="w0", endpoint=w1_endpoint, peer="w1") > 0
    # block cache: loaded at deploy (misses), found resident by every request (hits)
    for worker in ("w0", "w1"):
        for name in ("hits_total", "misses_total", "loaded_bytes_total", "load_seconds_total",
                     "load_rate_bytes_per_second", "resident_bytes", "budget_bytes"):
            assert _value(s, f"edgesplit_cache_{name}", worker=worker) > 0, (worker, name)
        # worker telemetry and state
        for name in ("resident_memory_bytes", "memory_available_bytes", "memory_total_bytes", "open_fds", "up"):
            assert _value(s, f"edgesplit_worker_{name}", worker=worker) > 0, (worker, name)
        assert (worker,) in {(lab["worker"],) for lab, _ in s["edgesplit_worker_cpu_percent"]}
        assert _value(s, "edgesplit_worker_state", worker=worker, state="live") == 1
        assert _value(s, "edgesplit_worker_state", worker=worker, state="lost") == 0
        assert 0 <= _value(s, "edgesplit_worker_last_seen_seconds", worker=worker) < 5
        assert _value(s, "edgesplit_worker_events_total", worker=worker, event="computed") >= 6
    # Jetson sensors: present exactly when this host has them (the workers run here)
    has_thermal = any(Path("/sys/devices/virtual/thermal").glob("thermal_zone*"))
    assert bool(s.get("edgesplit_worker_temperature_celsius")) == has_thermal
    assert bool(s.get("edgesplit_worker_power_watts")) == bool(find_power_rails())
    assert bool(s.get("edgesplit_worker_gpu_memory_free_bytes")) == any(
        "cuda" in (w.device or "") for w in cl.workers())


def test_power_rails_from_fake_sysfs(tmp_path: Path):
    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    hw = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"  # JetPack 5/6 (mainline hwmon driver)
    for n, label, mv, ma in ((1, "VDD_IN", 5072, 1430), (2, "VDD_CPU_GPU_CV", 5064, 392), (3, "NC", 0, 0)):
        write(hw / f"in{n}_label", label)
        write(hw / f"in{n}_input", str(mv))
        write(hw / f"curr{n}_input", str(ma))
    write(hw / "in7_label", "sum of shunt voltages")
    write(hw / "in7_input", "1234")
    iio = tmp_path / "ina3221x" / "6-0040" / "iio:device0"  # JetPack 4 (NVIDIA's IIO driver)
    for n, label, mw in ((0, "POM_5V_IN", 3042), (1, "POM_5V_GPU", 79)):
        write(iio / f"rail_name_{n}", label)
        write(iio / f"in_power{n}_input", str(mw))
    roots = [tmp_path / "ina3221", tmp_path / "ina3221x"]

    rails = find_power_rails(roots)
    assert sorted(r.key for r in rails) == ["power_pom_5v_gpu_mw", "power_pom_5v_in_mw", "power_vdd_cpu_gpu_cv_mw",
                                           "power_vdd_in_mw"]
    got = Telemetry("cpu", jetson_sensors=True, power_roots=roots).sample()
    assert got["power_vdd_in_mw"] == pytest.approx(5072 * 1430 / 1000)
    assert got["power_vdd_cpu_gpu_cv_mw"] == pytest.approx(5064 * 392 / 1000)
    assert got["power_pom_5v_in_mw"] == 3042.0 and got["power_pom_5v_gpu_mw"] == 79.0
    (iio / "in_power1_input").unlink()  # a rail that stops reading is left out, the others stay
    assert set(read_power(rails)) == {"power_vdd_in_mw", "power_vdd_cpu_gpu_cv_mw", "power_pom_5v_in_mw"}
    assert not [k for k in Telemetry("cpu", power_roots=[tmp_path / "absent"]).sample() if k.startswith("power_")]


def test_heartbeat_metrics_fit_the_header_with_many_stages():
    stats = StageStats()
    for m in range(300):
        for hop in range(4):
            stats.add((f"model-{m:03d}-" + "x" * 100, hop), 3.0 * (hop + 1))
    rows = stats.histograms()
    assert len(rows) == 1200 and rows[0][3][COMPUTE_BUCKETS_MS.index(5.0)] == 1  # 3 ms counts in le=5 ms
    body = {"stages": [], "telemetry": {"cpu_percent": 1.0}, "stats": stats.report()[:40], "cache": {}, "resident": [],
            "counters": {}, "queue": 0, "kept": 0}
    room = P.HEADER_MAX_BYTES - HEADER_SLACK_BYTES - len(msgpack.packb(body))
    body["metrics"] = fit_rows({"outcomes": [[f"model-{m}", "result", 10**9] for m in range(1000)],
                                "links": [[f"tcp://10.0.0.{i}:5601", 10**12, 10**6] for i in range(200)],
                                "hist": rows}, room)
    frames = P.encode(Msg.HEARTBEAT, P.new_rid(), 3000, {"body": body})  # raises past HEADER_MAX_BYTES
    got = P.decode(frames).body["metrics"]
    assert 0 < len(got["outcomes"]) < 1000 and got["links"] == [] and got["hist"] == []  # rows in order, then none
    assert len(frames[0]) > P.HEADER_MAX_BYTES - 2 * HEADER_SLACK_BYTES  # the room was used, not wasted


def test_collector_skips_malformed_rows():
    m = ClusterMetrics({"admitted": 3})
    hist = ["m", 0, 12.5, [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]  # 10 ms and 25 ms
    junk = {"outcomes": [["m", "result", 5], ["m", "result", -1], [1, "x", 2], "row", ["m", "bad_input", True],
                         ["m", "result", 7]],  # repeated: only the first counts (a repeated series voids a scrape)
            "links": [["tcp://a:1", 100, 2], ["tcp://b:1", math.inf, 1], ["tcp://c:1", 1]],
            "hist": [hist, ["m", 1, 1.0, [1, 2]], ["m", -1, 1.0, hist[3]], ["m", 2, "x", hist[3]],
                     ["m", 0, 1.0, [9] * 13]]}
    m.heartbeat("w0", "tcp://w0:1", {"cpu_percent": 5.0, "temp_gpu_c": 40.0, "power_vdd_in_mw": 5000.0}, [],
                {"hits": 2, "misses": "x"}, junk, deploying=True)
    m.heartbeat("w1", "tcp://a:1", {}, [], {}, "not a map", deploying=False)
    m.lost("w1")
    fams = {f.name: f for f in m.collect()}
    assert all(name.startswith("edgesplit_") for name in fams)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert [k for k in samples if k[0] == "edgesplit_requests_total"] == [
        ("edgesplit_requests_total", (("model", "m"), ("outcome", "result"), ("worker", "w0")))]
    assert samples[("edgesplit_requests_total", (("model", "m"), ("outcome", "result"), ("worker", "w0")))] == 5
    assert samples[("edgesplit_link_sent_bytes_total", (("endpoint", "tcp://a:1"), ("peer", "w1"),
                                                        ("worker", "w0")))] == 100
    assert len([k for k in samples if k[0] == "edgesplit_link_sent_bytes_total"]) == 1
    assert samples[("edgesplit_stage_compute_seconds_count", (("hop", "0"), ("model", "m"), ("worker", "w0")))] == 2
    assert samples[("edgesplit_stage_compute_seconds_bucket", (("hop", "0"), ("le", "0.01"), ("model", "m"),
                                                               ("worker", "w0")))] == 1
    assert samples[("edgesplit_worker_power_watts", (("rail", "vdd_in"), ("worker", "w0")))] == 5.0
    assert samples[("edgesplit_worker_state", (("state", "deploying"), ("worker", "w0")))] == 1
    assert samples[("edgesplit_worker_up", (("worker", "w1"),))] == 0
    assert samples[("edgesplit_cache_hits_total", (("worker", "w0"),))] == 2
    assert not [k for k in samples if k[0] == "edgesplit_cache_misses_total"]
    assert samples[("edgesplit_admission_total", (("decision", "admitted"),))] == 3


def test_parse_bind():
    assert parse_bind("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_bind(":9464") == ("0.0.0.0", 9464)
    assert parse_bind("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:http", "host:70000"):
        with pytest.raises(Exception, match="HOST:PORT"):
            parse_bind(bad)


def test_dashboard_queries_name_real_metrics():
    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "edgesplit-dashboard.json").read_text())
    exposed = set()
    for fam in ClusterMetrics().collect():  # every family is yielded, empty or not
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(fam.type, [""])
        exposed.update(fam.name + s for s in suffixes)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    named = {m for p in panels for t in p["targets"] for m in re.findall(r"edgesplit_\w+", t["expr"])}
    assert named and named <= exposed, sorted(named - exposed)
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])
