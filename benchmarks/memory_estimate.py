"""Per-GPU memory of the training state for FLUX.1-dev and SD3.5-Medium, from their real parameter counts.

    python benchmarks/memory_estimate.py              # 8 GPUs
    python benchmarks/memory_estimate.py --gpus 16
    python benchmarks/memory_estimate.py --activations    # FLUX.1-dev's activations per sample, measured (~1 min)

The transformers are built on the meta device (no weights, no memory) with LoRA at the reference code's targets and
ranks, so the counts are exact. Bytes per parameter, as the scripts hold them (accelerate mixed precision bf16):
- LoRA: the frozen base in bf16 (2 B); the adapters in fp32 with their gradients and AdamW's two moments (16 B).
- full fine-tuning: fp32 weights, fp32 gradients, AdamW moments (16 B per parameter), split by the strategy:
  DDP replicates all of it; FSDP full shard shards everything (plus one gathered block at a time, counted in
  bf16); DeepSpeed ZeRO-2 in bf16 replicates a bf16 copy of the weights (the engine casts the module) and shards
  the fp32 master weights, the gradients (counted in fp32) and the optimizer state.
Not counted in that table: activations (they depend on resolution, micro-batch and checkpointing; `--activations`
measures them per sample, below), the frozen copy a full fine-tune keeps only when it needs a reference
(DGPO, or a KL term: another 2 B per parameter, as it stays in the bf16 it was loaded in), the VAE (84M for FLUX),
and the text encoders, which embed the prompt set once and are released (T5-XXL alone is 4.8B parameters, 9.5 GB
in bf16).

`--activations`: what one sample's gradient call keeps for its backward pass in FLUX.1-dev, at the presets'
resolutions (512 px: 1024 image tokens; 720 px: 2025) and at 1024 px (4096), with its 512 text tokens. A transformer
of FLUX.1-dev's widths with 2 double-stream blocks and 1 single-stream block is built on the CPU as `--model flux`
holds it under LoRA (bf16 base, LoRA r32 at the reference targets with fp32 adapters) and measured by
`--fit-memory`'s probe (infra/memory.py): one call with gradient at batch 1 and at batch 2 under bf16 autocast, every
tensor autograd saves recorded by saved-tensor hooks (weights left out; distinct storages), the difference being one
sample's share. The second double block and the single block stand for the blocks of the stack (their inputs need
gradient, as there; the first block's does not). The CPU's flash attention saves what the GPU's does (output and
log-sum-exp, no T x T matrix). Full depth = 19 double + 38 single blocks + what the embeddings and the output layer
keep; with gradient checkpointing only each block's inputs stay, plus one block's activations while it is recomputed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def counts(model_cls, config: dict, rank: int, targets: list[str]) -> tuple[int, int, int]:
    """(parameters, LoRA parameters at `rank`, parameters of the largest transformer block) on the meta device."""
    from accelerate import init_empty_weights
    from peft import LoraConfig

    from infra import diffusers_models as dm
    with init_empty_weights():
        model = model_cls(**config)
    total = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in dm.transformer_blocks(model))
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, lora, block


def state_bytes(params: int, lora: int, block: int, strategy: str, gpus: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU. `lora` > 0: LoRA (a bf16 base, whatever the strategy);
    0: full fine-tuning under `strategy`, one of "ddp", "deepspeed", "fsdp"."""
    if lora:
        return 2 * params + 4 * lora, 4 * lora, 8 * lora
    return {"ddp": (4 * params, 4 * params, 8 * params),
            "deepspeed": (2 * params + 4 * params / gpus, 4 * params / gpus, 8 * params / gpus),
            "fsdp": (4 * params / gpus + 2 * block, 4 * params / gpus, 8 * params / gpus)}[strategy]


