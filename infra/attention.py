"""Which scaled-dot-product attention kernel the transformers run on, chosen and checked rather than left to PyTorch.

PyTorch tries cuDNN attention first on Hopper GPUs. On an H200 with torch 2.11 (cuDNN 9.19) its backward pass gave
NaN in FLUX's transformer at diffusers' tiny test widths, and crashed (`CUBLAS_STATUS_EXECUTION_FAILED`, "illegal
memory access") at FLUX.1-dev's widths with fp32 weights under bf16 autocast and at 2025 + 512 tokens (720 px);
flash and memory-efficient attention passed every case (pytorch/pytorch#196678 reports the same bug). So:

- `--attention-backend auto` (the default) on a GPU runs flash attention where it takes the inputs, else
  memory-efficient attention (each only if it passes the check below), and never cuDNN; `flash`, `efficient`, `cudnn`,
  `math` ask for one kernel (math stays enabled as the fallback for inputs the chosen kernel cannot take, such as the
  fp32 reward models).
- Before the first training step `configure` runs the chosen kernel (with `auto`, each kernel it turns on) once, forward
  and backward, on random tensors of the model's head size, head count, sequence length and compute dtype, against the
  math kernel in fp32; a kernel that takes fp32 inputs is run in fp32 too, since the reward models call it in fp32,
  at the model's shape and at each learned reward's own (CLIP-H: 16 heads x 80 over 257 tokens; the text towers'
  16 x 64 over 77 under their causal mask). A kernel that errors, returns NaN or disagrees stops the run with one
  line that names a kernel that passed the same check.
- Earlier still, as the run starts (`preselect`), a GPU gets the kernels asked for: the text encoders embed the
  prompts before the transformer exists to be checked, and under `auto` they too never run on cuDNN. Before they
  embed, `check_text_encoders` checks those kernels at the encoders' shapes with their masks (CLIP's causal one,
  T5's position bias) in their dtype; one that fails is off while they embed (math serves those calls).
- On the CPU nothing changes (PyTorch's own choice; cuDNN does not exist there) unless a backend is named.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
CHOICES = ("auto", *BACKENDS)
AUTO_ORDER = ("flash", "efficient")  # what `auto` tries, in this order; cuDNN only when asked for by name
# Agreement with the fp32 math kernel: relative L2 error of the output and of each input gradient. bf16 rounding
# alone gives ~4e-3 (8 bits of mantissa); a broken kernel gives NaN or O(1).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# How a check starts when no kernel allowed takes the inputs (flash and fp32, say): CUDA builds of PyTorch say "No
# available kernel. Aborting execution.", its CPU path "No viable backend for scaled_dot_product_attention ..."
CANNOT_TAKE = ("RuntimeError: No available kernel", "RuntimeError: No viable backend")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _masked(shape) -> str:
    return f" ({shape.mask} mask)" if shape.mask else ""


MASKS = ("", "causal", "bias")


@dataclass(frozen=True)
class AttentionShape:
    """What a model's attention calls look like: heads, head size, the sequence length (FLUX and SD3: image + text
    tokens), and the mask they pass: none (the transformers, the image towers), "causal" (CLIP's text towers, an
    additive causal mask) or "bias" (T5's additive position bias, one per head). A kernel may be right without a mask
    and wrong with one: the masked calls take other code paths, or another kernel altogether."""
    heads: int
    head_dim: int
    seq_len: int
    mask: str = ""

    def __str__(self):
        return f"{self.heads} heads x {self.head_dim}, {self.seq_len} tokens" + (f", {self.mask} mask" if self.mask
                                                                                 else "")


def check_backend(name: str, shape: AttentionShape, dtype: torch.dtype, device, seed: int = 0) -> Optional[str]:
    """Run `name` alone, forward and backward, on random q, k, v of `shape` in `dtype` (batch 1), against the math
    kernel in fp32 on the same (rounded) inputs. Returns None if it agrees, else one line saying what went wrong."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, shape.heads, shape.seq_len, shape.head_dim, generator=g).to(device, dtype)
               for _ in range(3))
    grad_out = torch.randn(1, shape.heads, shape.seq_len, shape.head_dim, generator=g).to(device, dtype)
    assert shape.mask in MASKS, shape.mask
    mask = None  # additive, as CLIP's and T5's attention pass it; rounded to `dtype` like q, k, v
    if shape.mask == "causal":
        mask = torch.full((shape.seq_len, shape.seq_len), float("-inf")).triu(1).view(1, 1, shape.seq_len, -1)
    elif shape.mask == "bias":
        mask = torch.randn(1, shape.heads, shape.seq_len, shape.seq_len, generator=g)
    mask = None if mask is None else mask.to(device, dtype)

    def run(backend, dt):
        inputs = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*inputs, attn_mask=None if mask is None else mask.to(dt))
        out.backward(grad_out.to(dt))
        return [out.detach().float()] + [t.grad.float() for t in inputs]

    try:
        with warnings.catch_warnings():  # PyTorch warns why each kernel declined; the error below says it in one line
            warnings.simplefilter("ignore")
            got = run(BACKENDS[name], dtype)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except RuntimeError as e:  # "No available kernel", a CUDA error, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    want = run(SDPBackend.MATH, torch.float32)
    for label, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        if not torch.isfinite(a).all():
            return f"non-finite {label}"
        err = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
        if err > TOLERANCE.get(dtype, 3e-2):
            return f"{label} differs from the math kernel by {err:.2e} (relative)"
    return None


