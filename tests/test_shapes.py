"""The shapes task: grammar, renderer vs checker, pixel codec and packing, cached base model, and one
iteration of every script on it."""

import importlib
import json
import random
import re
import sys
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from infra import diffusers_models
from infra import shapes
from infra import tasks

# A base model pretrained for 2 steps: the code path of the real one, in a second of CPU.
TINY_BASE = dict(shapes.SHAPES_BASE_CONFIG, steps=2, batch=4)


@pytest.fixture
def tiny_base(monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_BASE_CONFIG", TINY_BASE)


def _image(objects, size=32):
    """Draw (colour, shape, x0, y0, side) boxes by hand."""
    img = torch.zeros(3, size, size)
    for c, s, x, y, side in objects:
        img[:, shapes.shape_mask(s, x, y, side, side, size)] = torch.tensor(shapes.PALETTE[c])[:, None]
    return img


# ------------------------------------------------------------------------------------------------------
# grammar and split
# ------------------------------------------------------------------------------------------------------

def test_split_holds_out_compositions_of_known_parts():
    train, held_out = shapes.split_prompts()
    assert not set(train) & set(held_out)
    everything = [p for ps in shapes.all_prompts().values() for p in ps]
    assert sorted(train + held_out) == sorted(everything)
    assert set(shapes.all_prompts()["single"]) <= set(train)  # every object is seen alone
    train_words = {w for p in train for w in p.split()}
    assert {w for p in held_out for w in p.split()} <= train_words
    assert 0.15 < len(held_out) / (len(everything) - 12) < 0.25
    assert shapes.split_prompts() == (train, held_out)  # deterministic
    assert shapes.split_prompts(seed=1) != (train, held_out)  # the seed chooses which combinations are held out


def test_the_sample_grid_shows_two_prompts_per_category_held_out_ones_where_there_are_any():
    config = shapes.SHAPES_BASE_CONFIG
    _, held_out = shapes.split_prompts(config["eval_fraction"], config["split_seed"])
    grid = shapes.grid_prompts()
    by_category = {c: [p for p in grid if p in ps] for c, ps in shapes.all_prompts().items()}
    assert len(grid) == 8 and all(len(ps) == 2 for ps in by_category.values())
    assert all(p in held_out for c, ps in by_category.items() if c != "single" for p in ps)


@pytest.mark.parametrize("prompt, parsed", [
    ("a red circle", ([("red", "circle", 1)], None)),
    ("three yellow triangles", ([("yellow", "triangle", 3)], None)),
    ("a red circle and a blue square", ([("red", "circle", 1), ("blue", "square", 1)], None)),
    ("a green square below a red triangle", ([("green", "square", 1), ("red", "triangle", 1)], "below")),
])
def test_parse_prompt(prompt, parsed):
    assert shapes.parse_prompt(prompt) == parsed


@pytest.mark.parametrize("prompt", ["a purple circle", "two red circle", "a red circle near a blue square", "",
                                    "a red circle left of blue square"])
def test_bad_prompts_fail_clearly(prompt):
    with pytest.raises(ValueError, match="not a shapes prompt"):
        shapes.parse_prompt(prompt)
    with pytest.raises(ValueError, match="not a shapes prompt"):
        shapes.ShapesTextEncoder()([prompt])


# ------------------------------------------------------------------------------------------------------
# renderer vs checker
# ------------------------------------------------------------------------------------------------------

def test_rendered_ground_truth_passes_every_check():
    rng = random.Random(0)
    prompts = [p for ps in shapes.all_prompts().values() for p in ps]
    images = torch.stack([shapes.render(p, rng) for p in prompts])
    result = shapes.check(images, prompts)
    assert result["score"].min() == 1 and result["accuracy"].min() == 1
    assert result["quality"].mean() > 0.95 and result["quality"].min() > 0.85


def test_rendered_objects_never_touch():
    """The renderer leaves `gap` (2) pixels between boxes: two touching objects of one colour would be one blob to
    the checker, so a rendered "three red squares" would fail its own count."""
    rng = random.Random(0)
    for prompt in ["three red squares", "two blue circles", "a red square left of a green square"] * 100:
        boxes = shapes.sample_layout(prompt, rng)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                apart_x = max(b[2] - (a[2] + a[4]), a[2] - (b[2] + b[4]))  # empty columns between the boxes
                apart_y = max(b[3] - (a[3] + a[4]), a[3] - (b[3] + b[4]))
                assert max(apart_x, apart_y) >= 2, (prompt, boxes)


def test_wrong_images_score_lower():
    img = _image([("red", "circle", 2, 10, 10), ("blue", "square", 20, 10, 10)])
    check = lambda p: shapes.check(img[None], [p])  # noqa: E731
    assert check("a red circle left of a blue square")["score"] == 1
    assert check("a red circle right of a blue square")["score"] == 6 / 7  # only the relation fails
    assert check("a red circle right of a blue square")["accuracy"] == 0
    assert check("a red square left of a blue square")["score"] == 4 / 7  # colour present, shape wrong
    assert check("a green circle and a blue square")["score"] == 3 / 6  # nothing green at all
    assert check("two red circles")["score"] == 2 / 3  # one circle, not two
    assert check("a blue triangle")["score"] == 1 / 3
    vertical = _image([("red", "triangle", 10, 1, 10), ("green", "circle", 11, 19, 10)])
    assert shapes.check(vertical[None], ["a red triangle above a green circle"])["accuracy"] == 1
    assert shapes.check(vertical[None], ["a red triangle left of a green circle"])["accuracy"] == 0


def test_counts_are_exact_and_relations_read_the_largest_objects_on_their_dominant_axis():
    three = _image([("red", "circle", 1, 1, 8), ("red", "circle", 12, 1, 8), ("red", "circle", 23, 1, 8)])
    assert shapes.check(three[None], ["three red circles"])["accuracy"] == 1
    assert shapes.check(three[None], ["two red circles"])["score"] == 2 / 3  # three is not two
    # a large red circle left of the blue square and a small one right of it: the relation is the large one's
    pair = _image([("red", "circle", 1, 10, 10), ("blue", "square", 13, 10, 8), ("red", "circle", 25, 12, 6)])
    objects, _ = shapes.detect(pair)
    assert sorted((o["color"], o["shape"]) for o in objects) == [("blue", "square"), ("red", "circle"),
                                                                  ("red", "circle")]
    # (two red circles fail "exactly one": 6 of 7 checks at best)
    assert shapes.check(pair[None], ["a red circle left of a blue square"])["score"] == 6 / 7
    assert shapes.check(pair[None], ["a red circle right of a blue square"])["score"] == 5 / 7
    # 12 px apart horizontally but 18 vertically: "above" holds, "left of" does not
    diagonal = _image([("red", "circle", 2, 2, 8), ("blue", "square", 14, 20, 8)])
    assert shapes.check(diagonal[None], ["a red circle above a blue square"])["accuracy"] == 1
    assert shapes.check(diagonal[None], ["a red circle left of a blue square"])["accuracy"] == 0


def test_counting_separates_touching_and_tiny_objects():
    two = _image([("blue", "square", 1, 1, 8), ("blue", "square", 20, 20, 8)])
    assert shapes.check(two[None], ["two blue squares"])["accuracy"] == 1
    merged = _image([("blue", "square", 1, 1, 8), ("blue", "square", 9, 1, 8)])  # one 16x8 blob, no shape
    assert shapes.check(merged[None], ["two blue squares"])["accuracy"] == 0
    speck = _image([("blue", "square", 1, 1, 8), ("blue", "square", 20, 20, 3)])  # 9 px < MIN_AREA
    assert shapes.check(speck[None], ["a blue square"])["accuracy"] == 1


@pytest.mark.parametrize("w, h, shape", [(12, 9, "square"), (12, 8, "square"), (12, 7, None), (6, 12, None),
                                        (14, 5, None)])
def test_a_blob_over_one_and_a_half_times_as_long_as_wide_is_no_shape(w, h, shape):
    blob = torch.zeros(32, 32, dtype=torch.bool)
    blob[3:3 + h, 4:4 + w] = True
    assert shapes.classify_shape(blob)[0] == shape


def test_quality_falls_with_blur_noise_and_off_palette_colours():
    rng = random.Random(1)
    prompts = [rng.choice(shapes.split_prompts()[0]) for _ in range(32)]
    clean = torch.stack([shapes.render(p, rng) for p in prompts])
    q = lambda x: shapes.check(x, prompts)["quality"].mean().item()  # noqa: E731
    base = q(clean)
    assert q(F.avg_pool2d(clean, 3, 1, 1)) < base - 0.1
    assert q((clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)) \
        < base - 0.3
    # dimmed objects (0.6 x palette colour: 0.4 from it) are off-palette pixels, the black background stays
    # clean, and shapes are still found: quality falls by exactly the fraction of object pixels
    per_image = shapes.check(clean, prompts)["quality"]
    object_fraction = (clean.amax(1) > 0).float().mean((1, 2))
    assert torch.allclose(shapes.check(clean * 0.6, prompts)["quality"], per_image * (1 - object_fraction))


def _flood_fill_components(mask):
    """Brute-force 4-connected components by breadth-first search (the independent reference)."""
    seen, comps = torch.zeros_like(mask), []
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                comp, queue = torch.zeros_like(mask), deque([(i, j)])
                seen[i, j] = True
                while queue:
                    y, x = queue.popleft()
                    comp[y, x] = True
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        if 0 <= y + dy < h and 0 <= x + dx < w and mask[y + dy, x + dx] and not seen[y + dy, x + dx]:
                            seen[y + dy, x + dx] = True
                            queue.append((y + dy, x + dx))
                comps.append(comp)
    return comps


@pytest.mark.parametrize("seed", range(5))
def test_connected_components_match_flood_fill(seed):
    mask = torch.rand(20, 20, generator=torch.Generator().manual_seed(seed)) < 0.45
    key = lambda comps: sorted(tuple(c.flatten().nonzero().flatten().tolist()) for c in comps)  # noqa: E731
    assert key(shapes._components(mask)) == key(_flood_fill_components(mask))


# ------------------------------------------------------------------------------------------------------
# model pieces
# ------------------------------------------------------------------------------------------------------

def test_pixel_codec_and_packing_are_lossless_and_match_flux_policy(tiny_base):
    images = torch.rand(3, 3, 32, 32)
    codec = shapes.PixelCodec()
    latents = codec.encode(images)
    assert latents.shape == (3, 12, 16, 16)
    assert torch.allclose(codec.decode(latents)[0] / 2 + 0.5, images, atol=1e-6)
    policy = shapes.build_shapes_flux(lora_rank=4)
    packed = diffusers_models.flux_pack(latents)
    assert packed.shape == (3, 64, 48) and policy.sample_shape() == (64, 48)
    assert torch.equal(policy.unpack(packed), latents)
    assert torch.allclose(policy.decode(packed), images, atol=1e-6)
    from diffusers import FluxPipeline
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 12, 16, 16))
    assert torch.equal(policy.img_ids, FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32))


