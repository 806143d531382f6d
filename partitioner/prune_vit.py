"""Class-wise structured pruning of a timm VisionTransformer (ED-ViT step 2).

For one class group, the trained full ViT is run on that group's samples only and every
structural unit is scored by how much it contributes on them:

- **attention head** h of block l: mean over samples and tokens of the L2 norm of what the
  head writes into the residual stream, ``|| o_h @ W_proj[:, h]^T ||`` (o_h = the head's
  context vector). This is "mean |output| per head", measured after the output projection
  so that a head with large context vectors but tiny projection weights scores low.
- **MLP hidden neuron** j of block l: ``mean |GELU(a_j)| * || W_fc2[:, j] ||``, what the
  neuron adds to the residual stream. (APoZ, which EC-SNN uses for ReLU networks, needs an
  arbitrary "near zero" threshold for GELU, which is almost never exactly zero.)
- **embedding channel** c: sum over every LayerNorm output that reads the residual stream
  (norm1 and norm2 of each block, the final norm) of ``mean |LN(x)_c|``: how strongly the
  layers downstream read channel c.
- **block** l: mean over samples of ``||block(x) - x|| / ||x||``, the relative update the
  block makes to the residual stream (a block with a small update is nearly the identity).

The weakest units are then removed *physically*: a new, smaller timm VisionTransformer is
built (registered builder ``pruned_vit``, so it is rebuilt from a recipe like any model)
and filled with the surviving rows/columns of the full model's weights. Every layer keeps
at least a floor (``ViTPruneConfig.min_*``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .builders import register_builder
from .errors import UnsupportedModelError

OTHER_ROW_INIT_STD = 0.02  # init of the "other classes" logit row (timm's head init std)


@dataclass(frozen=True)
class ViTPruneConfig:
    """How much of each unit kind a class-group sub-model keeps (fractions of the full model)."""

    head_keep: float = 0.5  # attention heads kept per block
    mlp_keep: float = 0.25  # MLP hidden neurons kept per block
    embed_keep: float = 0.5  # embedding (residual stream) channels kept
    depth_keep: float = 1 / 3  # transformer blocks kept (the latency lever at batch 1)
    min_heads: int = 1  # floor per block
    min_mlp: int = 8  # floor per block
    min_embed: int = 16
    min_depth: int = 1

    def harder(self, factor: float) -> "ViTPruneConfig":
        """The same config keeping ``factor`` (< 1) times as much of every unit kind."""
        return replace(self, head_keep=self.head_keep * factor, mlp_keep=self.mlp_keep * factor,
                       embed_keep=self.embed_keep * factor, depth_keep=self.depth_keep * factor)


@dataclass(frozen=True)
class ViTScores:
    """Activity of every structural unit on one class group's samples (higher = keep)."""

    heads: list[torch.Tensor]  # per block: (num_heads,)
    mlp: list[torch.Tensor]  # per block: (hidden,)
    embed: torch.Tensor  # (embed_dim,)
    blocks: torch.Tensor  # (depth,)


@dataclass(frozen=True)
class ViTPrunePlan:
    """Which units of the full ViT survive; indices refer to the full model."""

    embed: list[int]  # kept embedding channels
    blocks: list[int]  # kept blocks
    heads: list[list[int]] = field(default_factory=list)  # per kept block: kept heads
    mlp: list[list[int]] = field(default_factory=list)  # per kept block: kept hidden neurons


