"""Block profiles measured on this worker's own device: what the planner weighs boards by.

Times come from this board, not from the machine that partitioned the model, and are
taken the way compute runs: warm, repeated, block after block, the median kept, scaled by
the worker's slowdown setting. Each block is timed twice: right after the block before it
(``block_ms``), and after the worker sat idle (``first_ms``), as a stage's first block runs
once its input arrives. Idle caches go cold: on a 2-core VM a vit_tiny block took 20-45 %
more CPU after an idle gap of 1-30 ms than right after its predecessor (and a slowed worker
sleeps after every pass, so its stages always start cold); the planner charges a stage its
first block's ``first_ms``. Weights are random (timing does not depend on their
values), so a board profiles a model before holding any of its blocks.
Profiles are cached in the worker's store per model structure, device, threads, slowdown,
batch and torch version: asking again is free.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from edgesplit.partitioner import ModelManifest

from .stage import stage_skeleton

log = logging.getLogger("edgesplit.worker.profile")

IDLE_S = 0.010  # how long the worker sits idle before timing a block as a stage's first
PROFILE_FORMAT = 2  # in the cache key: profiles of an older format are taken again


class BlockTimes(NamedTuple):
    """Median ms per block: right after the block before it, and as a stage's first (after an idle wait)."""

    block_ms: list[float]
    first_ms: list[float]


def slowed(forward: Callable[[], torch.Tensor], slowdown: float, device: torch.device) -> torch.Tensor:
    """Run ``forward``; with ``slowdown`` > 1, then sleep (slowdown - 1) times the CPU time it took.

    Emulates a board ``slowdown`` times slower than this one without using more CPU (tests,
    benchmarks). The CPU time of this thread, not the wall time, is scaled: time spent waiting
    for a core or the GIL while other processes run is added once, as on a real slower board,
    not multiplied. Meant for one torch thread (``--torch-threads 1``): the CPU time of other
    intra-op threads is not counted. On CUDA the wall time is scaled (the GPU's is not this thread's).
    """
    if slowdown <= 1.0:
        return forward()
    t0, c0 = time.perf_counter(), time.thread_time()
    y = forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        busy = time.perf_counter() - t0
    else:
        busy = time.thread_time() - c0
    time.sleep((slowdown - 1.0) * busy)
    return y


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu:{platform.machine()}:{platform.processor() or '?'}"


