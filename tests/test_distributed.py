"""A real 2-process run (torchrun, gloo on CPU): group statistics reduced across processes equal a 1-process
computation on the same data, and every script completes a 2-process iteration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import dgpo
from conftest import free_port

pytestmark = pytest.mark.slow  # subprocesses and training runs: the slow tier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "dist_check.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_gathered_advantages_equal_one_process_on_the_same_groups(two_process_run):
    rewards = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    for rank in (0, 1):
        stats = json.loads((two_process_run / f"stats_rank{rank}.json").read_text())
        for std in ("global", "group"):
            expected = common.group_advantages(rewards, std=std, clip=5.0).reshape(-1)
            torch.testing.assert_close(torch.tensor(stats[f"adv_{std}"]), expected)


def test_dgpo_groups_split_across_processes_get_the_one_process_weights(two_process_run):
    g = torch.Generator().manual_seed(0)
    torch.rand(4, 6, generator=g)  # the rewards drawn first in dist_check.py
    dsm, dsm_ref, advantages = (torch.randn(24, generator=g) for _ in range(3))
    whole = dsm.clone().requires_grad_(True)
    dgpo.dgpo_loss(whole, dsm_ref, advantages, torch.arange(4).repeat_interleave(6), beta=2.0).backward()
    expected = whole.grad * 24  # dL/dl_i = sigmoid-weight_i A_i / N: compare weight_i A_i
    for rank in (0, 1):
        stats = json.loads((two_process_run / f"stats_rank{rank}.json").read_text())
        got = torch.tensor(stats["dgpo_grad_times_n"])
        torch.testing.assert_close(got, expected[stats["dgpo_index"]])
    # without the all-reduce each process would see half a group: the weights would differ
    half = dsm[:3].clone().requires_grad_(True)
    dgpo.dgpo_loss(half, dsm_ref[:3], advantages[:3], torch.zeros(3, dtype=torch.long), beta=2.0).backward()
    assert not torch.allclose(half.grad * 3, expected[:3])


def test_ddp_accumulation_reduces_once_per_step_and_equals_one_process(two_process_run):
    """infra.distributed.accumulating skips DDP's all-reduce on all but the last pass of an optimizer step; the update
    is still the one a single process computes on all rows (mean over processes of the summed pass gradients)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 1, generator=g)
    for step in range(2):
        for n in range(3):
            ((net(x[step, n]) - y[step, n]).pow(2).mean() / 3).backward()
        opt.step()
        opt.zero_grad()
    for rank in (0, 1):
        stats = json.loads((two_process_run / f"stats_rank{rank}.json").read_text())
        assert stats["ddp_reduces_per_step"] == [1, 1]  # one bucket, reduced once per optimizer step
        torch.testing.assert_close(torch.tensor(stats["ddp_weight"]), net.weight.detach().flatten())
        assert stats["ddp_bias"] == pytest.approx(net.bias.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["flow_grpo", "dgpo", "neighbor_grpo", "g2rpo", "pro_grpo"])
def test_each_process_rolls_out_from_its_own_noise(two_process_run, name):
    """The run seeds each process with seed + rank: with one seed for all, every process would draw the same
    rollout noise, and its samples would explore nothing the other's did not."""
    first = [json.loads((two_process_run / f"rollout_noise_rank{rank}.json").read_text())[name] for rank in (0, 1)]
    assert len(first[0]) == 8 and first[0] != first[1]


