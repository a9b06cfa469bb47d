"""`--fit-memory` (infra/memory.py): the probe counts what autograd keeps exactly (an independent walk of the autograd
graph agrees), the plan is the arithmetic the docstring states, a run applies the plan it logs, and bad launches stop
with one line."""

import contextlib
import json

import pytest
import torch

import common
import dgpo
import flow_grpo
import g2rpo
import neighbor_grpo
import pro_grpo
from infra import memory, tasks
from infra.args import ArgumentError, parse_args
from infra.diffusers_models import FluxPolicy, SD3Policy, build_tiny_flux, transformer_blocks
from conftest import register_toy_as

QUIET = ["--log-every", "0", "--checkpoint-every", "0", "--save-weights", "false"]
MIB = 2**20


def graph_walk_bytes(out: torch.Tensor, weights: set[int]) -> int:
    """The distinct storages held by every node of out's autograd graph (its `_saved_*` tensors), weights left out:
    what a backward pass would need, found without saved-tensor hooks."""
    held, stack, visited = {}, [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
                        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [f for f, _ in node.next_functions]
    return sum(held.values())


@pytest.mark.parametrize("resolution,lora_rank", [(32, 4), (64, 4), (32, 0)])
def test_probe_counts_what_the_autograd_graph_holds(resolution, lora_rank):
    policy = build_tiny_flux(resolution=resolution, lora_rank=lora_rank)
    cond = policy.encode_prompts(["a photo of red"])
    act = memory.measure(policy, cond, contextlib.nullcontext)
    weights = {p.untyped_storage().data_ptr() for p in policy.net.parameters()}
    held = []
    for n in (1, 2):
        x = policy.initial_noise(n)
        c = {k: t.expand(n, *t.shape[1:]).contiguous() for k, t in cond.items()}
        out = policy._forward(policy.net, x, torch.full((n,), 0.5), c)
        held.append(graph_walk_bytes(out, weights))
    assert act.grad == held[1] - held[0] > 0
    # checkpointing keeps less; a no-grad call's working set is one block's, less again
    assert 0 < act.no_grad < act.checkpointed < act.grad
    # per sample: quadrupling the image tokens (64 px against 32) grows it about fourfold, not by a constant
    if resolution == 64:
        small = memory.measure(build_tiny_flux(resolution=32, lora_rank=4), cond, contextlib.nullcontext)
        assert 3.0 < act.grad / small.grad < 4.5


def test_probe_leaves_no_graph_and_no_hook_behind():
    policy = build_tiny_flux(lora_rank=4)
    cond = policy.encode_prompts(["a photo of red"])
    memory.measure(policy, cond, contextlib.nullcontext)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in transformer_blocks(policy.net))
    x = policy.initial_noise(2)
    out = policy.velocity(x, 0.5, {k: t.expand(2, *t.shape[1:]) for k, t in cond.items()})
    out.square().mean().backward()  # a normal call and backward still work after the probe
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_the_blocks_inputs_are_counted_once_each_and_the_estimates_are_the_docstrings():
    """A storage handed to several blocks (FLUX's rotary embedding and time embedding reach every block) is one
    storage in memory: "inputs" counts the distinct storages of all blocks' inputs, found here by hooks of the
    test's own. Checkpointing keeps those inputs, what the embeddings and the output layer save ("outside") and one
    block's activations; a no-grad call's working set is the largest block's inputs plus its intermediates."""
    policy = build_tiny_flux(lora_rank=4)
    cond = policy.encode_prompts(["a photo of red"])
    blocks = transformer_blocks(policy.net)
    storages, per_block = {}, []

    def record(module, args, kwargs):
        mine = {}
        stack = [args, kwargs]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                mine[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            elif isinstance(v, (tuple, list)):
                stack += list(v)
            elif isinstance(v, dict):
                stack += list(v.values())
        per_block.append(mine)
        storages.update(mine)
    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            policy._forward(policy.net, policy.initial_noise(1), torch.full((1,), 0.5), cond)
    finally:
        for h in handles:
            h.remove()
    shared = set.intersection(*(set(m) for m in per_block))
    assert shared  # the rotary embedding, at least
    saved = memory.saved_bytes(policy, policy.initial_noise(1), 0.5, cond, contextlib.nullcontext)
    assert saved["inputs"] == sum(storages.values()) < sum(saved["block_inputs"])
    assert saved["block_inputs"] == [sum(m.values()) for m in per_block]

    fake = {"saved": 1000, "per_block": [50, 70, 60], "block_inputs": [30, 10, 40], "inputs": 45, "outside": 7}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "per_sample_bytes", lambda *a: fake)
        act = memory.measure(policy, cond, contextlib.nullcontext)
    assert act == memory.ActivationBytes(grad=1000, checkpointed=45 + 70 + 7, no_grad=max(80, 80, 100))


