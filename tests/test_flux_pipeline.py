"""--model flux: the real FLUX.1-dev loading path (diffusers FluxPipeline.from_pretrained, the pipeline's own text
encoders, prompt-embedding cache, encoders released), on a tiny random-weight pipeline saved to disk the way
`hf download black-forest-labs/FLUX.1-dev` lays one out. Every script, LoRA and full fine-tuning."""

import json

import pytest
import torch

from infra import tasks
from infra.args import parse_args
from infra import pipelines
import dgpo
import flow_grpo
import g2rpo
import neighbor_grpo
import pro_grpo
from tiny_pipelines import (assert_pipeline_loads_the_trained_lora, assert_pipeline_samples_the_same_images,
                            save_tiny_flux_pipeline)

SCRIPTS = {"flow_grpo": flow_grpo, "dgpo": dgpo, "neighbor_grpo": neighbor_grpo, "g2rpo": g2rpo,
           "pro_grpo": pro_grpo}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "FLUX.1-dev-tiny")


@pytest.fixture
def prompt_files(tmp_path):
    train, evals = tmp_path / "train.txt", tmp_path / "eval.jsonl"
    train.write_text("a photo of red\na photo of green\na photo of cyan\n")
    evals.write_text(json.dumps({"prompt": "a photo of blue"}) + "\n")
    return str(train), str(evals)


def _flags(pipeline_dir, prompt_files, out, *extra):
    train, evals = prompt_files
    return ["--preset", "tiny-flux", "--model", "flux", "--pretrained", str(pipeline_dir), "--max-sequence-length",
            "16", "--train-prompts", train, "--eval-prompts", evals, "--reward", "mean_color", "--iterations", "1",
            "--output-dir", str(out), "--log-every", "0", "--checkpoint-every", "0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", ["8", "0"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_one_iteration_of_every_script_on_the_pipeline(name, lora_rank, pipeline_dir, prompt_files, tmp_path,
                                                       monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = SCRIPTS[name].main(_flags(pipeline_dir, prompt_files, tmp_path / "run", "--lora-rank", lora_rank))
    assert summary["model"] == "flux" and summary["nfe_train"] > 0
    from PIL import Image  # the grids of the evaluation prompts (here one, named above its row) x 4 seeds, 32 px
    from infra.tasks import LABEL_HEIGHT  # shown at 128
    for label in ("before", "after"):
        assert Image.open(tmp_path / "run" / f"samples_{label}.png").size == (2 + 4 * 130, 2 + LABEL_HEIGHT + 130)
    assert f"Pictures: {tmp_path / 'run' / 'samples_before.png'}" in capsys.readouterr().out  # the closing line
    saved = tmp_path / "run" / "final"
    if lora_rank != "0":  # what FluxPipeline.load_lora_weights reads
        assert (saved / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert (saved / "transformer" / "config.json").is_file()


def record_pipeline_loads(monkeypatch) -> list:
    """FluxPipeline.from_pretrained, wrapped: (its keyword arguments, the pipeline it returned) for every call."""
    from diffusers import FluxPipeline
    loads = []
    original = FluxPipeline.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        loads.append((kwargs, original(cls, *args, **kwargs)))
        return loads[-1][1]

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(load))
    return loads


def test_prompt_embeddings_are_the_pipelines_own_and_are_cached(pipeline_dir, prompt_files, tmp_path, monkeypatch):
    from diffusers import FluxPipeline
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, _flags(pipeline_dir, prompt_files, tmp_path))
    logs = []
    task = tasks.load_task(args, keep_reference=False, log=logs.append)
    assert isinstance(task.policy.text_encoder, pipelines.CachedTextEncoder)
    assert task.train_prompts == ["a photo of red", "a photo of green", "a photo of cyan"]
    assert task.eval_prompts == ["a photo of blue"]
    pipe = FluxPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    prompts = ["a photo of cyan", "a photo of blue"]
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
    got = task.policy.encode_prompts(prompts)
    torch.testing.assert_close(got["prompt_embeds"], embeds)
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled)
    with pytest.raises(KeyError, match="not embedded at start-up"):
        task.policy.encode_prompts(["a dog"])
    assert any("embedded, cached" in line for line in logs)
    logs.clear()
    loads = record_pipeline_loads(monkeypatch)
    second = tasks.load_task(args, keep_reference=False, log=logs.append)  # second time: from the cache
    assert any("prompts from" in line for line in logs)
    flags = loads[0][0]
    assert flags["text_encoder"] is None and flags["text_encoder_2"] is None  # T5 and CLIP not even loaded
    torch.testing.assert_close(second.policy.encode_prompts(prompts)["prompt_embeds"], embeds)


@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_under_bf16_the_base_loads_in_bf16_and_the_text_encoders_are_let_go(lora_rank, pipeline_dir, prompt_files,
                                                                             tmp_path, monkeypatch):
    """--mixed-precision bf16 loads the pipeline in bf16 (FLUX.1-dev: 24 GB, not 48): LoRA keeps the frozen base in
    bf16 and trains fp32 adapters, full fine-tuning trains fp32 master weights. Once the prompts are embedded the
    pipeline drops its text encoders (T5-XXL alone is 9.5 GB). The bf16 VAE decodes the sampler's fp32 states."""
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    loads = record_pipeline_loads(monkeypatch)
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, _flags(pipeline_dir, prompt_files, tmp_path, "--lora-rank",
                                                                lora_rank, "--mixed-precision", "bf16"))
    policy = tasks.load_task(args, keep_reference=False, log=lambda *_: None).policy
    assert len(loads) == 1 and loads[0][1].text_encoder is None and loads[0][1].text_encoder_2 is None
    trainable = {p.dtype for p in policy.net.parameters() if p.requires_grad}
    frozen = {p.dtype for p in policy.net.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == ({torch.bfloat16} if lora_rank != "0" else set())
    assert policy.vae.dtype == torch.bfloat16
    images = policy.decode(torch.randn(2, *policy.sample_shape()))  # the sampler's fp32 states through a bf16 VAE
    assert images.dtype == torch.float32 and images.shape == (2, 3, args.resolution, args.resolution)
    assert images.isfinite().all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("num_steps", [2, 6])
def test_ode_sampling_and_decoding_equal_the_flux_pipelines_own(pipeline_dir, prompt_files, tmp_path, num_steps):
    """FluxPipeline(latents=x, guidance 3.5, N steps) from the same packed noise gives the same images as our Euler
    ODE and decode: the dynamic shift at this resolution, timestep and guidance scaling, latent packing, prompt
    embeddings (the cached ones) and the VAE's scaling and shift factors, all at once."""
    from diffusers import FluxPipeline
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS,
                             _flags(pipeline_dir, prompt_files, tmp_path, "--lora-rank", "0"))
    policy = tasks.load_task(args, keep_reference=False, log=lambda *_: None).policy
    pipe = FluxPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    assert_pipeline_samples_the_same_images(policy, pipe, num_steps, guidance_scale=3.5)


