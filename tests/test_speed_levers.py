"""Speed levers change how the transformer runs, not what it computes: regional torch.compile (`--compile`) and
LoRA merged into the base weights for rollouts (`--merge-lora-rollouts`). Each must give the eager, unmerged
model's numbers, leave the weights exactly as they were, and refuse what it cannot do."""

import json

import pytest
import torch

import dgpo
import neighbor_grpo
from infra import tasks
from infra.args import parse_args
from infra.diffusers_models import build_tiny_flux
from conftest import register_toy_as
from tiny_pipelines import give_lora_an_update

QUIET = ["--log-every", "0", "--checkpoint-every", "0", "--save-weights", "false"]


def lora_policy(seed=0):
    """tiny-flux with LoRA r4 whose B matrices are random (at peft's B = 0 any merge would pass)."""
    policy = build_tiny_flux(lora_rank=4, seed=seed)
    give_lora_an_update(policy, seed=seed + 1)
    return policy


def inputs(policy, n=3):
    x = policy.initial_noise(n, torch.Generator().manual_seed(2))
    return x, policy.encode_prompts(["a red cube", "a blue ball", "a green cone"][:n])


def check_close(a: dict, b: dict):
    """Two runs' metrics rows agree up to float rounding: the reward and DGPO's denoising loss closely; the other
    losses and the gradient norm are differences of near-equal terms (DGPO's sigmoid sees beta = 100 times one, PPO
    losses sit near 0), where rounding of 1e-7 in the velocity shows as up to a percent, so they get that much."""
    for k in a:
        if k in ("reward/mean", "loss/dsm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (a["iteration"], k)
        elif k.startswith("loss/") or k == "grad_norm":
            assert a[k] == pytest.approx(b[k], rel=2e-2, abs=1e-4), (a["iteration"], k)


# --------------------------------------------------------------------------------------------------------------
# --merge-lora-rollouts
# --------------------------------------------------------------------------------------------------------------


def test_lora_merged_gives_the_adapted_velocity_and_restores_the_base_exactly():
    policy = lora_policy()
    x, cond = inputs(policy)
    base_weights = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in policy.net.named_parameters() if n.endswith("base_layer.weight")}
    with torch.no_grad():
        adapted = policy.velocity(x, 0.7, cond)
        with policy.reference():
            base = policy.velocity(x, 0.7, cond)
        with policy.lora_merged():
            merged = policy.velocity(x, 0.7, cond)
            changed = [n for n, (p, _, w) in base_weights.items() if not torch.equal(p.data, w)]
        after = policy.velocity(x, 0.7, cond)
    assert len(changed) == len(base_weights) > 0  # every adapted layer held W + (alpha/r) B A inside
    assert (adapted - base).abs().max() > 1e-2  # the update is not negligible, so the comparison below can fail
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    for n, (p, data, w) in base_weights.items():  # the very same storage, bit for bit
        assert p.data_ptr() == data and torch.equal(p.data, w), n
    assert torch.equal(after, adapted)


def test_lora_merged_refuses_gradients_and_the_reference():
    policy = lora_policy()
    x, cond = inputs(policy)
    with policy.lora_merged():
        with pytest.raises(RuntimeError, match="no gradient would reach it"):
            policy.velocity(x, 0.5, cond)
        with pytest.raises(RuntimeError, match="merged LoRA update"):
            with policy.reference():
                pass
    with policy.reference(), pytest.raises(RuntimeError, match="inside reference"):
        with policy.lora_merged():
            pass
    policy.velocity(x, 0.5, cond).sum().backward()  # and training works again afterwards
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


@pytest.mark.parametrize("script", [dgpo, neighbor_grpo])
def test_merge_lora_rollouts_needs_lora(script, tmp_path, monkeypatch):
    """Refused with the flags for the built-in models (FLUX loads for minutes); a registered model whose policy has
    no adapters is refused once it is built."""
    for flags, match in ((["--model", "toy2d"], "got --model toy2d --lora-rank 0"),
                         (["--model", "tiny-flux", "--lora-rank", "0"], "got --model tiny-flux --lora-rank 0")):
        with pytest.raises(SystemExit, match=match):
            parse_args(script.Args, script.PRESETS, [*flags, "--merge-lora-rollouts"])
    register_toy_as(monkeypatch, "toy-custom", lora_rank=0)
    args = parse_args(script.Args, script.PRESETS, ["--model", "toy-custom", "--preset", "toy2d", "--lora-rank", "8",
                                                    "--merge-lora-rollouts"])
    with pytest.raises(SystemExit, match="the policy of --model toy-custom has none"):
        tasks.load_task(args, keep_reference=False, log=lambda *_: None)


