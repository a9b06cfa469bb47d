"""--model sd3: SD3.5 through the same loading path as FLUX, on a tiny random StableDiffusion3Pipeline saved to disk.
Classifier-free guidance agrees with the pipeline's own denoising, counts 2 NFE per sample, and DGPO trains
CFG-free; every script runs an iteration with LoRA and with full fine-tuning."""

import json

import pytest
import torch

from infra import tasks
from infra.args import parse_args
import dgpo
import flow_grpo
import g2rpo
import neighbor_grpo
import pro_grpo
from tiny_pipelines import (assert_pipeline_loads_the_trained_lora, assert_pipeline_samples_the_same_images,
                            give_lora_an_update, save_tiny_sd3_pipeline)

SCRIPTS = {"flow_grpo": flow_grpo, "dgpo": dgpo, "neighbor_grpo": neighbor_grpo, "g2rpo": g2rpo,
           "pro_grpo": pro_grpo}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3.5-tiny")


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("a photo of red\na photo of green\na photo of cyan\n")
    return str(f)


def _flags(pipeline_dir, prompt_file, out, *extra):
    return ["--preset", "tiny-flux", "--model", "sd3", "--pretrained", str(pipeline_dir), "--max-sequence-length",
            "16", "--train-prompts", prompt_file, "--reward", "mean_color", "--guidance-scale", "4.5",
            "--iterations", "1", "--output-dir", str(out), "--log-every", "0", "--checkpoint-every", "0", *extra]


def _policy(pipeline_dir, prompt_file, tmp_path, *extra):
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, _flags(pipeline_dir, prompt_file, tmp_path, *extra))
    return tasks.load_task(args, keep_reference=False, log=lambda *_: None).policy


def test_cfg_velocity_matches_the_pipelines_denoising_step(pipeline_dir, prompt_file, tmp_path):
    """One Euler step of StableDiffusion3Pipeline (CFG 4.5) equals x + (s' - s) v with our guided velocity."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    policy = _policy(pipeline_dir, prompt_file, tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, local_files_only=True)
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    steps = []
    pipe(prompt=["a photo of red", "a photo of cyan"], negative_prompt="", latents=x.clone(), height=32, width=32,
         num_inference_steps=2, guidance_scale=4.5, max_sequence_length=16, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: steps.append(kw["latents"].clone()) or {})
    sigmas = pipe.scheduler.sigmas
    cond = policy.encode_prompts(["a photo of red", "a photo of cyan"])
    with torch.no_grad():
        v = policy.velocity(x, sigmas[0], cond)
    torch.testing.assert_close(x + (sigmas[1] - sigmas[0]) * v, steps[0], rtol=1e-4, atol=1e-5)
    # the schedule is the pipeline's own (Flow-GRPO's SD3 code calls set_timesteps(N) the same way)
    for n in (2, 10):
        pipe.scheduler.set_timesteps(n)
        torch.testing.assert_close(policy.sigmas(n), pipe.scheduler.sigmas.double())
    assert policy.sigmas(10)[-2] < 0.05  # not FLUX's shift(linspace(1, 0, 11)), whose last nonzero sigma is 0.25
    for shift in (1.0, 5.0):  # --shift replaces the scheduler's own shift, and nothing else of its config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
        scheduler.set_timesteps(6)
        torch.testing.assert_close(policy.sigmas(6, shift), scheduler.sigmas.double())


def test_the_schedule_read_before_loading_is_the_loaded_policys(pipeline_dir, prompt_file, tmp_path):
    """`pipeline_sigmas` reads SD3's schedule from the pipeline's scheduler config (shift 2.5 here), no weight loaded:
    it equals the loaded policy's, with and without --shift; DGPO refuses a timestep clip against it as it parses."""
    from infra.pipelines import pipeline_sigmas
    for extra in ([], ["--shift", "5"]):
        args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, _flags(pipeline_dir, prompt_file, tmp_path, *extra))
        policy = _policy(pipeline_dir, prompt_file, tmp_path, *extra)
        for n in (2, 6, 10):
            torch.testing.assert_close(pipeline_sigmas(args, n), policy.sigmas(n, args.shift), rtol=0, atol=0)
    args = parse_args(dgpo.Args, dgpo.PRESETS, _flags(pipeline_dir, prompt_file, tmp_path, "--t-min", "0.9",
                                                      "--num-train-timesteps", "2"))
    assert int((pipeline_sigmas(args, 6) >= 0.9).sum()) == 2  # 1.0 and 0.909 (6 steps at shift 2.5)
    with pytest.raises(SystemExit, match="--t-min 0.9 leaves 2 nodes of the rollout schedule"):
        parse_args(dgpo.Args, dgpo.PRESETS, _flags(pipeline_dir, prompt_file, tmp_path, "--t-min", "0.9",
                                                   "--num-train-timesteps", "3"))


