"""Where an iteration's time goes, per method: inside the transformer, or around it. And, on a GPU, at FLUX.1-dev's
tensor shapes: seconds per iteration, peak memory and training MFU.

    python benchmarks/timing.py                            # --config mid: a mid-size FLUX on the CPU (~4 min)
    python benchmarks/timing.py --config flux-dev          # on a GPU: FLUX.1-dev widths, 2 double + 4 single blocks
    python benchmarks/timing.py --config flux-dev --depth 19 38   # the full 12B depth (needs the memory)
    python benchmarks/timing.py --config flux-dev --methods DGPO \
        --variants base= compile=--compile merged=--merge-lora-rollouts   # speed levers, one row each

Every script runs in its own process, unchanged, on a FLUX transformer with random weights registered as
`--model timing-flux` (tasks.register_model), a random-weight VAE, a hash text encoder and the mean-colour
reward. What is measured, per training iteration (the first is a warm-up and is left out):
- model time: every transformer forward, timed inside `Policy.velocity`, plus every backward pass, timed around
  `Accelerator.backward` (each one runs back through the transformer; the loss arithmetic it also
  differentiates is negligible next to it). CUDA is synchronised around each timed call.
- the rest: SDE/ODE arithmetic, log-probabilities, advantages, VAE decoding, the reward, the optimizer step,
  logging: what "overhead" means in the table.
- FLOPs: one sample's forward, and forward + backward with the run's trainable parameters (LoRA or all), counted
  by torch.utils.flop_counter with attention on the math backend (so its matmuls are counted); an iteration's
  FLOPs = NFE_no_grad x forward + NFE_grad x (forward + backward). MFU = FLOPs / (seconds x the device's peak
  dense bf16 FLOP/s). These are the model's FLOPs: gradient checkpointing's recomputed forwards are not counted
  (they cost time, not useful work), so a checkpointed row's MFU is lower than its hardware utilisation. The FLOPs
  are those of the unmerged model whatever the run's levers (--compile counts the same FLOPs as eager, tested;
  --merge-lora-rollouts is not on while counting): a lever that saves work shows as time saved, not as FLOPs lost.
- warm-up: the first iteration's seconds, left out of the medians; compilation (--compile) lands there and in the
  evaluation before training.

Configs:
- mid: hidden 256 (4 heads x 64), 2 double + 2 single blocks (6.8M parameters), 256 px through an 8x VAE = 256
  image tokens + 32 text tokens; each script's `tiny-flux` preset (its method's knobs at a small group).
- flux-dev: FLUX.1-dev's widths (hidden 3072 = 24 heads x 128, text 4096 x 512 tokens, pooled 768, 64-channel
  packed latents, its VAE's config), depth reduced to `--depth` (default 2 double + 4 single of 19 + 38); each
  method's paper preset (its resolution, group size, steps, LoRA or full fine-tuning, bf16), one prompt per
  iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from infra import diffusers_models  # noqa: E402
from infra import rewards  # noqa: E402
from infra import run  # noqa: E402
from infra import tasks  # noqa: E402

# name -> (script, flags) per config; the flags pick the preset, the shared flags below do the rest
CONFIGS = {
    "mid": {
        "transformer": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
                            num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128,
                            axes_dims_rope=[8, 28, 28], guidance_embeds=True),
        "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8),
        "text": dict(seq_len=32, dim=256, pooled_dim=128),
        "flags": ["--resolution", "256", "--iterations", "4", "--mixed-precision", "no"],
        "methods": {
            "Flow-GRPO": ("flow_grpo.py", ["--preset", "tiny-flux"]),
            "DGPO": ("dgpo.py", ["--preset", "tiny-flux"]),
            "Neighbor GRPO": ("neighbor_grpo.py", ["--preset", "tiny-flux"]),
            "G2RPO": ("g2rpo.py", ["--preset", "tiny-flux"]),
            "Pro-GRPO": ("pro_grpo.py", ["--preset", "tiny-flux"]),
        },
    },
    # diffusers' tiny test config: a seconds-long smoke run of the measurement itself (tests use it)
    "tiny": {
        "transformer": dict(diffusers_models.TINY_FLUX_TRANSFORMER_CONFIG),
        "vae": dict(block_out_channels=(4,), layers_per_block=1, norm_num_groups=1),
        "text": dict(seq_len=8, dim=32, pooled_dim=32),
        "flags": ["--resolution", "32", "--iterations", "3", "--mixed-precision", "no"],
        "methods": {},  # filled below: the mid config's
    },
    "flux-dev": {
        "transformer": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            axes_dims_rope=[16, 56, 56], guidance_embeds=True),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        "text": dict(seq_len=512, dim=4096, pooled_dim=768),
        "flags": ["--iterations", "3", "--prompts-per-iteration", "1", "--mixed-precision", "bf16"],
        "methods": {
            "Flow-GRPO (SD3 preset)": ("flow_grpo.py", ["--preset", "flow-grpo-sd3"]),
            "DanceGRPO": ("flow_grpo.py", ["--preset", "dancegrpo-flux"]),
            "DGPO": ("dgpo.py", ["--preset", "dgpo-sd3"]),
            "Neighbor GRPO": ("neighbor_grpo.py", ["--preset", "neighbor-grpo-flux"]),
            "G2RPO": ("g2rpo.py", ["--preset", "g2rpo-flux"]),
            "Pro-GRPO": ("pro_grpo.py", ["--preset", "pro-grpo-sd3"]),
        },
    },
}
CONFIGS["tiny"]["methods"] = CONFIGS["mid"]["methods"]
SHARED_FLAGS = ["--model", "timing-flux", "--eval-samples-per-prompt", "1", "--eval-steps", "2", "--log-every", "0",
                "--checkpoint-every", "0", "--no-save-weights"]
# Dense bf16 peaks (NVIDIA's data sheets, half the "with sparsity" figure); the first name the device's contains wins,
# so the PCIe and NVL H100s, slower than the SXM part ("NVIDIA H100 80GB HBM3"), come before it
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
                    "L40S": 362.0}


def peak_tflops(device_name: str) -> float | None:
    """The device's peak dense bf16 TFLOP/s, or None (CPU, or a GPU not in the table: no MFU)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


