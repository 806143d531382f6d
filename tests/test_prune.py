"""Class-wise structured pruning: physically smaller models that equal the masked full model."""
import copy

import pytest
import timm
import torch
from torch import nn

from edgesplit.partitioner import (BlockStore, UnsupportedModelError, build_skeleton, decompose, load_model,
                                   partition, timm_recipe)
from edgesplit.partitioner import prune_resnet as pr
from edgesplit.partitioner import prune_vit as pv

ATOL = 1e-5
VIT_KW = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=32, depth=3, num_heads=4)
RES_KW = dict(in_chans=1, num_classes=10, layers=[2, 2, 1, 1], channels=[16, 32, 32, 48])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW).eval()


def _resnet():
    m = timm.create_model("resnet18", pretrained=False, **RES_KW).eval()
    with torch.no_grad():  # non-trivial BatchNorm so that slicing mistakes show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    return m


def _features(m, x):
    return m.forward_head(m.forward_features(x), pre_logits=True)


def _x(n=4):
    return torch.randn(n, 1, 32, 32)


# --- ViT ------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
@torch.no_grad()
def test_vit_full_plan_reproduces_the_model():
    m, x = _vit(), _x()
    rec = timm_recipe("vit_tiny_patch16_224", **VIT_KW)
    feat, frec = pv.prune_vit(m, rec, pv.full_plan(m), None)
    assert frec["kwargs"]["num_classes"] == 0
    assert (feat(x) - _features(m, x)).abs().max() <= ATOL
    logits, _ = pv.prune_vit(m, rec, pv.full_plan(m), list(range(10)))
    out = logits(x)
    assert out.shape == (4, 11)  # 10 classes + "other"
    assert (out[:, :10] - m(x)).abs().max() <= ATOL


@pytest.mark.timeout(30)
@torch.no_grad()
def test_vit_pruning_equals_masking():
    """Removing heads, neurons and a block physically == zeroing their output weights / identity."""
    m, x = _vit(), _x()
    rec = timm_recipe("vit_tiny_patch16_224", **VIT_KW)
    hd = m.blocks[0].attn.head_dim
    plan = pv.ViTPrunePlan(embed=list(range(32)), blocks=[0, 2], heads=[[0, 2], [3]],
                           mlp=[list(range(0, 128, 2)), list(range(40))])
    small, _ = pv.prune_vit(m, rec, plan, None)
    masked = copy.deepcopy(m)
    for h in (1, 3):
        masked.blocks[0].attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
    masked.blocks[2].attn.proj.weight[:, :3 * hd] = 0
    masked.blocks[0].mlp.fc2.weight[:, 1::2] = 0
    masked.blocks[2].mlp.fc2.weight[:, 40:] = 0
    masked.blocks[1] = nn.Identity()
    assert (small(x) - _features(masked, x)).abs().max() <= ATOL
    assert [len(b.attn.proj.weight[0]) for b in small.blocks] == [2 * hd, hd]
    assert [b.mlp.fc1.out_features for b in small.blocks] == [64, 40]


@pytest.mark.timeout(30)
@torch.no_grad()
def test_vit_scores_find_silent_units():
    m, x = _vit(), _x(8)
    hd = m.blocks[0].attn.head_dim
    m.blocks[0].attn.proj.weight[:, hd:2 * hd] = 0  # head 1 of block 0 writes nothing
    m.blocks[0].mlp.fc2.weight[:, 5] = 0  # neuron 5 of block 0 writes nothing
    blk = m.blocks[1]  # block 1 becomes the identity
    for lin in (blk.attn.proj, blk.mlp.fc2):
        lin.weight.zero_()
        lin.bias.zero_()
    s = pv.score_vit(m, x)
    assert s.heads[0][1] == 0 and all(s.heads[0][h] > 0 for h in (0, 2, 3))
    assert s.mlp[0][5] == 0 and s.mlp[0].count_nonzero() == 127
    assert s.blocks[1] == 0 and all(s.blocks[i] > 0 for i in (0, 2))
    plan = pv.plan_vit_pruning(s, pv.ViTPruneConfig(head_keep=0.75, mlp_keep=127 / 128, embed_keep=1.0,
                                                    depth_keep=2 / 3))
    assert plan.blocks == [0, 2]
    assert 1 not in plan.heads[0] and len(plan.heads[0]) == 3
    assert 5 not in plan.mlp[0] and len(plan.mlp[0]) == 127


