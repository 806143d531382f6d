"""Decompose a model into an ordered list of blocks whose composition is the model.

We cut on timm's own seams (see notes/style.md): a ViT is embed -> blocks.i -> head, a
ResNet is stem -> each residual block -> head, an ``nn.Sequential`` is its children.
Each block is a small ``nn.Module`` that *owns* its tensors (no reference back to the
whole model), so its ``state_dict`` is exactly what the block store keeps, with names
relative to the block: two models that share a block's tensors share its id.
Anything else raises :class:`UnsupportedModelError` rather than guessing a split.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class NamedBlock:
    """One block: its name inside the original model and the module that runs it."""

    name: str
    module: nn.Module


Splitter = Callable[[nn.Module], list[NamedBlock]]
_SPLITTERS: list[tuple[str, Callable[[nn.Module], bool], Splitter]] = []


def register_splitter(name: str, matches: Callable[[nn.Module], bool]) -> Callable[[Splitter], Splitter]:
    """Register a splitter for the models ``matches`` accepts (first match wins)."""

    def wrap(fn: Splitter) -> Splitter:
        _SPLITTERS.append((name, matches, fn))
        return fn

    return wrap


def list_splitters() -> list[str]:
    """Names of the model families that can be decomposed."""
    return [name for name, _, _ in _SPLITTERS]


def decompose(model: nn.Module) -> list[NamedBlock]:
    """Split ``model`` into blocks; running them in order equals ``model.forward`` in eval mode.

    Args:
        model: a timm VisionTransformer (ViT, DeiT), a timm ResNet, or an ``nn.Sequential``.
    Returns:
        The ordered blocks. They share parameter objects with ``model``.
    Raises:
        UnsupportedModelError: for any other model, naming what is supported.
    """
    for _, matches, split in _SPLITTERS:
        if matches(model):
            return split(model)
    raise UnsupportedModelError(
        f"cannot split {type(model).__module__}.{type(model).__name__}: supported are "
        f"{', '.join(list_splitters())}. Wrap your model's stages in an nn.Sequential, or register "
        "a splitter with edgesplit.partitioner.register_splitter."
    )


class _Owner(nn.Module):
    """A block that takes over some attributes of a model (modules, parameters, flags)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        for name in names:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))


# --- timm VisionTransformer -------------------------------------------------------------

def _timm_class(module: str, name: str) -> type | None:
    """A timm class, if timm is loaded at all (a model built by timm implies it is; importing costs ~2 s)."""
    if "timm" not in sys.modules:
        return None
    return getattr(importlib.import_module(module), name, None)


def _is_vit(model: nn.Module) -> bool:
    cls = _timm_class("timm.models.vision_transformer", "VisionTransformer")
    return cls is not None and isinstance(model, cls)


class ViTEmbed(_Owner):
    """Patch embedding, class/register tokens and position embedding of a timm ViT."""

    _NAMES = ["patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre",
              "dynamic_img_size", "no_embed_class", "num_prefix_tokens", "dist_token"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, self._NAMES)
        self._pos_embed_fn = type(model)._pos_embed  # timm's own code, with this block as `self`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, 3, H, W) -> (B, N, D)
        x = self._pos_embed_fn(self, x)  # (B, N, D) -> (B, prefix + N, D)
        x = self.patch_drop(x)
        return self.norm_pre(x)


class ViTHead(_Owner):
    """Final norm, token pooling and classifier of a timm ViT."""

    _NAMES = ["norm", "attn_pool", "fc_norm", "head_drop", "head", "head_dist", "global_pool",
              "num_prefix_tokens", "pool_include_prefix", "distilled_training"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, self._NAMES)
        cls = type(model)
        self._pool_fn = getattr(cls, "pool", None)
        self._forward_head_fn = cls.forward_head

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        return self._pool_fn(self, x, pool_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # (B, T, D)
        return self._forward_head_fn(self, x)  # (B, T, D) -> (B, num_classes)


@register_splitter("timm VisionTransformer (vit_*, deit_*)", _is_vit)
def _split_vit(model: nn.Module) -> list[NamedBlock]:
    if not isinstance(getattr(model, "blocks", None), nn.Sequential):
        raise UnsupportedModelError(f"{type(model).__name__}.blocks is not an nn.Sequential; cannot cut it")
    blocks = [NamedBlock("embed", ViTEmbed(model))]
    blocks += [NamedBlock(f"blocks.{i}", blk) for i, blk in enumerate(model.blocks)]
    blocks.append(NamedBlock("head", ViTHead(model)))
    return blocks


# --- timm ResNet ------------------------------------------------------------------------

def _is_resnet(model: nn.Module) -> bool:
    cls = _timm_class("timm.models.resnet", "ResNet")
    return cls is not None and isinstance(model, cls)


class ResNetStem(_Owner):
    """conv1 -> bn1 -> act1 -> maxpool of a timm ResNet."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, ["conv1", "bn1", "act1", "maxpool"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))


class ResNetHead(_Owner):
    """Global pool and classifier of a timm ResNet."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, ["global_pool", "fc", "drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(x)  # (B, C, H, W) -> (B, C)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return self.fc(x)


@register_splitter("timm ResNet (resnet*, resnext*, wide_resnet*)", _is_resnet)
def _split_resnet(model: nn.Module) -> list[NamedBlock]:
    blocks = [NamedBlock("stem", ResNetStem(model))]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, stage, None)
        if not isinstance(layer, nn.Sequential):
            raise UnsupportedModelError(f"{type(model).__name__}.{stage} is not an nn.Sequential; cannot cut it")
        blocks += [NamedBlock(f"{stage}.{i}", blk) for i, blk in enumerate(layer)]
    blocks.append(NamedBlock("head", ResNetHead(model)))
    return blocks


# --- nn.Sequential ----------------------------------------------------------------------

@register_splitter("torch nn.Sequential (each child is a block)", lambda m: isinstance(m, nn.Sequential))
def _split_sequential(model: nn.Module) -> list[NamedBlock]:
    if len(model) == 0:
        raise UnsupportedModelError("cannot split an empty nn.Sequential")
    return [NamedBlock(name, child) for name, child in model.named_children()]
