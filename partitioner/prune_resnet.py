"""Class-wise structured pruning of a timm ResNet with BasicBlocks (EC-SNN's APoZ, ED-ViT step 2).

For one class group, the trained full ResNet is run on that group's samples only and every
convolution filter is scored by APoZ, the Average Percentage of Zeros of its ReLU output
over samples and positions (EC-SNN Eq. 6): a filter whose output is almost always zero on
the group's data does little for it. Filters are then removed *physically*:

- **inner filters** of a block (conv1's outputs = conv2's inputs): each block on its own.
- **residual channels**: every tensor added to a residual stream must have the same channels,
  so the stem's output and the outputs of all blocks that share one residual stream (a stage,
  and the stem too while layer1 has no projection shortcut) form one *residual group*,
  scored by the mean APoZ of its members and pruned together. A projection shortcut
  (``downsample``) starts a new group; it is pruned on both sides (rows and columns).
- **whole blocks** without a projection shortcut can be dropped (the block becomes the
  identity), scored by the relative update ``||block(x) - x|| / ||x||`` on the group's data.

Each layer keeps at least ``ResNetPruneConfig.min_filters`` filters. The smaller model is a
timm ResNet rebuilt from a recipe (registered builder ``pruned_resnet``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .builders import register_builder
from .errors import UnsupportedModelError
from .prune_vit import group_head, keep_count, top_indices

STAGES = ("layer1", "layer2", "layer3", "layer4")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class ResNetPruneConfig:
    """How much of each unit kind a class-group sub-model keeps (fractions of the full model)."""

    channel_keep: float = 0.375  # channels kept per residual group (stem + stages)
    inner_keep: float = 0.375  # conv1 filters kept per block
    depth_keep: float = 0.5  # blocks kept per stage (blocks with a projection shortcut always stay)
    min_filters: int = 8  # floor per layer (EC-SNN keeps at least 16 at its widths)

    def harder(self, factor: float) -> "ResNetPruneConfig":
        """The same config keeping ``factor`` (< 1) times as much of every unit kind."""
        return replace(self, channel_keep=self.channel_keep * factor, inner_keep=self.inner_keep * factor,
                       depth_keep=self.depth_keep * factor)


@dataclass(frozen=True)
class ResNetScores:
    """Scores on one class group's samples: APoZ (lower = keep) and block updates (higher = keep)."""

    groups: list[torch.Tensor]  # per residual group: (channels,) mean APoZ of its members
    inner: list[list[torch.Tensor]]  # per stage, per block: (conv1 filters,) APoZ
    blocks: list[torch.Tensor]  # per stage: (blocks,) relative residual update


@dataclass(frozen=True)
class ResNetPrunePlan:
    """Which units of the full ResNet survive; indices refer to the full model."""

    groups: list[list[int]]  # kept channels of each residual group (group 0 = stem output)
    blocks: list[list[int]]  # per stage: kept blocks
    inner: list[list[list[int]]]  # per stage, per kept block: kept conv1 filters


def _stages(model: nn.Module) -> list[nn.Sequential]:
    return [getattr(model, s) for s in STAGES]


