"""Adaptive compression at split points (Mudvari et al., TOIT 2024) on scikit-learn's digits.

    python benchmarks/compression.py --quick     # smoke run, small models (under a minute)
    python benchmarks/compression.py             # full run (about 12-15 minutes on 2 cores)
    python benchmarks/compression.py --models vit --jobs 1

Models: a VGG11-style CNN (half width, 32-64-128-128-256 | 256-256-256) cut after its 5th
conv (256 channels at 4x4), and a small ViT (32 px, patch 8, D = 128, depth 6) cut after
block 3 (17 tokens x 128). Digits: 8x8 upsampled to 32x32, the fixed 1347/450 split.

Runs per model (each a separate process, ``--jobs`` at a time, one thread each), all with the
same optimiser settings (cosine learning rate over each run) and held-out evaluations every
1/4 epoch (``evals_per_epoch``) and at every phase end, so "epochs needed" and "bytes until"
are read at that granularity for every run:

- U:  uncompressed split training, E epochs ("no_compression" of the paper);
- F4: fixed b = 4 from scratch, E epochs ("high_compression"/"4Comp");
- D:  deprune: b = 4 for E - f epochs, reset the filter, uncompressed for the last f epochs
      (the paper's Fig. 6 runs 15 + 7; here f is short because b = 4 epochs cost ~1/128 of an
      uncompressed one and the widened decoder keeps the b = 4 model's function at the switch);
- P:  prune from U's trained weights: b = 32 for a fraction of an epoch, then b = 4 (Fig. 10:
      10 + 10), with its own fine-tuning optimiser settings (``spec["prune"]["train"]``);
- T:  P's module trained further for "mix" epochs (a budget drawn per batch, filter frozen;
      fresh optimiser, base settings), so one module serves every budget: the module of the
      budget x dtype table;
- D and F4 again with the next ``extra_seeds`` seeds (both models), since one held-out sample
  is 0.22 points and the final accuracies of D and F4 differ by a few samples.

Acceptance figures (computed from the measurements, never from constants):

- deprune's final accuracy >= F4's final accuracy (same total epochs; with extra seeds, the
  means over the seeds, each seed printed too);
- bytes ratio = U's bytes until its first evaluation within 1 point of deprune's final
  accuracy / deprune's total bytes (activations and gradients, headers included), >= 3;
- prune: target = F4's final accuracy (with extra seeds, the mean over the seeds); F4 needs
  the epochs until its first evaluation at the target (with extra seeds, of its mean curve),
  prune (b = 32 phase included) the epochs until its first evaluation at b = 4 at the target;
  met when prune's <= 1/3 of F4's. The first seed's F4 alone is printed too.

Bytes are what crosses the link: activation and gradient frames (kept channels x positions x
bytes per element, int8 scales) plus their msgpack headers. Table bytes are for a one-sample
message (batch 1, header included): the cost of one inference transfer. Writes
``benchmarks/out/compression/{results.json, acc_vs_bytes.png, curves.png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out" / "compression"
BUDGETS = [None, 64, 32, 16, 8, 4]
DTYPES = ["fp32", "fp16", "int8"]

# epochs: E of U, F4 and D; deprune_full: D's uncompressed epochs after the reset (f);
# prune: P's epochs (b=32 then b=4), of them at b=32, and P's optimiser overrides (fine-tuning)
MODELS = {
    "vgg11": {
        "net": {"width": 32},
        "train": {"lr": 0.01, "momentum": 0.0, "weight_decay": 5e-4, "optimizer": "sgd", "shift_px": 2,
                  "lr_schedule": "cosine", "evals_per_epoch": 4, "widen_at_reset": True},
        "epochs": 12, "deprune_full": 0.5,
        "prune": {"epochs": 3, "mid_epochs": 0.25, "train": {"lr": 0.003, "momentum": 0.9}}, "mix_epochs": 6,
        "extra_seeds": 2,
    },
    "vit": {
        "net": {"patch_px": 8, "dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 2.0, "cut": 3},
        "train": {"lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "shift_px": 2,
                  "lr_schedule": "cosine", "evals_per_epoch": 4, "widen_at_reset": True},
        "epochs": 30, "deprune_full": 4,
        "prune": {"epochs": 9, "mid_epochs": 0.25, "train": {"lr": 5e-4}}, "mix_epochs": 6,
        "extra_seeds": 2,
    },
}
QUICK = {
    "vgg11": {"net": {"width": 8}, "epochs": 3, "deprune_full": 0.5,
              "prune": {"epochs": 1, "mid_epochs": 0.25, "train": {}}, "mix_epochs": 1, "extra_seeds": 0},
    "vit": {"net": {"patch_px": 8, "dim": 64, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "cut": 1},
            "epochs": 3, "deprune_full": 0.5, "prune": {"epochs": 1, "mid_epochs": 0.25, "train": {}}, "mix_epochs": 1,
            "extra_seeds": 1},
}


def model_spec(name: str, quick: bool) -> dict:
    spec = json.loads(json.dumps(MODELS[name]))
    if quick:
        spec.update(QUICK[name])
    return spec


# --- one job (runs in its own process) --------------------------------------------------------
def run_job(model: str, job: str, quick: bool, seed: int, progress: bool) -> dict:
    import torch

    from edgesplit.compression.data import load_digits_split
    from edgesplit.compression.evaluation import budget_table, evaluate, evaluate_wire
    from edgesplit.compression.splitnets import create_splitnet
    from edgesplit.compression.training import Phase, SplitTrainer, TrainConfig, history_to_json, schedule_phases

    spec = model_spec(model, quick)
    data = load_digits_split()
    cfg = TrainConfig(seed=seed, progress=progress, **spec["train"])
    torch.manual_seed(seed)
    net = create_splitnet(model, **spec["net"])
    e = spec["epochs"]
    out: dict = {"model": model, "job": job, "spec": spec, "budgets": list(net.codec.budgets),
                 "width": net.codec.width}
    t0 = time.perf_counter()
    if job == "F4":
        tr = SplitTrainer(net, data, cfg)
        out["F4"] = history_to_json(tr.run(schedule_phases("fixed", e, budget=4), desc=f"{model} F4"))
    elif job == "D":
        tr = SplitTrainer(net, data, cfg)
        phases = schedule_phases("deprune", e, budget=4, full_epochs=spec["deprune_full"])
        out["D"] = history_to_json(tr.run(phases, desc=f"{model} D"))
    elif job == "UPT":
        tr = SplitTrainer(net, data, cfg)
        out["U"] = history_to_json(tr.run(schedule_phases("none", e), desc=f"{model} U"))
        ref = evaluate_wire(net, data.x_test, data.y_test, None, "fp32")
        out["U_ref"] = {"accuracy": ref.accuracy, "bytes_per_sample": ref.bytes_per_sample,
                        "payload_per_sample": ref.single_payload_bytes}
        pr = spec["prune"]
        # prune starts from U's weights with fresh optimizers (its own fine-tuning overrides)
        tr = SplitTrainer(net, data, TrainConfig(seed=seed, progress=progress, **{**spec["train"], **pr["train"]}))
        out["P"] = history_to_json(tr.run(schedule_phases("prune", pr["epochs"], full_epochs=0, mid_epochs=pr["mid_epochs"]),
                                          eval_points=[(4, "fp16")], desc=f"{model} P"))
        budgets = [b for b in BUDGETS if b is None or b in net.codec.budgets]
        out["table_P"] = [{"budget": b, "accuracy": evaluate(net, data.x_test, data.y_test, b, "fp16")}
                          for b in budgets]
        tr = SplitTrainer(net, data, cfg)  # mix from P's module, with the base optimiser settings
        out["T"] = history_to_json(tr.run([Phase(spec["mix_epochs"], "mix")], desc=f"{model} T"))
        rows = budget_table(net, data.x_test, data.y_test, budgets, DTYPES)
        out["table"] = [{"budget": r.budget, "dtype": r.wire_dtype, "accuracy": r.accuracy,
                         "bytes_per_sample": r.bytes_per_sample, "payload_per_sample": r.single_payload_bytes,
                         "header_bytes": r.single_header_bytes, "eval_payload_bytes": r.payload_bytes,
                         "eval_messages": r.messages} for r in rows]
    else:
        raise SystemExit(f"unknown job {job!r}")
    out["seconds"] = time.perf_counter() - t0
    return out


# --- analysis ------------------------------------------------------------------------------------
def first_epoch_at(hist: list[dict], target: float, key=lambda h: h["test_acc"]) -> dict | None:
    """The first record (evaluation point) whose accuracy is >= target, or None."""
    for h in hist:
        if key(h) >= target - 1e-9:
            return h
    return None


def analyse(model: str, r: dict) -> dict:
    """Acceptance figures for one model from its jobs' results."""
    res: dict = {}
    u, f4, d, p = r["U"], r["F4"], r["D"], r["P"]
    a_u = r["U_ref"]["accuracy"]
    full_bytes = r["U_ref"]["bytes_per_sample"]
    rows = r["table"]
    for row in rows:
        row["ratio"] = full_bytes / row["bytes_per_sample"]
        row["delta"] = row["accuracy"] - a_u
    res["uncompressed_acc"] = a_u
    res["fp32_full_bytes"] = full_bytes
    for need, tol in ((8, 1.0), (32, 3.0)):
        ok = [row for row in rows if row["ratio"] >= need and row["delta"] >= -tol]
        best = max(ok, key=lambda row: row["ratio"]) if ok else None
        cand = [row for row in rows if row["ratio"] >= need]
        best_acc = max(cand, key=lambda row: row["accuracy"]) if cand else None
        res[f"x{need}"] = {"met": bool(ok), "tolerance_points": tol,
                           "most_compressed_within_tolerance": best,
                           "most_accurate_at_ratio": best_acc}
    # deprune vs fixed b=4 (same epochs) and vs uncompressed until it first comes within 1 point
    a_d, a_f4 = d[-1]["test_acc"], f4[-1]["test_acc"]
    b_d, b_u = d[-1]["cum_bytes"], u[-1]["cum_bytes"]
    reach = first_epoch_at(u, a_d - 1.0)
    ratio = reach["cum_bytes"] / b_d if reach else None
    last3 = {k: sum(x["test_acc"] for x in hist[-3:]) / len(hist[-3:]) for k, hist in (("U", u), ("F4", f4), ("D", d))}
    seeds = sorted(r["seeds"]["D"], key=int)
    per_seed = {sd: {"D": r["seeds"]["D"][sd][-1]["test_acc"], "F4": r["seeds"]["F4"][sd][-1]["test_acc"]} for sd in seeds}
    mean_d = sum(v["D"] for v in per_seed.values()) / len(seeds)
    mean_f4 = sum(v["F4"] for v in per_seed.values()) / len(seeds)
    same_epochs = d[-1]["epoch"] == f4[-1]["epoch"]
    res["deprune"] = {
        "final_acc": a_d, "fixed_b4_final_acc": a_f4, "epochs": d[-1]["epoch"], "fixed_b4_epochs": f4[-1]["epoch"],
        "per_seed": per_seed, "mean_final_acc": mean_d, "fixed_b4_mean_final_acc": mean_f4,
        "seeds_at_least_as_accurate": sum(v["D"] >= v["F4"] for v in per_seed.values()),
        # with several seeds the criterion is on the means (one test sample is 0.22 points)
        "at_least_as_accurate": same_epochs and (mean_d >= mean_f4 - 1e-9 if len(seeds) > 1 else a_d >= a_f4),
        "mean_last3_evals": last3,
        "bytes": b_d, "uncompressed_bytes_same_epochs": b_u, "uncompressed_final_acc": u[-1]["test_acc"],
        "ratio_same_epochs": b_u / b_d,
        "uncompressed_first_within_1pt": None if reach is None else {
            "epoch": reach["epoch"], "acc": reach["test_acc"], "bytes": reach["cum_bytes"]},
        "ratio_to_first_reach": ratio,
        "bytes_met": ratio is not None and ratio >= 3.0,
    }
    # prune (from U) vs from-scratch b=4, to from-scratch's final accuracy; with several seeds the
    # target is F4's mean final accuracy and F4 needs the epochs until its mean curve reaches it
    curves = [r["seeds"]["F4"][sd] for sd in seeds]
    f4_mean = [{"epoch": h["epoch"], "test_acc": sum(c[i]["test_acc"] for c in curves) / len(curves)}
               for i, h in enumerate(curves[0])]
    target = f4_mean[-1]["test_acc"]
    s_hit = first_epoch_at(f4_mean, target)  # never None: the last record reaches its own final accuracy
    p_hit = first_epoch_at(p, target, key=lambda h: h["extra_acc"]["b4/fp16"])
    s_half = first_epoch_at(f4_mean, target - 0.5)
    p_half = first_epoch_at(p, target - 0.5, key=lambda h: h["extra_acc"]["b4/fp16"])
    n_s, n_p = s_hit["epoch"], (p_hit["epoch"] if p_hit else None)
    one_hit = first_epoch_at(p, a_f4, key=lambda h: h["extra_acc"]["b4/fp16"])  # the first seed's F4 alone
    one = {"target_acc": a_f4, "scratch_epochs": first_epoch_at(f4, a_f4)["epoch"],
           "prune_epochs": one_hit["epoch"] if one_hit else None}
    one["met"] = one["prune_epochs"] is not None and 3 * one["prune_epochs"] <= one["scratch_epochs"] + 1e-9
    res["prune"] = {
        "seeds": len(seeds), "first_seed_only": one,
        "target_acc": target, "scratch_epochs": n_s, "prune_epochs": n_p,
        "met": n_p is not None and 3 * n_p <= n_s + 1e-9,
        "speedup": (n_s / n_p) if n_p else None,
        "within_half_point": {"scratch_epochs": s_half["epoch"] if s_half else None,
                              "prune_epochs": p_half["epoch"] if p_half else None},
        "prune_final_b4_acc": p[-1]["extra_acc"]["b4/fp16"], "prune_best_b4_acc": max(h["extra_acc"]["b4/fp16"] for h in p),
        "scratch_total_epochs": f4[-1]["epoch"], "prune_total_epochs": p[-1]["epoch"],
    }
    return res


