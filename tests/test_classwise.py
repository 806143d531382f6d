"""Class-wise split: grouping, group label spaces, assignment, fusion package in the store."""
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from edgesplit.partitioner import BlockStore, ManifestError, load_model, timm_recipe
from edgesplit.partitioner import classwise as cw
from edgesplit.partitioner.assign import (AssignmentError, SubModelCost, WorkerBudget, assign_greedy,
                                          assign_with_pruning, count_mflop)
from edgesplit.partitioner.prune_resnet import ResNetPruneConfig
from edgesplit.partitioner.prune_vit import ViTPruneConfig

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


# --- grouping -------------------------------------------------------------------------------

@pytest.mark.parametrize("c,n", [(10, 1), (10, 2), (10, 3), (10, 5), (10, 7), (10, 10), (7, 3)])
def test_balanced_groups_partition_the_classes(c, n):
    groups = cw.balanced_groups(c, n)
    sizes = [len(g) for g in groups]
    assert len(groups) == n and max(sizes) - min(sizes) <= 1
    assert sorted(k for g in groups for k in g) == list(range(c))
    assert cw.check_groups(groups, c) == groups


def test_balanced_groups_exact_and_errors():
    assert cw.balanced_groups(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(cw.GroupingError, match="11 non-empty groups"):
        cw.balanced_groups(10, 11)


@pytest.mark.parametrize("groups,match", [
    ([[0, 1], [1, 2]], "class 1 is in group 0 and group 1"),
    ([[0, 1], []], "group 1 is empty"),
    ([[0, 1]], r"classes \[2\] are in no group"),
    ([[0, 1, 2, 3]], "class 3 in group 0 is outside 0..2"),
])
def test_user_grouping_is_checked(groups, match):
    with pytest.raises(cw.GroupingError, match=match):
        cw.check_groups(groups, 3)


def test_user_grouping_is_used_as_given():
    assert cw.check_groups([[9, 0], [5, 1, 2, 3, 4, 6, 7, 8]], 10) == [[9, 0], [5, 1, 2, 3, 4, 6, 7, 8]]


# --- group label space and negatives -----------------------------------------------------------

def test_group_targets_put_other_classes_last():
    y = torch.tensor([0, 4, 2, 7, 4, 9])
    assert cw.group_targets(y, [4, 7]).tolist() == [2, 0, 2, 1, 0, 2]


def test_sample_group_keeps_all_positives_and_spreads_negatives():
    y = torch.arange(10).repeat_interleave(30)  # 30 samples per class
    gen = torch.Generator().manual_seed(0)
    idx = cw.sample_group(y, [2, 5], 1.0, gen)
    picked = y[idx]
    assert (picked == 2).sum() == 30 and (picked == 5).sum() == 30  # every positive
    neg = picked[(picked != 2) & (picked != 5)]
    assert neg.numel() == 60  # one negative per positive
    counts = torch.bincount(neg, minlength=10)[[0, 1, 3, 4, 6, 7, 8, 9]]
    assert counts.max() - counts.min() <= 1  # spread evenly over the 8 other classes
    assert idx.unique().numel() == idx.numel()
    again = cw.sample_group(y, [2, 5], 1.0, gen)
    assert not torch.equal(idx, again)  # a fresh draw each epoch
    assert cw.sample_group(y, [2, 5], 0.5, gen).numel() == 90


def test_random_shift_moves_images_within_bounds():
    x = torch.zeros(3, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = cw.random_shift(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(3))
    pos = [divmod(int(o.flatten().argmax()), 8) for o in out]
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in pos)
    assert cw.random_shift(x, 0, torch.Generator()) is x


# --- assignment -----------------------------------------------------------------------------

def test_greedy_places_largest_first_on_the_least_loaded_worker():
    costs = [SubModelCost("a", 100, 10.0), SubModelCost("b", 300, 30.0), SubModelCost("c", 200, 20.0)]
    workers = [WorkerBudget("w1", 1000, 25.0), WorkerBudget("w2", 1000, 40.0), WorkerBudget("w3", 150, 100.0)]
    # b (30) only fits w2's compute and w3 lacks memory; c (20) then goes to w1; a to w3 (most compute left)
    assert assign_greedy(costs, workers) == {"b": "w2", "c": "w1", "a": "w3"}


def test_greedy_exclusive_vs_shared_workers():
    costs = [SubModelCost("a", 10, 1.0), SubModelCost("b", 10, 1.0)]
    workers = [WorkerBudget("big", 100, 10.0)]
    with pytest.raises(AssignmentError, match="sub-model b needs 10 B") as e:
        assign_greedy(costs, workers)
    assert e.value.submodel == "b"
    assert assign_greedy(costs, workers, exclusive=False) == {"a": "big", "b": "big"}


def test_assignment_prunes_harder_until_it_fits():
    workers = [WorkerBudget("w1", 1000, 50.0), WorkerBudget("w2", 400, 50.0)]
    calls = []

    def shrink(name, rnd):
        calls.append((name, rnd))
        return SubModelCost(name, 800 // (2 ** rnd), 40.0)

    costs = [SubModelCost("g0", 900, 40.0), SubModelCost("g1", 800, 40.0)]
    placement, final = assign_with_pruning(costs, workers, shrink, max_rounds=3)
    assert calls == [("g1", 1)]  # g0 took w1; g1 (800 B) fit nowhere, pruned once to 400 B
    assert placement == {"g0": "w1", "g1": "w2"}
    assert [c.size_bytes for c in final] == [900, 400]


def test_assignment_fails_clearly_when_nothing_fits():
    workers = [WorkerBudget("w1", 10, 1.0)]
    with pytest.raises(AssignmentError, match="nothing fits: sub-model g0 needs 98 B .* harder 2 times"):
        assign_with_pruning([SubModelCost("g0", 100, 5.0)], workers,
                            lambda n, r: SubModelCost(n, 100 - r, 5.0), max_rounds=2)


def test_count_mflop_counts_multiply_adds_twice():
    assert count_mflop(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)), [10]) == pytest.approx(
        2 * (10 * 20 + 20 * 5) / 1e6)


