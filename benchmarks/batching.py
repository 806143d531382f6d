"""Dynamic batching benchmark: a 2-stage pipeline with batching on (``--max-batch``) against batch 1.

::

    python benchmarks/batching.py                            # vit_tiny in 2 stages, 32 in flight, 3 runs each
    python benchmarks/batching.py --runs 5 --requests 256 --max-batch 8 --batch-wait-ms 2
    python benchmarks/batching.py --quick                    # a sanity run: 1 run of 48 requests each

Two local clusters run side by side, each a coordinator and 2 worker processes (one torch
thread each), with the model (random weights) deployed in 2 stages: one whose workers batch
(``--max-batch N --batch-wait-ms W``) and one with ``--max-batch 1``. Runs alternate between
them (and which goes first), so each batched run is compared with a batch-1 run next to it in
time; the throughput ratio is the median over those pairs. Every output is compared with the
unsplit model's output for its input computed here (<= 1e-5).

Per run: throughput (req/s), p50/p95 end-to-end latency, and per stage the mean batch size and
the workers' median compute time per pass (from heartbeat counters and stage statistics). The
same pair of runs at ``--check-in-flight`` (8) checks that batching does not slow the pipeline
where there is less to batch; its throughput is also given as a ratio to the bottleneck stage's
rate at batch 1 (1 / slowest stage's forward time, measured alone in this process).

Before the runs, each stage's forward time per sample at batch 1 and at ``--max-batch`` is
measured in this process: on CPU the pipeline can gain from batching at most about that
ratio (messages are still one per request).

Writes ``benchmarks/out/batching.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
ATOL = 1e-5


def _forward_ms_per_sample(manifest: Any, store: Any, splits: list[int], batches: list[int], reps: int) -> dict:
    """``{batch: [stage0 ms/sample, stage1 ms/sample]}``, medians of ``reps`` passes, one torch thread."""
    import torch

    from edgesplit.partitioner import build_blocks

    bounds = [0, *splits, manifest.n_blocks]
    stages = [build_blocks(store, manifest, a, b) for a, b in zip(bounds, bounds[1:])]
    out: dict[int, list[float]] = {}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, *manifest.input_shape)
            row = []
            for stage in stages:
                y = stage(x)  # warm
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    stage(x)
                    times.append(time.perf_counter() - t0)
                row.append(statistics.median(times) * 1000 / b)
                x = y
            out[b] = row
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _worker_counts(cl: Any, names: list[str], model: str) -> dict[str, dict[str, float]]:
    """Per worker: compute counters and its stage's stats from the last heartbeat."""
    out = {}
    for w in cl.workers():
        if w.name in names:
            c = {k[len("count_"):]: v for k, v in w.telemetry.items() if k.startswith("count_")}
            st = next((v for (m, _), v in w.stage_stats().items() if m == model), {})
            out[w.name] = {"computed": c.get("computed", 0), "batches": c.get("batches", 0),
                           "batch_max": c.get("batch_max", 0), "compute_ms_p50": st.get("compute_ms_p50", 0.0)}
    return out


def _settle(cl: Any, names: list[str], model: str, computed: dict[str, float], hb_s: float) -> dict:
    """Counters once every worker's heartbeat reports at least ``computed`` requests (or after 5 heartbeats)."""
    deadline = time.monotonic() + 5 * hb_s
    while True:
        c = _worker_counts(cl, names, model)
        if all(c.get(n, {}).get("computed", 0) >= computed.get(n, 0) for n in names) or time.monotonic() > deadline:
            return c
        time.sleep(hb_s / 4)


