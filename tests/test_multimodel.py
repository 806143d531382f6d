"""Many models per worker: shared blocks held once, partial loading on switch, budgets, undeploy.

Real processes: a coordinator and three workers on 127.0.0.1 with different memory budgets.
Models: three vit_tiny variants that share their bottom blocks (A; B = A with blocks 9-11
and the head re-drawn; C = A with blocks 6-11 and the head re-drawn) and an unrelated
dummy model. Figures come from the workers' own reports (what they loaded, freed, hold).
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

from edgesplit.partitioner import BlockStore, partition, timm_recipe
from edgesplit.runtime import Client
from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig
from edgesplit.runtime.errors import DeployError, UnknownModel

MB = 1_000_000
HEADER_MAX = 4096  # resident bytes count each block's whole file buffer: tensors plus its safetensors header


def _about(held: int, tensor_bytes: dict[str, int]) -> bool:
    """``held`` is the tensors' bytes plus at most one header per block."""
    return 0 <= held - sum(tensor_bytes.values()) <= HEADER_MAX * len(tensor_bytes)


def _variant(base: torch.nn.Module, first_new_block: int, seed: int) -> torch.nn.Module:
    """``base`` with blocks ``first_new_block..`` and the head re-drawn (the bottom stays shared)."""
    m = copy.deepcopy(base)
    torch.manual_seed(seed)
    for blk in m.blocks[first_new_block:]:
        for p in blk.parameters():
            torch.nn.init.normal_(p, std=0.02)
    torch.nn.init.normal_(m.head.weight, std=0.02)
    return m.eval()


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    import timm

    from edgesplit.runtime.dummy import build_dummy, dummy_recipe

    torch.manual_seed(0)
    a = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    models = {"vitA": a, "vitB": _variant(a, 9, 1), "vitC": _variant(a, 6, 2), "dummy4": build_dummy(n_blocks=4)}
    root = tmp_path_factory.mktemp("multimodel-store")
    store = BlockStore(root)
    for name, m in models.items():
        recipe = dummy_recipe(4) if name.startswith("dummy") else timm_recipe("vit_tiny_patch16_224")
        partition(m, name, recipe, store, input_shape=[4] if name.startswith("dummy") else None, profile=False)
    sizes = {name: {b.id: b.size_bytes for b in store.manifest(name).blocks} for name in models}
    n_blocks = {name: store.manifest(name).n_blocks for name in models}
    return {"root": root, "models": models, "sizes": sizes, "n_blocks": n_blocks}


@pytest.fixture(scope="module")
def cluster(variants):
    # w0: room for one variant and a bit (switching); w1: 5 MiB (too small for any vit stage); w2: plenty
    args = {0: ["--memory-budget", "26MB"], 1: ["--memory-budget", "5MiB"], 2: ["--memory-budget", "1GiB"]}
    cfg = LocalClusterConfig(workers=3, port=0, torch_threads=1, heartbeat_ms=300)
    with LocalCluster(cfg, variants["root"], worker_args=args, coordinator_args=["--no-replan"]) as c:
        yield c


def _worker(client: Client, name: str, after: float = 0.0):
    """The worker's record from a heartbeat sent after ``after`` (monotonic seconds)."""
    while time.monotonic() - after < 0.7:  # two heartbeats of 300 ms
        time.sleep(0.1)
    return next(w for w in client.workers() if w.name == name)


def _check_output(client: Client, variants, name: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 224, 224) if name.startswith("vit") else torch.randn(2, 4)
    y = client.infer(name, x, timeout_ms=60_000)
    with torch.no_grad():
        ref = variants["models"][name](x)
    assert torch.allclose(y, ref, atol=1e-4), f"{name}: max diff {(y - ref).abs().max():.2e}"