def fmt_budget(b: int | None) -> str:
    return "full" if b is None else str(b)


def print_report(model: str, r: dict, a: dict) -> None:
    spec = r["spec"]
    print(f"\n=== {model}: {spec['net']} | train {spec['train']} | E={spec['epochs']} "
          f"deprune f={spec['deprune_full']} prune {spec['prune']} mix={spec['mix_epochs']} | cut width {r['width']}")
    print(f"uncompressed split (U, full fp32): {a['uncompressed_acc']:.2f} %, "
          f"{a['fp32_full_bytes']} B/sample on the wire (batch 1, header included)")
    print("  P's module before the mix epochs (fp16): " + ", ".join(
        f"{fmt_budget(x['budget'])}: {x['accuracy']:.2f}" for x in r["table_P"]))
    print(f"{'budget':>6} {'dtype':>5} {'B/sample':>9} {'payload':>8} {'x fewer':>8} {'acc %':>7} {'Δ vs U':>7}")
    for row in r["table"]:
        print(f"{fmt_budget(row['budget']):>6} {row['dtype']:>5} {row['bytes_per_sample']:>9} "
              f"{row['payload_per_sample']:>8} {row['ratio']:>8.1f} {row['accuracy']:>7.2f} {row['delta']:>+7.2f}")
    for need in (8, 32):
        x = a[f"x{need}"]
        best = x["most_compressed_within_tolerance"]
        alt = x["most_accurate_at_ratio"]
        what = (f"b={fmt_budget(best['budget'])} {best['dtype']}: {best['ratio']:.1f}x, Δ {best['delta']:+.2f}"
                if best else "none")
        alt_s = (f"best at >= {need}x: b={fmt_budget(alt['budget'])} {alt['dtype']} Δ {alt['delta']:+.2f}"
                 if alt else f"no row reaches {need}x")
        print(f"  >= {need}x fewer bytes within {x['tolerance_points']:.0f} pt: "
              f"{'MET' if x['met'] else 'NOT MET'} (most compressed: {what}; {alt_s})")
    d = a["deprune"]
    ps = d["per_seed"]
    if len(ps) == 1:
        print(f"  deprune ({d['epochs']} epochs, the last {spec['deprune_full']} uncompressed): final {d['final_acc']:.2f} % "
              f"vs fixed b=4 ({d['fixed_b4_epochs']} epochs) {d['fixed_b4_final_acc']:.2f} % -> "
              f"{'MET' if d['at_least_as_accurate'] else 'NOT MET'} (at least as accurate)")
    else:
        print(f"  deprune ({d['epochs']} epochs, the last {spec['deprune_full']} uncompressed) vs fixed b=4 "
              f"({d['fixed_b4_epochs']} epochs), final accuracy per seed: "
              + ", ".join(f"seed {sd}: D {v['D']:.2f} / F4 {v['F4']:.2f}" for sd, v in ps.items()))
        print(f"           mean over {len(ps)} seeds: D {d['mean_final_acc']:.2f} % vs F4 {d['fixed_b4_mean_final_acc']:.2f} % "
              f"-> {'MET' if d['at_least_as_accurate'] else 'NOT MET'} (at least as accurate, on the means; "
              f"D >= F4 in {d['seeds_at_least_as_accurate']} of {len(ps)} seeds)")
    print("           mean of the last 3 evaluations: " + ", ".join(f"{k} {v:.2f} %" for k, v in d["mean_last3_evals"].items()))
    reach = d["uncompressed_first_within_1pt"]
    if reach:
        print(f"           bytes: deprune {d['bytes'] / 1e6:.1f} MB; uncompressed is first within 1 pt of "
              f"{d['final_acc']:.2f} % at epoch {reach['epoch']} ({reach['acc']:.2f} %) after "
              f"{reach['bytes'] / 1e6:.1f} MB = {d['ratio_to_first_reach']:.2f}x deprune's -> "
              f"{'MET' if d['bytes_met'] else 'NOT MET'} (>= 3x)")
    else:
        print(f"           bytes: uncompressed never gets within 1 pt of deprune's final -> NOT MET (not comparable)")
    print(f"           (for reference: uncompressed over all {r['U'][-1]['epoch']} epochs sends "
          f"{d['uncompressed_bytes_same_epochs'] / 1e6:.1f} MB = {d['ratio_same_epochs']:.2f}x deprune's, "
          f"final {d['uncompressed_final_acc']:.2f} %)")
    p = a["prune"]
    pr = spec["prune"]
    print(f"  prune (from U: b=32 for {pr['mid_epochs']} epochs, then b=4; {pr['train'] or 'same optimiser'}): "
          f"target {p['target_acc']:.2f} % (fixed b=4 final" + (f", mean of {p['seeds']} seeds" if p['seeds'] > 1 else "")
          + f"); from scratch first reaches it at epoch "
          f"{p['scratch_epochs']}, prune at epoch {p['prune_epochs']} of its {p['prune_total_epochs']} -> "
          f"{'MET' if p['met'] else 'NOT MET'} (needs <= 1/3"
          + (f"; {p['speedup']:.1f}x fewer" if p['speedup'] else "") + ")")
    print(f"           within 0.5 pt: scratch {p['within_half_point']['scratch_epochs']}, prune "
          f"{p['within_half_point']['prune_epochs']}; prune's b=4 accuracy: final {p['prune_final_b4_acc']:.2f} %, "
          f"best {p['prune_best_b4_acc']:.2f} %")
    if p["seeds"] > 1:
        o = p["first_seed_only"]
        print(f"           against the first seed's F4 alone: target {o['target_acc']:.2f} %, scratch at epoch "
              f"{o['scratch_epochs']}, prune at {o['prune_epochs']} -> {'met' if o['met'] else 'not met'}")


