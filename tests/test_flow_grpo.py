"""flow_grpo.py end to end, and the shared argument handling."""

import json
import math

import pytest
import torch

import common
from conftest import assert_trained, cpu_accelerator, free_port
import flow_grpo
from infra import diffusers_models, tasks
from infra.args import parse_args


def run(tmp_path, *argv):
    summary = flow_grpo.main([*argv, "--output-dir", str(tmp_path), "--log-every", "0"])
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    return summary


@pytest.mark.slow
def test_toy2d_flow_grpo_raises_eval_reward(tmp_path):
    s = run(tmp_path, "--iterations", "250", "--seed", "0")
    for key in ["algorithm", "model", "iterations", "eval_reward_before", "eval_reward_after", "nfe_rollout",
                "nfe_train", "wall_seconds", "on_manifold_before", "on_manifold_after"]:
        assert key in s
    assert s["eval_reward_before"] < 0.2
    assert s["eval_reward_after"] > s["eval_reward_before"] + 0.3, s
    assert s["on_manifold_after"] > s["on_manifold_before"] - 0.1, s
    # NFE arithmetic: 8 prompts x 16 samples x 10 SDE steps without gradient, 9 trained steps with gradient
    assert s["nfe_rollout"] == 250 * 8 * 16 * 10
    assert s["nfe_train"] == 250 * 8 * 16 * 9
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 250 and json.loads(lines[0])["iteration"] == 0


def test_toy2d_dancegrpo_preset_trains_random_60_percent_of_the_first_n_minus_1_steps(tmp_path):
    s = run(tmp_path, "--preset", "toy2d-dancegrpo", "--iterations", "3")
    assert s["nfe_train"] == 3 * 8 * 16 * 5  # int((10 - 1) * 0.6) transitions per sample


def flux_step(model_output, latents, eta, sigmas, index, prev_sample):
    """DanceGRPO's fastvideo/train_grpo_flux.py `flux_step` (grpo=True, sde_solver=True), transcribed: the mean
    through its score estimate, the step noise drawn with randn_like, and `pred_original_sample`."""
    sigma, dsigma = sigmas[index], sigmas[index + 1] - sigmas[index]
    prev_sample_mean = latents + dsigma * model_output
    pred_original_sample = latents - sigma * model_output
    std_dev_t = eta * math.sqrt(sigma - sigmas[index + 1])
    score_estimate = -(latents - pred_original_sample * (1 - sigma)) / sigma ** 2
    prev_sample_mean = prev_sample_mean + (-0.5 * eta ** 2 * score_estimate) * dsigma
    if prev_sample is None:
        prev_sample = prev_sample_mean + torch.randn_like(prev_sample_mean) * std_dev_t
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t ** 2)).mean(dim=1)
    return prev_sample, pred_original_sample, log_prob


def test_the_dancegrpo_rollout_equals_the_official_sampler_and_its_reward_sample_is_x0_hat():
    """Same noise (global RNG), same velocity field: our SDE states equal `run_sample_step`'s, the reward scores its
    `latents = pred_original` of the last step (not the noisy x_N), and the log-probs agree up to the per-step
    constant the official code drops."""
    policy = tasks.toy2d_policy(keep_reference=False)
    sigmas = common.make_sigmas(8, shift=3.0)
    cond = policy.encode_prompts(["mode 1"] * 6)
    z0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    states, log_probs, x0_hat = flow_grpo.sde_rollout(policy, z0, sigmas, cond, 0.3, "dance_grpo")
    torch.manual_seed(7)
    z, official_states, official_lp = z0, [z0], []
    with torch.no_grad():
        for i in range(8):
            z, pred_original, lp = flux_step(policy.velocity(z, sigmas[i], cond), z, 0.3, sigmas.float(), i, None)
            official_states.append(z)
            official_lp.append(lp)
    torch.testing.assert_close(states, torch.stack(official_states), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0_hat, pred_original, rtol=1e-5, atol=1e-5)
    assert (x0_hat - states[-1]).abs().max() > 1e-3  # x_N carries the last step's noise; x0_hat does not
    # the official log-prob drops -log(std) - log(sqrt(2 pi)) (a statement on a line of its own): per step a constant
    # that cancels in every ratio; ours keeps it
    for j in range(8):
        std = 0.3 * math.sqrt(sigmas[j] - sigmas[j + 1])
        torch.testing.assert_close(log_probs[j] - official_lp[j],
                                   torch.full((6,), -math.log(std) - 0.5 * math.log(2 * math.pi)), rtol=1e-4,
                                   atol=1e-4)


