"""Class-wise packages on the real loopback cluster (session ``cluster``: worker processes on 127.0.0.1).

The N sub-models run as 1-stage deployments on N workers, the fusion on another; the
logits must equal the one-process reference ``classwise_predict`` (argmax equal, atol 1e-4).
Packages are tiny and trained for a step or two: this checks the plumbing, not accuracy.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from edgesplit.partitioner import BlockStore, ManifestError, timm_recipe
from edgesplit.partitioner import classwise as cw
from edgesplit.partitioner.prune_resnet import ResNetPruneConfig
from edgesplit.partitioner.prune_vit import ViTPruneConfig
from edgesplit.runtime.classwise import ClasswiseRunner
from edgesplit.runtime.errors import BadInput, DeployError, UnknownModel

ATOL = 1e-4
FAST = cw.ClasswiseConfig(retrain=cw.TrainConfig(epochs=1), fusion=cw.TrainConfig(epochs=3, lr=3e-3),
                          fusion_hidden=32, score_samples=64)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client(cluster):
    cl = cluster.client(timeout_ms=60_000)
    yield cl
    cl.close()


def _digits(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) * 2 - 1  # (n, 1, 32, 32)
    return x, torch.tensor(d.target[:n], dtype=torch.long)


def _package(store: BlockStore, name: str, arch: str, n_groups: int) -> None:
    """A tiny digits package (one training epoch) in the coordinator's store."""
    x, y = _digits()
    torch.manual_seed(0)
    if arch == "vit":
        kw = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=4)
        recipe = timm_recipe("vit_tiny_patch16_224", **kw)
        cfg = replace(FAST, vit=ViTPruneConfig(head_keep=0.5, mlp_keep=0.25, embed_keep=0.5, depth_keep=0.5))
    else:
        kw = dict(in_chans=1, num_classes=10, layers=[1, 1, 1, 1], channels=[16, 32, 32, 32])
        recipe = timm_recipe("resnet18", **kw)
        cfg = replace(FAST, resnet=ResNetPruneConfig(channel_keep=0.5, inner_keep=0.5, min_filters=4))
    full = timm.create_model(recipe["arch"], pretrained=False, **kw)
    cw.train_classifier(full, lambda g: (x, y), cw.TrainConfig(epochs=1))
    cw.split_classwise(full, recipe, name, store, x, y, n_groups=n_groups, config=cfg)


def _held_out(n: int) -> torch.Tensor:
    x, _ = _digits(1797)
    return x[-n:]


def _check_equal(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    diff = float((got - ref).abs().max())
    assert diff <= ATOL, f"cluster logits differ from classwise_predict by {diff}"
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.timeout(90)
def test_vit_package_on_three_workers_equals_one_process(cluster, client, model_store):
    store = BlockStore(model_store["root"])
    _package(store, "cw-vit", "vit", n_groups=3)
    runner = ClasswiseRunner(client, model_store["root"], "cw-vit")
    with runner:
        placement = runner.deploy(workers=["w0", "w1", "w2"], fusion_worker="w3")
        assert placement.submodels == ["w0", "w1", "w2"] and placement.fusion == "w3"
        routes = runner.routes()
        assert [r.model for r in routes] == ["cw-vit.g0", "cw-vit.g1", "cw-vit.g2", "cw-vit"]
        assert [r.workers for r in routes] == [["w0"], ["w1"], ["w2"], ["w3"]]  # 1 stage each
        xs = _held_out(20)
        futures = [runner.submit(xs[i:i + 1], trace=True) for i in range(16)]  # all in flight before any is read
        batch = runner.infer(xs[16:20])  # and a batch of 4 in one request
        got = torch.cat([f.result(timeout=60) for f in futures] + [batch])
        ref = cw.classwise_predict(store, "cw-vit", xs)
        _check_equal(got, ref)
        info = futures[0].info
        assert [i.trace[0][1] for i in info.submodels] == ["w0", "w1", "w2"]  # each sub-model ran on its worker
        assert info.fusion.trace[0][1] == "w3"
        assert info.fusion.t_sent >= max(i.t_done for i in info.submodels)  # fusion only after every feature
        assert info.latency_ms > 0


@pytest.mark.timeout(90)
def test_resnet_package_two_workers_and_default_placement(cluster, client, model_store):
    store = BlockStore(model_store["root"])
    _package(store, "cw-res", "resnet", n_groups=2)
    runner = ClasswiseRunner(client, store, "cw-res")
    with runner:
        plan = runner.plan()  # one live worker per sub-model in name order, fusion on the next free one
        assert plan.submodels == ["w0", "w1"] and plan.fusion == "w2"
        shared = runner.plan(workers=["w3"])  # an explicit list may share one worker
        assert shared.submodels == ["w3", "w3"] and shared.fusion == "w3"
        runner.deploy(workers=["w2", "w3"], fusion_worker="w0")
        xs = _held_out(8)
        got = torch.cat([runner.infer(xs[i:i + 2]) for i in range(0, 8, 2)])
        _check_equal(got, cw.classwise_predict(store, "cw-res", xs))


@pytest.mark.timeout(60)
def test_failures_are_explicit(cluster, client, model_store):
    store = BlockStore(model_store["root"])
    with pytest.raises(ManifestError, match="not a class-wise package"):
        ClasswiseRunner(client, store, "dummy3")
    if "cw-vit" not in store.list_models():
        _package(store, "cw-vit", "vit", n_groups=3)
    with ClasswiseRunner(client, store, "cw-vit") as runner:
        with pytest.raises(DeployError, match="empty list"):
            runner.plan(workers=[])
        with pytest.raises((DeployError, UnknownModel), match="w9"):  # the runtime's refusal, re-raised
            runner.deploy(workers=["w9"])
        runner.deploy(workers=["w0", "w1", "w2"], fusion_worker="w3")
        with pytest.raises(BadInput, match=r"\(1, 1, 32, 32\)|32"):  # wrong image size, refused by the workers
            runner.infer(torch.zeros(1, 1, 16, 16))
        with pytest.raises(BadInput, match="float32"):
            runner.submit(torch.zeros(1, 1, 32, 32, dtype=torch.float64)).result(timeout=30)
        x = _held_out(1)
        _check_equal(runner.infer(x), cw.classwise_predict(store, "cw-vit", x))  # still serving