def keep_count(n: int, frac: float, floor: int) -> int:
    """How many of ``n`` units to keep: ``round(frac * n)``, at least ``floor``, at most ``n``."""
    return max(1, min(n, max(floor, round(frac * n))))


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, in ascending index order (ties: lower index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def group_head(full: dict[str, torch.Tensor], prefix: str, classes: list[int], kept_inputs: torch.Tensor,
               out: dict[str, torch.Tensor]) -> None:
    """Fill ``out`` with a |group| + 1 classifier: the group's rows of the full head, then an "other" row.

    Args:
        full: the full model's state dict.
        prefix: the classifier's name in it (``head`` for a ViT, ``fc`` for a ResNet).
        classes: the group's class indices, in output order.
        kept_inputs: indices of the classifier inputs that survive pruning.
        out: the pruned state dict being built.
    """
    rows = torch.tensor(classes)
    w = full[f"{prefix}.weight"].index_select(0, rows).index_select(1, kept_inputs)  # (|g|, D')
    other = torch.randn(1, w.shape[1]) * OTHER_ROW_INIT_STD
    out[f"{prefix}.weight"] = torch.cat([w, other], dim=0)  # (|g| + 1, D'): last row = "other classes"
    if f"{prefix}.bias" in full:
        b = full[f"{prefix}.bias"].index_select(0, rows)
        out[f"{prefix}.bias"] = torch.cat([b, b.new_zeros(1)])


def _check_vit(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"prune_vit needs a timm VisionTransformer, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        ok = (attn is not None and hasattr(attn, "qkv") and hasattr(attn, "proj")
              and isinstance(getattr(attn, "q_norm", None), nn.Identity) and getattr(attn, "gate", None) is None
              and isinstance(getattr(attn, "norm", None), nn.Identity)
              and mlp is not None and hasattr(mlp, "fc1") and hasattr(mlp, "fc2")
              and isinstance(getattr(mlp, "norm", None), nn.Identity))
        if not ok:
            raise UnsupportedModelError(
                f"block {i} of the ViT is not a plain timm Block (fused qkv Attention without qk/scale norm "
                "or gate, Mlp without norm); class-wise pruning supports only that form")
    if model.reg_token is not None or getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("class-wise pruning supports ViTs without register tokens or attention pooling")


@torch.no_grad()
def score_vit(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> ViTScores:
    """Score heads, MLP neurons, embedding channels and blocks on the samples ``x``.

    Args:
        model: a trained timm VisionTransformer (plain blocks).
        x: (B, C, H, W) samples of one class group only.
        batch_size: samples per forward pass.
    Returns:
        Per-unit activity scores (see the module docstring for the criteria).
    """
    _check_vit(model)
    model = model.eval()
    depth = len(model.blocks)
    heads = [torch.zeros(blk.attn.num_heads) for blk in model.blocks]
    mlp = [torch.zeros(blk.mlp.fc1.out_features) for blk in model.blocks]
    embed = torch.zeros(model.embed_dim)
    blocks = torch.zeros(depth)
    n_tok = 0  # samples * tokens seen, for the token means
    n_smp = 0
    hooks = []

    def head_hook(i: int):
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            o = args[0]  # (B, T, A) concatenated head outputs
            attn = model.blocks[i].attn
            o = o.reshape(*o.shape[:2], attn.num_heads, attn.head_dim)  # (B, T, H, hd)
            w = mod.weight.reshape(mod.out_features, attn.num_heads, attn.head_dim)  # (D, H, hd)
            contrib = torch.einsum("bthd,ehd->bthe", o, w)  # (B, T, H, D)
            heads[i] += contrib.norm(dim=-1).sum(dim=(0, 1))
        return fn

    def mlp_hook(i: int):
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            mlp[i] += out.abs().sum(dim=(0, 1))  # (B, T, hidden) -> (hidden,)
        return fn

    def norm_hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        embed.add_(out.abs().sum(dim=(0, 1)))  # (B, T, D) -> (D,)

    def block_hook(i: int):
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x_in = args[0]
            rel = (out - x_in).flatten(1).norm(dim=1) / x_in.flatten(1).norm(dim=1).clamp_min(1e-12)
            blocks[i] += rel.sum()
        return fn

    for i, blk in enumerate(model.blocks):
        hooks.append(blk.attn.proj.register_forward_pre_hook(head_hook(i)))
        hooks.append(blk.mlp.act.register_forward_hook(mlp_hook(i)))
        hooks.append(blk.norm1.register_forward_hook(norm_hook))
        hooks.append(blk.norm2.register_forward_hook(norm_hook))
        hooks.append(blk.register_forward_hook(block_hook(i)))
    hooks.append(model.norm.register_forward_hook(norm_hook))
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size]
            tokens = model.forward_features(xb)  # (B, T, D)
            n_tok += tokens.shape[0] * tokens.shape[1]
            n_smp += tokens.shape[0]
    finally:
        for h in hooks:
            h.remove()
    if n_smp == 0:
        raise ValueError("score_vit needs at least one sample of the class group")
    for i, blk in enumerate(model.blocks):
        mlp[i] = mlp[i] / n_tok * blk.mlp.fc2.weight.norm(dim=0)  # weight by outgoing column norm
    return ViTScores(heads=[h / n_tok for h in heads], mlp=mlp, embed=embed / n_tok, blocks=blocks / n_smp)


def plan_vit_pruning(scores: ViTScores, cfg: ViTPruneConfig) -> ViTPrunePlan:
    """Keep the highest-scoring units of each kind, per layer, down to the config's fractions and floors."""
    depth = len(scores.heads)
    kept_blocks = top_indices(scores.blocks, keep_count(depth, cfg.depth_keep, cfg.min_depth))
    embed = top_indices(scores.embed, keep_count(scores.embed.numel(), cfg.embed_keep, cfg.min_embed))
    heads = [top_indices(scores.heads[i], keep_count(scores.heads[i].numel(), cfg.head_keep, cfg.min_heads))
             for i in kept_blocks]
    mlp = [top_indices(scores.mlp[i], keep_count(scores.mlp[i].numel(), cfg.mlp_keep, cfg.min_mlp))
           for i in kept_blocks]
    return ViTPrunePlan(embed=embed, blocks=kept_blocks, heads=heads, mlp=mlp)


def full_plan(model: nn.Module) -> ViTPrunePlan:
    """The plan that keeps everything (pruning with it reproduces the model)."""
    depth = len(model.blocks)
    return ViTPrunePlan(embed=list(range(model.embed_dim)), blocks=list(range(depth)),
                        heads=[list(range(b.attn.num_heads)) for b in model.blocks],
                        mlp=[list(range(b.mlp.fc1.out_features)) for b in model.blocks])


@register_builder("pruned_vit")
def build_pruned_vit(arch: str, base_kwargs: dict[str, Any], embed_dim: int, head_dim: int,
                     heads: list[int], mlp_hidden: list[int], num_classes: int) -> nn.Module:
    """A timm VisionTransformer whose blocks have their own head counts and MLP widths.

    Args:
        arch: timm architecture the full model was built from (e.g. ``vit_tiny_patch16_224``).
        base_kwargs: the full model's timm kwargs (img_size, patch_size, in_chans, ...).
        embed_dim: kept embedding width.
        head_dim: per-head width (unchanged by pruning).
        heads: number of attention heads in each kept block.
        mlp_hidden: MLP hidden width of each kept block.
        num_classes: classifier outputs; 0 = the model returns pooled (CLS) features.
    Returns:
        The model, built on the current default device (``meta`` inside ``build_skeleton``).
    """
    import timm
    from timm.layers import Attention, Mlp

    if len(heads) != len(mlp_hidden) or not heads:
        raise ValueError(f"heads ({len(heads)}) and mlp_hidden ({len(mlp_hidden)}) must list the same, "
                         "non-zero number of blocks")
    kw = {**base_kwargs, "embed_dim": embed_dim, "depth": len(heads), "num_heads": 1, "num_classes": num_classes}
    model = timm.create_model(arch, pretrained=False, **kw)
    for blk, n_heads, hidden in zip(model.blocks, heads, mlp_hidden):
        old_attn, old_mlp = blk.attn, blk.mlp
        blk.attn = Attention(embed_dim, num_heads=n_heads, attn_head_dim=head_dim,
                             qkv_bias=old_attn.qkv.bias is not None, proj_bias=old_attn.proj.bias is not None,
                             attn_drop=old_attn.attn_drop.p, proj_drop=old_attn.proj_drop.p)
        blk.mlp = Mlp(embed_dim, hidden, act_layer=type(old_mlp.act),
                      bias=(old_mlp.fc1.bias is not None, old_mlp.fc2.bias is not None),
                      drop=(old_mlp.drop1.p, old_mlp.drop2.p))
    return model


def pruned_vit_recipe(recipe: dict[str, Any], model: nn.Module, plan: ViTPrunePlan, num_classes: int) -> dict[str, Any]:
    """Recipe of the pruned model, from the full model's timm recipe and the plan."""
    if recipe.get("builder") != "timm":
        raise UnsupportedModelError(f"class-wise pruning rebuilds timm models; the recipe's builder is "
                                    f"{recipe.get('builder')!r}. Partition the full model with a timm recipe.")
    return {"builder": "pruned_vit", "kwargs": {
        "arch": recipe["arch"], "base_kwargs": dict(recipe.get("kwargs", {})), "embed_dim": len(plan.embed),
        "head_dim": int(model.blocks[0].attn.head_dim), "heads": [len(h) for h in plan.heads],
        "mlp_hidden": [len(m) for m in plan.mlp], "num_classes": int(num_classes)}}


def _pruned_state(model: nn.Module, plan: ViTPrunePlan, classes: list[int] | None,
                  target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model's tensors cut down to the plan, named as in the pruned model's state dict."""
    full = model.state_dict()
    e = torch.tensor(plan.embed)
    hd = int(model.blocks[0].attn.head_dim)
    out: dict[str, torch.Tensor] = {}

    def chan(name: str, dim: int = -1) -> torch.Tensor:
        return full[name].index_select(dim, e)

    out["cls_token"] = chan("cls_token")
    out["pos_embed"] = chan("pos_embed")
    out["patch_embed.proj.weight"] = chan("patch_embed.proj.weight", 0)
    if "patch_embed.proj.bias" in full:
        out["patch_embed.proj.bias"] = chan("patch_embed.proj.bias", 0)
    for prefix in ("norm_pre", "patch_embed.norm", "norm", "fc_norm"):
        for p in ("weight", "bias"):
            if f"{prefix}.{p}" in full:
                out[f"{prefix}.{p}"] = chan(f"{prefix}.{p}", 0)
    for j, (i, heads, hidden) in enumerate(zip(plan.blocks, plan.heads, plan.mlp)):
        src, dst = f"blocks.{i}.", f"blocks.{j}."
        n_heads = int(model.blocks[i].attn.num_heads)
        # qkv rows are laid out (3, heads, head_dim): keep the kept heads' rows of q, k and v
        rows = torch.tensor([s * n_heads * hd + h * hd + d for s in range(3) for h in heads for d in range(hd)])
        cols = torch.tensor([h * hd + d for h in heads for d in range(hd)])
        hid = torch.tensor(hidden)
        for name, t in full.items():
            if not name.startswith(src):
                continue
            local = name[len(src):]
            if local in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma"):
                out[dst + local] = t.index_select(0, e)
            elif local == "attn.qkv.weight":
                out[dst + local] = t.index_select(0, rows).index_select(1, e)
            elif local == "attn.qkv.bias":
                out[dst + local] = t.index_select(0, rows)
            elif local == "attn.proj.weight":
                out[dst + local] = t.index_select(0, e).index_select(1, cols)
            elif local in ("attn.proj.bias", "mlp.fc2.bias"):
                out[dst + local] = t.index_select(0, e)
            elif local == "mlp.fc1.weight":
                out[dst + local] = t.index_select(0, hid).index_select(1, e)
            elif local == "mlp.fc1.bias":
                out[dst + local] = t.index_select(0, hid)
            elif local == "mlp.fc2.weight":
                out[dst + local] = t.index_select(0, e).index_select(1, hid)
            else:
                raise UnsupportedModelError(f"do not know how to prune tensor {name} of the ViT")
    if classes is not None:
        group_head(full, "head", classes, e, out)
    unknown = set(target) - set(out)
    if unknown:
        raise UnsupportedModelError(f"pruned ViT has tensors the pruner does not fill: {sorted(unknown)}")
    return out


def prune_vit(model: nn.Module, recipe: dict[str, Any], plan: ViTPrunePlan,
              classes: list[int] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the physically smaller ViT the plan describes, with the full model's surviving weights.

    Args:
        model: the trained full timm VisionTransformer.
        recipe: its timm recipe (``{"builder": "timm", "arch": ..., "kwargs": {...}}``).
        plan: which units survive (``plan_vit_pruning`` or ``full_plan``).
        classes: the group's classes: the pruned model gets ``len(classes) + 1`` logits (the
            group's classes in this order, then "another group's class"), initialised from the
            full head's rows; ``None`` = no classifier (the model returns CLS features).
    Returns:
        (pruned model on CPU in eval mode, its recipe).
    """
    _check_vit(model)
    n_out = 0 if classes is None else len(classes) + 1
    new_recipe = pruned_vit_recipe(recipe, model, plan, n_out)
    small = build_pruned_vit(**new_recipe["kwargs"])
    state = _pruned_state(model, plan, classes, small.state_dict())
    small.load_state_dict(state, strict=True)
    return small.eval(), new_recipe
