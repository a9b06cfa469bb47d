"""The tasks behind `--model`: toy2d, tiny-flux, shapes, FLUX.1-dev, SD3.5, and models you register.

`load_task(args)` is what every script calls: a `Task` (the model with its prompts, reward and quality metrics).
Also here: the evaluation protocol every run reports (`evaluate`), prompt files (`read_prompts`) and the sample
grids image runs write before and after training.

A reward is a callable `(decoded_samples, prompts) -> (B,) float tensor`: the toy's is in common.py, the image
rewards and `get_reward` (by name, or a weighted sum) in infra/rewards.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from common import TOY_NUM_MODES, Policy, Toy2DPolicy, check_finite, sample_ode, toy_on_manifold
from infra.diffusers_models import build_tiny_flux
from infra.progress import LOG_INTERVAL, Progress
from infra.rewards import BUILT_IN_REWARDS, COLORS, REWARDS, CheckedReward, get_reward, spec_names


@dataclass
class Task:
    """A model with its prompts, its training reward and the quality metrics evaluation reports."""
    policy: Policy
    reward_fn: Callable
    train_prompts: list[str]
    eval_prompts: list[str]
    metrics: dict[str, Callable] = field(default_factory=dict)  # name -> (samples, prompts) -> (B,) per-sample
    grid_prompts: list[str] = field(default_factory=list)  # image tasks: rows of samples_{before,after}.png


@torch.no_grad()
def evaluate(task: Task, args, keep_samples: bool = False, log: Optional[Callable] = None,
             log_interval: float = LOG_INTERVAL):
    """The evaluation protocol: the plain deterministic ODE (`--eval-solver`, `--eval-steps`) on the eval prompts
    from fixed noise (`--eval-seed`: the same noise before and after training). Returns the mean reward and the mean
    of each task metric (and, with `keep_samples`, the decoded samples and their prompts). NFE spent here is not
    counted. Progress: a bar on a terminal; in a log (no terminal), a `log` line every `log_interval` seconds."""
    policy = task.policy
    prompts = [p for p in task.eval_prompts for _ in range(args.eval_samples_per_prompt)]
    generator = torch.Generator().manual_seed(args.eval_seed)
    noise = policy.initial_noise(len(prompts), generator)
    sigmas = policy.sigmas(args.eval_steps, args.shift)
    # Several processes split the samples: each takes `share` in a row (the last process's tail padded with the last
    # sample, so that every process makes the same model calls, as FSDP needs), then the results are gathered.
    acc = policy.accelerator
    world, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    n = len(prompts)
    share = -(-n // world)
    mine = [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]
    rewards, metrics, kept = [], {k: [] for k in task.metrics}, []
    chunk = args.eval_batch_size or share
    # a bar on a terminal; in a job's log a line a minute (a FLUX evaluation can take many minutes)
    progress = Progress(share, f"evaluation, {args.eval_steps} steps" + (" (process 0's share)" if world > 1 else ""),
                        "sample", log, log_interval, quiet=rank != 0)
    with policy.nfe_paused():
        for i in range(0, share, chunk):
            rows = mine[i:i + chunk]
            p = [prompts[r] for r in rows]
            x0 = sample_ode(policy, noise[rows], sigmas, policy.encode_prompts(p), solver=args.eval_solver)
            samples = policy.decode(x0)
            rewards.append(task.reward_fn(samples, p).float())
            for k, fn in task.metrics.items():
                metrics[k].append(fn(samples, p).float())
            if keep_samples:
                kept.append(samples.float())
            progress.update(len(rows))
    progress.close()

    def everyone(parts: list[torch.Tensor]) -> torch.Tensor:  # every process's rows in sample order
        local = torch.cat(parts)
        return local.cpu() if world == 1 else acc.gather(local.to(acc.device).contiguous()).cpu()[:n]

    rewards = everyone(rewards)
    check_finite("evaluation reward", rewards)
    out = {"reward": rewards.mean().item()}
    out.update({k: everyone(v).mean().item() for k, v in metrics.items()})
    return (out, everyone(kept), prompts) if keep_samples else out


MODELS = ("toy2d", "tiny-flux", "shapes", "flux", "sd3")  # flux / sd3: FLUX.1-dev / SD3.5 from --pretrained

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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise SystemExit(f"prompt file {path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
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


def toy2d_policy(keep_reference: bool = True, device="cpu", log=print) -> Toy2DPolicy:
    """toy2d's policy around its base model (pretrained on first use, then loaded from the cache)."""
    from infra.pretrained import TOY_BASE_CONFIG, pretrain_toy_base
    return Toy2DPolicy(pretrain_toy_base(TOY_BASE_CONFIG, log).to(device), keep_reference)


