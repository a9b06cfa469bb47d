"""The real FLUX.1-dev and SD3.5-Medium transformers, built from their configs on the meta device (no weights, no
memory): parameter counts against the published ones, and LoRA trainable counts against closed forms worked out
from the architectures by hand."""

from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig

from infra import diffusers_models


def _with_lora(model, rank, targets):
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian", target_modules=targets))
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def test_flux_dev_config_has_the_published_parameter_count_and_lora_r64_matches_the_closed_form():
    with init_empty_weights():
        model = FluxTransformer2DModel(**diffusers_models.FLUX_DEV_TRANSFORMER_CONFIG)
    assert all(p.device.type == "meta" for p in model.parameters())
    total, trainable = _with_lora(model, 64, diffusers_models.FLUX_LORA_TARGETS)
    assert total == 11_901_408_320  # FLUX.1-dev's transformer, as published
    # per double block (hidden d = 3072, MLP 4d): 8 d->d projections (q, k, v, out for each stream) and 2 MLPs of
    # d->4d->d per stream: r (8 (d + d) + 4 (d + 4d)); per single block only q, k, v match the targets: r 3 (d + d)
    d, r = 3072, 64
    assert trainable == r * (19 * (8 * 2 * d + 4 * 5 * d) + 38 * 3 * 2 * d) == 179_306_496
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 19 * 12 + 38 * 3


def test_sd35_medium_config_parameter_count_and_lora_r32_matches_the_closed_form():
    with init_empty_weights():
        model = SD3Transformer2DModel(**diffusers_models.SD35_MEDIUM_TRANSFORMER_CONFIG)
    total, trainable = _with_lora(model, 32, diffusers_models.SD3_LORA_TARGETS)
    assert total == 2_243_171_520
    # hidden d = 24 x 64 = 1536; 8 d->d attention projections per joint block, 7 in the last one (its context
    # stream ends there: no to_add_out); the dual-attention blocks' attn2 is not a target ("attn.to_q" only)
    d, r = 1536, 32
    assert trainable == r * (23 * 8 * 2 * d + 7 * 2 * d) == 18_776_064


def test_every_flux_lora_target_exists_in_the_tiny_config_too():
    """The tiny FLUX the tests train has every module the real one adapts (same class, same names)."""
    policy = diffusers_models.build_tiny_flux(lora_rank=4)
    names = {n for n, _ in policy.net.named_modules()}
    for t in diffusers_models.FLUX_LORA_TARGETS:
        assert any(n.endswith("." + t) for n in names), t
