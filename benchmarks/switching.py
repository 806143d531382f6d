"""Switching benchmark: how long a worker takes to switch models, against the bytes it lacks.

::

    python benchmarks/switching.py                       # vit_base, 3 reps, uncapped and 200 MB/s
    python benchmarks/switching.py --arch vit_small_patch16_224 --caps 0,100MB --reps 3

Live, on the local multi-process cluster: a coordinator and 2 worker processes on loopback.
Models (random weights): four variants of one ViT that share their bottom blocks and differ
in their top blocks and head (V0; V1 = V0 with block 11 and the head re-drawn; V2 = blocks
9-11 and the head; V3 = blocks 6-11 and the head) and two unrelated models (the same
architecture, every weight re-drawn: U, U2). Each model runs in 2 stages, blocks [0, 7) on
w0 and [7, 14) on w1, so the top-block differences all land on w1. Each worker's budget
(1.5x its largest stage) cannot hold them all: switching evicts.

The six models are deployed without loading (registered, nothing resident). A warm-up
(U, U2, V0, V3) makes each worker's memory grow to its budget: those first loads also pay
for the process's fresh pages (page faults; reported apart, not in the fit). Then each rep:
U2 and U (so no V0 block is resident), then a fixed sequence of PREFETCH orders (a cold
V0, then switches with 0 to 100% of a stage missing), each sent to one worker at a time (a
board has its own CPU; two workers loading at once on this 2-core VM measure its contention). For every order and worker, the
worker reports the bytes it loaded into its cache and how long the order took on it; those
(bytes, ms) pairs are the points of the table and of the linear fit. A worker's read-rate
cap (``--store-read-rate``) emulates a board's storage; each cap is a fresh cluster.
Reported per cap: the fit (intercept, ms per MB, R^2), and the ratio cold full load /
switch with ~82% of the stage resident (V0 -> V1 on w1).

Writes ``benchmarks/out/switching.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
# the PREFETCH orders of one rep: U2 and U leave no V0 block resident, so V0 comes cold
SEQUENCE = ["U2", "U", "V0", "V1", "V0", "V2", "V1", "V3", "U", "V0", "V3", "V2", "U", "V1", "V0"]
WARMUP = ["U", "U2", "V0", "V3"]
VARIANT_FIRST_NEW = {"V1": 11, "V2": 9, "V3": 6}


def _build_store(root: Path, arch: str) -> dict[str, int]:
    """Partition the five models into ``root``; returns each model's bytes."""
    import timm
    import torch

    from edgesplit.partitioner import BlockStore, partition, timm_recipe

    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False).eval()
    models = {"V0": base}
    for name, first in VARIANT_FIRST_NEW.items():
        m = copy.deepcopy(base)
        torch.manual_seed(first)
        for blk in m.blocks[first:]:
            for p in blk.parameters():
                torch.nn.init.normal_(p, std=0.02)
        torch.nn.init.normal_(m.head.weight, std=0.02)
        models[name] = m
    for name, seed in (("U", 99), ("U2", 98)):
        torch.manual_seed(seed)
        models[name] = timm.create_model(arch, pretrained=False).eval()
    store = BlockStore(root)
    out = {}
    for name, m in models.items():
        man = partition(m, name, timm_recipe(arch), store, profile=False)
        out[name] = man.size_bytes
        print(f"  {name}: {man.n_blocks} blocks, {man.size_bytes / 1e6:.1f} MB", flush=True)
    return out


