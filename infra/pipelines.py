"""FLUX.1-dev (`--model flux`) and SD3.5 (`--model sd3`) from a diffusers directory on disk (`--pretrained`), offline.

The pipeline's own text encoders embed every train and eval prompt once into a memory-mapped disk cache
(`CachedTextEncoder`) and are released (T5-XXL alone is 9.5 GB in bf16); once the cache exists they are not even
loaded. The transformer is held in the mixed-precision dtype (bf16) with fp32 LoRA adapters, or in fp32 for full
fine-tuning (AdamW needs fp32 master weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from common import make_sigmas
from infra import attention
from infra.pretrained import cached_model_path
from infra.progress import Progress
from infra.diffusers_models import FluxPolicy, SD3Policy, flux_image_seq_len, pipeline_class, sd3_sigmas


class CachedTextEncoder:
    """Prompt embeddings computed once by a pipeline's own text encoders, which are then released (T5-XXL alone
    is 9.5 GB in bf16). Same interface as HashTextEncoder: `(prompts) -> (prompt_embeds, pooled_prompt_embeds)`.

    They live on disk as raw arrays (`embeds.bin` (N, T, D), `pooled.bin` (N, D_pooled), `meta.json` with the
    prompts), memory-mapped: a batch reads only its own prompts' rows, so a prompt set costs disk, not RAM (4 MB
    per prompt at FLUX's 512 T5 tokens: 100 GB for 25k prompts), and the processes of a node share the OS page
    cache. Only the prompts embedded at start-up exist: all of --train-prompts and --eval-prompts (and "", the
    unconditional branch of classifier-free guidance)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        dtype = getattr(torch, meta["dtype"])
        self.prompts = meta["prompts"]
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.embeds = self._mapped(directory / "embeds.bin", meta["embeds_shape"], dtype)
        self.pooled = self._mapped(directory / "pooled.bin", meta["pooled_shape"], dtype)
        self.seq_len, self.dim, self.pooled_dim = self.embeds.shape[1], self.embeds.shape[2], self.pooled.shape[1]

    @staticmethod
    def _mapped(path: Path, shape: list[int], dtype) -> torch.Tensor:
        # shared=False: a private, copy-on-write mapping; pages are read from disk when indexed
        return torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=dtype).view(shape)

    @staticmethod
    def write(directory: Path, prompts: list[str], encode: Callable[[list[str]], tuple], batch: int = 32,
              log: Optional[Callable] = None):
        """Embed `prompts` in batches with `encode(prompts) -> (embeds (B, T, D), pooled (B, D_pooled))`, each batch
        written straight into the files (never the whole set in memory), into a temporary directory renamed into
        place at the end: a crashed or concurrent writer never leaves a half cache behind. Progress: a bar, or
        `log` lines in a job's log (T5-XXL embeds tens of thousands of prompts in minutes)."""
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = None
        progress = Progress(len(prompts), "embedding the prompts", "prompt", log)
        for i in range(0, len(prompts), batch):
            embeds, pooled = (t.detach().cpu().contiguous() for t in encode(prompts[i:i + batch]))
            finite = embeds.isfinite().flatten(1).all(1) & pooled.isfinite().flatten(1).all(1)
            if not finite.all():  # a cache is read by every later run: never write a broken one
                shutil.rmtree(tmp, ignore_errors=True)
                bad = [p for p, ok in zip(prompts[i:i + batch], finite.tolist()) if not ok]
                raise SystemExit(f"the text encoders returned non-finite embeddings for {len(bad)} of the prompts "
                                 f"{i + 1}-{i + len(embeds)} (the first: {bad[0]!r}); nothing was cached. Likely "
                                 f"causes: a text encoder overflowing in its dtype ({embeds.dtype}; T5 is prone to "
                                 f"overflow in fp16: use --mixed-precision bf16), or the attention kernel (try "
                                 f"--attention-backend math)")
            if files is None:  # the shapes are known after the first batch
                meta = {"prompts": prompts, "dtype": str(embeds.dtype).removeprefix("torch."),
                        "embeds_shape": [len(prompts), *embeds.shape[1:]],
                        "pooled_shape": [len(prompts), *pooled.shape[1:]]}
                files = [torch.from_file(str(tmp / name), shared=True, size=math.prod(meta[key]),
                                         dtype=embeds.dtype).view(meta[key])
                         for name, key in (("embeds.bin", "embeds_shape"), ("pooled.bin", "pooled_shape"))]
            files[0][i:i + len(embeds)] = embeds
            files[1][i:i + len(pooled)] = pooled
            progress.update(len(embeds))
        progress.close()
        del files  # unmapped: the data is in the files
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)

    def __call__(self, prompts: list[str]):
        try:
            rows = [self.index[p] for p in prompts]
        except KeyError as e:
            raise KeyError(f"prompt {e.args[0]!r} was not embedded at start-up: only --train-prompts and "
                           f"--eval-prompts are") from None
        return self.embeds[rows], self.pooled[rows]  # copies of just these rows

    def uncond(self):
        """The empty prompt's embeddings (1, T, D) and (1, D_pooled): CFG's unconditional branch."""
        return self([""])