def rows(name: str, params: int, lora: int, block: int, rank: int, gpus: int) -> list[str]:
    g = lambda b: f"{b / GIB:,.1f}"  # noqa: E731
    w, gr, opt = state_bytes(params, lora, block, "ddp", gpus)
    out = [f"| {name} LoRA r{rank} ({lora / 1e6:.1f}M trainable), DDP | {g(w)} | {g(gr)} | {g(opt)} | "
           f"**{g(w + gr + opt)}** |"]
    for strategy, label in [("ddp", "DDP"), ("deepspeed", f"DeepSpeed ZeRO-2 / {gpus}"),
                            ("fsdp", f"FSDP full shard / {gpus}")]:
        w, gr, opt = state_bytes(params, 0, block, strategy, gpus)
        out.append(f"| {name} full fine-tune, {label} | {g(w)} | {g(gr)} | {g(opt)} | **{g(w + gr + opt)}** |")
    return out


def activation_bytes(image_tokens: list[int], text_tokens: int = 512, rank: int = 32) -> list[dict[str, int]]:
    """For each image token count (a square number), per sample: the bytes a gradient call keeps for backward in one
    FLUX.1-dev double-stream block ("double"), one single-stream block ("single"), outside the blocks ("outside"),
    and a block's inputs ("inputs", what checkpointing keeps). See the module docstring for the method."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from infra import diffusers_models as dm
    from infra.memory import per_sample_bytes
    results = []
    for tokens in image_tokens:
        side = round(tokens ** 0.5)
        if side * side != tokens:
            raise ValueError(f"image tokens must be a square number (a square image); got {tokens}")
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # the base in bf16, as --model flux holds it under LoRA
        try:
            net = FluxTransformer2DModel(**{**dm.FLUX_DEV_TRANSFORMER_CONFIG, "num_layers": 2, "num_single_layers": 1})
        finally:
            torch.set_default_dtype(torch.float32)
        vae = AutoencoderKL(block_out_channels=(4,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=1, latent_channels=16)  # 8x
        policy = dm.FluxPolicy(net, vae, dm.HashTextEncoder(seq_len=text_tokens, dim=4096, pooled_dim=768),
                               resolution=16 * side, lora_rank=rank)
        s = per_sample_bytes(policy, policy.encode_prompts(["a photo of red"]),
                             lambda: torch.autocast("cpu", torch.bfloat16))
        results.append({"double": s["per_block"][1], "single": s["per_block"][2], "inputs": s["block_inputs"][1],
                        "outside": s["outside"]})
    return results


def activation_table(resolutions=((512, 1024), (720, 2025), (1024, 4096))) -> list[str]:
    g = lambda b: f"{b / GIB:,.2f}"  # noqa: E731
    lines = ["| resolution (image tokens + 512 text) | double block | single block | full depth, per sample | "
             "full depth with checkpointing, per sample |", "| --- | --- | --- | --- | --- |"]
    for (px, tokens), a in zip(resolutions, activation_bytes([t for _, t in resolutions])):
        full = 19 * a["double"] + 38 * a["single"] + a["outside"]
        ckpt = 57 * a["inputs"] + max(a["double"], a["single"]) + a["outside"]
        lines.append(f"| {px} px ({tokens}) | {g(a['double'])} | {g(a['single'])} | {g(full)} | {g(ckpt)} |")
    return lines


def main():
    from infra import diffusers_models as dm
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--activations", action="store_true", help="measure FLUX.1-dev's activations per sample instead")
    args = p.parse_args()
    if args.activations:
        print("Activations kept for backward, GiB per sample (FLUX.1-dev, bf16 autocast, LoRA r32):\n")
        print("\n".join(activation_table()))
        return
    lines = ["| model, training, strategy | weights GiB | gradients GiB | optimizer GiB | total per GPU GiB |",
             "| --- | --- | --- | --- | --- |"]
    for name, cls, config, rank, targets in [
            ("FLUX.1-dev", FluxTransformer2DModel, dm.FLUX_DEV_TRANSFORMER_CONFIG, 64, dm.FLUX_LORA_TARGETS),
            ("SD3.5-M", SD3Transformer2DModel, dm.SD35_MEDIUM_TRANSFORMER_CONFIG, 32, dm.SD3_LORA_TARGETS)]:
        params, lora, block = counts(cls, config, rank, targets)
        print(f"{name}: {params:,} parameters, LoRA r{rank}: {lora:,}, largest block {block:,}", file=sys.stderr)
        lines += rows(name, params, lora, block, rank, args.gpus)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
