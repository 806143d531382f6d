"""PartialLoading simulation study: how many requests each scheduler serves by its deadline.

    .venv/bin/python benchmarks/scheduling.py            # full study, under 5 min on one core
    .venv/bin/python benchmarks/scheduling.py --quick    # smoke run (~30 s)
    .venv/bin/python benchmarks/scheduling.py --seeds 4  # fewer instances per point
    .venv/bin/python benchmarks/scheduling.py --decision-only   # decision time per window, 200 windows

Model libraries come from the real block sizes of timm's ViT-B/16 and ResNet-50 (built on
the meta device, cut by ``edgesplit.partitioner.decompose``, fp32 tensor bytes per block).
Each cluster holds three fine-tuned variants of one base model that share its first
blocks ("none" ... "all-but-2") or all of it plus LoRA-like adapters ("lora"). Two device
profiles set the load rate, the inference times (FLOPs counted by torch on the meta
device over an assumed effective throughput) and a default uplink. Requests pick a
model uniformly; users arrived in the last half horizon and have latency budgets of
U(0.5, 1.25) x tightness x H, H the time to load every model once without sharing. Every
scheduler in ``edgesplit.scheduling`` runs on every instance (the uncapped DP where its
state space is below ``--dp-max-states``). Seeds are fixed. Tables go to stdout, plots to
benchmarks/out/. The decision-time table times the greedy and the capped DP (the anytime
decision a coordinator makes per window) on 200 windows of 50 users over 6 models.

Device numbers are assumptions, not measurements: Jetson Orin Nano-class, 1 GB/s from
NVMe into unified memory, 1.5 TFLOP/s effective, 100 Mbit/s Wi-Fi uplink; desktop GPU,
10 GB/s over PCIe 4.0 from page cache, 30 TFLOP/s effective, 1 Gbit/s uplink.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from edgesplit.partitioner import decompose
from edgesplit import scheduling as sch
from edgesplit.scheduling import ModelLibrary, Problem, Request, ServerConfig, UplinkConfig

OUT_DIR = Path(__file__).resolve().parent / "out"
INPUT_BYTES = 3 * 224 * 224  # one uint8 RGB image at 224 x 224
ARCHS = {"vit": "vit_base_patch16_224", "resnet": "resnet50"}
LORA_RANK = 8
SHARE_MODES = ("none", "half", "3/4", "all-but-2", "lora")
SCHEDULERS = ("dp", "greedy", "oblivious-dp", "oblivious-greedy", "edf", "fcfs", "random")


@dataclass(frozen=True)
class DeviceProfile:
    """An edge server class (assumed figures, see the module docstring)."""

    name: str
    load_rate_bytes_per_s: float
    effective_flop_per_s: float
    uplink_bytes_per_s: float  # default shared uplink of its users


DEVICES = (
    DeviceProfile("jetson", 1.0e9, 1.5e12, 12.5e6),
    DeviceProfile("desktop", 10.0e9, 30e12, 125e6),
)


@dataclass(frozen=True)
class StudyConfig:
    """What the study sweeps; every field can be set from the command line."""

    seeds: int = 10  # instances per point
    users: tuple[int, ...] = (5, 10, 20, 35, 50, 75, 100)
    tightness: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    uplink_factors: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, math.inf)  # x the device's default uplink
    share_modes: tuple[str, ...] = SHARE_MODES
    default_users: int = 50
    default_tightness: float = 1.0
    default_share: str = "all-but-2"
    variants: int = 2  # fine-tuned models per base model (the DP is exponential in the number of models)
    dp_max_states: int = 5_000_000  # run the DP only below this state count (prod (n_f+1) * F)
    dp_max_visits: int = 200_000  # and let its search visit at most this many states (~ seconds)
    timing_models: tuple[int, ...] = (2, 4, 6)
    timing_instances: int = 3
    timing_reps: int = 7
    decision_windows: int = 200  # decision-time table: windows of 50 users over 6 models
    opt_windows: int = 10  # of those, solved to optimality by the uncapped DP (seconds each)
    cap_ms: float = 8.0  # the DP's decision-time cap
    out_dir: str = str(OUT_DIR)


QUICK = StudyConfig(seeds=2, users=(5, 20, 50, 100), tightness=(0.5, 1.0, 2.0), uplink_factors=(0.3, 1.0, math.inf),
                    share_modes=("none", "all-but-2", "lora"), timing_models=(2, 6), timing_instances=2, timing_reps=3,
                    decision_windows=40, opt_windows=3)


# --- model libraries from timm ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseModel:
    """A timm model's blocks: names, fp32 bytes, LoRA adapter bytes, and its FLOPs per image."""

    arch: str
    names: tuple[str, ...]
    block_bytes: tuple[int, ...]
    lora_bytes: tuple[int, ...]
    flops: float


