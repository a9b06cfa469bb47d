"""The benchmark's bookkeeping: cumulative cost along the eval curve, the first crossing of the threshold, and the
claims table computed from per-method statistics."""

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
