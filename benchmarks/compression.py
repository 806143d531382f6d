"""Adaptive compression at split points (Mudvari et al., TOIT 2024) on scikit-learn's digits.

    python benchmarks/compression.py --quick     # smoke run, small models (about 2 minutes)
    python benchmarks/compression.py             # full run (about 10 minutes on 2 free cores)
    python benchmarks/compression.py --models vit --jobs 1

Models: a VGG11-style CNN (half width, 32-64-128-128-256 | 256-256-256) cut after its 5th
conv (256 channels at 4x4), and a small ViT (32 px, patch 8, D = 128, depth 6) cut after
block 3 (17 tokens x 128). Digits: 8x8 upsampled to 32x32, the fixed 1347/450 split.

Runs per model (each a separate process, ``--jobs`` at a time, one thread each):

- U:  uncompressed split training, E epochs ("no_compression" of the paper);
- F4: fixed b = 4 from scratch, E epochs ("high_compression"/"4Comp");
- D:  deprune: b = 4 for 68 % of E, reset the filter, uncompressed for the rest (Fig. 6: 15 + 7);
- P:  prune from U's trained weights: b = 32 for k epochs, then b = 4 for k (Fig. 10: 10 + 10);
- T:  P followed by 6 "mix" epochs (a budget drawn per batch, filter frozen), so one module
      serves every budget: the module of the budget x dtype table.

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

MODELS = {
    "vgg11": {
        "net": {"width": 32},
        "train": {"lr": 0.01, "momentum": 0.0, "weight_decay": 5e-4, "optimizer": "sgd", "shift_px": 2},
        "epochs": 22, "prune_epochs": 4, "mix_epochs": 6,
    },
    "vit": {
        "net": {"patch_px": 8, "dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 2.0, "cut": 3},
        "train": {"lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "shift_px": 2, "lr_schedule": "cosine"},
        "epochs": 30, "prune_epochs": 6, "mix_epochs": 6,
    },
}
QUICK = {
    "vgg11": {"net": {"width": 8}, "epochs": 3, "prune_epochs": 1, "mix_epochs": 1},
    "vit": {"net": {"patch_px": 8, "dim": 64, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "cut": 1},
            "epochs": 3, "prune_epochs": 1, "mix_epochs": 1},
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
        out["D"] = history_to_json(tr.run(schedule_phases("deprune", e, budget=4), desc=f"{model} D"))
    elif job == "UPT":
        tr = SplitTrainer(net, data, cfg)
        out["U"] = history_to_json(tr.run(schedule_phases("none", e), desc=f"{model} U"))
        ref = evaluate_wire(net, data.x_test, data.y_test, None, "fp32")
        out["U_ref"] = {"accuracy": ref.accuracy, "bytes_per_sample": ref.bytes_per_sample,
                        "payload_per_sample": ref.single_payload_bytes}
        k = spec["prune_epochs"]
        tr = SplitTrainer(net, data, cfg)  # prune starts from U's weights with fresh optimizers
        out["P"] = history_to_json(tr.run(schedule_phases("prune", 2 * k, full_epochs=0),
                                          eval_points=[(4, "fp16")], desc=f"{model} P"))
        budgets = [b for b in BUDGETS if b is None or b in net.codec.budgets]
        out["table_P"] = [{"budget": b, "accuracy": evaluate(net, data.x_test, data.y_test, b, "fp16")}
                          for b in budgets]
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
def first_epoch_at(curve: list[float], target: float) -> int | None:
    """1-based index of the first value >= target, or None."""
    for i, a in enumerate(curve, 1):
        if a >= target - 1e-9:
            return i
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
    # deprune vs fixed b=4 and vs uncompressed
    a_d, a_f4 = d[-1]["test_acc"], f4[-1]["test_acc"]
    b_d, b_u = d[-1]["cum_bytes"], u[-1]["cum_bytes"]
    u_acc = [x["test_acc"] for x in u]
    e_reach = first_epoch_at(u_acc, a_d - 1.0)
    last3 = {k: sum(x["test_acc"] for x in hist[-3:]) / len(hist[-3:]) for k, hist in (("U", u), ("F4", f4), ("D", d))}
    res["deprune"] = {
        "final_acc": a_d, "fixed_b4_final_acc": a_f4, "at_least_as_accurate": a_d >= a_f4,
        "mean_last3": last3,
        "bytes": b_d, "uncompressed_bytes_same_epochs": b_u, "uncompressed_final_acc": u[-1]["test_acc"],
        "uncompressed_final_within_1pt": abs(u[-1]["test_acc"] - a_d) <= 1.0,
        "ratio_same_epochs": b_u / b_d,
        "uncompressed_first_epoch_within_1pt": e_reach,
        "ratio_to_first_reach": (u[e_reach - 1]["cum_bytes"] / b_d) if e_reach else None,
    }
    # prune vs from-scratch b=4
    target = a_f4
    f4_acc = [x["test_acc"] for x in f4]
    p_acc = [x["extra_acc"]["b4/fp16"] for x in p]
    n_scratch, n_prune = first_epoch_at(f4_acc, target), first_epoch_at(p_acc, target)
    n_scratch_half, n_prune_half = first_epoch_at(f4_acc, target - 0.5), first_epoch_at(p_acc, target - 0.5)
    res["prune"] = {
        "target_acc": target, "scratch_epochs": n_scratch, "prune_epochs": n_prune,
        "met": n_prune is not None and n_scratch is not None and 3 * n_prune <= n_scratch,
        "speedup": (n_scratch / n_prune) if n_prune else None,
        "within_half_point": {"scratch_epochs": n_scratch_half, "prune_epochs": n_prune_half},
        "prune_final_b4_acc": p_acc[-1], "scratch_total_epochs": len(f4), "prune_total_epochs": len(p),
    }
    return res


def fmt_budget(b: int | None) -> str:
    return "full" if b is None else str(b)


def print_report(model: str, r: dict, a: dict) -> None:
    spec = r["spec"]
    print(f"\n=== {model}: {spec['net']} | train {spec['train']} | E={spec['epochs']} "
          f"prune k={spec['prune_epochs']} mix={spec['mix_epochs']} | cut width {r['width']}")
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
    print(f"  deprune: final {d['final_acc']:.2f} % vs fixed b=4 {d['fixed_b4_final_acc']:.2f} % -> "
          f"{'MET' if d['at_least_as_accurate'] else 'NOT MET'}; bytes {d['bytes'] / 1e6:.1f} MB vs "
          f"uncompressed {d['uncompressed_bytes_same_epochs'] / 1e6:.1f} MB over the same epochs "
          f"(final {d['uncompressed_final_acc']:.2f} %) = {d['ratio_same_epochs']:.2f}x fewer "
          f"-> {'MET' if d['ratio_same_epochs'] >= 3 and d['uncompressed_final_within_1pt'] else 'NOT MET'} (>= 3x)")
    print("           mean of the last 3 epochs: " + ", ".join(f"{k} {v:.2f} %" for k, v in d["mean_last3"].items()))
    if d["uncompressed_first_epoch_within_1pt"]:
        print(f"           stricter: uncompressed is first within 1 pt of deprune's final at epoch "
              f"{d['uncompressed_first_epoch_within_1pt']}; bytes to there / deprune bytes = "
              f"{d['ratio_to_first_reach']:.2f}x")
    else:
        print("           stricter: uncompressed never gets within 1 pt of deprune's final")
    p = a["prune"]
    print(f"  prune: target {p['target_acc']:.2f} % (fixed b=4 final); from scratch first reaches it at epoch "
          f"{p['scratch_epochs']}, prune (from U) at epoch {p['prune_epochs']} of its {p['prune_total_epochs']} -> "
          f"{'MET' if p['met'] else 'NOT MET'} (needs <= 1/3); within 0.5 pt: scratch "
          f"{p['within_half_point']['scratch_epochs']}, prune {p['within_half_point']['prune_epochs']}")


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
        e = len(r["U"])
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
    ap.add_argument("--seed", type=int, default=56, help="seed of weights, shuffling and resets (56 as the paper)")
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
    jobs = [(m, j) for m in models for j in ("UPT", "D", "F4")]  # longest first
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, done = list(jobs), [], {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            m, j = pending.pop(0)
            path = args.out / f"job-{m}-{j}.json"
            cmd = [sys.executable, __file__, "--job", f"{m}:{j}", "--result", str(path), "--seed", str(args.seed)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--progress"] if args.progress else []
            running.append((m, j, path, subprocess.Popen(cmd, env=env)))
        time.sleep(0.5)
        for item in list(running):
            m, j, path, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    for _, _, _, other in running:
                        other.terminate()
                    for _, _, _, other in running:
                        other.wait()
                    print(f"job {m}:{j} failed with exit code {proc.returncode}", file=sys.stderr)
                    return 1
                done[(m, j)] = json.loads(path.read_text())
                print(f"  done {m}:{j} in {done[(m, j)]['seconds']:.0f} s "
                      f"(wall {time.perf_counter() - t0:.0f} s)", flush=True)
    results, analyses = {}, {}
    for m in models:
        r = {}
        for j in ("UPT", "D", "F4"):
            r.update(done[(m, j)])
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