def enable(names: set[str]):
    """Process-wide: the named kernels on (PyTorch prefers flash, then memory-efficient), math always on as the
    fallback for inputs they cannot take (e.g. fp32 reward models under flash), the others off."""
    torch.backends.cuda.enable_flash_sdp("flash" in names)
    torch.backends.cuda.enable_mem_efficient_sdp("efficient" in names)
    torch.backends.cuda.enable_cudnn_sdp("cudnn" in names)
    torch.backends.cuda.enable_math_sdp(True)


def preselect(requested: str, device):
    """On a GPU, before any model runs: the kernels `requested` allows (`auto`: flash and memory-efficient, never
    cuDNN), math as the fallback, before `configure` can check them at the model's shapes. Nothing on the CPU."""
    if requested in CHOICES and torch.device(device).type == "cuda":
        enable(set(AUTO_ORDER) if requested == "auto" else {requested})


def check_text_encoders(requested: str, shapes: Sequence[AttentionShape], dtype: torch.dtype, device,
                        log=print) -> list[str]:
    """Before a pipeline's text encoders embed the prompts: each kernel `preselect` turned on is checked (as
    `check_backend`) at each encoder's attention shape and mask (CLIP: causal; T5: its position bias) in the encoders'
    dtype. One that fails is turned off while they embed, math serving those calls, and the line says so; one that
    cannot take the inputs (flash, with a mask, on a GPU) leaves them to the next. `configure` sets the kernels again
    for the transformer afterwards. Returns the kernels left on (besides math); nothing is checked on the CPU under
    `auto`, where PyTorch chooses."""
    if requested not in CHOICES or (requested == "auto" and torch.device(device).type != "cuda"):
        return []
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    shapes = list(dict.fromkeys(shapes))
    off = {}
    for name in candidates:
        for shape in shapes:
            why = check_backend(name, shape, dtype, device)
            if why is not None and not why.startswith(CANNOT_TAKE):
                off[name] = f"{why} at {shape}"
                break
    passing = [n for n in candidates if n not in off]
    enable(set(passing))
    log(f"text encoders' attention: {', '.join(passing) or 'math'} (checked against the math kernel at "
        f"{'; '.join(map(str, shapes))}, {_name(dtype)})"
        + "".join(f"; {n} off while they embed: {why}" for n, why in off.items()))
    return passing


def configure(requested: str, shape: Optional[AttentionShape], dtype: torch.dtype, device, log=print,
              reward_shapes: Sequence[AttentionShape] = ()) -> Optional[str]:
    """Choose, check and enable the attention kernel for a model with attention calls of `shape` computed in `dtype`
    (the autocast dtype under mixed precision), and reward models with calls of `reward_shapes` in fp32. Returns the
    kernel in use (None: PyTorch's default, on the CPU with `auto` or for a model without attention). Raises
    SystemExit with one line when the chosen kernel fails."""
    if requested not in CHOICES:
        raise SystemExit(f"--attention-backend must be one of {', '.join(CHOICES)}; got {requested!r}")
    on_gpu = torch.device(device).type == "cuda"
    if shape is None or (requested == "auto" and not on_gpu):
        return None
    # auto: every kernel of AUTO_ORDER that passes its own check stays on, the first preferred (memory-efficient
    # serves the fp32 calls flash cannot take); cuDNN only when asked for by name
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    # The reward models run in fp32 whatever the policy's dtype, on the same process-wide kernels, at shapes of their
    # own: a kernel that takes fp32 inputs (memory-efficient does; flash and cuDNN do not, and leave them to the next
    # kernel or math) is checked in fp32 as well, at the policy's shape and at each of theirs
    dtypes = [dtype] if dtype == torch.float32 else [dtype, torch.float32]
    rewards = [s for s in dict.fromkeys(reward_shapes) if s != shape]  # the policy's shape is checked in fp32 anyway
    in_fp32 = ([] if dtype == torch.float32 else [(shape, "(the reward models' dtype)")]) + [
        (s, f"at a reward model's {s}") for s in rewards]

    def verdict(name):
        why = check_backend(name, shape, dtype, device)
        for other, what in in_fp32:
            if why is not None:
                break
            why32 = check_backend(name, other, torch.float32, device)
            if why32 is not None and not why32.startswith(CANNOT_TAKE):  # "cannot take fp32": math serves those calls
                why = f"in float32 {what}: {why32}"
        return why

    failures = {name: verdict(name) for name in candidates}
    passing = [name for name in candidates if failures[name] is None]
    if passing:
        enable(set(passing))
        name = passing[0]
        also = "".join(f", {n} for what {name} cannot take" for n in passing[1:])
        off = "".join(f"; {n} off: {why}" for n, why in failures.items() if why is not None)
        log(f"attention: {name}{also} (checked against the math kernel: {shape.heads} heads x {shape.head_dim}, "
            f"{shape.seq_len} tokens, {' and '.join(_name(d) for d in dtypes)}, forward and backward"
            f"{''.join(f'; {s.heads} x {s.head_dim}, {s.seq_len} tokens{_masked(s)} in float32' for s in rewards)})"
            f"{off}")
        return name
    where = f"{torch.device(device)} ({shape.heads} heads x {shape.head_dim}, {shape.seq_len} tokens, {_name(dtype)})"
    tried = "; ".join(f"{n}: {why}" for n, why in failures.items())
    working = next((n for n in BACKENDS if n not in failures and verdict(n) is None), None)  # the first will do
    if working:
        raise SystemExit(f"attention kernel check failed on {where}: {tried}. Use --attention-backend {working}, "
                         f"which passes the same check")
    raise SystemExit(f"attention kernel check failed on {where}: {tried}; no other kernel passes it either")
