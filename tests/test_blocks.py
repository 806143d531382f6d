"""Decomposition: blocks in order reproduce the model; unsupported models fail loudly."""
import pytest
import timm
import torch
from torch import nn

from edgesplit.partitioner import UnsupportedModelError, decompose

ATOL = 1e-5


def _chain(blocks, x):
    for b in blocks:
        x = b.module(x)
    return x


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch,kwargs", [
    ("vit_tiny_patch16_224", {}),
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 3, "num_classes": 10}),
    ("vit_tiny_patch16_224", {"reg_tokens": 2, "global_pool": "avg", "class_token": False}),
    ("resnet18", {"num_classes": 7}),
    ("resnet50", {}),
])
@torch.no_grad()
def test_blocks_compose_to_model(arch, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    size = kwargs.get("img_size", 224)
    x = torch.randn(2, 3, size, size)
    blocks = decompose(model)
    assert (_chain(blocks, x) - model(x)).abs().max().item() <= ATOL
    # every tensor of the model is owned by exactly one block
    owned = sum(len(b.module.state_dict()) for b in blocks)
    assert owned == len(model.state_dict())


def test_block_names_follow_timm():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3)
    assert [b.name for b in decompose(vit)] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    res = timm.create_model("resnet18", pretrained=False)
    names = [b.name for b in decompose(res)]
    assert names[0] == "stem" and names[-1] == "head" and "layer3.1" in names and len(names) == 10


def test_sequential_children_are_blocks():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [b.name for b in decompose(seq)] == ["0", "1", "2"]


def test_unsupported_model_names_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="VisionTransformer.*ResNet.*Sequential"):
        decompose(nn.Linear(3, 3))