def profile_key(manifest: ModelManifest, device: torch.device, batch: int, slowdown: float) -> str:
    """The cache key: everything a block's time depends on (structure, not weights)."""
    parts = {"recipe": manifest.recipe, "blocks": [[b.name, b.n_params, b.out_shape] for b in manifest.blocks],
             "input": list(manifest.input_shape), "device": _device_name(device), "threads": torch.get_num_threads(),
             "slowdown": slowdown, "batch": batch, "torch": torch.__version__, "format": PROFILE_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _randomise(block: nn.Module, device: torch.device) -> nn.Module:
    """Give a skeleton block random state of the right shapes (running variances 1, integers 0)."""
    state = {}
    for name, t in block.state_dict().items():
        if not t.is_floating_point():
            state[name] = torch.zeros(t.shape, dtype=t.dtype, device=device)
        elif name.endswith("running_var"):
            state[name] = torch.ones(t.shape, dtype=t.dtype, device=device)
        else:
            state[name] = (torch.randn(t.shape, device=device) * 0.02).to(t.dtype)
    block.load_state_dict(state, assign=True)
    return block.eval()


def _chunks(manifest: ModelManifest, budget_bytes: int) -> list[range]:
    """Runs of consecutive blocks whose weights fit ``budget_bytes`` together (a block alone, if it does not)."""
    out, start, held = [], 0, 0
    for i, b in enumerate(manifest.blocks):
        if i > start and budget_bytes > 0 and held + b.size_bytes > budget_bytes:
            out.append(range(start, i))
            start, held = i, 0
        held += b.size_bytes
    out.append(range(start, manifest.n_blocks))
    return out


@torch.inference_mode()
def time_blocks(manifest: ModelManifest, device: torch.device, batch: int = 1, reps: int = 10,
                slowdown: float = 1.0, warmup: int = 2, budget_bytes: int = 0) -> BlockTimes:
    """Median forward ms of every block of ``manifest`` for one batch of ``batch`` on ``device``.

    Each run passes the input through the blocks in order, as a pipeline stage does, and
    times each block within the pass: a block timed over and over on its own finds its
    weights in the CPU's caches, which a stage running block after block does not (on a
    2-core x86, a 14-block ViT's isolated block times summed to 15 % under its full pass).
    Then each block runs ``reps`` times more on the same input, each after ``IDLE_S`` idle:
    its time as a stage's first. Blocks are held a run at a time, as many as ``budget_bytes`` of weights
    allow (the worker's memory budget; 0 = the whole model), with random weights, freed after.
    """
    x_in = torch.randn(batch, *manifest.input_shape, device=device)
    extra = max(0.0, slowdown - 1.0)

    def timed(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        y = block(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        busy = wall if device.type == "cuda" else time.thread_time() - c0
        return y, 1000 * (wall + extra * busy)  # what :func:`slowed` makes of it, without its sleep (a wake-up
        # per block would make every block a first block)

    after: list[float] = []
    first: list[float] = []
    for span in _chunks(manifest, budget_bytes):
        blocks = [_randomise(stage_skeleton(manifest, i, i + 1, device), device) for i in span]
        times: list[list[float]] = [[] for _ in blocks]
        cold: list[list[float]] = [[] for _ in blocks]
        for run in range(warmup + max(1, reps)):
            xs = [x_in]
            for i, block in enumerate(blocks):
                x, ms = timed(block, xs[-1])
                xs.append(x)
                if run >= warmup:
                    times[i].append(ms)
        for run in range(max(1, reps)):  # after the passes, so that no pass starts from an idle wait
            for i, block in enumerate(blocks):
                time.sleep(IDLE_S)
                x = xs[i].clone()  # its input just written, as one just received is; its weights idle
                cold[i].append(timed(block, x)[1])
        after += [statistics.median_high(t) for t in times]
        first += [statistics.median_high(t) for t in cold]
        x_in = xs[-1]  # the next run of blocks starts from this one's output
        del blocks, xs
    return BlockTimes(after, first)


def profile(manifest: ModelManifest, device: torch.device, store_root: str | Path, batches: list[int],
            reps: int = 10, slowdown: float = 1.0, refresh: bool = False,
            budget_bytes: int = 0) -> dict[int, BlockTimes]:
    """Per batch size, the block times of ``manifest`` here (read from the cache unless ``refresh``)."""
    folder = Path(store_root) / "profiles"
    out = {}
    for batch in batches:
        path = folder / f"{profile_key(manifest, device, batch, slowdown)}.json"
        if not refresh:
            try:
                cached = json.loads(path.read_text())
                times = BlockTimes([float(v) for v in cached["block_ms"]], [float(v) for v in cached["first_ms"]])
                if all(len(t) == manifest.n_blocks and all(math.isfinite(v) and v >= 0 for v in t) for t in times):
                    out[batch] = times
                    continue
            except (OSError, ValueError, TypeError, KeyError):
                pass
        t0 = time.monotonic()
        out[batch] = time_blocks(manifest, device, batch, reps, slowdown, budget_bytes=budget_bytes)
        log.info("profiled %s at batch %d on %s: %.1f ms over %d blocks, %.1f ms as first blocks (took %.1f s)",
                 manifest.name, batch, device, sum(out[batch].block_ms), manifest.n_blocks,
                 sum(out[batch].first_ms), time.monotonic() - t0)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(out[batch]._asdict()))
            tmp.replace(path)
        except OSError as e:
            log.warning("could not cache the profile in %s: %s", folder, e)
    return out
