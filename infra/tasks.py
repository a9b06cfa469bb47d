"""The image tasks behind `--model`: tiny-flux, shapes, FLUX.1-dev, SD3.5, and models you register.

`common.load_task` builds toy2d itself and everything else through `build_image_task`. Also here: prompt files
(`read_prompts`) and the sample grids image runs write before and after training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from common import Task, get_reward, sample_ode
from infra.diffusers_models import FluxPolicy, build_tiny_flux
from infra.rewards import COLORS

CUSTOM_MODELS: dict[str, Callable] = {}


def register_model(name: str, build_task: Callable):
    """Make `--model name` build `build_task(args, keep_reference, device, log) -> Task`: your own model and prompts
    through every script unchanged (pass a --preset; benchmarks/timing.py times other FLUX configs this way)."""
    CUSTOM_MODELS[name] = build_task


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: `.txt`, one per line (blank lines and lines starting with '#' skipped), or `.jsonl`,
    one JSON object per line with a "prompt" field (Flow-GRPO's GenEval/OCR metadata files have one)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"prompt file {path} not found")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or (path.suffix == ".txt" and line.startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SystemExit(f"{path}:{n}: each line of a .jsonl prompt file must be a JSON object with a "
                                 f"\"prompt\" field") from None
            prompts.append(str(prompt))
        elif path.suffix == ".txt":
            prompts.append(line)
        else:
            raise SystemExit(f"prompt file {path}: use .txt (one prompt per line) or .jsonl (a \"prompt\" field)")
    if not prompts:
        raise SystemExit(f"prompt file {path} has no prompts")
    return prompts


def build_image_task(args, keep_reference: bool, device="cpu", log=print) -> Task:
    """Every `--model` but toy2d (which common.load_task builds)."""
    task = _build(args, keep_reference, device, log)
    if args.gradient_checkpointing:
        task.policy.enable_gradient_checkpointing()
    return task


def _build(args, keep_reference: bool, device="cpu", log=print) -> Task:
    if args.model in CUSTOM_MODELS:
        return CUSTOM_MODELS[args.model](args, keep_reference, device, log)
    if args.model == "tiny-flux":
        policy = build_tiny_flux(resolution=args.resolution, guidance_scale=args.guidance_scale,
                                 lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, keep_reference=keep_reference,
                                 device=device, seed=args.seed)
        colors = list(COLORS)
        reward = get_reward(args.reward or "mean_color", device, args.reward_dir)
        return Task(policy, reward, [f"a photo of {c}" for c in colors[:8]],
                    [f"a photo of {c}" for c in colors[8:]])
    if args.model == "shapes":
        from infra import shapes
        policy = build_shapes_flux(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                   keep_reference=keep_reference, device=device, log=log)
        train, held_out = shapes.split_prompts(shapes.SHAPES_BASE_CONFIG["eval_fraction"],
                                               shapes.SHAPES_BASE_CONFIG["split_seed"])
        return Task(policy, get_reward(args.reward or "geneval", device, args.reward_dir), train, held_out,
                    {"accuracy": lambda x, p: shapes.check(x, p)["accuracy"],
                     "quality": lambda x, p: shapes.check(x, p)["quality"]}, grid_prompts=shapes.grid_prompts())
    if args.model in ("flux", "sd3"):
        from infra.pipelines import build_pipeline_task
        return build_pipeline_task(args, keep_reference, device, log)
    from common import MODELS
    raise ValueError(f"unknown model {args.model!r}; available: {', '.join(MODELS + tuple(CUSTOM_MODELS))}")


def build_shapes_flux(lora_rank=16, lora_alpha=None, keep_reference=False, device="cpu", log=print) -> FluxPolicy:
    """The shapes task's base model (see infra/shapes.py): a small FLUX transformer pretrained by the project on
    rendered coloured shapes (cached; the first call pretrains it, about 15 min on 2 CPU cores), its learned
    word-embedding text encoder and the lossless pixel "VAE". 32x32 images, 64 image tokens."""
    from infra import shapes
    transformer, text_encoder = shapes.pretrain_shapes_base(shapes.SHAPES_BASE_CONFIG, log)
    codec = shapes.PixelCodec(shapes.SHAPES_BASE_CONFIG["pixel_unshuffle"])
    return FluxPolicy(transformer, codec, text_encoder.to(device), resolution=shapes.IMAGE_SIZE,
                      lora_rank=lora_rank, lora_alpha=lora_alpha, keep_reference=keep_reference, device=device)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 4):
    """Write (N, 3, H, W) images in [0, 1] as a PNG grid (nearest-neighbour upscaled, 2 px gutters)."""
    import numpy as np
    from PIL import Image

    n, _, h, w = images.shape
    ncol = math.ceil(n / nrow)
    pad = 2
    grid = torch.full((3, ncol * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad), 0.5)
    for i, img in enumerate(images.float().clamp(0, 1).cpu()):
        r, c = divmod(i, nrow)
        up = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        grid[:, y:y + h * scale, x:x + w * scale] = up
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@torch.no_grad()
def sample_grid(task: Task, args, path: str | Path, per_prompt: int = 4):
    """Image tasks: a PNG of `task.grid_prompts` (one row each) x `per_prompt` fixed seeds, sampled with the
    evaluation ODE, so the grids written before and after training show the same prompts and noise."""
    policy = task.policy
    prompts = [p for p in task.grid_prompts for _ in range(per_prompt)]
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(args.eval_seed))
    with policy.nfe_paused():
        x0 = sample_ode(policy, noise, policy.sigmas(args.eval_steps, args.shift), policy.encode_prompts(prompts),
                        solver=args.eval_solver)
    save_grid(policy.decode(x0), path, nrow=per_prompt)
