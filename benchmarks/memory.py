"""Resident memory of a worker: what the process costs before it holds a single block.

On a Jetson the block cache shares one memory with everything else, so a worker should
cost ``import torch`` plus little (the goal: + 64 MiB) and spend the rest on blocks.
Every figure is the RSS of a real, separate process (psutil, median of a few samples
after it settled), never of this one:

- ``torch``: ``python -c "import torch"``, the floor; ``+ timm`` and ``+ timm ViT module``
  say what a timm skeleton costs (``timm.models.vision_transformer`` runs timm's
  ``__init__``, which imports every model family);
- an idle worker per start path: the ``edgesplit worker`` console script, ``python -m
  edgesplit.runtime worker``, ``LocalCluster`` (what tests, benchmarks and ``demo`` use) and
  ``edgesplit up --model none``;
- a worker hosting one stage of a deployed model (random weights, 2 stages, after one
  request; ``dummy4`` and the class-wise ``fusion`` head need no timm, the timm models do); its row is judged on RSS minus
  the bytes of the blocks it hosts.

    .venv/bin/python benchmarks/memory.py                 # everything (a few minutes on 2 cores)
    .venv/bin/python benchmarks/memory.py --skip-models   # imports and idle workers only

Writes ``benchmarks/out/memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

OUT = Path(__file__).resolve().parent / "out"
MIB = 1024**2
GOAL_MARGIN_MIB = 64.0  # the goal: an idle worker <= torch's import + 64 MiB
READY = "ready"


def rss_mib(pid: int, settle_s: float, samples: int = 3) -> tuple[float, float]:
    """Median RSS and USS (MiB) of ``pid`` over ``samples`` reads, after ``settle_s`` of quiet."""
    time.sleep(settle_s)
    proc = psutil.Process(pid)
    rss, uss = [], []
    for _ in range(samples):
        info = proc.memory_full_info()
        rss.append(info.rss / MIB)
        uss.append(info.uss / MIB)
        time.sleep(0.2)
    return statistics.median(rss), statistics.median(uss)


def import_rss(statement: str, settle_s: float) -> tuple[float, float]:
    """RSS of a fresh interpreter that ran ``statement`` and then waits."""
    code = f"{statement}\nimport sys\nprint({READY!r}, flush=True)\nsys.stdin.read()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if p.stdout.readline().strip() != READY:
            raise RuntimeError(f"{statement!r} failed (exit {p.wait()})")
        return rss_mib(p.pid, settle_s)
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def wait_registered(endpoint: str, names: list[str], procs: list[subprocess.Popen], timeout_s: float = 120) -> None:
    """Until the coordinator at ``endpoint`` lists every worker in ``names``."""
    from edgesplit.runtime import Client, ClientConfig, RuntimeFailure

    deadline = time.monotonic() + timeout_s
    with Client(ClientConfig(coordinator=endpoint, control_timeout_ms=2000)) as cl:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a daemon exited during start-up: {[p.args for p in procs if p.poll() is not None]}")
            try:
                if set(names) <= {w.name for w in cl.workers()}:
                    return
            except RuntimeFailure:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"workers {names} did not register at {endpoint} within {timeout_s:.0f} s")


def stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, sig)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def daemon_rss(launcher: list[str], settle_s: float) -> tuple[float, float]:
    """An idle worker started by ``launcher + ["worker", ...]`` next to a coordinator started the same way."""
    from edgesplit.runtime.cluster import stable_port

    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-mem-"))
    c_port = stable_port()
    w_port = stable_port(taken={c_port})
    endpoint = f"tcp://127.0.0.1:{c_port}"
    kw: dict[str, Any] = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    procs = [subprocess.Popen([*launcher, "coordinator", "--bind", endpoint, "--store", str(tmp / "c")], **kw)]
    try:
        procs.append(subprocess.Popen([*launcher, "worker", "--coordinator", endpoint, "--bind",
                                       f"tcp://127.0.0.1:{w_port}", "--store", str(tmp / "w1"), "--name", "w1"], **kw))
        wait_registered(endpoint, ["w1"], procs)
        return rss_mib(procs[1].pid, settle_s)
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def up_rss(settle_s: float, model: str | None = "none") -> tuple[float, float]:
    """A worker of ``edgesplit up --workers 2 --model MODEL`` (None: up's default; the larger RSS of the two)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-mem-"))
    p = subprocess.Popen([str(console_script()), "up", "--workers", "2", *(["--model", model] if model else []),
                          "--port", "0", "--log-dir", str(tmp), "--store", str(tmp / "store")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if "stops everything" in line:
                break
        else:
            raise RuntimeError("edgesplit up did not start:\n" + "".join(lines))
        workers = [c.pid for c in psutil.Process(p.pid).children(recursive=True) if " worker " in " ".join(c.cmdline())]
        if len(workers) != 2:
            raise RuntimeError(f"expected 2 worker processes under edgesplit up, found {workers}")
        return max((rss_mib(pid, settle_s) for pid in workers), key=lambda r: r[0])
    finally:
        p.send_signal(signal.SIGTERM)  # what up always takes (SIGINT is ignored when this runs in the background)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def cluster_rss(settle_s: float) -> tuple[float, float]:
    """An idle worker of ``LocalCluster`` (2 workers; the larger RSS)."""
    from edgesplit.runtime import LocalCluster, LocalClusterConfig

    tmp = tempfile.mkdtemp(prefix="edgesplit-mem-")
    try:
        with LocalCluster(LocalClusterConfig(workers=2, port=0), store=tmp) as lc:
            return max((rss_mib(lc.pid(n), settle_s) for n in lc.names), key=lambda r: r[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def partition_into(store: Any, arch: str) -> Any:
    """Partition ``arch`` (random weights) into ``store``; "dummyN" is N Shift blocks and needs no timm."""
    from edgesplit.partitioner import partition, timm_recipe
    from edgesplit.runtime.dummy import build_dummy, dummy_recipe

    if arch == "fusion":  # a class-wise fusion head (builder in partitioner.classwise)
        from edgesplit.partitioner.classwise import build_fusion, fusion_recipe

        dims, hidden, classes = [192, 192], 64, 10
        return partition(build_fusion(dims, hidden, classes), arch, fusion_recipe(dims, hidden, classes, 0.0), store,
                         input_shape=[sum(dims)], profile=False)
    if arch.startswith("dummy"):
        n = int(arch[len("dummy"):] or 4)
        return partition(build_dummy(n), arch, dummy_recipe(n), store, input_shape=[4], profile=False)
    import timm

    return partition(timm.create_model(arch, pretrained=False).eval(), arch, timm_recipe(arch), store)


def hosting_rss(arch: str, settle_s: float) -> list[dict[str, Any]]:
    """Per stage of ``arch`` deployed on 2 workers (1 for a one-block model) (after one request): RSS, USS and hosted block bytes."""
    import torch

    from edgesplit.partitioner import BlockStore
    from edgesplit.runtime import LocalCluster, LocalClusterConfig

    tmp = tempfile.mkdtemp(prefix="edgesplit-mem-")
    try:
        manifest = partition_into(BlockStore(tmp), arch)
        with LocalCluster(LocalClusterConfig(workers=2, port=0), store=tmp) as lc:
            cl = lc.client()
            route = cl.deploy(arch, n_stages=min(2, manifest.n_blocks))
            cl.infer(arch, torch.randn(1, *manifest.input_shape))
            rows = []
            for hop in route.hops:
                rss, uss = rss_mib(lc.pid(hop.worker), settle_s)
                blocks = sum(b.size_bytes for b in manifest.blocks[hop.start:hop.end]) / MIB
                rows.append({"row": f"worker hosting {arch} stage {hop.hop} (blocks {hop.start}-{hop.end - 1})",
                             "rss_mib": rss, "uss_mib": uss, "blocks_mib": blocks})
            return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def console_script() -> Path:
    script = Path(sys.executable).parent / "edgesplit"
    if not script.exists():
        raise RuntimeError(f"no edgesplit console script next to {sys.executable}; pip install -e . first")
    return script


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    s = args.settle_s
    rows: list[dict[str, Any]] = []

    def add(name: str, fn: Callable[[], tuple[float, float]], judged: bool = True) -> None:
        print(f"measuring: {name} ...", file=sys.stderr, flush=True)
        rss, uss = fn()
        rows.append({"row": name, "rss_mib": rss, "uss_mib": uss, "blocks_mib": 0.0, "judged": judged})

    add("import torch", lambda: import_rss("import torch", s), judged=False)
    add("import torch, timm", lambda: import_rss("import torch, timm", s), judged=False)
    add("import timm.models.vision_transformer", lambda: import_rss("import timm.models.vision_transformer", s),
        judged=False)
    add("import edgesplit.runtime.worker", lambda: import_rss("import edgesplit.runtime.worker", s))
    add("idle worker: edgesplit worker", lambda: daemon_rss([str(console_script())], s))
    add("idle worker: python -m edgesplit.runtime", lambda: daemon_rss([sys.executable, "-m", "edgesplit.runtime"], s))
    add("idle worker: LocalCluster", lambda: cluster_rss(s))
    add("idle worker: edgesplit up --model none", lambda: up_rss(s))
    if not args.skip_models:  # up deploys vit_tiny_patch16_224 unless told otherwise: its workers host timm
        add("worker of edgesplit up (default --model)", lambda: up_rss(s, None), judged=False)
    if not args.skip_models:
        for arch in args.models:
            print(f"measuring: workers hosting {arch} ...", file=sys.stderr, flush=True)
            rows.extend({**r, "judged": True} for r in hosting_rss(arch, s))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dummy4", "fusion", "vit_tiny_patch16_224", "resnet18"],
                        help="models to deploy in 2 stages, one row per stage: timm names, dummyN (no timm) "
                             "or fusion (a class-wise fusion head, one block)")
    parser.add_argument("--skip-models", action="store_true", help="only imports and idle workers")
    parser.add_argument("--settle-s", type=float, default=2.0, help="quiet time before reading a process's RSS")
    parser.add_argument("--out", type=Path, default=OUT / "memory.json", help="where the JSON goes")
    args = parser.parse_args()
    print(f"config: models={args.models if not args.skip_models else []} settle_s={args.settle_s} "
          f"python={sys.executable}", flush=True)

    rows = measure(args)
    torch_mib = rows[0]["rss_mib"]
    goal = torch_mib + GOAL_MARGIN_MIB
    print(f"\n{'process':<62} {'RSS MiB':>8} {'USS MiB':>8} {'blocks':>7} {'- torch':>8}  goal")
    for r in rows:
        own = r["rss_mib"] - r["blocks_mib"]
        r["over_torch_mib"] = own - torch_mib
        r["pass"] = (own <= goal) if r["judged"] else None
        verdict = {True: "pass", False: "FAIL", None: "-"}[r["pass"]]
        print(f"{r['row']:<62} {r['rss_mib']:>8.0f} {r['uss_mib']:>8.0f} {r['blocks_mib']:>7.0f} "
              f"{r['over_torch_mib']:>+8.0f}  {verdict}")
    print(f"goal: RSS - hosted blocks <= import torch + {GOAL_MARGIN_MIB:.0f} MiB = {goal:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {"models": [] if args.skip_models else args.models,
                                               "settle_s": args.settle_s},
                                    "torch_mib": torch_mib, "goal_mib": goal, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
