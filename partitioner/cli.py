"""``edgesplit partition`` and ``edgesplit inspect``: store a model as blocks, show its table.

``edgesplit partition MODEL --classwise N`` builds a class-wise package instead (see
``partitioner.classwise``); that needs labelled data, and the only dataset shipped is
scikit-learn's digits, so the model is trained on digits (``build_digits_package``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from .blocks import decompose
from .builders import timm_recipe
from .errors import UnsupportedModelError, UsageError
from .layerwise import cut, even_splits, model_input_shape, partition
from .manifest import ModelManifest
from .store import MODEL_NAME, BlockStore, read_manifest
from .weights import create_timm_model, load_weights, pretrained_record, timm_data_config


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
            raise UsageError(f"--kwarg takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_splits(text: str) -> list[int]:
    """``"4,8"`` -> ``[4, 8]``, in the order given (``check_splits`` says whether they make stages).

    Every item must be a number: an empty one (``4,,8``, ``,``, ``""``) is a typo, and dropping it
    would store fewer stages than the user asked for.
    """
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or "" in items:
        raise UsageError(f"--split {text!r} has an empty item; it takes block indices like 4,8 (omit --split for "
                         "one stage)")
    try:
        return [int(s) for s in items]
    except ValueError:
        raise UsageError(f"--split takes block indices like 4,8; got {text!r}") from None


def check_splits(splits: list[int], n_blocks: int, model: str) -> None:
    """Refuse split points that do not cut ``n_blocks`` blocks into non-empty stages in order.

    Raises:
        UsageError: a point outside 1..n_blocks-1, or points not strictly increasing.
    """
    given = ",".join(map(str, splits))
    out = [s for s in splits if not 1 <= s <= n_blocks - 1]
    if out:
        valid = f"1..{n_blocks - 1}" if n_blocks > 1 else "none (one block cannot be cut)"
        raise UsageError(f"--split {given}: {out} out of range; {model} has {n_blocks} blocks, so split points "
                         f"lie in {valid}")
    if any(b <= a for a, b in zip(splits, splits[1:])):
        raise UsageError(f"--split {given}: split points must be strictly increasing (every stage gets at least "
                         f"one block), each in 1..{n_blocks - 1}")


def check_stages(stages: int, n_blocks: int, model: str) -> None:
    """Refuse a stage count the model's blocks cannot fill (each stage needs at least one block)."""
    if not 1 <= stages <= n_blocks:
        raise UsageError(f"--stages {stages}: {model} has {n_blocks} blocks, so 1..{n_blocks} stages")


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
            lines.append(f"{'':>3}  -- cut: stage {stage - 1} -> {stage}, "
                         f"{human_bytes(prev.act_bytes)}/sample (fp32) --")
        ms = f"{b.forward_ms:.2f}" if b.forward_ms is not None else "-"
        lines.append(f"{i:>3}  {b.name:<12} {b.n_params:>10,} {human_bytes(b.size_bytes):>10} "
                     f"{str(b.out_shape):<16} {human_bytes(b.act_bytes):>11} {ms:>8}")
    total_ms = sum(b.forward_ms or 0.0 for b in manifest.blocks)
    lines.append("-" * len(head))
    lines.append(f"{'':>3}  {'total':<12} {sum(b.n_params for b in manifest.blocks):>10,} "
                 f"{human_bytes(manifest.size_bytes):>10} {'':<16} {'':>11} {total_ms:>8.2f}")
    return "\n".join(lines)


def add_partition_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm model name, e.g. vit_tiny_patch16_224, resnet50")
    p.add_argument("--store", required=True, help="block store directory (created if missing)")
    p.add_argument("--name", default=None, help="name of the model in the store (default: the timm name)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--split", default=None,
                       help="block indices where a new stage starts, strictly increasing, each in 1..blocks-1, "
                            "e.g. 4,8 gives 3 stages")
    group.add_argument("--stages", type=int, default=None,
                       help="cut into this many stages of equal block count instead (1..blocks)")
    p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="timm create_model keyword, repeatable: --kwarg num_classes=10 --kwarg img_size=32")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="load timm's pretrained weights from the Hugging Face hub (needs the network, or the "
                              "weights in the local hub cache). Without --pretrained or --weights the weights are "
                              "random and the outputs meaningless")
    weights.add_argument("--weights", default=None, metavar="FILE",
                         help="load weights from FILE: a safetensors state_dict, or a PyTorch/timm checkpoint "
                              "(.pth/.pt/.bin/.pth.tar; read weights-only, never unpickled; a 'state_dict_ema', "
                              "'model_ema', 'state_dict' or 'model' wrapper is unwrapped). Names and shapes must match")
    p.add_argument("--no-profile", action="store_true", help="skip timing each block's forward on this machine")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar on stderr (it is off anyway when stderr is not a terminal)")
    p.add_argument("--classwise", type=int, default=None, metavar="N",
                   help=f"build a class-wise package of N (1..{DIGITS_CLASSES}) per-class-group sub-models plus a "
                        "fusion MLP instead of layer-wise blocks. Class-wise pruning needs labelled data: the model "
                        "is built for and trained on scikit-learn digits (the only dataset shipped; 8x8 upsampled to "
                        "32x32, 1 channel, 10 classes; in_chans/num_classes/img_size are set for it) for --epochs "
                        "epochs, unless --weights gives digits-trained weights. Stores <name>.g0..g<N-1>, the "
                        "fusion <name> and the full model <name>.full, and prints a table per sub-model")
    p.add_argument("--epochs", type=int, default=5, help="with --classwise: training epochs on digits (default 5)")


