"""All methods side by side, several seeds, one evaluation protocol: markdown tables, PNG plots, the papers' claims.

    pip install -r requirements-bench.txt
    python benchmarks/benchmark.py                        # everything: toy2d, shapes, overhead (32 min, 2 cores;
                                                          # the first time 13 more: the shapes base model)
    python benchmarks/benchmark.py --tasks toy2d          # one part (toy2d about 4 min)
    python benchmarks/benchmark.py --tasks toy2d --seeds 0 --out /tmp/bench   # a quick look

Two tasks, each method at its own preset for that task and the same evaluation for all:
- toy2d: every method's toy preset (its script's default), seeds 0 1 2, evaluation every 25 iterations
  (20-step Euler ODE, 64 fixed-noise samples per prompt); "reached" = eval reward >= 0.8.
- shapes (infra/shapes.py; the first run pretrains the cached base model, ~13 min, not counted above): every method's
  shapes preset cut to the same 20 iterations (G2RPO stops at its preset's 10: later it reward-hacks), seeds 0 1,
  evaluation every 5 iterations on the 102 held-out prompts x 1 fixed-noise sample; "reached" = held-out reward
  >= 0.42 (the base model scores 0.405).
Then `timing.py --config mid` ("overhead"): the share of iteration time spent inside transformer calls, per
method, on a mid-size FLUX.

Every run's metrics.jsonl / summary.json land under `<out>/runs/` (a finished run is not run again); the report
`<out>/benchmark.md` and the figures `<out>/<task>.png` are built from them. Costs: NFE without and with gradient
(exact, machine independent), a FLOP proxy NFE_no_grad + 3 NFE_grad (a backward pass costs about two forwards),
and training seconds (evaluation excluded; noisy, compare ratios).
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

# Every method is evaluated on its trained weights. The Flow-GRPO, DGPO and Pro-GRPO presets evaluate an EMA of them,
# as the official code does; over a benchmark's few hundred (toy) or 20 (shapes) optimizer steps that EMA lags the
# weights, and the other methods have none, so it is turned off here.
NO_EMA = ["--no-eval-ema"]
# name -> (script, flags). The flags select the preset for the task; the rest is the shared protocol below.
TASKS = {
    "toy2d": {
        "seeds": [0, 1, 2], "eval_every": 25, "threshold": 0.8, "metric": "on_manifold", "protocol": [],
        "methods": {
            "Flow-GRPO": ("flow_grpo.py", NO_EMA),
            "DanceGRPO": ("flow_grpo.py", ["--preset", "toy2d-dancegrpo"]),
            "DGPO": ("dgpo.py", NO_EMA),
            "Neighbor GRPO": ("neighbor_grpo.py", []),
            # the paper's sparse setting: 4 anchors, 4 trained timesteps (NFE_theta 1 per sample)
            "Neighbor GRPO (B4, K4)": ("neighbor_grpo.py", ["--num-anchors", "4", "--num-train-timesteps", "4"]),
            "G2RPO": ("g2rpo.py", []),
            "Pro-GRPO": ("pro_grpo.py", NO_EMA),
        },
    },
    "shapes": {
        "seeds": [0, 1], "eval_every": 5, "threshold": 0.42, "metric": "quality",
        "protocol": ["--model", "shapes", "--eval-samples-per-prompt", "1"],
        "methods": {
            "Flow-GRPO": ("flow_grpo.py", ["--iterations", "20", *NO_EMA]),
            "DanceGRPO": ("flow_grpo.py", ["--preset", "shapes-dancegrpo", "--iterations", "20"]),
            "DGPO": ("dgpo.py", ["--iterations", "20", *NO_EMA]),
            "Neighbor GRPO": ("neighbor_grpo.py", ["--iterations", "20"]),
            "G2RPO": ("g2rpo.py", []),  # its preset's 10 iterations
            "Pro-GRPO": ("pro_grpo.py", NO_EMA),  # its preset's 20 iterations
        },
    },
}
# the baseline each method is compared with, and the sample count per iteration of a Flow-GRPO iteration
BASELINE = "Flow-GRPO"


def run_dir_name(name: str, seed: int) -> str:
    return f"{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}_s{seed}"


def run_one(task: str, name: str, script: str, flags: list[str], seed: int, out: Path):
    spec = TASKS[task]
    run_dir = out / "runs" / task / run_dir_name(name, seed)
    if not (run_dir / "summary.json").exists():
        cmd = [sys.executable, str(ROOT / script), *spec["protocol"], *flags, "--seed", str(seed),
               "--eval-every", str(spec["eval_every"]), "--output-dir", str(run_dir), "--log-every", "0",
               "--checkpoint-every", "0", "--no-save-weights"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{task} {name} seed {seed} failed:\n{proc.stderr[-3000:]}")
        print(f"  {task:6s} {name:24s} seed {seed}: {time.time() - t0:6.1f} s", flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["config"] = json.loads((run_dir / "config.json").read_text())
    return summary, rows


def curve(summary, rows, metric: str):
    """Eval points (iteration, cumulative NFE no-grad, grad, train seconds, reward, metric), from 0."""
    pts = [(0, 0, 0, 0.0, summary["eval_reward_before"], summary[f"{metric}_before"])]
    ng = g = secs = 0.0
    for r in rows:
        ng, g, secs = ng + r["nfe/rollout"], g + r["nfe/train"], secs + r["time/iteration_seconds"]
        if "eval/reward" in r:
            pts.append((r["iteration"] + 1, ng, g, secs, r["eval/reward"], r[f"eval/{metric}"]))
    pts.append((summary["iterations"], summary["nfe_rollout"], summary["nfe_train"], secs,
                summary["eval_reward_after"], summary[f"{metric}_after"]))
    return pts


def first_reach(pts, threshold: float):
    for it, ng, g, secs, reward, _ in pts:
        if reward >= threshold:
            return {"iteration": it, "flops": ng + 3 * g, "seconds": secs}
    return None


def mean_std(xs, fmt="{:.3f}"):
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} +- {fmt.format(statistics.stdev(xs))}"


def method_stats(runs, spec) -> dict:
    """Per-method numbers over seeds: final reward and metric, costs per iteration, cost to the threshold."""
    curves = [curve(s, rows, spec["metric"]) for s, rows in runs]
    its, config = runs[0][0]["iterations"], runs[0][0]["config"]
    # the group that trains: Pro-GRPO's last funnel size, else G
    group = int(str(config.get("group_sizes") or config["group_size"]).split(",")[-1])
    hit = [r for r in (first_reach(c, spec["threshold"]) for c in curves) if r]
    return {
        "iterations": its,
        "reward_before": runs[0][0]["eval_reward_before"],
        "metric_before": runs[0][0][f"{spec['metric']}_before"],
        "reward": [s["eval_reward_after"] for s, _ in runs],
        "metric": [s[f"{spec['metric']}_after"] for s, _ in runs],
        "nfe_ng_it": runs[0][0]["nfe_rollout"] / its, "nfe_g_it": runs[0][0]["nfe_train"] / its,
        "group": group, "config_groups": config.get("group_sizes", "").replace(",", "->"),
        "samples_it": config["prompts_per_iteration"] * group,
        "sec_it": [statistics.median(r["time/iteration_seconds"] for r in rows) for _, rows in runs],
        "reached": f"{len(hit)}/{len(curves)}",
        "reach_flops": [r["flops"] for r in hit], "reach_seconds": [r["seconds"] for r in hit],
        "reach_iters": [r["iteration"] for r in hit], "curves": curves,
    }


def at_iteration(stat, it):
    """Mean over seeds of the eval reward at the first evaluation at or after iteration `it`."""
    return statistics.mean(next((pt[4] for pt in c if pt[0] >= it), c[-1][4]) for c in stat["curves"])


# ======================================================================================================
# Report: the per-task table, ratios against the baseline, and the plots
# ======================================================================================================


def task_report(task: str, stats: dict, seeds: list[int], out: Path) -> list[str]:
    spec = TASKS[task]
    thr, metric = spec["threshold"], spec["metric"].replace("_", "-")
    any_stat = next(iter(stats.values()))
    lines = [f"## {task} ({len(seeds)} seeds: {' '.join(map(str, seeds))})", "",
             f"Eval reward and {metric} after training (mean +- std over seeds; before training: reward "
             f"{any_stat['reward_before']:.3f}, {metric} {any_stat['metric_before']:.3f}); NFE per iteration; "
             f"FLOP proxy = NFE_no_grad + 3 NFE_grad; 'to {thr}' = first evaluation (every {spec['eval_every']} "
             f"iterations) with eval reward >= {thr}, averaged over the seeds that reached it; seconds exclude "
             f"evaluation.", "",
             f"| method | iterations | eval reward | {metric} | NFE no-grad / grad per it | s / it | reached {thr} | "
             f"iterations to {thr} | FLOP proxy to {thr} | seconds to {thr} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['iterations']} | {mean_std(s['reward'])} | {mean_std(s['metric'])} | "
                     f"{s['nfe_ng_it']:,.0f} / {s['nfe_g_it']:,.0f} | {mean_std(s['sec_it'], '{:.3f}')} | "
                     f"{s['reached']} | {mean_std(s['reach_iters'], '{:.0f}')} | "
                     f"{mean_std(s['reach_flops'], '{:,.0f}')} | {mean_std(s['reach_seconds'], '{:.1f}')} |")
    base = stats.get(BASELINE)
    if base and base["reach_flops"]:
        lines += ["", f"Ratios against {BASELINE} (> 1: cheaper than {BASELINE}):", "",
                  f"| method | FLOP proxy to {thr} | seconds to {thr} | grad NFE per iteration | "
                  "seconds per iteration |",
                  "| --- | --- | --- | --- | --- |"]
        bf, bs = statistics.mean(base["reach_flops"]), statistics.mean(base["reach_seconds"])
        for name, s in stats.items():
            f = f"{bf / statistics.mean(s['reach_flops']):.2f}x" if s["reach_flops"] else "not reached"
            t = f"{bs / statistics.mean(s['reach_seconds']):.2f}x" if s["reach_seconds"] else "not reached"
            g = f"{base['nfe_g_it'] / s['nfe_g_it']:.1f}x" if s["nfe_g_it"] else "-"
            it = f"{statistics.mean(base['sec_it']) / statistics.mean(s['sec_it']):.2f}x"
            lines.append(f"| {name} | {f} | {t} | {g} | {it} |")
    plot(task, stats, seeds, out)
    lines += ["", f"![{task} curves]({task}.png)", ""]
    return lines


def plot(task: str, stats: dict, seeds: list[int], out: Path):
    """Eval reward vs FLOP proxy, training seconds and iteration; the quality metric vs iteration; the NFE
    without and with gradient per iteration and the seconds per iteration (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = TASKS[task]["metric"].replace("_", "-")
    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    axes = axes.ravel()
    for name, s in stats.items():
        n = min(len(c) for c in s["curves"])
        avg = lambda k: [statistics.mean(c[i][k] for c in s["curves"]) for i in range(n)]  # noqa: E731
        it, ng, g, secs, rew, met = (avg(k) for k in range(6))
        axes[0].plot([a + 3 * b for a, b in zip(ng, g)], rew, label=name, marker=".")
        axes[1].plot(secs, rew, label=name, marker=".")
        axes[2].plot(it, rew, label=name, marker=".")
        axes[3].plot(it, met, label=name, marker=".")
    names = list(stats)
    xs = range(len(names))
    axes[4].bar([x - 0.2 for x in xs], [stats[n]["nfe_ng_it"] for n in names], 0.4, label="no grad (rollout etc.)")
    axes[4].bar([x + 0.2 for x in xs], [stats[n]["nfe_g_it"] for n in names], 0.4, label="with grad (training)")
    axes[4].set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    axes[4].set_yscale("log")
    axes[4].set_ylim(bottom=10)
    axes[4].legend(fontsize=8)
    secs = [statistics.mean(stats[n]["sec_it"]) for n in names]
    axes[5].bar(list(xs), secs, 0.6, color="tab:gray")
    axes[5].set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    labels = [("FLOP proxy (NFE no-grad + 3 NFE grad)", "eval reward"), ("training seconds", "eval reward"),
              ("iteration", "eval reward"), ("iteration", metric), ("", "NFE per iteration"),
              ("", "training seconds per iteration (median)")]
    for ax, (xl, yl) in zip(axes, labels):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}, mean over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(out / f"{task}.png", dpi=100)
    plt.close(fig)


