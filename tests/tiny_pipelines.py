"""Tiny FLUX and SD3 pipelines written to disk the way `hf download black-forest-labs/FLUX.1-dev` lays one out, and
a tiny CLIP reward (random weights, tiny configs, tokenizers built from small vocabularies), so the real loading code
runs with no network."""

import json
import string
from pathlib import Path

import torch

import common
from infra import diffusers_models

T5_WORDS = "a photo of red green blue yellow cat dog".split()


def clip_tokenizer(directory: Path):
    """A character-level BPE CLIP tokenizer (no merges): every word is spelled out."""
    from transformers import CLIPTokenizer
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def t5_tokenizer():
    """A unigram T5 tokenizer: a few whole words, then single characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in T5_WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + "\u2581"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


# FLUX.1-dev's scheduler/scheduler_config.json: the resolution-dependent ("dynamic") shift
FLUX_DEV_SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def save_tiny_flux_pipeline(directory: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(directory / "_vocab")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer, vae = diffusers_models.tiny_flux_modules()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_sd3_pipeline(directory: Path, seed: int = 0) -> Path:
    """SD3's layout: two CLIP text encoders with projections (pooled 32 + 32), T5, a 4-channel latent VAE."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(directory / "_vocab")
    clip_config = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1, projection_dim=32)
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    # 2x2 patches as SD3.5's own; a scheduler shift other than SD3.5's 3.0 (and SD3Policy's fallback): a policy that
    # did not take the pipeline's own schedule would sample something else than the pipeline
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(**{**diffusers_models.TINY_VAE_CONFIG, "latent_channels": 4})  # SD3 latents: 4 channels here
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=2.5), vae=vae,
                                    text_encoder=CLIPTextModelWithProjection(clip_config), tokenizer=clip_tok,
                                    text_encoder_2=CLIPTextModelWithProjection(clip_config), tokenizer_2=clip_tok,
                                    text_encoder_3=t5, tokenizer_3=t5_tok, transformer=transformer)
    pipe.save_pretrained(directory)
    return directory


def tiny_clip(directory: Path):
    """A CLIP with random weights (PickScore's and CLIP score's architecture) and a character-level tokenizer
    written to `directory`."""
    from transformers import CLIPConfig, CLIPModel
    tokenizer = clip_tokenizer(directory)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=224, patch_size=32), projection_dim=16)
    return CLIPModel(config).eval(), tokenizer


def save_tiny_clip_rewards(reward_dir: Path) -> Path:
    """A `--reward-dir` laid out as `rewards.load_pickscore` and `rewards.load_clip_score` read it: PickScore's model
    in PickScore_v1/ with its tokenizer in CLIP-ViT-H-14-laion2B-s32B-b79K/, CLIP score's in clip-vit-large-patch14/."""
    model, tokenizer = tiny_clip(reward_dir / "_vocab")
    model.save_pretrained(reward_dir / "PickScore_v1")
    tokenizer.save_pretrained(reward_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    model.save_pretrained(reward_dir / "clip-vit-large-patch14")
    tokenizer.save_pretrained(reward_dir / "clip-vit-large-patch14")
    return reward_dir


def give_lora_an_update(policy, std: float = 0.1, seed=None):
    """peft starts every lora_B at zero, where the adapters change nothing, so a merge, a reference or a saved file
    would pass any comparison: draw them N(0, std^2) instead (from `seed`, else the global generator)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in policy.net.named_parameters():
            if "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def assert_pipeline_loads_the_trained_lora(policy, pipeline_cls, pipeline_dir: Path, out: Path):
    """`<Pipeline>.load_lora_weights` on what `policy.save` wrote must give the velocity we trained. (Without the
    adapter's alpha in the file diffusers assumes alpha = rank, scale 1: half the update of our default 2 x rank.)"""
    give_lora_an_update(policy)  # a trained-looking update
    policy.save(out)
    pipe = pipeline_cls.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.load_lora_weights(out)
    x, cond = policy.initial_noise(2, torch.Generator().manual_seed(0)), policy.encode_prompts(["a photo of red"] * 2)
    with torch.no_grad():
        trained = policy.velocity(x, 0.6, cond)
        loaded = policy._forward(pipe.transformer, x, torch.full((2,), 0.6), cond)
        with policy.reference():  # the base: the comparison would pass trivially if the adapters did nothing
            base = policy.velocity(x, 0.6, cond)
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def assert_pipeline_samples_the_same_images(policy, pipe, num_steps: int, **call_kwargs):
    """`pipe(latents=x, N steps, output_type="pt")` from the same noise gives the images of our Euler ODE and
    decode (32 px, 16 text tokens; `call_kwargs` adds the guidance and, for SD3, the negative prompt)."""
    prompts = ["a photo of red", "a photo of cyan"]
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = policy.decode(common.sample_ode(policy, x, policy.sigmas(num_steps), policy.encode_prompts(prompts),
                                               solver="euler"))
    theirs = pipe(prompt=prompts, latents=x.clone(), height=32, width=32, num_inference_steps=num_steps,
                  max_sequence_length=16, output_type="pt", **call_kwargs).images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