class Pipeline:
    """One local cluster with the model deployed in 2 stages, and a client with room for the runs."""

    def __init__(self, label: str, store: Path, workdir: Path, model: str, splits: list[int],
                 worker_flags: list[str], in_flight: int, hb_ms: int) -> None:
        from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

        self.label, self.model = label, model
        self.hb_s = hb_ms / 1000
        self.lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1, heartbeat_ms=hb_ms),
                               store=store, workdir=str(workdir), worker_args={0: worker_flags, 1: worker_flags})
        self.lc.start(timeout_s=120)
        self.cl = self.lc.client(timeout_ms=120_000, max_in_flight=max(64, in_flight))
        self.cl.deploy(model, splits=splits)
        self.names = self.lc.names

    def run(self, xs: list, refs: list, requests: int, in_flight: int) -> dict:
        """``requests`` requests with ``in_flight`` outstanding; throughput, latency, batch sizes, max error."""
        before = _settle(self.cl, self.names, self.model, {}, self.hb_s)
        futs: list = []
        pending: list = []
        t0 = time.perf_counter()
        for i in range(requests):
            pending.append((i % len(xs), self.cl.submit(self.model, xs[i % len(xs)])))
            if len(pending) >= in_flight:
                futs.append(pending.pop(0))
                futs[-1][1].result()
        for p in pending:
            p[1].result()
            futs.append(p)
        wall = time.perf_counter() - t0
        lat = [f.info.latency_ms for _, f in futs]
        err = max(float((f.result() - refs[k]).abs().max()) for k, f in futs)
        outs = {k: f.result() for k, f in futs}
        want = {n: before.get(n, {}).get("computed", 0) + requests for n in self.names}
        after = _settle(self.cl, self.names, self.model, want, self.hb_s)
        stages = []
        for n in self.names:
            b, a = before.get(n, {}), after.get(n, {})
            passes = a.get("batches", 0) - b.get("batches", 0)
            done = a.get("computed", 0) - b.get("computed", 0)
            stages.append({"worker": n, "mean_batch": done / passes if passes else 0.0,
                           "batch_max": a.get("batch_max", 0), "pass_ms_p50": a.get("compute_ms_p50", 0.0)})
        return {"config": self.label, "in_flight": in_flight, "requests": requests, "wall_s": wall,
                "throughput_rps": requests / wall, "latency_ms_p50": _pct(lat, 0.5), "latency_ms_p95": _pct(lat, 0.95),
                "max_abs_err": err, "stages": stages, "_outs": outs}

    def close(self) -> None:
        self.lc.stop()