def test_keep_count_floor_and_bounds():
    assert pv.keep_count(128, 0.25, 8) == 32
    assert pv.keep_count(128, 0.01, 8) == 8  # the floor
    assert pv.keep_count(4, 0.1, 1) == 1
    assert pv.keep_count(6, 2.0, 1) == 6  # never more than there are
    assert pv.top_indices(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    plan = pv.plan_vit_pruning(pv.score_vit(_vit(), _x()), pv.ViTPruneConfig(0.01, 0.01, 0.01, 0.01, 1, 8, 16, 1))
    assert len(plan.blocks) == 1 and len(plan.heads[0]) == 1 and len(plan.mlp[0]) == 8 and len(plan.embed) == 16


@pytest.mark.timeout(30)
@torch.no_grad()
def test_pruned_vit_is_smaller_and_rebuilds_from_the_store(tmp_path):
    m, x = _vit(), _x()
    rec = timm_recipe("vit_tiny_patch16_224", **VIT_KW)
    cfg = pv.ViTPruneConfig(head_keep=0.5, mlp_keep=0.25, embed_keep=0.5, depth_keep=1.0)
    plan = pv.plan_vit_pruning(pv.score_vit(m, x), cfg)
    small, srec = pv.prune_vit(m, rec, plan, [3, 7])
    assert [b.name for b in decompose(small)] == [b.name for b in decompose(m)]
    store = BlockStore(tmp_path)
    full_man = partition(m, "full", rec, store, input_shape=[1, 32, 32], profile=False)
    man = partition(small, "full.g0", srec, store, input_shape=[1, 32, 32], profile=False)
    n_small, n_full = sum(p.numel() for p in small.parameters()), sum(p.numel() for p in m.parameters())
    assert n_small < n_full / 4
    assert man.size_bytes < full_man.size_bytes / 4
    for a, b in zip(man.blocks, full_man.blocks):  # every block shrinks (the head: 3 rows of 16 vs 10 of 32)
        assert a.size_bytes < b.size_bytes and a.n_params < b.n_params
    assert build_skeleton(srec).blocks[0].attn.qkv.weight.is_meta
    rebuilt = load_model(BlockStore(tmp_path), BlockStore(tmp_path).manifest("full.g0"))
    assert (rebuilt(x) - small(x)).abs().max() <= ATOL
    assert rebuilt(x).shape == (4, 3)


def test_vit_pruner_rejects_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        pv.score_vit(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))
    qk = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW, qk_norm=True)
    with pytest.raises(UnsupportedModelError, match="plain timm Block"):
        pv.score_vit(qk, _x())
    with pytest.raises(UnsupportedModelError, match="timm recipe"):
        pv.prune_vit(_vit(), {"builder": "mine", "kwargs": {}}, pv.full_plan(_vit()))


# --- ResNet ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
@torch.no_grad()
def test_resnet_full_plan_reproduces_the_model():
    m, x = _resnet(), _x()
    rec = timm_recipe("resnet18", **RES_KW)
    feat, _ = pr.prune_resnet(m, rec, pr.full_plan(m), None)
    assert (feat(x) - _features(m, x)).abs().max() <= ATOL
    logits, _ = pr.prune_resnet(m, rec, pr.full_plan(m), list(range(10)))
    assert (logits(x)[:, :10] - m(x)).abs().max() <= ATOL


def test_residual_groups_follow_projection_shortcuts():
    m = _resnet()  # timm's plain stem is 64 wide, so layer1 (16) starts with a projection
    assert pr.residual_groups(m) == [[1, 1], [2, 2], [3], [4]]
    assert [len(g) for g in pr.full_plan(m).groups] == [64, 16, 32, 32, 48]
    tied = timm.create_model("resnet18", pretrained=False, in_chans=1, layers=[2, 1, 1, 1], channels=[64, 32, 32, 32])
    assert pr.residual_groups(tied) == [[0, 0], [1], [2], [3]]  # stem and layer1 share one stream


