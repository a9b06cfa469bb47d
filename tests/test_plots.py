"""The pictures a run draws: the toy's samples.png (reward curve, samples before and after) and the image tasks'
sample grids, read back pixel by pixel."""

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from common import TOY_RING_RADIUS, toy_modes
from infra import plots
from infra import tasks


def test_the_toy_picture_draws_the_curve_upright_and_before_left_of_after(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"reward/mean": r}) + "\n" for r in np.linspace(0, 1, 30)))
    g = torch.Generator().manual_seed(0)
    before = ((torch.rand(400, 2, generator=g) * 2 - 1) * TOY_RING_RADIUS, torch.zeros(400, dtype=torch.long))
    after = (toy_modes()[3] + 0.3 * torch.randn(400, 2, generator=g), torch.full((400,), 3))
    plots.toy_picture(tmp_path / "samples.png", before, after, metrics, 0.1, 0.9)
    image = np.asarray(Image.open(tmp_path / "samples.png").convert("RGB")).astype(int)
    assert image.shape == (plots.PANEL + 40, 3 * plots.PANEL + 40, 3)
    curve = np.all(image == (0, 90, 200), axis=-1)
    ys, xs = curve.nonzero()
    x0, top, bottom = 10, 20, 20 + plots.PANEL
    assert ys[xs < x0 + 10].min() > bottom - 15  # a rising reward starts at the bottom of its panel ...
    assert ys[xs > x0 + plots.PANEL - 10].max() < top + 15  # ... and ends at the top

    def dots(colour, panel):  # pixels of a colour inside the second (before) or third (after) panel
        left = x0 + panel * (plots.PANEL + 10)
        return int(np.all(image[:, left:left + plots.PANEL] == colour, axis=-1).sum())
    mode0, mode3 = plots.COLOURS[0], plots.COLOURS[3]
    # each panel draws every mode's ring in its colour; the samples are the rest
    assert dots(mode0, 1) > dots(mode0, 2) + 500 and dots(mode3, 2) > dots(mode3, 1) + 300


class NoisePolicy:
    """Decodes its noise as it is (zero velocity): a grid shows the noise each row was sampled from."""

    def __init__(self, size):
        self.size = size

    def initial_noise(self, n, generator):
        return torch.rand(n, 3, self.size, self.size, generator=generator)

    def nfe_paused(self):
        return contextlib.nullcontext()

    def sigmas(self, steps, shift):
        return torch.linspace(1, 0, steps + 1)

    def encode_prompts(self, prompts):
        return {}

    def velocity(self, x, sigma, cond):
        return torch.zeros_like(x)

    def decode(self, x):
        return x


def test_the_sample_grid_puts_a_prompt_per_row_and_draws_the_same_noise_from_eval_seed(tmp_path):
    images = torch.rand(6, 3, 4, 5)
    tasks.save_grid(images, tmp_path / "grid.png", nrow=3, scale=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png")).astype(float) / 255
    assert grid.shape == (2 + 2 * (4 * 2 + 2), 2 + 3 * (5 * 2 + 2), 3)
    for i, img in enumerate(images):  # image i at row i // 3, column i % 3 (2 px gutters, 2x upscaled)
        r, c = divmod(i, 3)
        y, x = 2 + r * 10, 2 + c * 12
        cell = torch.tensor(grid[y:y + 8:2, x:x + 10:2]).permute(2, 0, 1)
        assert torch.allclose(cell.float(), img, atol=1 / 255)

    # with a label per row: a strip above each row names its prompt; the images move down by the strips
    long = "a green square below a red triangle, and far too many words to fit above four small images"
    tasks.save_grid(images, tmp_path / "labelled.png", nrow=3, scale=2, labels=["three red circles", long])
    labelled = np.asarray(Image.open(tmp_path / "labelled.png")).astype(float) / 255
    strip = tasks.LABEL_HEIGHT
    assert labelled.shape == (2 + 2 * (strip + 4 * 2 + 2), 2 + 3 * (5 * 2 + 2), 3)
    for i, img in enumerate(images):
        r, c = divmod(i, 3)
        y, x = 2 + r * (strip + 10) + strip, 2 + c * 12
        cell = torch.tensor(labelled[y:y + 8:2, x:x + 10:2]).permute(2, 0, 1)
        assert torch.allclose(cell.float(), img, atol=1 / 255)
    for r in range(2):  # dark text on the grey strip, inside the picture's width
        text = labelled[2 + r * (strip + 10):2 + r * (strip + 10) + strip].mean(-1) < 0.25
        assert 20 < text.sum() and not text[:, -2:].any()

    task = tasks.Task(NoisePolicy(4), None, [], [], grid_prompts=["a", "b"])
    drawn = {}
    for name, seed in (("first", 7), ("again", 7), ("other", 8)):
        tasks.sample_grid(task, SimpleNamespace(eval_seed=seed, eval_steps=2, shift=None, eval_solver="euler",
                                                eval_batch_size=0), tmp_path / f"{name}.png", per_prompt=2)
        drawn[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(drawn["first"], drawn["again"]) and not np.array_equal(drawn["first"], drawn["other"])
    # in --eval-batch-size chunks (FLUX cannot take a grid's samples at once) the same picture, each its own noise
    tasks.sample_grid(task, SimpleNamespace(eval_seed=7, eval_steps=2, shift=None, eval_solver="euler",
                                            eval_batch_size=3), tmp_path / "chunked.png", per_prompt=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "chunked.png")), drawn["first"])


def test_the_sample_grid_shrinks_large_images_to_its_tile_and_enlarges_small_ones(tmp_path):
    """FLUX's 720 px images become 512 px tiles (a 4 x 4 grid of 2,900 px otherwise), shapes' 32 px ones 128 px."""
    args = SimpleNamespace(eval_seed=0, eval_steps=1, shift=None, eval_solver="euler", eval_batch_size=2)
    for size, tile in ((720, 512), (32, 128), (200, 200)):
        task = tasks.Task(NoisePolicy(size), None, [], [], grid_prompts=["a", "b"])
        tasks.sample_grid(task, args, tmp_path / f"{size}.png", per_prompt=2)
        width, height = Image.open(tmp_path / f"{size}.png").size  # two rows, each under its prompt's strip
        assert (width, height) == (2 + 2 * (tile + 2), 2 + 2 * (tasks.LABEL_HEIGHT + tile + 2)), size