def test_dancegrpo_groups_share_their_initial_noise_and_take_three_optimizer_steps(tmp_path, monkeypatch):
    seen, steps = [], []
    original_rollout, original_step = flow_grpo.sde_rollout, flow_grpo.optimizer_step
    monkeypatch.setattr(flow_grpo, "sde_rollout", lambda policy, noise, *a, **k: seen.append(noise.clone()) or
                        original_rollout(policy, noise, *a, **k))
    monkeypatch.setattr(flow_grpo, "optimizer_step", lambda *a, **k: steps.append(1) or original_step(*a, **k))
    run(tmp_path, "--preset", "toy2d-dancegrpo", "--iterations", "2", "--group-size", "4",
        "--prompts-per-iteration", "3")
    for noise in seen:
        groups = noise.view(3, 4, 2)
        assert torch.equal(groups, groups[:, :1].expand_as(groups))  # one noise per group (--init_same_noise)
        assert not torch.equal(groups[0, 0], groups[1, 0])
    assert len(steps) == 2 * 3  # 12 samples with gradient accumulation 4: 3 optimizer steps per iteration


def test_trained_steps_orders():
    assert flow_grpo.trained_steps(3, 10, 0.99, shuffle=False).tolist() == [list(range(9))] * 3
    steps = flow_grpo.trained_steps(50, 10, 0.6, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (50, 6)
    assert all(len(set(row)) == 6 for row in steps.tolist())  # distinct steps per sample
    assert len({tuple(row) for row in steps.tolist()}) > 1  # and different between samples
    # DanceGRPO (--ignore_last): int(15 * 0.6) = 9 of the first 15 of 16 transitions; the last is never drawn
    steps = flow_grpo.trained_steps(200, 16, 0.6, shuffle=True, ignore_last=True)
    assert steps.shape == (200, 9) and steps.max() == 14 and set(steps.flatten().tolist()) == set(range(15))


def test_rollout_log_probs_are_recomputed_exactly_before_the_update():
    """The ratio is 1 at the first update: training recomputes the same log-probs the rollout stored."""
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--num-steps", "5"])
    policy = tasks.toy2d_policy(keep_reference=False)
    cond = policy.encode_prompts(["mode 2"] * 6)
    sigmas = policy.sigmas(5)
    states, old, _ = flow_grpo.sde_rollout(policy, policy.initial_noise(6), sigmas, cond, args.noise_level,
                                           args.sde_variant)
    assert states.shape == (6, 6, 2) and old.shape == (5, 6)
    for j in range(5):
        _, st = flow_grpo.sde_transition_loss(policy, states[j], states[j + 1], sigmas[j], sigmas[j + 1], old[j],
                                              torch.randn(6), cond, args.noise_level, args.sde_variant,
                                              args.clip_range, kl_beta=0.0)
        assert st["approx_kl"] < 1e-10 and st["clipfrac"] == 0


def test_tiny_flux_lora_iteration_changes_only_lora_and_keeps_reference(tmp_path, capture_policy):
    argv = ["--model", "tiny-flux", "--iterations", "1", "--kl-beta", "0.01", "--learning-rate", "1e-2",
            "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights", "false"]
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, argv)
    base = diffusers_models.build_tiny_flux(resolution=args.resolution, lora_rank=0, seed=args.seed)
    base_state = {k: v.clone() for k, v in base.net.state_dict().items()}
    s = flow_grpo.main(argv)
    policy = capture_policy["policy"]
    state = policy._unwrapped().state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # LoRA moved
    for k, v in state.items():  # every non-LoRA weight is bit-identical to the base model
        if "lora_" not in k:
            assert torch.equal(v, base_state[k.replace(".base_layer", "")]), k
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(["a photo of red"] * 2)
    with torch.no_grad(), policy.reference():
        ref = policy.velocity(x, 0.5, cond)
    with torch.no_grad():
        torch.testing.assert_close(ref, base.velocity(x, 0.5, cond))
        assert not torch.allclose(policy.velocity(x, 0.5, cond), ref)
    assert s["nfe_train"] > 0


def test_tiny_flux_trains_its_lora_and_saves_what_flux_pipeline_reads(tmp_path):
    s = run(tmp_path, "--model", "tiny-flux", "--iterations", "2", "--eval-ema", "false")
    assert_trained(tmp_path)
    assert s["trainable_tensors_changed"] == s["trainable_tensors"]
    from diffusers import FluxPipeline
    saved = FluxPipeline.lora_state_dict(tmp_path / "final")
    assert saved and any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B leaves its zero init