def _spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model, random weights")
    p.add_argument("--split", type=int, default=0, help="block where stage 2 starts (default: half the blocks)")
    p.add_argument("--requests", type=int, default=160, help="timed requests per run")
    p.add_argument("--in-flight", type=int, default=32, help="requests outstanding during the main runs")
    p.add_argument("--check-in-flight", type=int, default=8, help="in flight of the no-slowdown check (0 = skip)")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration (interleaved)")
    p.add_argument("--max-batch", type=int, default=8, help="the batched workers' --max-batch")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="the batched workers' --batch-wait-ms")
    p.add_argument("--warmup-requests", type=int, default=24, help="untimed requests per cluster before the runs")
    p.add_argument("--heartbeat-ms", type=int, default=1000, help="daemons' heartbeat (counters come with it)")
    p.add_argument("--quick", action="store_true", help="sanity run: 1 run (at most 48 requests) per configuration")
    args = p.parse_args()
    if args.quick:
        args.runs, args.requests, args.warmup_requests = 1, min(args.requests, 48), 8

    import timm
    import torch

    from edgesplit.partitioner import BlockStore, partition, timm_recipe

    torch.set_num_threads(1)
    load0 = os.getloadavg()
    print(f"config: {vars(args)}; cpus {os.cpu_count()}; load average at start {load0[0]:.2f} {load0[1]:.2f} "
          f"{load0[2]:.2f}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-batching-"))
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    store = BlockStore(tmp / "store")
    manifest = partition(model, args.model, timm_recipe(args.model), store, profile=False)
    splits = [args.split or manifest.n_blocks // 2]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, *manifest.input_shape, generator=g) for _ in range(16)]
    with torch.inference_mode():
        refs = [model(x) for x in xs]  # unsplit, batch 1
    del model
    fwd = _forward_ms_per_sample(manifest, store, splits, sorted({1, args.max_batch}), reps=10)
    gain = [fwd[1][k] / fwd[args.max_batch][k] for k in range(2)]
    print(f"\n[forward, this process, 1 thread] ms per sample, stage 0 | stage 1: batch 1: {fwd[1][0]:.2f} | "
          f"{fwd[1][1]:.2f};  batch {args.max_batch}: {fwd[args.max_batch][0]:.2f} | {fwd[args.max_batch][1]:.2f}"
          f";  per-sample speed-up {gain[0]:.2f} | {gain[1]:.2f}", flush=True)

    flags = {"batched": ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)],
             "batch1": ["--max-batch", "1"]}
    pipes: dict[str, Pipeline] = {}
    runs: list[dict] = []
    try:
        for label, f in flags.items():
            pipes[label] = Pipeline(label, tmp / "store", tmp / label, args.model, splits, f, args.in_flight,
                                    args.heartbeat_ms)
            for i in range(args.warmup_requests):
                pipes[label].cl.infer(args.model, xs[i % len(xs)])
        checks = [args.in_flight] + ([args.check_in_flight] if args.check_in_flight else [])
        for r in range(args.runs):
            for in_flight in checks:
                order = list(flags) if r % 2 == 0 else list(flags)[::-1]
                for label in order:
                    res = pipes[label].run(xs, refs, args.requests, in_flight)
                    res["run"] = r
                    runs.append(res)
                    s = res["stages"]
                    print(f"  run {r} {label:>7} @{in_flight:>3} in flight: {res['throughput_rps']:6.1f} req/s, "
                          f"p50 {res['latency_ms_p50']:6.1f} ms, p95 {res['latency_ms_p95']:6.1f} ms, mean batch "
                          f"{s[0]['mean_batch']:.2f} | {s[1]['mean_batch']:.2f}, pass ms p50 {s[0]['pass_ms_p50']:.1f}"
                          f" | {s[1]['pass_ms_p50']:.1f}, max err {res['max_abs_err']:.1e}", flush=True)
    finally:
        for pipe in pipes.values():
            pipe.close()
        shutil.rmtree(tmp, ignore_errors=True)

    bottleneck_ms = max(fwd[1])
    summary = []
    print(f"\n[pipeline] {args.model} in 2 stages (blocks [0,{splits[0]}) | [{splits[0]},{manifest.n_blocks})), "
          f"2 worker processes x 1 torch thread per configuration, {args.requests} requests per run, {args.runs} runs "
          f"each, interleaved; mean (min-max)")
    print(f"{'in flight':>9}  {'config':>8}  {'req/s':>17}  {'p50 ms':>17}  {'p95 ms':>17}  {'mean batch':>11}  "
          f"{'x bottleneck':>12}")
    max_err = max(r["max_abs_err"] for r in runs)
    equal_err = 0.0
    for in_flight in checks:
        row: dict[str, Any] = {"in_flight": in_flight}
        for label in flags:
            rs = [r for r in runs if r["in_flight"] == in_flight and r["config"] == label]
            thr = [r["throughput_rps"] for r in rs]
            row[label] = {"throughput_rps": thr, "latency_ms_p50": [r["latency_ms_p50"] for r in rs],
                          "latency_ms_p95": [r["latency_ms_p95"] for r in rs],
                          "mean_batch": [[s["mean_batch"] for s in r["stages"]] for r in rs],
                          "ratio_to_bottleneck": [t * bottleneck_ms / 1000 for t in thr]}
            mb = [statistics.mean(m) for m in row[label]["mean_batch"]]
            print(f"{in_flight:>9}  {label:>8}  {_spread(thr):>17}  {_spread(row[label]['latency_ms_p50']):>17}  "
                  f"{_spread(row[label]['latency_ms_p95']):>17}  {statistics.mean(mb):>11.2f}  "
                  f"{statistics.mean(row[label]['ratio_to_bottleneck']):>12.2f}")
        pairs = [(a, b) for a in runs for b in runs if a["in_flight"] == b["in_flight"] == in_flight
                 and a["run"] == b["run"] and a["config"] == "batched" and b["config"] == "batch1"]
        ratios = [a["throughput_rps"] / b["throughput_rps"] for a, b in pairs]
        for a, b in pairs:  # the same inputs through both: outputs equal
            equal_err = max(equal_err, *(float((a["_outs"][k] - b["_outs"][k]).abs().max()) for k in a["_outs"]))
        row["throughput_ratio"] = ratios
        print(f"{'':>9}  batched / batch1 throughput, median of {len(ratios)} interleaved pairs: "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        summary.append(row)
    print(f"\nmax |output - unsplit model| over every request: {max_err:.2e} (<= {ATOL}); "
          f"max |batched - batch1| for the same input: {equal_err:.2e}")
    for r in runs:
        del r["_outs"]
    load1 = os.getloadavg()
    print(f"load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    out = {"config": vars(args), "load_start": load0, "load_end": load1, "splits": splits,
           "forward_ms_per_sample": {str(k): v for k, v in fwd.items()}, "per_sample_speedup": gain,
           "bottleneck_ms_batch1": bottleneck_ms, "summary": summary, "runs": runs,
           "max_abs_err": max_err, "batched_vs_batch1_max_abs_diff": equal_err}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "batching.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT / 'batching.json'}")
    ok = max_err <= ATOL and equal_err <= ATOL
    if not ok:
        print("FAILED: outputs differ beyond the tolerance", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
