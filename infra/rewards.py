"""The image rewards: programmatic ones for the built-in image tasks, and learned human-preference models.

A reward is a callable `(samples, prompts) -> (B,) float tensor`; `get_reward` builds one by name, or a weighted sum.
- `toy_mode` (toy2d, common.py): closeness to the ring mode the prompt asks for.
- `mean_color` (tiny-flux): closeness of the image's mean colour to the colour the prompt names.
- `geneval` (shapes): the fraction of the prompt's GenEval-style checks that pass (infra/shapes.py).
- `pickscore`, `hpsv2`, `clip`, `imagereward`: learned models whose weights are never downloaded at run time: each
  loads from `--reward-dir` (default $FLOWRL_REWARDS, else ~/.cache/flowrl/rewards) and names what is missing.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import parse_toy_prompt, toy_mode_reward
from infra.attention import AttentionShape

COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
          "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
          "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5), "gray": (0.5, 0.5, 0.5), "pink": (1.0, 0.75, 0.8)}


def prompt_color(prompt: str) -> tuple[float, float, float]:
    """The RGB of the colour a mean_color prompt ends in ('a photo of orange')."""
    words = prompt.split()
    if not words or words[-1] not in COLORS:
        raise ValueError(f"mean_color prompts end in one of {sorted(COLORS)}; got {prompt!r}")
    return COLORS[words[-1]]


def mean_color_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """tiny-flux: `1 - |mean RGB - colour named by the prompt| / sqrt(3)`, in [0, 1]. Prompts end in a colour."""
    target = torch.tensor([prompt_color(p) for p in prompts], device=images.device)
    return 1 - (images.float().mean(dim=(2, 3)) - target).norm(dim=-1) / math.sqrt(3)


def geneval_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """shapes: the fraction of the prompt's GenEval-style checks (colour, shape, count, position) that pass."""
    from infra import shapes
    return shapes.check(images, prompts)["score"]


