"""Small split models for training and evaluating codecs: a client half, a codec, a server half.

- ``"vgg11"``: VGG11 (cfg A, with BN) at ``width`` times 1/64 of the original channel
  widths, cut after its 5th conv as in amudvari/VCCprune: client
  ``[w, M, 2w, M, 4w, 4w, M, 8w]``, server ``[8w, M, 8w, 8w, M]``, then a small classifier
  (global average pool, Linear(8w, 256), ReLU, Linear(256, classes)) instead of the
  4096-wide one, which would dwarf the rest at 32x32.
- ``"vit"``: a small ViT (timm blocks, class token, learned position embedding) cut after
  block ``cut``; the cut carries (N, T, D) tokens.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch
from torch import nn

from .codecs import Codec, FilteredCodec, create_codec
from .errors import CodecError


class SplitNet(nn.Module):
    """client → codec (the link) → server; ``forward`` simulates the link."""

    def __init__(self, name: str, config: dict[str, Any], client: nn.Module, codec: Codec, server: nn.Module) -> None:
        super().__init__()
        self.name, self.config = name, dict(config)
        self.client, self.codec, self.server = client, codec, server

    def forward(self, x: torch.Tensor, budget: int | None = None, wire_dtype: str = "fp32") -> torch.Tensor:
        return self.server(self.codec(self.client(x), budget=budget, wire_dtype=wire_dtype))

    def client_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on the sending side: client and encoder (filter included)."""
        enc = self.codec.encoder_parameters() if isinstance(self.codec, FilteredCodec) else []
        return [*self.client.parameters(), *enc]

    def server_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on the receiving side: decoder and server."""
        dec = self.codec.decoder_parameters() if isinstance(self.codec, FilteredCodec) else []
        return [*dec, *self.server.parameters()]


def _vgg_stage(cfg: list[int | str], c_in: int) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c_in = int(v)
    return nn.Sequential(*layers), c_in


def vgg11_split(width: int = 32, in_chans: int = 1, num_classes: int = 10, r: int = 1,
                hidden: int = 256) -> SplitNet:
    """VGG11-style CNN cut after its 5th conv with an "fmap" codec at the cut.

    Args:
        width: channels of the first conv (64 in VGG11; 32 = half width, cut at 256 channels).
        in_chans: input channels.
        num_classes: classifier outputs.
        r: the codec's spatial reduction.
        hidden: classifier hidden width.
    Returns:
        The split model.
    """
    w = width
    client, c = _vgg_stage([w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w], in_chans)
    body, c2 = _vgg_stage([8 * w, "M", 8 * w, 8 * w, "M"], c)
    server = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, 8w, 1, 1) -> (N, 8w)
                           nn.Linear(c2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    codec = create_codec("fmap", channels=c, r=r)
    cfg = {"width": width, "in_chans": in_chans, "num_classes": num_classes, "r": r, "hidden": hidden}
    return SplitNet("vgg11", cfg, client, codec, server)


class ViTClient(nn.Module):
    """Patch embedding, class token, position embedding and the first ``cut`` blocks."""

    def __init__(self, img_px: int, patch_px: int, in_chans: int, dim: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        from timm.layers import PatchEmbed

        self.patch_embed = PatchEmbed(img_size=img_px, patch_size=patch_px, in_chans=in_chans, embed_dim=dim)
        n_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)  # (N, P, D)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed  # (N, P+1, D)
        return self.blocks(t)


class ViTServer(nn.Module):
    """The remaining blocks, final norm and the class-token head."""

    def __init__(self, dim: int, num_classes: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(t))[:, 0])  # (N, T, D) -> class token (N, D) -> logits


def vit_split(img_px: int = 32, patch_px: int = 4, in_chans: int = 1, num_classes: int = 10, dim: int = 128,
              depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, cut: int = 3) -> SplitNet:
    """Small ViT cut after block ``cut`` with a "tokens" codec at the cut.

    Args:
        img_px: input side.
        patch_px: patch side (img_px / patch_px squared patches plus a class token).
        in_chans: input channels.
        num_classes: classifier outputs.
        dim: embedding width D (the codec's channel count).
        depth: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width over D.
        cut: blocks on the client side (depth // 2 = the middle).
    Returns:
        The split model.
    """
    from timm.models.vision_transformer import Block

    if not 0 < cut < depth:
        raise CodecError(f"ViT cut must lie in 1..{depth - 1}, got {cut}")
    blocks = [Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
    for b in blocks:  # timm's ViT init (truncated normal, std 0.02), not PyTorch's default
        for m in b.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
    client = ViTClient(img_px, patch_px, in_chans, dim, blocks[:cut])
    server = ViTServer(dim, num_classes, blocks[cut:])
    codec = create_codec("tokens", dim=dim)
    cfg = {"img_px": img_px, "patch_px": patch_px, "in_chans": in_chans, "num_classes": num_classes,
           "dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio, "cut": cut}
    return SplitNet("vit", cfg, client, codec, server)


_SPLITNETS: dict[str, Callable[..., SplitNet]] = {"vgg11": vgg11_split, "vit": vit_split}


def list_splitnets(pattern: str = "*") -> list[str]:
    """Names of the split models ``create_splitnet`` can build."""
    return sorted(n for n in _SPLITNETS if fnmatch.fnmatch(n, pattern))


def create_splitnet(name: str, **kwargs: Any) -> SplitNet:
    """Build a split model by name with fresh random weights (seed torch first).

    Args:
        name: one of ``list_splitnets()``.
        **kwargs: the builder's arguments.
    Returns:
        The split model in train mode.
    """
    if name not in _SPLITNETS:
        raise CodecError(f"unknown split model {name!r}; known: {list_splitnets()}")
    try:
        return _SPLITNETS[name](**kwargs).train()
    except TypeError as e:
        raise CodecError(f"bad arguments for split model {name!r}: {e}") from None