PIPELINES = {  # --model -> (diffusers pipeline, policy, the command that fetches the weights)
    "flux": ("FluxPipeline", FluxPolicy, "hf download black-forest-labs/FLUX.1-dev --local-dir <dir>"),
    "sd3": ("StableDiffusion3Pipeline", SD3Policy,
            "hf download stabilityai/stable-diffusion-3.5-medium --local-dir <dir>"),
}
TEXT_ENCODERS = {"flux": ("text_encoder", "text_encoder_2"),  # CLIP-L, T5-XXL
                 "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}  # CLIP-L, CLIP-G, T5-XXL


def local_main_process_first():
    """In a multi-process run the node's main process runs the block first and the others after it (to find what
    it wrote); in a single process, nothing."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState
        return PartialState().local_main_process_first()
    return contextlib.nullcontext()


def prompt_cache_dir(model: str, prompts: list[str], max_sequence_length: int, source: str,
                     dtype: torch.dtype) -> Path:
    """$FLOWRL_CACHE/<model>-prompt-embeds-<hash>/, keyed by the weights' source, the sequence length, the prompt
    set and the dtype the text encoders ran in (T5-XXL's embeddings in fp16 are not its embeddings in bf16)."""
    key = {"model": model, "source": source, "max_sequence_length": max_sequence_length,
           "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
           "dtype": str(dtype).removeprefix("torch.")}
    return cached_model_path(f"{model}-prompt-embeds", key).with_suffix("")


def pipeline_encoder(pipe, model: str, max_sequence_length: int, device):
    """`prompts -> (embeds, pooled)` with the pipeline's own `encode_prompt`. FLUX: T5 sequence (T, 4096) +
    CLIP-L pooled (768); SD3: [CLIP-L, CLIP-G | T5] sequence (77 + T, 4096) + both CLIPs' pooled (2048)."""
    @torch.no_grad()
    def encode(prompts):
        if model == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device,
                                                   max_sequence_length=max_sequence_length)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=max_sequence_length)
        return embeds, pooled
    return encode


def text_encoder_shape(encoder, max_sequence_length: int) -> attention.AttentionShape:
    """The attention calls of a pipeline's text encoder, for infra/attention.py's check: T5 (it has `d_kv`) over
    `max_sequence_length` tokens with its additive position bias; CLIP over its 77 positions, causal."""
    cfg = encoder.config
    if hasattr(cfg, "d_kv"):
        return attention.AttentionShape(cfg.num_heads, cfg.d_kv, max_sequence_length, mask="bias")
    return attention.AttentionShape(cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads,
                                    cfg.max_position_embeddings, mask="causal")


