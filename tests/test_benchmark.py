"""The benchmark's bookkeeping: the protocol a run is launched with, cumulative cost along the eval curve, the first
crossing of the threshold, the per-task table with its ratios, and the claims table, from per-method statistics."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import benchmark as tb  # noqa: E402


def _run(reward_after, nfe_rollout, nfe_train, eval_at=None, iterations=4, sec=0.5, config=None):
    summary = {"eval_reward_before": 0.1, "quality_before": 0.9, "iterations": iterations,
               "nfe_rollout": nfe_rollout, "nfe_train": nfe_train, "eval_reward_after": reward_after,
               "quality_after": 1.0, "config": config or {"prompts_per_iteration": 2, "group_size": 4}}
    rows = [{"iteration": i, "nfe/rollout": nfe_rollout / iterations, "nfe/train": nfe_train / iterations,
             "time/iteration_seconds": sec} for i in range(iterations)]
    for it, r in (eval_at or {}).items():
        rows[it - 1].update({"eval/reward": r, "eval/quality": 0.95})
    return summary, rows


def test_curve_accumulates_costs_and_first_reach_uses_the_flop_proxy():
    summary, rows = _run(0.9, 40, 8, eval_at={2: 0.85})
    pts = tb.curve(summary, rows, "quality")
    assert pts[0] == (0, 0, 0, 0.0, 0.1, 0.9)
    assert pts[1] == (2, 20, 4, 1.0, 0.85, 0.95)
    assert pts[-1] == (4, 40, 8, 2.0, 0.9, 1.0)
    assert tb.first_reach(pts, 0.8) == {"iteration": 2, "flops": 20 + 3 * 4, "seconds": 1.0}
    assert tb.first_reach(pts, 0.95) is None


def test_claims_rows_from_method_statistics():
    spec = {"threshold": 0.8, "metric": "quality"}
    stats = {
        # baseline: reaches 0.8 at iteration 4, 4 x 0.5 s; 10 + 3 * 5 = 25 FLOP-proxy units per iteration
        "Flow-GRPO": tb.method_stats([_run(0.9, 40, 20, eval_at={4: 0.9})], spec),
        # Pro-GRPO: 15 + 3 * 2.5 = 22.5 per iteration: 10% fewer, at higher reward
        "Pro-GRPO": tb.method_stats([_run(0.95, 60, 10, config={"prompts_per_iteration": 2, "group_size": 4,
                                                                  "group_sizes": "16,8,4"})], spec),
        # DGPO reaches 0.8 at iteration 1: 4x fewer seconds than the baseline
        "DGPO": tb.method_stats([_run(0.9, 40, 20, eval_at={1: 0.85})], spec),
        "DanceGRPO": tb.method_stats([_run(0.3, 40, 24, eval_at={2: 0.2}, sec=1.0)], spec),
        "G2RPO": tb.method_stats([_run(0.5, 40, 4, iterations=2, eval_at={2: 0.5})], spec),
        "Neighbor GRPO": tb.method_stats([_run(0.9, 40, 8, sec=0.25)], spec),
    }
    tb.TASKS["unit"] = spec
    try:
        rows = tb.claims_rows("unit", stats)
    finally:
        del tb.TASKS["unit"]
    assert rows["dgpo"] == ("4.00x seconds, 4.00x FLOP proxy to reward 0.8", "no")
    assert rows["pro"][0].startswith("10% fewer FLOPs per iteration than Flow-GRPO G 4 (Pro-GRPO 16->8->4)")
    assert rows["pro"][1] == "no"  # 10% < 26%, even at higher reward
    # per trained sample (2 prompts x G 4 = 8): Neighbor 2 / 8, DanceGRPO 6 / 8
    assert rows["neighbor"] == ("4.00x per iteration (its preset); NFE_theta 0.25 vs 0.75", "no (speed)")
    assert rows["g2rpo"] == ("eval reward at iteration 2: 0.500 vs 0.200", "yes")


def test_seconds_per_iteration_is_the_median_and_spread_is_the_sample_std():
    """The first iteration carries the warm-up (compilation, allocator growth): the per-iteration seconds are the
    median over iterations, so one slow iteration does not move them; the spread over seeds is the sample std."""
    summary, rows = _run(0.9, 40, 8)
    for r, sec in zip(rows, (5.0, 0.5, 0.5, 0.7)):
        r["time/iteration_seconds"] = sec
    stat = tb.method_stats([(summary, rows)], {"threshold": 0.8, "metric": "quality"})
    assert stat["sec_it"] == [0.6]  # the mean would be 1.675
    assert tb.mean_std([1.0, 2.0, 3.0]) == "2.000 +- 1.000"  # sample std 1; the population std is 0.816


def test_task_report_table_and_ratios_against_the_baseline(monkeypatch, tmp_path):
    """Every number of the per-task table, and the ratios (> 1: cheaper than Flow-GRPO), worked out by hand."""
    plotted = []
    monkeypatch.setattr(tb, "plot", lambda task, stats, seeds, out: plotted.append(task))
    spec = {"threshold": 0.8, "metric": "quality", "eval_every": 1}
    stats = {
        # reaches 0.8 at iteration 4: FLOP proxy 40 + 3 x 20 = 100, 4 x 0.5 = 2.0 s; 10 / 5 NFE per iteration
        "Flow-GRPO": tb.method_stats([_run(0.9, 40, 20, eval_at={4: 0.9})], spec),
        # reaches it at iteration 1: 20 + 3 x 2 = 26, 0.3 s; 20 / 2 NFE per iteration, 0.3 s per iteration
        "DGPO": tb.method_stats([_run(0.9, 80, 8, eval_at={1: 0.85}, sec=0.3)], spec),
        "DanceGRPO": tb.method_stats([_run(0.3, 40, 24, eval_at={2: 0.2}, sec=1.0)], spec),
    }
    tb.TASKS["unit"] = spec
    try:
        lines = tb.task_report("unit", stats, [0], tmp_path)
    finally:
        del tb.TASKS["unit"]
    assert plotted == ["unit"]
    assert "| DGPO | 4 | 0.900 | 1.000 | 20 / 2 | 0.300 | 1/1 | 1 | 26 | 0.3 |" in lines
    assert "| DanceGRPO | 4 | 0.300 | 1.000 | 10 / 6 | 1.000 | 0/1 | - | - | - |" in lines
    # FLOP proxy 100 / 26, seconds 2.0 / 0.3, grad NFE per iteration 5 / 2, seconds per iteration 0.5 / 0.3
    assert "| DGPO | 3.85x | 6.67x | 2.5x | 1.67x |" in lines
    assert "| DanceGRPO | not reached | not reached | 0.8x | 0.50x |" in lines
    assert "| Flow-GRPO | 1.00x | 1.00x | 1.0x | 1.00x |" in lines


def test_pro_grpo_claim_needs_the_saving_and_a_higher_reward_not_a_higher_quality():
    """Pro-GRPO's claim: >= 26% fewer FLOPs per iteration than Flow-GRPO at a higher final eval REWARD (the quality
    metric is reported beside it, not judged)."""
    spec = {"threshold": 0.8, "metric": "quality"}
    base = tb.method_stats([_run(0.5, 40, 20)], spec)  # 10 + 3 x 5 = 25 per iteration

    def claim(reward, quality):
        summary, rows = _run(reward, 40, 8)  # 10 + 3 x 2 = 16 per iteration: 36% fewer
        summary["quality_after"] = quality
        tb.TASKS["unit"] = spec
        try:
            return tb.claims_rows("unit", {"Flow-GRPO": base, "Pro-GRPO": tb.method_stats([(summary, rows)], spec)})
        finally:
            del tb.TASKS["unit"]

    assert claim(0.6, 0.5)["pro"][1] == "yes"  # higher reward, lower quality (base 1.0)
    assert claim(0.4, 1.5)["pro"][1] == "no"  # lower reward, higher quality
    assert claim(0.6, 0.5)["pro"][0].startswith("36% fewer FLOPs per iteration")


def test_a_benchmark_run_follows_the_protocol(tmp_path):
    """run_one launches the script with the task's protocol: evaluations every `eval_every` iterations (the curves
    and the cost-to-threshold are built from them), its seed, no checkpoints or weights; a finished run is read back,
    not run again."""
    tb.TASKS["unit"] = {**tb.TASKS["toy2d"], "eval_every": 4}
    try:
        flags = ["--iterations", "8", "--eval-samples-per-prompt", "4"]
        summary, rows = tb.run_one("unit", "Flow-GRPO", "flow_grpo.py", flags, 3, tmp_path)
        run_dir = tmp_path / "runs" / "unit" / "Flow-GRPO_s3"
        assert summary["seed"] == 3 and summary["config"]["seed"] == 3 and summary["iterations"] == 8
        assert [r["iteration"] for r in rows if "eval/reward" in r] == [3]  # iteration 8 is the "after" evaluation
        assert not (run_dir / "final").exists() and not (run_dir / "checkpoints").exists()
        pts = tb.curve(summary, rows, "on_manifold")
        assert [p[0] for p in pts] == [0, 4, 8]
        # each line holds its own iteration's NFE (the curve sums them; evaluation counts none), which add up to
        # the run's totals: 8 prompts x G 16 x 10 SDE steps without gradient, the 9 trained ones with it
        assert {(r["nfe/rollout"], r["nfe/train"]) for r in rows} == {(1280, 1152)}
        assert (summary["nfe_rollout"], summary["nfe_train"]) == (8 * 1280, 8 * 1152)
        assert pts[1][1:3] == (4 * 1280, 4 * 1152)
        stamp = (run_dir / "summary.json").stat().st_mtime_ns
        assert tb.run_one("unit", "Flow-GRPO", "flow_grpo.py", flags, 3, tmp_path)[0] == summary
        assert (run_dir / "summary.json").stat().st_mtime_ns == stamp  # read back, not rerun
    finally:
        del tb.TASKS["unit"]