def profile_base(arch: str) -> BaseModel:
    """Block sizes and FLOPs of a timm model, on the meta device (no memory, no weights)."""
    import timm  # heavy import, only here
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False).eval()
    names, sizes, lora = [], [], []
    for block in decompose(model):
        tensors = block.module.state_dict()
        names.append(block.name)
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        # rank-r adapter on every weight matrix / conv: r * (fan_in + fan_out) fp32 values
        lora.append(sum(LORA_RANK * (t[0].numel() + t.shape[0]) * 4 for k, t in tensors.items()
                        if k.endswith("weight") and t.dim() >= 2))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return BaseModel(arch, tuple(names), tuple(sizes), tuple(lora), float(counter.get_total_flops()))


def shared_blocks(base: BaseModel, mode: str) -> int:
    """How many leading blocks the variants of ``base`` share in a share mode."""
    n = len(base.block_bytes)
    return {"none": 0, "half": n // 2, "3/4": (3 * n) // 4, "all-but-2": n - 2, "lora": n - 1}[mode]


def build_library(bases: dict[str, BaseModel], mode: str, variants: int) -> ModelLibrary:
    """One cluster per base model, ``variants`` fine-tuned models each.

    Shared modes: the variants share the first s blocks and own copies of the rest. "lora":
    they share every block but the head, and each owns its head plus rank-8 adapters.
    """
    clusters = {}
    for cname, base in bases.items():
        s = shared_blocks(base, mode)
        if mode == "lora":
            private = [sum(base.lora_bytes[:-1]), base.block_bytes[-1]]
        else:
            private = list(base.block_bytes[s:])
        clusters[cname] = (list(base.block_bytes[:s]), {f"{cname}-{v}": private for v in range(variants)})
    return ModelLibrary.from_backbones(clusters)


def model_order(lib: ModelLibrary) -> list[str]:
    """Models interleaved across clusters (vit-0, resnet-0, vit-1, ...): the first F are used when F < all."""
    names = sorted(lib.models)
    by_cluster: dict[str, list[str]] = {}
    for m in names:
        by_cluster.setdefault(m.rsplit("-", 1)[0], []).append(m)
    out = []
    for i in range(max(len(v) for v in by_cluster.values())):
        out += [v[i] for v in by_cluster.values() if i < len(v)]
    return out


def make_problem(seed: int, lib: ModelLibrary, bases: dict[str, BaseModel], device: DeviceProfile, n_users: int,
                 tightness: float, uplink_bytes_per_s: float, models: list[str] | None = None) -> Problem:
    """The requests waiting at the planning time t0 = 0, from one seed.

    Users arrived during the last half horizon (arrival in [-H/2, 0] x tightness) and each
    has a latency budget of U(0.5, 1.25) x tightness x H, so the deadline is arrival +
    budget. Uploads start at t0 (the plan allocates the uplink), so the DP stays exact
    and FCFS has an arrival order to follow.
    """
    rng = random.Random(seed)
    models = models or sorted(lib.models)
    horizon_s = tightness * sum(lib.model_bytes(m) for m in models) / device.load_rate_bytes_per_s
    reqs = []
    for k in range(n_users):
        m = rng.choice(models)
        infer = bases[m.rsplit("-", 1)[0]].flops / device.effective_flop_per_s
        arrival = -rng.uniform(0.0, 0.5) * horizon_s
        deadline = arrival + rng.uniform(0.5, 1.25) * horizon_s
        reqs.append(Request(f"r{k}", f"user{k}", m, INPUT_BYTES, infer, deadline, arrival))
    return Problem(lib, tuple(reqs), ServerConfig(device.load_rate_bytes_per_s),
                   UplinkConfig("edf", total_rate_bytes_per_s=uplink_bytes_per_s))


# --- running the schedulers ------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Served counts per scheduler over a point's instances."""

    served: dict[str, list[float]] = field(default_factory=dict)  # fraction served, per instance
    counts: dict[str, list[int]] = field(default_factory=dict)
    gave_up: dict[str, int] = field(default_factory=dict)  # DP runs stopped by the visit limit

    def add(self, name: str, served: int, n_users: int) -> None:
        self.served.setdefault(name, []).append(served / n_users)
        self.counts.setdefault(name, []).append(served)

    def mean_pct(self, name: str) -> float | None:
        """Mean % served; None unless the scheduler ran on every instance of the point."""
        vals = self.served.get(name)
        return 100 * statistics.fmean(vals) if vals and not self.gave_up.get(name) else None


def run_all(p: Problem, cfg: StudyConfig, tally: Tally, pairs: dict[str, list]) -> None:
    """Run every scheduler on one instance; record counts and the aware-vs-oblivious pairs."""
    k = len(p.requests)
    dp_ok = sch.dp_state_count(p) <= cfg.dp_max_states and not sch.dp_preconditions(p)
    dp_config = sch.DPConfig(max_visits=cfg.dp_max_visits, cap_ms=None)  # the study wants the optimum
    got = {}
    for name in SCHEDULERS:
        if name.endswith("dp"):
            if not dp_ok:
                continue
            try:
                got[name] = sch.create_scheduler(name, config=dp_config)(p).served
            except sch.ScheduleError:  # the visit limit: recorded, the point shows "-" for it
                tally.gave_up[name] = tally.gave_up.get(name, 0) + 1
                continue
        else:
            got[name] = sch.create_scheduler(name)(p).served
        tally.add(name, got[name], k)
    pairs["greedy"].append((got["greedy"], got["oblivious-greedy"], k))
    if "dp" in got:
        pairs["gap"].append((got["greedy"], got["dp"]))
        if "oblivious-dp" in got:
            pairs["dp"].append((got["dp"], got["oblivious-dp"], k))


def fmt(x: float | None) -> str:
    return "    -" if x is None else f"{x:5.1f}"


def print_table(title: str, xlabel: str, rows: list[tuple[str, Tally]]) -> None:
    print(f"\n{title}  (% of requests served by their deadline, mean over seeds)")
    print(f"  {xlabel:>12} | " + " | ".join(f"{s:>16}" for s in SCHEDULERS))
    for x, tally in rows:
        note = ", ".join(f"{s} gave up on {n}" for s, n in tally.gave_up.items())
        print(f"  {x:>12} | " + " | ".join(f"{fmt(tally.mean_pct(s)):>16}" for s in SCHEDULERS)
              + (f"   ({note})" if note else ""))


def sweep(cfg: StudyConfig, bases, device: DeviceProfile, libs: dict[str, ModelLibrary], what: str,
          pairs: dict[str, list]) -> list[tuple[str, Tally]]:
    """One sweep for one device: vary ``what`` around the defaults."""
    rows = []
    base_uplink = device.uplink_bytes_per_s
    if what == "users":
        points = [(str(n), dict(n_users=n)) for n in cfg.users]
    elif what == "tightness":
        points = [(f"{t:g}", dict(tightness=t)) for t in cfg.tightness]
    elif what == "uplink":
        points = [("inf" if math.isinf(f) else f"{f * base_uplink / 1e6:g} MB/s", dict(uplink=f * base_uplink))
                  for f in cfg.uplink_factors]
    else:
        points = [(m, dict(share=m)) for m in cfg.share_modes]
    for label, over in points:
        tally = Tally()
        lib = libs[over.get("share", cfg.default_share)]
        for seed in range(cfg.seeds):
            p = make_problem(1000 * seed + 17, lib, bases, device, over.get("n_users", cfg.default_users),
                             over.get("tightness", cfg.default_tightness), over.get("uplink", base_uplink))
            run_all(p, cfg, tally, pairs)
        rows.append((label, tally))
    return rows


# --- decision time ---------------------------------------------------------------------------------------------

def median_time_ms(fn, problem_factory, reps: int) -> tuple[float, int]:
    """Warm up once, then the median wall time of ``reps`` calls, each on a freshly built problem."""
    served = fn(problem_factory()).served  # warm-up (also imports, caches)
    times = []
    for _ in range(reps):
        p = problem_factory()  # new object: no cached compile from the previous call
        t = time.perf_counter()
        fn(p)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), served