@pytest.mark.parametrize("name", ["flow_grpo", "dgpo", "neighbor_grpo", "g2rpo", "pro_grpo"])
def test_every_script_completes_a_two_process_iteration(two_process_run, name, tmp_path):
    """... and the two processes share the iteration's prompts between them: its model calls, counted over both
    processes in the iteration's line and in the totals, are those of the same iteration on one process."""
    import importlib
    summary = json.loads((two_process_run / name / "summary.json").read_text())
    assert summary["num_processes"] == 2
    rows = [json.loads(line) for line in (two_process_run / name / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and summary["nfe_train"] > 0
    assert (rows[0]["nfe/rollout"], rows[0]["nfe/train"]) == (summary["nfe_rollout"], summary["nfe_train"])
    one = importlib.import_module(name).main(["--iterations", "1", "--output-dir", str(tmp_path), "--log-every", "0",
                                              "--checkpoint-every", "0", "--save-weights", "false",
                                              "--eval-samples-per-prompt", "8"])  # the flags of dist_check.py
    assert one["num_processes"] == 1
    assert (summary["nfe_rollout"], summary["nfe_train"]) == (one["nfe_rollout"], one["nfe_train"])
    # the evaluation of the base model, split over the two processes, is the one process's
    assert summary["eval_reward_before"] == pytest.approx(one["eval_reward_before"], abs=1e-6)
    assert summary["on_manifold_before"] == pytest.approx(one["on_manifold_before"], abs=1e-6)


def test_an_evaluation_split_over_processes_equals_one_process_also_when_they_do_not_divide_it(two_process_run):
    from infra.tasks import evaluate, load_task
    from infra.args import parse_args
    import flow_grpo
    prompts_file = two_process_run / "three_prompts_rank0.txt"
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--eval-prompts", str(prompts_file),
                                                          "--eval-samples-per-prompt", "1", "--eval-batch-size", "1"])
    result, samples, prompts = evaluate(load_task(args, keep_reference=False, log=lambda *a: None), args,
                                        keep_samples=True)
    for rank in (0, 1):
        stats = json.loads((two_process_run / f"stats_rank{rank}.json").read_text())
        assert stats["eval_prompts"] == prompts == ["mode 0", "mode 5", "mode 2"]
        torch.testing.assert_close(torch.tensor(stats["eval_samples"]), samples)  # 3 rows, in order: no padding
        assert stats["eval_model_rows"] == 2 * stats["eval_steps"]  # each process sampled 2 of the 3 (1 padded)
        assert stats["eval_reward"] == pytest.approx(result["reward"], abs=1e-6)
        assert stats["eval_on_manifold"] == pytest.approx(result["on_manifold"], abs=1e-6)