def test_shared_blocks_are_loaded_once_and_undeploy_frees_only_what_no_model_uses(cluster, variants):
    sizes = variants["sizes"]
    with cluster.client() as client:
        ra = client.deploy("vitA", stages=[("w2", 0, variants["n_blocks"]["vitA"])])
        assert ra.loaded["w2"]["loaded_bytes"] == sum(sizes["vitA"].values())
        rb = client.deploy("vitB", stages=[("w2", 0, variants["n_blocks"]["vitB"])])
        only_b = sum(v for k, v in sizes["vitB"].items() if k not in sizes["vitA"])
        assert 0 < only_b < sum(sizes["vitB"].values()) / 2
        assert rb.loaded["w2"]["loaded_bytes"] == only_b  # the shared bottom was already resident
        assert _about(rb.loaded["w2"]["resident_bytes"], {**sizes["vitA"], **sizes["vitB"]})
        _check_output(client, variants, "vitA")
        _check_output(client, variants, "vitB")
        w = _worker(client, "w2", time.monotonic())
        assert sorted(map(tuple, w.resident)) == [("vitA", 0), ("vitB", 0)]

        freed = client.undeploy("vitB")
        b_own = {k: v for k, v in sizes["vitB"].items() if k not in sizes["vitA"]}
        assert _about(freed["w2"]["freed_bytes"], b_own) and _about(freed["w2"]["resident_bytes"], sizes["vitA"])
        with pytest.raises(UnknownModel):  # NotDeployed is an UnknownModel
            client.infer("vitB", torch.randn(1, 3, 224, 224), timeout_ms=10_000)
        _check_output(client, variants, "vitA")  # the shared blocks stayed for A
        freed = client.undeploy("vitA")
        assert _about(freed["w2"]["freed_bytes"], sizes["vitA"]) and freed["w2"]["resident_bytes"] == 0
        w = _worker(client, "w2", time.monotonic())
        assert w.cache["resident_bytes"] == 0 and w.cache["pooled_bytes"] == 0  # the memory went back


def test_oversized_plan_is_refused_before_anything_is_fetched(cluster, variants):
    total = sum(variants["sizes"]["vitA"].values())
    with cluster.client() as client:
        with pytest.raises(DeployError, match=r"does not fit worker w1.*need .*\({} B\).*budget".format(total)):
            client.deploy("vitA", stages=[("w1", 0, variants["n_blocks"]["vitA"])])
        w = _worker(client, "w1", time.monotonic())
        assert w.stages == [] and w.cache["bytes_loaded"] == 0
    assert BlockStore(cluster.workdir / "w1").block_ids() == []  # nothing fetched into its store


def test_switching_loads_only_missing_blocks_and_never_exceeds_the_budget(cluster, variants):
    sizes = variants["sizes"]
    budget = 26 * MB
    only = {m: sum(v for k, v in sizes[m].items() if k not in sizes["vitA"]) for m in ("vitB", "vitC")}
    with cluster.client() as client:
        for name in ("vitA", "vitB", "vitC", "dummy4"):  # registered; only the last one deployed stays resident
            client.deploy(name, stages=[("w0", 0, variants["n_blocks"][name])])
        t = time.monotonic()
        w = _worker(client, "w0", t)
        assert len(w.stages) == 4 and w.cache["resident_bytes"] <= budget
        client.prefetch("vitA")  # no hint: every block A does not use may go (least recently used first)
        _check_output(client, variants, "vitA")
        before = _worker(client, "w0", time.monotonic()).telemetry.get("count_switch_bytes", 0)
        _check_output(client, variants, "vitB")  # a request for a registered, non-resident stage loads it
        after = _worker(client, "w0", time.monotonic()).telemetry["count_switch_bytes"]
        assert after - before == only["vitB"]  # only B's own top blocks were read
        with pytest.raises(UnknownModel, match="host no stage of vitC"):
            client.prefetch("vitC", workers=["w1"])
        reply = client.prefetch("vitC", hint=["vitA"], workers=["w0"])
        assert list(reply) == ["w0"] and reply["w0"]["loaded_bytes"] == only["vitC"]
        for name in ["vitA", "vitB", "dummy4", "vitC", "vitA", "vitC", "vitB"] * 2:  # a switching workload
            _check_output(client, variants, name)
        w = _worker(client, "w0", time.monotonic())
        assert w.cache["resident_max_bytes"] <= budget  # the peak, not a sample
        assert w.cache["evictions"] > 0 and w.telemetry["count_switches"] >= 8
        for name in ("vitA", "vitB", "vitC", "dummy4"):
            client.undeploy(name)
        assert _worker(client, "w0", time.monotonic()).cache["resident_bytes"] == 0