def _downsample_parts(ds: nn.Module) -> tuple[str, str]:
    """Child names of the projection shortcut's conv and norm (``0``/``1``, or ``1``/``2`` after a pool)."""
    convs = [n for n, m in ds.named_children() if isinstance(m, nn.Conv2d)]
    norms = [n for n, m in ds.named_children() if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != 1 or len(norms) != 1:
        raise UnsupportedModelError("a projection shortcut must be one Conv2d and one BatchNorm2d "
                                    "(after an optional pool)")
    return convs[0], norms[0]


def _check_resnet(model: nn.Module) -> None:
    from timm.models.resnet import BasicBlock, ResNet

    if not isinstance(model, ResNet):
        raise UnsupportedModelError(f"prune_resnet needs a timm ResNet, got {type(model).__name__}")
    if not isinstance(model.conv1, nn.Conv2d) or not isinstance(model.bn1, nn.BatchNorm2d):
        raise UnsupportedModelError("class-wise pruning supports the plain ResNet stem (one conv, one BatchNorm); "
                                    "deep stems are not supported")
    for s, stage in zip(STAGES, _stages(model)):
        for b, blk in enumerate(stage):
            if not isinstance(blk, BasicBlock) or blk.se is not None or not isinstance(blk.aa, nn.Identity) \
                    or not isinstance(blk.drop_block, nn.Identity):
                raise UnsupportedModelError(f"{s}.{b} is not a plain BasicBlock (no SE, anti-aliasing or drop-block); "
                                            "class-wise ResNet pruning supports resnet18/34-style blocks only")
            if blk.downsample is not None:
                _downsample_parts(blk.downsample)


def residual_groups(model: nn.Module) -> list[list[int]]:
    """Residual group of each block's output, per stage; group 0 is the stem's output.

    A block without a projection shortcut adds its output to its input, so both lie in the same
    group; a projection shortcut starts a new group.
    """
    out, g = [], 0
    for stage in _stages(model):
        row = []
        for blk in stage:
            if blk.downsample is not None:
                g += 1
            row.append(g)
        out.append(row)
    return out


@torch.no_grad()
def score_resnet(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> ResNetScores:
    """APoZ of every filter and residual group, and each block's relative update, on ``x``.

    Args:
        model: a trained timm ResNet of plain BasicBlocks.
        x: (B, C, H, W) samples of one class group only.
        batch_size: samples per forward pass.
    Returns:
        The scores (APoZ in [0, 1]: the fraction of zero ReLU outputs).
    """
    _check_resnet(model)
    model = model.eval()
    groups_of = residual_groups(model)
    n_groups = groups_of[-1][-1] + 1
    zeros_g: list[torch.Tensor | None] = [None] * n_groups
    inner = [[torch.zeros(blk.conv1.out_channels) for blk in stage] for stage in _stages(model)]
    upd = [torch.zeros(len(stage)) for stage in _stages(model)]
    n_smp = 0
    hooks = []

    def apoz(out: torch.Tensor) -> torch.Tensor:
        return (out == 0).float().mean(dim=(2, 3)).sum(dim=0)  # (B, C, H, W) -> (C,) summed over samples

    def group_hook(g: int):
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            z = apoz(out)
            zeros_g[g] = z if zeros_g[g] is None else zeros_g[g] + z
        return fn

    def inner_hook(s: int, b: int):
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            inner[s][b] += apoz(out)
        return fn

    def block_hook(s: int, b: int):
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x_in = args[0]
            if x_in.shape != out.shape:  # a projection block has no identity to compare with
                upd[s][b] += float("inf")
                return
            rel = (out - x_in).flatten(1).norm(dim=1) / x_in.flatten(1).norm(dim=1).clamp_min(1e-12)
            upd[s][b] += rel.sum()
        return fn

    hooks.append(model.act1.register_forward_hook(group_hook(0)))
    for s, stage in enumerate(_stages(model)):
        for b, blk in enumerate(stage):
            hooks.append(blk.act1.register_forward_hook(inner_hook(s, b)))
            hooks.append(blk.act2.register_forward_hook(group_hook(groups_of[s][b])))
            hooks.append(blk.register_forward_hook(block_hook(s, b)))
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size]
            model.forward_features(xb)
            n_smp += xb.shape[0]
    finally:
        for h in hooks:
            h.remove()
    if n_smp == 0:
        raise ValueError("score_resnet needs at least one sample of the class group")
    members = [1] + [0] * (n_groups - 1)  # the stem's output is group 0's first member
    for row in groups_of:
        for g in row:
            members[g] += 1
    groups = [z / (n_smp * m) for z, m in zip(zeros_g, members)]
    return ResNetScores(groups=groups, inner=[[t / n_smp for t in row] for row in inner],
                        blocks=[u / n_smp for u in upd])


def plan_resnet_pruning(model: nn.Module, scores: ResNetScores, cfg: ResNetPruneConfig) -> ResNetPrunePlan:
    """Keep the lowest-APoZ filters and the most active blocks, down to the config's fractions and floors."""
    groups = [top_indices(-apz, keep_count(apz.numel(), cfg.channel_keep, cfg.min_filters)) for apz in scores.groups]
    blocks, inner = [], []
    for s, stage in enumerate(_stages(model)):
        forced = [b for b, blk in enumerate(stage) if blk.downsample is not None]
        k = max(len(forced), keep_count(len(stage), cfg.depth_keep, 1))
        score = scores.blocks[s].clone()
        score[forced] = float("inf")
        kept = top_indices(score, k)
        blocks.append(kept)
        inner.append([top_indices(-scores.inner[s][b], keep_count(scores.inner[s][b].numel(), cfg.inner_keep,
                                                                  cfg.min_filters)) for b in kept])
    return ResNetPrunePlan(groups=groups, blocks=blocks, inner=inner)


def full_plan(model: nn.Module) -> ResNetPrunePlan:
    """The plan that keeps everything (pruning with it reproduces the model)."""
    groups_of = residual_groups(model)
    widths = [model.bn1.num_features] + [stage[b].bn2.num_features for stage, row in zip(_stages(model), groups_of)
                                         for b in range(len(row)) if stage[b].downsample is not None]
    return ResNetPrunePlan(groups=[list(range(w)) for w in widths],
                           blocks=[list(range(len(stage))) for stage in _stages(model)],
                           inner=[[list(range(blk.conv1.out_channels)) for blk in stage] for stage in _stages(model)])


@register_builder("pruned_resnet")
def build_pruned_resnet(arch: str, base_kwargs: dict[str, Any], stem_width: int, channels: list[int],
                        layers: list[int], inner: list[list[int]], downsample: list[bool],
                        num_classes: int) -> nn.Module:
    """A timm ResNet of BasicBlocks with per-block inner widths.

    Args:
        arch: timm architecture of the full model (e.g. ``resnet18``).
        base_kwargs: the full model's timm kwargs.
        stem_width: kept stem output channels.
        channels: kept output channels of each stage.
        layers: kept blocks per stage.
        inner: per stage, per block: conv1 output channels.
        downsample: per stage: whether its first block has a projection shortcut.
        num_classes: classifier outputs; 0 = the model returns pooled features.
    Returns:
        The model, built on the current default device (``meta`` inside ``build_skeleton``).
    """
    import timm

    kw = {**base_kwargs, "stem_width": stem_width, "channels": tuple(channels), "layers": tuple(layers),
          "num_classes": num_classes}
    model = timm.create_model(arch, pretrained=False, **kw)
    if model.conv1.out_channels != stem_width:  # timm's plain stem is 64 wide whatever stem_width says
        c, bn = model.conv1, model.bn1
        model.conv1 = nn.Conv2d(c.in_channels, stem_width, c.kernel_size, stride=c.stride, padding=c.padding,
                                bias=False)
        model.bn1 = type(bn)(stem_width, eps=bn.eps, momentum=bn.momentum)
    c_prev = stem_width
    for s, stage in enumerate(_stages(model)):
        for b, blk in enumerate(stage):
            c1, c2, bn = blk.conv1, blk.conv2, blk.bn1
            width = inner[s][b]
            blk.conv1 = nn.Conv2d(c_prev, width, c1.kernel_size, stride=c1.stride, padding=c1.padding,
                                  dilation=c1.dilation, bias=False)
            blk.bn1 = type(bn)(width, eps=bn.eps, momentum=bn.momentum)
            blk.conv2 = nn.Conv2d(width, channels[s], c2.kernel_size, stride=c2.stride, padding=c2.padding,
                                  dilation=c2.dilation, bias=False)
            if b == 0:
                blk.downsample = _shortcut(blk, c_prev, channels[s], downsample[s])
            c_prev = channels[s]
    return model


def _shortcut(blk: nn.Module, c_in: int, c_out: int, wanted: bool) -> nn.Module | None:
    """The first block's projection shortcut at the pruned widths (timm decides it from widths alone)."""
    if not wanted:
        if c_in != c_out:
            raise UnsupportedModelError(f"a block without projection shortcut cannot map {c_in} to {c_out} channels; "
                                        "its residual channels must match the previous stage's")
        return None
    ds = blk.downsample
    if ds is None:  # equal pruned widths at a stride-1 projection: timm omitted the shortcut the weights need
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=blk.stride, bias=False), nn.BatchNorm2d(c_out))
    conv, norm = _downsample_parts(ds)
    old = getattr(ds, conv)
    setattr(ds, conv, nn.Conv2d(c_in, c_out, old.kernel_size, stride=old.stride, padding=old.padding,
                                dilation=old.dilation, bias=False))
    bn = getattr(ds, norm)
    setattr(ds, norm, type(bn)(c_out, eps=bn.eps, momentum=bn.momentum))
    return ds