# ======================================================================================================
# The papers' headline claims (docs/algorithms.md), checked on every task that ran
# ======================================================================================================


def claims_rows(task: str, stats: dict) -> dict[str, tuple[str, str]]:
    """claim -> (measured, reproduced?) on one task."""
    thr, rows = TASKS[task]["threshold"], {}
    base = stats.get(BASELINE)
    mean = statistics.mean
    if base and "DGPO" in stats:
        d = stats["DGPO"]
        if d["reach_seconds"] and base["reach_seconds"]:
            r = mean(base["reach_seconds"]) / mean(d["reach_seconds"])
            rf = mean(base["reach_flops"]) / mean(d["reach_flops"])
            rows["dgpo"] = (f"{r:.2f}x seconds, {rf:.2f}x FLOP proxy to reward {thr}", "yes" if r >= 20 else "no")
        else:
            rows["dgpo"] = (f"reward {thr} reached by DGPO {d['reached']}, {BASELINE} {base['reached']} seeds",
                            "not measurable")
    if {"DanceGRPO", "Neighbor GRPO"} <= stats.keys():
        dn = stats["DanceGRPO"]
        nb = stats.get("Neighbor GRPO (B4, K4)", stats["Neighbor GRPO"])
        label = "B4, K4" if "Neighbor GRPO (B4, K4)" in stats else "its preset"
        sp = mean(dn["sec_it"]) / mean(nb["sec_it"])
        theta = lambda s: s["nfe_g_it"] / s["samples_it"]  # noqa: E731  (gradient NFE per trained sample)
        rows["neighbor"] = (f"{sp:.2f}x per iteration ({label}); NFE_theta {theta(nb):.2f} vs {theta(dn):.2f}",
                            "yes" if sp >= 5.3 else "no (speed)")
    if base and "Pro-GRPO" in stats:
        pr = stats["Pro-GRPO"]
        fl = lambda s: s["nfe_ng_it"] + 3 * s["nfe_g_it"]  # noqa: E731
        saving = 1 - fl(pr) / fl(base)
        better = mean(pr["reward"]) > mean(base["reward"])
        word = "fewer" if saving >= 0 else "more"
        rows["pro"] = (f"{abs(saving):.0%} {word} FLOPs per iteration than {BASELINE} G {base['group']} (Pro-GRPO "
                       f"{pr['config_groups']}); reward {mean(pr['reward']):.3f} vs {mean(base['reward']):.3f}",
                       "yes" if saving >= 0.26 and better else "no")
    if {"DanceGRPO", "G2RPO"} <= stats.keys():
        it = stats["G2RPO"]["iterations"]
        g2, dn = at_iteration(stats["G2RPO"], it), at_iteration(stats["DanceGRPO"], it)
        rows["g2rpo"] = (f"eval reward at iteration {it}: {g2:.3f} vs {dn:.3f}", "yes" if g2 > dn else "no")
    return rows


