"""A bandwidth-limited link between two boards, for real: a network namespace, a veth pair, tc tbf.

The coordinator, worker w0 and the client live in this namespace on 10.x.0.1; worker "far"
lives in a namespace of its own on 10.x.0.2, and everything sent towards it passes a token
bucket of ``RATE_BYTES_PER_S``. A ViT cut between w0 and far carries a token codec. The
test changes the link's budget live and sees requests get faster by about what the bytes
say, then lets the budget follow the allocated rate under a deadline.

Needs root, ``ip netns`` and ``tc``; skips with the reason elsewhere. Traffic goes only to
the namespace this test creates.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time

import pytest
import torch
from linkbed import far_worker, limited_link

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE_BYTES_PER_S = 2_500_000  # tbf 20 mbit
BURST_BYTES = 8 * 1024  # small, so short transfers do not measure the burst instead of the rate
TAG = f"es{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def far_link():
    """(near address, far address, namespace): a veth pair, far end in a namespace, tbf towards it."""
    with limited_link(TAG, 77, RATE_BYTES_PER_S, BURST_BYTES) as link:
        yield link


@pytest.fixture(scope="module")
def tiny_vit_store(tmp_path_factory):
    """A 4-block ViT (224 px, 197 tokens x 192) and an untrained token codec on its cut after block 2."""
    import timm

    from conftest import store_codec

    from edgesplit.compression import create_codec
    from edgesplit.partitioner import BlockStore, partition, timm_recipe

    root = tmp_path_factory.mktemp("netns-store")
    store = BlockStore(root)
    torch.manual_seed(0)
    recipe = timm_recipe("vit_tiny_patch16_224", depth=4)
    model = timm.create_model(recipe["arch"], pretrained=False, **recipe["kwargs"]).eval()
    partition(model, "vit4", recipe, store, profile=False)
    codec = create_codec("tokens", dim=192).eval()
    return root, store_codec(store, "vit4", "cut", codec), codec


@pytest.mark.timeout(240)
def test_budget_change_speeds_up_a_slow_link(far_link, tiny_vit_store, tmp_path, capsys):
    from edgesplit.runtime import Client, ClientConfig, LocalCluster, LocalClusterConfig

    near, far, ns = far_link
    root, man, codec = tiny_vit_store
    cut = 3  # embed + 2 blocks on w0, the rest behind the slow link
    # keyed, as boards on a network are: CURVE on every socket, across the namespaces
    lc = LocalCluster(LocalClusterConfig(workers=1, host=near, port=0, torch_threads=1, keyed=True), store=root)
    far_keys = lc.add_key("far", "worker")
    with lc, far_worker(ns, lc.endpoint, far, tmp_path / "far", ["--keys", str(far_keys)]):
        try:
            cl = Client(ClientConfig(coordinator=lc.endpoint, timeout_ms=60_000, keys=str(lc.key_dir("operator"))))
            cl.wait_for_workers(2, timeout_s=30)
            cl.deploy("vit4", stages=[("w0", 0, cut), ("far", cut, man.n_blocks)],
                      links=[{"codec": "cut", "budget": None, "wire_dtype": "fp32"}])
            x = torch.randn(1, 3, 224, 224)

            def run(n: int = 8, **kw) -> tuple[float, float, int]:
                """Median end-to-end and link seconds (w0's send to far's receipt, traced), bytes on the cut."""
                total, link, nbytes = [], [], 0
                for _ in range(n):
                    t0 = time.perf_counter()
                    f = cl.submit("vit4", x, trace=True, **kw)
                    f.result(timeout=60)
                    total.append(time.perf_counter() - t0)
                    near_hop, far_hop = f.info.trace[0], f.info.trace[1]
                    link.append(far_hop[2] - near_hop[5])  # t_recv there - t_send here (one host clock)
                    nbytes = near_hop[6]
                return statistics.median(total), statistics.median(link), nbytes

            slow_s, slow_link_s, full_bytes = run()
            assert full_bytes == 197 * 192 * 4
            # the token bucket really limits the link (its burst goes at once)
            assert slow_link_s >= 0.8 * (full_bytes - BURST_BYTES) / RATE_BYTES_PER_S

            cl.set_link("vit4", 0, budget=8, wire_dtype="int8")
            fast_s, fast_link_s, small_bytes = run()
            print(f"\nslow link: full fp32 {full_bytes} B: p50 {slow_s * 1e3:.1f} ms, link {slow_link_s * 1e3:.1f} ms; "
                  f"b=8 int8 {small_bytes} B: p50 {fast_s * 1e3:.1f} ms, link {fast_link_s * 1e3:.1f} ms")
            assert small_bytes * 50 < full_bytes
            assert fast_link_s < slow_link_s / 10 and fast_s < slow_s

            # the budget follows the allocated rate: a quarter of the link, a 300 ms deadline and half of
            # the time left for this transfer allow at most 625 kB/s x 0.15 s = 94 kB, so full width fp32
            # (151 kB) does not fit but 64 of the 192 channels (50 kB) do
            cl.set_link("vit4", 0, budget=None, wire_dtype="fp32", rate=RATE_BYTES_PER_S / 4, share=0.5)
            _, _, nbytes = run(n=3, timeout_ms=300)
            print(f"rate-following at 625 kB/s, 300 ms deadline: {nbytes} B per transfer")
            assert small_bytes < nbytes <= RATE_BYTES_PER_S / 4 * 0.300 * 0.5, nbytes

            # w0 measures the link from its sends and their ACKs, reports it, and can follow it: 20 % of
            # ~130 ms left at ~2.5 MB/s is ~65 kB (64 channels), well short of full width's 151 kB
            deadline = time.monotonic() + 5.0  # the next heartbeat (every 1 s) carries the measurement
            while True:
                tel = {w.name: w.telemetry for w in cl.workers()}["w0"]
                measured = [v for k, v in tel.items() if k.startswith("link_rate_bps")]
                if measured or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            print(f"w0 measured the link at {measured} B/s (tbf {RATE_BYTES_PER_S})")
            assert len(measured) == 1 and 0.5 * RATE_BYTES_PER_S < measured[0] < 2 * RATE_BYTES_PER_S
            from edgesplit.runtime import cli
            capsys.readouterr()
            assert cli.main(["workers", "--coordinator", lc.endpoint, "--keys", str(lc.key_dir("operator"))]) == 0
            assert f"w0 -> tcp://{far}:" in capsys.readouterr().out  # `edgesplit workers` shows the measurement
            cl.set_link("vit4", 0, rate="measured", share=0.2)
            _, _, nbytes = run(n=3, timeout_ms=150)
            print(f"following the measured rate, 150 ms deadline: {nbytes} B per transfer")
            assert small_bytes < nbytes < full_bytes
        finally:
            cl.close()


@pytest.mark.timeout(240)
def test_link_probes_measure_the_token_bucket_rate(far_link, tiny_vit_store, tmp_path):
    """MEASURE's probes (worker to worker, client to worker) time the link to receipt: within 20 % of tbf's rate."""
    from edgesplit.runtime import Client, ClientConfig, LocalCluster, LocalClusterConfig

    near, far, ns = far_link
    root = tmp_path / "store"  # the store without the first test's plans and worker-key bindings (new keys here)
    shutil.copytree(tiny_vit_store[0], root, ignore=shutil.ignore_patterns("plans"))
    lc = LocalCluster(LocalClusterConfig(workers=1, host=near, port=0, torch_threads=1, keyed=True), store=root)
    far_keys = lc.add_key("far", "worker")
    with lc, far_worker(ns, lc.endpoint, far, tmp_path / "far", ["--keys", str(far_keys)]):
        try:
            cl = Client(ClientConfig(coordinator=lc.endpoint, control_timeout_ms=120_000,
                                     keys=str(lc.key_dir("operator"))))
            cl.wait_for_workers(2, timeout_s=30)
            m = cl.measure("vit4", reps=2, probe_s=1.0)
            into_far = m.workers["w0"].links["far"][0]
            out_of_far = m.workers["far"].links["w0"][0]
            client_to_far = m.client_links["far"][0]
            print(f"\ntbf {RATE_BYTES_PER_S / 1e6:.2f} MB/s: w0->far {into_far / 1e6:.2f} MB/s, client->far "
                  f"{client_to_far / 1e6:.2f} MB/s, far->w0 (no bucket) {out_of_far / 1e6:.1f} MB/s")
            for rate in (into_far, client_to_far):
                assert abs(rate - RATE_BYTES_PER_S) <= 0.2 * RATE_BYTES_PER_S
            assert out_of_far > 4 * RATE_BYTES_PER_S  # the bucket limits one direction only
        finally:
            cl.close()