def pruned_resnet_recipe(recipe: dict[str, Any], model: nn.Module, plan: ResNetPrunePlan,
                         num_classes: int) -> dict[str, Any]:
    """Recipe of the pruned model, from the full model's timm recipe and the plan."""
    if recipe.get("builder") != "timm":
        raise UnsupportedModelError(f"class-wise pruning rebuilds timm models; the recipe's builder is "
                                    f"{recipe.get('builder')!r}. Partition the full model with a timm recipe.")
    groups_of = residual_groups(model)
    return {"builder": "pruned_resnet", "kwargs": {
        "arch": recipe["arch"], "base_kwargs": dict(recipe.get("kwargs", {})),
        "stem_width": len(plan.groups[0]),
        "channels": [len(plan.groups[row[-1]]) for row in groups_of],
        "layers": [len(b) for b in plan.blocks],
        "inner": [[len(f) for f in row] for row in plan.inner],
        "downsample": [stage[0].downsample is not None for stage in _stages(model)],
        "num_classes": int(num_classes)}}


def _bn(full: dict[str, torch.Tensor], src: str, dst: str, idx: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    for t in BN_TENSORS:
        out[f"{dst}.{t}"] = full[f"{src}.{t}"].index_select(0, idx)
    out[f"{dst}.num_batches_tracked"] = full[f"{src}.num_batches_tracked"].clone()


def _pruned_state(model: nn.Module, plan: ResNetPrunePlan, classes: list[int] | None,
                  target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model's tensors cut down to the plan, named as in the pruned model's state dict."""
    full = model.state_dict()
    groups_of = residual_groups(model)
    g = [torch.tensor(ix) for ix in plan.groups]
    out: dict[str, torch.Tensor] = {"conv1.weight": full["conv1.weight"].index_select(0, g[0])}
    _bn(full, "bn1", "bn1", g[0], out)
    prev = 0  # residual group feeding the next block
    for s, (name, stage) in enumerate(zip(STAGES, _stages(model))):
        for j, b in enumerate(plan.blocks[s]):
            src, dst = f"{name}.{b}", f"{name}.{j}"
            blk = stage[b]
            # a dropped block is the identity, so the input group is that of the last kept block before it
            g_in = prev
            g_out = groups_of[s][b]
            f = torch.tensor(plan.inner[s][j])
            out[f"{dst}.conv1.weight"] = full[f"{src}.conv1.weight"].index_select(0, f).index_select(1, g[g_in])
            _bn(full, f"{src}.bn1", f"{dst}.bn1", f, out)
            out[f"{dst}.conv2.weight"] = full[f"{src}.conv2.weight"].index_select(0, g[g_out]).index_select(1, f)
            _bn(full, f"{src}.bn2", f"{dst}.bn2", g[g_out], out)
            if blk.downsample is not None:
                conv, norm = _downsample_parts(blk.downsample)
                # names in the pruned model may differ (a forced shortcut is named 0/1)
                dconv = conv if f"{dst}.downsample.{conv}.weight" in target else "0"
                dnorm = norm if f"{dst}.downsample.{norm}.weight" in target else "1"
                w = full[f"{src}.downsample.{conv}.weight"]
                out[f"{dst}.downsample.{dconv}.weight"] = w.index_select(0, g[g_out]).index_select(1, g[g_in])
                _bn(full, f"{src}.downsample.{norm}", f"{dst}.downsample.{dnorm}", g[g_out], out)
            prev = g_out
    if classes is not None:
        group_head(full, "fc", classes, g[prev], out)
    unknown = set(target) - set(out)
    if unknown:
        raise UnsupportedModelError(f"pruned ResNet has tensors the pruner does not fill: {sorted(unknown)}")
    return out


def prune_resnet(model: nn.Module, recipe: dict[str, Any], plan: ResNetPrunePlan,
                 classes: list[int] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the physically smaller ResNet the plan describes, with the full model's surviving weights.

    Args:
        model: the trained full timm ResNet (BasicBlocks).
        recipe: its timm recipe.
        plan: which units survive (``plan_resnet_pruning`` or ``full_plan``).
        classes: the group's classes: ``len(classes) + 1`` logits (the group's classes in this
            order, then "another group's class"); ``None`` = no classifier (pooled features).
    Returns:
        (pruned model on CPU in eval mode, its recipe).
    """
    _check_resnet(model)
    n_out = 0 if classes is None else len(classes) + 1
    new_recipe = pruned_resnet_recipe(recipe, model, plan, n_out)
    small = build_pruned_resnet(**new_recipe["kwargs"])
    state = _pruned_state(model, plan, classes, small.state_dict())
    small.load_state_dict(state, strict=True)
    return small.eval(), new_recipe