def load_task(args, keep_reference: bool, device="cpu", log=print) -> Task:
    """The model named by `--model` with its default prompts, training reward and quality metrics.
    `--train-prompts` / `--eval-prompts` files replace the default prompt sets (`run_prompts`)."""
    prompts = run_prompts(args)
    train, evals = prompts["train"], prompts["eval"]
    task = _build(args, keep_reference, device, log, train, evals)
    name = reward_spec(args)
    task.reward_fn = CheckedReward(task.reward_fn, f"reward {name!r}" if name else
                                   f"the reward of --model {args.model}")
    if args.gradient_checkpointing:
        if not hasattr(task.policy, "enable_gradient_checkpointing"):
            raise SystemExit(f"--gradient-checkpointing needs a diffusers transformer; --model {args.model} has none")
        task.policy.enable_gradient_checkpointing()
    if args.compile:
        if not hasattr(task.policy, "compile_blocks"):
            raise SystemExit(f"--compile compiles a diffusers transformer's blocks; --model {args.model} has none")
        task.policy.compile_blocks()
    if getattr(args, "merge_lora_rollouts", False) and not task.policy._has_adapters():  # (built-in models: parse)
        raise SystemExit(f"--merge-lora-rollouts needs LoRA adapters to merge; the policy of --model {args.model} "
                         f"has none (--lora-rank {args.lora_rank})")
    if train:
        task.train_prompts = train
    if evals:
        task.eval_prompts = evals
    log(f"prompts: {len(task.train_prompts)} train, {len(task.eval_prompts)} eval")
    return task


DEFAULT_REWARDS = {"toy2d": "toy_mode", "tiny-flux": "mean_color", "shapes": "geneval", "flux": "pickscore",
                   "sd3": "pickscore"}


def reward_spec(args) -> Optional[str]:
    """The --reward a run trains on: the flag, else its model's default (None for a model registered without one)."""
    return args.reward or DEFAULT_REWARDS.get(args.model)


def default_prompts(model: str) -> Optional[tuple[list[str], list[str]]]:
    """A built-in model's (train, evaluation) prompts; None for FLUX and SD3, which take prompt files."""
    if model == "toy2d":
        prompts = [f"mode {i}" for i in range(TOY_NUM_MODES)]
        return prompts, prompts
    if model == "tiny-flux":
        colors = [f"a photo of {c}" for c in COLORS]
        return colors[:8], colors[8:]
    if model == "shapes":
        from infra import shapes
        return shapes.split_prompts(shapes.SHAPES_BASE_CONFIG["eval_fraction"], shapes.SHAPES_BASE_CONFIG["split_seed"])
    return None


def run_prompts(args) -> dict[str, Optional[list[str]]]:
    """The train and evaluation prompts of a run of `args`, read without loading anything (the resume check compares
    them with its checkpoint's; `load_task` gives them to the task): the prompt files, else the built-in model's,
    else FLUX / SD3 evaluate on the train file; None where a registered model's builder chooses them."""
    chosen = {"train": read_prompts(args.train_prompts) if args.train_prompts else None,
              "eval": read_prompts(args.eval_prompts) if args.eval_prompts else None}
    defaults = default_prompts(args.model) if args.model in DEFAULT_REWARDS else None
    if defaults:
        chosen = {"train": chosen["train"] or defaults[0], "eval": chosen["eval"] or defaults[1]}
    elif args.model in ("flux", "sd3"):
        chosen["eval"] = chosen["eval"] or chosen["train"]
    return chosen


def _build(args, keep_reference: bool, device="cpu", log=print, train: Optional[list[str]] = None,
           evals: Optional[list[str]] = None) -> Task:
    """The model's task; `train` / `evals` are the run's prompts (`run_prompts`), which FLUX and SD3 embed as they
    load."""
    if args.model in CUSTOM_MODELS:
        return CUSTOM_MODELS[args.model](args, keep_reference, device, log)
    if args.model not in DEFAULT_REWARDS:
        raise ValueError(f"unknown model {args.model!r}; available: {', '.join(MODELS + tuple(CUSTOM_MODELS))}")
    # The reward first: a missing reward model (or its package) stops the run before minutes of model loading
    reward = get_reward(reward_spec(args), device, args.reward_dir)
    probe_registered_rewards(args, train or [], device)
    if args.model == "toy2d":
        return Task(toy2d_policy(keep_reference, device, log), reward, *default_prompts("toy2d"),
                    {"on_manifold": toy_on_manifold})
    if args.model == "tiny-flux":
        policy = build_tiny_flux(resolution=args.resolution, guidance_scale=args.guidance_scale,
                                 lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, keep_reference=keep_reference,
                                 device=device, seed=args.seed)
        return Task(policy, reward, *default_prompts("tiny-flux"))
    if args.model == "shapes":
        from infra import shapes
        policy = shapes.build_shapes_flux(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                   keep_reference=keep_reference, device=device, log=log)
        return Task(policy, reward, *default_prompts("shapes"),
                    {"accuracy": lambda x, p: shapes.check(x, p)["accuracy"],
                     "quality": lambda x, p: shapes.check(x, p)["quality"]}, grid_prompts=shapes.grid_prompts())
    from infra.pipelines import build_pipeline_policy  # flux, sd3
    if train is None:
        raise SystemExit(f"--model {args.model} needs --train-prompts <file.txt|file.jsonl> (and usually "
                         f"--eval-prompts)")
    policy = build_pipeline_policy(args, train, evals, keep_reference, device, log)
    return Task(policy, reward, train, evals, grid_prompts=evals[:4])  # samples_{before,after}.png: 4 eval prompts


