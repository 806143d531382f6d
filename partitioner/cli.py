"""``edgesplit partition`` and ``edgesplit inspect``: store a model as blocks, show its table.

``edgesplit partition MODEL --classwise N`` builds a class-wise package instead (see
``partitioner.classwise``); that needs labelled data, and the only dataset shipped is
scikit-learn's digits, so the model is trained on digits (``build_digits_package``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
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
    p.add_argument("--classwise", type=int, default=0, metavar="N",
                   help="build a class-wise package of N per-class-group sub-models plus a fusion MLP instead of "
                        "layer-wise blocks. Class-wise pruning needs labelled data: the model is built for and "
                        "trained on scikit-learn digits (the only dataset shipped; 8x8 upsampled to 32x32, 1 "
                        "channel, 10 classes; in_chans/num_classes/img_size are set for it) for --epochs epochs, "
                        "unless --weights gives digits-trained weights. Stores <name>.g0..g<N-1>, the fusion "
                        "<name> and the full model <name>.full, and prints a table per sub-model")
    p.add_argument("--epochs", type=int, default=5, help="with --classwise: training epochs on digits (default 5)")


def run_partition(args: argparse.Namespace) -> int:
    import timm
    from safetensors.torch import load_file

    if getattr(args, "classwise", 0):
        return run_partition_classwise(args)
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
                store.verify(b.id)
        print("all present blocks verified")
    return 1 if missing else 0


# --- class-wise packages on digits --------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2  # fixed stratified split, random_state 0


def digits_split(size_px: int = 32) -> tuple[Any, Any, Any, Any]:
    """scikit-learn digits as (x_train, y_train, x_test, y_test); x in [-1, 1], (B, 1, size_px, size_px).

    The split is fixed (stratified, 20 % held out, random_state 0) so accuracy figures compare.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(size_px, size_px), mode="bilinear", align_corners=False) * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    i_tr, i_te = train_test_split(list(range(len(y))), test_size=DIGITS_TEST_FRACTION, random_state=0,
                                  stratify=d.target)
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


