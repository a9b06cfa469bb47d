"""The policy interface on toy2d and on the tiny FLUX (diffusers' FluxTransformer2DModel with random weights)."""

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

import common
import flow_grpo
from infra import tasks
from infra import diffusers_models, pretrained
from infra import rewards
from infra.args import parse_args


@pytest.fixture(scope="module")
def toy():
    return tasks.toy2d_policy(keep_reference=True)


def test_toy_base_model_is_cached_and_reproduces_the_ring(toy):
    path = pretrained.cached_model_path("toy2d-base", pretrained.TOY_BASE_CONFIG)
    assert path.exists(), "the pretrained toy base must be cached on disk"
    prompts = [f"mode {i}" for i in range(8) for _ in range(128)]
    g = torch.Generator().manual_seed(0)
    x0 = common.sample_ode(toy, toy.initial_noise(len(prompts), g), toy.sigmas(20), toy.encode_prompts(prompts),
                           solver="euler")
    # the base model ignores the prompt: on the ring, but only ~1/8 of samples at the asked-for mode
    assert common.toy_on_manifold(x0).mean() > 0.9
    assert 0.05 < common.toy_mode_reward(x0, prompts).mean() < 0.25


def test_toy_reward_and_metric_values():
    mu = common.toy_modes()
    assert common.toy_mode_reward(mu[[3]], ["mode 3"]).item() == pytest.approx(1.0)
    assert common.toy_mode_reward(mu[[3]] + torch.tensor([[2.0, 0.0]]), ["mode 3"]).item() == pytest.approx(
        torch.exp(torch.tensor(-2.0)).item())
    assert common.toy_on_manifold(torch.stack([mu[0], torch.zeros(2)])).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="mode 0"):
        common.toy_mode_reward(mu[[0]], ["a cat"])


def test_evaluation_draws_its_fixed_noise_from_eval_seed_whatever_the_global_rng():
    """Before and after training are compared on the same samples' noise: the evaluation draws it from --eval-seed,
    not from the global generator that training advances."""
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--eval-samples-per-prompt", "8"])
    task = tasks.load_task(args, keep_reference=False, log=lambda *_: None)
    torch.manual_seed(0)
    first = tasks.evaluate(task, args)
    torch.manual_seed(1)
    assert tasks.evaluate(task, args) == first
    args.eval_seed += 1
    assert tasks.evaluate(task, args) != first


def test_evaluation_is_the_plain_ode_at_eval_steps_from_eval_seed_noise_whatever_its_batch():
    """The protocol, computed independently: --eval-samples-per-prompt samples of each eval prompt, --eval-steps of
    --eval-solver (not the rollouts' --num-steps), from --eval-seed noise; --eval-batch-size only splits the work,
    each chunk with its own samples' noise."""
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--eval-samples-per-prompt", "3", "--eval-steps", "4",
                                                           "--num-steps", "9", "--eval-solver", "euler"])
    task = tasks.load_task(args, keep_reference=False, log=lambda *_: None)
    policy = task.policy
    prompts = [p for p in task.eval_prompts for _ in range(3)]
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(args.eval_seed))
    with torch.no_grad():
        x0 = common.sample_ode(policy, noise, policy.sigmas(4), policy.encode_prompts(prompts), solver="euler")
    want = task.reward_fn(policy.decode(x0), prompts)
    assert tasks.evaluate(task, args)["reward"] == pytest.approx(want.mean().item(), abs=1e-6)
    args.eval_batch_size = 5  # chunks of 5, the last one 4
    assert tasks.evaluate(task, args)["reward"] == pytest.approx(want.mean().item(), abs=1e-6)


def test_a_long_evaluation_reports_progress_to_a_log_and_a_short_one_stays_quiet():
    """Without a terminal (a job's log; pytest's captured output) the bar is off, and an evaluation that runs past
    `log_interval` prints a progress line after each chunk except the last; one quicker than that prints nothing."""
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--eval-samples-per-prompt", "3", "--eval-batch-size", "5"])
    task = tasks.load_task(args, keep_reference=False, log=lambda *_: None)
    lines = []
    tasks.evaluate(task, args, log=lines.append, log_interval=0)
    total = 3 * len(task.eval_prompts)  # 24 samples in chunks of 5: progress after 5, 10, 15, 20
    assert [line.split(": ")[1].split()[0] for line in lines] == [f"{d}/{total}" for d in range(5, total, 5)]
    assert all(line.startswith(f"  evaluation, {args.eval_steps} steps: ") and "ETA" in line for line in lines)
    quiet = []
    tasks.evaluate(task, args, log=quiet.append)  # the default interval: a minute
    assert quiet == []


def test_toy_reference_is_frozen_copy(toy):
    x, cond = torch.randn(5, 2), toy.encode_prompts(["mode 1"] * 5)
    with torch.no_grad():
        before = toy.velocity(x, 0.5, cond)
        with toy.reference():
            ref = toy.velocity(x, 0.5, cond)
    torch.testing.assert_close(before, ref)
    assert not any(p.requires_grad for p in toy.reference_net.parameters())


