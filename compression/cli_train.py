"""``edgesplit train-codec``: train a compression codec for the link at a cut.

Two modes:

- **Your model** (``MODEL`` given): a model partitioned into ``--store`` (``edgesplit partition``)
  gets a codec for the link at block ``--cut K`` (blocks [0, K) send, [K, n) receive), trained
  without labels: the model is rebuilt from its blocks and frozen, and the codec learns to make
  the model's output with it match the output without it (distillation, ``compression.distill``),
  one codec for every budget. Inputs are a folder of images (``--images DIR``, preprocessed with
  the manifest's timm data config when it has one) or scikit-learn's digits (``--images digits``).
  The codec is stored as a block and named in the model's manifest (``--name``, default ``cutK``).
- **Built-in split models** (``--model vgg11|vit``): a small model and its codec trained together
  on digits with the deprune/prune schedules of Mudvari et al.

Examples::

    # your model: a codec at block 6 of a partitioned ViT, trained on a folder of unlabelled images
    edgesplit train-codec vit --store ./store --cut 6 --images ./photos --epochs 4
    # ... or on digits (prints accuracy against labels too), only some budgets, a chosen name
    edgesplit train-codec vit --store ./store --cut 6 --images digits --budgets 8,16,32 --name mid
    # then attach it to a deployed link (stage cut 0) without restarting anything
    edgesplit link --coordinator tcp://127.0.0.1:5555 --model vit --cut 0 --codec mid --budget 16 --wire-dtype int8

    # built-in: deprune on the half-width VGG11 (b=4 for 15 epochs, reset, 7 uncompressed), codec into ./store
    edgesplit train-codec --model vgg11 --schedule deprune --epochs 22 --store ./store --out deprune.json
    # the uncompressed baseline, then prune from its weights (b=32 then b=4, 4 epochs each)
    edgesplit train-codec --model vgg11 --schedule none --epochs 22 --store ./store --out full.json
    edgesplit train-codec --model vgg11 --schedule prune --epochs 8 --init full.json --store ./store --out prune.json
    # any phase list, here the ViT with a final mix phase so that one module serves every budget
    edgesplit train-codec --model vit --phases full:20,b32:5,b4:5,mix:3 --optimizer adamw --lr 1e-3 \\
        --lr-schedule cosine --store ./store

Your-model mode prints a budget x wire dtype table (bytes per sample on the wire, ratio to fp32
at full width, top-1 agreement with the uncompressed model, accuracy on held-out digits) and
keeps it in the manifest as the planner's candidate points. In built-in mode the JSON written by
``--out`` holds the configuration, one record per evaluation point (accuracy, bytes sent; one per
epoch unless ``--evals-per-epoch`` or fractional phases add more), a budget x dtype table of the
final model, and the descriptions of the stored codec (``codec``) and split model (``model``; use
it with ``--init``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgesplit.partitioner.errors import EdgesplitError, UsageError

from .distill import DistillConfig
from .errors import CodecError
from .splitnets import list_splitnets
from .training import SCHEDULES, TrainConfig

DEFAULT_EPOCHS = 22  # built-in mode (the paper's Fig. 6)
_USER_ONLY = ("images", "kind", "budgets", "name", "temperature", "mse_weight", "split_seed")
_BUILTIN_ONLY = ("model", "width", "dim", "depth", "heads", "patch_px", "init", "schedule", "phases", "full_epochs",
                 "optimizer", "lr_schedule", "image_px")


def _epochs(text: str) -> float | int:
    """Epochs may be fractions; whole numbers stay ints (phase labels and JSON as before)."""
    v = float(text)
    return int(v) if v.is_integer() else v


def _budget_list(text: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are integers like 8,16,32, got {text!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"budgets are positive integers like 8,16,32, got {text!r}")
    return out


_MODEL_FLAGS = {  # CLI flag -> (split model it applies to, builder kwarg)
    "width": ("vgg11", "width"), "r": ("vgg11", "r"), "dim": ("vit", "dim"), "depth": ("vit", "depth"),
    "heads": ("vit", "heads"), "patch_px": ("vit", "patch_px"), "cut": ("vit", "cut"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train-codec`` options to ``parser``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    u = parser.add_argument_group("your model (MODEL given)")
    u.add_argument("user_model", nargs="?", metavar="MODEL",
                   help="a model partitioned into --store (`edgesplit partition`): train a codec for its cut --cut K "
                        "without labels, by distillation from the frozen model; omit it for --model vgg11|vit")
    u.add_argument("--images", metavar="DIR|digits",
                   help="training inputs: a folder of image files (any labels are ignored; 10%% held out to measure "
                        "agreement) or 'digits' (scikit-learn's, resized to the model's input, 25%% held out)")
    u.add_argument("--kind", choices=("tokens", "fmap"),
                   help="codec kind (default: from the activation's shape: (T, D) tokens, (C, H, W) fmap)")
    u.add_argument("--budgets", type=_budget_list, metavar="B,B,...",
                   help="budgets (channels kept) to train and tabulate, powers of two from the smallest "
                        "(default: all the codec offers, 4, 8, ... below the width)")
    u.add_argument("--name", help="name of the codec in the manifest's extra['codecs'], what a link spec's "
                                  "'codec' says (default: cutK)")
    u.add_argument("--temperature", type=float, default=None,
                   help=f"distillation temperature of the KL on logits (default: {DistillConfig.temperature})")
    u.add_argument("--mse-weight", type=float, default=None,
                   help=f"weight of the MSE on the decoded activation, per channel over its std "
                        f"(default: {DistillConfig.mse_weight})")
    u.add_argument("--split-seed", type=int, default=None,
                   help="which images are held out (digits: the stratified split's random_state; default: 0, "
                        "the project's fixed split)")

    m = parser.add_argument_group("built-in split model")
    m.add_argument("--model", choices=list_splitnets(), default=None,
                   help="split model: vgg11 = VGG11-style CNN cut after its 5th conv ('fmap' codec); "
                        "vit = small ViT cut in the middle ('tokens' codec) (default: vgg11)")
    m.add_argument("--width", type=int, help="vgg11: channels of the first conv; the cut has 8x this "
                                             "(default 32, i.e. half of VGG11)")
    m.add_argument("--r", type=int, choices=(1, 2, 3), help="vgg11 or an fmap codec: spatial reduction, conv "
                                                           "kernel 2+r stride r (default 1 = no spatial reduction)")
    m.add_argument("--dim", type=int, help="vit: embedding width D = the codec's channels (default 128)")
    m.add_argument("--depth", type=int, help="vit: transformer blocks (default 6)")
    m.add_argument("--heads", type=int, help="vit: attention heads (default 4)")
    m.add_argument("--patch-px", type=int, help="vit: patch side in pixels (default 4)")
    m.add_argument("--cut", type=int, help="MODEL: the block index K where the activation is cut (blocks [0, K) "
                                           "send; see `edgesplit inspect`); vit: blocks on the client side "
                                           "(default 3 = the middle of 6)")
    m.add_argument("--init", type=Path, help="start from the split model of an earlier run: the JSON that run "
                                             "wrote with --out (its 'model' entry; needs that run's --store)")

    s = parser.add_argument_group("schedule")
    s.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="deprune: b=BUDGET for SHARE of the epochs, reset the filter, then uncompressed; "
                        "prune: FULL_EPOCHS uncompressed, then b=MID_BUDGET and b=BUDGET for EPOCHS/2 each; "
                        "none: uncompressed only; fixed: b=BUDGET from the start (default: deprune)")
    s.add_argument("--epochs", type=_epochs, default=None,
                   help="epochs of the schedule; for prune, of its compressed part (default: 22, as the paper's "
                        f"Fig. 6); MODEL: passes over the training images (default: {DistillConfig.epochs:g})")
    s.add_argument("--budget", type=int, default=4, help="channels kept in the high-compression phase "
                                                         "(default: %(default)s)")
    s.add_argument("--mid-budget", type=int, default=32, help="prune: the intermediate budget (default: %(default)s)")
    s.add_argument("--share", type=float, default=0.68, help="deprune: share of epochs at --budget "
                                                             "(default: %(default)s = 15 of 22)")
    s.add_argument("--full-epochs", type=int, help="prune: uncompressed epochs before compressing (default: "
                                                   "--epochs, or 0 with --init)")
    s.add_argument("--phases", help="explicit phases instead of --schedule, e.g. 'b4:15,reset,full:7' or "
                                    "'full:30,b32:10,b4/int8:10,mix:3' (mix: a budget per batch, so one module "
                                    "serves every budget); epochs may be fractions, e.g. 'b4:11.5,reset,full:0.5'")
    s.add_argument("--wire-dtype", choices=("fp16", "int8", "fp32"), default=None,
                   help="dtype of activations in compressed phases; gradients go as fp16 unless this is fp32 "
                        "(default: fp16, as the reference); MODEL: the dtype simulated on the link while training "
                        "(default: int8, which also serves fp16)")

    t = parser.add_argument_group("optimisation")
    d = TrainConfig()
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help=f"sgd as the reference, adamw for ViTs from scratch (default: {d.optimizer})")
    t.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: {d.lr}; MODEL: AdamW at {DistillConfig.lr}, cosine)")
    t.add_argument("--momentum", type=float, default=d.momentum,
                   help="SGD momentum: 0 in the reference's deprune runs, 0.9 in its prune runs (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay (default: %(default)s)")
    t.add_argument("--lr-schedule", choices=("constant", "cosine", "cosine_phase"), default=None,
                   help="constant (reference), cosine decay over the run, or cosine_phase (each phase decays "
                        "from --lr to 0 on its own) (default: constant)")
    t.add_argument("--widen-at-reset", action="store_true",
                   help="at a filter reset after a compressed phase (deprune), zero the decoder's weights on the "
                        "channels that phase never sent, so widening the link keeps the model's function "
                        "(not in the paper)")
    t.add_argument("--evals-per-epoch", type=int, default=d.evals_per_epoch,
                   help="held-out evaluations per epoch of data; phase ends are evaluated too (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=None,
                   help=f"training batch (default: {d.batch_size}; MODEL: {DistillConfig.batch_size})")
    t.add_argument("--shift-px", type=int, default=2, help="random-crop augmentation: pad and crop back by up to "
                                                          "this many pixels, 0 = off (default: %(default)s)")
    t.add_argument("--eps", type=float, default=d.eps, help="budget penalty scale eps (default: %(default)s)")
    t.add_argument("--delta", type=float, default=d.delta, help="budget penalty sharpness delta (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of weights, shuffling, augmentation and filter "
                                                            "resets; MODEL: of the codec's weights, batch order "
                                                            "and budget draws (default: %(default)s)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")

    o = parser.add_argument_group("data and output")
    o.add_argument("--image-px", type=int, default=None,
                   help="digits are upsampled to this side (default: 32; MODEL: the model's input size)")
    o.add_argument("--train-limit", type=int, default=0, help="use only the first N training images, 0 = all "
                                                              "(digits: 1347; an image folder: its first N files, "
                                                              "10%% of them held out; for smoke runs)")
    o.add_argument("--eval-limit", type=int, default=0, help="MODEL: measure the table on the first N held-out "
                                                             "inputs only, 0 = all (for smoke runs)")
    o.add_argument("--store", type=Path, help="block store directory: the trained codec and split model are "
                                              "saved there as blocks (MODEL: where it was partitioned; required)")
    o.add_argument("--out", type=Path, help="write metrics and descriptions as JSON to this file")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"in_chans": 1, "num_classes": 10}
    if args.model == "vit":
        kw["img_px"] = args.image_px
    for flag, (model, key) in _MODEL_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if model != args.model:
            raise CodecError(f"--{flag.replace('_', '-')} applies to --model {model}, not {args.model}")
        kw[key] = value
    return kw


def run(args: argparse.Namespace) -> int:
    """Run ``train-codec``; returns the process exit code (0 ok, 2 bad input)."""
    try:
        if args.user_model is not None:
            _check_flags(args, _BUILTIN_ONLY, "applies to the built-in --model mode, not to MODEL")
            return _run_user(args)
        _check_flags(args, _USER_ONLY, "applies to MODEL (a partitioned model), not to the built-in --model mode")
        return _run(_builtin_defaults(args))
    except EdgesplitError as e:
        print(f"edgesplit train-codec: error: {e}", file=sys.stderr)
        return 2


def _check_flags(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    """Refuse a flag of the other mode (all of them default to None, so a given one is known)."""
    for name in names:
        if getattr(args, name, None) is not None:
            raise CodecError(f"--{name.replace('_', '-')} {why}")


def _builtin_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The built-in mode's defaults for the flags both modes share (they differ in your-model mode)."""
    d = TrainConfig()
    defaults = {"model": "vgg11", "schedule": "deprune", "epochs": DEFAULT_EPOCHS, "lr": d.lr,
                "batch_size": d.batch_size, "wire_dtype": "fp16", "optimizer": d.optimizer,
                "lr_schedule": d.lr_schedule, "image_px": 32}
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})