RANDOM_WEIGHTS_NOTICE = "random weights (no --pretrained/--weights): outputs are meaningless"


def run_partition(args: argparse.Namespace) -> int:
    """``edgesplit partition``: check every argument against the model, then store it (nothing is written on error)."""
    if getattr(args, "classwise", None) is not None:
        return run_partition_classwise(args)
    kwargs = parse_kwargs(args.kwarg)
    name = args.name or args.model
    if not MODEL_NAME.fullmatch(name):
        raise UsageError(f"--name {name!r}: a model name is letters, digits and . _ + - (at most 128), "
                         "starting with a letter or digit")
    splits = parse_splits(args.split) if args.split is not None else []
    model = create_timm_model(args.model, kwargs, pretrained=args.pretrained)
    if args.weights:
        weights = load_weights(model, args.weights, args.model)
    else:
        weights = pretrained_record(model) if args.pretrained else {"source": "random"}
    try:
        n_blocks = len(decompose(model))
    except UnsupportedModelError as e:
        raise UsageError(str(e)) from None
    if args.stages is not None:  # 0 is a mistake, not "absent"
        check_stages(args.stages, n_blocks, args.model)
        splits = even_splits(n_blocks, args.stages)
    check_splits(splits, n_blocks, args.model)
    shape = model_input_shape(model)
    data_config = timm_data_config(model, shape)
    extra = {"weights": weights, **({"data_config": data_config} if data_config else {}),
             **({"splits": splits} if splits else {})}
    # checked: from here on the store is written
    if weights["source"] == "random":
        print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr, flush=True)
    store = BlockStore(args.store)
    with _progress(n_blocks, "storing and timing blocks" if not args.no_profile else "storing blocks",
                   args.quiet) as bar:
        manifest = partition(model, name, timm_recipe(args.model, **kwargs), store, input_shape=shape,
                             profile=not args.no_profile, extra=extra, progress=lambda block: bar.update(1))
    print(format_table(manifest, splits))
    print(f"\nstored {manifest.n_blocks} blocks and manifest {manifest.name!r} in {store.root} "
          f"(store now {human_bytes(store.size_bytes())}); weights: {weights['source']}")
    return 0


def _progress(total: int, desc: str, quiet: bool) -> Any:
    """A tqdm bar on stderr, off when asked or when stderr is not a terminal (logs, pipes, tests)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr, disable=quiet or not sys.stderr.isatty())


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="path to a manifest (<store>/models/NAME.json), or a model name with --store")
    p.add_argument("--store", default=None, help="block store directory, when MANIFEST is a model name")
    p.add_argument("--verify", action="store_true", help="also re-hash every block file of the model")


def run_inspect(args: argparse.Namespace) -> int:
    """``edgesplit inspect``: a stored model's table and which of its blocks the store holds; creates nothing."""
    from pathlib import Path

    path = Path(args.manifest)
    store: BlockStore | None
    if path.is_file():
        manifest = read_manifest(path)
        try:
            store = BlockStore(args.store or path.parent.parent, create=False)
        except UsageError:
            if args.store:
                raise
            store = None  # a manifest outside any store: its table only
    elif args.store:
        store = BlockStore(args.store, create=False)
        manifest = store.manifest(args.manifest)
    else:
        raise UsageError(f"{args.manifest} is not a file; give a manifest path or a model name with --store")
    print(format_table(manifest, manifest.extra.get("splits")))
    weights = manifest.extra.get("weights", {}).get("source", "unrecorded")
    print(f"\nweights: {weights}" + (" (outputs are meaningless)" if weights == "random" else ""))
    if store is None:
        print(f"{path} is not inside a block store; pass --store DIR to check its blocks")
        return 0
    missing = store.missing(manifest)
    print(f"blocks in store {store.root}: {manifest.n_blocks - len(missing)}/{manifest.n_blocks}")
    if args.verify:
        for b in manifest.blocks:
            if b.id not in missing:
                store.verify(b.id)
        print("all present blocks verified")
    return 1 if missing else 0


