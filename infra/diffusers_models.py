"""FLUX.1-dev and SD3.5 as policies: diffusers transformers behind the `common.Policy` interface.

- `DiffusersPolicy`: what FLUX and SD3 share: LoRA through peft (or full fine-tuning with an optional frozen copy as
  the reference), a VAE decoded in chunks, prompt embeddings from a text encoder, and weights saved in the format
  `<Pipeline>.load_lora_weights` (LoRA) or `<Transformer>.from_pretrained` (full fine-tuning) reads.
- `FluxPolicy`: packed latents, RoPE ids, the guidance embedding (FLUX.1-dev is guidance-distilled: no CFG).
- `SD3Policy`: classifier-free guidance as the pipeline does it, the pipeline scheduler's own schedule.
- the tiny FLUX (`--model tiny-flux`): FLUX.1-dev's code path in diffusers' tiny test config with random weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from pathlib import Path
from typing import Optional

import torch

from common import Policy

# Reference LoRA targets for FLUX (DanceGRPO / Flow-GRPO): attention projections and both feed-forwards.
FLUX_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"]
# SD3 (Flow-GRPO's SD3.5-M LoRA, r 32, alpha 64): the joint attention's projections only.
SD3_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out"]
# The real transformers' configs (their transformer/config.json), for meta-device checks and memory estimates:
# FLUX.1-dev 11,901,408,320 parameters; SD3.5-Medium (MMDiT-X: dual attention in blocks 0-12, QK RMS norm) 2.24B.
FLUX_DEV_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
SD35_MEDIUM_TRANSFORMER_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                      caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                      pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                      qk_norm="rms_norm")


def pipeline_class(name: str):
    """`diffusers.<name>` (FluxPipeline, StableDiffusion3Pipeline). Its import imports transformers' image processors,
    which warn that torchvision is missing and to install it: the CPU torch of requirements.txt has no torchvision on
    the package index (docs/testing.md), and no image processor runs here. Those warnings are left out."""
    import diffusers
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return getattr(diffusers, name)
    finally:
        hf_logging.set_verbosity(level)


def transformer_blocks(net) -> list[torch.nn.Module]:
    """The transformer's blocks in call order: FLUX's double- then single-stream blocks, SD3's joint blocks."""
    return [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(net, name, [])]


def flux_pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> FLUX's packed (B, (H/2)(W/2), 4C), as `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def flux_image_ids(tokens_per_side: int) -> torch.Tensor:
    """FLUX's RoPE ids of the packed image tokens: (row, column) in channels 1 and 2, (tokens, 3)."""
    ids = torch.zeros(tokens_per_side, tokens_per_side, 3)
    ids[..., 1] += torch.arange(tokens_per_side)[:, None]
    ids[..., 2] += torch.arange(tokens_per_side)[None, :]
    return ids.reshape(-1, 3)


class HashTextEncoder:
    """A stand-in text encoder for the random-weight FLUX: each prompt maps to fixed pseudo-random
    embeddings seeded by a hash of its text. It has no semantics; it only gives every prompt its own
    `prompt_embeds` (T, D) and `pooled_prompt_embeds` (D_pooled), exactly the tensors FLUX consumes."""

    def __init__(self, seq_len: int, dim: int, pooled_dim: int):
        self.seq_len, self.dim, self.pooled_dim = seq_len, dim, pooled_dim

    def __call__(self, prompts: list[str]):
        embeds, pooled = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:15], 16))
            embeds.append(torch.randn(self.seq_len, self.dim, generator=g))
            pooled.append(torch.randn(self.pooled_dim, generator=g))
        return torch.stack(embeds), torch.stack(pooled)