# ------------------------------------------------------------------------------------------------ arguments
def test_preset_then_command_line_precedence():
    a = parse_args(flow_grpo.Args, flow_grpo.PRESETS, [])
    assert a.preset == "toy2d" and a.model == "toy2d" and a.learning_rate == 1e-3
    a = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--preset", "dancegrpo-flux", "--model", "tiny-flux"])
    assert a.model == "tiny-flux" and a.sde_variant == "dance_grpo" and a.num_steps == 16 and a.shift == 3.0
    a = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--model", "tiny-flux", "--group_size", "3"])
    assert a.preset == "tiny-flux" and a.group_size == 3 and a.lora_rank == 8


def test_config_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": "toy2d", "iterations": 7, "noise_level": 0.5}))
    a = parse_args(flow_grpo.Args, flow_grpo.PRESETS, [str(tmp_path / "c.json")])
    assert a.iterations == 7 and a.noise_level == 0.5


def test_each_metrics_line_holds_the_statistics_of_that_iterations_rewards(tmp_path, monkeypatch):
    """metrics.jsonl's reward/mean, reward/std (over the whole batch) and reward/group_std (the mean of the groups' own
    stds: how much a group has to rank; it falls as a group agrees) are those of the (groups, G) rewards the
    iteration trained on."""
    from infra import run as run_module
    seen, original = [], run_module.Run.end_iteration
    monkeypatch.setattr(run_module.Run, "end_iteration", lambda self, it, task, rewards, *a, **k: seen.append(
        rewards.clone()) or original(self, it, task, rewards, *a, **k))
    run(tmp_path, "--iterations", "2", "--group-size", "4", "--prompts-per-iteration", "3",
        "--eval-samples-per-prompt", "2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(seen) == 2
    for row, rewards in zip(rows, seen):
        assert rewards.shape == (3, 4)
        assert row["reward/mean"] == pytest.approx(rewards.mean().item(), rel=1e-6)
        assert row["reward/std"] == pytest.approx(rewards.flatten().std().item(), rel=1e-6)
        assert row["reward/group_std"] == pytest.approx(rewards.std(dim=1).mean().item(), rel=1e-6)
        assert row["reward/group_std"] != pytest.approx(row["reward/std"], rel=1e-3)  # (the two differ here)


def toy_update_inputs():
    """A prepared toy policy (SGD, lr 0), and the inputs ppo_update takes: 2 groups of 4 rolled out with 4 SDE steps,
    random advantages, each sample's own 2 of its 4 transitions (DanceGRPO's shuffle, fraction 0.6)."""
    acc = cpu_accelerator()
    policy = tasks.toy2d_policy(keep_reference=False)
    optimizer = policy.prepare(acc, torch.optim.SGD(policy.trainable_parameters(), lr=0.0))
    cond, sigmas = policy.encode_prompts(["mode 1"] * 4 + ["mode 5"] * 4), policy.sigmas(4)
    torch.manual_seed(0)
    states, old_log_probs, _ = flow_grpo.sde_rollout(policy, policy.initial_noise(8), sigmas, cond, 0.7, "flow_grpo")
    steps = flow_grpo.trained_steps(8, 4, 0.6, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert steps.shape == (8, 2)
    with torch.no_grad():  # move off the rollout's weights, so the ratio is not 1 and the clip can act
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, acc, optimizer, dict(states=states, old_log_probs=old_log_probs, advantages=torch.randn(8),
                                        sigmas=sigmas, cond=cond, steps=steps)


def update(policy, acc, optimizer, inputs, updates=1, micro_batch=0):
    flow_grpo.ppo_update(policy, optimizer, acc, *inputs.values(), noise_level=0.7, variant="flow_grpo",
                         clip_range=0.2, kl_beta=0.0, updates=updates, micro_batch=micro_batch, max_grad_norm=1.0)


@pytest.mark.parametrize("micro_batch", [0, 3])
def test_an_update_step_takes_the_gradient_of_the_mean_loss_over_its_samples_and_their_trained_transitions(
        monkeypatch, micro_batch):
    """ppo_update weights each backward pass by len(micro-batch) / len(batch) / n_train: whatever the micro-batches
    (3 + 3 + 2 of 8 here), the optimizer step sees the gradient of the mean PPO loss over the step's samples and
    each one's trained transitions, computed here one transition of one sample at a time."""
    policy, acc, optimizer, inputs = toy_update_inputs()
    seen = []
    monkeypatch.setattr(flow_grpo, "optimizer_step", lambda a, pol, opt, norm: seen.append(
        [p.grad.clone() for p in policy.trainable_parameters()]) or opt.zero_grad() or torch.tensor(0.0))
    update(policy, acc, optimizer, inputs, micro_batch=micro_batch)
    states, old, adv, sigmas, cond, steps = inputs.values()
    total = 0
    for i in range(8):
        for j in steps[i].tolist():
            loss, _ = flow_grpo.sde_transition_loss(
                policy, states[j, [i]], states[j + 1, [i]], sigmas[[j]], sigmas[[j + 1]], old[j, [i]], adv[[i]],
                common.select(cond, [i]), 0.7, "flow_grpo", 0.2, 0.0)
            total = total + loss / (8 * 2)
    want = torch.autograd.grad(total, policy.trainable_parameters())
    assert len(seen) == 1
    for got, w in zip(seen[0], want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-7)


def test_the_optimizer_steps_of_an_update_split_the_samples_at_random(monkeypatch):
    """--updates-per-iteration 2: each step trains a random half of the samples (Flow-GRPO shuffles the batch
    before splitting it), every sample once per iteration; not always the first half first."""
    policy, acc, optimizer, inputs = toy_update_inputs()
    seen, halves = [], []
    original = flow_grpo.sde_transition_loss
    monkeypatch.setattr(flow_grpo, "sde_transition_loss", lambda *a: seen.extend(a[6].tolist()) or original(*a))
    monkeypatch.setattr(flow_grpo, "optimizer_step", lambda a, pol, opt, norm: halves.append(
        {inputs["advantages"].tolist().index(x) for x in seen}) or seen.clear() or torch.tensor(0.0))
    for _ in range(4):
        update(policy, acc, optimizer, inputs, updates=2)
    assert all(len(h) == 4 and not h & halves[n ^ 1] for n, h in enumerate(halves[:2]))
    assert {frozenset(h) for h in halves} != {frozenset(range(4)), frozenset(range(4, 8))}


def test_bad_preset_and_model_are_clear_errors():
    with pytest.raises(SystemExit, match="--preset takes one of"):
        parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--preset", "nope"])
    with pytest.raises(SystemExit, match="--model takes one of .*; got 'sdxl'"):
        parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--preset", "toy2d", "--model", "sdxl"])
    with pytest.raises(SystemExit, match="--model takes one of .*; got 'sdxl'"):
        parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--model", "sdxl"])


@pytest.mark.slow
def test_two_process_run_splits_the_batch_and_sums_nfe_over_processes(tmp_path):
    """A real 2-process (gloo) run, as `torchrun` starts it on CPU: each process samples its own groups."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(flow_grpo.__file__).parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(root / "flow_grpo.py"), "--iterations", "2", "--output-dir", str(tmp_path), "--log-every", "0",
           "--save-weights", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["num_processes"] == 2
    # the preset's 8 prompts are the iteration's over both processes (4 each): the same batch as one process trains
    assert s["nfe_train"] == 2 * 8 * 16 * 9 and s["nfe_rollout"] == 2 * 8 * 16 * 10


def test_a_run_that_pretrains_the_toy_equals_one_that_loads_it(tmp_path, monkeypatch):
    """The first run on a machine pretrains the toy base model; it must train exactly as later runs that load
    it from the cache (no state such as leftover gradients may leak from pretraining). A 100-step pretraining
    (the real one takes 3000) exercises the same path."""
    from infra import pretrained
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "TOY_BASE_CONFIG", dict(pretrained.TOY_BASE_CONFIG, steps=100))
    flags = ["--iterations", "2", "--log-every", "0", "--save-weights", "false", "--checkpoint-every", "0"]
    flow_grpo.main(flags + ["--output-dir", str(tmp_path / "first")])
    assert list((tmp_path / "cache").glob("toy2d-base-*.pt"))
    flow_grpo.main(flags + ["--output-dir", str(tmp_path / "cached")])
    a = [json.loads(l) for l in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), k


def test_a_tracker_without_its_package_is_a_clear_error(tmp_path, monkeypatch):
    import accelerate.utils
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(SystemExit, match="pip install wandb"):
        flow_grpo.main(["--iterations", "1", "--report-to", "wandb", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--report-to takes one of"):
        flow_grpo.main(["--iterations", "1", "--report-to", "mlflow", "--output-dir", str(tmp_path)])


def test_precision_comes_from_the_flag_else_the_launch_config(tmp_path, monkeypatch):
    """--mixed-precision wins; without it the `accelerate launch` config's (its environment) applies, else 'no'.
    Runs in one process do not inherit each other's precision (accelerate keeps it process-wide)."""
    from infra.run import Run
    monkeypatch.chdir(tmp_path)  # the runs' default directories go under tmp_path/runs, not the repository's

    def precision(*flags):
        args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--model", "tiny-flux", *flags])
        Run(args, "flow_grpo")
        return args.mixed_precision

    got = [precision("--mixed-precision", "bf16"), precision()]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets from its config file
    got.append(precision())
    assert got == ["bf16", "no", "bf16"]


def capture_ema_and_live_weights_at_finish(monkeypatch) -> dict:
    """{"ema": ..., "live": ...}: the evaluation EMA's and the trained weights by name, as Run.finish sees them."""
    from infra import run as run_module
    captured, finish = {}, run_module.Run.finish

    def capture(self, task, before, after, **extra):
        names = [n for n, _ in task.policy.net.named_parameters()]
        captured["ema"] = dict(zip(names, [s.clone() for s in self.eval_ema.shadow]))
        captured["live"] = {n: p.detach().clone() for n, p in task.policy.net.named_parameters()}
        return finish(self, task, before, after, **extra)

    monkeypatch.setattr(run_module.Run, "finish", capture)
    return captured


def test_the_final_weights_are_the_evaluated_ema_and_checkpoints_keep_the_live_ones(tmp_path, monkeypatch):
    """Flow-GRPO's config (train.ema) evaluates and saves the EMA: 8 iterations x 2 optimizer steps = 2 EMA updates.
    The "after" evaluation sees the EMA's weights, the same ones final/ holds."""
    from safetensors.torch import load_file

    from infra import run as run_module
    evaluated = []
    original_evaluate = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda task, *a, **k: evaluated.append(
        {n: p.detach().clone() for n, p in task.policy.net.named_parameters()}) or original_evaluate(task, *a, **k))
    captured = capture_ema_and_live_weights_at_finish(monkeypatch)
    s = run(tmp_path, "--iterations", "8", "--checkpoint-every", "4")
    assert s["weights_are_the_evaluation_ema"] is True
    final = load_file(tmp_path / "final" / "model.safetensors")
    for name, value in final.items():
        torch.testing.assert_close(value, captured["ema"][name], rtol=0, atol=0)
        torch.testing.assert_close(evaluated[-1][name], value, rtol=0, atol=0)
    assert any(not torch.equal(captured["ema"][n], captured["live"][n]) for n in final)
    saved_live = load_file(tmp_path / "checkpoints" / "checkpoint-4" / "weights" / "model.safetensors")
    assert any(not torch.equal(saved_live[n], final[n]) for n in final)


def test_the_kl_term_pulls_the_policy_toward_the_reference():
    """Flow-GRPO's KL: with zero advantages (no policy-gradient signal) the loss is kl_beta * KL, and one SGD step on
    it must bring the policy's SDE mean closer to the reference's. Subtracting the term pushes it away."""
    policy = tasks.toy2d_policy(keep_reference=True)
    with torch.no_grad():  # move the policy off its reference, so the KL is not zero
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    sigmas = policy.sigmas(10)
    cond = policy.encode_prompts(["mode 3"] * 16)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    x_next = x + 0.1 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2))

    def kl():
        _, st = flow_grpo.sde_transition_loss(policy, x, x_next, sigmas[3], sigmas[4], torch.zeros(16), torch.zeros(16),
                                              cond, 0.7, "flow_grpo", 0.2, kl_beta=1.0)
        return st["kl"]

    before = kl()
    loss, _ = flow_grpo.sde_transition_loss(policy, x, x_next, sigmas[3], sigmas[4], torch.zeros(16),
                                            torch.zeros(16), cond, 0.7, "flow_grpo", 0.2, kl_beta=1.0)
    loss.backward()
    with torch.no_grad():
        for p in policy.net.parameters():
            p -= 1e-3 * p.grad
    assert before > 0 and kl() < before