def plot(results: dict, analyses: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (model, r) in zip(axes[0], results.items()):
        for dt, marker in zip(DTYPES, "osd"):
            rows = [x for x in r["table"] if x["dtype"] == dt]
            ax.plot([x["bytes_per_sample"] for x in rows], [x["accuracy"] for x in rows], marker=marker, label=dt)
            for x in rows:
                ax.annotate(fmt_budget(x["budget"]), (x["bytes_per_sample"], x["accuracy"]), fontsize=7)
        ax.axhline(analyses[model]["uncompressed_acc"], color="k", ls="--", lw=0.8, label="uncompressed (U)")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per sample on the wire (batch 1, with header)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{model}: accuracy vs bytes (labels: budget)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "acc_vs_bytes.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
    for row_axes, (model, r) in zip(axes, results.items()):
        e = r["U"][-1]["epoch"]
        curves = {"no compression (U)": (r["U"], 0, "test_acc"), "fixed b=4 (F4)": (r["F4"], 0, "test_acc"),
                  "deprune (D)": (r["D"], 0, "test_acc"),
                  "prune from U (P, acc at b=4)": (r["P"], e, None)}
        for label, (hist, off, key) in curves.items():
            xs = [off + h["epoch"] for h in hist]
            acc = [h[key] if key else h["extra_acc"]["b4/fp16"] for h in hist]
            row_axes[0].plot(xs, acc, marker=".", label=label)
            base = r["U"][-1]["cum_bytes"] if off else 0
            row_axes[1].plot(xs, [base + h["cum_bytes"] for h in hist], marker=".", label=label)
        row_axes[0].set_ylim(max(0, min(h["test_acc"] for h in r["U"][-3:]) - 25), 100.5)
        row_axes[0].set(xlabel="epoch", ylabel="held-out accuracy (%)", title=f"{model}: accuracy vs epoch")
        row_axes[1].set(xlabel="epoch", ylabel="cumulative bytes sent (act + grad)", yscale="log",
                        title=f"{model}: training traffic")
        for ax in row_axes:
            ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# --- driver --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models and 3 epochs: a smoke run, not the figures")
    ap.add_argument("--models", default="vgg11,vit", help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    ap.add_argument("--seed", type=int, default=56, help="seed of weights, shuffling and resets (56 as the paper); "
                    "models with extra_seeds also run D and F4 with the next seeds")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where results.json and the plots go")
    ap.add_argument("--progress", action="store_true", help="show each job's progress bar")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: MODEL:JOB, run by the driver
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.job:  # child process
        import torch

        torch.set_num_threads(1)
        model, job = args.job.split(":")
        res = run_job(model, job, args.quick, args.seed, args.progress)
        args.result.write_text(json.dumps(res))
        return 0

    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {list(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"compression benchmark: models {models}, quick={args.quick}, jobs={args.jobs}, seed={args.seed}")
    if args.quick:
        print("  --quick: tiny models, 3 epochs: checks the pipeline; its figures are not the benchmark's")
    extra = {m: [args.seed + k for k in range(1, 1 + model_spec(m, args.quick)["extra_seeds"])] for m in models}
    jobs = [(m, "UPT", args.seed) for m in models]  # longest first
    jobs += [(m, j, args.seed) for m in models for j in ("D", "F4")]
    jobs += [(m, j, sd) for m in models for sd in extra[m] for j in ("D", "F4")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, done = list(jobs), [], {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            m, j, sd = pending.pop(0)
            path = args.out / (f"job-{m}-{j}.json" if sd == args.seed else f"job-{m}-{j}-s{sd}.json")
            cmd = [sys.executable, __file__, "--job", f"{m}:{j}", "--result", str(path), "--seed", str(sd)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--progress"] if args.progress else []
            running.append((m, j, sd, path, subprocess.Popen(cmd, env=env)))
        time.sleep(0.5)
        for item in list(running):
            m, j, sd, path, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    for *_, other in running:
                        other.terminate()
                    for *_, other in running:
                        other.wait()
                    print(f"job {m}:{j} (seed {sd}) failed with exit code {proc.returncode}", file=sys.stderr)
                    return 1
                done[(m, j, sd)] = json.loads(path.read_text())
                print(f"  done {m}:{j} seed {sd} in {done[(m, j, sd)]['seconds']:.0f} s "
                      f"(wall {time.perf_counter() - t0:.0f} s)", flush=True)
    results, analyses = {}, {}
    for m in models:
        r = {}
        for j in ("UPT", "D", "F4"):
            r.update(done[(m, j, args.seed)])
        r["seeds"] = {j: {str(sd): done[(m, j, sd)][j] for sd in [args.seed, *extra[m]]} for j in ("D", "F4")}
        results[m] = r
        analyses[m] = analyse(m, r)
        print_report(m, r, analyses[m])
    (args.out / "results.json").write_text(json.dumps({"results": results, "analysis": analyses}, indent=1))
    paths = plot(results, analyses, args.out)
    print(f"\nwall {time.perf_counter() - t0:.0f} s; wrote {args.out / 'results.json'}, "
          + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