# --- class-wise packages on digits --------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2  # fixed stratified split, random_state 0
DIGITS_CLASSES = 10  # sklearn digits: 0..9, so a class-wise package has 1..10 groups


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
    out: dict[str, Any] = {"in_chans": 1, "num_classes": DIGITS_CLASSES}
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
        weights: weights file (safetensors or a weights-only PyTorch checkpoint) of a digits-trained model;
            skips training.
        config: a ``ClasswiseConfig`` overriding the epoch-derived one.
    Returns:
        The package and its held-out accuracies.
    """
    import timm
    import torch

    from . import classwise as cw

    if not timm.is_model(model):
        raise UsageError(f"timm has no model {model!r}; try vit_tiny_patch16_224 or resnet18")
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    check_groups_count(n_groups)  # before minutes of training, not after
    kw = digits_kwargs(model, kwargs)
    x_tr, y_tr, x_te, y_te = digits_split()
    torch.manual_seed(seed)
    full = timm.create_model(model, pretrained=False, **kw)
    recipe = timm_recipe(model, **kw)
    if weights:
        load_weights(full, weights, model)
    else:
        cw.train_classifier(full, lambda g: (x_tr, y_tr), cw.TrainConfig(epochs=epochs, seed=seed))
    full.eval()
    partition(full, f"{name}.full", recipe, store, input_shape=list(x_tr.shape[1:]), profile=False)
    cfg = config or cw.ClasswiseConfig(retrain=cw.TrainConfig(epochs=max(1, epochs // 2), seed=seed),
                                       fusion=cw.TrainConfig(epochs=4 * epochs, lr=3e-3, weight_decay=1e-2,
                                                             label_smoothing=0.0, seed=seed))
    pkg = cw.split_classwise(full, recipe, name, store, x_tr, y_tr, n_groups=n_groups, n_classes=DIGITS_CLASSES,
                             config=cfg)
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


def check_groups_count(n_groups: int) -> None:
    """Refuse a group count digits cannot fill: every group needs at least one of its 10 classes."""
    if not 1 <= n_groups <= DIGITS_CLASSES:
        raise UsageError(f"--classwise {n_groups}: digits has {DIGITS_CLASSES} classes, so 1..{DIGITS_CLASSES} "
                         "class groups (one sub-model each)")


def check_classwise_model(model: Any, arch: str) -> None:
    """Refuse a model class-wise pruning cannot rebuild, before training it (the pruner would refuse it after)."""
    from .classwise import _family
    from .prune_resnet import _check_resnet
    from .prune_vit import _check_vit

    try:
        (_check_vit if _family(model) == "vit" else _check_resnet)(model)
    except UnsupportedModelError as e:
        raise UsageError(f"--classwise cannot split {arch}: {e}") from None


def run_partition_classwise(args: argparse.Namespace) -> int:
    """``edgesplit partition MODEL --classwise N``: train on digits, split class-wise, print the table."""
    if args.split is not None or args.stages is not None:
        raise UsageError("--classwise builds sub-models, not layer-wise stages; drop --split/--stages "
                         "(each sub-model is deployed whole)")
    if args.pretrained:
        raise UsageError("--classwise trains on digits (1 channel, 10 classes); --pretrained ImageNet weights do "
                         "not fit it: pass --weights FILE of a digits-trained model, or neither")
    kwargs = parse_kwargs(args.kwarg)
    name = args.name or args.model
    if not MODEL_NAME.fullmatch(name):
        raise UsageError(f"--name {name!r}: a model name is letters, digits and . _ + - (at most 128)")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    check_groups_count(args.classwise)
    # a wrong name, --kwarg, model family or weights file: refused before the store is created or training starts
    probe = create_timm_model(args.model, digits_kwargs(args.model, kwargs))
    check_classwise_model(probe, args.model)
    if args.weights:
        load_weights(probe, args.weights, args.model)
    del probe
    store = BlockStore(args.store)
    print(f"class-wise needs labelled data: training {args.model} on scikit-learn digits "
          + ("(weights from " + args.weights + ")" if args.weights else f"for {args.epochs} epochs")
          + f", then {args.classwise} class groups ...", flush=True)
    built = build_digits_package(args.model, name, store, args.classwise, epochs=args.epochs,
                                 kwargs=kwargs, weights=args.weights)
    print(format_classwise_table(built, store))
    print(f"\nheld-out digits accuracy: full model {built.full_accuracy:.1%}, class-wise package "
          f"{built.package_accuracy:.1%}")
    print(f"stored package {name!r} ({len(built.package.descriptor.submodels)} sub-models + fusion) and "
          f"{built.full_name!r} in {store.root} (store now {human_bytes(store.size_bytes())})")
    return 0