class DiffusersPolicy(Policy):
    """What FLUX and SD3 share: a diffusers transformer (LoRA through peft at `lora_targets`, or full fine-tuning
    with an optional frozen copy as the reference), a VAE decoded in chunks, a prompt encoder, and weights saved
    in the format `<Pipeline>.load_lora_weights` reads. Subclasses give the sampler state (`sample_shape`), its
    conversion to VAE latents (`to_latents`) and the transformer call (`_forward`).

    The reference is the same transformer with its LoRA adapters disabled, or a frozen copy under full
    fine-tuning (only when asked for: it doubles the weights' memory).
    """

    pipeline_class = ""  # diffusers pipeline whose LoRA format save/load use
    lora_targets: list[str] = []

    def __init__(self, transformer, vae, text_encoder, resolution: int, guidance_scale: float, lora_rank: int = 0,
                 lora_alpha: Optional[float] = None, keep_reference: bool = False, device="cpu"):
        self.vae = vae.to(device).requires_grad_(False).eval()
        self.text_encoder = text_encoder
        self.guidance_scale = guidance_scale
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution, self.latent_hw = resolution, resolution // self.vae_scale_factor
        self.latent_channels = vae.config.latent_channels
        transformer = transformer.to(device)
        reference = None
        if lora_rank > 0:  # the base stays in the dtype it came in (bf16 for the real models); adapters train in fp32
            from peft import LoraConfig
            transformer.requires_grad_(False)
            transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank,
                                               init_lora_weights="gaussian", target_modules=self.lora_targets))
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:  # full fine-tuning: fp32 master weights for AdamW (autocast computes in bf16)
            if keep_reference:  # frozen, so it stays in the dtype the weights came in (bf16 for the real models)
                reference = copy.deepcopy(transformer).requires_grad_(False).eval()
            transformer = transformer.float().requires_grad_(True)
        super().__init__(transformer, reference)

    def to_latents(self, x):
        return x

    def enable_gradient_checkpointing(self):
        """Recompute each transformer block's activations in the backward pass instead of storing them: the
        memory of calls with gradient drops to about one block's, for about one more forward of compute."""
        self._unwrapped().enable_gradient_checkpointing()

    def compile_blocks(self, backend: str = "inductor"):
        """Regional `torch.compile` (`--compile`): each transformer block is compiled (FLUX's double- and
        single-stream blocks, SD3's joint blocks); the embeddings, the output layer and the sampler stay eager, so a
        Python float timestep or a changed batch never recompiles the whole model. Blocks of one class share one
        compiled graph (PyTorch inlines module calls and takes parameters as graph inputs), so 57 FLUX blocks cost
        about what two do to compile, and LoRA, EMA and merged-weight swaps run without recompiling. Variants are
        compiled on first use: with and without gradient, adapters on and off (the reference), each batch size
        until PyTorch marks it dynamic; the recompile limit is raised to hold them all."""
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in transformer_blocks(self._unwrapped()):
            block.compile(backend=backend)

    @contextlib.contextmanager
    def lora_merged(self):
        """No-grad calls inside run on W' = W + (alpha / r) B A, merged into each adapted layer's base weight, with
        the adapters off: one matrix product per layer instead of three (W, A, B) and an add. For rollouts, whose
        calls need no gradient (`--merge-lora-rollouts`).

        Exact on exit: the merged weights are new tensors and the base tensors are swapped back untouched (peft's
        merge / unmerge would subtract the update again and, in bf16, leave a rounding error in W each time). The
        cost is one more copy of the adapted base weights while inside (FLUX.1-dev in bf16 at FLUX_LORA_TARGETS: 5.4B
        of its 11.9B parameters, 10 GiB; SD3.5-M: 0.8 GiB), and W' is rounded to the base's dtype, so samples differ
        from the unmerged ones by that rounding."""
        from peft.tuners.lora import LoraLayer
        if not self._has_adapters():
            raise RuntimeError("lora_merged needs LoRA adapters (lora_rank > 0)")
        if self._use_reference or self._merged:
            raise RuntimeError("lora_merged inside reference() or lora_merged(): the adapters are off there already")
        net = self._unwrapped()
        layers = [m for m in net.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
        originals = [m.base_layer.weight.data for m in layers]
        with torch.no_grad():
            for m, w in zip(layers, originals):
                m.base_layer.weight.data = (w.float() + m.get_delta_weight("default").float()).to(w.dtype)
        net.disable_adapters()
        self._merged = True
        try:
            yield
        finally:
            for m, w in zip(layers, originals):
                m.base_layer.weight.data = w
            net.enable_adapters()
            self._merged = False

    @torch.no_grad()
    def decode(self, x, chunk: int = 16):
        """Sampler states -> images in [0, 1], (B, 3, H, W), decoded in chunks to bound memory."""
        cfg = self.vae.config
        out = []
        for xc in x.split(chunk):
            latents = self.to_latents(xc) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            img = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            out.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    def save(self, directory, state=None):
        """LoRA: `pytorch_lora_weights.safetensors`, which `<Pipeline>.load_lora_weights(directory)` reads.
        Full fine-tuning: `transformer/` as `save_pretrained` lays it out (config + safetensors shards), which
        `<Transformer>.from_pretrained` reads. `state`: the full state dict the run gathered from every process
        (infra.run.gathered_state_dict; FSDP shards, DeepSpeed's fp32 masters); None: this process's own."""
        state = self._unwrapped().state_dict() if state is None else state
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self._unwrapped()
        if self._has_adapters():  # with the adapter's config: without its alpha, diffusers assumes alpha = rank
            pipeline_class(self.pipeline_class).save_lora_weights(
                directory, transformer_lora_layers=lora_state_dict(state),
                transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
        else:  # save_pretrained would read the (sharded) module itself; write the gathered state dict instead
            from huggingface_hub import save_torch_state_dict
            model.save_config(directory / "transformer")
            save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, directory / "transformer",
                                  filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")

    def load(self, directory):
        directory = Path(directory)
        model = self._unwrapped()
        if self._has_adapters():
            import diffusers
            from peft.utils import set_peft_model_state_dict
            state = getattr(diffusers, self.pipeline_class).lora_state_dict(directory)
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            set_peft_model_state_dict(model, state)
        else:
            model.load_state_dict(type(model).from_pretrained(directory / "transformer").state_dict())

    def encode_prompts(self, prompts):
        embeds, pooled = self.text_encoder(prompts)
        return {"prompt_embeds": embeds.to(self.device), "pooled_prompt_embeds": pooled.to(self.device)}


def lora_state_dict(state: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA entries of a full state dict, keyed as peft's `get_peft_model_state_dict` keys them (adapter name
    dropped: `...to_q.lora_A.weight`). Read from the keys, not from the module tree as peft does: under FSDP with
    activation checkpointing the layers sit inside wrappers whose names the gathered state dict's keys do not have,
    and peft's filter then finds nothing (tests/test_strategies.py)."""
    return {k.replace(f".{adapter}.", "."): v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


class FluxPolicy(DiffusersPolicy):
    """FLUX: the sampler state is the PACKED latent (B, (H/2)(W/2), 4 C); `decode` unpacks and runs the VAE.

    The transformer takes `timestep = s` and `guidance = scale` (it multiplies both by 1000 internally, as
    `FluxPipeline` expects). FLUX.1-dev is guidance-distilled: no classifier-free guidance, one call per sample.
    """

    pipeline_class = "FluxPipeline"
    lora_targets = FLUX_LORA_TARGETS

    def __init__(self, transformer, vae, text_encoder, resolution: int, guidance_scale: float = 3.5,
                 lora_rank: int = 0, lora_alpha: Optional[float] = None, keep_reference: bool = False,
                 device="cpu"):
        latent_hw = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        if latent_hw % 2:
            raise ValueError(f"resolution {resolution} gives an odd latent size {latent_hw}; FLUX packs 2x2 patches")
        super().__init__(transformer, vae, text_encoder, resolution, guidance_scale, lora_rank, lora_alpha,
                         keep_reference, device)
        self.image_seq_len = flux_image_seq_len(resolution, len(vae.config.block_out_channels))
        self.img_ids = flux_image_ids(latent_hw // 2).to(device)
        self.txt_ids = torch.zeros(text_encoder.seq_len, 3, device=device)

    def _forward(self, net, x, sigma, cond):
        dtype = next(net.parameters()).dtype
        guidance = None
        if self._unwrapped().config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        return net(hidden_states=x.to(dtype), timestep=sigma, guidance=guidance,
                   pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                   encoder_hidden_states=cond["prompt_embeds"].to(dtype), txt_ids=self.txt_ids,
                   img_ids=self.img_ids, return_dict=False)[0]

    def sample_shape(self):
        return (self.image_seq_len, 4 * self.latent_channels)

    def attention_shape(self):
        from infra.attention import AttentionShape
        cfg = self._unwrapped().config
        return AttentionShape(cfg.num_attention_heads, cfg.attention_head_dim,
                              self.image_seq_len + self.text_encoder.seq_len)

    def unpack(self, x):
        b, h = x.shape[0], self.latent_hw
        x = x.view(b, h // 2, h // 2, self.latent_channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.latent_channels, h, h)

    to_latents = unpack


class SD3Policy(DiffusersPolicy):
    """SD3 / SD3.5: the sampler state is the VAE latent itself (B, 16, H/8, W/8); the transformer takes
    `timestep = 1000 s` (as `StableDiffusion3Pipeline` passes its scheduler timesteps).

    Classifier-free guidance (SD3.5-M: 4.5), as the pipeline does it: one call on [uncond; cond] with the empty
    prompt's embeddings as the unconditional branch, v = v_u + w (v_c - v_u). That is 2 NFE per sample.
    Inside `without_cfg()` the conditional velocity alone is returned (1 NFE): DGPO rolls out with CFG and trains
    CFG-free. Flow-GRPO keeps CFG in its training log-probs (official code, `train.cfg`), with the unconditional branch
    detached: gradient flows through the conditional branch only.
    """

    pipeline_class = "StableDiffusion3Pipeline"
    lora_targets = SD3_LORA_TARGETS

    def __init__(self, transformer, vae, text_encoder, resolution: int, guidance_scale: float = 4.5,
                 lora_rank: int = 0, lora_alpha: Optional[float] = None, keep_reference: bool = False,
                 device="cpu", scheduler_config: Optional[dict] = None):
        super().__init__(transformer, vae, text_encoder, resolution, guidance_scale, lora_rank, lora_alpha,
                         keep_reference, device)
        self.cfg_scale = guidance_scale
        self.scheduler_config = dict(scheduler_config or {"shift": 3.0})
        self.uncond = {k: v.to(device) for k, v in zip(("prompt_embeds", "pooled_prompt_embeds"),
                                                        text_encoder.uncond())}

    def _forward(self, net, x, sigma, cond):
        dtype = next(net.parameters()).dtype
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        guided = self.cfg_active()
        if guided:
            b = x.shape[0]
            x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
            embeds = torch.cat([self.uncond["prompt_embeds"].expand(b, -1, -1), embeds])
            pooled = torch.cat([self.uncond["pooled_prompt_embeds"].expand(b, -1), pooled])
        v = net(hidden_states=x.to(dtype), timestep=sigma * 1000, encoder_hidden_states=embeds.to(dtype),
                pooled_projections=pooled.to(dtype), return_dict=False)[0]
        if guided:
            v_uncond, v_cond = v.float().chunk(2)
            # Flow-GRPO's compute_log_prob detaches the unconditional prediction: the training gradient of the
            # guided velocity is w dv_c (not w dv_c - (w - 1) dv_u). Rollouts run without gradient: no change there.
            v = v_uncond.detach() + self.cfg_scale * (v_cond - v_uncond.detach())
        return v

    def sample_shape(self):
        return (self.latent_channels, self.latent_hw, self.latent_hw)

    def attention_shape(self):
        from infra.attention import AttentionShape
        cfg = self._unwrapped().config
        return AttentionShape(cfg.num_attention_heads, cfg.attention_head_dim,
                              (self.latent_hw // cfg.patch_size) ** 2 + self.uncond["prompt_embeds"].shape[1])

    def sigmas(self, num_steps: int, shift: Optional[float] = None) -> torch.Tensor:
        return sd3_sigmas(self.scheduler_config, num_steps, shift)


def flux_image_seq_len(resolution: int, vae_levels: int) -> int:
    """FLUX's packed image sequence length, which sets its dynamic shift: the VAE halves the image at each of its
    levels after the first (8x for FLUX.1-dev's 4), then the transformer packs 2x2 latent patches into one token
    (1024 tokens at 512 px)."""
    return (resolution // 2 ** (vae_levels - 1) // 2) ** 2


def sd3_sigmas(scheduler_config: dict, num_steps: int, shift: Optional[float] = None) -> torch.Tensor:
    """The SD3 pipeline scheduler's own N-step schedule, as StableDiffusion3Pipeline and Flow-GRPO's SD3 code take
    it (`set_timesteps(N)`): N timesteps from sigma 1 down to the scheduler's shifted sigma_min, shifted, then 0. Its
    last nonzero sigma is near 0, unlike the FLUX/DanceGRPO `shift(linspace(1, 0, N + 1))`. `shift` replaces the
    config's."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    config = {**scheduler_config, **({"shift": shift} if shift is not None else {})}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.double()


# diffusers' own tiny test configs: FLUX.1-dev's architecture at 68k parameters, and a 1-level VAE
TINY_FLUX_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
TINY_VAE_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                       latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                       shift_factor=0.0609, scaling_factor=1.5035)


def tiny_flux_modules():
    """A random tiny FLUX transformer and VAE (diffusers' test configs); seed torch before calling."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    return FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG), AutoencoderKL(**TINY_VAE_CONFIG)


def build_tiny_flux(resolution=32, guidance_scale=3.5, lora_rank=8, lora_alpha=None, keep_reference=False,
                    device="cpu", seed=0) -> FluxPolicy:
    """FLUX.1-dev's architecture in diffusers' tiny test config (random weights, nothing downloaded)."""
    torch.manual_seed(seed)
    transformer, vae = tiny_flux_modules()
    return FluxPolicy(transformer, vae, HashTextEncoder(seq_len=8, dim=32, pooled_dim=32), resolution=resolution,
                      guidance_scale=guidance_scale, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      keep_reference=keep_reference, device=device)
