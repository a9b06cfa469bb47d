"""Every flag reaches the run. A script's flag is either changed here, one at a time, on a small toy run, and the run
must then compute something else (its logged metrics or its evaluation), or it is listed as a flag that leaves the
numbers alone on purpose (memory and speed, which tests/test_memory_flags.py and test_speed_levers.py check give the
same numbers; what is written; image models and prompt files), or as one the script refuses. A new flag fails the
first test until it is put in one of these places, so no flag can be silently ignored (planted, seven ignored flags
got through the fast tier; this test then found a real one: Pro-GRPO read nothing from --group-size)."""

import dataclasses
import importlib
import json

import pytest

SCRIPTS = ["flow_grpo", "dgpo", "neighbor_grpo", "g2rpo", "pro_grpo"]

SAME_NUMBERS = {
    # memory and speed
    "rollout_batch_size", "eval_batch_size", "train_micro_batch_size", "train_micro_batch_groups",
    "gradient_checkpointing", "fit_memory", "memory_budget_gib", "compile", "merge_lora_rollouts", "num_threads",
    "attention_backend",
    # what is written, and the launch
    "output_dir", "overwrite", "resume_from_checkpoint", "report_to", "log_every", "save_weights", "checkpoint_every",
    "checkpoint_minutes",    "checkpoints_total_limit", "dist_timeout_minutes", "eval_every",
    # image models and prompt files (the toy has one reward and its own prompts, and refuses the image models'
    # flags: test_cli.py): test_flux_pipeline.py, test_sd3_pipeline.py, test_prompts.py
    "reward", "pretrained", "max_sequence_length", "reward_dir", "resolution", "guidance_scale", "lora_rank",
    "lora_alpha", "train_prompts", "eval_prompts",
    # what chooses everything else
    "model", "preset", "iterations",
}
REFUSED = {"pro_grpo": {"group_size"}}  # test_pro_grpo.py::test_the_shared_group_size_flag_is_refused_not_ignored

# The small run each change is compared with (two iterations: some flags act from the second on)
BASE = ["--iterations", "2", "--prompts-per-iteration", "2", "--num-steps", "6", "--eval-steps", "4",
        "--eval-samples-per-prompt", "1", "--log-every", "0", "--save-weights", "false", "--checkpoint-every", "0"]
SCRIPT_BASE = {
    "flow_grpo": ["--group-size", "4"],
    "dgpo": ["--group-size", "4", "--num-train-timesteps", "2"],
    "neighbor_grpo": ["--group-size", "4", "--num-anchors", "2", "--num-train-timesteps", "3"],
    "g2rpo": ["--group-size", "4", "--branch-steps", "1,2", "--granularities", "1,2"],
    "pro_grpo": ["--group-sizes", "8,4", "--prune-steps", "2"],
}
# flag: another value (or (value, flags it needs, given to both runs)); the toy presets' values are the base
SHARED = {"seed": 1, "num_steps": 5, "shift": 3.0, "prompts_per_iteration": 3, "group_size": 5, "learning_rate": 3e-3,
          "weight_decay": 0.5, "adam_beta2": 0.5, "max_grad_norm": 1e-4, "mixed_precision": "bf16", "eval_steps": 3,
          "eval_solver": "dpm2m", "eval_samples_per_prompt": 2, "eval_seed": 7}
