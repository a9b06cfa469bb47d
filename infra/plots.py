"""The toy run's picture, drawn with PIL (no plotting library needed): the training reward over the iterations, and
the evaluation samples before and after training on the ring, each coloured by the mode its prompt asks for."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common import TOY_RING_RADIUS, toy_modes

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 200, 200),
           (240, 50, 230), (128, 128, 0)]
PANEL = 300


def _scatter(draw, x0: int, points: torch.Tensor, modes: torch.Tensor, title: str):
    """Samples (N, 2) with their prompt's mode index, inside a PANEL x PANEL box starting at x0."""
    extent = TOY_RING_RADIUS * 1.6

    def to_px(p):
        return (x0 + (p[0] / extent + 1) / 2 * PANEL, (1 - p[1] / extent) / 2 * PANEL + 20)

    draw.rectangle([x0, 20, x0 + PANEL, 20 + PANEL], outline=(180, 180, 180))
    for c, mu in enumerate(toy_modes().tolist()):  # the ring's modes: open circles in their prompt's colour
        x, y = to_px(mu)
        draw.ellipse([x - 12, y - 12, x + 12, y + 12], outline=COLOURS[c], width=2)
    for p, c in zip(points.tolist(), modes.tolist()):
        x, y = to_px(p)
        if x0 <= x <= x0 + PANEL and 20 <= y <= 20 + PANEL:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=COLOURS[c])
    draw.text((x0 + 4, 4), title, fill=(0, 0, 0))


def toy_picture(path: Path, before, after, metrics_file: Path, reward_before: float, reward_after: float):
    """`before` / `after`: (samples (N, 2), prompt mode indices (N,)) of the evaluation; the curve comes from
    metrics.jsonl's reward/mean."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (3 * PANEL + 40, PANEL + 40), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    rewards = [r["reward/mean"] for r in rows]
    x0 = 10
    draw.rectangle([x0, 20, x0 + PANEL, 20 + PANEL], outline=(180, 180, 180))
    draw.text((x0 + 4, 4), "training reward per iteration (0 to 1)", fill=(0, 0, 0))
    if len(rewards) > 1:
        pts = [(x0 + i / (len(rewards) - 1) * PANEL, 20 + (1 - min(max(r, 0), 1)) * PANEL)
               for i, r in enumerate(rewards)]
        draw.line(pts, fill=(0, 90, 200), width=1)
    for r, x in ((reward_before, x0), (reward_after, x0 + PANEL)):  # the evaluation rewards, before and after
        y = 20 + (1 - min(max(r, 0), 1)) * PANEL
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(220, 0, 0))
    _scatter(draw, x0 + PANEL + 10, *before, f"before: eval reward {reward_before:.3f}")
    _scatter(draw, x0 + 2 * PANEL + 20, *after, f"after: eval reward {reward_after:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