def pipeline_sigmas(args, num_steps: int) -> Optional[torch.Tensor]:
    """The N-step sampling schedule of --model flux / sd3 (the loaded policy's `sigmas(N, --shift)`), read from the
    --pretrained directory's config files without loading a weight, so that DGPO checks its timestep clip as the
    flags are parsed, not after minutes of loading. FLUX's dynamic shift needs the packed image sequence length,
    (resolution / the VAE's factor / 2)^2; SD3's schedule is its scheduler config's. None for the other models, a
    hub id, or config files that do not read (the load then says what is wrong)."""
    path = Path(args.pretrained or "").expanduser()
    if args.model not in PIPELINES or not (path / "model_index.json").is_file():
        return None
    try:
        if args.model == "sd3":
            return sd3_sigmas(json.loads((path / "scheduler" / "scheduler_config.json").read_text()), num_steps,
                              args.shift)
        if args.shift is not None:  # FLUX with a static shift (DanceGRPO, G2RPO)
            return make_sigmas(num_steps, shift=args.shift)
        levels = len(json.loads((path / "vae" / "config.json").read_text())["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return make_sigmas(num_steps, image_seq_len=flux_image_seq_len(args.resolution, levels))


def build_pipeline_policy(args, train: list[str], evals: list[str], keep_reference: bool, device="cpu",
                          log=print):
    """FLUX.1-dev (`--model flux`) or SD3.5 (`--model sd3`) from `--pretrained` (a diffusers directory, or a hub
    id already in the local cache). The text encoders embed the prompt set once into a memory-mapped disk cache
    (`CachedTextEncoder`) and are released; once the cache exists they are not even loaded. The transformer is held
    in the mixed-precision dtype (bf16) with fp32 LoRA adapters, or in fp32 for full fine-tuning (AdamW needs fp32
    master weights)."""
    pipeline_name, policy_class, fetch = PIPELINES[args.model]
    fetch = f"{fetch}, then --pretrained <dir>"
    # parse_args checked --pretrained: given, and a pipeline directory if it is a path (~ expanded: a config file's
    # `pretrained: ~/weights/flux` reaches here unexpanded by any shell); else a hub id, looked up in the local cache
    source = Path(args.pretrained).expanduser()
    where = str(source) if source.exists() else args.pretrained
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    offline = source.exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    prompts = list(dict.fromkeys(train + evals + ([""] if args.model == "sd3" else [])))
    cache = prompt_cache_dir(args.model, prompts, args.max_sequence_length,
                             str(source.resolve()) if source.exists() else args.pretrained, dtype)
    encoders = TEXT_ENCODERS[args.model]

    def load(with_text_encoders: bool):
        log(f"loading {pipeline_name} from {where}" + ("" if with_text_encoders else " (no text encoders: the prompt "
                                                       "embeddings are cached)"))
        try:
            return pipeline_class(pipeline_name).from_pretrained(
                where, dtype=dtype, local_files_only=offline,
                **({} if with_text_encoders else {name: None for name in encoders}))
        except (OSError, ValueError, EnvironmentError) as e:
            raise SystemExit(f"could not load {pipeline_name} from {where!r} ({type(e).__name__}: {e}); "
                             f"{fetch}") from None

    # Without a cache, the node's main process loads the whole pipeline and embeds while the others wait; they
    # then find the cache. With one, every process loads the pipeline at once, without its text encoders.
    pipe = None
    with local_main_process_first():
        if not (cache / "meta.json").is_file():
            pipe = load(with_text_encoders=True)
            for name in encoders:
                getattr(pipe, name).to(device)
            attention.check_text_encoders(args.attention_backend, [text_encoder_shape(getattr(pipe, name),
                                                                                      args.max_sequence_length)
                                                                   for name in encoders], dtype, device, log)
            CachedTextEncoder.write(cache, prompts, pipeline_encoder(pipe, args.model, args.max_sequence_length,
                                                                     device), log=log)
            log(f"prompt embeddings: {len(prompts)} prompts embedded, cached in {cache}")
            for name in encoders:  # released
                setattr(pipe, name, None)
    if pipe is None:
        pipe = load(with_text_encoders=False)
        log(f"prompt embeddings: {len(prompts)} prompts from {cache}")
    text = CachedTextEncoder(cache)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    extra = {"scheduler_config": dict(pipe.scheduler.config)} if args.model == "sd3" else {}
    return policy_class(pipe.transformer, pipe.vae, text, resolution=args.resolution,
                        guidance_scale=args.guidance_scale, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        keep_reference=keep_reference, device=device, **extra)