# ------------------------------------------------------------------------------------------------------
# Learned preference models (pip install -r requirements-rewards.txt). Weights are never downloaded at run time:
# each loads from `--reward-dir` (default $FLOWRL_REWARDS, else ~/.cache/flowrl/rewards) and names what is missing.

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [0, 1] (uint8 in [0, 255] also accepted) -> CLIP pixels: clamped and
    quantised to 8 bits as a saved image would be (Flow-GRPO scores saved images), the short side resized to
    `size` (bicubic, antialiased), centre-cropped, normalised with the OpenAI mean and std (CLIP, PickScore, HPS)."""
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    images = (images.clamp(0, 1) * 255).round() / 255
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    images = F.interpolate(images, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                           align_corners=False, antialias=True)
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    images = images[..., top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class CLIPScorer(nn.Module):
    """Cosine similarity of a CLIP model's projected image and text embeddings, optionally times the model's
    learned logit scale, divided by `divide`:
    - CLIP score (openai/clip-vit-large-patch14): cos.
    - PickScore (yuvalkirstain/PickScore_v1, a fine-tuned CLIP-H): logit_scale.exp() * cos = 100 cos, ~18-24;
      Flow-GRPO trains on PickScore / 26.
    transformers 5 returns output objects from get_*_features: the projected embedding is `.pooler_output`."""

    def __init__(self, model, tokenizer, logit_scaled: bool = False, divide: float = 1.0):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.logit_scaled, self.divide = logit_scaled, divide
        self.image_size = model.config.vision_config.image_size

    def attention_shapes(self) -> list[AttentionShape]:
        """The attention calls of its two towers (fp32): the image's patches and class token, the text's 77 tokens
        under a causal mask; for infra/attention.py's kernel check. CLIP-L/14: 16 heads x 64 over 257 tokens;
        CLIP-H/14 (PickScore) 16 x 80."""
        vision, text = self.model.config.vision_config, self.model.config.text_config
        return [AttentionShape(vision.num_attention_heads, vision.hidden_size // vision.num_attention_heads,
                               (vision.image_size // vision.patch_size) ** 2 + 1),
                AttentionShape(text.num_attention_heads, text.hidden_size // text.num_attention_heads,
                               text.max_position_embeddings, mask="causal")]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device, dtype = self.model.logit_scale.device, self.model.visual_projection.weight.dtype
        pixels = clip_preprocess(images.to(device), self.image_size).to(dtype)
        image = self.model.get_image_features(pixel_values=pixels).pooler_output
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = self.model.get_text_features(**tokens.to(device)).pooler_output
        score = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)
        if self.logit_scaled:
            score = self.model.logit_scale.exp().float() * score
        return score / self.divide


class HPSScorer(nn.Module):
    """HPSv2 / HPSv2.1: an open_clip ViT-H-14 whose weights were fine-tuned on human preferences. The score is the
    cosine of the normalised image and text features (no logit scale), ~0.25-0.40. Built with open-clip-torch
    (`create_model('ViT-H-14', pretrained=None)` has the checkpoint's exact state-dict keys and shapes), not
    with the unmaintained `hpsv2` package, which pins old pytest and protobuf and lacks its own vocabulary file."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else \
            model.visual.image_size

    def attention_shapes(self) -> list[AttentionShape]:
        """open_clip's towers (torch's MultiheadAttention, fp32): ViT-H-14 is 16 heads x 80 over 257 tokens, its text
        16 x 64 over 77 under a causal mask."""
        image, text = self.model.visual.transformer.resblocks[0].attn, self.model.transformer.resblocks[0].attn
        grid = self.model.visual.grid_size
        return [AttentionShape(image.num_heads, image.head_dim, grid[0] * grid[1] + 1),
                AttentionShape(text.num_heads, text.head_dim, self.model.context_length, mask="causal")]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        image = self.model.encode_image(clip_preprocess(images.to(device), self.image_size), normalize=True)
        text = self.model.encode_text(self.tokenizer(prompts).to(device), normalize=True)
        return (image.float() * text.float()).sum(-1)


def reward_dir(path: Optional[str] = None) -> Path:
    return Path(path or os.environ.get("FLOWRL_REWARDS") or Path.home() / ".cache" / "flowrl" / "rewards")


def _need(path: Path, what: str, fetch: str) -> Path:
    if not path.exists():
        raise SystemExit(f"{what}: {path} not found. Fetch it on a machine with network access and copy it here:\n"
                         f"    {fetch}\n(or point --reward-dir / $FLOWRL_REWARDS at the directory that holds it)")
    return path


def load_clip_score(root: Path, device="cpu") -> CLIPScorer:
    from transformers import CLIPModel, CLIPTokenizer
    d = _need(root / "clip-vit-large-patch14", "CLIP score weights",
              "hf download openai/clip-vit-large-patch14 --local-dir <reward-dir>/clip-vit-large-patch14")
    return CLIPScorer(CLIPModel.from_pretrained(d, local_files_only=True).to(device),
                      CLIPTokenizer.from_pretrained(d, local_files_only=True))


def load_pickscore(root: Path, device="cpu") -> CLIPScorer:
    from transformers import CLIPModel, CLIPTokenizer
    model = _need(root / "PickScore_v1", "PickScore weights",
                  "hf download yuvalkirstain/PickScore_v1 --local-dir <reward-dir>/PickScore_v1")
    processor = _need(root / "CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore's tokenizer (the CLIP-H processor files)",
                      "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*.json' '*.txt' "
                      "--local-dir <reward-dir>/CLIP-ViT-H-14-laion2B-s32B-b79K")
    return CLIPScorer(CLIPModel.from_pretrained(model, local_files_only=True).to(device),
                      CLIPTokenizer.from_pretrained(processor, local_files_only=True), logit_scaled=True, divide=26.0)


def load_hpsv21(root: Path, device="cpu") -> HPSScorer:
    try:
        import open_clip
    except ImportError as e:
        raise SystemExit(f"the hpsv2 reward needs open-clip-torch (pip install -r requirements-rewards.txt): {e}")
    ckpt = _need(root / "HPS_v2.1_compressed.pt", "HPSv2.1 weights",
                 "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir <reward-dir>")
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    return HPSScorer(model.to(device), open_clip.get_tokenizer("ViT-H-14"))


def load_image_reward(root: Path, device="cpu"):
    try:
        import ImageReward
    except Exception as e:  # the package fails on transformers 5 at import (apply_chunking_to_forward)
        raise SystemExit(f"the imagereward reward needs the `image-reward` package, which does not import beside "
                         f"transformers 5 ({type(e).__name__}: {e}). Install it in a separate environment with "
                         f"transformers<4.45, or train on hpsv2 / pickscore / clip instead.") from None
    ckpt = _need(root / "ImageReward.pt", "ImageReward weights",
                 "hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir <reward-dir>")
    model = ImageReward.load(str(ckpt), device=device, med_config=str(root / "med_config.json"))

    def score(images, prompts):
        from PIL import Image
        pil = [Image.fromarray((im.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype("uint8"))
               for im in images]
        return torch.tensor([float(model.score(p, im)) for p, im in zip(prompts, pil)])
    return score


LEARNED_REWARDS: dict[str, Callable] = {"hpsv2": load_hpsv21, "pickscore": load_pickscore, "clip": load_clip_score,
                                        "imagereward": load_image_reward}
# What each of them reads under --reward-dir: the weights a checkpoint fingerprints (reward_digest)
REWARD_FILES = {"hpsv2": ("HPS_v2.1_compressed.pt",), "pickscore": ("PickScore_v1", "CLIP-ViT-H-14-laion2B-s32B-b79K"),
                "clip": ("clip-vit-large-patch14",), "imagereward": ("ImageReward.pt", "med_config.json")}


def spec_names(spec: Optional[str]) -> list[str]:
    """The reward names of a --reward spec ("hpsv2:1,clip:0.5" -> ["hpsv2", "clip"]), as `get_reward` reads them."""
    return [item.strip().partition(":")[0] for item in (spec or "").split(",")]


def reward_digest(spec: Optional[str], root: Optional[str] = None) -> Optional[str]:
    """A fingerprint of the learned reward weights `spec` ("pickscore", "hpsv2:1,clip:0.5") reads from --reward-dir:
    each file's name, size and the SHA-256 of its first and last MiB and of a 4 KiB page at every MiB between
    (hashing GBs of weights whole would take a minute): other weights of the same size differ in every page of a
    tensor they change, so only a change to tensors under a MiB in the middle of a file goes unseen. Hidden files
    (`hf download`'s .cache, its timestamps) are left out. None without a learned reward (or without a reward: a
    registered model's own), or while one is missing (loading it says what to fetch)."""
    names = [name for name in spec_names(spec) if name in REWARD_FILES]
    root, digest = reward_dir(root), hashlib.sha256()
    for name in names:
        for part in REWARD_FILES[name]:
            path = root / part
            if not path.exists():
                return None
            files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not any(
                p.startswith(".") for p in f.relative_to(path).parts))
            for f in files:
                size = f.stat().st_size
                digest.update(f"{name} {f.relative_to(root)} {size}\n".encode())
                with open(f, "rb") as data:
                    for start in (0, *range(2 ** 20, size - 2 ** 20, 2 ** 20)):
                        data.seek(start)
                        digest.update(data.read(2 ** 20 if start == 0 else 2 ** 12))
                    data.seek(max(size - 2 ** 20, 0))
                    digest.update(data.read(2 ** 20))
    return digest.hexdigest() if names else None


REWARDS: dict[str, Callable] = {"toy_mode": toy_mode_reward, "mean_color": mean_color_reward,
                                "geneval": geneval_reward}  # the programmatic rewards: no weights to load
BUILT_IN_REWARDS = frozenset(REWARDS)  # the others in REWARDS are registered (register_reward)


def _shapes_prompt(prompt: str):
    from infra import shapes
    return shapes.parse_prompt(prompt)


# What the built-in programmatic rewards can score: toy_mode scores toy2d's 2D points, the others images; each
# reads its prompts with a parser that raises ValueError on a prompt it cannot score. Checked with the flags.
POINT_REWARDS = {"toy_mode"}
PROMPT_PARSERS: dict[str, Callable[[str], object]] = {"toy_mode": parse_toy_prompt, "mean_color": prompt_color,
                                                      "geneval": _shapes_prompt}


def register_reward(name: str, fn: Callable):
    """Make `--reward name` score with `fn(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`, for every script."""
    REWARDS[name] = fn


def reward_names() -> tuple[str, ...]:
    """Every name `--reward` takes."""
    return (*REWARDS, *LEARNED_REWARDS)


def get_reward(spec: str, device="cpu", root: Optional[str] = None) -> Callable:
    """A reward by name ("toy_mode", "pickscore"), or a weighted sum of several ("hpsv2:1,clip:0.5"): the rewards are
    summed before the advantages, as Flow-GRPO does. Learned rewards load from `root` (--reward-dir)."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:  # before loading a model: a typo must not cost a model load first
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward weight must be a number: {item!r} (use name:weight)") from None
        if name in REWARDS:
            parts.append((weight, REWARDS[name]))
        elif name in LEARNED_REWARDS:
            parts.append((weight, LEARNED_REWARDS[name](reward_dir(root), device)))
        else:
            raise ValueError(f"unknown reward {name!r}; available: {', '.join(reward_names())}")
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    return WeightedReward(parts)


class WeightedReward:
    """`sum_i w_i r_i(samples, prompts)`: several rewards summed before the advantages."""

    def __init__(self, parts: list[tuple[float, Callable]]):
        self.parts = parts

    def __call__(self, samples, prompts):
        return sum(w * fn(samples, prompts).float().to(samples.device) for w, fn in self.parts)

    def attention_shapes(self) -> list[AttentionShape]:
        return [shape for _, fn in self.parts for shape in attention_shapes(fn)]


class CheckedReward:
    """A reward whose every output is checked to be one number per sample: a (B,) tensor (a (B, 1) one, as reward
    models' heads return, is flattened; integer or boolean scores become float). Anything else, from a registered
    reward or model, stops the run with a line naming the reward, not with a shape error deep inside a method."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name  # as the messages name it: "reward 'pickscore'"

    def __call__(self, samples, prompts) -> torch.Tensor:
        out, n = self.fn(samples, prompts), len(prompts)
        what = f"{self.name} returned"
        if not torch.is_tensor(out):
            raise SystemExit(f"{what} a {type(out).__name__}; a reward returns a tensor of one number per sample, "
                             f"shape ({n},)")
        if tuple(out.shape) not in ((n,), (n, 1)):
            raise SystemExit(f"{what} shape {tuple(out.shape)} for {n} samples; a reward returns one number per "
                             f"sample, shape ({n},)")
        if out.is_complex():
            raise SystemExit(f"{what} complex numbers; a reward is real")
        return out.reshape(n).float()

    def attention_shapes(self) -> list[AttentionShape]:
        return attention_shapes(self.fn)


def attention_shapes(reward: Callable) -> list[AttentionShape]:
    """The attention calls a reward makes (none for a programmatic reward), for the kernel check."""
    return list(dict.fromkeys(reward.attention_shapes())) if hasattr(reward, "attention_shapes") else []