def test_the_schedule_read_before_loading_is_the_loaded_policys(pipeline_dir, prompt_files, tmp_path):
    """`pipeline_sigmas` reads FLUX's schedule from the pipeline directory's configs (no weight loaded): it equals the
    loaded policy's, at two resolutions (the dynamic shift follows the image's sequence length) and a static shift."""
    for extra in ([], ["--resolution", "64"], ["--shift", "3"]):
        args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, _flags(pipeline_dir, prompt_files, tmp_path, *extra))
        policy = tasks.load_task(args, keep_reference=False, log=lambda *_: None).policy
        for n in (2, 6, 10):
            torch.testing.assert_close(pipelines.pipeline_sigmas(args, n), policy.sigmas(n, args.shift),
                                       rtol=0, atol=0)


def test_dgpo_checks_its_timestep_clip_on_flux_schedule_before_loading(pipeline_dir, prompt_files, tmp_path,
                                                                        monkeypatch):
    """FLUX's 6-step schedule is 1, 0.892, 0.767, ... at 32 px and 1, 0.904, 0.790, ... at 64 px: --t-min 0.78 leaves
    two nodes for three timesteps at 32 px (refused as the flags are parsed, nothing loaded) and three at 64 px."""
    monkeypatch.setattr(pipelines, "build_pipeline_policy", lambda *a, **k: pytest.fail("loaded the pipeline"))
    parse = lambda *extra: parse_args(dgpo.Args, dgpo.PRESETS, _flags(pipeline_dir, prompt_files, tmp_path,
                                                                     "--t-min", "0.78", "--num-train-timesteps", "3",
                                                                     *extra))
    with pytest.raises(SystemExit, match=r"--t-min 0.78 leaves 2 nodes of the rollout schedule \[1.0, 0.892"):
        parse()
    assert parse("--resolution", "64").resolution == 64


