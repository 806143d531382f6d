"""Shared fixtures: a block store with the test models, and a 4-worker local cluster.

The cluster is real: a coordinator and four worker daemons as separate processes on
127.0.0.1, started once per session and always torn down (process groups killed).
"""
from __future__ import annotations

import pytest
import torch


def store_codec(store, model: str, name: str, codec):
    """Store ``codec`` as a block and name it ``name`` in ``model``'s manifest; returns the new manifest.

    Tests import it (``from conftest import store_codec``): a link spec can then say ``{"codec": name}``.
    """
    from edgesplit.compression import save_codec
    from edgesplit.partitioner import ModelManifest

    m = store.manifest(model)
    codecs = {**m.extra.get("codecs", {}), name: save_codec(store, codec)}
    store.put_manifest(ModelManifest(**{**m.__dict__, "extra": {**m.extra, "codecs": codecs}}))
    return store.manifest(model)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store holding vit_tiny_patch16_224, resnet18 (random weights, seed 0) and dummy models.

    Returns ``{"root": path, "models": {name: eval-mode nn.Module}}`` for reference outputs.
    """
    import timm

    from edgesplit.partitioner import BlockStore, partition, timm_recipe
    from edgesplit.runtime.dummy import build_dummy, dummy_recipe

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("coordinator-store")
    store = BlockStore(root)
    models = {}
    for arch in ("vit_tiny_patch16_224", "resnet18"):
        torch.manual_seed(0)
        models[arch] = timm.create_model(arch, pretrained=False).eval()
        partition(models[arch], arch, timm_recipe(arch), store, profile=False)
    for n in (3, 6):
        models[f"dummy{n}"] = build_dummy(n_blocks=n)
        partition(models[f"dummy{n}"], f"dummy{n}", dummy_recipe(n), store, input_shape=[4], profile=False)
    return {"root": root, "models": models}


@pytest.fixture(scope="session")
def cluster(model_store: dict):
    """Coordinator + workers w0..w5, shared by the session (one start-up instead of one per module).

    w0..w3 are plain (w3 accepts frames of at most 4 MiB); w4 and w5 carry fault-injection
    flags for the fault tests (w4 stalls 150 ms per request, w5 crashes after 4 requests)
    and no other test places stages on them. The coordinator does not re-plan (so nothing
    moves onto the fault workers by itself, and a lost stage stays lost until redeployed);
    re-plans, replicas and restarts have their own clusters in test_lifecycle.py.
    """
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    lc = LocalCluster(LocalClusterConfig(workers=6, port=0, torch_threads=1), store=model_store["root"],
                      worker_args={3: ["--max-frame-bytes", "4MiB"], 4: ["--stall-ms", "150"],
                                   5: ["--crash-after", "4", "--stall-ms", "100"]},
                      coordinator_args=["--no-replan"])
    lc.start(timeout_s=90)
    try:
        yield lc
    finally:
        lc.stop()