# ======================================================================================================
# The worker: one script in this process, with the transformer calls and backward passes timed
# ======================================================================================================


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_timing_task(spec):
    """A `tasks.register_model` builder: FLUX with `spec`'s widths and random weights, mean-colour prompts.

    The transformer is built on the run's device, directly in the dtype it trains in (a bf16 base under LoRA, as
    --model flux holds it; fp32 for full fine-tuning): FLUX.1-dev's 11.9B parameters built in fp32 on a CPU take
    minutes and 48 GB of RAM, on a GPU seconds."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    def build(args, keep_reference, device, log):
        torch.manual_seed(args.seed)
        bf16_base = args.lora_rank > 0 and args.mixed_precision == "bf16"
        with torch.device(device), default_dtype(torch.bfloat16 if bf16_base else torch.float32):
            transformer = FluxTransformer2DModel(**spec["transformer"])
        n = len(spec["vae"]["block_out_channels"])
        with torch.device(device):
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=spec["transformer"]["in_channels"] // 4,
                                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                                shift_factor=0.1159, **spec["vae"])
        policy = diffusers_models.FluxPolicy(transformer, vae, diffusers_models.HashTextEncoder(**spec["text"]), args.resolution,
                                   args.guidance_scale, args.lora_rank, args.lora_alpha, keep_reference, device)
        colors = list(rewards.COLORS)
        task = tasks.Task(policy, rewards.get_reward("mean_color"), [f"a photo of {c}" for c in colors],
                          [f"a photo of {colors[0]}"])
        build.task = task
        return task
    return build


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(config: str, name: str, out: Path, depth: tuple[int, int] | None, extra: list[str]):
    import importlib

    import accelerate

    spec = CONFIGS[config]
    if depth:
        spec["transformer"].update(num_layers=depth[0], num_single_layers=depth[1])
    build = build_timing_task(spec)
    tasks.register_model("timing-flux", build)

    # the clocks: forward time inside Policy.velocity, backward time around Accelerator.backward
    clock = {"fwd": 0.0, "bwd": 0.0}
    per_iteration = []

    def timed(fn, key):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            result = fn(*a, **k)
            sync()
            clock[key] += time.perf_counter() - t0
            return result
        return wrapper

    common.Policy.velocity = timed(common.Policy.velocity, "fwd")
    accelerate.Accelerator.backward = timed(accelerate.Accelerator.backward, "bwd")
    begin, end = run.Run.begin_iteration, run.Run.end_iteration

    def begin_iteration(self, policy):
        sync()
        clock["fwd"] = clock["bwd"] = 0.0
        begin(self, policy)

    def end_iteration(self, iteration, task, *a, **k):
        sync()
        per_iteration.append(dict(clock))
        end(self, iteration, task, *a, **k)

    run.Run.begin_iteration, run.Run.end_iteration = begin_iteration, end_iteration

    script, flags = spec["methods"][name]
    module = importlib.import_module(Path(script).stem)
    run_dir = out / "run"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = module.main([*flags, *spec["flags"], *SHARED_FLAGS, *extra, "--output-dir", str(run_dir)])
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config_used = json.loads((run_dir / "config.json").read_text())

    flops_fwd, flops_grad = count_flops(build.task.policy)
    params = sum(p.numel() for p in build.task.policy._unwrapped().parameters())
    trainable = sum(p.numel() for p in build.task.policy.trainable_parameters())
    steady = list(zip(rows, per_iteration))[1:]  # the first iteration warms up kernels and allocators
    result = {
        "method": name, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "params": params, "trainable": trainable, "resolution": config_used["resolution"],
        "tokens": build.task.policy.image_seq_len, "lora_rank": config_used["lora_rank"],
        "iterations_measured": len(steady), "peak_gib": peak_gib,
        "flops_fwd": flops_fwd, "flops_grad": flops_grad,
        "seconds": [r["time/iteration_seconds"] for r, _ in steady],
        "warmup_seconds": rows[0]["time/iteration_seconds"],
        "fwd_seconds": [c["fwd"] for _, c in steady], "bwd_seconds": [c["bwd"] for _, c in steady],
        "nfe_no_grad": [r["nfe/rollout"] for r, _ in steady], "nfe_grad": [r["nfe/train"] for r, _ in steady],
        "memory_plan": summary.get("memory_plan"),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


@contextlib.contextmanager
def without_checkpointing(module: torch.nn.Module):
    """Gradient checkpointing off inside (diffusers' models test `self.gradient_checkpointing` at each call), as it
    was after."""
    flagged = [(m, m.gradient_checkpointing) for m in module.modules() if hasattr(m, "gradient_checkpointing")]
    for m, _ in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, was in flagged:
            m.gradient_checkpointing = was


def count_flops(policy) -> tuple[float, float]:
    """FLOPs of one sample's transformer forward, and of forward + backward with the trainable parameters: the
    model's FLOPs, as MFU counts them. A run with gradient checkpointing computes each block's forward once more in
    the backward pass; that recomputation is not counted (it would make MFU hardware-FLOP utilisation, about 1.33x
    higher for the same work, and let a checkpointed row look better than an uncheckpointed one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x = policy.initial_noise(1)
    cond = policy.encode_prompts(["a photo of red"])
    with sdpa_kernel(SDPBackend.MATH), policy.nfe_paused(), without_checkpointing(policy._unwrapped()):
        with torch.no_grad(), FlopCounterMode(display=False) as fwd:
            policy.velocity(x, 0.5, cond)
        with FlopCounterMode(display=False) as grad:
            policy.velocity(x, 0.5, cond).square().mean().backward()
    for p in policy.trainable_parameters():
        p.grad = None
    return float(fwd.get_total_flops()), float(grad.get_total_flops())


# ======================================================================================================
# The driver: one process per method, then the table
# ======================================================================================================


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def table(results: list[dict], config: str, depth, extra_flags: str = "", variants=None) -> list[str]:
    """The markdown table; a method whose run failed gets a row saying how."""
    r0 = next((r for r in results if "error" not in r), None)
    if r0 is None:
        return [f"## Time per iteration: {config}", "", *(f"- {r['method']}: failed: {r['error']}" for r in results), ""]
    peak = peak_tflops(r0["device"])
    tf = CONFIGS[config]["transformer"]
    double, single = depth or (tf["num_layers"], tf["num_single_layers"])
    layers = f"{double} double + {single} single"
    lines = [f"## Time per iteration: {config} ({r0['device']})", "",
             f"`python benchmarks/timing.py --config {config}"
             + (f" --depth {depth[0]} {depth[1]}" if depth else "")
             + (f" --extra-flags '{extra_flags}'" if extra_flags else "")
             + (" --variants " + " ".join(shlex.quote(v) for v in variants) if variants else "")
             + "`: FLUX transformer with hidden "
             f"{tf['num_attention_heads'] * tf['attention_head_dim']}, {layers} blocks "
             f"({r0['params'] / 1e6:,.1f}M parameters), random weights. Medians over the iterations after the first. "
             "Model share = (transformer forwards + backward passes) / iteration time; the rest is overhead "
             "(sampler arithmetic, VAE decode, reward, optimizer, logging).", "",
             "| method | resolution (tokens) | trainable | NFE no-grad / grad per it | s / it | forward s | backward s "
             "| model share | overhead | TFLOP / it | MFU | peak memory | warm-up s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 11)
            continue
        s, f, b = median(r["seconds"]), median(r["fwd_seconds"]), median(r["bwd_seconds"])
        ng, g = median(r["nfe_no_grad"]), median(r["nfe_grad"])
        flops = ng * r["flops_fwd"] + g * r["flops_grad"]
        mfu = f"{flops / s / (peak * 1e12):.1%}" if peak else "-"
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        trainable = f"LoRA r{r['lora_rank']} ({r['trainable'] / 1e6:.2f}M)" if r["lora_rank"] else \
            f"all ({r['trainable'] / 1e6:,.0f}M)"
        lines.append(f"| {r['method']} | {r['resolution']} ({r['tokens']}) | {trainable} | {ng:,.0f} / {g:,.0f} | "
                     f"{s:.2f} | {f:.2f} | {b:.2f} | {(f + b) / s:.1%} | {1 - (f + b) / s:.1%} | "
                     f"{flops / 1e12:.2f} | {mfu} | {mem} | {r['warmup_seconds']:.1f} |")
    plans = [(r["method"], r["memory_plan"]) for r in results if r.get("memory_plan")]
    lines += [""] if plans else []
    for m, p in plans:
        lines.append(f"- {m}: --fit-memory chose training micro-batches of {p['train_micro_units']} unit(s) of "
                     f"{p['train_unit_samples']} samples, checkpointing {'on' if p['gradient_checkpointing'] else 'off'}"
                     f", rollout batch {p['rollout_batch_size']} (budget {p['budget_bytes'] / 2**30:.1f} GiB; per "
                     f"sample {p['per_sample_bytes']['grad'] / 2**30:.3g} GiB with gradient)")
    return lines + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="mid")
    p.add_argument("--depth", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                   help="transformer blocks (default: the config's)")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the method names")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    p.add_argument("--extra-flags", default="", help="more flags for every method's run, e.g. "
                   "'--gradient-checkpointing' at full depth")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME=FLAGS",
                   help="run each method once per variant, with the variant's flags after --extra-flags, e.g. "
                   "base= compile=--compile 'merged=--merge-lora-rollouts'; rows are 'method (NAME)'")
    p.add_argument("--timeout", type=float, default=None, help="seconds a method's run may take (then: a failed row)")
    p.add_argument("--worker", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.config, args.worker[0], Path(args.worker[1]), args.depth, shlex.split(args.extra_flags))

    results = []
    names = [n for n in CONFIGS[args.config]["methods"] if args.methods is None or n in args.methods]
    if args.methods and len(names) < len(args.methods):
        raise SystemExit(f"--methods: unknown {sorted(set(args.methods) - set(names))}; config {args.config} has "
                         f"{list(CONFIGS[args.config]['methods'])}")
    variants = [("", "")]  # (label, flags); one unlabelled run per method without --variants
    if args.variants:
        if not all(v.partition("=")[0] and "=" in v for v in args.variants):
            raise SystemExit("--variants: each one is NAME=FLAGS (FLAGS may be empty: base=)")
        variants = [tuple(v.split("=", 1)) for v in args.variants]
    with tempfile.TemporaryDirectory() as tmp:
        for method, (label, variant_flags) in ((n, v) for n in names for v in variants):
            name = f"{method} ({label})" if label else method
            d = Path(tmp) / f"{method}_{label}".replace(" ", "_")
            d.mkdir()
            cmd = [sys.executable, __file__, "--config", args.config, "--worker", method, str(d)]
            if args.depth:
                cmd += ["--depth", *map(str, args.depth)]
            extra = " ".join(f for f in (args.extra_flags, variant_flags) if f)
            if extra:
                cmd += [f"--extra-flags={extra}"]  # "=": the value starts with --
            t0 = time.time()
            stderr = ""
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
                stderr = proc.stderr
                error = None if proc.returncode == 0 else \
                    (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]
            except subprocess.TimeoutExpired:
                error = f"over the {args.timeout:.0f} s timeout"
            if error:
                results.append({"method": name, "error": error})
                print(f"  {name:24s} FAILED: {error}\n{stderr[-3000:]}", flush=True)
                continue
            results.append({**json.loads((d / "result.json").read_text()), "method": name})
            print(f"  {name:24s} {time.time() - t0:6.1f} s", flush=True)
    lines = table(results, args.config, args.depth, args.extra_flags, args.variants)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
