"""CUDA paths: the block cache in GPU memory, workers running stages on a GPU, GPU telemetry.

Skipped where torch sees no CUDA device (CI and most laptops); run on a GPU machine with
``pytest tests/test_cuda.py``. Layer-wise split on the GPU is compared with the unsplit model
on the same GPU (the same kernels), and with the CPU model within float tolerance.
"""
from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")


@pytest.mark.timeout(120)
def test_block_cache_lives_in_gpu_memory_and_evicts(tmp_path):
    import timm

    from edgesplit.partitioner import BlockStore, partition, timm_recipe
    from edgesplit.runtime.cache import BlockCache

    store = BlockStore(tmp_path)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    man = partition(model, "vit", timm_recipe("vit_tiny_patch16_224"), store, profile=False)
    ids = [b.id for b in man.blocks]
    sizes = [b.size_bytes for b in man.blocks]
    budget = sum(sizes[:6])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = BlockCache(store, budget, "cuda")
    cache.pin(ids[:2])
    for bid in ids[:6]:
        tensors = cache.get(bid)
        assert all(t.is_cuda for t in tensors.values())
    assert cache.resident_bytes == budget
    assert torch.cuda.memory_allocated() - before >= budget  # the bytes really sit on the GPU
    cache.get(ids[6])  # over budget: the least recently used unpinned block goes, pinned ones stay
    assert ids[0] in cache and ids[1] in cache and ids[2] not in cache
    for bid in ids[2:]:
        cache.evict(bid)
    del tensors  # the test's own reference to the last loaded block
    gc.collect()
    held = torch.cuda.memory_allocated() - before  # the allocator rounds each tensor up to 512 B
    assert held <= sum(sizes[:2]) + 64 * 1024 < sum(sizes[:3]), f"evicted blocks still hold memory: {held} B"
    assert cache.stats.load_bytes_per_s > 0
    for bid in ids[:2]:  # the loaded tensors are the stored ones, bit for bit
        ref = store.get(bid)
        assert all(torch.equal(cache.get(bid)[k].cpu(), v) for k, v in ref.items())


@pytest.fixture(scope="module")
def gpu_cluster(model_store):
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=2), store=model_store["root"],
                      worker_args={0: ["--device", "cuda"], 1: ["--device", "cuda"]})
    lc.start(timeout_s=120)
    try:
        yield lc
    finally:
        lc.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "resnet18"])
def test_split_on_gpu_workers_equals_unsplit(gpu_cluster, model_store, arch):
    cl = gpu_cluster.client(timeout_ms=120_000)
    try:
        route = cl.deploy(arch, workers=["w0", "w1"], n_stages=2)
        model = model_store["models"][arch]
        x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        y = cl.infer(arch, x)
        with torch.inference_mode():
            ref_cpu = model(x)
            gpu = model.to("cuda")
            ref_gpu = gpu(x.cuda()).cpu()
            model.to("cpu")
        scale = float(ref_cpu.abs().max())
        assert float((y - ref_gpu).abs().max()) <= 1e-3 * scale, "split on GPUs differs from unsplit on the GPU"
        assert float((y - ref_cpu).abs().max()) <= 1e-2 * scale, "GPU result far from the CPU one"
        tel = {w.name: w for w in cl.workers()}
        for hop in route.hops:
            t = tel[hop.worker].telemetry
            assert t["gpu_total_bytes"] > 0 and 0 < t["gpu_free_bytes"] <= t["gpu_total_bytes"]
            assert t["gpu_allocated_bytes"] > 0
    finally:
        cl.close()


@pytest.mark.timeout(300)
def test_codec_link_between_gpu_workers(gpu_cluster, model_store):
    from conftest import store_codec

    from edgesplit.compression import create_codec
    from edgesplit.partitioner import BlockStore, build_blocks
    from edgesplit.runtime import protocol as P

    arch, cut = "vit_tiny_patch16_224", 7
    store = BlockStore(model_store["root"])
    torch.manual_seed(9)
    codec = create_codec("tokens", dim=192).eval()
    manifest = store_codec(store, arch, "gpu", codec)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        h = build_blocks(store, manifest, 0, cut)(x)
        header, frames = codec.encode(h, budget=16, wire_dtype="int8")
        ref = build_blocks(store, manifest, cut, manifest.n_blocks)(codec.decode(header, frames))
    cl = gpu_cluster.client(timeout_ms=120_000)
    try:
        cl.deploy(arch, stages=[("w0", 0, cut), ("w1", cut, manifest.n_blocks)],
                  links=[{"codec": "gpu", "budget": 16, "wire_dtype": "int8"}])
        f = cl.submit(arch, x, trace=True)
        y = f.result(timeout=120)
        assert f.info.trace[0][6] == sum(P.to_wire(fr)[0].nbytes for fr in frames)  # 16 of 192 channels sent
        assert float((y - ref).abs().max()) <= 2e-2 * float(ref.abs().max())  # int8 kept channels, GPU vs CPU
    finally:
        cl.close()
