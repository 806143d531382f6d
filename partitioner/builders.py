"""Skeleton builders: how a model's architecture is rebuilt from a manifest recipe.

A recipe is plain JSON, e.g. ``{"builder": "timm", "arch": "vit_tiny_patch16_224",
"kwargs": {"num_classes": 10}}``. Weights never come from the recipe: the skeleton is
built on the ``meta`` device (no memory, no init cost) and the block store fills it.
Models that timm cannot build register a builder by name (``@register_builder``).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

from .errors import ManifestError

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}
# Builders that live in partitioner modules nobody may have imported yet (a worker only reads
# recipes). Other packages register theirs on import; partitioner never imports runtime.
_BUILDER_MODULES = {
    "pruned_vit": "edgesplit.partitioner.prune_vit",
    "pruned_resnet": "edgesplit.partitioner.prune_resnet",
    "classwise_fusion": "edgesplit.partitioner.classwise",
}


def register_builder(name: str) -> Callable[[Builder], Builder]:
    """Register ``fn(**kwargs) -> nn.Module`` under ``name`` for use in recipes."""

    def wrap(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn

    return wrap


def list_builders() -> list[str]:
    """Names usable as a recipe's ``builder``."""
    return sorted(set(_BUILDERS) | set(_BUILDER_MODULES))


@register_builder("timm")
def _timm_builder(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise ManifestError(f"timm has no model named {arch!r}; see timm.list_models() for names")
    return timm.create_model(arch, pretrained=False, **kwargs)


def timm_recipe(arch: str, **kwargs: Any) -> dict[str, Any]:
    """Recipe for a timm model, e.g. ``timm_recipe("resnet18", num_classes=10)``."""
    return {"builder": "timm", "arch": arch, "kwargs": dict(kwargs)}


def build_skeleton(recipe: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    """Build a model from its recipe, in eval mode, on ``device`` (``meta`` = shapes only).

    Args:
        recipe: ``{"builder": name, "kwargs": {...}}`` plus ``"arch"`` for timm.
        device: where parameters are allocated; ``meta`` allocates nothing.
    Returns:
        The model, its parameters uninitialised on ``meta``.
    """
    name = recipe.get("builder")
    if name not in _BUILDERS and name in _BUILDER_MODULES:
        importlib.import_module(_BUILDER_MODULES[name])
    if name not in _BUILDERS:
        raise ManifestError(
            f"recipe names builder {name!r}, which is not registered; known: {list_builders()}. "
            "Import the module that registers it before loading the model."
        )
    kwargs = dict(recipe.get("kwargs", {}))
    if "arch" in recipe:
        kwargs["arch"] = recipe["arch"]
    with torch.device(device):
        model = _BUILDERS[name](**kwargs)
    return model.eval()
