"""benchmarks/timing.py: FLOP counting against the backward = 2 x forward identity of linear layers, and one real
measurement run (tiny FLUX, one method in its own process) whose table is internally consistent."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timing  # noqa: E402

from infra import diffusers_models  # noqa: E402


def test_full_fine_tune_backward_costs_two_forwards_and_lora_far_less():
    full = diffusers_models.build_tiny_flux(lora_rank=0)
    fwd, grad = timing.count_flops(full)
    assert fwd > 0
    # every matmul's backward computes the input and the weight gradient: 2x its forward. (The first layer's input
    # gradient is not needed, so slightly under 3x in total.)
    assert 2.6 < grad / fwd <= 3.0
    lora = diffusers_models.build_tiny_flux(lora_rank=4)
    fwd_l, grad_l = timing.count_flops(lora)
    assert fwd_l > fwd  # the adapters' own matmuls
    assert grad_l / fwd_l < grad / fwd  # no weight gradients for the frozen base


@pytest.mark.slow
def test_a_measurement_run_gives_a_consistent_table(tmp_path, capsys):
    sys.argv = ["timing.py", "--config", "tiny", "--methods", "Flow-GRPO", "--out", str(tmp_path / "t.md")]
    timing.main()
    row = next(line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| Flow-GRPO"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    seconds, fwd, bwd, share, overhead = float(cells[4]), float(cells[5]), float(cells[6]), cells[7], cells[8]
    assert 0 < fwd + bwd <= seconds
    assert float(share.rstrip("%")) + float(overhead.rstrip("%")) == pytest.approx(100, abs=0.11)
    assert cells[3] == "48 / 40"  # the tiny-flux preset: 2 prompts x 4 samples x 6 steps; 5 of 6 steps trained


@pytest.mark.slow
def test_variants_give_one_row_each_with_the_same_work_and_the_memory_plan_is_listed(tmp_path):
    sys.argv = ["timing.py", "--config", "tiny", "--methods", "DGPO", "--variants", "plain=",
                "merged=--merge-lora-rollouts", "fit=--fit-memory --memory-budget-gib 1",
                "--out", str(tmp_path / "t.md")]
    assert timing.main() == 0
    text = (tmp_path / "t.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| DGPO")]
    assert [r[0] for r in rows] == ["DGPO (plain)", "DGPO (merged)", "DGPO (fit)"]
    assert rows[0][3] == rows[1][3] == rows[2][3] == "64 / 16"  # a lever changes how calls run, not how many
    # the plan is listed under the table: 1 GiB holds both groups of the tiny-flux preset without checkpointing
    assert "- DGPO (fit): --fit-memory chose training micro-batches of 2 unit(s) of 4 samples, checkpointing off" \
        in text


@pytest.mark.parametrize("argv, match", [(["--variants", "compile"], "each one is NAME=FLAGS"),
                                         (["--methods", "DPO"], "unknown \\['DPO'\\]")])
def test_bad_variants_and_methods_stop_before_running(argv, match):
    sys.argv = ["timing.py", "--config", "tiny", *argv]
    with pytest.raises(SystemExit, match=match):
        timing.main()


@pytest.mark.slow
def test_compiled_blocks_count_the_eager_flops():
    """MFU of a --compile run is counted right: with the blocks compiled by inductor (and already run), the FLOP
    counter still sees every matmul and attention call, the same FLOPs as the eager model."""
    eager = timing.count_flops(diffusers_models.build_tiny_flux(lora_rank=4, seed=0))
    policy = diffusers_models.build_tiny_flux(lora_rank=4, seed=0)
    policy.compile_blocks()
    x = policy.initial_noise(1)
    policy.velocity(x, 0.5, policy.encode_prompts(["a photo of red"]))  # compiled and run before counting
    assert timing.count_flops(policy) == eager