# --- descriptor -----------------------------------------------------------------------------

def test_descriptor_round_trips_and_rejects_malformed():
    d = cw.ClasswiseDescriptor(10, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], ["p.g0", "p.g1"], [16, 24], "p", {"p.g0": "w1"})
    extra = {cw.CLASSWISE_KEY: d.to_extra()}
    assert cw.ClasswiseDescriptor.from_extra(extra, "p") == d
    with pytest.raises(ManifestError, match="not a class-wise package"):
        cw.ClasswiseDescriptor.from_extra({}, "p")
    bad = {cw.CLASSWISE_KEY: {**d.to_extra(), "feature_dims": [16]}}
    with pytest.raises(ManifestError, match="2 groups, 2 sub-models and 1 feature dims"):
        cw.ClasswiseDescriptor.from_extra(bad, "p")
    with pytest.raises(ManifestError, match="malformed"):
        cw.ClasswiseDescriptor.from_extra({cw.CLASSWISE_KEY: {"version": 1}}, "p")


# --- end to end on digits (tiny models, few steps: structure, not accuracy) ---------------------

def _digits(n=400):
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) * 2 - 1  # (n, 1, 32, 32)
    return x, torch.tensor(d.target[:n], dtype=torch.long)


FAST = cw.ClasswiseConfig(retrain=cw.TrainConfig(epochs=1), fusion=cw.TrainConfig(epochs=3, lr=3e-3),
                          fusion_hidden=32, score_samples=64)