def digits_kwargs(model: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm keywords that make ``model`` take digits: 1 channel, 10 classes, 32 px (ViT); user keys win."""
    out: dict[str, Any] = {"in_chans": 1, "num_classes": 10}
    if model.startswith(("vit", "deit")):
        out["img_size"] = 32
    return {**out, **(kwargs or {})}


@dataclass
class DigitsPackage:
    """A class-wise package trained on digits, with what a report needs."""

    package: Any  # classwise.ClasswisePackage
    full_name: str  # the full model's manifest (``<name>.full``)
    full_params: int
    full_accuracy: float  # held-out digits
    package_accuracy: float  # held-out digits, one-process package
    x_test: Any
    y_test: Any


def build_digits_package(model: str, name: str, store: BlockStore, n_groups: int, epochs: int = 5,
                         seed: int = 0, kwargs: dict[str, Any] | None = None, weights: str | None = None,
                         config: Any = None) -> DigitsPackage:
    """Train ``model`` on digits (or load ``weights``), store it as ``<name>.full`` and split it class-wise.

    Args:
        model: timm model name (a ViT or a BasicBlock ResNet).
        name: package name in ``store``.
        store: destination block store.
        n_groups: N class groups (= sub-models).
        epochs: full-model training epochs; sub-model retraining gets half, the fusion 4x (it is cheap).
        seed: seeds the weights and every training run.
        kwargs: extra timm keywords (``digits_kwargs`` adds the digits ones).
        weights: safetensors state_dict of a digits-trained model; skips training.
        config: a ``ClasswiseConfig`` overriding the epoch-derived one.
    Returns:
        The package and its held-out accuracies.
    """
    import timm
    import torch
    from safetensors.torch import load_file

    from . import classwise as cw

    if not timm.is_model(model):
        raise EdgesplitError(f"timm has no model {model!r}; try vit_tiny_patch16_224 or resnet18")
    if epochs < 1:
        raise EdgesplitError(f"--epochs must be at least 1, got {epochs}")
    kw = digits_kwargs(model, kwargs)
    x_tr, y_tr, x_te, y_te = digits_split()
    torch.manual_seed(seed)
    full = timm.create_model(model, pretrained=False, **kw)
    recipe = timm_recipe(model, **kw)
    if weights:
        full.load_state_dict(load_file(weights))
    else:
        cw.train_classifier(full, lambda g: (x_tr, y_tr), cw.TrainConfig(epochs=epochs, seed=seed))
    full.eval()
    partition(full, f"{name}.full", recipe, store, input_shape=list(x_tr.shape[1:]), profile=False)
    cfg = config or cw.ClasswiseConfig(retrain=cw.TrainConfig(epochs=max(1, epochs // 2), seed=seed),
                                       fusion=cw.TrainConfig(epochs=4 * epochs, lr=3e-3, weight_decay=1e-2,
                                                             label_smoothing=0.0, seed=seed))
    pkg = cw.split_classwise(full, recipe, name, store, x_tr, y_tr, n_groups=n_groups, n_classes=10, config=cfg)
    full_acc = float((cw.predict(full, x_te).argmax(1) == y_te).float().mean())
    pkg_acc = float((cw.classwise_predict(store, name, x_te).argmax(1) == y_te).float().mean())
    return DigitsPackage(pkg, f"{name}.full", sum(p.numel() for p in full.parameters()), full_acc, pkg_acc,
                         x_te, y_te)


def format_classwise_table(built: DigitsPackage, store: BlockStore) -> str:
    """One row per sub-model and the fusion: classes, params, bytes, reduction vs the full model."""
    d = built.package.descriptor
    full = store.manifest(built.full_name)
    head = f"{'name':<26} {'classes':<16} {'params':>10} {'bytes':>10} {'x smaller':>9}"
    lines = [head, "-" * len(head)]
    rows = [(n, ",".join(map(str, g))) for n, g in zip(d.submodels, d.groups)] + [(d.fusion, "fusion")]
    for n, classes in rows:
        m = store.manifest(n)
        params = sum(b.n_params for b in m.blocks)
        lines.append(f"{n:<26} {classes:<16} {params:>10,} {human_bytes(m.size_bytes):>10} "
                     f"{full.size_bytes / m.size_bytes:>9.1f}")
    lines.append("-" * len(head))
    lines.append(f"{built.full_name:<26} {'all':<16} {built.full_params:>10,} {human_bytes(full.size_bytes):>10} "
                 f"{1.0:>9.1f}")
    return "\n".join(lines)


def run_partition_classwise(args: argparse.Namespace) -> int:
    """``edgesplit partition MODEL --classwise N``: train on digits, split class-wise, print the table."""
    if args.split or args.stages:
        raise EdgesplitError("--classwise builds sub-models, not layer-wise stages; drop --split/--stages "
                             "(each sub-model is deployed whole)")
    store = BlockStore(args.store)
    name = args.name or args.model
    print(f"class-wise needs labelled data: training {args.model} on scikit-learn digits "
          + ("(weights from " + args.weights + ")" if args.weights else f"for {args.epochs} epochs")
          + f", then {args.classwise} class groups ...", flush=True)
    built = build_digits_package(args.model, name, store, args.classwise, epochs=args.epochs,
                                 kwargs=parse_kwargs(args.kwarg), weights=args.weights)
    print(format_classwise_table(built, store))
    print(f"\nheld-out digits accuracy: full model {built.full_accuracy:.1%}, class-wise package "
          f"{built.package_accuracy:.1%}")
    print(f"stored package {name!r} ({len(built.package.descriptor.submodels)} sub-models + fusion) and "
          f"{built.full_name!r} in {store.root} (store now {human_bytes(store.size_bytes())})")
    return 0