CHANGES = {
    "flow_grpo": {"sde_variant": "dance_grpo", "noise_level": 0.5, "same_noise_per_group": True,
                  "reward_sample": "x0_hat", "timestep_fraction": 0.5, "ignore_last_step": True,
                  "shuffle_timesteps": True, "adv_std": "group", "adv_clip": 0.5, "clip_range": 0.01, "kl_beta": 0.1,
                  "updates_per_iteration": 1, "eval_ema": False},
    "dgpo": {"rollout_solver": "euler", "rollout_schedule": "dpm-flow", "ema_start": 0,
             "ema_decay": (0.9, ["--ema-start", "0"]), "beta": 3.0, "adv_std": "global", "adv_clip": 0.5,
             "num_train_timesteps": 3, "t_min": 0.6, "kl_beta": 0.5, "clip_dsm": True,
             "clip_range": (0.5, ["--clip-dsm"]), "eval_ema": False},
    "neighbor_grpo": {"perturb_sigma": 0.5, "rollout_solver": "euler", "temperature": 0.5, "num_anchors": 3,
                      "num_train_timesteps": 2, "quasi_norm_p": 2.0, "adv_clip": 0.3, "clip_range": 0.01,
                      "updates_per_iteration": 1},
    "g2rpo": {"branch_steps": "0,2", "granularities": "1,3", "noise_level": 0.5, "adv_clip": 0.5, "clip_range": 0.01},
    "pro_grpo": {"group_sizes": "8,3", "prune_steps": "3", "sde_variant": "dance_grpo", "noise_level": 0.5,
                 "timestep_fraction": 0.5, "adv_std": "global", "adv_clip": 0.5, "clip_range": 0.01, "kl_beta": 0.1,
                 "updates_per_iteration": 1, "eval_ema": False},
}


def flag(name):
    return "--" + name.replace("_", "-")


def cases(name):
    changes = {k: v for k, v in SHARED.items() if k not in REFUSED.get(name, set())} | CHANGES[name]
    for field, change in changes.items():
        value, needs = change if isinstance(change, tuple) else (change, [])
        yield field, value, needs


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_is_tested_for_its_effect_or_listed_as_leaving_the_numbers_alone(name):
    fields = {f.name for f in dataclasses.fields(importlib.import_module(name).Args)}
    placed = SAME_NUMBERS | REFUSED.get(name, set()) | {field for field, _, _ in cases(name)}
    assert fields - placed == set(), f"{name}.py: say what these flags change (CHANGES) or why nothing (SAME_NUMBERS)"
    assert placed - SAME_NUMBERS <= fields, f"{name}.py has no such flags: {placed - SAME_NUMBERS - fields}"


def computed(script, argv, out):
    """What a run computed: every logged metric but the times, and its evaluation before and after."""
    summary = script.main(argv + ["--output-dir", str(out)])
    lines = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
             for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, {k: v for k, v in summary.items() if k.startswith(("eval_", "on_manifold"))}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_changing_any_numeric_flag_changes_what_the_run_computes(name, tmp_path):
    script = importlib.import_module(name)
    base = BASE + SCRIPT_BASE[name]
    runs, unchanged = {}, []
    for n, (field, value, needs) in enumerate(cases(name)):
        key = tuple(needs)
        if key not in runs:
            runs[key] = computed(script, base + needs, tmp_path / f"base{len(runs)}")
        value = str(value).lower() if isinstance(value, bool) else str(value)
        if computed(script, base + needs + [flag(field), value], tmp_path / f"run{n}") == runs[key]:
            unchanged.append(f"{flag(field)} {value}")
    assert not unchanged, f"{name}.py computed the same run with {unchanged}: ignored?"


MEMORY = {"rollout_batch_size": 3, "eval_batch_size": 3, "train_micro_batch_size": 3, "train_micro_batch_groups": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_the_memory_flags_cut_the_work_and_change_nothing(name, tmp_path):
    """Batches of 3 (dividing no batch here), or one group at a time: the same run up to float summation order.
    (Flow-GRPO's rollout drew each chunk's SDE noise in turn, so --rollout-batch-size changed its samples; it now
    draws each step's noise for the whole batch.)"""
    script = importlib.import_module(name)
    base = BASE + SCRIPT_BASE[name]
    fields = {f.name for f in dataclasses.fields(script.Args)}
    whole = computed(script, base, tmp_path / "whole")
    for field in sorted(MEMORY.keys() & fields):
        lines, evaluation = computed(script, base + [flag(field), str(MEMORY[field])], tmp_path / field)
        assert evaluation == pytest.approx(whole[1], rel=1e-5), field
        for a, b in zip(lines, whole[0]):
            assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-3, abs=1e-6), (field, a, b)