def test_the_reserve_counts_the_optimizer_and_each_ema():
    n = 1000
    assert memory.reserve_bytes(parse_args(g2rpo.Args, g2rpo.PRESETS, ["--model", "tiny-flux"]), n) == 12 * n
    # Flow-GRPO: the evaluation EMA and the copy its swap holds
    assert memory.reserve_bytes(parse_args(flow_grpo.Args, flow_grpo.PRESETS, []), n) == 20 * n
    assert memory.reserve_bytes(parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--eval-ema", "false"]), n) == 12 * n
    # DGPO: theta_minus and the evaluation EMA, and a swap's copy
    assert memory.reserve_bytes(parse_args(dgpo.Args, dgpo.PRESETS, ["--eval-ema", "true"]), n) == 24 * n


def test_plan_arithmetic():
    act = memory.ActivationBytes(grad=100, checkpointed=30, no_grad=10)
    # everything fits: all units, no checkpointing
    assert memory.plan(act, 10_000, unit_samples=4, units=3, no_grad_cfg=False) == memory.Plan(3, False, 1000)
    # room for 2 units of 400 without checkpointing: 2 of 5
    assert memory.plan(act, 850, 4, 5, False) == memory.Plan(2, False, 85)
    # not one unit of 400, but 2 units of 120 with checkpointing
    assert memory.plan(act, 399, 4, 5, False) == memory.Plan(3, True, 39)
    # CFG doubles a no-grad row
    assert memory.plan(act, 399, 4, 5, True).rollout_batch == 19
    with pytest.raises(SystemExit, match="needs 0.00 MiB even with gradient checkpointing"):
        memory.plan(act, 119, 4, 5, False)


def tiny_flux_plan_budget(script, unit_samples: int) -> tuple[float, memory.ActivationBytes]:
    """A --memory-budget-gib for `script` on tiny-flux (the presets' LoRA) that holds one unit of `unit_samples`
    checkpointed but not without checkpointing: 1.2 x the checkpointed unit, plus the optimizer's and EMAs' reserve."""
    policy = build_tiny_flux(lora_rank=8)
    act = memory.measure(policy, policy.encode_prompts(["a photo of red"]), contextlib.nullcontext)
    assert 1.2 * act.checkpointed < act.grad  # so the budget forces checkpointing
    args = parse_args(script.Args, script.PRESETS, ["--model", "tiny-flux"])
    budget = 1.2 * act.checkpointed * unit_samples + memory.reserve_bytes(
        args, sum(p.numel() for p in policy.trainable_parameters()))
    return budget / memory.GIB, act


def recorded_calls(monkeypatch) -> list[tuple[bool, int, bool]]:
    """(with gradient, batch, checkpointing on) of every transformer call the run's velocities make (the memory
    probe's own calls are not the run's)."""
    calls, in_velocity, velocity = [], [False], common.Policy.velocity

    def run_velocity(self, *a, **k):
        in_velocity[0] = True
        try:
            return velocity(self, *a, **k)
        finally:
            in_velocity[0] = False

    monkeypatch.setattr(common.Policy, "velocity", run_velocity)
    for cls in (FluxPolicy, SD3Policy):
        def spy(self, net, x, sigma, cond, _forward=cls._forward):
            if in_velocity[0]:
                calls.append((torch.is_grad_enabled(), x.shape[0], self._unwrapped().is_gradient_checkpointing))
            return _forward(self, net, x, sigma, cond)
        monkeypatch.setattr(cls, "_forward", spy)
    return calls


def test_dgpo_applies_the_plan_it_logs_and_computes_what_the_same_flags_by_hand_do(tmp_path, monkeypatch):
    gib, act = tiny_flux_plan_budget(dgpo, unit_samples=4)  # the tiny-flux preset's G
    calls = recorded_calls(monkeypatch)
    flags = ["--model", "tiny-flux", "--iterations", "2", "--eval-samples-per-prompt", "8"] + QUIET
    a = dgpo.main(flags + ["--fit-memory", "--memory-budget-gib", str(gib), "--output-dir", str(tmp_path / "a")])
    plan = a["memory_plan"]
    rollout = int(1.2 * act.checkpointed * 4 // act.no_grad)
    assert plan["gradient_checkpointing"] and plan["train_micro_units"] == 1 and plan["rollout_batch_size"] == rollout
    grad_calls = [c for c in calls if c[0]]
    assert grad_calls and all(b == 4 and ckpt for _, b, ckpt in grad_calls)  # one group of 4 at a time, checkpointed
    assert max(b for g, b, _ in calls if not g) == rollout < 2 * 4  # the 8 rollouts (and the evaluation) in chunks
    calls.clear()
    b = dgpo.main(flags + ["--gradient-checkpointing", "--train-micro-batch-groups", "1", "--rollout-batch-size",
                           str(rollout), "--eval-batch-size", str(rollout), "--output-dir", str(tmp_path / "b")])
    assert b["eval_reward_after"] == pytest.approx(a["eval_reward_after"], rel=1e-6)
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    for x, y in zip(*rows):
        for k in ("reward/mean", "loss/dsm", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-6), k


@pytest.mark.parametrize("script,field", [(flow_grpo, "train_micro_batch_size"), (pro_grpo, "train_micro_batch_size"),
                                          (neighbor_grpo, "train_micro_batch_size"), (g2rpo, None)])
def test_every_script_runs_on_its_plan(tmp_path, monkeypatch, script, field):
    """A budget with room for one checkpointed sample and a bit: each script trains on it, checkpointed, its gradient
    calls no larger than the plan (g2rpo has no micro-batch: its call on P anchors decides checkpointing)."""
    gib, _ = tiny_flux_plan_budget(script, unit_samples=2 if script is g2rpo else 1)  # g2rpo: the preset's P = 2
    calls = recorded_calls(monkeypatch)
    out = script.main(["--model", "tiny-flux", "--iterations", "1", "--fit-memory", "--memory-budget-gib", str(gib),
                       "--eval-samples-per-prompt", "4", "--output-dir", str(tmp_path)] + QUIET)
    plan = out["memory_plan"]
    assert plan["gradient_checkpointing"] and out["trainable_tensors_changed"] > 0
    assert all(ckpt for g, _, ckpt in calls if g)
    if field is not None:
        assert plan["train_micro_units"] == 1 and max(b for g, b, _ in calls if g) == 1


def test_bad_launches_stop_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(ArgumentError, match="drop --gradient-checkpointing"):
        parse_args(dgpo.Args, dgpo.PRESETS, ["--model", "tiny-flux", "--fit-memory", "--gradient-checkpointing"])
    with pytest.raises(ArgumentError, match="add --fit-memory"):
        parse_args(dgpo.Args, dgpo.PRESETS, ["--model", "tiny-flux", "--memory-budget-gib", "4"])
    with pytest.raises(SystemExit, match="on cpu give --memory-budget-gib"):
        dgpo.main(["--model", "tiny-flux", "--fit-memory", "--output-dir", str(tmp_path / "a")] + QUIET)
    with pytest.raises(ArgumentError, match="--fit-memory is not used by --model toy2d"):
        dgpo.main(["--fit-memory", "--memory-budget-gib", "1", "--output-dir", str(tmp_path / "b")] + QUIET)
    register_toy_as(monkeypatch, "toy-custom")  # a registered model without a transformer
    with pytest.raises(SystemExit, match="--model toy-custom has none"):
        dgpo.main(["--model", "toy-custom", "--preset", "toy2d", "--fit-memory", "--memory-budget-gib", "1",
                   "--output-dir", str(tmp_path / "b")] + QUIET)
    with pytest.raises(SystemExit, match="even with gradient checkpointing"):
        dgpo.main(["--model", "tiny-flux", "--fit-memory", "--memory-budget-gib", "0.000001", "--output-dir",
                   str(tmp_path / "c")] + QUIET)
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written


@pytest.mark.slow
def test_classifier_free_guidance_counts_twice_where_the_script_trains_with_it(tmp_path):
    """SD3 (CFG 4.5): Flow-GRPO's gradient calls run the conditional and unconditional branch (2 transformer samples
    per sample), DGPO's train CFG-free (1), and every rollout call is guided (2). With room for 2.2 transformer
    samples with gradient, Flow-GRPO fits one sample per micro-batch, not two; with room for 4.4, DGPO fits two groups
    of 2 samples, not one."""
    from tiny_pipelines import save_tiny_sd3_pipeline
    pipe = save_tiny_sd3_pipeline(tmp_path / "sd3")
    prompts = tmp_path / "train.txt"
    prompts.write_text("a photo of red\na photo of green\n")

    def flags(script, *extra):
        return ["--preset", "tiny-flux", "--model", "sd3", "--pretrained", str(pipe), "--max-sequence-length", "16",
                "--train-prompts", str(prompts), "--reward", "mean_color", "--guidance-scale", "4.5", "--group-size",
                "2", "--iterations", "1", "--eval-samples-per-prompt", "2", *QUIET, *extra]

    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, flags(flow_grpo))
    policy = tasks.load_task(args, keep_reference=False, log=lambda *_: None).policy
    with policy.without_cfg():
        act = memory.measure(policy, policy.encode_prompts(["a photo of red"]), contextlib.nullcontext)
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    for script, samples, micro in ((flow_grpo, 2.2, 1), (dgpo, 4.4, 2)):
        budget = int(samples * act.grad)
        reserve = memory.reserve_bytes(parse_args(script.Args, script.PRESETS, flags(script)), trainable)
        gib = (budget + reserve) / memory.GIB
        out = script.main(flags(script, "--fit-memory", "--memory-budget-gib", repr(gib),
                                "--output-dir", str(tmp_path / script.__name__)))
        plan = out["memory_plan"]
        assert not plan["gradient_checkpointing"] and plan["train_micro_units"] == micro, script.__name__
        assert plan["budget_bytes"] == pytest.approx(budget, abs=2)
        assert plan["rollout_batch_size"] == plan["budget_bytes"] // (2 * act.no_grad), script.__name__
