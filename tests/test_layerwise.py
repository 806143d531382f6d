"""Layer-wise cut: stages rebuilt from the store alone reproduce the unsplit model."""
import subprocess
import sys

import pytest
import timm
import torch

from edgesplit.partitioner import (BlockSpan, BlockStore, build_blocks, cut, even_splits, load_model, partition,
                                   timm_recipe)

ATOL = 1e-5  # fp32, CPU, eval mode


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return BlockStore(tmp_path_factory.mktemp("store"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "vit_small_patch16_224", "resnet18", "resnet50"])
@torch.no_grad()
def test_split_equals_unsplit(arch, store):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    manifest = partition(model, arch, timm_recipe(arch), store, profile=False)
    x = torch.randn(2, 3, 224, 224)
    ref = model(x)
    del model  # stages are rebuilt from the store alone
    for n_stages in (2, 3, 4):
        spans = cut(arch, manifest.n_blocks, even_splits(manifest.n_blocks, n_stages))
        assert len(spans) == n_stages and spans[0].is_first and spans[-1].is_last
        y = x
        for span in spans:
            y = build_blocks(store, manifest, span.start, span.end)(y)
        assert (y - ref).abs().max().item() <= ATOL, (arch, n_stages)


def test_cut_covers_every_block_once():
    spans = cut("m", 14, [4, 8])
    assert [(s.start, s.end) for s in spans] == [(0, 4), (4, 8), (8, 14)]
    assert not spans[0].overlaps(spans[1]) and spans[0].overlaps(BlockSpan("m", 3, 5, 14))
    assert BlockSpan.from_msg(spans[1].to_msg()) == spans[1]
    with pytest.raises(ValueError, match="1..13"):
        cut("m", 14, [0, 4])
    with pytest.raises(ValueError):
        BlockSpan.from_msg(["m", 0, "4", 14])
    assert even_splits(14, 3) == [5, 9]


@pytest.mark.timeout(60)
def test_stage_needs_no_model_code_but_the_recipe(store, tmp_path):
    """A fresh process rebuilds a stage from the store directory alone."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    man = partition(model, "r18-5", timm_recipe("resnet18", num_classes=5), store, input_shape=[3, 64, 64], profile=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expect = model(x)
    from safetensors.torch import save_file
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = (
        "import sys, torch; from safetensors.torch import load_file\n"
        "from edgesplit.partitioner import BlockStore, load_model\n"
        "s = BlockStore(sys.argv[1]); m = load_model(s, s.manifest('r18-5'))\n"
        "y = m(load_file(sys.argv[2])['x']); print(' '.join(f'{v:.7f}' for v in y[0].tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(store.root), str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert torch.allclose(torch.tensor([float(v) for v in out]), expect[0], atol=ATOL)
    assert man.blocks[-1].out_shape == [5]


@pytest.mark.timeout(60)
@torch.no_grad()
def test_partitioner_matches_hand_written_reference(store):
    """The general partitioner's stages equal partitioner/reference.py's hand split, stage by stage."""
    from edgesplit.partitioner import reference

    torch.manual_seed(1)
    kw = {"img_size": 32, "patch_size": 4, "depth": 6, "num_classes": 10}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    man = partition(vit, "ref-vit", timm_recipe("vit_tiny_patch16_224", **kw), store, profile=False)
    x = torch.randn(3, 3, 32, 32)
    splits = [2, 5]
    expected = reference.run_stages(vit, x, splits)
    y = x
    for span, want in zip(cut("ref-vit", man.n_blocks, splits), expected):
        y = build_blocks(store, man, span.start, span.end)(y)
        assert (y - want).abs().max().item() <= ATOL


@pytest.mark.timeout(60)
def test_a_recipe_that_rebuilds_another_model_is_refused_before_storing(tmp_path):
    """Workers rebuild stages from the recipe: one missing the model's num_classes would store unloadable blocks."""
    from edgesplit.partitioner import BlockStore
    from edgesplit.partitioner.errors import UsageError

    kw = {"img_size": 32, "patch_size": 4, "depth": 2}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, **kw).eval()
    store = BlockStore(tmp_path / "s")
    with pytest.raises(UsageError, match=r"head.weight: model \(100, 192\), recipe \(1000, 192\)"):
        partition(vit, "variant", timm_recipe("vit_tiny_patch16_224", **kw), store, profile=False)
    assert not any((tmp_path / "s").rglob("*.safetensors")) and store.list_models() == []
    partition(vit, "variant", timm_recipe("vit_tiny_patch16_224", num_classes=100, **kw), store, profile=False)
