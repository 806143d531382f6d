"""``edgesplit train-codec``: train a split model with a compression codec at its cut (deprune/prune).

Examples::

    # deprune on the half-width VGG11 (b=4 for 15 epochs, reset, 7 uncompressed), codec into ./store
    edgesplit train-codec --model vgg11 --schedule deprune --epochs 22 --store ./store --out deprune.json
    # the uncompressed baseline, then prune from its weights (b=32 then b=4, 4 epochs each)
    edgesplit train-codec --model vgg11 --schedule none --epochs 22 --store ./store --out full.json
    edgesplit train-codec --model vgg11 --schedule prune --epochs 8 --init full.json --store ./store --out prune.json
    # any phase list, here the ViT with a final mix phase so that one module serves every budget
    edgesplit train-codec --model vit --phases full:20,b32:5,b4:5,mix:3 --optimizer adamw --lr 1e-3 \\
        --lr-schedule cosine --store ./store

The JSON written by ``--out`` holds the configuration, one record per evaluation point
(accuracy, bytes sent; one per epoch unless ``--evals-per-epoch`` or fractional phases add
more), a budget x dtype table of the final model, and the descriptions of the stored codec
(``codec``; put it in a manifest's ``extra["codecs"]``) and split model (``model``; use it
with ``--init``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import CodecError
from .splitnets import list_splitnets
from .training import SCHEDULES, TrainConfig

_MODEL_FLAGS = {  # CLI flag -> (split model it applies to, builder kwarg)
    "width": ("vgg11", "width"), "r": ("vgg11", "r"), "dim": ("vit", "dim"), "depth": ("vit", "depth"),
    "heads": ("vit", "heads"), "patch_px": ("vit", "patch_px"), "cut": ("vit", "cut"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train-codec`` options to ``parser``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    m = parser.add_argument_group("model")
    m.add_argument("--model", choices=list_splitnets(), default="vgg11",
                   help="split model: vgg11 = VGG11-style CNN cut after its 5th conv ('fmap' codec); "
                        "vit = small ViT cut in the middle ('tokens' codec) (default: %(default)s)")
    m.add_argument("--width", type=int, help="vgg11: channels of the first conv; the cut has 8x this "
                                             "(default 32, i.e. half of VGG11)")
    m.add_argument("--r", type=int, choices=(1, 2, 3), help="vgg11: codec spatial reduction, conv kernel 2+r "
                                                           "stride r (default 1 = no spatial reduction)")
    m.add_argument("--dim", type=int, help="vit: embedding width D = the codec's channels (default 128)")
    m.add_argument("--depth", type=int, help="vit: transformer blocks (default 6)")
    m.add_argument("--heads", type=int, help="vit: attention heads (default 4)")
    m.add_argument("--patch-px", type=int, help="vit: patch side in pixels (default 4)")
    m.add_argument("--cut", type=int, help="vit: blocks on the client side (default 3 = the middle of 6)")
    m.add_argument("--init", type=Path, help="start from the split model of an earlier run: the JSON that run "
                                             "wrote with --out (its 'model' entry; needs that run's --store)")

    s = parser.add_argument_group("schedule")
    s.add_argument("--schedule", choices=SCHEDULES, default="deprune",
                   help="deprune: b=BUDGET for SHARE of the epochs, reset the filter, then uncompressed; "
                        "prune: FULL_EPOCHS uncompressed, then b=MID_BUDGET and b=BUDGET for EPOCHS/2 each; "
                        "none: uncompressed only; fixed: b=BUDGET from the start (default: %(default)s)")
    s.add_argument("--epochs", type=int, default=22, help="epochs of the schedule; for prune, of its compressed "
                                                          "part (default: %(default)s, as the paper's Fig. 6)")
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
    s.add_argument("--wire-dtype", choices=("fp16", "int8", "fp32"), default="fp16",
                   help="dtype of activations in compressed phases; gradients go as fp16 unless this is fp32 "
                        "(default: %(default)s, as the reference)")

    t = parser.add_argument_group("optimisation")
    d = TrainConfig()
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer,
                   help="sgd as the reference, adamw for ViTs from scratch (default: %(default)s)")
    t.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: %(default)s)")
    t.add_argument("--momentum", type=float, default=d.momentum,
                   help="SGD momentum: 0 in the reference's deprune runs, 0.9 in its prune runs (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay (default: %(default)s)")
    t.add_argument("--lr-schedule", choices=("constant", "cosine", "cosine_phase"), default=d.lr_schedule,
                   help="constant (reference), cosine decay over the run, or cosine_phase (each phase decays "
                        "from --lr to 0 on its own) (default: %(default)s)")
    t.add_argument("--widen-at-reset", action="store_true",
                   help="at a filter reset after a compressed phase (deprune), zero the decoder's weights on the "
                        "channels that phase never sent, so widening the link keeps the model's function "
                        "(not in the paper)")
    t.add_argument("--evals-per-epoch", type=int, default=d.evals_per_epoch,
                   help="held-out evaluations per epoch of data; phase ends are evaluated too (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch (default: %(default)s)")
    t.add_argument("--shift-px", type=int, default=2, help="random-crop augmentation: pad and crop back by up to "
                                                          "this many pixels, 0 = off (default: %(default)s)")
    t.add_argument("--eps", type=float, default=d.eps, help="budget penalty scale eps (default: %(default)s)")
    t.add_argument("--delta", type=float, default=d.delta, help="budget penalty sharpness delta (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of weights, shuffling, augmentation and filter "
                                                            "resets (default: %(default)s)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")

    o = parser.add_argument_group("data and output")
    o.add_argument("--image-px", type=int, default=32, help="digits are upsampled to this side (default: %(default)s)")
    o.add_argument("--train-limit", type=int, default=0, help="use only the first N training images, 0 = all "
                                                              "1347 (for smoke runs)")
    o.add_argument("--store", type=Path, help="block store directory: the trained codec and split model are "
                                              "saved there as blocks")
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
        return _run(args)
    except CodecError as e:
        print(f"edgesplit train-codec: error: {e}", file=sys.stderr)
        return 2


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
            raise CodecError(f"--init {args.init}: expected the JSON of an earlier --out with a 'model' entry ({e})") from None
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
