"""Plant plausible math bugs one at a time in a copy of the tree and check that the test meant for each fails.

    python scripts/plant_bugs.py            # each bug planted: every row must say "caught"
    python scripts/plant_bugs.py --clean    # the same tests on the unchanged copy: every row must say "passes"
    python scripts/plant_bugs.py --only DGPO   # only the rows whose name contains "DGPO"

Each row is one line of the code changed to a wrong formula that still runs (a sign, a sigma index, a
flag ignored), and the test written for it (issue 19: these got through the suite before those tests existed).
Prints a markdown table; exits non-zero if a bug got through (or, with --clean, if a test failed on correct code).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what is planted, file, correct line, planted line, the test that must fail on it)
BUGS = [
    ("Flow-GRPO's KL term subtracted", "flow_grpo.py",
     "loss = loss + kl_beta * kl.mean()", "loss = loss - kl_beta * kl.mean()",
     "tests/test_flow_grpo.py::test_the_kl_term_pulls_the_policy_toward_the_reference"),
    ("DGPO's KL term subtracted", "dgpo.py",
     "loss = loss + kl_beta * kl\n", "loss = loss - kl_beta * kl\n",
     "tests/test_dgpo.py::test_the_kl_term_pulls_the_policy_toward_the_reference"),
    ("DGPO rolls out from theta_minus before --ema-start", "dgpo.py",
     "if it >= args.ema_start else", "if it < args.ema_start else",
     "tests/test_dgpo.py::test_rollouts_come_from_theta_minus_only_after_ema_start"),
    ("Neighbor GRPO ignores --quasi-norm-p (always 2)", "neighbor_grpo.py",
     "                                           args.quasi_norm_p)", "                                           2.0)",
     "tests/test_neighbor_grpo.py::test_the_loop_reweights_with_the_quasi_norm_p_it_is_given"),
    ("G2RPO trains the velocity at sigma_{k+1}", "g2rpo.py",
     "v = policy.velocity(anchor[k], sigmas[k], cond)", "v = policy.velocity(anchor[k], sigmas[k + 1], cond)",
     "tests/test_g2rpo.py::test_the_ratio_is_exactly_one_at_the_first_update_of_an_iteration"),
    ("Pro-GRPO's proxy x0_hat = x - (1 - s) v", "pro_grpo.py",
     "x0_hat = x - sigmas[j].float() * v", "x0_hat = x - (1 - sigmas[j].float()) * v",
     "tests/test_pro_grpo.py::test_pruned_trajectories_cost_nothing_and_the_proxy_costs_no_model_call"),
    ("SDE std sqrt((1 - s) / s) for sqrt(s / (1 - s))", "common.py",
     "std = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))",
     "std = noise_level * torch.sqrt((1 - torch.where(s == 1, s_next, s)) / s)",
     "tests/test_samplers.py::test_sde_std_formula_and_first_step_convention"),
    # A second round (54 more bugs planted, 2026-12-01): these got through the fast tier, and all but the first
    # through the slow tier too.
    ("every process takes rank 0's advantages", "common.py",
     "[rank * P:(rank + 1) * P].reshape(-1)", "[:P].reshape(-1)",
     "tests/test_advantages.py::test_each_process_keeps_its_own_groups_advantages_with_the_whole_batchs_statistics"),
    ("Flow-GRPO's KL multiplied by 2 std^2", "flow_grpo.py",
     "kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std.flatten() ** 2)",
     "kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) * (2 * std.flatten() ** 2)",
     "tests/test_flow_grpo.py::test_the_kl_is_the_gaussian_kl_of_the_two_sde_steps_per_unit_time"),
    ("DGPO's dsm clip freezes the wrong direction", "dgpo.py",
     "frozen = torch.where(advantages > 0, ratio > 1 + clip_range, ratio < 1 - clip_range)",
     "frozen = torch.where(advantages > 0, ratio < 1 - clip_range, ratio > 1 + clip_range)",
     "tests/test_dgpo.py::test_the_dsm_clip_freezes_a_sample_once_theta_passed_theta_minus_in_the_direction_its_"
     "advantage_asks"),
    ("Neighbor GRPO's objective takes the max", "neighbor_grpo.py",
     "objective = torch.minimum(a * ratio,", "objective = torch.maximum(a * ratio,",
     "tests/test_neighbor_grpo.py::test_the_clipped_objective_is_ppos_pessimistic_bound"),
    ("Neighbor GRPO's anchor leaps with the velocity at t_j", "neighbor_grpo.py",
     "v = policy.velocity(prev, sigmas[j - 1], select(cond, rows))",
     "v = policy.velocity(prev, sigmas[j], select(cond, rows))",
     "tests/test_neighbor_grpo.py::test_every_anchor_meets_its_own_groups_candidates_and_advantages_at_times_1_to_n"),
    ("Neighbor GRPO draws times 0..N-1", "neighbor_grpo.py",
     "timesteps = (torch.randperm(args.num_steps)[:K] + 1).tolist()",
     "timesteps = torch.randperm(args.num_steps)[:K].tolist()",
     "tests/test_neighbor_grpo.py::test_every_anchor_meets_its_own_groups_candidates_and_advantages_at_times_1_to_n"),
    ("Neighbor GRPO pairs anchors with another group's advantages", "neighbor_grpo.py",
     "advantages[g_of], args.clip_range)", "advantages[b_of % P], args.clip_range)",
     "tests/test_neighbor_grpo.py::test_every_anchor_meets_its_own_groups_candidates_and_advantages_at_times_1_to_n"),
    # The run's plumbing (15 planted): these three got through the fast tier, the last the slow tier too.
    ("the evaluation draws its noise from the global generator", "infra/tasks.py",
     "noise = policy.initial_noise(len(prompts), generator)", "noise = policy.initial_noise(len(prompts))",
     "tests/test_policies.py::test_evaluation_draws_its_fixed_noise_from_eval_seed_whatever_the_global_rng"),
    ("the evaluation does not swap the EMA in", "infra/run.py",
     "        with self.eval_ema.swapped_in() if self.eval_ema is not None else contextlib.nullcontext():\n"
     "            result = evaluate(",
     "        with contextlib.nullcontext():\n            result = evaluate(",
     "tests/test_flow_grpo.py::test_the_final_weights_are_the_evaluated_ema_and_checkpoints_keep_the_live_ones"),
    ("every process seeded alike", "infra/run.py",
     "set_seed(args.seed + self.accelerator.process_index)", "set_seed(args.seed)",
     "tests/test_distributed.py::test_each_process_rolls_out_from_its_own_noise"),
    # A fourth round (14 planted in the scripts' loops): these got through the fast tier.
    ("G2RPO scores every branch step against the first's old log-probs", "g2rpo.py",
     'loss, st = ppo_clip_loss(log_prob, b["log_prob"], advantages, args.clip_range)',
     'loss, st = ppo_clip_loss(log_prob, branches[0]["log_prob"], advantages, args.clip_range)',
     "tests/test_g2rpo.py::test_every_branch_step_sees_its_own_branches_under_its_noise_level_and_every_granularity"),
    ("G2RPO's advantages from the finest granularity only", "g2rpo.py",
     'advantages = mixed_advantages(b["rewards"].to(run.device), args.adv_clip)',
     'advantages = mixed_advantages(b["rewards"][:1].to(run.device), args.adv_clip)',
     "tests/test_g2rpo.py::test_every_branch_step_sees_its_own_branches_under_its_noise_level_and_every_granularity"),
    ("Pro-GRPO keeps the first trajectories, not OVF's", "pro_grpo.py",
     "p * g + optimal_variance_filter(proxy[p].cpu(), keep_k) for p", "p * g + torch.arange(keep_k) for p",
     "tests/test_pro_grpo.py::test_the_survivors_are_the_optimal_variance_subset_of_each_groups_proxy_rewards"),
    ("DGPO's evaluation EMA never steps", "dgpo.py",
     "        if eval_ema is not None:\n            eval_ema.step()\n\n", "\n",
     "tests/test_dgpo.py::test_the_evaluation_ema_steps_once_per_optimizer_step"),
    ("Neighbor GRPO ignores --temperature", "neighbor_grpo.py",
     "tau[j] = args.temperature * d.mean(-1, keepdim=True)", "tau[j] = d.mean(-1, keepdim=True)",
     "tests/test_flags.py::test_changing_any_numeric_flag_changes_what_the_run_computes"),
    # A fifth round (41 planted in checkpoints, rewards, tasks and the shapes checker): these got through the tests
    # of their files.
    ("`latest` and pruning sort checkpoints by name (checkpoint-10 before checkpoint-9)", "infra/run.py",
     "return sorted(found, key=checkpoint_iteration)", "return sorted(found, key=lambda p: p.name)",
     "tests/test_checkpoints.py::test_latest_is_the_highest_iteration_not_the_last_name_in_alphabetical_order"),
    ("a resumed run's wall time starts at the resume", "infra/run.py",
     "wall = self.elapsed_before + time.time() - self.start_time", "wall = time.time() - self.start_time",
     "tests/test_checkpoints.py::test_a_resumed_run_counts_the_time_spent_before_its_checkpoint"),
    ("--eval-every also evaluates at the last iteration", "infra/run.py",
     "if every and (iteration + 1) % every == 0 and iteration + 1 < self.args.iterations:\n            metrics.update",
     "if every and (iteration + 1) % every == 0:\n            metrics.update",
     "tests/test_checkpoints.py::test_eval_every_scores_the_weights_of_that_iteration_and_leaves_the_last_to_the_"
     "after_evaluation"),
    ("PickScore divided by 100, not Flow-GRPO's 26", "infra/rewards.py",
     "logit_scaled=True, divide=26.0)", "logit_scaled=True, divide=100.0)",
     "tests/test_rewards.py::test_pickscore_loads_from_the_reward_dir_as_flow_grpo_scales_it"),
    ("CLIP's resize without antialiasing", "infra/rewards.py",
     "align_corners=False, antialias=True)", "align_corners=False, antialias=False)",
     "tests/test_rewards.py::test_clip_preprocess_resizes_as_clips_own_image_processor"),
    ("the shapes relation read from the smallest objects", "infra/shapes.py",
     'largest.append(max(match, key=lambda o: o["area"]) if match else None)',
     'largest.append(min(match, key=lambda o: o["area"]) if match else None)',
     "tests/test_shapes.py::test_counts_are_exact_and_relations_read_the_largest_objects_on_their_dominant_axis"),
    ("tiny-flux evaluates on its training colours", "infra/tasks.py",
     "return colors[:8], colors[8:]", "return colors[:8], colors[:8]",
     "tests/test_shapes.py::test_tiny_flux_evaluates_on_colours_it_never_trains_on"),
    # A sixth round (28 planted in the command line, the attention check, the optimizer step and the memory plan).
    ("the attention check ignores the gradients", "infra/attention.py",
     'for label, a, b in zip(("output", "dq", "dk", "dv"), got, want):',
     'for label, a, b in zip(("output",), got, want):',
     "tests/test_attention.py::test_a_kernel_whose_backward_alone_gives_nan_fails_the_check"),
    ("a bf16 run checks its attention kernel in the weights' fp32", "infra/run.py",
     "dtype = mp or next(task.policy._unwrapped().parameters()).dtype",
     "dtype = next(task.policy._unwrapped().parameters()).dtype",
     "tests/test_attention.py::test_a_bf16_run_checks_the_kernel_in_bf16"),
    ("a resumed run may change its learning rate", "infra/args.py",
     'RESUMABLE = {"iterations",', 'RESUMABLE = {"iterations", "learning_rate",',
     "tests/test_cli.py::test_resume_takes_the_runs_own_flags_and_refuses_ones_that_change_what_it_computes"),
    # A seventh round (40 planted in model loading and saving, the prompt cache, the toy base, scripts/check_run.py).
    ("LoRA alpha defaults to the rank, not 2 x rank", "infra/diffusers_models.py",
     "lora_alpha=lora_alpha or 2 * lora_rank,", "lora_alpha=lora_alpha or lora_rank,",
     "tests/test_policies.py::test_lora_alpha_defaults_to_twice_the_rank_as_the_reference_code"),
    ("save writes this process's module, not the gathered state", "infra/diffusers_models.py",
     "directory, transformer_lora_layers=lora_state_dict(state),",
     "directory, transformer_lora_layers=lora_state_dict(self._unwrapped().state_dict()),",
     "tests/test_policies.py::test_save_writes_the_state_it_is_given_not_its_own_module"),
    ("SD3 ignores the pipeline's scheduler config", "infra/pipelines.py",
     'extra = {"scheduler_config": dict(pipe.scheduler.config)} if args.model == "sd3" else {}', "extra = {}",
     "tests/test_sd3_pipeline.py::test_cfg_velocity_matches_the_pipelines_denoising_step"),
    ("the text encoders are kept after embedding", "infra/pipelines.py",
     "                setattr(pipe, name, None)", "                pass",
     "tests/test_flux_pipeline.py::test_under_bf16_the_base_loads_in_bf16_and_the_text_encoders_are_let_go"),
    ("the toy base's pretraining reseeds the global RNG", "infra/pretrained.py",
     "    with torch.random.fork_rng(devices=[]):", "    if True:",
     "tests/test_policies.py::test_the_pretrained_toy_base_depends_on_its_config_alone"),
    ("memory-efficient attention not checked in the reward models' fp32", "infra/attention.py",
     "    in_fp32 = ([] if dtype == torch.float32 else [(shape, \"(the reward models' dtype)\")]) + [",
     "    in_fp32 = [] + [",
     "tests/test_attention.py::test_a_kernel_the_fp32_reward_models_would_use_is_checked_in_fp32_too"),
    # A ninth round (35 planted in the benchmark's bookkeeping, the run's logging and the distributed step).
    ("the benchmark's ratios against the baseline inverted", "benchmarks/benchmark.py",
     "t = f\"{bs / statistics.mean(s['reach_seconds']):.2f}x\"",
     "t = f\"{statistics.mean(s['reach_seconds']) / bs:.2f}x\"",
     "tests/test_benchmark.py::test_task_report_table_and_ratios_against_the_baseline"),
    ("an iteration's NFE logged as the running total", "infra/run.py",
     'calls = torch.tensor([nfe["no_grad"] - self._nfe0["no_grad"], ', 'calls = torch.tensor([nfe["no_grad"], ',
     "tests/test_benchmark.py::test_a_benchmark_run_follows_the_protocol"),
    ("the prompt cache keyed without the encoders' dtype", "infra/pipelines.py",
     '           "dtype": str(dtype).removeprefix("torch.")}', '           }',
     "tests/test_prompt_cache.py::test_the_cache_is_keyed_by_everything_that_changes_the_embeddings"),
    ("the reward models' own attention shapes never checked", "infra/attention.py",
     '(s, f"at a reward model\'s {s}") for s in rewards]', '(s, f"at a reward model\'s {s}") for s in []]',
     "tests/test_attention.py::test_the_reward_models_shapes_are_checked_in_fp32_too"),
    ("the GPU smoke ignores what scripts/check_run.py says", "scripts/gpu_smoke.sh",
     '"${NAMES[@]/#/$OUT/}" || failed=1', '"${NAMES[@]/#/$OUT/}" || true',
     "tests/test_gpu_scripts.py::"
     "test_the_smoke_fails_on_a_nan_a_crash_or_weights_that_never_moved_and_names_those_runs"),
    ("the shapes base pretrains toward x0 - eps", "infra/shapes.py",
     "loss = F.mse_loss(v, eps - x0)", "loss = F.mse_loss(v, x0 - eps)",
     "tests/test_shapes.py::test_pretraining_is_flux_flow_matching_on_rendered_train_prompts"),
    ("the shapes text encoder drops its position embeddings", "infra/shapes.py",
     "embeds = self.words(ids) + self.positions", "embeds = self.words(ids)",
     "tests/test_shapes.py::test_the_order_of_the_words_reaches_the_transformer"),
    ("--fit-memory counts an input shared by every block once per block", "infra/memory.py",
     "            inputs.update(mine)", "            inputs.update({k + i: v for k, v in mine.items()})",
     "tests/test_fit_memory.py::test_the_blocks_inputs_are_counted_once_each_and_the_estimates_are_the_docstrings"),
    ("the toy picture's reward curve drawn upside down", "infra/plots.py",
     "pts = [(x0 + i / (len(rewards) - 1) * PANEL, 20 + (1 - min(max(r, 0), 1)) * PANEL)",
     "pts = [(x0 + i / (len(rewards) - 1) * PANEL, 20 + min(max(r, 0), 1) * PANEL)",
     "tests/test_plots.py::test_the_toy_picture_draws_the_curve_upright_and_before_left_of_after"),
    ("DGPO's reference velocity with CFG", "dgpo.py",
     "    with torch.no_grad(), policy.reference(), policy.without_cfg():\n        v_ref",
     "    with torch.no_grad(), policy.reference():\n        v_ref",
     "tests/test_dgpo.py::test_every_training_call_is_cfg_free_the_reference_and_theta_minus_too"),
    ("Neighbor GRPO's tau from the farthest candidate, not the mean", "neighbor_grpo.py",
     "tau[j] = args.temperature * d.mean(-1, keepdim=True)", "tau[j] = args.temperature * d.amax(-1, keepdim=True)",
     "tests/test_neighbor_grpo.py::test_every_anchor_meets_its_own_groups_candidates_and_advantages_at_times_1_to_n"),
    ("G2RPO clips each granularity's advantage before the sum", "g2rpo.py",
     'group_advantages(rewards, std="group", clip=float("inf"))', 'group_advantages(rewards, std="group", clip=clip)',
     "tests/test_g2rpo.py::test_mixed_advantages_are_the_sum_of_per_granularity_z_scores"),
    # Round 12 (the command line, the run's bookkeeping, the evaluation): these got through the fast tier.
    ("a resumed run takes the preset's --iterations, not its own", "infra/args.py",
     "values.update({k: v for k, v in saved.items() if k in fields})",
     "values.update({k: v for k, v in saved.items() if k in fields and k not in RESUMABLE})",
     "tests/test_cli.py::test_resume_takes_the_runs_own_flags_and_refuses_ones_that_change_what_it_computes"),
    ("a resume refuses only the changes typed as flags, not a config file's", "infra/args.py",
     "if k in fields and k not in RESUMABLE and saved[k] != getattr(args, k)]",
     "if k in fields and k not in RESUMABLE and k in explicit and saved[k] != getattr(args, k)]",
     "tests/test_cli.py::test_resume_takes_the_runs_own_flags_and_refuses_ones_that_change_what_it_computes"),
    ("pro_grpo.py --model sd3 defaults to the Flash preset", "infra/args.py",
     "        return matching[0]\n", "        return matching[-1]\n",
     "tests/test_cli.py::test_a_real_model_without_a_preset_flag_runs_its_paper_preset"),
    ("a folder holding only checkpoints/ is not taken for a run's", "infra/run.py",
     "held = [name for name in OUTPUTS if (self.out / name).exists()]",
     "held = [name for name in OUTPUTS[:2] if (self.out / name).exists()]",
     "tests/test_cli.py::test_an_output_dir_that_holds_a_run_is_refused_unless_resumed_or_overwritten"),
    ("reward/group_std logged as the whole batch's std", "infra/run.py",
     '"reward/group_std": rewards.std(dim=-1).mean(),', '"reward/group_std": rewards.std(),',
     "tests/test_flow_grpo.py::test_each_metrics_line_holds_the_statistics_of_that_iterations_rewards"),
    ("the evaluation samples at the rollouts' --num-steps", "infra/tasks.py",
     "    sigmas = policy.sigmas(args.eval_steps, args.shift)\n",
     "    sigmas = policy.sigmas(args.num_steps, args.shift)\n",
     "tests/test_policies.py::test_evaluation_is_the_plain_ode_at_eval_steps_from_eval_seed_noise_whatever_its_batch"),
    ("every evaluation chunk takes the first chunk's noise", "infra/tasks.py",
     "x0 = sample_ode(policy, noise[rows], sigmas,", "x0 = sample_ode(policy, noise[:len(p)], sigmas,",
     "tests/test_policies.py::test_evaluation_is_the_plain_ode_at_eval_steps_from_eval_seed_noise_whatever_its_batch"),
    ("the sampler's fp32 states handed to a bf16 VAE", "infra/diffusers_models.py",
     "img = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]",
     "img = self.vae.decode(latents, return_dict=False)[0]",
     "tests/test_flux_pipeline.py::test_under_bf16_the_base_loads_in_bf16_and_the_text_encoders_are_let_go"),
    # Round 13 (how each backward pass is weighted and what an optimizer step sees): these got through the
    # algorithm tests.
    ("Flow-GRPO's backward without the 1 / n_train", "flow_grpo.py",
     "accelerator.backward(loss * len(mb) / len(batch) / n_train)", "accelerator.backward(loss * len(mb) / len(batch))",
     "tests/test_flow_grpo.py::"
     "test_an_update_step_takes_the_gradient_of_the_mean_loss_over_its_samples_and_their_trained_transitions"),
    ("Flow-GRPO weights uneven micro-batches alike", "flow_grpo.py",
     "accelerator.backward(loss * len(mb) / len(batch) / n_train)", "accelerator.backward(loss / len(micro) / n_train)",
     "tests/test_flow_grpo.py::"
     "test_an_update_step_takes_the_gradient_of_the_mean_loss_over_its_samples_and_their_trained_transitions"),
    ("Flow-GRPO's optimizer steps split the samples in order", "flow_grpo.py",
     "for batch in torch.randperm(batch_size, device=steps.device).chunk(updates):",
     "for batch in torch.arange(batch_size, device=steps.device).chunk(updates):",
     "tests/test_flow_grpo.py::test_the_optimizer_steps_of_an_update_split_the_samples_at_random"),
    ("Flow-GRPO's logged approx_kl without its 0.5", "flow_grpo.py",
     '"approx_kl": 0.5 * (log_ratio.detach() ** 2).mean().item()}',
     '"approx_kl": (log_ratio.detach() ** 2).mean().item()}',
     "tests/test_advantages.py::test_ppo_loss_matches_the_formula_and_its_gradient_has_the_sign_of_A"),
    ("DGPO's backward without the 1 / M", "dgpo.py",
     "acc.backward(loss * len(mb) / (P * G) / len(timesteps))", "acc.backward(loss * len(mb) / (P * G))",
     "tests/test_dgpo.py::test_the_step_takes_the_gradient_of_the_mean_over_timesteps_of_the_whole_batchs_group_loss"),
    ("DGPO draws a new group noise for every micro-batch", "dgpo.py",
     "if mb[0] == 0:  # a new timestep", "if mb[0] >= 0:  # a new timestep",
     "tests/test_dgpo.py::test_the_step_takes_the_gradient_of_the_mean_over_timesteps_of_the_whole_batchs_group_loss"),
    ("DGPO updates theta_minus before the optimizer step", "dgpo.py",
     "        grad_norm = optimizer_step(acc, policy, optimizer, args.max_grad_norm)\n        theta_minus.update()\n",
     "        theta_minus.update()\n        grad_norm = optimizer_step(acc, policy, optimizer, args.max_grad_norm)\n",
     "tests/test_dgpo.py::test_one_optimizer_step_and_one_theta_minus_update_per_iteration"),
    ("DGPO's KL summed over dimensions", "dgpo.py",
     "kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()", "kl = (v - v_ref).pow(2).flatten(1).sum(1).mean()",
     "tests/test_dgpo.py::test_the_kl_term_pulls_the_policy_toward_the_reference"),
    ("Neighbor GRPO's backward without the 1 / (timesteps in the step)", "neighbor_grpo.py",
     "acc.backward(loss * len(mb) / (P * B) / len(chunk_j))", "acc.backward(loss * len(mb) / (P * B))",
     "tests/test_neighbor_grpo.py::test_each_step_takes_the_gradient_of_the_mean_over_its_timesteps_and_anchors"),
    # 2026-12-07: MFU without the recomputation, the attention check with masks, and the text encoders' kernels
    ("MFU counts gradient checkpointing's recomputed forwards", "benchmarks/timing.py",
     "with sdpa_kernel(SDPBackend.MATH), policy.nfe_paused(), without_checkpointing(policy._unwrapped()):",
     "with sdpa_kernel(SDPBackend.MATH), policy.nfe_paused():",
     "tests/test_timing.py::test_mfu_counts_the_models_flops_not_gradient_checkpointings_recomputation"),
    ("the attention check leaves the mask out", "infra/attention.py",
     "attn_mask=None if mask is None else mask.to(dt))", "attn_mask=None)",
     "tests/test_attention.py::test_masked_calls_are_checked_with_their_mask"),
    ("a kernel failing at the text encoders stays on while they embed", "infra/attention.py",
     "    enable(set(passing))\n    log(f\"text encoders'", "    enable(set(candidates))\n    log(f\"text encoders'",
     "tests/test_attention.py::"
     "test_a_pipeline_checks_its_text_encoders_kernels_at_the_calls_they_make_before_they_embed"),
    # 2026-12-07 (second session): a resume with no iterations left; a reward that cannot score the prompts;
    # SIGTERM
    ("`latest` of a finished run evaluates again and rewrites its summary", "infra/args.py",
     "if done is not None and done >= args.iterations:", "if done is not None and done > args.iterations:",
     "tests/test_checkpoints.py::test_a_resume_needs_iterations_left"),
    ("a checkpoint past --iterations is resumed, and the summary claims fewer iterations", "infra/args.py",
     "if trained is not None and trained > args.iterations:", "if trained is not None and trained < 0:",
     "tests/test_checkpoints.py::test_a_resume_needs_iterations_left"),
    ("the prompts are not checked against the reward's parser", "infra/args.py",
     "                    PROMPT_PARSERS[name](prompt)", "                    str(prompt)",
     "tests/test_cli.py::test_a_reward_that_cannot_score_the_models_samples_or_prompts_is_refused_with_the_flags"),
    ("samples_after.png drawn from the live weights, not the evaluated EMA", "infra/run.py",
     "            if task.grid_prompts and label in (\"before\", \"after\"):  # the picture of the weights evaluated\n"
     "                sample_grid(",
     "        if task.grid_prompts and label in (\"before\", \"after\"):  # the picture of the weights evaluated\n"
     "            sample_grid(",
     "tests/test_flow_grpo.py::test_the_after_picture_is_drawn_from_the_weights_evaluated_the_ema"),
    ("every process evaluates the first share of the samples", "infra/tasks.py",
     "mine = [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]",
     "mine = [min(i, n - 1) for i in range(0, share)]",
     "tests/test_distributed.py::"
     "test_an_evaluation_split_over_processes_equals_one_process_also_when_they_do_not_divide_it"),
    ("SIGTERM stops without a checkpoint of the finished iteration", "infra/run.py",
     "            if not saved:\n                self.save_checkpoint(iteration + 1)\n", "            pass\n",
     "tests/test_checkpoints.py::"
     "test_sigterm_finishes_the_iteration_checkpoints_it_and_the_resumed_run_matches_an_uninterrupted_one"),
    ("SIGTERM in the training loop stops at once, losing the iteration", "infra/run.py",
     "        self._terminating = True\n", "        return self._interrupted(signum, frame)\n",
     "tests/test_checkpoints.py::"
     "test_sigterm_finishes_the_iteration_checkpoints_it_and_the_resumed_run_matches_an_uninterrupted_one"),
    # 2026-12-07 (third session): the reward's output, the process count of a resume, what a job's log shows, the
    # timestep clip with the flags
    ("a reward's (B, 1) output is kept as it is", "infra/rewards.py",
     "return out.reshape(n).float()", "return out.float()",
     "tests/test_rewards.py::test_a_reward_that_does_not_return_one_number_per_sample_stops_with_its_name"),
    ("a checkpoint resumes with any number of processes", "infra/run.py",
     "if not written or written == world:", "if True:",
     "tests/test_checkpoints.py::test_a_checkpoint_resumes_only_with_as_many_processes_as_wrote_it"),
    ("no console line for a minute-long iteration between --log-every lines", "infra/run.py",
     "if every and (iteration % every == 0 or last or time.time() - self._last_line >= LOG_INTERVAL):",
     "if every and (iteration % every == 0 or last):",
     "tests/test_cli.py::test_a_console_line_comes_every_log_every_iterations_and_after_a_minute_without_one"),
    ("the progress ETA divides by the total, not by what is done", "infra/progress.py",
     "ETA {duration(spent / self.done * (self.total - self.done))}",
     "ETA {duration(spent / self.total * (self.total - self.done))}",
     "tests/test_prompt_cache.py::test_progress_lines_come_at_most_every_interval_and_never_from_a_quiet_process"),
    ("DGPO's timestep clip on the DPM flow schedule waits for the model to load", "dgpo.py",
     "        if self.rollout_schedule == \"dpm-flow\":\n", "        if False:\n",
     "tests/test_cli.py::test_the_timestep_clip_on_the_dpm_flow_schedule_is_checked_with_the_flags"),
    ("each process names the default --output-dir from its own clock", "infra/run.py",
     "        if default_dir:\n            self._claim_default_dir()\n", "",
     "tests/test_distributed.py::"
     "test_without_output_dir_every_process_writes_into_the_directory_the_main_process_chose"),
    ("a run without --output-dir takes the name of one started in the same second", "infra/run.py",
     "                except FileExistsError:\n                    continue\n",
     "                except FileExistsError:\n                    break\n",
     "tests/test_cli.py::test_runs_without_output_dir_started_in_the_same_second_get_a_directory_each"),
    ("--fit-memory plans from each process's own measurement", "infra/memory.py",
     "    if accelerator.num_processes > 1:  # one plan for all", "    if False:  # one plan for all",
     "tests/test_distributed.py::test_fit_memory_plans_alike_on_every_process_from_the_largest_measurement"),
    ("--checkpoint-minutes never writes a checkpoint", "infra/run.py",
     "late = bool(minutes) and time.time() - self._last_checkpoint >= 60 * minutes and self.is_main",
     "late = False",
     "tests/test_checkpoints.py::test_a_checkpoint_comes_after_an_iteration_that_ends_checkpoint_minutes_after_the_last"),
    ("a resumed run takes --overwrite from the config.json of a run started with it", "infra/args.py",
     '    for launch_only in ("output_dir", "resume_from_checkpoint", "overwrite"):',
     '    for launch_only in ("output_dir", "resume_from_checkpoint"):',
     "tests/test_cli.py::test_overwrite_and_resume_together_are_refused_and_a_run_started_with_overwrite_resumes"),
    ("a failed run leaves its empty default directory", "infra/run.py",
     "                    atexit.register(_remove_if_empty, path)", "                    pass",
     "tests/test_cli.py::test_a_run_without_output_dir_that_fails_before_writing_leaves_no_directory"),
    # 2026-12-07 (fourth session): prompt files edited before a resume, the toy's speed flags with the flags
    ("a checkpoint records its prompts' count, not their content", "infra/run.py",
     'return {"prompts": len(prompts), "sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}',
     'return {"prompts": len(prompts)}',
     "tests/test_checkpoints.py::test_a_prompt_file_edited_since_the_checkpoint_is_refused_at_resume"),
    ("an edited prompt file is found only after the model loads", "infra/args.py",
     "    if changed:  # before minutes of model loading\n        raise ArgumentError(prog, changed)\n", "",
     "tests/test_checkpoints.py::test_a_prompt_file_edited_since_the_checkpoint_is_refused_at_resume"),
    ("the toy's --compile fails only once its model has loaded", "infra/args.py",
     '"compile", "gradient_checkpointing", "fit_memory"),', '),',
     "tests/test_cli.py::test_a_flag_the_model_has_no_use_for_is_refused_not_ignored"),
    ("a path flag's leading ~ is taken literally", "infra/args.py",
     "                source[name] = os.path.expanduser(source[name])", "                pass",
     "tests/test_cli.py::test_a_path_starting_with_a_tilde_is_in_the_home_directory"),
    ("Ctrl-C while the model loads is a traceback", "infra/run.py",
     "        if on_main_thread:  # Ctrl-C from here on", "        if False:  # Ctrl-C from here on",
     "tests/test_checkpoints.py::test_ctrl_c_while_the_model_loads_is_one_line_and_leaves_no_directory"),
    ("a checkpoint resumed into another --output-dir takes the preset's flags", "infra/args.py",
     "        _check_resume_dir(resume, output_dir)\n", "",
     "tests/test_checkpoints.py::test_a_checkpoint_resumes_in_its_own_runs_directory"),
    ("another script resumes a checkpoint", "infra/run.py",
     '        wrote = saved["progress"].get("algorithm", self.algorithm)', "        wrote = self.algorithm",
     "tests/test_checkpoints.py::test_a_checkpoint_resumes_only_with_the_script_that_wrote_it"),
    ("a refused resume has written its config.json over the run's", "infra/run.py",
     "        # every check before the first write: a refused resume must leave the run's config.json as it was\n",
     "        self._write_config()\n",
     "tests/test_checkpoints.py::test_a_checkpoint_resumes_only_with_the_script_that_wrote_it"),
    ("an --output-dir the processes do not share goes unnoticed", "infra/run.py",
     "            if blind:  # (decided together", "            if False:  # (decided together",
     "tests/test_distributed.py::test_an_output_dir_that_is_not_shared_by_the_processes_stops_them_all_at_start"),
    ("a run's directory given as its checkpoint is refused only after the model loads", "infra/args.py",
     '        if not list(point.glob("run_state_*.pt")):  # (a run', "        if False:  # (a run",
     "tests/test_checkpoints.py::test_resume_errors_are_clear"),
    ("every prompt label drawn over the first row", "infra/tasks.py",
     "draw.text((pad + 1, pad + r * pitch), text, fill=(0, 0, 0))", "draw.text((pad + 1, pad), text, fill=(0, 0, 0))",
     "tests/test_plots.py::test_the_sample_grid_puts_a_prompt_per_row_and_draws_the_same_noise_from_eval_seed"),
    ("a resume takes another base transformer from a moved --pretrained", "infra/run.py",
     '    if base and saved.get("base") and base != saved["base"]:', "    if False:",
     "tests/test_flux_pipeline.py::test_a_resume_refuses_a_pretrained_directory_whose_transformer_differs"),
    # 2026-12-07 (fifth session): the last iteration's checkpoint, and stop messages numbered as the console lines
    ("no checkpoint after the last iteration: a run stopped in its final evaluation trains again", "infra/run.py",
     "due = bool(every) and ((iteration + 1) % every == 0 or iteration + 1 == self.args.iterations)",
     "due = bool(every) and (iteration + 1) % every == 0",
     "tests/test_checkpoints.py::test_a_run_stopped_in_its_final_evaluation_resumes_to_that_evaluation_alone"),
    ("a stop message numbers iterations from 0, the console from 1", "infra/run.py",
     'return f"in iteration {self.iteration + 1} of {self.args.iterations}"',
     'return f"in iteration {self.iteration} of {self.args.iterations}"',
     "tests/test_nonfinite.py::test_a_nan_reward_stops_the_run_and_leaves_the_last_checkpoint_intact"),
    # the same session: one run at a time in an output directory (RunLock)
    ("a live run's lock on this host is taken over", "infra/run.py",
     '            if not _alive(holder.get("pid")):', "            if True:",
     "tests/test_run_lock.py::test_a_directory_a_live_run_holds_is_refused_and_nothing_is_deleted"),
    ("a heartbeat on another host goes unseen", "infra/run.py",
     "            if now_mtime != mtime:", "            if False:",
     "tests/test_run_lock.py::test_a_directory_a_live_run_holds_is_refused_and_nothing_is_deleted"),
    ("the lock's heartbeat never beats", "infra/run.py",
     "                os.utime(self.path)", "                pass",
     "tests/test_run_lock.py::test_a_run_that_ends_leaves_no_lock_and_its_heartbeat_refreshed_it_while_it_ran"),
    ("a finished run leaves its lock", "infra/run.py",
     "        self._restore_signals()\n        if self.lock is not None:\n            self.lock.release()\n"
     "        return summary",
     "        self._restore_signals()\n        return summary",
     "tests/test_run_lock.py::test_a_run_that_ends_leaves_no_lock_and_its_heartbeat_refreshed_it_while_it_ran"),
    # the sixth session: writes that fail, and a directory lost to another run
    ("torch.save's full-disk error is taken for another error (a traceback)", "infra/run.py",
     'r"unexpected pos|write|I/O error', 'r"I/O error',
     "tests/test_write_failures.py::test_a_file_size_limit_the_first_checkpoint_exceeds_stops_the_run_with_one_line"),
    ("a checkpoint that could not be written stays half on the disk", "infra/run.py",
     "                shutil.rmtree(path, ignore_errors=True)\n", "                pass\n",
     "tests/test_write_failures.py::test_a_full_disk_at_a_later_checkpoint_keeps_the_earlier_one_and_the_run_"
     "resumes_from_it"),
    ("a write that fails on one process alone stops it alone", "infra/run.py",
     "        error = self._agree(error)  # (also the barrier before the rename)",
     "        self.accelerator.wait_for_everyone()",
     "tests/test_distributed.py::test_a_write_that_fails_on_one_process_stops_every_process_with_its_line"),
    ("final weights that could not be written stay half on the disk", "infra/run.py",
     '                shutil.rmtree(final.with_name("final.partial"), ignore_errors=True)', "                pass",
     "tests/test_write_failures.py::test_a_full_disk_while_writing_the_final_weights_leaves_no_half_of_them_and_"
     "resumes_to_the_evaluation"),
    ("a run whose directory another run took over writes on", "infra/run.py",
     "        if lost is not None:  # before this iteration wrote anything", "        if False:  # before",
     "tests/test_run_lock.py::test_a_run_whose_directory_is_not_its_own_any_more_stops_before_its_next_write"),
    ("the heartbeat refreshes another run's lock", "infra/run.py",
     "self._stop.wait(self.HEARTBEAT_SECONDS) and self.lost() is None:", "self._stop.wait(self.HEARTBEAT_SECONDS):",
     "tests/test_run_lock.py::test_a_run_whose_directory_is_not_its_own_any_more_stops_before_its_next_write"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="plant nothing: the tests must pass on the copy")
    parser.add_argument("--only", default="", help="only the rows whose planted bug's name contains this text")
    cli = parser.parse_args()
    clean, bugs = cli.clean, [bug for bug in BUGS if cli.only in bug[0]]
    if not bugs:
        sys.exit(f"no planted bug's name contains {cli.only!r}")
    print("| planted bug | test | result |\n| --- | --- | --- |", flush=True)
    wrong = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, file, correct, planted, test in bugs:
            tree = Path(tmp) / "tree"
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv*", ".cache", "runs", "results",
                                                                      "__pycache__"))
            source = (tree / file).read_text()
            if source.count(correct) != 1:  # the code moved on: this row must be updated, not skipped
                sys.exit(f"{file} no longer holds the line {correct.strip()!r} exactly once: update BUGS")
            if not clean:
                (tree / file).write_text(source.replace(correct, planted))
            start = time.time()
            failed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                                    cwd=tree, capture_output=True).returncode != 0
            result = ("caught" if failed else "NOT CAUGHT") if not clean else ("FAILS" if failed else "passes")
            wrong += result in ("NOT CAUGHT", "FAILS")
            print(f"| {name + (' (none planted)' if clean else '')} | `{test.split('::')[1]}` | {result} "
                  f"({time.time() - start:.0f} s) |", flush=True)
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
