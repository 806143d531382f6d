"""Layer-wise split: partition a model into stored blocks, cut it into spans, rebuild stages.

A stage is rebuilt from the block store alone: the skeleton comes from the manifest's
recipe on the ``meta`` device (no memory, no init), and only the stage's blocks are
materialised and filled with their stored, hash-verified tensors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .blocks import NamedBlock, decompose
from .builders import build_skeleton
from .errors import ManifestError, MissingBlocksError, UsageError
from .manifest import BlockEntry, ModelManifest
from .store import BlockStore


@dataclass(frozen=True)
class BlockSpan:
    """Blocks ``[start, end)`` of a model: what one stage (one worker) runs."""

    model: str
    start: int
    end: int
    n_blocks: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.n_blocks:
            raise ValueError(f"bad span [{self.start}, {self.end}) of a {self.n_blocks}-block model")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_blocks

    def overlaps(self, other: "BlockSpan") -> bool:
        return self.model == other.model and self.start < other.end and other.start < self.end

    def to_msg(self) -> list[Any]:
        return [self.model, self.start, self.end, self.n_blocks]

    @classmethod
    def from_msg(cls, msg: Any) -> "BlockSpan":
        if not (isinstance(msg, (list, tuple)) and len(msg) == 4 and isinstance(msg[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in msg[1:])):
            raise ValueError(f"a span is [model, start, end, n_blocks], got {msg!r}")
        return cls(msg[0], msg[1], msg[2], msg[3])


def cut(model: str, n_blocks: int, splits: Iterable[int]) -> list[BlockSpan]:
    """Cut ``n_blocks`` blocks at the given split points into contiguous spans.

    Args:
        model: model name the spans belong to.
        n_blocks: number of blocks in the model.
        splits: block indices where a new stage starts, e.g. ``[4, 8]`` -> 3 stages.
    Returns:
        One span per stage covering every block exactly once.
    """
    points = sorted(set(int(s) for s in splits))
    if any(not 0 < s < n_blocks for s in points):
        raise ValueError(f"split points must lie in 1..{n_blocks - 1} for a {n_blocks}-block model, got {points}")
    bounds = [0, *points, n_blocks]
    return [BlockSpan(model, a, b, n_blocks) for a, b in zip(bounds, bounds[1:])]


def even_splits(n_blocks: int, n_stages: int) -> list[int]:
    """Split points giving ``n_stages`` stages of (nearly) equal block counts."""
    if not 1 <= n_stages <= n_blocks:
        raise ValueError(f"cannot make {n_stages} stages from {n_blocks} blocks")
    return [round(i * n_blocks / n_stages) for i in range(1, n_stages)]


def model_input_shape(model: nn.Module) -> list[int]:
    """Per-sample input shape from the model itself (image size of a ViT, channels of the first conv)."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    img = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg.get("input_size", [3, 224, 224])[1:]
    if first_conv is None or img is None:
        raise ManifestError(f"cannot tell the input shape of {type(model).__name__}; pass input_shape=[C, H, W]")
    return [int(first_conv.in_channels), int(img[0]), int(img[1])]