def test_text_encoder_shapes_and_padding():
    enc = shapes.ShapesTextEncoder(dim=16)
    embeds, pooled = enc(["a red circle", "a red circle left of a blue square"])
    assert embeds.shape == (2, shapes.MAX_WORDS, 16) and pooled.shape == (2, 16)
    assert torch.allclose(pooled[0], enc.words(enc.tokenize(["a red circle"]))[0, :3].mean(0))


def test_the_order_of_the_words_reaches_the_transformer():
    """FLUX's text ids are all zero (no RoPE on text tokens) and the pooled embedding is a mean, so only the encoder's
    position embeddings tell "a red circle left of a blue square" from "a blue square left of a red circle"."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    net = FluxTransformer2DModel(**shapes.SHAPES_TRANSFORMER_CONFIG).eval()
    enc = shapes.ShapesTextEncoder(shapes.SHAPES_TRANSFORMER_CONFIG["joint_attention_dim"])
    with torch.no_grad():
        enc.positions.normal_()  # as after pretraining: the 0.02 init would leave the difference near rounding
    embeds, pooled = enc(["a red circle left of a blue square", "a blue square left of a red circle"])
    x = torch.randn(1, 64, 48).expand(2, -1, -1)
    with torch.no_grad():
        v = net(hidden_states=x, timestep=torch.full((2,), 0.5), pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=torch.zeros(shapes.MAX_WORDS, 3),
                img_ids=diffusers_models.flux_image_ids(8), return_dict=False)[0]
    assert torch.allclose(pooled[0], pooled[1], atol=1e-6)  # the same words
    assert (v[0] - v[1]).abs().max() > 1e-3  # 6e-3 here; without the positions, rounding (1e-6)


def test_pretraining_is_flux_flow_matching_on_rendered_train_prompts(monkeypatch):
    """One step of the base model's pretraining, recorded: x_s = (1 - s) x0 + s eps with x0 the packed codec latents
    of the images rendered for the step's prompts (train prompts only), velocity target eps - x0, and
    s ~ logit-normal(0, 1) (SD3 sec. 3.1): logit(s) of 512 draws has mean ~0 and std ~1 (uniform s: std 1.81)."""
    rendered, calls = [], []
    render = shapes.render
    monkeypatch.setattr(shapes, "render", lambda p, rng: rendered.append((p, render(p, rng))) or rendered[-1][1])

    class Recording:
        def __getattr__(self, name):
            return getattr(F, name)

        def mse_loss(self, v, target):
            calls.append(target)
            return F.mse_loss(v, target)

    monkeypatch.setattr(shapes, "F", Recording())
    from diffusers import FluxTransformer2DModel
    seen = []
    forward = FluxTransformer2DModel.forward
    monkeypatch.setattr(FluxTransformer2DModel, "forward",
                        lambda self, **kw: seen.append(kw) or forward(self, **kw))
    config = dict(shapes.SHAPES_BASE_CONFIG, steps=1, batch=512)
    transformer = FluxTransformer2DModel(**config["transformer"])
    shapes._pretrain(transformer, shapes.ShapesTextEncoder(64), config, log=lambda m: None)
    train, _ = shapes.split_prompts(config["eval_fraction"], config["split_seed"])
    prompts = [p for p, _ in rendered]
    assert len(prompts) == 512 and set(prompts) <= set(train)
    assert len({c for p in prompts for c, ps in shapes.all_prompts().items() if p in ps}) == 4  # all categories
    x0 = diffusers_models.flux_pack(shapes.PixelCodec(2).encode(torch.stack([img for _, img in rendered])))
    (kw,), (target,) = seen, calls
    s = kw["timestep"][:, None, None]
    eps = (kw["hidden_states"] - (1 - s) * x0) / s
    assert torch.allclose(target, eps - x0, atol=1e-4)
    assert eps.std().item() == pytest.approx(1, abs=0.01) and eps.mean().abs().item() < 0.01  # the noise is N(0, 1)
    logit = torch.logit(kw["timestep"].double())
    assert abs(logit.mean().item()) < 0.15 and logit.std().item() == pytest.approx(1, abs=0.1)


def test_base_model_is_cached(tiny_base, monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path))
    first, enc = shapes.pretrain_shapes_base(TINY_BASE, log=lambda m: None)
    assert len(list(tmp_path.glob("shapes-base-*.pt"))) == 1
    monkeypatch.setattr(shapes, "_pretrain", lambda *a: pytest.fail("the cached model was retrained"))
    second, enc2 = shapes.pretrain_shapes_base(TINY_BASE)
    for a, b in zip(list(first.state_dict().values()) + list(enc.state_dict().values()),
                    list(second.state_dict().values()) + list(enc2.state_dict().values())):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in second.parameters())


def _task(model):
    """The task a script builds for `--model model` (flow_grpo's flags; every script loads it the same way)."""
    import flow_grpo
    from infra.args import parse_args
    args = parse_args(flow_grpo.Args, flow_grpo.PRESETS, ["--model", model])
    return tasks.load_task(args, keep_reference=False, log=lambda *_: None)


def test_the_task_reports_accuracy_and_quality_as_the_checker_defines_them(tiny_base):
    """The shapes task's metrics: a ground-truth image of ANOTHER prompt is clean (quality ~1) and wrong (accuracy 0);
    a blurred image of the right prompt is still correct, of lower quality."""
    task = _task("shapes")
    assert not set(task.train_prompts) & set(task.eval_prompts)
    image = shapes.render("a red circle", random.Random(0))[None]
    wrong = {k: fn(image, ["a blue square"]).item() for k, fn in task.metrics.items()}
    assert wrong["accuracy"] == 0 and wrong["quality"] > 0.9
    assert task.reward_fn(image, ["a red circle"]).item() == 1
    blurred = F.avg_pool2d(image, 3, 1, 1)
    right = {k: fn(blurred, ["a red circle"]).item() for k, fn in task.metrics.items()}
    assert right["accuracy"] == 1 and right["quality"] < wrong["quality"] - 0.02  # 0.95 against 1


def test_tiny_flux_evaluates_on_colours_it_never_trains_on():
    task = _task("tiny-flux")
    assert task.train_prompts and task.eval_prompts and not set(task.train_prompts) & set(task.eval_prompts)


# ------------------------------------------------------------------------------------------------------
# every script runs on shapes
# ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("script", ["flow_grpo", "dgpo", "neighbor_grpo", "g2rpo", "pro_grpo"])
def test_one_iteration_on_shapes(script, tiny_base, tmp_path, capture_policy):
    module = importlib.import_module(script)
    argv = ["--model", "shapes", "--iterations", "1", "--prompts-per-iteration", "2", "--num-steps", "4",
            "--eval-steps", "3", "--eval-samples-per-prompt", "1", "--output-dir", str(tmp_path)]
    argv += {"pro_grpo": ["--prune-steps", "1,2"], "dgpo": ["--ema-start", "0", "--num-train-timesteps", "2"],
             "neighbor_grpo": ["--num-train-timesteps", "2"]}.get(script, [])
    module.main(argv)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "shapes" and summary["nfe_train"] > 0
    assert 0 <= summary["quality_after"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert (tmp_path / "samples_before.png").exists() and (tmp_path / "samples_after.png").exists()
    policy = capture_policy["policy"]
    trained = [n for n, p in policy.net.named_parameters() if p.requires_grad]
    assert trained and all("lora" in n for n in trained)  # the shapes presets train LoRA adapters


def test_the_base_model_benchmark_scores_every_category_on_its_train_and_held_out_prompts(tiny_base, tmp_path,
                                                                                           capsys):
    """`python benchmarks/shapes_base.py` (docs/benchmarks.md's base-model table) on the 2-step base: every category
    scored on its train and held-out prompts apart (single objects are all trained), and the grid drawn. It crashed
    once on a flag it did not set (`--compile`): it now takes the scripts' own defaults."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import shapes_base
    out = tmp_path / "base"
    results = shapes_base.main(["--output-dir", str(out), "--eval-steps", "2", "--eval-samples-per-prompt", "1"])
    assert sorted(results) == ["counting/held-out", "counting/train", "position/held-out", "position/train",
                               "single/train", "two_objects/held-out", "two_objects/train"]
    assert json.loads((out / "scores.json").read_text()) == results
    assert (out / "samples.png").is_file()
    for scores in results.values():
        assert set(scores) == {"reward", "accuracy", "quality"} and 0 <= scores["reward"] <= 1
    _, held_out = shapes.split_prompts(TINY_BASE["eval_fraction"], TINY_BASE["split_seed"])
    printed = [re.match(r"(\S+)\s+(\S+)\s+\(\s*(\d+) prompts\)", line)
               for line in capsys.readouterr().out.splitlines()]
    counts = {f"{m[1]}/{m[2]}": int(m[3]) for m in printed if m}
    for category, prompts in shapes.all_prompts().items():
        held = sum(p in held_out for p in prompts)
        assert counts[f"{category}/train"] == len(prompts) - held and counts.get(f"{category}/held-out", 0) == held