def test_attention_shape_counts_image_patches_and_every_text_token(pipeline_dir, prompt_file, tmp_path):
    """What the attention kernel check runs on (infra/attention.py): 32 x 32 latents in 2 x 2 patches, and the CLIP
    (77) plus T5 (--max-sequence-length 16) tokens."""
    from infra.attention import AttentionShape
    policy = _policy(pipeline_dir, prompt_file, tmp_path)
    assert policy.attention_shape() == AttentionShape(heads=4, head_dim=8, seq_len=16 * 16 + 77 + 16)


def test_ode_sampling_and_decoding_equal_the_pipelines_own(pipeline_dir, prompt_file, tmp_path):
    """StableDiffusion3Pipeline(latents=x, CFG 4.5, 6 steps) gives the same images as our Euler ODE and decode."""
    from diffusers import StableDiffusion3Pipeline
    policy = _policy(pipeline_dir, prompt_file, tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, local_files_only=True)
    assert_pipeline_samples_the_same_images(policy, pipe, 6, guidance_scale=4.5, negative_prompt="")


def test_cfg_counts_two_nfe_and_without_cfg_is_the_conditional_velocity(pipeline_dir, prompt_file, tmp_path):
    policy = _policy(pipeline_dir, prompt_file, tmp_path)
    x, cond = policy.initial_noise(3), policy.encode_prompts(["a photo of red"] * 3)
    with torch.no_grad():
        guided = policy.velocity(x, 0.7, cond)
        assert policy.nfe["no_grad"] == 6
        with policy.without_cfg():
            conditional = policy.velocity(x, 0.7, cond)
        assert policy.nfe["no_grad"] == 9
        policy.cfg_scale = 1.0
        torch.testing.assert_close(policy.velocity(x, 0.7, cond), conditional)
    assert not torch.allclose(guided, conditional)


