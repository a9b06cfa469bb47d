"""FSDP2 (configs/accelerate/fsdp.yaml) and DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) as real
2-process runs on the CPU (gloo), against the same runs under DDP: sharded training must compute the same updates,
save the same weights and resume exactly. tests/strategies_check.py says how accelerate's FSDP and DeepSpeed paths
are reached without a GPU, and what that leaves uncovered. DeepSpeed's tests need `deepspeed` installed (.ci/run
installs it; see docs/multi-gpu.md)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dgpo
from conftest import free_port
from tiny_pipelines import save_tiny_flux_pipeline

pytestmark = pytest.mark.slow  # subprocesses and training runs: the slow tier

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["ddp", "fsdp"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
SHARDED = [pytest.param(s, marks=pytest.mark.skipif(s not in STRATEGIES, reason="deepspeed is not installed"))
           for s in ("fsdp", "deepspeed")]
# DeepSpeed's bf16 mode runs the whole module in bf16, gradients included; DDP and FSDP autocast and get fp32
# gradients for the fp32 adapters. The bf16 run's reward (strategies_check.corner_red) varies within a group 30x more
# than bf16 rounding: with tiny-flux's mean_color (group std 4e-4 on rewards near 0.5, the size of a bf16 rounding)
# the advantages were rounding noise, and the gradient norm moved 8% between CPUs (AVX-512 against AVX2 kernels,
# DDP alone) and up to 7% between DDP and DeepSpeed on some machines. Measured now, on AVX-512 and on AVX2
# (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): DeepSpeed's grad norms within 0.9% of DDP's, mean rewards
# after the first update (bf16 adapters) within 6e-5.
BF16_TOLERANCE = {"fsdp": dict(reward=1e-5, grad=1e-4, atol=1e-5), "deepspeed": dict(reward=5e-4, grad=2e-2, atol=2e-3)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{strategy: dir}: the same runs (tests/strategies_check.py) under each strategy, 2 processes each."""
    base = tmp_path_factory.mktemp("strategies")
    pipeline = save_tiny_flux_pipeline(base / "FLUX.1-dev-tiny")
    out = {}
    for strategy in STRATEGIES:
        out[strategy] = base / strategy
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "tests" / "strategies_check.py"), strategy, str(out[strategy]), str(pipeline)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"{strategy}:\n{proc.stderr[-4000:]}"
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(final_dir):
    files = sorted(final_dir.glob("*.safetensors")) or sorted((final_dir / "transformer").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def weight_differences(wa: dict, wb: dict, atol: float) -> tuple[float, float]:
    """Two runs' saved weights: the fraction that differ by more than 1e-4 relative + `atol`, and the largest
    absolute difference."""
    diff = torch.cat([(wb[k] - wa[k]).abs().flatten() for k in wa])
    scale = torch.cat([1e-4 * wa[k].abs().flatten() + atol for k in wa])
    return (diff > scale).float().mean().item(), diff.max().item()


@pytest.mark.parametrize("strategy", SHARDED)
def test_the_runs_really_were_sharded(runs, strategy):
    expected = {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[strategy]
    for rank in (0, 1):
        assert json.loads((runs["ddp"] / f"distributed_type_{rank}.json").read_text()).endswith("MULTI_CPU")
        assert json.loads((runs[strategy] / f"distributed_type_{rank}.json").read_text()).endswith(expected)
    # each strategy's own checkpoint format: torch.distributed.checkpoint shards, or DeepSpeed's ZeRO partitions
    ckpt = runs[strategy] / "flow_full" / "checkpoints" / "checkpoint-2"
    if strategy == "fsdp":
        assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()
    else:
        assert {p.name for p in (ckpt / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt")} == {
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert not (runs["ddp"] / "flow_full" / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0").exists()


@pytest.mark.parametrize("run", ["flow_full", "dgpo_lora", "flux_bf16_lora"])
@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_training_equals_ddp(runs, strategy, run):
    """Full fine-tuning, LoRA with DGPO's reference and EMA, and a bf16 base with fp32 adapters: the same rewards
    and gradient norms every iteration, and the same saved weights. FSDP reduce-scatters at every backward pass
    and clips by the global norm over shards; DeepSpeed accumulates to the boundary
    `infra.distributed.accumulating` marks, then reduces, clips and steps (without the boundary it steps at every
    pass and these numbers differ)."""
    tol = BF16_TOLERANCE[strategy] if run == "flux_bf16_lora" else dict(reward=1e-5, grad=1e-4, atol=1e-5)
    a, b = metrics(runs["ddp"] / run), metrics(runs[strategy] / run)
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        assert rb["reward/mean"] == pytest.approx(ra["reward/mean"], rel=tol["reward"])
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=tol["grad"])
    wa, wb = weights(runs["ddp"] / run / "final"), weights(runs[strategy] / run / "final")
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(wb[k].dtype == wa[k].dtype == torch.float32 for k in wa)  # the fp32 masters, not a bf16 compute copy
    # The strategies sum the same gradients in different orders (DDP reduces the accumulated sum once, FSDP every
    # pass). Where a weight's gradient nearly cancels, to Adam's eps (1e-8), that float noise changes its Adam step
    # (lr g / (|g| + eps)) by a few percent: measured 4 of 10,752 DGPO LoRA weights off by 2e-5 (lr 1e-3), all the
    # others within 1e-6. A sharding bug (a missing or doubled reduction) changes most steps by up to 2 lr.
    beyond, largest = weight_differences(wa, wb, tol["atol"])
    assert beyond <= 1e-3, f"{beyond:.2%} of the weights differ"
    assert largest < max(1e-4, 2 * tol["atol"])


@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_lora_trained_and_loads_in_diffusers(runs, strategy):
    from diffusers import FluxPipeline
    for run in ("dgpo_lora", "flux_bf16_lora"):
        state = FluxPipeline.lora_state_dict(runs[strategy] / run / "final")
        assert state and all(k.startswith("transformer.") for k in state)
        assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at zero: it trained


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_final_weights_are_the_evaluation_ema_under_each_strategy(runs, strategy):
    """The evaluation EMA starts at the initial weights and updates every 8 optimizer steps, so after 2 it still holds
    them: LoRA's B = 0. final/ must hold it (it is what was evaluated), while training moved the adapters. Under
    FSDP the gathered state is a copy and under DeepSpeed it holds the optimizer's masters: the weights gathered
    before the EMA was swapped in are the trained ones."""
    from diffusers import FluxPipeline
    run = runs[strategy] / "dgpo_lora_eval_ema"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_are_the_evaluation_ema"] and summary["trainable_tensors_changed"] > 0
    state = FluxPipeline.lora_state_dict(run / "final")
    b = [v for k, v in state.items() if "lora_B" in k]
    assert b and all(v.abs().max() == 0 for v in b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_blocks_train_as_eager_ones_under_each_strategy(runs, strategy):
    """--compile under DDP, FSDP2 (each block its own shard, its all-gather hooks around the compiled block) and
    DeepSpeed: every process ran compiled graphs without a graph break, and the run matches the eager one."""
    for rank in (0, 1):
        dynamo = json.loads((runs[strategy] / f"dynamo_{rank}.json").read_text())
        assert dynamo["stats"]["unique_graphs"] >= 2 and not dynamo.get("graph_break"), dynamo
    a, b = metrics(runs[strategy] / "dgpo_lora"), metrics(runs[strategy] / "dgpo_lora_compiled")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert rb["reward/mean"] == pytest.approx(ra["reward/mean"], rel=1e-4)
        assert rb["loss/dsm"] == pytest.approx(ra["loss/dsm"], rel=1e-4)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=2e-2)  # a difference of near-equal terms
    wa, wb = weights(runs[strategy] / "dgpo_lora" / "final"), weights(runs[strategy] / "dgpo_lora_compiled" / "final")
    assert wa.keys() == wb.keys() and len(wa) > 0
    # As between strategies (test_sharded_training_equals_ddp), weights whose gradient nearly cancels take an Adam
    # step that float noise changes: a gradient at the scale of Adam's eps (1e-8) moves its weight by anything up to
    # lr, either way. Measured with torch 2.13: 20 of 10,752 beyond 1e-4 relative + 1e-5, the largest off by 1.7e-4,
    # under each strategy; with torch 2.11 (its inductor rounds otherwise): 41, the largest off by 1.4e-3, all but a
    # few in one rank row of the single block's to_v lora_A, whose second-step moves there ranged 5.3e-4 to 7.2e-4
    # (a full step is 0.74 lr) and some flipped sign. Two Adam steps apart by float noise differ by at most 2 lr.
    # Not training, or a wrong gradient, moves most weights otherwise.
    beyond, largest = weight_differences(wa, wb, atol=1e-5)
    assert beyond <= 1e-2, f"{beyond:.2%} of the weights differ"
    assert largest <= 2 * dgpo.PRESETS["tiny-flux"]["learning_rate"]  # (NaN fails here too)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_full_disk_on_one_process_stops_every_process_with_its_line(runs, strategy):
    """Process 1 alone cannot write its part of checkpoint-2 (strategies_check.py): under FSDP2 the sharded save
    raises a CheckpointException (a BaseException) on every process, under DDP process 1's RNG state fails alone.
    Both processes stop with the same line, naming process 1 under FSDP2; the half checkpoint goes, checkpoint-1
    stays. (DeepSpeed: the next test.)"""
    results = [json.loads((runs[strategy] / f"full_disk_{rank}.json").read_text()) for rank in (0, 1)]
    checkpoints = runs[strategy] / "full_disk" / "checkpoints"
    assert [r["status"] for r in results] == [1, 1] and results[0]["message"] == results[1]["message"]
    line = results[0]["message"]
    assert line.startswith(f"could not write checkpoint {checkpoints / 'checkpoint-2'}: "), line
    assert ("process 1: File too large" if strategy == "fsdp" else "unexpected pos") in line, line
    assert f"last checkpoint {checkpoints / 'checkpoint-1'}; resume: " in line
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-1"]


@pytest.mark.skipif("deepspeed" not in STRATEGIES, reason="deepspeed is not installed")
@pytest.mark.parametrize("ranks", ["1", "0,1"])
def test_a_deepspeed_checkpoint_that_fails_on_one_process_stops_every_process(ranks, tmp_path):
    """DeepSpeed ZeRO-2, the disk full for process 1 alone from checkpoint-2 on (or for both): process 0 has written
    its part and waits in the closing barrier of DeepSpeed's save_checkpoint, which process 1 never reaches. Process
    1 posts its line in the process group's store and stops; process 0's watch reads it there and stops it (without
    it, process 0 waited for --dist-timeout-minutes, 120). The launch ends with the line printed once, exit status
    1, checkpoint-1 kept and the half checkpoint-2 gone. With the disk full for both, either line, printed once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "strategies_check.py"), "deepspeed-full-disk", str(tmp_path), ranks]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = tmp_path / "full_disk" / "checkpoints"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("could not write checkpoint")]
    assert len(lines) == 1, proc.stderr[-4000:]  # the main process's line
    line = re.compile(rf"could not write checkpoint {re.escape(str(checkpoints / 'checkpoint-2'))}: process "
                      rf"{'1' if ranks == '1' else '[01]'}: RuntimeError: .*unexpected pos.*; last checkpoint "
                      rf"{re.escape(str(checkpoints / 'checkpoint-1'))}; resume: launch ")
    assert line.match(lines[0]), lines[0]
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-1"]
    assert not (tmp_path / "full_disk" / "run.lock").exists()  # let go of, also by a process the watch stopped
    # each process stopped on its own failed write (its line its result, status 1), or was stopped by the watch where
    # it waited (os._exit(1): no result, and the launch's exit status 1)
    results = {rank: json.loads(path.read_text()) for rank in (0, 1)
               if (path := tmp_path / f"full_disk_{rank}.json").exists()}
    assert all(r["status"] == 1 and line.match(r["message"]) for r in results.values()), results
    assert len(results) == 2 or proc.returncode == 1, (results, proc.returncode)
    if ranks == "1":  # process 0 wrote its part and waited in DeepSpeed's barrier: only the watch could stop it
        assert list(results) == [1] and results[1]["message"] == lines[0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resumed_run_equals_uninterrupted_run(runs, strategy):
    """Cut after 2 iterations (checkpoint-2 its last), resumed to 3: the metrics and weights of the uninterrupted
    run, through each strategy's own save_state / load_state."""
    full, cut = metrics(runs[strategy] / "flow_full"), metrics(runs[strategy] / "flow_cut")
    assert [r["iteration"] for r in cut] == [0, 1, 2]
    for ra, rb in zip(full, cut):
        for k in ("reward/mean", "grad_norm", "loss/policy_loss", "nfe/train"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-12), (strategy, ra["iteration"], k)
    wa, wb = weights(runs[strategy] / "flow_full" / "final"), weights(runs[strategy] / "flow_cut" / "final")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-8)