def test_eviction_follows_the_hint_then_least_recently_used(tmp_path):
    from edgesplit.runtime.cache import BlockCache

    store = BlockStore(tmp_path)
    ids = [store.put({"w": torch.full((256,), float(i))}) for i in range(6)]  # 1 KiB each
    assert len({store.file_bytes(b) for b in ids}) == 1
    cache = BlockCache(store, budget_bytes=4 * store.file_bytes(ids[0]))  # room for four
    for bid in ids[:4]:
        cache.get(bid)
    cache.hint({ids[0]: 0, ids[1]: 2, ids[2]: 1, ids[4]: 0})  # ids[3] is needed never: it goes first
    cache.get(ids[4])
    assert ids[3] not in cache and all(b in cache for b in ids[:3])
    cache.get(ids[5])  # then the one needed farthest in the future
    assert ids[1] not in cache and ids[0] in cache and ids[2] in cache
    cache.hint({})
    cache.pin([ids[0]])
    cache.get(ids[1])  # no hint: least recently used, pinned ones stay
    assert ids[0] in cache and ids[2] not in cache
    assert cache.stats.resident_max_bytes == cache.resident_bytes == cache.budget_bytes


def test_evicted_memory_is_reused_only_when_nothing_else_holds_it(tmp_path):
    from edgesplit.runtime.cache import BlockCache

    store = BlockStore(tmp_path)
    ids = [store.put({"w": torch.full((1 << 18,), float(i)), "b": torch.full((3,), float(i))}) for i in range(8)]
    cache = BlockCache(store, budget_bytes=3 * store.file_bytes(ids[0]))
    module = torch.nn.Module()
    module.register_buffer("w", torch.zeros(1 << 18))
    module.register_buffer("b", torch.zeros(3))
    held = {}
    for i, bid in enumerate(ids[:3]):
        t = cache.get(bid)
        if i == 0:
            held["variable"] = t["w"]  # a caller's reference to the very tensor
        elif i == 1:
            module.load_state_dict(t, assign=True)  # a module aliasing the block
        else:
            held["view"] = t["w"][7:11]
    for bid in ids[3:]:  # evicts all three; their memory must not be written
        cache.get(bid)
    assert torch.equal(held["variable"], torch.zeros(1 << 18)) and torch.equal(module.w, torch.ones(1 << 18))
    assert torch.equal(held["view"], torch.full((4,), 2.0))
    assert cache.stats.buffers_reused == 2  # blocks 3 and 4 were evicted with no one holding them
    for i, bid in enumerate(ids * 2):  # whatever was reused holds the right bytes
        assert torch.equal(cache.get(bid)["w"][:5], torch.full((5,), float(i % 8)))
    assert cache.resident_bytes + cache.pooled_bytes <= cache.budget_bytes
    reused = cache.stats.buffers_reused
    for bid in ids * 2:  # memory that was reused once is reused again (a steady switching workload)
        cache.get(bid)
    assert cache.stats.buffers_reused - reused >= 2 * len(ids) - 3


def test_a_corrupt_local_block_is_fetched_again_and_the_request_still_served(cluster, variants):
    name = "dummy4"
    with cluster.client() as client:
        client.deploy(name, stages=[("w2", 0, variants["n_blocks"][name])], load=False)  # fetched, not loaded
        store = BlockStore(cluster.workdir / "w2")
        bid = next(iter(variants["sizes"][name]))
        data = bytearray(store.path(bid).read_bytes())
        data[-1] ^= 0x01  # a flipped bit in the tensor bytes, as storage rot would leave it
        store.path(bid).write_bytes(bytes(data))
        _check_output(client, variants, name)  # served: the worker dropped the bad copy and fetched it again
        store.verify(bid)  # the copy on disk is whole again
        assert _worker(client, "w2", time.monotonic()).telemetry["count_refetched"] >= 1
        client.undeploy(name)
