"""All methods side by side on toy2d, several seeds, one evaluation protocol; writes a markdown report and plots.

    pip install -r requirements-bench.txt
    python benchmarks/toy_benchmark.py                  # 3 seeds, about 10 minutes on 2 CPU cores
    python benchmarks/toy_benchmark.py --seeds 0 --out /tmp/bench   # a quick look

Each method runs its own toy preset (the script's default) with the shared evaluation every 25 iterations
(20-step Euler ODE, 64 fixed-noise samples per prompt). Every run's metrics.jsonl / summary.json land under
`<out>/runs/`; the report `<out>/toy2d.md` and the figure `<out>/toy2d.png` are built from them. Costs:
NFE without and with gradient (exact, machine independent), a FLOP proxy NFE_no_grad + 3 NFE_grad (a backward
pass costs about two forwards), and training seconds (evaluation excluded; noisy, compare ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.8  # "reached" = eval reward >= this
EVAL_EVERY = 25

# name -> (script, flags): each method at its toy preset, plus the paper's sparse Neighbor GRPO setting.
METHODS = {
    "Flow-GRPO": ("flow_grpo.py", []),
    "DanceGRPO": ("flow_grpo.py", ["--preset", "toy2d-dancegrpo"]),
    "DGPO": ("dgpo.py", []),
    "Neighbor GRPO": ("neighbor_grpo.py", []),
    "Neighbor GRPO (B4, K4)": ("neighbor_grpo.py", ["--num-anchors", "4", "--num-train-timesteps", "4"]),
    "G2RPO": ("g2rpo.py", []),
    "Pro-GRPO": ("pro_grpo.py", []),
}


def run_one(name, script, flags, seed, out: Path):
    run_dir = out / "runs" / f"{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}_s{seed}"
    if not (run_dir / "summary.json").exists():
        cmd = [sys.executable, str(ROOT / script), *flags, "--seed", str(seed), "--eval-every", str(EVAL_EVERY),
               "--output-dir", str(run_dir), "--log-every", "0", "--checkpoint-every", "0", "--no-save-weights"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
        print(f"  {name:24s} seed {seed}: {time.time() - t0:5.1f} s", flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def curve(summary, rows):
    """Eval points (iteration, cumulative NFE no-grad, grad, train seconds, reward, on-manifold), from 0."""
    pts = [(0, 0, 0, 0.0, summary["eval_reward_before"], summary["on_manifold_before"])]
    ng = g = secs = 0.0
    for r in rows:
        ng, g, secs = ng + r["nfe/rollout"], g + r["nfe/train"], secs + r["time/iteration_seconds"]
        if "eval/reward" in r:
            pts.append((r["iteration"] + 1, ng, g, secs, r["eval/reward"], r["eval/on_manifold"]))
    pts.append((summary["iterations"], summary["nfe_rollout"], summary["nfe_train"], secs,
                summary["eval_reward_after"], summary["on_manifold_after"]))
    return pts


def first_reach(pts):
    for it, ng, g, secs, reward, _ in pts:
        if reward >= THRESHOLD:
            return {"iteration": it, "flops": ng + 3 * g, "seconds": secs}
    return None


def mean_std(xs, fmt="{:.3f}"):
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} +- {fmt.format(statistics.stdev(xs))}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    results = {}
    for name in args.methods:
        script, flags = METHODS[name]
        results[name] = [run_one(name, script, flags, s, args.out) for s in args.seeds]

    # ---- per-method statistics ----------------------------------------------------------------------
    stats = {}
    for name, runs in results.items():
        curves = [curve(s, rows) for s, rows in runs]
        its = [s["iterations"] for s, _ in runs]
        reach = [first_reach(c) for c in curves]
        hit = [r for r in reach if r]
        stats[name] = {
            "iterations": its[0],
            "reward": [s["eval_reward_after"] for s, _ in runs],
            "manifold": [s["on_manifold_after"] for s, _ in runs],
            "nfe_ng_it": runs[0][0]["nfe_rollout"] / its[0], "nfe_g_it": runs[0][0]["nfe_train"] / its[0],
            "sec_it": [statistics.median(r["time/iteration_seconds"] for r in rows) for _, rows in runs],
            "reached": f"{len(hit)}/{len(reach)}",
            "reach_flops": [r["flops"] for r in hit], "reach_seconds": [r["seconds"] for r in hit],
            "reach_iters": [r["iteration"] for r in hit], "curves": curves,
        }
    base = stats.get("Flow-GRPO")

    # ---- the report ---------------------------------------------------------------------------------
    samples = 8 * 16  # samples per iteration of the baseline (8 prompts x G 16)
    lines = [f"# toy2d benchmark ({len(args.seeds)} seeds: {' '.join(map(str, args.seeds))})", "",
             f"Generated by `python benchmarks/toy_benchmark.py`. Eval reward and on-manifold after training "
             f"(mean +- std over seeds); NFE per iteration; FLOP proxy = NFE_no_grad + 3 NFE_grad; "
             f"'to {THRESHOLD}' = first evaluation (every {EVAL_EVERY} iterations) with eval reward >= "
             f"{THRESHOLD}, averaged over the seeds that reached it; seconds exclude evaluation.", "",
             "| method | iterations | eval reward | on-manifold | NFE no-grad / grad per it | s / it | reached "
             f"{THRESHOLD} | iterations to {THRESHOLD} | FLOP proxy to {THRESHOLD} | seconds to {THRESHOLD} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['iterations']} | {mean_std(s['reward'])} | {mean_std(s['manifold'])} | "
                     f"{s['nfe_ng_it']:,.0f} / {s['nfe_g_it']:,.0f} | {mean_std(s['sec_it'], '{:.4f}')} | "
                     f"{s['reached']} | {mean_std(s['reach_iters'], '{:.0f}')} | "
                     f"{mean_std(s['reach_flops'], '{:,.0f}')} | {mean_std(s['reach_seconds'], '{:.1f}')} |")
    if base and base["reach_flops"]:
        lines += ["", "Ratios against Flow-GRPO (> 1: cheaper than Flow-GRPO):", "",
                  "| method | FLOP proxy to threshold | seconds to threshold | grad NFE per iteration |",
                  "| --- | --- | --- | --- |"]
        bf, bs = statistics.mean(base["reach_flops"]), statistics.mean(base["reach_seconds"])
        for name, s in stats.items():
            f = f"{bf / statistics.mean(s['reach_flops']):.2f}x" if s["reach_flops"] else "not reached"
            t = f"{bs / statistics.mean(s['reach_seconds']):.2f}x" if s["reach_seconds"] else "not reached"
            g = f"{base['nfe_g_it'] / s['nfe_g_it']:.1f}x" if s["nfe_g_it"] else "-"
            lines.append(f"| {name} | {f} | {t} | {g} |")

    # ---- the papers' headline claims, checked on the toy ------------------------------------------------
    def at_iteration(name, it):
        vals = [next((pt[4] for pt in c if pt[0] >= it), c[-1][4]) for c in stats[name]["curves"]]
        return statistics.mean(vals)

    claims = ["", "## The papers' claims, measured on the toy", "",
              "| claim | what this benchmark measures | measured | reproduced? |", "| --- | --- | --- | --- |"]
    if {"Flow-GRPO", "DGPO"} <= stats.keys() and stats["DGPO"]["reach_seconds"] and base["reach_seconds"]:
        r = statistics.mean(base["reach_seconds"]) / statistics.mean(stats["DGPO"]["reach_seconds"])
        rf = statistics.mean(base["reach_flops"]) / statistics.mean(stats["DGPO"]["reach_flops"])
        claims.append(f"| DGPO ~20x fewer GPU-hours than Flow-GRPO | training seconds and FLOP proxy to reward "
                      f"{THRESHOLD} | {r:.2f}x seconds, {rf:.2f}x FLOP proxy | {'yes' if r >= 20 else 'no'} |")
    if {"DanceGRPO", "Neighbor GRPO (B4, K4)"} <= stats.keys():
        d, n = stats["DanceGRPO"], stats["Neighbor GRPO (B4, K4)"]
        sp = statistics.mean(d["sec_it"]) / statistics.mean(n["sec_it"])
        claims.append(f"| Neighbor GRPO 5.3x faster per iteration than DanceGRPO, NFE_theta 1.33 vs 14 | "
                      f"seconds per iteration and gradient NFE per sample (B 4, K 4 vs DanceGRPO's 60% of 10 "
                      f"steps) | {sp:.2f}x per iteration; NFE_theta {n['nfe_g_it'] / samples:.2f} vs "
                      f"{d['nfe_g_it'] / samples:.2f} | {'yes' if sp >= 5.3 else 'no'} (speed) |")
    if {"Flow-GRPO", "Pro-GRPO"} <= stats.keys():
        pr = stats["Pro-GRPO"]
        fl = lambda s: s["nfe_ng_it"] + 3 * s["nfe_g_it"]
        saving = 1 - fl(pr) / fl(base)
        better = statistics.mean(pr["reward"]) > statistics.mean(base["reward"])
        fewer = "fewer" if saving >= 0 else "more"
        claims.append(f"| Pro-GRPO -26% FLOPs vs Flow-GRPO at higher reward | FLOP proxy per iteration against "
                      f"Flow-GRPO G 16, final eval reward | {abs(saving):.0%} {fewer} FLOPs per iteration; reward "
                      f"{statistics.mean(pr['reward']):.3f} vs {statistics.mean(base['reward']):.3f} | "
                      f"{'yes' if saving >= 0.26 and better else 'no'} |")
    if {"DanceGRPO", "G2RPO"} <= stats.keys():
        it = stats["G2RPO"]["iterations"]
        g2, dn = at_iteration("G2RPO", it), at_iteration("DanceGRPO", it)
        claims.append(f"| G2RPO above DanceGRPO at equal iterations | eval reward at iteration {it} | "
                      f"{g2:.3f} vs {dn:.3f} | {'yes' if g2 > dn else 'no'} |")
    lines += claims

    # ---- plots ------------------------------------------------------------------------------------------
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    for name, s in stats.items():
        n = min(len(c) for c in s["curves"])
        avg = lambda k: [statistics.mean(c[i][k] for c in s["curves"]) for i in range(n)]
        it, ng, g, secs, rew, man = (avg(k) for k in range(6))
        axes[0].plot([a + 3 * b for a, b in zip(ng, g)], rew, label=name, marker=".")
        axes[1].plot(secs, rew, label=name, marker=".")
        axes[2].plot(it, rew, label=name, marker=".")
        axes[3].plot(it, man, label=name, marker=".")
    for ax, xl, yl in zip(axes, ["FLOP proxy (NFE no-grad + 3 NFE grad)", "training seconds", "iteration",
                                 "iteration"], ["eval reward"] * 3 + ["on-manifold"]):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"toy2d, mean over seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(args.out / "toy2d.png", dpi=110)
    lines += ["", "![toy2d curves](toy2d.png)", ""]
    (args.out / "toy2d.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
