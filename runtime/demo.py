"""``edgesplit demo``: split a model 3 ways over 3 local worker processes and report what happened.

::

    edgesplit demo                                  # vit_tiny_patch16_224, 3 workers, 50 inputs
    edgesplit demo --model resnet18 --workers 4 --inputs 100 --in-flight 16

It partitions the model (random weights) into a temporary block store, starts a
coordinator and the workers on 127.0.0.1 (each worker fetches its blocks from the
coordinator), deploys a balanced layer-wise plan, streams the inputs with several in
flight, checks every output against the unsplit model and prints per-stage compute,
per-hop bytes and transfer time, end-to-end latency, throughput and the largest
difference from the unsplit model.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import human_size, opt

TOLERANCE = 1e-5  # raw fp32 links: the split must match the unsplit model to this


@dataclass(frozen=True)
class DemoConfig:
    """``edgesplit demo`` settings."""

    model: str = opt("vit_tiny_patch16_224", "timm model to split (random weights)")
    workers: int = opt(3, "worker processes (= stages)")
    inputs: int = opt(50, "inputs streamed through the pipeline")
    in_flight: int = opt(8, "requests in flight at once (pipelining)")
    batch: int = opt(1, "samples per request")
    seed: int = opt(0, "seed of the weights and inputs")
    torch_threads: int = opt(1, "torch threads per worker")
    port: int = opt(0, "coordinator port (0 = any free port)")
    progress: bool = opt(True, "show a progress bar")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(cfg: DemoConfig) -> int:
    """Run the demo; returns 0 when every output matched the unsplit model within ``TOLERANCE``."""
    import timm

    from edgesplit.partitioner import BlockStore, partition, timm_recipe

    from .cluster import LocalCluster, LocalClusterConfig

    torch.set_num_threads(max(1, cfg.torch_threads))
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-demo-"))
    try:
        say(f"[1/5] partitioning {cfg.model} (random weights, seed {cfg.seed}) into a block store ...")
        torch.manual_seed(cfg.seed)
        model = timm.create_model(cfg.model, pretrained=False).eval()
        store = BlockStore(tmp / "store")
        t0 = time.perf_counter()
        manifest = partition(model, cfg.model, timm_recipe(cfg.model), store, profile=True)
        say(f"      {manifest.n_blocks} blocks, {human_size(manifest.size_bytes)} in {time.perf_counter() - t0:.1f} s")

        say(f"[2/5] starting a coordinator and {cfg.workers} workers on 127.0.0.1 ...")
        t0 = time.perf_counter()
        lc = LocalCluster(LocalClusterConfig(workers=cfg.workers, port=cfg.port, torch_threads=cfg.torch_threads),
                          store=tmp / "store", workdir=str(tmp / "cluster"))
        with lc:
            say(f"      coordinator {lc.endpoint}; workers registered in {time.perf_counter() - t0:.1f} s")
            cl = lc.client()
            say(f"[3/5] deploying {cfg.model} in {cfg.workers} stages (workers fetch their blocks) ...")
            t0 = time.perf_counter()
            route = cl.deploy(cfg.model, n_stages=cfg.workers)
            say(f"      deployed in {time.perf_counter() - t0:.1f} s: " + " -> ".join(
                f"{h.worker}[{manifest.blocks[h.start].name}..{manifest.blocks[h.end - 1].name}]" for h in route.hops))

            g = torch.Generator().manual_seed(cfg.seed + 1)
            xs = [torch.randn(cfg.batch, *manifest.input_shape, generator=g) for _ in range(cfg.inputs)]
            for x in xs[:2]:
                cl.infer(cfg.model, x)  # warm-up (connections, first-call allocations)

            say(f"[4/5] streaming {cfg.inputs} inputs (batch {cfg.batch}, {cfg.in_flight} in flight) ...")
            futures, outputs, errors = _stream(cl, cfg, xs)
            wall_s = futures[-1][1] if futures else 0.0

            say("[5/5] checking against the unsplit model ...")
            max_diff = 0.0
            with torch.inference_mode():
                for i, x in enumerate(xs):
                    if outputs[i] is not None:
                        max_diff = max(max_diff, float((model(x) - outputs[i]).abs().max()))
            infos = [f.info for f, _ in futures if f.exception() is None]
            print(_report(cfg, manifest, route, infos, errors, wall_s, max_diff, lc.endpoint))
            ok = not errors and max_diff <= TOLERANCE
            return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stream(cl: Any, cfg: DemoConfig, xs: list[torch.Tensor]) -> tuple[list[tuple[Any, float]], list[Any], list[str]]:
    """Submit with at most ``in_flight`` outstanding; returns (future, seconds since start) per input."""
    from tqdm import tqdm

    from edgesplit.partitioner import EdgesplitError

    bar = tqdm(total=len(xs), unit="req", disable=not cfg.progress, file=sys.stderr, leave=False)
    outputs: list[Any] = [None] * len(xs)
    errors: list[str] = []
    done: list[tuple[Any, float]] = []
    in_flight: list[tuple[int, Any]] = []
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(xs) or in_flight:
        while nxt < len(xs) and len(in_flight) < cfg.in_flight:
            in_flight.append((nxt, cl.submit(cfg.model, xs[nxt], trace=True)))
            nxt += 1
        i, fut = in_flight.pop(0)
        try:
            outputs[i] = fut.result()
        except EdgesplitError as e:  # the demo reports request errors instead of stopping
            errors.append(f"input {i}: {type(e).__name__}: {e}")
        done.append((fut, time.perf_counter() - t0))
        bar.update(1)
    bar.close()
    return done, outputs, errors


def _report(cfg: DemoConfig, manifest: Any, route: Any, infos: list[Any], errors: list[str], wall_s: float,
            max_diff: float, endpoint: str) -> str:
    n_hops = len(route.hops)
    compute = [[] for _ in range(n_hops)]
    queue_ms = [[] for _ in range(n_hops)]
    xfer = [[] for _ in range(n_hops + 1)]
    nbytes = [[] for _ in range(n_hops + 1)]
    for info in infos:
        trc = info.trace
        if len(trc) != n_hops:
            continue
        prev_send = info.t_sent
        nbytes[0].append(info.input_bytes)
        for k, (hop, worker, t_recv, t_start, t_end, t_send, b_out) in enumerate(trc):
            compute[k].append((t_end - t_start) * 1000)
            queue_ms[k].append((t_start - t_recv) * 1000)
            xfer[k].append((t_recv - prev_send) * 1000)
            nbytes[k + 1].append(b_out)
            prev_send = t_send
        xfer[n_hops].append((info.t_done - prev_send) * 1000)
    lat = [i.latency_ms for i in infos]
    lines = ["", f"edgesplit demo: {cfg.model} split {n_hops} ways over {cfg.workers} worker processes "
                 f"(coordinator {endpoint}; random weights, seed {cfg.seed})", ""]
    lines.append(f"{'stage':<6}{'worker':<8}{'blocks':<26}{'params':>10}  {'compute ms p50':>14}{'p95':>8}"
                 f"  {'queue ms p50':>12}")
    for k, h in enumerate(route.hops):
        blocks = f"{manifest.blocks[h.start].name}..{manifest.blocks[h.end - 1].name} ({h.end - h.start})"
        params = sum(b.n_params for b in manifest.blocks[h.start:h.end])
        lines.append(f"{k:<6}{h.worker:<8}{blocks:<26}{params:>10,}  {percentile(compute[k], .5):>14.2f}"
                     f"{percentile(compute[k], .95):>8.2f}  {percentile(queue_ms[k], .5):>12.2f}")
    lines.append("")
    lines.append(f"{'hop':<20}{'bytes/request':>14}  {'transfer ms p50':>15}{'p95':>8}")
    names = ["client", *route.workers, "client"]
    for k in range(n_hops + 1):
        b = statistics.median(nbytes[k]) if nbytes[k] else 0
        lines.append(f"{names[k] + ' -> ' + names[k + 1]:<20}{human_size(b):>14}  {percentile(xfer[k], .5):>15.2f}"
                     f"{percentile(xfer[k], .95):>8.2f}")
    lines.append("")
    slowest = max((percentile(c, .5) for c in compute), default=float("nan"))
    thr = len(infos) / wall_s if wall_s > 0 else float("nan")
    lines.append(f"requests        {len(infos)} ok, {len(errors)} failed (batch {cfg.batch}, {cfg.in_flight} in flight)")
    lines.append(f"latency         p50 {percentile(lat, .5):.1f} ms   p95 {percentile(lat, .95):.1f} ms   (end to end, at the client)")
    lines.append(f"throughput      {thr:.1f} req/s   (the slowest stage's p50 compute allows {1000 / slowest:.1f} "
                 f"req/s: ratio {thr * slowest / 1000:.2f}; {cfg.workers} workers on {os.cpu_count()} cores)")
    verdict = "OK" if max_diff <= TOLERANCE else "MISMATCH"
    lines.append(f"max |split - unsplit| = {max_diff:.3g}   (tolerance {TOLERANCE:g}: {verdict})")
    for e in errors[:5]:
        lines.append(f"error: {e}")
    return "\n".join(lines)
