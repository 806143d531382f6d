"""``edgesplit partition`` and ``edgesplit inspect``: store a model as blocks, show its table."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .builders import timm_recipe
from .errors import EdgesplitError
from .layerwise import cut, even_splits, partition
from .manifest import ModelManifest
from .store import BlockStore


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_kwargs(items: list[str]) -> dict[str, Any]:
    """``["img_size=32", "depth=6"]`` -> ``{"img_size": 32, "depth": 6}`` (values read as JSON, else str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise EdgesplitError(f"--kwarg takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_splits(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EdgesplitError(f"--split takes block indices like 4,8; got {text!r}") from None


def format_table(manifest: ModelManifest, splits: list[int] | None = None) -> str:
    """One row per block; a rule marks each split point, with the bytes that cross it."""
    starts = {s.start for s in cut(manifest.name, manifest.n_blocks, splits or [])} - {0}
    head = f"{'#':>3}  {'block':<12} {'params':>10} {'bytes':>10} {'output shape':<16} {'act/sample':>11} {'fwd ms':>8}"
    lines = [f"model {manifest.name}  input {manifest.input_shape}  recipe {json.dumps(manifest.recipe)}", head,
             "-" * len(head)]
    stage = 0
    for i, b in enumerate(manifest.blocks):
        if i in starts:
            stage += 1
            prev = manifest.blocks[i - 1]
            lines.append(f"{'':>3}  -- cut: stage {stage - 1} -> {stage}, {human_bytes(prev.act_bytes)}/sample (fp32) --")
        ms = f"{b.forward_ms:.2f}" if b.forward_ms is not None else "-"
        lines.append(f"{i:>3}  {b.name:<12} {b.n_params:>10,} {human_bytes(b.size_bytes):>10} "
                     f"{str(b.out_shape):<16} {human_bytes(b.act_bytes):>11} {ms:>8}")
    total_ms = sum(b.forward_ms or 0.0 for b in manifest.blocks)
    lines.append("-" * len(head))
    lines.append(f"{'':>3}  {'total':<12} {sum(b.n_params for b in manifest.blocks):>10,} "
                 f"{human_bytes(manifest.size_bytes):>10} {'':<16} {'':>11} {total_ms:>8.2f}")
    return "\n".join(lines)


def add_partition_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm model name, e.g. vit_tiny_patch16_224, resnet50 (random weights: no model hub)")
    p.add_argument("--store", required=True, help="block store directory (created if missing)")
    p.add_argument("--name", default=None, help="name of the model in the store (default: the timm name)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--split", default="", help="block indices where a new stage starts, e.g. 4,8 gives 3 stages")
    group.add_argument("--stages", type=int, default=0, help="cut into this many stages of equal block count instead")
    p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="timm create_model keyword, repeatable: --kwarg num_classes=10 --kwarg img_size=32")
    p.add_argument("--weights", default=None, help="safetensors file of the model's state_dict to load (default: random init)")
    p.add_argument("--no-profile", action="store_true", help="skip timing each block's forward on this machine")


def run_partition(args: argparse.Namespace) -> int:
    import timm
    from safetensors.torch import load_file

    kwargs = parse_kwargs(args.kwarg)
    if not timm.is_model(args.model):
        raise EdgesplitError(f"timm has no model {args.model!r}; try `python -c \"import timm; print(timm.list_models('vit*'))\"`")
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    if args.weights:
        model.load_state_dict(load_file(args.weights))
    store = BlockStore(args.store)
    manifest = partition(model, args.name or args.model, timm_recipe(args.model, **kwargs), store,
                         profile=not args.no_profile)
    splits = parse_splits(args.split) if args.split else even_splits(manifest.n_blocks, args.stages) if args.stages else []
    cut(manifest.name, manifest.n_blocks, splits)  # validate before printing
    if splits:
        store.put_manifest(ModelManifest(**{**manifest.__dict__, "extra": {**manifest.extra, "splits": splits}}))
    print(format_table(manifest, splits))
    print(f"\nstored {manifest.n_blocks} blocks and manifest {manifest.name!r} in {store.root} "
          f"(store now {human_bytes(store.size_bytes())})")
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="path to a manifest (<store>/models/NAME.json), or a model name with --store")
    p.add_argument("--store", default=None, help="block store directory, when MANIFEST is a model name")
    p.add_argument("--verify", action="store_true", help="also re-hash every block file of the model")


def run_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.manifest)
    if path.is_file():
        manifest = ModelManifest.from_json(path.read_text())
        store = BlockStore(args.store or path.parent.parent)
    elif args.store:
        store = BlockStore(args.store)
        manifest = store.manifest(args.manifest)
    else:
        raise EdgesplitError(f"{args.manifest} is not a file; give a manifest path or a model name with --store")
    print(format_table(manifest, manifest.extra.get("splits")))
    missing = store.missing(manifest)
    print(f"\nblocks in store {store.root}: {manifest.n_blocks - len(missing)}/{manifest.n_blocks}")
    if args.verify:
        for b in manifest.blocks:
            if b.id not in missing:
                store.get(b.id)
        print("all present blocks verified")
    return 1 if missing else 0