@pytest.mark.parametrize("script", [dgpo, neighbor_grpo])
def test_merged_rollouts_train_as_the_unmerged_ones(script, tmp_path):
    """Same seed with and without the merge: in fp32 the rollouts differ by float rounding only, so every
    iteration's reward and loss agree closely, and the LoRA weights still train."""
    flags = ["--model", "tiny-flux", "--iterations", "3", *QUIET]
    runs = {}
    for merge in (False, True):
        out = tmp_path / str(merge)
        s = script.main([*flags, "--output-dir", str(out), *(["--merge-lora-rollouts"] if merge else [])])
        runs[merge] = (s, [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()])
    (s0, rows0), (s1, rows1) = runs[False], runs[True]
    assert s1["trainable_tensors_changed"] == s1["trainable_tensors"] > 0
    for a, b in zip(rows0, rows1):  # the losses and gradient norm too: 8-bit images can hide small reward changes
        check_close(a, b)
        assert a["nfe/rollout"] == b["nfe/rollout"]
    assert s1["eval_reward_after"] == pytest.approx(s0["eval_reward_after"], rel=1e-4)


# --------------------------------------------------------------------------------------------------------------
# --compile
# --------------------------------------------------------------------------------------------------------------


def test_compiled_blocks_give_the_eager_numbers():
    """Regional compile with the aot_eager backend (dynamo's capture and AOT autograd, no code generation: the
    plumbing, in seconds; inductor itself runs in the slow test below). Checked against the eager model: forward
    with and without gradient, the LoRA gradients, the reference (adapters off), another batch size, and a weight
    change after compiling (parameters are graph inputs, so no stale copy)."""
    policy = lora_policy()
    x, cond = inputs(policy)

    def everything():
        out = {}
        with torch.no_grad():
            out["no_grad"] = policy.velocity(x, 0.7, cond)
            with policy.reference():
                out["reference"] = policy.velocity(x, 0.7, cond)
            out["batch_2"] = policy.velocity(x[:2], 0.3, {k: v[:2] for k, v in cond.items()})
        for p in policy.trainable_parameters():
            p.grad = None
        policy.velocity(x, 0.4, cond).square().mean().backward()
        out["grad"] = torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])
        return out

    eager = everything()
    policy.compile_blocks(backend="aot_eager")
    blocks = [*policy.net.transformer_blocks, *policy.net.single_transformer_blocks]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    compiled = everything()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    with torch.no_grad():  # change the weights after compiling: the compiled blocks must see it
        for p in policy.trainable_parameters():
            p.mul_(1.5)
        new = policy.velocity(x, 0.7, cond)
        with torch.compiler.set_stance("force_eager"):
            want = policy.velocity(x, 0.7, cond)
    assert (want - eager["no_grad"]).abs().max() > 1e-3
    torch.testing.assert_close(new, want, rtol=1e-5, atol=1e-6)


def test_compile_and_checkpointing_need_a_diffusers_model(monkeypatch):
    """Refused with the flags for the toy; a registered model without a diffusers transformer once it is built."""
    for flag in ("--compile", "--gradient-checkpointing"):
        with pytest.raises(SystemExit, match=f"{flag} is not used by --model toy2d"):
            parse_args(dgpo.Args, dgpo.PRESETS, [flag])
    register_toy_as(monkeypatch, "toy-custom")
    for flag, match in (("--compile", "--compile compiles a diffusers transformer's blocks; --model toy-custom has "
                                      "none"),
                        ("--gradient-checkpointing", "--gradient-checkpointing needs a diffusers transformer; "
                                                     "--model toy-custom has none")):
        args = parse_args(dgpo.Args, dgpo.PRESETS, ["--model", "toy-custom", "--preset", "toy2d", flag])
        with pytest.raises(SystemExit, match=match):
            tasks.load_task(args, keep_reference=False, log=lambda *_: None)


@pytest.mark.slow
def test_compiled_run_trains_as_the_eager_one(tmp_path):
    """dgpo.py on tiny-flux with --compile (inductor, generated C++ on the CPU) against the eager run: the same
    rewards up to float rounding, the LoRA weights trained, and the blocks ran as compiled graphs, whole (no graph
    break: a break would split each block and run the pieces between graphs eagerly)."""
    from torch._dynamo.utils import counters
    flags = ["--model", "tiny-flux", "--iterations", "2", *QUIET]
    s0 = dgpo.main([*flags, "--output-dir", str(tmp_path / "eager")])
    counters.clear()
    s1 = dgpo.main([*flags, "--output-dir", str(tmp_path / "compiled"), "--compile"])
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"], dict(counters)
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("eager", "compiled")]
    assert s1["trainable_tensors_changed"] == s1["trainable_tensors"] > 0
    for a, b in zip(*rows):  # the losses and gradient norm too: 8-bit images can hide small reward changes
        check_close(a, b)
    assert s1["eval_reward_after"] == pytest.approx(s0["eval_reward_after"], rel=1e-4)