def probe_registered_rewards(args, prompts: list[str], device="cpu"):
    """A reward of your own (`register_reward`) is called once, before the model loads, on two random samples of what
    the model makes (toy2d: 2D points; the others: images in [0, 1] at the run's resolution) with two of the run's
    prompts: one that returns something else than one number per sample (CheckedReward) stops the run now, not after
    minutes of loading and the first evaluation batch. The built-in rewards are checked with the flags."""
    registered = [name for name in spec_names(reward_spec(args)) if name in REWARDS and name not in BUILT_IN_REWARDS]
    if not registered or not prompts:
        return
    generator = torch.Generator().manual_seed(0)
    size = args.resolution
    if args.model == "shapes":  # (its base makes 32 px images, whatever --resolution says)
        from infra import shapes
        size = shapes.IMAGE_SIZE
    samples = (torch.randn(2, 2, generator=generator) if args.model == "toy2d" else
               torch.rand(2, 3, size, size, generator=generator)).to(device)
    what = "2D points" if args.model == "toy2d" else f"{size} px images"
    for name in registered:
        try:
            with torch.no_grad():
                CheckedReward(REWARDS[name], f"reward {name!r}")(samples, (list(prompts) * 2)[:2])
        except SystemExit as e:
            raise SystemExit(f"{e} (called on 2 random {what} and 2 of the run's prompts, before the model loads)") \
                from None


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 4,
              labels: Optional[list[str]] = None):
    """Write (N, 3, H, W) images in [0, 1] as a PNG grid of `nrow` per row (nearest-neighbour upscaled, 2 px
    gutters); `labels`, one per row, are written in a strip above it (cut to the row's width)."""
    import numpy as np
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    pad, strip = 2, LABEL_HEIGHT if labels else 0
    pitch = strip + h * scale + pad
    grid = torch.full((3, rows * pitch + pad, nrow * (w * scale + pad) + pad), 0.5)
    for i, img in enumerate(images.float().clamp(0, 1).cpu()):
        r, c = divmod(i, nrow)
        up = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        y, x = pad + r * pitch + strip, pad + c * (w * scale + pad)
        grid[:, y:y + h * scale, x:x + w * scale] = up
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for r, text in enumerate(labels or []):
        while len(text) > 3 and draw.textlength(text) > picture.width - 2 * pad:
            text = text[:-4] + "..."
        draw.text((pad + 1, pad + r * pitch), text, fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


LABEL_HEIGHT = 13  # px: the strip above each row of a sample grid that names its prompt


@torch.no_grad()
def sample_grid(task: Task, args, path: Optional[str | Path], per_prompt: int = 4, tile: int = 512):
    """Image tasks: a PNG of `task.grid_prompts` (one row each, named above it) x `per_prompt` fixed seeds, sampled
    with the evaluation ODE, so the grids written before and after training show the same prompts and noise.
    Sampled and decoded in `--eval-batch-size` chunks; images larger than `tile` pixels are shrunk to it, small ones
    enlarged toward 128. Every process samples (a sharded model needs them all); the one given a `path` writes it."""
    policy = task.policy
    prompts = [p for p in task.grid_prompts for _ in range(per_prompt)]
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(args.eval_seed))
    sigmas, chunk, images = policy.sigmas(args.eval_steps, args.shift), args.eval_batch_size or len(prompts), []
    with policy.nfe_paused():
        for i in range(0, len(prompts), chunk):
            x0 = sample_ode(policy, noise[i:i + chunk], sigmas, policy.encode_prompts(prompts[i:i + chunk]),
                            solver=args.eval_solver)
            if path is not None:  # (the VAE is not sharded: the other processes need not decode)
                images.append(policy.decode(x0).float().cpu())
    if path is not None:
        images = torch.cat(images)
        if max(images.shape[-2:]) > tile:  # FLUX at 720 px: a 4 x 4 grid of 512 px tiles, not a 2,900 px image
            images = torch.nn.functional.interpolate(images, scale_factor=tile / max(images.shape[-2:]), mode="area")
        save_grid(images, path, nrow=per_prompt, scale=max(1, 128 // max(images.shape[-2:])),
                  labels=task.grid_prompts)