def test_nfe_counts_with_and_without_gradient(toy):
    toy.nfe = {"no_grad": 0, "grad": 0}
    x, cond = torch.randn(7, 2), toy.encode_prompts(["mode 1"] * 7)
    with torch.no_grad():
        toy.velocity(x, 0.5, cond)
    toy.velocity(x, 0.5, cond)
    with toy.nfe_paused():
        toy.velocity(x, 0.5, cond)
    assert toy.nfe == {"no_grad": 7, "grad": 7}


# ------------------------------------------------------------------------------------------------ tiny FLUX
@pytest.fixture
def flux():
    return diffusers_models.build_tiny_flux(resolution=32, lora_rank=4)


def test_flux_packing_matches_the_pipeline(flux):
    latents = torch.randn(2, 1, 32, 32)
    packed = FluxPipeline._pack_latents(latents, 2, 1, 32, 32)
    assert packed.shape[1:] == flux.sample_shape() == (256, 4)
    torch.testing.assert_close(flux.unpack(packed), latents)
    torch.testing.assert_close(flux.img_ids, FluxPipeline._prepare_latent_image_ids(2, 16, 16, "cpu", torch.float32))


def test_flux_velocity_decode_and_reward_shapes(flux):
    prompts = ["a photo of red", "a photo of blue"]
    cond = flux.encode_prompts(prompts)
    x = flux.initial_noise(2, torch.Generator().manual_seed(0))
    v = flux.velocity(x, torch.tensor([1.0, 0.5]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    images = flux.decode(x)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    r = rewards.mean_color_reward(images, prompts)
    assert r.shape == (2,) and ((0 <= r) & (r <= 1)).all()


def test_prompt_embeddings_are_deterministic_per_prompt(flux):
    a, b = flux.encode_prompts(["a photo of red", "a photo of blue"]), flux.encode_prompts(["a photo of red"])
    torch.testing.assert_close(a["prompt_embeds"][:1], b["prompt_embeds"])
    assert not torch.allclose(a["prompt_embeds"][0], a["prompt_embeds"][1])


def test_flux_lora_reference_disables_adapters(flux):
    cond = flux.encode_prompts(["a photo of red"] * 2)
    x = flux.initial_noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref0 = flux.velocity(x, 0.7, cond)
        for name, p in flux.net.named_parameters():  # move the adapters off their zero init
            if "lora_B" in name:
                p.add_(0.1)
        tuned = flux.velocity(x, 0.7, cond)
        with flux.reference():
            ref1 = flux.velocity(x, 0.7, cond)
        after = flux.velocity(x, 0.7, cond)
    torch.testing.assert_close(ref0, ref1)  # reference = base model
    assert not torch.allclose(tuned, ref0)
    torch.testing.assert_close(after, tuned)  # adapters back on after the context


def test_flux_trainable_parameters_are_only_lora(flux):
    names = [n for n, p in flux.net.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_full_finetune_without_reference_refuses_reference_context():
    policy = diffusers_models.build_tiny_flux(lora_rank=0, keep_reference=False)
    with pytest.raises(RuntimeError, match="keep_reference"):
        with policy.reference():
            pass


def test_flux_lora_save_is_loadable_by_diffusers(flux, tmp_path):
    with torch.no_grad():
        for name, p in flux.net.named_parameters():
            if "lora_B" in name:
                p.normal_()
    flux.save(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    state = FluxPipeline.lora_state_dict(tmp_path)
    assert state and all(k.startswith("transformer.") for k in state)
    # and our loader restores the same outputs in a fresh policy
    fresh = diffusers_models.build_tiny_flux(resolution=32, lora_rank=4)
    fresh.load(tmp_path)
    assert_same_velocity(fresh, flux)


def assert_same_velocity(a, b):
    x = b.initial_noise(2, torch.Generator().manual_seed(0))
    cond = b.encode_prompts(["a photo of red"] * 2)
    with torch.no_grad():
        torch.testing.assert_close(a.velocity(x, 0.5, cond), b.velocity(x, 0.5, cond))


@pytest.mark.parametrize("targets", [diffusers_models.FLUX_LORA_TARGETS, diffusers_models.SD3_LORA_TARGETS])
def test_lora_state_dict_from_keys_equals_peft(targets):
    """`diffusers_models.lora_state_dict` (what `save` writes; it reads keys, so FSDP's wrappers cannot hide layers) gives
    exactly peft's `get_peft_model_state_dict` on an unwrapped model."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(0)
    net, _ = diffusers_models.tiny_flux_modules()
    net.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
    ours, peft_own = diffusers_models.lora_state_dict(net.state_dict()), get_peft_model_state_dict(net)
    assert ours.keys() == peft_own.keys() and len(ours) > 0
    assert all(torch.equal(ours[k], peft_own[k]) for k in ours)


def test_flux_full_finetune_save_is_loadable_by_diffusers(tmp_path):
    """Full fine-tuning writes the gathered state dict itself (not through save_pretrained, which would read the
    FSDP-sharded module): the result must be what `from_pretrained` reads, with the trained values."""
    policy = diffusers_models.build_tiny_flux(lora_rank=0)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.save(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    for k, v in policy.net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    fresh = diffusers_models.build_tiny_flux(lora_rank=0, seed=1)
    fresh.load(tmp_path)
    assert_same_velocity(fresh, policy)


@pytest.mark.parametrize("alpha, scale", [(None, 2.0), (4, 1.0)])
def test_lora_alpha_defaults_to_twice_the_rank_as_the_reference_code(alpha, scale):
    """Each adapted layer adds (alpha / r) B A x; alpha defaults to 2 r (Flow-GRPO's r 32, alpha 64)."""
    from peft.tuners.lora import LoraLayer
    flux = diffusers_models.build_tiny_flux(resolution=32, lora_rank=4, lora_alpha=alpha)
    layers = [m for m in flux.net.modules() if isinstance(m, LoraLayer)]
    assert len(layers) > 10
    with torch.no_grad():
        for m in layers[:3]:
            m.lora_B["default"].weight.normal_()  # B starts at zero: the update would be zero whatever the scale
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            x = torch.randn(3, m.in_features)
            torch.testing.assert_close(m(x) - m.base_layer(x), scale * x @ a.T @ b.T)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_save_writes_the_state_it_is_given_not_its_own_module(lora_rank, tmp_path):
    """A multi-process run saves the state dict it gathered from every process (FSDP's shards, DeepSpeed's fp32
    masters), which is not this process's module: what is saved and loaded back is that state."""
    policy = diffusers_models.build_tiny_flux(resolution=32, lora_rank=lora_rank)
    trained = "lora_" if lora_rank else ""
    state = {k: v + 1 if trained in k else v for k, v in policy._unwrapped().state_dict().items()}
    policy.save(tmp_path, state=state)
    fresh = diffusers_models.build_tiny_flux(resolution=32, lora_rank=lora_rank)
    fresh.load(tmp_path)
    loaded = fresh._unwrapped().state_dict()
    compared = [k for k in state if trained in k]
    assert compared and all(torch.equal(loaded[k], state[k]) for k in compared)


def test_the_pretrained_toy_base_depends_on_its_config_alone(tmp_path, monkeypatch):
    """Cached under a hash of its config (a changed config never loads stale weights), the same whatever the global
    RNG held before, with no gradient left for the first RL step to add to; and a run that pretrains it and one that
    loads it from the cache draw the same random numbers afterwards (the same rollouts from the same seed)."""
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path))
    config = {**pretrained.TOY_BASE_CONFIG, "hidden": 16, "depth": 1, "steps": 5, "batch": 8}
    path = pretrained.cached_model_path("toy2d-base", config)
    assert path != pretrained.cached_model_path("toy2d-base", {**config, "steps": 6})
    quiet = dict(log=lambda *_: None)
    torch.manual_seed(1)
    fresh = pretrained.pretrain_toy_base(config, **quiet)
    after_pretraining = torch.rand(3)
    assert path.exists() and all(p.grad is None for p in fresh.parameters())
    torch.manual_seed(1)
    loaded = pretrained.pretrain_toy_base(config, **quiet)
    assert torch.equal(torch.rand(3), after_pretraining)
    path.unlink()
    torch.manual_seed(2)
    again = pretrained.pretrain_toy_base(config, **quiet)
    for a, b, c in zip(fresh.parameters(), loaded.parameters(), again.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_unknown_model_and_real_models_give_clear_errors():
    class A:
        model, reward, train_prompts, eval_prompts = "sdxl", None, None, None
    with pytest.raises(ValueError, match="available: toy2d, tiny-flux"):
        tasks.load_task(A, keep_reference=False)


def test_training_dtypes_of_a_bf16_loaded_transformer():
    """As --model flux loads it in bf16: full fine-tuning trains fp32 master weights and keeps its frozen reference
    in bf16 (half the memory); LoRA keeps the base in bf16 and trains fp32 adapters. Both run their reference."""
    for lora_rank in (0, 4):
        torch.manual_seed(0)
        transformer, vae = diffusers_models.tiny_flux_modules()
        policy = diffusers_models.FluxPolicy(transformer.to(torch.bfloat16), vae, diffusers_models.HashTextEncoder(8, 32, 32), 32,
                                   lora_rank=lora_rank, keep_reference=True)
        trainable = policy.trainable_parameters()
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        frozen = policy.reference_net.parameters() if lora_rank == 0 else \
            (p for p in policy.net.parameters() if not p.requires_grad)
        assert {p.dtype for p in frozen} == {torch.bfloat16}
        x, cond = policy.initial_noise(2), policy.encode_prompts(["a", "b"])
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, 0.5, cond)
        assert v_ref.dtype == torch.float32 and torch.isfinite(v_ref).all()