def test_the_kl_is_the_gaussian_kl_of_the_two_sde_steps_per_unit_time():
    """Flow-GRPO's kl_loss, from the velocities alone: both SDE means share x and the drift's x-term, so they differ
    by (v - v_ref)(1 + std^2 (1 - s) / (2 s)) dt, std^2 = a^2 s / (1 - s); the KL is that squared, averaged over
    dims, over 2 std^2 (the official code divides by the diffusion coefficient, not the step's std sqrt(-dt)).
    With zero advantages the PPO term is 0 and the loss is kl_beta * KL."""
    policy = tasks.toy2d_policy(keep_reference=True)
    with torch.no_grad():  # move the policy off its reference
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    sigmas = policy.sigmas(10)
    cond = policy.encode_prompts(["mode 1"] * 8)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    s, s_next, a = sigmas[3].item(), sigmas[4].item(), 0.7  # s = 0.7: s / (1 - s) != 1
    with torch.no_grad():
        v = policy.velocity(x, s, cond)
        with policy.reference():
            v_ref = policy.velocity(x, s, cond)
        loss, st = flow_grpo.sde_transition_loss(policy, x, x + 0.1, sigmas[3], sigmas[4], torch.zeros(8),
                                                 torch.zeros(8), cond, a, "flow_grpo", 0.2, kl_beta=0.5)
    std2 = a**2 * s / (1 - s)
    kl = ((v - v_ref) * (1 + std2 * (1 - s) / (2 * s)) * (s_next - s)).pow(2).mean(1) / (2 * std2)
    assert kl.mean().item() > 0
    assert st["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * kl.mean().item(), rel=1e-5)


def test_rollout_batch_size_splits_the_model_calls_only():
    """--rollout-batch-size 3: every model call holds at most 3 samples, and the rollout (states, old log-probs, x0_hat)
    is the whole-batch one, because each step's SDE noise is drawn for the whole batch."""
    policy = tasks.toy2d_policy(keep_reference=False)
    sigmas = policy.sigmas(6)
    cond = policy.encode_prompts(["mode 2"] * 8)
    noise = policy.initial_noise(8, torch.Generator().manual_seed(0))
    runs, batches = [], []
    forward = policy._forward
    policy._forward = lambda net, x, s, c: (batches.append(len(x)), forward(net, x, s, c))[1]
    for chunk in (0, 3):
        batches.clear()
        torch.manual_seed(1)
        runs.append(flow_grpo.sde_rollout(policy, noise, sigmas, cond, 0.7, "flow_grpo", chunk))
    assert batches == [3, 3, 2] * 6
    for whole, chunked in zip(*runs):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)  # float summation order only