def decision_times(cfg: StudyConfig, bases, libs) -> list[tuple]:
    """DP and greedy decision time for 50 users over F models (jetson profile)."""
    device = DEVICES[0]
    per_base = math.ceil(max(cfg.timing_models) / len(bases))
    lib = build_library(bases, cfg.default_share, per_base)  # enough variants for the largest F
    order = model_order(lib)
    rows = []
    for n_models in cfg.timing_models:
        models = order[:n_models]
        for uplink in (math.inf, device.uplink_bytes_per_s):
            dp_ms, gr_ms, states, gaps = [], [], [], []
            for inst in range(cfg.timing_instances):
                def factory(inst=inst, models=models, uplink=uplink):
                    return make_problem(500 + inst, lib, bases, device, 50, cfg.default_tightness, uplink, models)
                p = factory()
                states.append(sch.dp_state_count(p))
                g_ms, g_served = median_time_ms(sch.solve_greedy, factory, cfg.timing_reps)
                try:
                    uncapped = sch.DPConfig(max_visits=10 * cfg.dp_max_visits, cap_ms=None)
                    d_ms, d_served = median_time_ms(lambda q: sch.solve_dp(q, uncapped), factory, cfg.timing_reps)
                except sch.ScheduleError:
                    d_ms, d_served = math.nan, -1  # gave up: shown as nan and -1

                gr_ms.append(g_ms)
                dp_ms.append(d_ms)
                gaps.append((g_served, d_served))
            rows.append((n_models, uplink, states, dp_ms, gr_ms, gaps))
    return rows


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of ``xs`` (nearest rank)."""
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, math.ceil(q * len(ys)) - 1))]


def decision_windows(cfg: StudyConfig, bases) -> dict:
    """Per decision window: greedy and capped-DP wall time, the DP's answer, and quality where it is known.

    Windows: 50 pending users over 6 models (jetson profile, finite default uplink, per-request
    deadlines from ``make_problem``), one seed each. Every call gets a freshly built problem, so
    compiling it is part of the decision. Quality: against the uncapped DP (the optimum in its
    case) on the first ``cfg.opt_windows`` windows, and against the exact solver on windows of
    12 users over the same 6 models.
    """
    device = DEVICES[0]
    lib = build_library(bases, cfg.default_share, 3)
    models = model_order(lib)[:6]

    def window(seed: int, users: int = 50) -> Problem:
        return make_problem(70_000 + seed, lib, bases, device, users, cfg.default_tightness,
                            device.uplink_bytes_per_s, models)

    capped = sch.DPConfig(cap_ms=cfg.cap_ms)
    sch.solve_dp(window(-1), capped)  # warm-up
    out: dict = {"greedy_ms": [], "dp_ms": [], "fallback": 0, "greedy": [], "dp": [], "bound": [], "opt": [],
                 "small": []}
    for seed in range(cfg.decision_windows):
        p = window(seed)
        t = time.perf_counter()
        g = sch.solve_greedy(p)
        out["greedy_ms"].append(1000 * (time.perf_counter() - t))
        p = window(seed)
        t = time.perf_counter()
        d = sch.solve_dp(p, capped)
        out["dp_ms"].append(1000 * (time.perf_counter() - t))
        out["fallback"] += d.method != "dp"
        out["greedy"].append(g.served)
        out["dp"].append(d.served)
        out["bound"].append(d.bound)
        if seed < cfg.opt_windows:
            out["opt"].append(sch.solve_dp(p, sch.DPConfig(cap_ms=None)).served)
    for seed in range(cfg.decision_windows):
        p = window(seed, 12)
        opt = sch.solve_exact(p).served
        out["small"].append((sch.solve_greedy(p).served, sch.solve_dp(p, capped).served, opt))
    return out


def print_decision_table(cfg: StudyConfig, res: dict) -> None:
    n = len(res["greedy_ms"])
    print(f"\ndecision time per window: 50 users over 6 models, jetson, uplink "
          f"{DEVICES[0].uplink_bytes_per_s / 1e6:g} MB/s, per-request deadlines, {n} windows; "
          f"DP cap {cfg.cap_ms} ms (load average {os.getloadavg()[0]:.2f})")
    print(f"  {'scheduler':>10} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | served mean | fell back")
    for name, key in (("greedy", "greedy_ms"), ("capped DP", "dp_ms")):
        xs = res[key]
        fb = f"{res['fallback']}/{n}" if key == "dp_ms" else "-"
        served = res["greedy" if key == "greedy_ms" else "dp"]
        print(f"  {name:>10} | {pct(xs, .5):7.2f} | {pct(xs, .99):7.2f} | {max(xs):7.2f} | "
              f"{statistics.fmean(served):11.2f} | {fb}")
    gap = [b - s for b, s in zip(res["bound"], res["dp"])]
    of_bound = statistics.fmean(s / b for s, b in zip(res["dp"], res["bound"]))
    print(f"  capped DP: served / its upper bound mean {of_bound:.3f}, bound - served mean {statistics.fmean(gap):.2f}, "
          f"max {max(gap)}")
    if res["opt"]:
        m = len(res["opt"])
        for name in ("greedy", "dp"):
            r = [s / o if o else 1.0 for s, o in zip(res[name][:m], res["opt"])]
            print(f"  {name:>10} / optimum (uncapped DP), first {m} windows: mean {statistics.fmean(r):.4f}, "
                  f"worst {min(r):.3f}")
    for i, name in enumerate(("greedy", "capped DP")):
        r = [row[i] / row[2] if row[2] else 1.0 for row in res["small"]]
        print(f"  {name:>10} / exact, {len(r)} windows of 12 users over 6 models: mean {statistics.fmean(r):.4f}, "
              f"worst {min(r):.3f}, below optimum on {sum(x < 1 for x in r)}")


# --- plots -----------------------------------------------------------------------------------------------------

def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    titles = {"users": "number of users", "tightness": "deadline tightness (x H)", "uplink": "uplink rate",
              "share": "what the variants share"}
    for what, xlabel in titles.items():
        fig, axes = plt.subplots(1, len(DEVICES), figsize=(6 * len(DEVICES), 4), sharey=True)
        for ax, device in zip(axes, DEVICES):
            rows = results[(device.name, what)]
            xs = list(range(len(rows)))
            for s in SCHEDULERS:
                ys = [t.mean_pct(s) for _, t in rows]
                if all(y is None for y in ys):
                    continue
                ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                        marker="o", label=s, linestyle="--" if s.startswith("oblivious") else "-")
            ax.set_xticks(xs, [label for label, _ in rows], rotation=30)
            ax.set_title(f"{device.name}")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("% served by deadline")
        axes[-1].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"scheduling_{what}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


# --- main ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> StudyConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer points and seeds")
    ap.add_argument("--seeds", type=int, help="instances per point")
    ap.add_argument("--dp-max-states", type=int, help="run the DP only below this state count")
    ap.add_argument("--out-dir", type=str, help="where plots go")
    ap.add_argument("--decision-only", action="store_true", help="only the decision-time table")
    ap.add_argument("--decision-windows", type=int, help="windows in the decision-time table (>= 200 for p99)")
    ap.add_argument("--cap-ms", type=float, help="the DP's decision-time cap")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else StudyConfig()
    over = {k: v for k, v in (("seeds", args.seeds), ("dp_max_states", args.dp_max_states),
                              ("out_dir", args.out_dir), ("decision_windows", args.decision_windows),
                              ("cap_ms", args.cap_ms)) if v is not None}
    return replace(cfg, **over), args.decision_only


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    cfg, decision_only = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    print(f"config: {cfg}")
    bases = {name: profile_base(arch) for name, arch in ARCHS.items()}
    if decision_only:
        print_decision_table(cfg, decision_windows(cfg, bases))
        return

    print("\nbase models (fp32 tensor bytes per block, FLOPs per 224x224 image)")
    for name, b in bases.items():
        print(f"  {b.arch:22} {len(b.block_bytes):2d} blocks, {sum(b.block_bytes) / 1e6:7.1f} MB, largest block "
              f"{max(b.block_bytes) / 1e6:5.1f} MB, head {b.block_bytes[-1] / 1e6:4.1f} MB, "
              f"LoRA r={LORA_RANK} {sum(b.lora_bytes) / 1e6:4.2f} MB, {b.flops / 1e9:5.1f} GFLOP")
    for d in DEVICES:
        print(f"  device {d.name:8}: load {d.load_rate_bytes_per_s / 1e9:4.1f} GB/s, "
              + ", ".join(f"{n} {1e3 * b.flops / d.effective_flop_per_s:5.2f} ms" for n, b in bases.items())
              + f", uplink {d.uplink_bytes_per_s / 1e6:g} MB/s")

    libs = {mode: build_library(bases, mode, cfg.variants) for mode in SHARE_MODES}
    print(f"\nlibraries ({cfg.variants} variants per base model)")
    print(f"  {'share':>10} | {'stored MB':>9} | {'oblivious MB':>12} | shared fraction of a model (vit / resnet)")
    for mode, lib in libs.items():
        stored = lib.blocks_bytes(lib.block_bytes) / 1e6
        oblivious = sum(lib.model_bytes(m) for m in lib.models) / 1e6
        frac = []
        for cname, base in bases.items():
            s = shared_blocks(base, mode)
            frac.append(sum(base.block_bytes[:s]) / lib.model_bytes(f"{cname}-0"))
        print(f"  {mode:>10} | {stored:9.1f} | {oblivious:12.1f} | {frac[0]:.3f} / {frac[1]:.3f}")

    results: dict = {}
    pairs: dict[str, list] = {"greedy": [], "dp": [], "gap": []}
    for device in DEVICES:
        for what in ("users", "tightness", "uplink", "share"):
            rows = sweep(cfg, bases, device, libs, what, pairs)
            results[(device.name, what)] = rows
            print_table(f"[{device.name}] served vs {what}", what, rows)
    t_study = time.perf_counter() - t_start

    print("\nsharing-aware vs sharing-oblivious (same algorithm, every study instance)")
    for name, rows in (("greedy", pairs["greedy"]), ("dp", pairs["dp"])):
        if not rows:
            continue
        extra = [a - b for a, b, _ in rows]
        rel = [(a - b) / b for a, b, _ in rows if b > 0]
        print(f"  {name:>6}: {len(rows)} instances, never fewer: {all(e >= 0 for e in extra)}; serves more on "
              f"{sum(e > 0 for e in extra)}; extra requests mean {statistics.fmean(extra):.2f}, max {max(extra)}; "
              f"relative gain mean {100 * statistics.fmean(rel):.1f}%, max {100 * max(rel):.1f}%")
    gave_up = {}
    for rows in results.values():
        for _, tally in rows:
            for name, count in tally.gave_up.items():
                gave_up[name] = gave_up.get(name, 0) + count
    if gave_up:
        print(f"  DP runs stopped by the visit limit ({cfg.dp_max_visits}): {gave_up}")
    if pairs["gap"]:
        ratios = [g / d if d else 1.0 for g, d in pairs["gap"]]
        print(f"  greedy / DP optimum on {len(ratios)} study instances: mean {statistics.fmean(ratios):.4f}, "
              f"worst {min(ratios):.3f}, below optimum on {sum(r < 1 for r in ratios)}")

    print(f"\nuncapped DP decision time, 50 users, jetson profile, tightness {cfg.default_tightness}, share "
          f"'{cfg.default_share}' (warm-up + median of {cfg.timing_reps} calls; {cfg.timing_instances} instances)")
    print(f"  {'models':>6} | {'uplink':>9} | {'DP states':>10} | {'DP ms med/max':>14} | {'greedy ms med/max':>17} "
          f"| greedy/DP served")
    for n_models, uplink, states, dp_ms, gr_ms, gaps in decision_times(cfg, bases, libs):
        up = "inf" if math.isinf(uplink) else f"{uplink / 1e6:g} MB/s"
        print(f"  {n_models:6d} | {up:>9} | {max(states):10d} | {statistics.median(dp_ms):6.1f} / {max(dp_ms):6.1f} "
              f"| {statistics.median(gr_ms):8.1f} / {max(gr_ms):6.1f} | "
              + " ".join(f"{g}/{d}" for g, d in gaps))

    print_decision_table(cfg, decision_windows(cfg, bases))

    files = plot(results, Path(cfg.out_dir))
    print(f"\nplots: {', '.join(str(f) for f in files)}")
    print(f"study {t_study:.1f} s, total {time.perf_counter() - t_start:.1f} s (cpu threads: torch 1, "
          f"{os.cpu_count()} cores visible)")


if __name__ == "__main__":
    main()
