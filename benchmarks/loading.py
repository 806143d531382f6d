"""Block loading rate against the store's raw read rate, with and without a read-rate cap.

Partitions a timm model (random weights) into a temporary store, then for each cap
(none, and emulated board storage) times, over the same block files, the same chunk
size and the same cap:

* raw read, fresh buffer: each file read into a new buffer allocated as the loader
  allocates (``reader.host_buffer``); all buffers kept, as the cache keeps blocks;
* raw read, reused buffer: each file read into one buffer (no first-touch page faults:
  the ceiling of any loader that keeps what it loads);
* cold load: a fresh ``BlockCache(store, budget, "cpu")``, ``.get(bid)`` for every block
  (read + xxh3 check against the sidecar + tensor views);
* cold load without sidecars: the SHA-256 path a block from an older store takes once
  (it writes the sidecar, fsync included);
* old path, for reference: ``read_bytes`` + ``safetensors.torch.load`` + SHA-256 ``block_id``,
  what ``BlockStore.get`` did before.

Rates are file bytes / wall time. Files are warmed into the page cache before every pass
unless ``--cold`` (then evicted before every pass with posix_fadvise); the resident
fraction measured with mincore is printed with each row.

    .venv/bin/python benchmarks/loading.py                                  # vit_base, caps none,400MB/s,100MB/s
    .venv/bin/python benchmarks/loading.py --arch vit_small_patch16_224 --reps 1 --caps none

Writes ``benchmarks/out/loading.json``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import timm
import torch
import xxhash
from safetensors.torch import load as st_load

from edgesplit.partitioner import BlockStore, block_id, partition, timm_recipe
from edgesplit.partitioner.reader import READ_CHUNK_BYTES, ChunkReader, ReadRateCap, host_buffer
from edgesplit.runtime.cache import BlockCache

OUT = Path(__file__).resolve().parent / "out"
PATHS = ["raw read, fresh buffer", "raw read, reused buffer", "cold load (BlockCache.get)",
         "cold load, no sidecars (SHA-256)", "old path (safetensors load + SHA-256)"]
RAW, RAW_REUSED, LOAD, LOAD_SHA, OLD = PATHS


def parse_cap(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def cap_name(cap: float | None) -> str:
    return "none" if cap is None else f"{cap / 1e6:g} MB/s"


def resident_fraction(paths: list[Path]) -> float:
    """Fraction of the files' pages in the page cache (mincore on a private mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    have = total = 0
    for p in paths:
        n = p.stat().st_size
        if n == 0:
            continue
        pages = (n + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        with open(p, "rb") as f, mmap.mmap(f.fileno(), n, access=mmap.ACCESS_COPY) as m:
            anchor = ctypes.c_char.from_buffer(m)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(n), vec)
            del anchor  # the mapping cannot close while exported
        if rc != 0:
            return float("nan")
        have += sum(b & 1 for b in vec)
        total += pages
    return have / total if total else 1.0


