"""Memory flags change how the work is cut, not what is computed: a micro-batched update equals the whole-batch one."""

import json

import pytest

import dgpo
import flow_grpo
import neighbor_grpo
import pro_grpo

CASES = {"flow_grpo": (flow_grpo, ["--train-micro-batch-size", "16"]),
         "pro_grpo": (pro_grpo, ["--train-micro-batch-size", "16"]),
         "neighbor_grpo": (neighbor_grpo, ["--train-micro-batch-size", "8"]),
         "dgpo": (dgpo, ["--train-micro-batch-groups", "2"])}


@pytest.mark.parametrize("name", CASES)
def test_micro_batches_give_the_whole_batch_update(name, tmp_path):
    script, micro = CASES[name]
    flags = ["--iterations", "3", "--log-every", "0", "--checkpoint-every", "0", "--save-weights", "false"]
    script.main(flags + ["--output-dir", str(tmp_path / "whole")])
    script.main(flags + micro + ["--output-dir", str(tmp_path / "micro")])
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "micro")]
    assert rows[0][0]["reward/mean"] == rows[1][0]["reward/mean"]  # same rollout before any update
    for a, b in zip(*rows):  # afterwards the weights differ only by float summation order
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-5) and a["nfe/train"] == b["nfe/train"]
        for k in a:
            if k.startswith("loss/") or k == "grad_norm":
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["iteration"], k)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_gradient_checkpointing_gives_the_same_gradients(lora_rank):
    """Recomputing block activations in backward changes memory, not the gradient (LoRA and full fine-tuning)."""
    import torch

    from infra.diffusers_models import build_tiny_flux

    grads = []
    for checkpointing in (False, True):
        policy = build_tiny_flux(lora_rank=lora_rank, seed=0)
        if lora_rank == 0:
            policy.net.requires_grad_(True)
        if checkpointing:
            policy.enable_gradient_checkpointing()
            assert policy.net.is_gradient_checkpointing
        x = policy.initial_noise(3, torch.Generator().manual_seed(1))
        policy.velocity(x, 0.6, policy.encode_prompts(["a", "b", "c"])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
