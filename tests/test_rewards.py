"""Learned reward scorers, built with random weights from tiny configs (no weights can be downloaded here):
preprocessing identities, agreement with transformers' own CLIP forward, batch independence, determinism,
weighted sums, loading from a local directory offline, and the errors for missing weights or packages."""

import pytest
import torch

from infra import rewards
from tiny_pipelines import save_tiny_clip_rewards, tiny_clip


def test_clip_preprocess_identities():
    mean, std = torch.tensor(rewards.OPENAI_CLIP_MEAN), torch.tensor(rewards.OPENAI_CLIP_STD)
    flat = torch.full((2, 3, 64, 96), 0.5)  # a constant image stays constant through resize and crop
    out = rewards.clip_preprocess(flat)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, ((torch.tensor(128 / 255) - mean) / std).view(1, 3, 1, 1).expand_as(out))
    x = torch.rand(2, 3, 224, 224)  # already 224: only quantisation and normalisation
    q = (x * 255).round() / 255
    torch.testing.assert_close(rewards.clip_preprocess(x), (q - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    torch.testing.assert_close(rewards.clip_preprocess((x * 255).round().to(torch.uint8)), rewards.clip_preprocess(x))
    # out-of-range decoder output scores as the clamped image would
    wild = x * 1.6 - 0.3
    torch.testing.assert_close(rewards.clip_preprocess(wild), rewards.clip_preprocess(wild.clamp(0, 1)))


def test_clip_preprocess_resizes_as_clips_own_image_processor():
    """transformers' CLIPImageProcessor (PIL bicubic resize of the short side, centre crop, OpenAI normalisation) on
    the saved image, against clip_preprocess on the tensor: a downscale by 2.3 of detailed images, where a resize
    without antialiasing is far off."""
    from PIL import Image
    from transformers import CLIPImageProcessor
    x = torch.rand(2, 3, 512, 640, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # some spatial correlation, as in an image
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=list(rewards.OPENAI_CLIP_MEAN), image_std=list(rewards.OPENAI_CLIP_STD),
                                   resample=3, do_convert_rgb=True)
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in x]
    reference = torch.as_tensor(processor(images=pil, return_tensors="np")["pixel_values"])
    ours = rewards.clip_preprocess(x)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().mean() < 0.01  # measured 0.004: PIL's and torch's bicubic kernels differ a little
    aliased = torch.nn.functional.interpolate((x * 255).round() / 255, size=(224, 280), mode="bicubic")[..., 28:252]
    mean, std = torch.tensor(rewards.OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(rewards.OPENAI_CLIP_STD).view(
        1, 3, 1, 1)
    assert ((aliased - mean) / std - reference).abs().mean() > 0.05  # measured 0.11: the check can tell


def test_mean_color_is_one_at_the_named_colour_and_zero_at_the_opposite_corner_of_the_rgb_cube():
    white, black = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    reward = rewards.mean_color_reward
    assert reward(white, ["a photo of white"]).item() == pytest.approx(1)
    assert reward(black, ["a photo of white"]).item() == pytest.approx(0, abs=1e-6)
    red = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert reward(red, ["a photo of cyan"]).item() == pytest.approx(0, abs=1e-6)
    assert reward(red, ["a photo of black"]).item() == pytest.approx(1 - 1 / 3 ** 0.5)


def test_pickscore_loads_from_the_reward_dir_as_flow_grpo_scales_it(tmp_path, monkeypatch):
    """`--reward pickscore`: PickScore's logits (logit_scale.exp() * cos) / 26, Flow-GRPO's scaling."""
    root = save_tiny_clip_rewards(tmp_path / "rewards")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = rewards.get_reward("pickscore", root=str(root))
    model, tokenizer = tiny_clip(tmp_path / "vocab")
    images, prompts = torch.rand(2, 3, 64, 64), ["a red cat", "a dog"]
    with torch.no_grad():
        logits = model(pixel_values=rewards.clip_preprocess(images),
                       **tokenizer(prompts, padding=True, return_tensors="pt")).logits_per_image
    torch.testing.assert_close(loaded(images, prompts), logits.diagonal() / 26.0)


def test_pickscore_mode_equals_transformers_logits_and_is_batch_independent(tmp_path):
    model, tokenizer = tiny_clip(tmp_path)
    scorer = rewards.CLIPScorer(model, tokenizer, logit_scaled=True, divide=26.0)
    images, prompts = torch.rand(3, 3, 64, 64), ["a red cat", "hi", "a very long prompt about dogs"]
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # independent: the CLIP forward's logits_per_image diagonal is logit_scale.exp() * cos(image_i, text_i)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=rewards.clip_preprocess(images), **tokens).logits_per_image
    torch.testing.assert_close(scores, logits.diagonal() / 26.0)
    torch.testing.assert_close(scorer(images, prompts), scores)  # deterministic
    # padding must not leak between prompts: each sample scored alone gives the same number
    alone = torch.cat([scorer(images[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, scores, rtol=1e-4, atol=1e-5)
    cos = rewards.CLIPScorer(model, tokenizer)(images, prompts)  # CLIP score: the plain cosine
    torch.testing.assert_close(cos * model.logit_scale.exp() / 26.0, scores)
    assert cos.abs().max() <= 1


def test_clip_score_loads_offline_from_the_reward_dir(tmp_path, monkeypatch):
    model, tokenizer = tiny_clip(tmp_path)
    d = tmp_path / "rewards" / "clip-vit-large-patch14"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = rewards.get_reward("clip", root=str(tmp_path / "rewards"))
    images, prompts = torch.rand(2, 3, 32, 32), ["a red cat", "a dog"]
    torch.testing.assert_close(loaded(images, prompts), rewards.CLIPScorer(model, tokenizer)(images, prompts))


def test_weighted_reward_sums_and_bad_specs_fail_clearly():
    images, prompts = torch.rand(4, 3, 8, 8), ["a photo of red", "a photo of blue"] * 2
    one = rewards.get_reward("mean_color")
    both = rewards.get_reward("mean_color:2, mean_color:0.5")
    torch.testing.assert_close(both(images, prompts), 2.5 * one(images, prompts))
    torch.testing.assert_close(rewards.get_reward("mean_color:3")(images, prompts), 3 * one(images, prompts))
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.get_reward("nope")
    with pytest.raises(ValueError, match="weight must be a number"):
        rewards.get_reward("mean_color:x")


@pytest.mark.parametrize("name, names_missing", [
    ("pickscore", "PickScore_v1"), ("clip", "clip-vit-large-patch14"),
    ("hpsv2", "HPS_v2.1_compressed.pt|open-clip-torch"), ("imagereward", "image-reward|ImageReward.pt")])
def test_missing_weights_or_packages_say_what_to_fetch(tmp_path, name, names_missing):
    with pytest.raises(SystemExit, match=names_missing) as e:
        rewards.get_reward(name, root=str(tmp_path))
    assert "pip install" in str(e.value) or "hf download" in str(e.value) or "environment" in str(e.value)


@pytest.mark.parametrize("model", ["shapes", "sd3"])
def test_a_missing_reward_model_stops_the_run_before_the_model_loads(tmp_path, monkeypatch, model):
    """The shapes base pretrains for minutes on a first run, FLUX and SD3 load for minutes: the reward loads first."""
    from infra import pipelines, shapes, tasks
    from infra.args import parse_args
    import dgpo

    def too_early(*a, **k):
        raise AssertionError("the model was built before the reward was found")

    monkeypatch.setattr(shapes, "build_shapes_flux", too_early)
    monkeypatch.setattr(pipelines, "build_pipeline_policy", too_early)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    flags = ["--model", model, "--reward", "pickscore", "--reward-dir", str(tmp_path / "rewards")]
    if model == "sd3":
        flags += ["--pretrained", str(tmp_path), "--train-prompts", str(tmp_path / "prompts.txt")]
    args = parse_args(dgpo.Args, dgpo.PRESETS, flags)
    with pytest.raises(SystemExit, match="PickScore weights: .* not found"):
        tasks.load_task(args, keep_reference=True)


def test_hps_score_equals_open_clips_own_preprocessing_and_features():
    """HPSv2's own scoring (its `score`: open_clip's validation transform on the saved image, the model's
    normalised features, their dot product) computed with open_clip itself, against HPSScorer on the decoded
    tensors. A tiny random CLIP with ViT-H-14's tokenizer stands in for the 1B-parameter checkpoint."""
    open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is a reward extra (requirements-rewards.txt)")
    from PIL import Image
    torch.manual_seed(0)
    text_cfg = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=16, text_cfg=text_cfg,
                           vision_cfg=dict(layers=1, width=32, patch_size=32, image_size=224, head_width=16)).eval()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    scorer = rewards.HPSScorer(model, tokenizer)
    images = torch.rand(3, 3, 48, 80)  # not square: the short side is resized, then centre-cropped
    prompts = ["a cat", "a dog on a red sofa", "a city at night"]
    ours = scorer(images, prompts)

    preprocess = open_clip.image_transform(224, is_train=False)  # HPSv2's preprocess_val for ViT-H-14
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        text_features = model.encode_text(tokenizer(prompts), normalize=True)
    reference = (image_features @ text_features.T).diagonal()
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-3)
    assert ours.shape == (3,) and ours.abs().max() <= 1
    # the kernel check's shapes: width 32 in heads of 16 over 7 x 7 patches + the class token; the text's 77 tokens
    from infra.attention import AttentionShape
    assert scorer.attention_shapes() == [AttentionShape(2, 16, 50), AttentionShape(2, 16, 77, mask="causal")]


def test_clip_rewards_report_the_attention_calls_they_make(tmp_path, monkeypatch):
    """The kernel check runs at the shapes a reward model's attention really takes: recorded from the calls of a
    forward (the text tower pads to the longest prompt, so its calls are at most the 77 tokens checked), with the
    mask they pass (the text tower's is causal, the image tower's none)."""
    import torch.nn.functional as F
    from infra.attention import AttentionShape
    model, tokenizer = tiny_clip(tmp_path)
    scorer = rewards.CLIPScorer(model, tokenizer)
    seen, sdpa = set(), F.scaled_dot_product_attention

    def recording(q, *a, **k):
        masked = k.get("attn_mask") is not None or bool(k.get("is_causal"))
        seen.add((q.shape[1], q.shape[-1], q.shape[-2], "causal" if masked else ""))
        return sdpa(q, *a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    scorer(torch.rand(2, 3, 64, 64), ["a red cat", "a dog"])
    image, text = scorer.attention_shapes()
    assert image == AttentionShape(heads=2, head_dim=16, seq_len=(224 // 32) ** 2 + 1)
    assert (image.heads, image.head_dim, image.seq_len, "") in seen
    text_calls = seen - {(image.heads, image.head_dim, image.seq_len, "")}
    assert text_calls and all((h, d, m) == (text.heads, text.head_dim, text.mask) and n <= text.seq_len == 77
                              for h, d, n, m in text_calls)
    assert text.mask == "causal"
    # a weighted sum reports its learned parts' calls, once each; a programmatic reward none
    both = rewards.WeightedReward([(1.0, scorer), (0.5, scorer), (1.0, rewards.mean_color_reward)])
    assert rewards.attention_shapes(both) == [image, text]
    assert rewards.attention_shapes(rewards.get_reward("mean_color")) == []
    assert rewards.attention_shapes(rewards.CheckedReward(both, "reward 'both'")) == [image, text]  # a run's task's


def test_a_reward_that_does_not_return_one_number_per_sample_stops_with_its_name():
    """A run's reward is checked on every call: (B,) passes through, (B, 1) is flattened, integer and boolean scores
    become float; other shapes, a list, complex numbers stop the run with one line naming the reward."""
    images, prompts = torch.rand(4, 3, 8, 8), ["a photo of red"] * 4
    want = rewards.mean_color_reward(images, prompts)
    check = lambda fn: rewards.CheckedReward(fn, "reward 'mine'")(images, prompts)
    torch.testing.assert_close(check(rewards.mean_color_reward), want)
    torch.testing.assert_close(check(lambda x, p: rewards.mean_color_reward(x, p)[:, None]), want)
    out = check(lambda x, p: rewards.mean_color_reward(x, p) > 0.5)
    assert out.dtype == torch.float32 and out.tolist() == (want > 0.5).float().tolist()
    for fn, match in [(lambda x, p: torch.rand(4, 3), r"reward 'mine' returned shape \(4, 3\) for 4 samples"),
                      (lambda x, p: torch.rand(3), r"shape \(3,\) for 4 samples"),
                      (lambda x, p: torch.rand(4).tolist(), "reward 'mine' returned a list"),
                      (lambda x, p: torch.rand(4, dtype=torch.cfloat), "complex")]:
        with pytest.raises(SystemExit, match=match):
            check(fn)


@pytest.mark.parametrize("model, made", [("toy2d", "2D points"), ("tiny-flux", "32 px images")])
def test_a_registered_reward_of_the_wrong_shape_stops_the_run_before_the_model_loads(model, made, tmp_path,
                                                                                    monkeypatch):
    """End to end: a registered reward that returns two numbers per sample is refused with its name, not as a reshape
    error inside the method, and before the model loads (a FLUX load takes minutes): it is called once on two random
    samples of what the model makes, with the run's prompts. (One of the right shape passes that call and trains:
    the next test.)"""
    import flow_grpo
    from infra import tasks
    seen = []

    def two_numbers(x, p):
        seen.append((tuple(x.shape), list(p)))
        return x.flatten(1)[:, :2]

    rewards.register_reward("two_numbers", two_numbers)
    monkeypatch.setattr(tasks, "toy2d_policy", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(tasks, "build_tiny_flux", lambda *a, **k: pytest.fail("loaded the model"))
    try:
        with pytest.raises(SystemExit, match=rf"reward 'two_numbers' returned shape \(2, 2\) for 2 samples; .* \(called "
                                             rf"on 2 random {made} and 2 of the run's prompts, before the model loads"):
            flow_grpo.main(["--model", model, "--reward", "two_numbers", "--iterations", "1",
                            "--output-dir", str(tmp_path / "run")])
    finally:
        del rewards.REWARDS["two_numbers"]
    prompts = tasks.default_prompts(model)[0][:2]
    assert seen == [((2, 2) if model == "toy2d" else (2, 3, 32, 32), prompts)]
    assert not (tmp_path / "run").exists()


def test_the_usage_pages_own_reward_example_trains_toward_its_reward(tmp_path, monkeypatch, capsys):
    """docs/usage.md's register_reward example, read out of the page and run as its comment says: DGPO on the toy
    with the registered reward (points near the origin) raises that reward, and the closing line does not explain
    it on toy_mode's scale."""
    import json
    import re
    import runpy
    import sys
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    code = re.search(r"```python\n(# my_reward\.py.*?)```", page, re.S).group(1)
    (tmp_path / "my_reward.py").write_text(code)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["my_reward.py", "--reward", "near_origin", "--iterations", "30",
                                      "--log-every", "0", "--eval-samples-per-prompt", "8", "--no-eval-ema",
                                      "--output-dir", str(out)])
    try:
        runpy.run_path(str(tmp_path / "my_reward.py"), run_name="__main__")
    finally:
        rewards.REWARDS.pop("near_origin", None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward_after"] > summary["eval_reward_before"] + 0.3, summary  # -3.96 -> -1.72
    reading = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("eval reward"))
    assert "on_manifold" in reading and "1 = every sample" not in reading


def test_a_registered_models_reward_is_checked_and_named_by_its_model(tmp_path):
    """A model registered with its own reward (no --reward): the same check, the message naming the model."""
    import flow_grpo
    from common import toy_mode_reward
    from infra import tasks

    def build(args, keep_reference, device, log):
        prompts = [f"mode {i}" for i in range(8)]
        return tasks.Task(tasks.toy2d_policy(keep_reference, device, log), lambda x, p: toy_mode_reward(x, p)[:-1],
                          prompts, prompts)

    tasks.register_model("toy-short-reward", build)
    try:
        with pytest.raises(SystemExit, match=r"the reward of --model toy-short-reward returned shape \(31,\) for 32"):
            flow_grpo.main(["--model", "toy-short-reward", "--preset", "toy2d", "--iterations", "1",
                            "--eval-samples-per-prompt", "4", "--output-dir", str(tmp_path / "run")])
    finally:
        del tasks.CUSTOM_MODELS["toy-short-reward"]


def test_the_reward_digest_fingerprints_the_weights_not_where_they_lie(tmp_path):
    """What a checkpoint records of its reward models (rewards.reward_digest): the same files at another path, with
    `hf download`'s hidden metadata rewritten, read alike; other weights do not: a byte changed at the end of a large
    file, or a MiB changed in its middle (a tensor of a fine-tune that left the first and last MiB alone)."""
    import shutil
    root = save_tiny_clip_rewards(tmp_path / "a")
    digest = rewards.reward_digest("pickscore", str(root))
    assert digest is not None and rewards.reward_digest("clip", str(root)) not in (None, digest)
    shutil.copytree(root, tmp_path / "b")
    (tmp_path / "b" / "PickScore_v1" / ".cache").mkdir()
    (tmp_path / "b" / "PickScore_v1" / ".cache" / "model.safetensors.metadata").write_text("downloaded just now")
    assert rewards.reward_digest("pickscore:2, mean_color", str(tmp_path / "b")) == digest  # (weights: flags)
    assert rewards.reward_digest("mean_color", str(root)) is None  # no weights to fingerprint
    assert rewards.reward_digest(None, str(root)) is None  # a registered model's own reward
    hps = root / "HPS_v2.1_compressed.pt"
    assert rewards.reward_digest("hpsv2", str(root)) is None  # missing: its load says what to fetch
    data = bytearray(torch.randint(0, 256, (8 * 2 ** 20,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    hps.write_bytes(bytes(data))
    before = rewards.reward_digest("hpsv2", str(root))
    data[-1] ^= 1
    hps.write_bytes(bytes(data))
    assert before is not None and rewards.reward_digest("hpsv2", str(root)) != before
    data[-1] ^= 1
    data[7 * 2 ** 19: 9 * 2 ** 19] = bytes(2 ** 20)  # a MiB in the middle of eight, from 3.5 MiB to 4.5 MiB
    hps.write_bytes(bytes(data))
    assert rewards.reward_digest("hpsv2", str(root)) != before


def test_a_resume_refuses_reward_weights_other_than_the_runs(tmp_path):
    """--reward-dir may move between a run and its resume, but other weights in it would change the reward the run
    optimises and score its "after" evaluation with another model than its "before": refused with the flags, before
    minutes of model loading."""
    import json
    import shutil

    import flow_grpo
    from infra.args import ArgumentError, parse_args
    root = save_tiny_clip_rewards(tmp_path / "rewards")
    flags = ["--model", "tiny-flux", "--reward", "pickscore", "--output-dir", str(tmp_path / "run"), "--log-every",
             "0", "--save-weights", "false", "--checkpoint-every", "1"]
    flow_grpo.main(flags + ["--reward-dir", str(root), "--iterations", "1"])
    recorded = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-1" / "inputs.json").read_text())
    assert recorded["rewards"] == rewards.reward_digest("pickscore", str(root))
    shutil.move(root, tmp_path / "moved")  # the same weights elsewhere: accepted
    resume = flags + ["--reward-dir", str(tmp_path / "moved"), "--iterations", "2", "--resume-from-checkpoint",
                      "latest"]
    assert parse_args(flow_grpo.Args, flow_grpo.PRESETS, resume).reward_dir == str(tmp_path / "moved")
    model, _ = tiny_clip(tmp_path / "vocab")
    with torch.no_grad():
        model.logit_scale.add_(0.5)  # PickScore fine-tuned further, say: the same files, other numbers
    model.save_pretrained(tmp_path / "moved" / "PickScore_v1")
    with pytest.raises(ArgumentError, match=r"checkpoint-1: the weights of --reward pickscore in .*moved are not those "
                                            r"the run trained with"):
        parse_args(flow_grpo.Args, flow_grpo.PRESETS, resume)