@pytest.mark.timeout(30)
@torch.no_grad()
def test_resnet_pruning_equals_masking():
    """Removing filters, residual channels and a block physically == zeroing what reads them."""
    m, x = _resnet(), _x()
    rec = timm_recipe("resnet18", **RES_KW)
    full = pr.full_plan(m)
    plan = pr.ResNetPrunePlan(
        groups=[list(range(0, 64, 2)), full.groups[1], full.groups[2], list(range(10, 32)), full.groups[4]],
        blocks=[[0], [0, 1], [0], [0]],
        inner=[[list(range(16))], [list(range(32)), list(range(5, 20))], [list(range(32))], [list(range(48))]])
    small, _ = pr.prune_resnet(m, rec, plan, None)
    masked = copy.deepcopy(m)
    masked.layer1[1] = nn.Identity()  # a dropped block is the identity
    masked.layer2[1].conv2.weight[:, :5] = 0  # inner filters 0-4 and 20-31 of layer2.1 removed
    masked.layer2[1].conv2.weight[:, 20:] = 0
    for w in (masked.layer1[0].conv1.weight, masked.layer1[0].downsample[0].weight):
        w[:, 1::2] = 0  # odd stem channels removed: zero everything that reads them
    for w in (masked.layer4[0].conv1.weight, masked.layer4[0].downsample[0].weight):
        w[:, :10] = 0  # layer3 residual channels 0-9 removed
    assert (small(x) - _features(masked, x)).abs().max() <= ATOL
    assert small.conv1.out_channels == 32 and small.layer3[0].conv2.out_channels == 22
    assert len(small.layer1) == 1 and small.layer2[1].conv1.out_channels == 15


@pytest.mark.timeout(30)
@torch.no_grad()
def test_stride1_projection_kept_when_pruned_widths_coincide():
    """Stem 64 -> layer1 16 has a projection; pruned to 16 -> 16 it must stay (timm would drop it)."""
    m, x = _resnet(), _x()
    rec = timm_recipe("resnet18", **RES_KW)
    full = pr.full_plan(m)
    plan = pr.ResNetPrunePlan(groups=[list(range(16)), *full.groups[1:]], blocks=full.blocks, inner=full.inner)
    small, srec = pr.prune_resnet(m, rec, plan, None)
    assert small.layer1[0].downsample is not None
    masked = copy.deepcopy(m)
    for w in (masked.layer1[0].conv1.weight, masked.layer1[0].downsample[0].weight):
        w[:, 16:] = 0
    assert (small(x) - _features(masked, x)).abs().max() <= ATOL
    assert build_skeleton(srec).layer1[0].downsample is not None


@pytest.mark.timeout(30)
@torch.no_grad()
def test_apoz_prunes_dead_filters_first():
    m, x = _resnet(), _x(8)
    m.layer2[0].bn1.bias[3] = -1e4  # inner filter 3 of layer2.0: ReLU output always 0
    m.bn1.bias[7] = -1e4  # stem channel 7: always 0
    s = pr.score_resnet(m, x)
    assert s.inner[1][0][3] == 1.0 and (s.inner[1][0] < 1.0).sum() >= 28
    assert s.groups[0][7] == 1.0
    assert torch.isinf(s.blocks[0][0]) and torch.isfinite(s.blocks[0][1])  # projection blocks always stay
    plan = pr.plan_resnet_pruning(m, s, pr.ResNetPruneConfig(channel_keep=0.5, inner_keep=0.5, depth_keep=0.5,
                                                             min_filters=4))
    assert 3 not in plan.inner[1][0] and len(plan.inner[1][0]) == 16
    assert 7 not in plan.groups[0] and len(plan.groups[0]) == 32
    assert plan.blocks == [[0], [0], [0], [0]]


@pytest.mark.timeout(30)
@torch.no_grad()
def test_pruned_resnet_is_smaller_and_rebuilds_from_the_store(tmp_path):
    m, x = _resnet(), _x()
    rec = timm_recipe("resnet18", **RES_KW)
    plan = pr.plan_resnet_pruning(m, pr.score_resnet(m, x), pr.ResNetPruneConfig(depth_keep=0.5))
    small, srec = pr.prune_resnet(m, rec, plan, [1, 2, 3])
    store = BlockStore(tmp_path)
    full_man = partition(m, "r", rec, store, input_shape=[1, 32, 32], profile=False)
    man = partition(small, "r.g0", srec, store, input_shape=[1, 32, 32], profile=False)
    assert [b.name for b in man.blocks] == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters()) / 4
    assert man.size_bytes < full_man.size_bytes / 4
    sizes = {b.name: b.size_bytes for b in full_man.blocks}
    assert all(b.size_bytes < sizes[b.name] for b in man.blocks)
    rebuilt = load_model(store, store.manifest("r.g0"))
    assert (rebuilt(x) - small(x)).abs().max() <= ATOL and rebuilt(x).shape == (4, 4)


def test_resnet_pruner_rejects_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="BasicBlock"):
        pr.score_resnet(timm.create_model("resnet50", pretrained=False, layers=[1, 1, 1, 1]), _x(1))
    with pytest.raises(UnsupportedModelError, match="deep stems"):
        pr.score_resnet(timm.create_model("resnet18", pretrained=False, stem_type="deep"), _x(1))