def test_sigterm_to_one_process_stops_every_process_after_the_same_iteration_with_a_checkpoint(two_process_run):
    for rank in (0, 1):
        got = json.loads((two_process_run / f"sigterm_rank{rank}.json").read_text())
        assert got["status"] == 143, got
        assert got["message"].startswith("stopped by SIGTERM after 2 of 5 iterations; last checkpoint "), got
        assert got["message"].endswith(f"checkpoint-2; resume: launch flow_grpo.py on 2 processes as before, with "
                                       f"--resume-from-checkpoint latest --output-dir {two_process_run / 'sigterm'}")
    assert [p.name for p in (two_process_run / "sigterm" / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert len((two_process_run / "sigterm" / "metrics.jsonl").read_text().splitlines()) == 2


def test_without_output_dir_every_process_writes_into_the_directory_the_main_process_chose(two_process_run):
    """The processes' clocks said seconds 0 and 1 (dist_check.py): before, each named the default directory from its
    own, and process 1's run state landed in a directory of its own, a checkpoint no resume could use."""
    runs = sorted(p.name for p in (two_process_run / "runs").iterdir())
    assert runs == ["flow_grpo_toy2d_s0_20260101-000000"]
    checkpoint = two_process_run / "runs" / runs[0] / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.glob("run_state_*.pt")) == ["run_state_0.pt", "run_state_1.pt"]
    assert json.loads((two_process_run / "runs" / runs[0] / "summary.json").read_text())["num_processes"] == 2


def test_fit_memory_plans_alike_on_every_process_from_the_largest_measurement(two_process_run):
    """Process 1 measured twice process 0's bytes per sample (dist_check.py): both plan from process 1's, so both
    take the same batch sizes and make the same model calls."""
    stats = [json.loads((two_process_run / f"stats_rank{r}.json").read_text()) for r in (0, 1)]
    assert stats[1]["memory_measured"]["grad"] == 2 * stats[0]["memory_measured"]["grad"] > 0
    assert stats[0]["memory_plan"] == stats[1]["memory_plan"]
    assert stats[0]["memory_plan"]["per_sample_bytes"] == stats[1]["memory_measured"]
    from infra import memory  # process 0's own measurement alone would have planned otherwise: the test can fail
    own = [memory.plan(memory.ActivationBytes(**s["memory_measured"]), s["memory_plan"]["budget_bytes"], 4, 2, False)
           for s in stats]
    assert own[0] != own[1] and vars(own[1])["rollout_batch"] == stats[0]["memory_plan"]["rollout_batch_size"]


def test_an_output_dir_that_is_not_shared_by_the_processes_stops_them_all_at_start(two_process_run):
    """Played by one --output-dir per process (what a node-local path on several nodes amounts to): process 1 does
    not see process 0's config.json; both stop with the same line before training, neither hangs."""
    for rank in (0, 1):
        result = json.loads((two_process_run / f"unshared_rank{rank}.json").read_text())
        assert result["status"] == 1
        assert result["message"] == (f"--output-dir {two_process_run / f'node{rank}'} is not one directory for all "
                                     f"processes: process 1 cannot read the config.json process 0 wrote there. Each "
                                     f"process writes its part of every checkpoint into it: on several nodes, put "
                                     f"it on a filesystem they all share")
    assert (two_process_run / "node0" / "metrics.jsonl").read_text() == ""  # nothing trained


def test_a_directory_a_live_run_holds_stops_every_process_at_start(two_process_run):
    """Process 0 alone takes the lock and finds it held; both processes stop with its line, neither hangs (before,
    a refusal on process 0 alone left the others waiting in a collective for the launcher to kill them)."""
    results = [json.loads((two_process_run / f"locked_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["status"] for r in results] == [1, 1]
    assert results[0]["message"] == results[1]["message"]
    assert results[0]["message"].startswith(f"{two_process_run / 'locked'} is in use by another run: pid ")
    assert sorted(p.name for p in (two_process_run / "locked").iterdir()) == ["run.lock"]  # nothing written


def test_a_directory_taken_over_while_a_checkpoint_is_written_stops_every_process(two_process_run):
    """Process 0 finds its run.lock another run's before it completes checkpoint-2 (dist_check.py): both processes
    stop with its line, and checkpoint-2 is neither completed among the other run's nor left half-written."""
    results = [json.loads((two_process_run / f"taken_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["status"] for r in results] == [1, 1]
    checkpoints = two_process_run / "taken" / "checkpoints"
    assert results[0]["message"] == results[1]["message"]
    assert results[0]["message"].startswith(f"stopped before completing checkpoint {checkpoints / 'checkpoint-2'}: "
                                            f"another run took over its directory")
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-1"]
    assert json.loads((two_process_run / "taken" / "run.lock").read_text())["token"] == "theirs"  # untouched


def test_a_write_that_fails_on_one_process_stops_every_process_with_its_line(two_process_run):
    """Process 1's run state could not be written into checkpoint-2 (dist_check.py): both stop with the same line,
    which names process 1's file; the half checkpoint is gone and checkpoint-1 stays."""
    results = [json.loads((two_process_run / f"full_disk_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["status"] for r in results] == [1, 1]
    assert results[0]["message"] == results[1]["message"]
    checkpoints = two_process_run / "full_disk" / "checkpoints"
    assert results[0]["message"].startswith(f"could not write checkpoint {checkpoints / 'checkpoint-2'}: No space left "
                                            f"on device ({checkpoints / 'checkpoint-2.partial' / 'run_state_1.pt'})")
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-1"]
