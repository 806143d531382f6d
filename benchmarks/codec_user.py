"""A codec for a user's own model, trained without labels: a timm ViT on digits, cut in the middle.

    python benchmarks/codec_user.py                  # seeds 1 2 3: ~3.5 min once the base models are cached
                                                     # (the first run trains them: ~1 h on 2 shared cores)
    python benchmarks/codec_user.py --seeds 0 --codec-epochs 2   # one quick seed
    python benchmarks/codec_user.py --retrain-base   # train the base models again even if cached

Per seed s (s is the digits split's random_state, the base model's seed and the codec's seed):

1. the user's model: timm ``vit_tiny_patch16_224`` with ``img_size=32, patch_size=4,
   num_classes=10`` (3 input channels, 12 blocks, 65 tokens x 192 at every cut) trained on the
   training split of digits (30 epochs, AdamW with a 3-epoch warm-up then cosine, clipped
   gradients, no augmentation: 95.1-97.6 % held out) and saved as safetensors
   (``benchmarks/out/codec_user/base_s{s}_....safetensors``; reused when present);
2. partitioned into a block store with ``edgesplit.partitioner.partition`` and ``timm_recipe``;
3. ``edgesplit train-codec vit --store S --cut 6 --images digits --split-seed s --seed s``
   (the CLI itself, through ``edgesplit.runtime.cli.main``): the model is frozen, the codec at
   block 6 (the 6th of the 12 transformer blocks is the first on the receiving side) learns to
   match the model's own outputs, never sees a label;
4. held-out digits of split s: accuracy of the uncompressed split model (raw fp32 link: the
   model itself), and of the codec at every budget x wire dtype through real encode/decode.

Bytes are one-sample messages (msgpack header, kept channels, int8 scales): what one inference
sends over the cut. The ratio is the full-width fp32 message over the budget's.

Acceptance (computed from the measurements): at the check dtype (default int8) over the check
budgets (default 8, 16, 32), (a) some budget with >= 16x fewer bytes than fp32 full width is
within 1 point of the uncompressed model's accuracy (mean over seeds of the per-seed
difference), and (b) mean accuracy does not fall as the budget grows (per seed is printed
too). Writes ``benchmarks/out/codec_user.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "out"
CACHE = OUT / "codec_user"
ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10}
NAME = "vit"


def train_base(seed: int, args: argparse.Namespace) -> Any:
    """The user's model: the ViT trained on digits split ``seed`` (labels used here, and only here).

    AdamW (beta2 0.99), linear warm-up over ``base_warmup`` epochs then cosine, gradients clipped
    at norm 1: a 12-block ViT from scratch on 1347 images is unstable without the long warm-up
    and the clipping (seen here: with a 1-epoch warm-up, lr 2e-3 stalled near chance).
    """
    import timm

    from edgesplit.compression.distill import digits_images

    data = digits_images([3, 32, 32], split_seed=seed)
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, **KWARGS)
    lr, batch = args.base_lr, args.base_batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.base_weight_decay, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed)
    x, y = data.x_train, data.y_train
    steps = len(y) // batch
    total, step, bg = args.base_epochs * steps, 0, float(x.min())
    warm = max(1, round(args.base_warmup * steps))
    for epoch in range(args.base_epochs):
        model.train()
        order = torch.randperm(len(y), generator=g)
        t0 = time.perf_counter()
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            lr_now = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr_now
            loss = F.cross_entropy(model(_shift(x[idx], args.base_shift_px, bg, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        acc = _accuracy(model, data.x_test, data.y_test)
        print(f"  base seed {seed} epoch {epoch + 1}/{args.base_epochs}: loss {loss.item():.3f}, held-out "
              f"{acc:.2f} % ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return model.eval()


def _shift(x: torch.Tensor, s: int, background: float, g: torch.Generator) -> torch.Tensor:
    """Random crops after padding by ``s`` pixels (the same augmentation as ``training.SplitTrainer``)."""
    if s <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s), value=background)  # (N, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * s + 1, (n,), generator=g).tolist()
    dx = torch.randint(0, 2 * s + 1, (n,), generator=g).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float(torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(y), 256)]).eq(y).float().mean())


def base_model(seed: int, args: argparse.Namespace) -> tuple[Any, str]:
    """The cached base model of ``seed`` (safetensors), or train and cache it."""
    import timm
    from safetensors.torch import load_file, save_file

    path = CACHE / (f"base_s{seed}_e{args.base_epochs}_lr{args.base_lr:g}_b{args.base_batch}_w{args.base_warmup:g}"
                    f"_s{args.base_shift_px}_wd{args.base_weight_decay:g}.safetensors")
    if path.is_file() and not args.retrain_base:
        model = timm.create_model(ARCH, pretrained=False, **KWARGS)
        model.load_state_dict(load_file(str(path)))
        return model.eval(), f"cached {path.name}"
    t0 = time.perf_counter()
    model = train_base(seed, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, f"trained in {time.perf_counter() - t0:.0f} s, saved {path.name}"


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from edgesplit.partitioner import BlockStore, partition, timm_recipe
    from edgesplit.runtime import cli

    t0 = time.perf_counter()
    model, how = base_model(seed, args)
    t_base = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="codec-user-") as tmp:
        store = BlockStore(Path(tmp) / "store")
        partition(model, NAME, timm_recipe(ARCH, **KWARGS), store, profile=False)
        out = Path(tmp) / "codec.json"
        argv = ["train-codec", NAME, "--store", str(store.root), "--cut", str(args.cut), "--images", "digits",
                "--split-seed", str(seed), "--seed", str(seed), "--epochs", str(args.codec_epochs),
                "--out", str(out), *args.codec_args]
        print(f"seed {seed}: base model {how}; edgesplit {' '.join(argv)}", flush=True)
        t1 = time.perf_counter()
        rc = cli.main(argv)
        if rc != 0:
            raise SystemExit(f"train-codec failed with exit code {rc}")
        res = json.loads(out.read_text())
        res["seconds"] = {"base": t_base, "codec": time.perf_counter() - t1}
        res["base"] = how
        res["manifest_codec"] = store.manifest(NAME).extra["codecs"][f"cut{args.cut}"]
    return res


def summarise(runs: dict[int, dict[str, Any]], budgets: list[int], dtype: str) -> dict[str, Any]:
    """Means and spreads per budget, and the two acceptance checks."""
    seeds = sorted(runs)
    base = [runs[s]["baseline"]["accuracy"] for s in seeds]
    rows = []
    for b in budgets:
        pts = [next(p for p in runs[s]["table"] if p["budget"] == b and p["wire_dtype"] == dtype) for s in seeds]
        acc = [p["accuracy"] for p in pts]
        delta = [a - u for a, u in zip(acc, base)]
        rows.append({"budget": b, "wire_dtype": dtype, "bytes_per_sample": pts[0]["bytes_per_sample"],
                     "ratio": pts[0]["ratio"], "accuracy": acc, "mean": statistics.mean(acc),
                     "std": statistics.pstdev(acc), "min": min(acc), "max": max(acc),
                     "delta_mean": statistics.mean(delta),
                     "agreement_mean": statistics.mean(p["agreement"] for p in pts)})
    within = [r for r in rows if r["ratio"] >= 16 and r["delta_mean"] >= -1.0]
    means = [r["mean"] for r in rows]
    per_seed = {s: _monotone([r["accuracy"][i] for r in rows]) for i, s in enumerate(seeds)}
    return {"seeds": seeds, "uncompressed": {"accuracy": base, "mean": statistics.mean(base),
                                             "std": statistics.pstdev(base),
                                             "bytes_per_sample": runs[seeds[0]]["baseline"]["bytes_per_sample"]},
            "rows": rows, "within_1pt_at_16x": [r["budget"] for r in within], "monotone_mean": _monotone(means),
            "monotone_per_seed": per_seed,
            "met": bool(within) and _monotone(means)}


def _monotone(values: list[float]) -> bool:
    return all(b >= a for a, b in zip(values, values[1:]))


def print_summary(s: dict[str, Any]) -> None:
    u = s["uncompressed"]
    print(f"\nseeds {s['seeds']}: uncompressed (raw fp32 link) {u['mean']:.2f} % +- {u['std']:.2f} "
          f"({', '.join(f'{a:.2f}' for a in u['accuracy'])}), {u['bytes_per_sample']:,} B/sample at full width fp32")
    print(f"{'budget':>6} {'dtype':>5} {'B/sample':>9} {'vs fp32':>8} {'accuracy mean +- std':>21} "
          f"{'min..max':>14} {'vs uncompr.':>11} {'agreement':>9}   per seed")
    for r in s["rows"]:
        print(f"{r['budget']:>6} {r['wire_dtype']:>5} {r['bytes_per_sample']:>9,} {r['ratio']:>7.1f}x "
              f"{r['mean']:>12.2f} +- {r['std']:.2f} {r['min']:>6.2f}..{r['max']:.2f} {r['delta_mean']:>+10.2f} "
              f"{r['agreement_mean']:>8.2f}%   {', '.join(f'{a:.2f}' for a in r['accuracy'])}")
    print(f"(a) within 1 point of uncompressed at >= 16x fewer bytes: "
          f"{'met, budgets ' + str(s['within_1pt_at_16x']) if s['within_1pt_at_16x'] else 'NOT met'}")
    print(f"(b) accuracy does not fall as the budget grows: means {'met' if s['monotone_mean'] else 'NOT met'}; "
          f"per seed {s['monotone_per_seed']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="split/base/codec seeds (default 1 2 3)")
    p.add_argument("--cut", type=int, default=6, help="block index of the cut (default 6: blocks.5 starts the "
                                                      "receiving side)")
    p.add_argument("--codec-epochs", type=float, default=4, help="train-codec --epochs (default 4)")
    p.add_argument("--codec-args", nargs=argparse.REMAINDER, default=[], help="more train-codec flags, last")
    p.add_argument("--base-epochs", type=int, default=30, help="base ViT epochs (default 30)")
    p.add_argument("--base-lr", type=float, default=1e-3, help="base ViT AdamW learning rate (default 1e-3)")
    p.add_argument("--base-batch", type=int, default=32, help="base ViT batch (default 32)")
    p.add_argument("--base-warmup", type=float, default=3, help="base ViT warm-up epochs (default 3)")
    p.add_argument("--base-shift-px", type=int, default=0, help="base ViT random-shift augmentation (default 0)")
    p.add_argument("--base-weight-decay", type=float, default=0.05, help="base ViT weight decay (default 0.05)")
    p.add_argument("--retrain-base", action="store_true", help="train base models even when cached")
    p.add_argument("--check-budgets", type=int, nargs="+", default=[8, 16, 32], help="budgets of the checks")
    p.add_argument("--check-dtype", default="int8", help="wire dtype of the checks (default int8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=OUT / "codec_user.json", help="JSON results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"config: {vars(args)}", flush=True)
    t0 = time.perf_counter()
    runs = {s: run_seed(s, args) for s in args.seeds}
    summary = summarise(runs, args.check_budgets, args.check_dtype)
    print_summary(summary)
    full = summarise(runs, [b for b in runs[args.seeds[0]]["codec"]["budgets"]], args.check_dtype)
    print("\nevery budget at", args.check_dtype)
    print_summary(full)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                    "summary": summary, "all_budgets": full, "runs": runs,
                                    "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0 if summary["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
