"""Class-wise split (ED-ViT / EC-SNN) on scikit-learn's digits: full model vs fused sub-models.

Trains a small timm ViT and a small timm ResNet on digits (8x8 upsampled to 32x32) from
random init, splits each class-wise into N = 2, 3, 5 pruned sub-models plus a fusion MLP,
and reports held-out accuracy, sub-model sizes (parameters, stored block bytes) and
per-sample forward times (one thread, warm-up then median) against the full model.

    .venv/bin/python benchmarks/classwise.py             # full run (about 10 min on 2 cores)
    .venv/bin/python benchmarks/classwise.py --quick     # smoke run (about 2 min)
    .venv/bin/python benchmarks/classwise.py --arch vit --groups 5

Writes ``benchmarks/out/classwise.json`` and ``benchmarks/out/classwise.png``.
The single-process columns time each sub-model alone, as it would run on its own device.
Then (skip with ``--no-cluster``) one loopback cluster of max(N) + 1 worker processes (one
torch thread each) serves every package through ``ClasswiseRunner`` (sub-models on w0..wN-1,
fusion on wN) and the full model as a 1-stage deployment on the last worker; single-sample
requests go one at a time, package and full model in turns, and the table gets per-device
compute (worker traces) and end-to-end p50/p95 at the client. On a 2-core machine the N + 1
worker processes share two cores, so the "parallel" sub-models partly run one after another.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from edgesplit.partitioner import BlockStore, partition, timm_recipe
from edgesplit.partitioner.classwise import (ClasswiseConfig, TrainConfig, classwise_predict, predict,
                                             split_classwise, train_classifier)
from edgesplit.partitioner.prune_resnet import ResNetPruneConfig
from edgesplit.partitioner.prune_vit import ViTPruneConfig
from edgesplit.runtime import LocalCluster, LocalClusterConfig
from edgesplit.runtime.classwise import ClasswiseRunner

OUT = Path(__file__).resolve().parent / "out"
IMG = 32
SEED = 0

# Full models. The ViT uses 8x8 patches (16 tokens): with 4x4 patches (64 tokens) training
# from scratch on 2 CPU cores takes ~4x longer than this benchmark's budget.
VIT = timm_recipe("vit_tiny_patch16_224", img_size=IMG, patch_size=8, in_chans=1, num_classes=10,
                  embed_dim=128, depth=6, num_heads=4)
RESNET = timm_recipe("resnet18", in_chans=1, num_classes=10, layers=[2, 2, 2, 2], channels=[32, 64, 128, 256])
FULL_TRAIN = {"vit": TrainConfig(epochs=40, lr=1e-3, shift_px=3), "resnet": TrainConfig(epochs=20, lr=2e-3, shift_px=3)}
CLASSWISE = {
    "vit": ClasswiseConfig(vit=ViTPruneConfig(head_keep=0.5, mlp_keep=0.25, embed_keep=0.5, depth_keep=1 / 3),
                           retrain=TrainConfig(epochs=30, lr=1e-3, shift_px=3), fusion_views=3),
    "resnet": ClasswiseConfig(resnet=ResNetPruneConfig(channel_keep=0.375, inner_keep=0.375, depth_keep=0.5),
                              retrain=TrainConfig(epochs=15, lr=2e-3, shift_px=3), fusion_views=3),
}
# More groups, fewer classes each: prune harder. At N = 5 the ResNet keeps a quarter of the
# channels, since its batch-1 time at 0.375 (about 3x below the full model's) is mostly fixed
# per-op cost; a quarter measured about 3.9x with the same accuracy target met.
CLASSWISE_AT = {("resnet", 5): replace(CLASSWISE["resnet"], resnet=ResNetPruneConfig(
    channel_keep=0.25, inner_keep=0.25, depth_keep=0.5))}


def classwise_config(arch: str, n_groups: int) -> ClasswiseConfig:
    return CLASSWISE_AT.get((arch, n_groups), CLASSWISE[arch])


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits upsampled to 32x32 in [-1, 1]; fixed stratified 75/25 split."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False) * 2 - 1  # (1797, 1, 32, 32)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(list(range(len(y))), test_size=0.25, random_state=SEED, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


@torch.no_grad()
def interleaved_ms(models: list[nn.Module], inputs: list[torch.Tensor], reps: int) -> tuple[list[float], list[float]]:
    """(median, minimum) forward time in ms of each ``models[i](inputs[i])``, one thread, after warm-up.

    The models take turns within every repetition, so load from other processes on a shared
    machine hits them alike. The minimum is printed beside the median because preemption
    hits a long forward more often than a short one, which inflates a loaded median ratio.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m, x in zip(models, inputs):
            m.eval()
            for _ in range(max(3, reps // 10)):
                m(x)
        times: list[list[float]] = [[] for _ in models]
        for _ in range(reps):
            for i, (m, x) in enumerate(zip(models, inputs)):
                t0 = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return [1e3 * sorted(t)[len(t) // 2] for t in times], [1e3 * min(t) for t in times]


def per_sample_ms(models: list[nn.Module], shapes: list[list[int]],
                  reps: int) -> tuple[list[float], list[float], list[float]]:
    """Per model: batch-1 median latency, batch-1 minimum, per-sample median at batch 64 (ms)."""
    one, one_min = interleaved_ms(models, [torch.randn(1, *s) for s in shapes], reps)
    many, _ = interleaved_ms(models, [torch.randn(64, *s) for s in shapes], max(5, reps // 10))
    return one, one_min, [t / 64 for t in many]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


@dataclass
class Row:
    arch: str
    n_groups: int  # 1 = the full model
    acc: float
    params_max: int
    bytes_max: int
    bytes_total: int
    reduction: float  # full bytes / largest sub-model bytes
    ms_b1_max: float  # batch-1 latency of the slowest sub-model (full model for n_groups=1)
    ms_b64_max: float  # per-sample time at batch 64, slowest sub-model
    ms_fusion_b1: float
    ms_full_b1: float  # the full model's batch-1 latency timed in turns with this row's sub-models
    speedup_b1: float  # full / slowest sub-model, batch 1 (medians)
    speedup_b1_min: float  # the same from the minimum times
    speedup_b64: float
    params_each: list[int]
    ms_b1_each: list[float]
    build_s: float
    # loopback cluster (None with --no-cluster); single-sample requests, one at a time
    cl_p50_ms: float | None = None  # end to end at the client: this package (n_groups=1: the full model)
    cl_p95_ms: float | None = None
    cl_full_p50_ms: float | None = None  # the full model's end to end, timed in turns with this package
    cl_full_p95_ms: float | None = None
    cl_speedup_p50: float | None = None  # cl_full_p50_ms / cl_p50_ms
    cl_dev_ms_max: float | None = None  # slowest device's compute p50 (worker trace t_end - t_start)
    cl_dev_ms_each: list[float] | None = None  # compute p50 per sub-model, descriptor order
    cl_fusion_ms: float | None = None  # the fusion worker's compute p50
    cl_acc: float | None = None  # accuracy of the cluster's answers on the timed held-out digits
    cl_max_diff: float | None = None  # max |cluster logits - classwise_predict| (packages only)


def run_arch(arch: str, groups_list: list[int], data, store: BlockStore, args) -> list[Row]:
    xtr, ytr, xte, yte = data
    recipe = VIT if arch == "vit" else RESNET
    train_cfg = FULL_TRAIN[arch]
    if args.quick:
        train_cfg = replace(train_cfg, epochs=max(3, train_cfg.epochs // 5))
    shape = list(xtr.shape[1:])
    torch.manual_seed(SEED)
    t0 = time.time()
    full = timm.create_model(recipe["arch"], pretrained=False, **recipe["kwargs"])
    train_classifier(full, lambda g: (xtr, ytr), train_cfg)
    train_s = time.time() - t0
    full_acc = accuracy(predict(full, xte), yte)
    man = partition(full, f"{arch}-full", recipe, store, input_shape=shape)
    (full_b1,), _, (full_b64,) = per_sample_ms([full], [shape], args.reps)
    rows = [Row(arch, 1, full_acc, n_params(full), man.size_bytes, man.size_bytes, 1.0, full_b1, full_b64, 0.0,
                full_b1, 1.0, 1.0, 1.0, [n_params(full)], [full_b1], train_s)]
    print(f"[{arch}] full: acc {full_acc:.2f}%  params {n_params(full)}  trained in {train_s:.0f}s", flush=True)
    for n in groups_list:
        cw = classwise_config(arch, n)
        if args.quick:
            cw = replace(cw, retrain=replace(cw.retrain, epochs=max(2, cw.retrain.epochs // 5)),
                         fusion=replace(cw.fusion, epochs=20), fusion_views=1)
        t0 = time.time()
        pkg = split_classwise(full, recipe, f"{arch}-cw{n}", store, xtr, ytr, n_groups=n, config=cw)
        build_s = time.time() - t0
        fused_acc = accuracy(classwise_predict(store, f"{arch}-cw{n}", xte), yte)  # rebuilt from the store
        sizes = [pkg.manifests[s].size_bytes for s in pkg.descriptor.submodels]
        params = [n_params(m) for m in pkg.submodels]
        # full model, sub-models and fusion timed in turns (same machine, same thread, same moment)
        models = [full, *pkg.submodels, pkg.fusion]
        shapes = [shape] * (n + 1) + [[sum(pkg.descriptor.feature_dims)]]
        one, one_min, many = per_sample_ms(models, shapes, args.reps)
        b1, b64 = max(one[1:-1]), max(many[1:-1])
        row = Row(arch, n, fused_acc, max(params), max(sizes), sum(sizes), man.size_bytes / max(sizes), b1, b64,
                  one[-1], one[0], one[0] / b1, one_min[0] / max(one_min[1:-1]), many[0] / b64, params, one[1:-1],
                  build_s)
        rows.append(row)
        print(f"[{arch}] N={n}: fused acc {fused_acc:.2f}% (full {full_acc:.2f}%)  largest {max(params)} params, "
              f"{row.reduction:.1f}x smaller  batch-1 {b1:.3f} ms ({row.speedup_b1:.2f}x, "
              f"min {row.speedup_b1_min:.2f}x)  batch-64 {b64:.4f} ms/sample ({row.speedup_b64:.2f}x)  "
              f"built in {build_s:.0f}s", flush=True)
    return rows


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def compute_ms(trace: list[list]) -> float:
    """Compute time in ms of a 1-stage request: t_end - t_start of its single trace record."""
    _, _, _, t_start, t_end, _, _ = trace[0]
    return (t_end - t_start) * 1000


def cluster_latency(rows: list[Row], store: BlockStore, x: torch.Tensor, y: torch.Tensor, args) -> None:
    """Fill the ``cl_*`` fields of ``rows``: every package and full model on one loopback cluster.

    Requests carry one held-out digit each and go one at a time (latency, not throughput);
    a package request and a full-model request alternate, so load from other processes on a
    shared machine hits both alike. The full model's N=1 row pools its requests of every turn.

    Args:
        rows: ``run_arch`` rows; packages are ``{arch}-cw{N}``, full models ``{arch}-full`` in ``store``.
        store: the block store the packages were built in (the coordinator serves it).
        x: (n, 1, 32, 32) held-out inputs, one per timed request (cycled); y: their labels.
    """
    groups = sorted({r.n_groups for r in rows if r.n_groups > 1})
    n_workers = (max(groups) if groups else 1) + 1
    reps, warm = args.cluster_reps, max(5, args.cluster_reps // 10)
    xs = [x[i % x.shape[0]:i % x.shape[0] + 1] for i in range(reps)]  # each (1, 1, 32, 32)
    ys = torch.stack([y[i % y.shape[0]] for i in range(reps)])
    t0 = time.time()
    cfg = LocalClusterConfig(workers=n_workers, port=0, torch_threads=1)
    with tempfile.TemporaryDirectory() as work, LocalCluster(cfg, store=store.root, workdir=work) as lc:
        cl = lc.client(timeout_ms=60_000)
        print(f"[cluster] {n_workers} workers registered in {time.time() - t0:.1f}s", flush=True)
        full_worker = lc.names[-1]
        for arch in dict.fromkeys(r.arch for r in rows):
            full_name = f"{arch}-full"
            cl.deploy(full_name, stages=[(full_worker, 0, store.manifest(full_name).n_blocks)])
            full_lat: list[float] = []
            full_dev: list[float] = []
            full_out: list[torch.Tensor] = []
            for row in (r for r in rows if r.arch == arch and r.n_groups > 1):
                pkg = f"{arch}-cw{row.n_groups}"
                with ClasswiseRunner(cl, store, pkg, timeout_ms=60_000) as runner:
                    placement = runner.deploy()
                    for i in range(warm):
                        runner.infer(xs[i])
                        cl.infer(full_name, xs[i])
                    lat, flat, dev, fus, outs = [], [], [], [], []
                    for xi in xs:
                        t = time.perf_counter()
                        fut = runner.submit(xi, trace=True)
                        outs.append(fut.result())
                        lat.append(1e3 * (time.perf_counter() - t))
                        dev.append([compute_ms(s.trace) for s in fut.info.submodels])
                        fus.append(compute_ms(fut.info.fusion.trace))
                        t = time.perf_counter()
                        ffut = cl.submit(full_name, xi, trace=True)
                        full_out.append(ffut.result())
                        flat.append(1e3 * (time.perf_counter() - t))
                        full_dev.append(compute_ms(ffut.info.trace))
                got = torch.cat(outs)  # (reps, 10)
                ref = classwise_predict(store, pkg, torch.cat(xs))
                each = [statistics.median(d[k] for d in dev) for k in range(row.n_groups)]
                row.cl_p50_ms, row.cl_p95_ms = pct(lat, 0.5), pct(lat, 0.95)
                row.cl_full_p50_ms, row.cl_full_p95_ms = pct(flat, 0.5), pct(flat, 0.95)
                row.cl_speedup_p50 = row.cl_full_p50_ms / row.cl_p50_ms
                row.cl_dev_ms_each, row.cl_dev_ms_max = each, max(each)
                row.cl_fusion_ms = statistics.median(fus)
                row.cl_acc = accuracy(got, ys)
                row.cl_max_diff = float((got - ref).abs().max())
                full_lat += flat
                print(f"[cluster] {pkg} on {','.join(placement.submodels)} + fusion on {placement.fusion}: "
                      f"p50 {row.cl_p50_ms:.2f} ms p95 {row.cl_p95_ms:.2f} ms (full {row.cl_full_p50_ms:.2f} / "
                      f"{row.cl_full_p95_ms:.2f} ms)  devices {', '.join(f'{m:.2f}' for m in each)} ms  fusion "
                      f"{row.cl_fusion_ms:.2f} ms  acc {row.cl_acc:.1f}%  |diff| {row.cl_max_diff:.2g}", flush=True)
            full_row = next(r for r in rows if r.arch == arch and r.n_groups == 1)
            if not full_lat:  # no packages of this arch: time the full model alone
                for i in range(warm):
                    cl.infer(full_name, xs[i])
                for xi in xs:
                    t = time.perf_counter()
                    ffut = cl.submit(full_name, xi, trace=True)
                    full_out.append(ffut.result())
                    full_lat.append(1e3 * (time.perf_counter() - t))
                    full_dev.append(compute_ms(ffut.info.trace))
            full_row.cl_p50_ms, full_row.cl_p95_ms = pct(full_lat, 0.5), pct(full_lat, 0.95)
            full_row.cl_full_p50_ms, full_row.cl_full_p95_ms = full_row.cl_p50_ms, full_row.cl_p95_ms
            full_row.cl_speedup_p50 = 1.0
            full_row.cl_dev_ms_max = statistics.median(full_dev)
            full_row.cl_dev_ms_each = [full_row.cl_dev_ms_max]
            full_row.cl_acc = accuracy(torch.cat(full_out), ys.repeat(len(full_out) // reps))
            print(f"[cluster] {full_name} on {full_worker} ({len(full_lat)} requests): p50 {full_row.cl_p50_ms:.2f} ms "
                  f"p95 {full_row.cl_p95_ms:.2f} ms  device {full_row.cl_dev_ms_max:.2f} ms", flush=True)
    print(f"[cluster] stage took {time.time() - t0:.0f}s", flush=True)


def _f(v: float | None, width: int, prec: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{prec}f}"


def table(rows: list[Row]) -> str:
    head = (f"{'arch':6} {'N':>2} {'acc %':>6} {'dAcc':>6} {'params(max)':>11} {'KiB(max)':>9} {'KiB(sum)':>9} "
            f"{'size x':>6} {'b1 ms':>7} {'full b1':>7} {'b1 x':>5} {'(min)':>5} {'b64 ms':>7} {'b64 x':>6} "
            f"{'fusion ms':>9} | {'cl p50':>7} {'cl p95':>7} {'full p50':>8} {'full p95':>8} {'cl x':>5} "
            f"{'dev ms':>7} {'fus ms':>6}")
    lines = [head, "-" * len(head)]
    full = {r.arch: r for r in rows if r.n_groups == 1}
    for r in rows:
        d = r.acc - full[r.arch].acc
        lines.append(f"{r.arch:6} {r.n_groups:>2} {r.acc:6.2f} {d:+6.2f} {r.params_max:>11} "
                     f"{r.bytes_max / 1024:9.1f} {r.bytes_total / 1024:9.1f} {r.reduction:6.2f} "
                     f"{r.ms_b1_max:7.3f} {r.ms_full_b1:7.3f} {r.speedup_b1:5.2f} {r.speedup_b1_min:5.2f} "
                     f"{r.ms_b64_max:7.4f} {r.speedup_b64:6.2f} {r.ms_fusion_b1:9.3f} | "
                     f"{_f(r.cl_p50_ms, 7, 2)} {_f(r.cl_p95_ms, 7, 2)} {_f(r.cl_full_p50_ms, 8, 2)} "
                     f"{_f(r.cl_full_p95_ms, 8, 2)} {_f(r.cl_speedup_p50, 5, 2)} {_f(r.cl_dev_ms_max, 7, 2)} "
                     f"{_f(r.cl_fusion_ms, 6, 2)}")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cluster = any(r.cl_p50_ms is not None for r in rows)
    fig, axes = plt.subplots(1, 4 if cluster else 3, figsize=(17.5 if cluster else 13, 3.8))
    for arch, marker, color in (("vit", "o", "tab:blue"), ("resnet", "s", "tab:orange")):
        rs = sorted((r for r in rows if r.arch == arch), key=lambda r: r.n_groups)
        if not rs:
            continue
        n = [r.n_groups for r in rs]
        axes[0].plot(n, [r.acc for r in rs], marker=marker, color=color, label=arch)
        axes[1].plot(n, [r.reduction for r in rs], marker=marker, color=color, label=arch)
        axes[2].plot(n, [r.speedup_b1 for r in rs], marker=marker, color=color, label=f"{arch} batch 1")
        axes[2].plot(n, [r.speedup_b64 for r in rs], marker=marker, color=color, ls="--", label=f"{arch} batch 64")
        cw = [r for r in rs if r.n_groups > 1 and r.cl_p50_ms is not None]
        if cluster and cw:
            nc = [r.n_groups for r in cw]
            axes[3].errorbar(nc, [r.cl_p50_ms for r in cw], yerr=[[0] * len(cw), [r.cl_p95_ms - r.cl_p50_ms for r in cw]],
                             marker=marker, color=color, capsize=3, label=f"{arch} package p50 (bar: p95)")
            axes[3].plot(nc, [r.cl_dev_ms_max for r in cw], marker=marker, color=color, ls=":", mfc="none",
                         label=f"{arch} slowest device compute")
            full = next(r for r in rs if r.n_groups == 1)
            axes[3].axhline(full.cl_p50_ms, color=color, ls="--", label=f"{arch} full model p50 (1 worker)")
    axes[0].set(title="held-out accuracy (N=1: full model)", xlabel="groups N", ylabel="%")
    axes[1].set(title="full / largest sub-model (bytes)", xlabel="groups N", ylabel="x")
    axes[2].set(title="full / slowest sub-model (time per sample)", xlabel="groups N", ylabel="x")
    if cluster:
        axes[3].set(title="loopback cluster, end to end (1 sample)", xlabel="groups N", ylabel="ms")
        axes[3].set_ylim(bottom=0)
        axes[3].set_xticks(sorted({r.n_groups for r in rows if r.n_groups > 1}))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few epochs: checks the pipeline, not the figures")
    p.add_argument("--arch", choices=["vit", "resnet", "both"], default="both")
    p.add_argument("--groups", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--threads", type=int, default=2, help="torch threads for training (timing always uses 1)")
    p.add_argument("--reps", type=int, default=200, help="timed batch-1 forwards per model")
    p.add_argument("--store", type=str, default=None, help="block store directory (default: a temporary one)")
    p.add_argument("--no-cluster", action="store_true", help="skip the loopback-cluster latency stage")
    p.add_argument("--cluster-reps", type=int, default=None,
                   help="timed single-sample requests per package on the cluster (default 100, --quick 30)")
    args = p.parse_args()
    if args.cluster_reps is None:
        args.cluster_reps = 30 if args.quick else 100
    if args.cluster_reps < 1:
        p.error(f"--cluster-reps must be at least 1, got {args.cluster_reps}")
    torch.set_num_threads(args.threads)
    print(f"config: quick={args.quick} groups={args.groups} threads={args.threads} reps={args.reps} "
          f"cluster={not args.no_cluster} cluster_reps={args.cluster_reps}")
    print(f"  vit {VIT}\n  resnet {RESNET}")
    for a in ("vit", "resnet"):
        print(f"  {a} full train {FULL_TRAIN[a]}\n  {a} class-wise {CLASSWISE[a]}" + "".join(
            f"\n  {a} N={n}: {c.resnet if a == 'resnet' else c.vit}" for (b, n), c in CLASSWISE_AT.items() if b == a))
    data = digits()
    archs = ["vit", "resnet"] if args.arch == "both" else [args.arch]
    with tempfile.TemporaryDirectory() as tmp:
        store = BlockStore(args.store or tmp)
        rows = [r for a in archs for r in run_arch(a, args.groups, data, store, args)]
        if not args.no_cluster:
            cluster_latency(rows, store, data[2], data[3], args)
    print()
    print(table(rows))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "classwise.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot(rows, OUT / "classwise.png")
    print(f"\nwrote {OUT / 'classwise.json'} and {OUT / 'classwise.png'}")


if __name__ == "__main__":
    main()
