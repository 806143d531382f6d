"""Block load throughput into the worker's cache (the scheduler's v), and what PartialLoading saves.

Partitions a timm ViT (random weights) into a temporary store, then on ``--device``:

1. cold loads through ``BlockCache.get`` (file read + SHA-256 check + copy to the device),
   and the parts timed alone: read + check into host memory, and the host -> device copy;
2. a model switch: model B shares the embedding and the first ``--shared`` blocks with A
   (a fine-tuned tail); with A resident, loading B fetches only B's own blocks.

    .venv/bin/python benchmarks/cuda_load.py                       # cuda if present, else cpu
    .venv/bin/python benchmarks/cuda_load.py --arch vit_small_patch16_224 --device cpu

Writes ``benchmarks/out/cuda_load.json``. Figures are medians of ``--reps`` runs, each with
fresh caches (the page cache stays warm: this is the loader's rate, not the disk's).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from edgesplit.partitioner import BlockStore, partition, timm_recipe
from edgesplit.runtime.cache import BlockCache

OUT = Path(__file__).resolve().parent / "out"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (after one warm-up)."""
    fn()
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm model (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shared", type=int, default=8, help="transformer blocks model B shares with model A")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="edgesplit-load-") as tmp:
        store = BlockStore(tmp)
        torch.manual_seed(0)
        a = timm.create_model(args.arch, pretrained=False).eval()
        man_a = partition(a, "A", timm_recipe(args.arch), store, profile=False)
        with torch.no_grad():  # B: the same backbone, its own tail
            for blk in a.blocks[args.shared:]:
                for t in blk.parameters():
                    t.add_(0.01)
            a.head.weight.add_(0.01)
        man_b = partition(a, "B", timm_recipe(args.arch), store, profile=False)
        ids_a = [b.id for b in man_a.blocks]
        ids_b = [b.id for b in man_b.blocks]
        total = man_a.size_bytes
        own_b = sum(b.size_bytes for b in man_b.blocks if b.id not in set(ids_a))
        budget = 4 * total

        def load_all() -> None:
            cache = BlockCache(store, budget, device)
            for bid in ids_a:
                cache.get(bid)

        def read_check() -> None:
            for bid in ids_a:
                store.get(bid)

        host = [store.get(bid) for bid in ids_a]
        pinned = [{k: v.pin_memory() for k, v in t.items()} for t in host] if device.type == "cuda" else host

        def copy(blocks) -> None:
            for t in blocks:
                for v in t.values():
                    v.to(device, non_blocking=True)

        def switch() -> None:
            cache = BlockCache(store, budget, device)
            for bid in ids_a:
                cache.get(bid)
            sync(device)
            t0 = time.perf_counter()
            before = cache.stats.bytes_loaded
            for bid in ids_b:
                cache.get(bid)
            sync(device)
            switch.s.append(time.perf_counter() - t0)
            switch.bytes = cache.stats.bytes_loaded - before
        switch.s, switch.bytes = [], 0

        t_load = timed(load_all, device, args.reps)
        t_read = timed(read_check, device, args.reps)
        t_copy = timed(lambda: copy(host), device, args.reps)
        t_copy_pinned = timed(lambda: copy(pinned), device, args.reps)
        for _ in range(args.reps):
            switch()
        t_switch = statistics.median(switch.s)
        t_full_b = t_load  # loading B from nothing moves as many bytes as A

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gb = 1e9
    rows = [
        ("cold load via BlockCache.get (read + sha256 + copy)", total, t_load),
        ("  read + sha256 check into host memory", total, t_read),
        ("  host -> device copy, pageable", total, t_copy),
        ("  host -> device copy, pinned", total, t_copy_pinned),
        (f"switch A -> B, B shares embed + {args.shared} blocks (PartialLoading)", switch.bytes, t_switch),
        ("load B from an empty cache", total, t_full_b),
    ]
    print(f"{args.arch} ({len(ids_a)} blocks, {total / 1e6:.1f} MB fp32) on {name}, median of {args.reps}")
    print(f"{'what':<62} {'MB':>8} {'ms':>9} {'GB/s':>7}")
    for what, nbytes, s in rows:
        print(f"{what:<62} {nbytes / 1e6:>8.1f} {s * 1e3:>9.1f} {nbytes / s / gb:>7.2f}")
    print(f"switch loads {switch.bytes / 1e6:.1f} MB of B's {total / 1e6:.1f} MB (own blocks {own_b / 1e6:.1f} MB): "
          f"{t_full_b / t_switch:.1f}x faster than a full load")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cuda_load.json").write_text(json.dumps({
        "arch": args.arch, "device": name, "reps": args.reps, "total_bytes": total, "switch_bytes": switch.bytes,
        "rows": [{"what": w.strip(), "bytes": n, "s": s, "gb_per_s": n / s / gb} for w, n, s in rows]}, indent=1))


if __name__ == "__main__":
    main()