@pytest.mark.timeout(60)
def test_vit_package_in_store_matches_in_memory_and_is_smaller(tmp_path):
    x, y = _digits()
    kw = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=4)
    recipe = timm_recipe("vit_tiny_patch16_224", **kw)
    full = timm.create_model(recipe["arch"], pretrained=False, **kw)
    cw.train_classifier(full, lambda g: (x, y), cw.TrainConfig(epochs=1))
    store = BlockStore(tmp_path)
    cfg = replace(FAST, vit=ViTPruneConfig(head_keep=0.5, mlp_keep=0.25, embed_keep=0.5, depth_keep=0.5))
    pkg = cw.split_classwise(full, recipe, "digits-vit", store, x, y, n_groups=3, config=cfg)

    d = pkg.descriptor
    assert d.groups == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]] and d.fusion == "digits-vit"
    assert d.submodels == ["digits-vit.g0", "digits-vit.g1", "digits-vit.g2"] and d.feature_dims == [24, 24, 24]
    assert sorted(store.list_models()) == sorted([*d.submodels, "digits-vit"])
    fusion_man = store.manifest("digits-vit")
    assert fusion_man.n_blocks == 1 and fusion_man.input_shape == [72]
    assert cw.ClasswiseDescriptor.from_extra(fusion_man.extra, "digits-vit") == d
    n_full = sum(p.numel() for p in full.parameters())
    for name, sub in zip(d.submodels, pkg.submodels):
        man = store.manifest(name)
        assert [b.name for b in man.blocks] == ["embed", "blocks.0", "head"]
        assert man.blocks[-1].out_shape == [24]  # the head block returns CLS features
        assert sum(p.numel() for p in sub.parameters()) < n_full / 4
        assert man.recipe["builder"] == "pruned_vit"

    xt = x[:16]
    with torch.no_grad():
        ref = pkg.fusion(torch.cat([s(xt) for s in pkg.submodels], dim=1))
        got = cw.classwise_predict(BlockStore(tmp_path), "digits-vit", xt)  # rebuilt from the store alone
        sub0 = load_model(store, store.manifest(d.submodels[0]))(xt)
    assert got.shape == (16, 10) and (got - ref).abs().max() <= ATOL
    assert sub0.shape == (16, 24)


@pytest.mark.timeout(60)
def test_resnet_package_reprunes_to_fit_worker_budgets(tmp_path):
    x, y = _digits()
    kw = dict(in_chans=1, num_classes=10, layers=[1, 1, 1, 1], channels=[16, 32, 32, 32])
    recipe = timm_recipe("resnet18", **kw)
    full = timm.create_model(recipe["arch"], pretrained=False, **kw)
    cw.train_classifier(full, lambda g: (x, y), cw.TrainConfig(epochs=1))
    store = BlockStore(tmp_path)
    cfg = replace(FAST, resnet=ResNetPruneConfig(channel_keep=0.5, inner_keep=0.5, min_filters=4), harder_factor=0.5)
    # first pass to learn the sub-model size at the configured pruning
    first = cw.split_classwise(full, recipe, "probe", store, x, y, n_groups=2, config=cfg)
    size = max(c.size_bytes for c in first.costs)
    # one worker too small for a sub-model at that pruning: its sub-model is pruned harder to fit
    workers = [WorkerBudget("w-big", 10 * size, 1e3), WorkerBudget("w-small", size // 2, 1e3)]
    pkg = cw.split_classwise(full, recipe, "digits-res", store, x, y, groups=[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]],
                             config=cfg, workers=workers)
    d = pkg.descriptor
    assert sorted(d.assignment.values()) == ["w-big", "w-small"]
    small = next(n for n, w in d.assignment.items() if w == "w-small")
    assert store.manifest(small).size_bytes <= size // 2
    assert d.feature_dims == [int(s.num_features) for s in pkg.submodels]
    with torch.no_grad():
        ref = pkg.fusion(torch.cat([s(x[:8]) for s in pkg.submodels], dim=1))
    assert (cw.classwise_predict(store, "digits-res", x[:8]) - ref).abs().max() <= ATOL

    with pytest.raises(AssignmentError, match="nothing fits"):
        cw.split_classwise(full, recipe, "never", store, x, y, n_groups=2, config=replace(cfg, max_reprune_rounds=1),
                           workers=[WorkerBudget("w", 100, 1e3), WorkerBudget("v", 100, 1e3)])