CLAIMS = {
    "dgpo": ("DGPO ~20x fewer GPU-hours than Flow-GRPO", "training seconds and FLOP proxy to the threshold"),
    "neighbor": ("Neighbor GRPO 5.3x faster per iteration than DanceGRPO, NFE_theta 1.33 vs 14",
                 "seconds per iteration and gradient NFE"),
    "pro": ("Pro-GRPO -26% FLOPs vs Flow-GRPO, at higher reward", "FLOP proxy per iteration, final eval reward"),
    "g2rpo": ("G2RPO above DanceGRPO at equal iterations", "eval reward at G2RPO's last iteration"),
}


def claims_table(per_task: dict[str, dict]) -> list[str]:
    measured = {task: claims_rows(task, stats) for task, stats in per_task.items()}
    tasks = list(per_task)
    lines = ["## The papers' claims, measured", "",
             "| claim | what is measured | " + " | ".join(f"{t}: measured | {t}: reproduced?" for t in tasks) + " |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in tasks) + " |"]
    for key, (claim, what) in CLAIMS.items():
        cells = []
        for t in tasks:
            m, ok = measured[t].get(key, ("-", "-"))
            cells += [m, ok]
        lines.append(f"| {claim} | {what} | " + " | ".join(cells) + " |")
    return lines + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["toy2d", "shapes", "overhead"],
                   help="any of: toy2d, shapes, overhead")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override every task's seeds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the method names")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    per_task, lines, run_seconds = {}, [], 0.0
    for task in [t for t in args.tasks if t in TASKS]:
        spec = TASKS[task]
        seeds = args.seeds or spec["seeds"]
        names = [n for n in spec["methods"] if args.methods is None or n in args.methods]
        stats = {}
        for name in names:
            script, flags = spec["methods"][name]
            runs = [run_one(task, name, script, flags, s, args.out) for s in seeds]
            run_seconds += sum(s["wall_seconds"] for s, _ in runs)
            stats[name] = method_stats(runs, spec)
        per_task[task] = stats
        lines += task_report(task, stats, seeds, args.out)
    if per_task:
        lines += claims_table(per_task)
    if "overhead" in args.tasks:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "timing.py"), "--config", "mid",
               "--out", str(args.out / "overhead.md")]
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        run_seconds += time.time() - t0
        lines += (args.out / "overhead.md").read_text().splitlines() + [""]

    header = ["# Benchmark", "", f"Generated by `python benchmarks/benchmark.py --tasks {' '.join(args.tasks)}` "
              f"in {(time.time() - t_start) / 60:.0f} min; runs already on disk are reused, not rerun. From scratch "
              f"the runs take {run_seconds / 60:.0f} min (the sum of their wall_seconds and of the overhead "
              f"measurement; the shapes base model's one-time pretraining not included).", ""]
    (args.out / "benchmark.md").write_text("\n".join(header + lines))
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
