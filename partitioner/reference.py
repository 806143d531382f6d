"""A timm ViT split by hand into stages, in plain readable code (after nanoGPT's model.py).

This is the specification the general partitioner is tested against: if ``decompose`` +
``build_blocks`` and these few lines ever disagree, one of them has a bug. It reads the
weights of a standard timm ``VisionTransformer`` (class token, learned position embedding,
pre-norm blocks, class-token pooling) and implements the forward pass itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image -> tokens: patchify, prepend the class token, add position embeddings."""
    x = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=vit.patch_embed.proj.stride)
    x = x.flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)
    cls = vit.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
    return torch.cat([cls, x], dim=1) + vit.pos_embed  # (B, 1 + N, D)


def block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
    attn = blk.attn
    B, T, D = x.shape
    h = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)  # (B, T, 3D)
    q, k, v = qkv.view(B, T, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
    h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
    h = F.linear(h.transpose(1, 2).reshape(B, T, D), attn.proj.weight, attn.proj.bias)  # (B, T, D)
    x = x + h
    h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + h


def head(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final norm, class-token pooling, linear classifier."""
    x = F.layer_norm(x, (x.shape[-1],), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    return F.linear(x[:, 0], vit.head.weight, vit.head.bias)  # (B, T, D) -> (B, classes)


@torch.no_grad()
def run_stages(vit: nn.Module, x: torch.Tensor, splits: list[int]) -> list[torch.Tensor]:
    """Run the ViT as stages cut before the given block indices (0 = embed, 1.. = blocks, last = head).

    Returns:
        The activation leaving each stage, in order; the last one is the logits.
    """
    steps = [lambda t: embed(vit, t)] + [lambda t, b=b: block(b, t) for b in vit.blocks] + [lambda t: head(vit, t)]
    outs, bounds = [], [0, *splits, len(steps)]
    for a, b in zip(bounds, bounds[1:]):
        for step in steps[a:b]:
            x = step(x)
        outs.append(x)
    return outs
