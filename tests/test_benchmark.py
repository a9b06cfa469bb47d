"""The benchmark's bookkeeping: cumulative cost along the eval curve and the first crossing of the threshold."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import toy_benchmark as tb  # noqa: E402


def test_curve_accumulates_costs_and_first_reach_uses_the_flop_proxy():
    summary = {"eval_reward_before": 0.1, "on_manifold_before": 0.9, "iterations": 4, "nfe_rollout": 40,
               "nfe_train": 8, "eval_reward_after": 0.9, "on_manifold_after": 1.0}
    rows = [{"iteration": i, "nfe/rollout": 10, "nfe/train": 2, "time/iteration_seconds": 0.5} for i in range(4)]
    rows[1].update({"eval/reward": 0.85, "eval/on_manifold": 0.95})
    pts = tb.curve(summary, rows)
    assert pts[0] == (0, 0, 0, 0.0, 0.1, 0.9)
    assert pts[1] == (2, 20, 4, 1.0, 0.85, 0.95)
    assert pts[-1] == (4, 40, 8, 2.0, 0.9, 1.0)
    assert tb.first_reach(pts) == {"iteration": 2, "flops": 20 + 3 * 4, "seconds": 1.0}
    assert tb.first_reach(pts[:1]) is None