def test_a_run_too_short_to_update_the_evaluation_ema_says_that_it_evaluated_and_saved_the_base_weights(tmp_path,
                                                                                                      capsys):
    """The EMA updates every 8 optimizer steps: after 3 iterations of 2 it still holds the base weights, which the
    "after" evaluation and final/ then are. The run says so; after 4 iterations it does not."""
    short = run(tmp_path / "short", "--iterations", "3")
    assert short["eval_reward_after"] == short["eval_reward_before"]
    assert "the evaluation EMA updates every 8 optimizer steps and this run took 6" in capsys.readouterr().out
    longer = run(tmp_path / "long", "--iterations", "4")
    assert longer["eval_reward_after"] != longer["eval_reward_before"]
    assert "evaluation EMA" not in capsys.readouterr().out


def test_the_after_picture_is_drawn_from_the_weights_evaluated_the_ema(tmp_path, monkeypatch):
    """samples_after.png (image tasks) shows the weights the numbers and final/ come from: with the evaluation EMA,
    the EMA's, not the live trained ones. (The toy stands in for an image task: its grid is recorded, not drawn.)"""
    from pathlib import Path

    from infra import run as run_module
    drawn = {}
    monkeypatch.setattr(run_module, "sample_grid", lambda task, args, path, per_prompt=4: drawn.update(
        {Path(path).name: {n: p.detach().clone() for n, p in task.policy.net.named_parameters()}}))
    load_task = flow_grpo.load_task

    def with_a_grid(*a, **k):
        task = load_task(*a, **k)
        task.grid_prompts = ["mode 0"]
        return task

    monkeypatch.setattr(flow_grpo, "load_task", with_a_grid)
    captured = capture_ema_and_live_weights_at_finish(monkeypatch)
    run(tmp_path, "--iterations", "8")  # 16 optimizer steps: 2 EMA updates
    after = drawn["samples_after.png"]
    assert all(torch.equal(after[n], captured["ema"][n]) for n in after)
    assert any(not torch.equal(after[n], captured["live"][n]) for n in after)