@torch.no_grad()
def _time_ms(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    module(x)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


@torch.no_grad()
def partition(model: nn.Module, name: str, recipe: dict[str, Any], store: BlockStore,
              input_shape: list[int] | None = None, profile: bool = True, reps: int = 3,
              extra: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None) -> ModelManifest:
    """Store ``model`` as blocks plus a manifest; return the manifest.

    Args:
        model: the trained model (any device; moved to CPU copies for storage).
        name: the model's name in the store.
        recipe: how to rebuild its skeleton (see ``builders.build_skeleton``).
        store: destination block store.
        input_shape: per-sample input shape; read from timm's config when omitted.
        profile: time each block's forward at batch 1 on this machine.
        reps: timed repetitions per block (median is kept).
        extra: free-form JSON-safe data kept in the manifest (codecs, class-wise layout).
        progress: called with each block's name once it is stored (and timed): a progress bar's hook.
    """
    model = model.eval()
    check_recipe(model, recipe)
    shape = list(input_shape) if input_shape is not None else model_input_shape(model)
    x = torch.randn(1, *shape, device=next(model.parameters()).device)
    entries = []
    for blk in decompose(model):
        tensors = blk.module.state_dict()
        bid = store.put(tensors)
        ms = _time_ms(blk.module, x, reps) if profile else None
        y = blk.module(x)
        entries.append(BlockEntry(
            name=blk.name, id=bid,
            n_params=sum(p.numel() for p in blk.module.parameters()),
            size_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
            out_shape=list(y.shape[1:]), act_bytes=y[0].numel() * 4, forward_ms=ms,
        ))
        x = y
        if progress is not None:
            progress(blk.name)
    manifest = ModelManifest(name=name, recipe=recipe, input_shape=shape, blocks=entries, extra=dict(extra or {}))
    store.put_manifest(manifest)
    return manifest


def check_recipe(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Refuse a recipe that rebuilds another model than ``model`` (before anything is stored).

    Workers rebuild every stage from the recipe, so a recipe missing a keyword the model was
    made with (``num_classes=100``) would store blocks no worker can load.

    Raises:
        UsageError: tensors whose names or shapes differ, a few of them named.
    """
    try:
        want = {k: tuple(v.shape) for k, v in build_skeleton(recipe, device="meta").state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"the recipe {recipe} does not build a model: {e}") from None
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if diff:
        shown = "; ".join(f"{k}: model {have.get(k, 'absent')}, recipe {want.get(k, 'absent')}" for k in diff[:3])
        raise UsageError(f"the recipe {recipe} builds another model than the one given ({len(diff)} tensors differ: "
                         f"{shown}); give the recipe the keywords the model was made with, e.g. "
                         f"timm_recipe(arch, num_classes=...)")


def _materialise(skeleton_blocks: list[NamedBlock], recipe: dict[str, Any], start: int, end: int,
                 device: str | torch.device) -> list[NamedBlock]:
    """Give blocks real storage; rebuild on CPU when a block has state its tensors do not cover."""
    out = []
    for blk in skeleton_blocks[start:end]:
        persistent = set(blk.module.state_dict())
        hidden = [n for n, _ in blk.module.named_buffers() if n not in persistent]
        if hidden:  # non-persistent buffers (e.g. position indices) are computed at init: rebuild for real
            real = decompose(build_skeleton(recipe, device="cpu"))
            return [NamedBlock(b.name, b.module.to(device)) for b in real[start:end]]
        out.append(NamedBlock(blk.name, blk.module.to_empty(device=device)))
    return out


def build_blocks(store: BlockStore, manifest: ModelManifest, start: int = 0, end: int | None = None,
                 device: str | torch.device = "cpu",
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> nn.Sequential:
    """Rebuild blocks ``[start, end)`` of a stored model, from the store alone.

    Args:
        store: the block store holding the model's blocks.
        manifest: the model's manifest.
        start, end: the block span (``end`` defaults to the last block).
        device: where the stage runs.
        tensors: already loaded tensors by block id (e.g. from a worker's block cache);
            blocks not in it are read from ``store``.
    Returns:
        An ``nn.Sequential`` (eval mode) whose children are named like the original blocks.
    """
    end = manifest.n_blocks if end is None else end
    span = BlockSpan(manifest.name, start, end, manifest.n_blocks)
    needed = manifest.blocks[span.start:span.end]
    have = tensors or {}
    missing = [b.id for b in needed if b.id not in have and not store.has(b.id)]
    if missing:
        raise MissingBlocksError(f"model {manifest.name} blocks {[b.name for b in needed if b.id in missing]} "
                                 f"are not in store {store.root}; fetch them or partition the model again", missing)
    skeleton = decompose(build_skeleton(manifest.recipe, device="meta"))
    if len(skeleton) != manifest.n_blocks:
        raise ManifestError(f"recipe of {manifest.name} builds {len(skeleton)} blocks, manifest lists "
                            f"{manifest.n_blocks}; the manifest does not match its recipe")
    stage = nn.Sequential()
    for entry, blk in zip(needed, _materialise(skeleton, manifest.recipe, span.start, span.end, device)):
        if entry.name != blk.name:
            raise ManifestError(f"block {entry.name!r} of {manifest.name} rebuilds as {blk.name!r}")
        state = have[entry.id] if entry.id in have else store.get(entry.id)
        blk.module.load_state_dict(state, strict=True)
        stage.add_module(entry.name.replace(".", "_"), blk.module)
    return stage.eval()


def load_model(store: BlockStore, manifest: ModelManifest, device: str | torch.device = "cpu") -> nn.Sequential:
    """The whole stored model as one ``nn.Sequential`` of its blocks."""
    return build_blocks(store, manifest, 0, manifest.n_blocks, device)