def set_page_cache(paths: list[Path], cold: bool) -> None:
    """Warm every file into the page cache, or ask the kernel to drop them (best effort: see mincore)."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(READ_CHUNK_BYTES):
                    pass


def raw_read(paths: list[Path], cap: ReadRateCap | None, chunk: int, reuse: torch.Tensor | None) -> list:
    """Each file into a buffer, chunked and capped as the store reads; nothing else."""
    kept = []
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            n = os.fstat(f.fileno()).st_size
            buf = reuse[:n] if reuse is not None else host_buffer(n)
            ChunkReader(f, cap, chunk).read_into(memoryview(buf.numpy()))
            kept.append(buf)
    return kept


def old_path(store: BlockStore, ids: list[str]) -> list:
    out = []
    for bid in ids:
        tensors = st_load(store.read_bytes(bid))
        if block_id(tensors) != bid:
            raise RuntimeError(f"block {bid} failed its SHA-256 check in the benchmark store")
        out.append(tensors)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm model, random weights (default: %(default)s)")
    p.add_argument("--caps", default="none,400e6,100e6",
                   help="read-rate caps in bytes/s, comma separated; 'none' for uncapped (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed passes per path and cap (default: %(default)s)")
    p.add_argument("--chunk-mib", type=float, default=READ_CHUNK_BYTES / (1 << 20),
                   help="read chunk, MiB, for raw and load alike (default: %(default)s)")
    p.add_argument("--cold", action="store_true",
                   help="evict the files from the page cache before every pass instead of warming them")
    p.add_argument("--out", type=Path, default=OUT / "loading.json", help="JSON results (default: %(default)s)")
    args = p.parse_args()
    caps = [parse_cap(c) for c in args.caps.split(",")]
    chunk = int(args.chunk_mib * (1 << 20))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    config = {"arch": args.arch, "caps_bps": caps, "reps": args.reps, "chunk_bytes": chunk,
              "page_cache": "evicted before each pass (--cold)" if args.cold else "warmed before each pass",
              "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
              "xxhash": xxhash.VERSION, "thp": thp.read_text().strip() if thp.exists() else "n/a"}
    print("config:", json.dumps(config))
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesplit-loading-") as tmp:
        torch.manual_seed(0)
        model = timm.create_model(args.arch, pretrained=False).eval()
        t0 = time.perf_counter()
        man = partition(model, args.arch, timm_recipe(args.arch), BlockStore(tmp), profile=False)
        del model
        ids = list(dict.fromkeys(b.id for b in man.blocks))
        plain = BlockStore(tmp)
        paths = [plain.path(b) for b in ids]
        total = sum(q.stat().st_size for q in paths)
        print(f"{args.arch}: {len(ids)} blocks, {total / 1e6:.1f} MB of block files "
              f"(partitioned in {time.perf_counter() - t0:.1f} s)")
        reuse = host_buffer(max(q.stat().st_size for q in paths))
        reuse.fill_(0)  # fault it in once
        budget = 4 * total

        def cache_load(store: BlockStore) -> list:
            cache = BlockCache(store, budget, "cpu")
            return [cache.get(bid) for bid in ids]

        ref = old_path(plain, ids)  # the loader returns exactly what safetensors does
        for bid, want, got in zip(ids, ref, cache_load(plain)):
            if set(want) != set(got) or not all(torch.equal(want[k], got[k]) for k in want):
                raise RuntimeError(f"block {bid}: loaded tensors differ from safetensors' own load")
        del ref

        for cap in caps:
            store = BlockStore(tmp, read_rate_bps=cap, chunk_bytes=chunk)
            rate = ReadRateCap(cap) if cap is not None else None

            def no_sidecars(store: BlockStore = store) -> list:
                for bid in ids:
                    store.digest_path(bid).unlink(missing_ok=True)
                return cache_load(store)

            runs: dict[str, Callable[[], list]] = {
                RAW: lambda: raw_read(paths, rate, chunk, None),
                RAW_REUSED: lambda: raw_read(paths, rate, chunk, reuse),
                LOAD: lambda store=store: cache_load(store),
                LOAD_SHA: no_sidecars,
                OLD: lambda store=store: old_path(store, ids)}
            times: dict[str, list[float]] = {k: [] for k in runs}
            resident: dict[str, list[float]] = {k: [] for k in runs}
            for rep in range(args.reps + (1 if cap is None else 0)):  # one untimed warm-up pass, uncapped only
                for what, fn in runs.items():
                    set_page_cache(paths, args.cold)
                    frac = resident_fraction(paths)
                    gc.collect()
                    t0 = time.perf_counter()
                    kept = fn()
                    dt = time.perf_counter() - t0
                    del kept
                    if cap is not None or rep > 0:
                        times[what].append(dt)
                        resident[what].append(frac)
                    if what == LOAD_SHA and not all(store.digest_path(b).is_file() for b in ids):
                        raise RuntimeError("the SHA-256 path did not write the sidecars back")
            raw_mean = statistics.mean(total / t for t in times[RAW])
            reused_mean = statistics.mean(total / t for t in times[RAW_REUSED])
            for what in runs:
                rates = [total / t for t in times[what]]
                mean = statistics.mean(rates)
                rows.append({"cap_bps": cap, "cap": cap_name(cap), "path": what, "mean_bps": mean,
                             "median_bps": statistics.median(rates),
                             "stdev_bps": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                             "min_bps": min(rates), "max_bps": max(rates), "runs": len(rates),
                             "vs_raw": mean / raw_mean, "vs_raw_reused": mean / reused_mean,
                             "page_cache_resident": statistics.mean(resident[what])})

    print(f"\nrates in GB/s of block-file bytes; mean ± stdev [min-max] of {args.reps} passes; "
          f"chunk {chunk / (1 << 20):g} MiB; page cache {config['page_cache']}")
    print(f"{'cap':<12} {'path':<40} {'GB/s':>7} {'±':>6} {'min-max':>13} {'median':>7} {'x raw':>6} {'x reused':>8} "
          f"{'cached':>7}")
    for r in rows:
        print(f"{r['cap']:<12} {r['path']:<40} {r['mean_bps'] / 1e9:>7.3f} {r['stdev_bps'] / 1e9:>6.3f} "
              f"{r['min_bps'] / 1e9:>6.3f}-{r['max_bps'] / 1e9:<6.3f} {r['median_bps'] / 1e9:>7.3f} {r['vs_raw']:>6.2f} {r['vs_raw_reused']:>8.2f} "
              f"{r['page_cache_resident']:>7.0%}")
    print("x raw: mean / mean of 'raw read, fresh buffer' at the same cap (acceptance: cold load >= 0.8); "
          "x reused: the same against 'raw read, reused buffer'")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {**config, "n_blocks": len(ids), "total_bytes": total},
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