def test_cfg_training_gradient_flows_through_the_conditional_branch_only(pipeline_dir, prompt_file, tmp_path):
    """Flow-GRPO's compute_log_prob (train_sd3.py), transcribed: one transformer call on [x; x] with [uncond; cond]
    embeddings, `noise_pred_uncond.detach()`, then u + w (c - u). Our guided velocity's LoRA gradient equals it
    (w dv_c), and differs from the gradient without the detach (w dv_c - (w - 1) dv_u)."""
    policy = _policy(pipeline_dir, prompt_file, tmp_path, "--lora-rank", "8")
    give_lora_an_update(policy)  # so both branches carry LoRA gradient
    x, cond = policy.initial_noise(2, torch.Generator().manual_seed(0)), policy.encode_prompts(["a photo of red"] * 2)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    lora = [p for p in policy.net.parameters() if p.requires_grad]

    def grads(velocity):
        for p in lora:
            p.grad = None
        (velocity() * weights).sum().backward()
        return torch.cat([p.grad.flatten() for p in lora])

    def official(detach: bool):
        w, net = 4.5, policy.net
        embeds = torch.cat([policy.uncond["prompt_embeds"].expand(2, -1, -1), cond["prompt_embeds"]])
        pooled = torch.cat([policy.uncond["pooled_prompt_embeds"].expand(2, -1), cond["pooled_prompt_embeds"]])
        noise_pred = net(hidden_states=torch.cat([x, x]), timestep=torch.full((4,), 0.6 * 1000),
                         encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        uncond, text = noise_pred.chunk(2)
        uncond = uncond.detach() if detach else uncond
        return uncond + w * (text - uncond)

    ours = grads(lambda: policy.velocity(x, 0.6, cond))
    torch.testing.assert_close(ours, grads(lambda: official(detach=True)), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours, grads(lambda: official(detach=False)), rtol=1e-2, atol=1e-6)


def test_dgpo_trains_cfg_free_and_rolls_out_with_cfg(pipeline_dir, prompt_file, tmp_path):
    """DGPO: P x G rollout samples x num_steps with CFG (2 NFE each); the trained forwards are CFG-free (1 NFE)."""
    summary = dgpo.main(_flags(pipeline_dir, prompt_file, tmp_path / "run", "--save-weights", "false"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    samples = config["prompts_per_iteration"] * config["group_size"]
    assert rows[0]["nfe/train"] == samples * config["num_train_timesteps"]
    # no-grad: the CFG rollout, plus the CFG-free reference forward at each training timestep
    assert rows[0]["nfe/rollout"] == 2 * samples * config["num_steps"] + samples * config["num_train_timesteps"]
    assert summary["model"] == "sd3"


def test_compiled_joint_blocks_and_merged_lora_give_the_guided_velocity(pipeline_dir, prompt_file, tmp_path):
    """The speed levers on SD3: its joint blocks compiled (aot_eager: dynamo and AOT autograd without code generation)
    and its attention-only LoRA merged give the eager, unmerged CFG velocity (tests/test_speed_levers.py does FLUX)."""
    policy = _policy(pipeline_dir, prompt_file, tmp_path)
    assert policy._has_adapters()
    give_lora_an_update(policy, seed=0)  # at peft's B = 0 any merge is a no-op
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(["a photo of red", "a photo of cyan"])
    with torch.no_grad():
        eager = policy.velocity(x, 0.6, cond)
        with policy.reference():
            assert (policy.velocity(x, 0.6, cond) - eager).abs().max() > 1e-3  # the merge below has work to do
        with policy.lora_merged():
            merged = policy.velocity(x, 0.6, cond)
        policy.compile_blocks(backend="aot_eager")
        compiled = policy.velocity(x, 0.6, cond)
    assert all(b._compiled_call_impl is not None for b in policy.net.transformer_blocks)
    torch.testing.assert_close(merged, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", ["8", "0"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_one_iteration_of_every_script_on_the_pipeline(name, lora_rank, pipeline_dir, prompt_file, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = SCRIPTS[name].main(_flags(pipeline_dir, prompt_file, tmp_path / "run", "--lora-rank", lora_rank))
    assert summary["model"] == "sd3" and summary["nfe_train"] > 0
    from PIL import Image  # the grids of the evaluation prompts (the 3 training prompts, each named) x 4 seeds
    from infra.tasks import LABEL_HEIGHT
    for label in ("before", "after"):
        assert Image.open(tmp_path / "run" / f"samples_{label}.png").size == (2 + 4 * 130,
                                                                               2 + 3 * (LABEL_HEIGHT + 130))
    if lora_rank != "0":  # what StableDiffusion3Pipeline.load_lora_weights reads
        assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("alpha", [None, "8"])  # the default 2 x rank, and alpha = rank
def test_saved_lora_loaded_by_the_pipelines_load_lora_weights_is_the_trained_model(pipeline_dir, prompt_file,
                                                                                   tmp_path, alpha):
    from diffusers import StableDiffusion3Pipeline
    policy = _policy(pipeline_dir, prompt_file, tmp_path, *(["--lora-alpha", alpha] if alpha else []))
    assert_pipeline_loads_the_trained_lora(policy, StableDiffusion3Pipeline, pipeline_dir, tmp_path / "final")