def test_missing_or_wrong_weights_fail_with_the_fetch_command(pipeline_dir, prompt_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = _flags(pipeline_dir, prompt_files, tmp_path)
    i = flags.index("--pretrained")
    # checked with the arguments, before anything is written
    cases = {"needs --pretrained": flags[:i] + flags[i + 2:],
             "no such directory": flags[:i + 1] + [str(tmp_path / "nowhere")] + flags[i + 2:],
             "not a diffusers pipeline directory": flags[:i + 1] + [str(tmp_path)] + flags[i + 2:]}
    for message, argv in cases.items():
        with pytest.raises(SystemExit, match=message) as e:
            parse_args(flow_grpo.Args, flow_grpo.PRESETS, argv)
        assert "hf download black-forest-labs/FLUX.1-dev" in str(e.value)
    # a hub id not in the local cache: found out when loading
    hub_id = flags[:i + 1] + ["black-forest-labs/FLUX.1-dev"] + flags[i + 2:]
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, hub_id)
    with pytest.raises(SystemExit, match="could not load FluxPipeline") as e:
        tasks.load_task(args, keep_reference=False, log=lambda *_: None)
    assert "hf download" in str(e.value)


def test_a_pretrained_path_under_home_is_expanded_as_a_config_file_gives_it(pipeline_dir, prompt_files, tmp_path,
                                                                              monkeypatch):
    """`pretrained: ~/weights/FLUX.1-dev` in a config file reaches the loader without a shell to expand it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "FLUX.1-dev").symlink_to(pipeline_dir)
    flags = _flags(pipeline_dir, prompt_files, tmp_path / "run")
    flags[flags.index("--pretrained") + 1] = "~/weights/FLUX.1-dev"
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, flags)
    policy = tasks.load_task(args, keep_reference=False, log=lambda *_: None).policy
    assert policy.sample_shape() == (256, 4)


def test_a_resume_refuses_a_pretrained_directory_whose_transformer_differs(pipeline_dir, prompt_files, tmp_path):
    """--pretrained may move between a run and its resume, but another transformer (FLUX.1-schnell's config for
    FLUX.1-dev's) would carry the trained LoRA onto weights it was not trained on: refused with the flags."""
    import shutil
    from infra.args import ArgumentError
    moved = tmp_path / "moved"
    shutil.copytree(pipeline_dir, moved)
    flow_grpo.main(_flags(moved, prompt_files, tmp_path / "run", "--iterations", "2", "--checkpoint-every", "1"))
    resume = _flags(moved, prompt_files, tmp_path / "run", "--iterations", "3", "--resume-from-checkpoint", "latest")
    shutil.move(moved, tmp_path / "elsewhere")  # the same pipeline at another path: accepted
    resume[resume.index("--pretrained") + 1] = str(tmp_path / "elsewhere")
    assert parse_args(flow_grpo.Args, flow_grpo.PRESETS, resume).pretrained == str(tmp_path / "elsewhere")
    config = tmp_path / "elsewhere" / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))
    with pytest.raises(ArgumentError, match=r"checkpoint-2: --pretrained .*elsewhere holds another transformer than "
                                            r"the run trained"):
        parse_args(flow_grpo.Args, flow_grpo.PRESETS, resume)


@pytest.mark.parametrize("alpha", [None, "8"])  # the default 2 x rank, and alpha = rank
def test_saved_lora_loaded_by_the_pipelines_load_lora_weights_is_the_trained_model(pipeline_dir, prompt_files,
                                                                                   tmp_path, alpha):
    from diffusers import FluxPipeline
    extra = ["--lora-alpha", alpha] if alpha else []
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, _flags(pipeline_dir, prompt_files, tmp_path, *extra))
    policy = tasks.load_task(args, keep_reference=False, log=lambda *_: None).policy
    assert_pipeline_loads_the_trained_lora(policy, FluxPipeline, pipeline_dir, tmp_path / "final")