def _run_user(args: argparse.Namespace) -> int:
    """Your-model mode: distil a codec at block ``--cut`` of a stored model, store it, name it in the manifest."""
    import torch

    from edgesplit.partitioner import BlockStore

    from .distill import (create_cut_codec, distill_codec, evaluate_cut, format_points, load_cut_images,
                          load_cut_model, planner_points)
    from .storage import add_manifest_codec, save_codec

    missing = [flag for flag, v in (("--store DIR", args.store), ("--cut K", args.cut), ("--images DIR|digits",
                                                                                         args.images)) if v is None]
    if missing:
        raise UsageError(f"MODEL {args.user_model} needs {', '.join(missing)} (the store it was partitioned into, "
                         "the block index of the cut, the images to train on)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    name = args.name or f"cut{args.cut}"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name):
        raise UsageError(f"--name {name!r}: a codec name is 1-64 letters, digits, '_', '.' or '-', not starting "
                         "with '.' or '-'")
    store = BlockStore(args.store, create=False)  # a typo must not leave an empty store behind
    manifest = store.manifest(args.user_model)
    cm = load_cut_model(store, manifest, args.cut)
    budgets = args.budgets
    codec = create_cut_codec(manifest, args.cut, kind=args.kind, min_budget=budgets[0] if budgets else 4,
                             r=args.r or 1, seed=args.seed)
    data = load_cut_images(args.images, manifest, seed=args.split_seed or 0, limit=args.train_limit)
    x_train = data.x_train[:args.train_limit] if args.train_limit > 0 else data.x_train
    d = DistillConfig()
    cfg = DistillConfig(epochs=args.epochs or d.epochs, lr=args.lr or d.lr, batch_size=args.batch_size or d.batch_size,
                        temperature=args.temperature if args.temperature is not None else d.temperature,
                        mse_weight=args.mse_weight if args.mse_weight is not None else d.mse_weight,
                        wire_dtype=args.wire_dtype or d.wire_dtype, budgets=budgets, seed=args.seed,
                        progress=not args.no_progress)
    shape = list(cm.shape)
    print(f"{manifest.name}: cut at block {args.cut} ({manifest.blocks[args.cut - 1].name} -> "
          f"{manifest.blocks[args.cut].name}), {shape} per sample -> {codec.kind} codec, budgets "
          f"{list(budgets or codec.budgets)} and full width; {len(x_train)} training and {len(data.x_test)} "
          f"held-out inputs from {data.source}", flush=True)
    history = distill_codec(codec, cm, x_train, cfg)
    last = history[-1]
    print(f"trained {last['epoch']} epochs in {last['seconds']:.0f} s: "
          f"loss {last['loss']:.4f} (KL {last['kl']:.4f}, MSE {last['mse']:.4f})")
    n_eval = args.eval_limit if args.eval_limit > 0 else len(data.x_test)
    y_eval = None if data.y_test is None else data.y_test[:n_eval]
    base, points = evaluate_cut(codec, cm, data.x_test[:n_eval], y_eval, [*(budgets or codec.budgets), None],
                                ("fp16", "int8"))
    print(format_points(base, points))
    desc = save_codec(store, codec)
    trained = {"images": data.source, "epochs": cfg.epochs, "seed": cfg.seed, "wire_dtype": cfg.wire_dtype,
               "temperature": cfg.temperature, "budgets": list(budgets or codec.budgets)}
    add_manifest_codec(store, manifest.name, name, desc, cut=args.cut, points=planner_points(base, points),
                       trained=trained)
    print(f"stored codec {name!r} (block {desc['block'][:12]}...) in {args.store}, named in {manifest.name}'s "
          f"manifest; deploy it with links=[{{'codec': '{name}', ...}}] on the stage cut at block {args.cut}, or "
          f"attach it live: edgesplit link --model {manifest.name} --cut STAGE_CUT --codec {name}")
    if args.out is not None:
        result = {"model": manifest.name, "cut": args.cut, "name": name, "codec": desc, "config": asdict(cfg),
                  "history": history, "baseline": asdict(base), "table": [asdict(p) for p in points]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from edgesplit.partitioner import BlockStore

    from .data import Dataset, load_digits_split
    from .evaluation import budget_table
    from .splitnets import create_splitnet
    from .storage import load_splitnet, save_splitnet
    from .training import SplitTrainer, history_to_json, parse_phases, schedule_phases

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.init is not None and args.store is None:
        raise CodecError("--init needs --store: the earlier run's blocks live in its block store")
    store = BlockStore(args.store) if args.store is not None else None
    data = load_digits_split(image_px=args.image_px)
    if args.train_limit > 0:
        data = Dataset(data.x_train[:args.train_limit], data.y_train[:args.train_limit],
                       data.x_test, data.y_test, data.num_classes)
    torch.manual_seed(args.seed)
    if args.init is not None:
        try:
            desc = json.loads(args.init.read_text())["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CodecError(f"--init {args.init}: expected the JSON of an earlier --out with a 'model' entry "
                             f"({e})") from None
        net = load_splitnet(store, desc)
        if net.name != args.model:
            raise CodecError(f"--init holds a {net.name} model but --model is {args.model}")
    else:
        net = create_splitnet(args.model, **_model_kwargs(args))
    wire_dtype = None if args.wire_dtype == "fp16" else args.wire_dtype
    if args.phases:
        phases = parse_phases(args.phases)
    else:
        full = args.full_epochs if args.full_epochs is not None else (0 if args.init is not None else None)
        phases = schedule_phases(args.schedule, args.epochs, budget=args.budget, mid_budget=args.mid_budget,
                                 compressed_share=args.share, full_epochs=full, wire_dtype=wire_dtype)
    cfg = TrainConfig(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, optimizer=args.optimizer,
                      batch_size=args.batch_size, eps=args.eps, delta=args.delta, seed=args.seed,
                      shift_px=args.shift_px, lr_schedule=args.lr_schedule, evals_per_epoch=args.evals_per_epoch,
                      widen_at_reset=args.widen_at_reset, progress=not args.no_progress)
    trainer = SplitTrainer(net, data, cfg)
    eval_points = [(args.budget, "fp16")] if args.budget in net.codec.budgets else []
    records = trainer.run(phases, eval_points=eval_points, desc=f"train-codec {args.model}")
    last = records[-1]
    print(f"{args.model}: {last.epoch} epochs, final held-out accuracy {last.test_acc:.2f} % ({last.label}), "
          f"{last.cum_bytes / 1e6:.2f} MB sent over the link")
    budgets = [None, *sorted(net.codec.budgets, reverse=True)]
    table = [{"budget": r.budget, "dtype": r.wire_dtype, "accuracy": r.accuracy, "bytes_per_sample": r.bytes_per_sample}
             for r in budget_table(net, data.x_test, data.y_test, budgets, ("fp16", "int8"))]
    result: dict[str, Any] = {
        "model_name": args.model, "model_kwargs": net.config, "phases": [asdict(p) for p in phases],
        "train_config": asdict(cfg), "history": history_to_json(records), "table": table,
    }
    if store is not None:
        result["model"] = save_splitnet(store, net)
        result["codec"] = result["model"]["codec"]
        print(f"saved codec block {result['codec']['block'][:12]}... and split model to {args.store}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m edgesplit.compression.cli_train``) until the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="edgesplit train-codec")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