def fit_line(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least squares ms = a + b * MB over (MB, ms) points, with R^2."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in points)
    return {"intercept_ms": a, "ms_per_mb": b, "r2": 1 - ss_res / ss_tot if ss_tot else 0.0, "n": len(points)}


def _one_cap(root: Path, cap: int, reps: int, sizes: dict[str, int], n_blocks: int) -> dict[str, Any]:
    from edgesplit.partitioner import BlockStore
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    store = BlockStore(root)
    split = 7
    stage_bytes = {w: max(sum(b.size_bytes for b in (store.manifest(m).blocks[:split] if w == "w0"
                                                          else store.manifest(m).blocks[split:])) for m in sizes)
                   for w in ("w0", "w1")}
    budget = int(1.5 * max(stage_bytes.values()))
    args = ["--memory-budget", str(budget), "--torch-threads", "1"] + (["--store-read-rate", str(cap)] if cap else [])
    cfg = LocalClusterConfig(workers=2, port=0, torch_threads=1, heartbeat_ms=500)
    rows: list[dict[str, Any]] = []
    with LocalCluster(cfg, root, worker_args={0: args, 1: args}, coordinator_args=["--no-replan"]) as lc:
        cl = lc.client(control_timeout_ms=120_000)
        for m in sizes:  # registered, nothing resident (blocks are fetched into the worker stores once)
            cl.deploy(m, stages=[("w0", 0, split), ("w1", split, n_blocks)], load=False, timeout_ms=600_000)
        warmup = _orders(cl, WARMUP, -1, stage_bytes)
        for rep in range(reps):
            rows += _orders(cl, SEQUENCE, rep, stage_bytes)
            print(f"  cap {_cap_name(cap)}: rep {rep + 1}/{reps} done", flush=True)
        cl.close()
    fit = fit_line([(r["loaded_mb"], r["ms"]) for r in rows])
    cold: dict[int, float] = {}  # per rep, its first full load of V0 on w1 (after U2 and U)
    for r in rows:
        if (r["from"], r["to"], r["worker"]) == ("U", "V0", "w1") and r["loaded_mb"] >= 0.99 * r["stage_mb"]:
            cold.setdefault(r["rep"], r["ms"])
    warm80 = [r for r in rows if (r["from"], r["to"], r["worker"]) == ("V0", "V1", "w1")]
    ratios = [cold[w["rep"]] / w["ms"] for w in warm80 if w["rep"] in cold]  # one V0 > V1 per rep
    return {"cap_bytes_per_s": cap, "budget_bytes": budget, "stage_bytes": stage_bytes, "rows": rows, "fit": fit,
            "warmup": warmup,
            "cold_ms": list(cold.values()), "switch80": [{k: w[k] for k in ("rep", "loaded_mb", "ms", "stage_mb")} for w in warm80],
            "ratio_cold_over_switch80": ratios}


def _orders(cl: Any, sequence: list[str], rep: int, stage_bytes: dict[str, int]) -> list[dict[str, Any]]:
    """PREFETCH each model of ``sequence`` in turn, one worker at a time; one row per order and worker.

    One at a time because each board has its own CPU and this machine's 2 cores do not: two
    workers loading at once (beside the coordinator and this client) measure the VM's contention.
    """
    rows, prev = [], None
    for to in sequence:
        for w in sorted(stage_bytes):
            t0 = time.perf_counter()
            r = cl.prefetch(to, hint=[to], workers=[w])[w]
            rows.append({"rep": rep, "from": prev or "-", "to": to, "worker": w,
                         "loaded_mb": r["loaded_bytes"] / 1e6, "ms": r["ms"], "load_ms": r["load_ms"],
                         "resident_mb": r["resident_bytes"] / 1e6, "client_ms": (time.perf_counter() - t0) * 1000,
                         "blocks": r.get("blocks", 0), "reused": r.get("reused", 0),
                         "stage_mb": stage_bytes[w] / 1e6})
        prev = to
    return rows


def _cap_name(cap: int) -> str:
    return f"{cap / 1e6:.0f} MB/s" if cap else "none"


def _print(res: dict[str, Any]) -> None:
    cap = _cap_name(res["cap_bytes_per_s"])
    print(f"\nread-rate cap: {cap}; budget per worker {res['budget_bytes'] / 1e6:.0f} MB; stage bytes "
          + ", ".join(f"{w} {b / 1e6:.0f} MB" for w, b in res["stage_bytes"].items()))
    print(f"{'rep':>3} {'switch':<10}{'worker':<7}{'missing MB':>11}{'% of stage':>11}{'switch ms':>10}{'load ms':>9}"
          f"{'MB/s':>8}{'reused':>8}   (rep -1: warm-up, the worker's memory still growing; not in the fit)")
    for r in res["warmup"] + res["rows"]:
        rate = r["loaded_mb"] / (r["load_ms"] / 1000) if r["load_ms"] > 0 else 0.0
        print(f"{r['rep']:>3} {r['from'] + '>' + r['to']:<10}{r['worker']:<7}{r['loaded_mb']:>11.1f}"
              f"{100 * r['loaded_mb'] / r['stage_mb']:>10.0f}%{r['ms']:>10.1f}{r['load_ms']:>9.1f}"
              f"{rate:>8.0f}{r['reused']:>4}/{r['blocks']:<3}")
    f = res["fit"]
    print(f"fit over {f['n']} points: switch ms = {f['intercept_ms']:.1f} + {f['ms_per_mb']:.3f} x missing MB, "
          f"R^2 = {f['r2']:.4f}")
    rs = res["ratio_cold_over_switch80"]
    if rs:
        s80 = res["switch80"]
        print(f"w1, ~{100 - 100 * s80[0]['loaded_mb'] / s80[0]['stage_mb']:.0f}% of the stage resident (V0>V1): "
              f"cold full load / switch = {statistics.fmean(rs):.2f} (min {min(rs):.2f}, max {max(rs):.2f}, "
              f"{len(rs)} reps)")


def main(argv: list[str] | None = None) -> int:
    from edgesplit.runtime.config import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for the method.")
    ap.add_argument("--arch", default="vit_base_patch16_224", help="timm ViT with 12 blocks (14 stored blocks)")
    ap.add_argument("--caps", default="0,200MB", help="read-rate caps per second to try, comma-separated (0 = none)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the switch sequence per cap")
    ap.add_argument("--out", type=Path, default=OUT / "switching.json")
    args = ap.parse_args(argv)
    caps = [parse_size(c) for c in args.caps.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgesplit-switching-") as tmp:
        print(f"partitioning five {args.arch} models (random weights) ...", flush=True)
        sizes = _build_store(Path(tmp), args.arch)
        from edgesplit.partitioner import BlockStore

        n_blocks = BlockStore(tmp).manifest("V0").n_blocks
        if n_blocks != 14:
            print(f"{args.arch} has {n_blocks} stored blocks; this benchmark wants a 12-block ViT (14)", file=sys.stderr)
            return 2
        results = [_one_cap(Path(tmp), cap, args.reps, sizes, n_blocks) for cap in caps]
    for res in results:
        _print(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"arch": args.arch, "sequence": SEQUENCE, "model_bytes": sizes,
                                    "results": results}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
