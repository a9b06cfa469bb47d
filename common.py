"""Shared pieces of the flow-matching RL scripts: the math every method uses, the policy interface, the toy model.

A reader opens one algorithm script (`flow_grpo.py`, `dgpo.py`, ...) and this file, and follows a whole iteration:
the schedules, samplers and advantages are here, each method's own sampling variant, loss and update are in its
script. What a reader need not open to follow a method (diffusers pipelines and LoRA formats, prompt caches, learned
reward networks, distributed and checkpoint plumbing, the shapes task) lives in the package `infra/`, which builds
on this file (never the other way round); the toy path imports no diffusers.

Notation (rectified flow, the convention of SD3 / FLUX and diffusers):

    x_s = (1 - s) * x0 + s * eps        s in [0, 1], s = 1 is pure noise, s = 0 is data
    v   = v_theta(x_s, s, c)            the model's velocity; the flow-matching target is eps - x0
    x0_hat  = x_s - s * v               predicted clean sample
    eps_hat = x_s + (1 - s) * v         predicted noise
    sigmas  = [1 = s_0 > s_1 > ... > s_N = 0]   an N-step sampling schedule

Sections: schedules; ODE solvers; the SDE step with log-probability; non-finite numbers; group advantages; moving
averages of the weights; the policy interface; toy2d; logging; arguments. (The optimizer step under DDP / FSDP /
DeepSpeed is infra/distributed.py; tasks and the evaluation protocol are infra/tasks.py.)
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

Cond = dict[str, torch.Tensor]  # a batch of prompt conditioning: every tensor has the batch as dim 0


# ======================================================================================================
# Schedules
# ======================================================================================================


def static_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static timestep shift `k s / (1 + (k - 1) s)` (shift 3 for SD3.5, DanceGRPO and G2RPO's FLUX)."""
    return shift * s / (1 + (shift - 1) * s)


def flux_mu(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's resolution-dependent shift parameter: the line through (256, 0.5) and (4096, 1.15)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_time_shift(s: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift `e^mu / (e^mu + (1/s - 1))`."""
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def make_sigmas(num_steps: int, shift: Optional[float] = None, image_seq_len: Optional[int] = None) -> torch.Tensor:
    """The N+1 noise levels `[1, ..., 0]` of an N-step sampler, float64 on the CPU.

    - `shift` given: static shift of `linspace(1, 0, N+1)` (SD3 pipeline, DanceGRPO, G2RPO).
    - `image_seq_len` given: FLUX's dynamic shift of `linspace(1, 1/N, N)`, then 0 appended; this is
      exactly what `FluxPipeline` hands to `FlowMatchEulerDiscreteScheduler` (and Flow-GRPO's FLUX code).
    - neither: the plain linear schedule.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift is not None and image_seq_len is not None:
        raise ValueError("give either a static `shift` or an `image_seq_len` for FLUX's dynamic shift, not both")
    if image_seq_len is not None:
        s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        return torch.cat([flux_time_shift(s, flux_mu(image_seq_len)), s.new_zeros(1)])
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return static_shift(s, shift) if shift is not None else s


def _as_batch(s, x: torch.Tensor) -> torch.Tensor:
    """A noise level (python float, 0-d or (B,) tensor) as a float32 tensor broadcastable against x."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s


# ======================================================================================================
# ODE solvers
# ======================================================================================================


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """`x' = x + (s' - s) v`. The step to s' = 0 lands exactly on `x0_hat = x - s v`."""
    return x + (_as_batch(sigma_next, x) - _as_batch(sigma, x)) * v


def dpm_solver_2m_step(x, v, sigma, sigma_next, prev: Optional[tuple] = None):
    """One DPM-Solver++(2M) step in data prediction for flow matching (midpoint form, as diffusers).

    With `alpha_s = 1 - s`, `lambda_s = log(alpha_s / s)`, `h = lambda' - lambda`, `D0 = x0_hat`:
        first order:  x' = (s'/s) x - alpha' (e^{-h} - 1) D0
        second order: x' = (s'/s) x - alpha' (e^{-h} - 1) D0 - 0.5 alpha' (e^{-h} - 1) D1,
                      D1 = (D0 - D_prev) / r0,  r0 = h_prev / h.
    `prev` is the `(D_prev, h_prev)` the previous step returned (None on the first step: first order).
    The step to s' = 0 returns D0 (first order there, as diffusers' `lower_order_final`).
    Returns `(x', (D0, h))` to feed into the next call.
    """
    s, s_next = float(sigma), float(sigma_next)
    d0 = x - s * v
    if s_next == 0.0:
        return d0, None
    lam = math.log((1 - s) / s) if s < 1 else -math.inf
    lam_next = math.log((1 - s_next) / s_next)
    h = lam_next - lam
    alpha_next = 1 - s_next
    phi = math.expm1(-h)  # e^{-h} - 1
    x_next = (s_next / s) * x - alpha_next * phi * d0
    if prev is not None and math.isfinite(h):
        d_prev, h_prev = prev
        d1 = (d0 - d_prev) / (h_prev / h)
        x_next = x_next - 0.5 * alpha_next * phi * d1
    return x_next, (d0, h)


@torch.no_grad()
def sample_ode(policy: "Policy", x: torch.Tensor, sigmas: torch.Tensor, cond: Cond, solver: str = "dpm2m",
               return_trajectory: bool = False):
    """Integrate the probability-flow ODE from `x` at `sigmas[0]` down to `sigmas[-1]`.

    Returns the final state, or with `return_trajectory` the list of all N+1 states `[x_0, ..., x_N]`
    (x_0 the input), which is what Neighbor GRPO and G2RPO store for training.
    """
    if solver not in ("euler", "dpm2m"):
        raise ValueError(f"unknown ODE solver {solver!r}: use 'euler' or 'dpm2m'")
    states, prev = [x], None
    for j in range(len(sigmas) - 1):
        v = policy.velocity(x, sigmas[j], cond)
        if solver == "euler":
            x = euler_step(x, v, sigmas[j], sigmas[j + 1])
        else:
            x, prev = dpm_solver_2m_step(x, v, sigmas[j], sigmas[j + 1], prev)
        states.append(x)
    return states if return_trajectory else x


# ======================================================================================================
# The SDE step with log-probability (Flow-GRPO; G2RPO and Pro-GRPO use the same)
# ======================================================================================================


def sde_step_with_logprob(x, v, sigma, sigma_next, noise_level: float, prev_sample=None, generator=None,
                          variant: str = "flow_grpo"):
    """One reverse-SDE step `s -> s'` and the Gaussian log-density of its outcome.

    variant "flow_grpo" (Flow-GRPO's `sde` type), noise level a:
        std  = a * sqrt(s / (1 - s))              (s = 1 in the DENOMINATOR replaced by sigmas[1], as the
                                                   official code; at s = 1 that is s', so no extra argument)
        mean = x + [v + std^2 / (2 s) * (x + (1 - s) v)] * dt,     dt = s' - s < 0
        x'   = mean + std * sqrt(-dt) * z
    variant "dance_grpo" (DanceGRPO's `flux_step`): the same drift with a constant eta in place of std,
        and step std `eta * sqrt(s - s')`.

    The drift adds the score term `-(x + (1 - s) v) / s` so that the SDE keeps the ODE's marginals; with
    a = 0 the step is the Euler step. `log_prob` is computed in float32 and averaged (not summed) over all
    non-batch dims, as both official codes do. Passing `prev_sample` scores that outcome instead of sampling
    (the training-time recomputation); it is detached, so gradients flow only through the mean.
    Returns `(x', log_prob, mean, std)` like the official code: `std` is the SDE's diffusion coefficient
    (a sqrt(s/(1-s)), or eta), so x' ~ N(mean, (std sqrt(-dt))^2 I); Flow-GRPO's KL divides by 2 std^2.
    """
    x, v = x.float(), v.float()
    s, s_next = _as_batch(sigma, x), _as_batch(sigma_next, x)
    dt = s_next - s
    if variant == "flow_grpo":
        std = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
        step_std = std * torch.sqrt(-dt)
    elif variant == "dance_grpo":
        std = torch.full_like(s, noise_level)
        step_std = std * torch.sqrt(-dt)
    else:
        raise ValueError(f"unknown SDE variant {variant!r}: use 'flow_grpo' or 'dance_grpo'")
    mean = x + (v + std**2 / (2 * s) * (x + (1 - s) * v)) * dt
    if prev_sample is None:
        z = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
        prev_sample = mean + step_std * z.to(x.device)
    prev_sample = prev_sample.detach().float()
    if noise_level == 0:  # deterministic step: the density is a point mass, report 0
        return mean, torch.zeros(x.shape[0], device=x.device), mean, std
    log_prob = -((prev_sample - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


# ======================================================================================================
# Non-finite numbers stop the run
# ======================================================================================================


class NonFiniteError(SystemExit):
    """A NaN or infinite reward, loss, log-probability ratio or gradient norm. It is a SystemExit: the run stops with
    one line on stderr and exit status 1, no traceback, before anything is saved from the broken state (the last
    checkpoint stays as it was, no final weights are written). The run in progress sets `stopping`: it lets go of its
    output directory and signal handlers, and says where it stands (the iteration, the last checkpoint)."""

    stopping: Callable[[], str] = staticmethod(lambda: "")

    def __init__(self, name: str, value):
        value = torch.as_tensor(value).detach().float().flatten()
        bad = value[~torch.isfinite(value)]
        self.quantity = name
        super().__init__(f"stopped: {name} is {bad[0].item()} ({len(bad)} of {len(value)} values non-finite)"
                         f"{NonFiniteError.stopping()}. Likely causes: the attention kernel (try --attention-backend "
                         f"efficient or math), a learning rate too high for this model (--learning-rate), or the "
                         f"precision (--mixed-precision no)")


def check_finite(name: str, value):
    """Raise NonFiniteError unless every element of `value` is finite."""
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise NonFiniteError(name, value)


# ======================================================================================================
# Group advantages (every GRPO-family method)
# ======================================================================================================


def group_advantages(rewards: torch.Tensor, std: str = "group", clip: float = 5.0, eps: float = 1e-4):
    """GRPO advantages `A_i = (r_i - mean_group) / (std + eps)`, clipped to [-clip, clip].

    `rewards` has the group as its LAST dimension, e.g. (num_groups, G). `std="group"` divides by each
    group's std (DanceGRPO, G2RPO); `std="global"` by the std of all rewards given (Flow-GRPO's default,
    which gathers the rewards of every process first). The mean is always the group's.
    """
    check_finite("reward", rewards)
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if std == "group":
        scale = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.ones_like(rewards[..., :1])
    elif std == "global":
        scale = rewards.std()
    else:
        raise ValueError(f"unknown std mode {std!r}: use 'group' or 'global'")
    return (centred / (scale + eps)).clamp(-clip, clip)


def gathered_group_advantages(accelerator, rewards: torch.Tensor, std: str, clip: float):
    """Advantages of this process's groups, with statistics over EVERY process's groups.

    rewards (P, G) of this process are gathered to (processes * P, G) first, so that `std="global"` is the std
    of the whole batch (Flow-GRPO gathers before normalising); each process keeps the rows of its own groups.
    Returns `(all_rewards, advantages)`: the gathered rewards (for logging) and this process's (P * G,)
    advantages.
    """
    all_rewards = accelerator.gather(rewards)
    P, rank = rewards.shape[0], accelerator.process_index
    advantages = group_advantages(all_rewards, std=std, clip=clip)[rank * P:(rank + 1) * P].reshape(-1)
    return all_rewards, advantages


# ======================================================================================================
# Moving averages of the weights: DGPO's sampling model theta_minus, and the weights Flow-GRPO and DGPO evaluate
# ======================================================================================================


class EMA:
    """An exponential moving average of the trainable parameters, `ema <- mu ema + (1 - mu) theta`, kept beside the
    model and swapped into it on request (`swapped_in`).

    - `update()`: one update with the constant decay `mu` (DGPO's theta_minus, after every optimizer step).
    - `step()`: Flow-GRPO's evaluation EMA (`flow_grpo.ema.EMAModuleWrapper(decay=0.9, update_step_interval=8)`, which
      DGPO's code uses too): call it after every optimizer step n = 0, 1, ...; every `every`-th step updates with
      decay min(mu, (1 + n) / (10 + n)), so early updates follow the weights closely.
    """

    def __init__(self, params, decay: float, every: int = 1):
        self.params, self.decay, self.every = list(params), decay, every
        self.shadow = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self, decay: Optional[float] = None):
        decay = self.decay if decay is None else decay
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach(), alpha=1 - decay)

    def step(self):
        n, self.steps = self.steps, self.steps + 1
        if (n + 1) % self.every == 0:
            self.update(min(self.decay, (1 + n) / (10 + n)))

    def state_dict(self):
        return {"shadow": self.shadow, "steps": self.steps}

    def load_state_dict(self, state):
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        self.steps = state.get("steps", 0)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside, the model's trainable parameters hold the EMA values; the live ones are restored after."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(live, self.params):
                    p.copy_(v)


# ======================================================================================================
# The policy interface: what every algorithm calls, whatever model is behind it
# ======================================================================================================


def select(cond: Cond, index) -> Cond:
    """Rows `index` of every tensor of a conditioning batch (use it to repeat prompts into groups)."""
    return {k: t[index] for k, t in cond.items()}


class Policy:
    """A flow-matching model as the RL scripts see it.

    - `velocity(x, sigma, cond)`: v_theta; counts NFE with and without gradient.
    - `encode_prompts(prompts)` -> cond; `decode(x)` -> what rewards score; `initial_noise(n, generator)`.
    - `trainable_parameters()`; `reference()`: context in which `velocity` is the frozen base model
      (LoRA adapters disabled, or a frozen copy for full fine-tuning).
    - `save(dir, state)` / `load(dir)` for the trained weights (`state`: the full state dict the run gathered from
      every process; None: this process's own).
    Subclasses implement `_forward(net, x, sigma, cond)`. The diffusers models (FLUX, SD3) are in
    infra/diffusers_models.py.
    """

    default_shift: Optional[float] = None  # static shift; None and `image_seq_len` None means linear
    image_seq_len: Optional[int] = None  # set for FLUX: its schedules use the dynamic shift

    def __init__(self, net: nn.Module, reference_net: Optional[nn.Module] = None):
        self.net = net
        self.reference_net = reference_net  # frozen copy (full fine-tuning); None with LoRA
        self.nfe = {"no_grad": 0, "grad": 0}
        self._count = True
        self._cfg_off = False
        self._use_reference = False
        self._merged = False  # inside DiffusersPolicy.lora_merged: no-grad calls only
        self.accelerator = None

    # --- the model call ---------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma, cond: Cond, chunk: int = 0) -> torch.Tensor:
        """v_theta(x, sigma, c). `chunk` > 0 splits the batch into model calls of at most `chunk` samples (memory:
        --rollout-batch-size); the result is the same."""
        if self._merged and torch.is_grad_enabled():
            raise RuntimeError("a call with gradient inside lora_merged(): the LoRA update is merged into frozen "
                               "weights there, so no gradient would reach it")
        if self._count:  # classifier-free guidance calls the transformer on 2 copies of each sample
            self.nfe["grad" if torch.is_grad_enabled() else "no_grad"] += x.shape[0] * (2 if self.cfg_active() else 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        net = self.net
        if self._use_reference and self.reference_net is not None:
            net = self.reference_net
        autocast = self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()
        with autocast:
            if not chunk or chunk >= x.shape[0]:
                return self._forward(net, x, sigma, cond).float()
            return torch.cat([self._forward(net, x[i:i + chunk], sigma[i:i + chunk], select(cond, slice(i, i + chunk)))
                              .float() for i in range(0, x.shape[0], chunk)])

    def _forward(self, net, x, sigma, cond):  # pragma: no cover - abstract
        raise NotImplementedError

    def attention_shape(self):
        """The attention calls of the model (heads, head size, joint sequence length), for the kernel check
        (infra/attention.py); None for a model without attention."""
        return None

    cfg_scale: float = 1.0  # classifier-free guidance scale (SD3); 1 means none

    def cfg_active(self) -> bool:
        return self.cfg_scale > 1 and not self._cfg_off

    @contextlib.contextmanager
    def without_cfg(self):
        """Inside this context `velocity` is the conditional velocity alone, without classifier-free guidance
        (DGPO trains CFG-free). Nothing changes for models without CFG."""
        previous, self._cfg_off = self._cfg_off, True
        try:
            yield
        finally:
            self._cfg_off = previous

    @contextlib.contextmanager
    def nfe_paused(self):
        """Evaluation does not count toward the training NFE totals."""
        self._count = False
        try:
            yield
        finally:
            self._count = True

    @contextlib.contextmanager
    def reference(self):
        """Inside this context `velocity` is the frozen reference (base) model."""
        if self._merged:
            raise RuntimeError("reference() inside lora_merged(): the base weights hold the merged LoRA update there")
        if self.reference_net is None and not self._has_adapters():
            raise RuntimeError("this policy keeps no reference model: build it with keep_reference=True "
                               "(full fine-tuning) or with LoRA (lora_rank > 0)")
        self._use_reference = True
        adapters = self._has_adapters()
        if adapters:
            self._unwrapped().disable_adapters()
        try:
            yield
        finally:
            self._use_reference = False
            if adapters:
                self._unwrapped().enable_adapters()

    def _has_adapters(self) -> bool:
        return bool(getattr(self._unwrapped(), "peft_config", None))

    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.net) if self.accelerator is not None else self.net

    # --- training plumbing ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def prepare(self, accelerator, optimizer):
        """Hand the trainable network and its optimizer to accelerate (DDP/FSDP wrapping, autocast)."""
        self.accelerator = accelerator
        self.net, optimizer = accelerator.prepare(self.net, optimizer)
        return optimizer

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # --- data in and out --------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Cond:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def initial_noise(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """N(0, I) noise of the sampler's state shape; drawn on the generator's device, then moved."""
        gen_device = generator.device if generator is not None else self.device
        return torch.randn((n, *self.sample_shape()), generator=generator, device=gen_device).to(self.device)

    def sigmas(self, num_steps: int, shift: Optional[float] = None) -> torch.Tensor:
        """This model's sampling schedule: a static `shift` if given, else the model's default."""
        if shift is not None:
            return make_sigmas(num_steps, shift=shift)
        if self.image_seq_len is not None:
            return make_sigmas(num_steps, image_seq_len=self.image_seq_len)
        return make_sigmas(num_steps, shift=self.default_shift)

    def save(self, directory: str | Path, state: Optional[dict] = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, directory: str | Path):  # pragma: no cover - abstract
        raise NotImplementedError


# ======================================================================================================
# toy2d: a 2D flow model on an 8-mode ring. Prompt c asks for mode c; the base model ignores the prompt.
# ======================================================================================================

TOY_NUM_MODES = 8
TOY_RING_RADIUS = 4.0
TOY_MODE_STD = 0.25


def toy_modes() -> torch.Tensor:
    """The 8 ring modes mu_c, shape (8, 2)."""
    angle = torch.arange(TOY_NUM_MODES) * (2 * math.pi / TOY_NUM_MODES)
    return TOY_RING_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


class ToyVelocityNet(nn.Module):
    """MLP v(x, s, c): x (B, 2), s (B,), prompt id c (B,) -> (B, 2). Sinusoidal features of s."""

    def __init__(self, hidden: int = 256, depth: int = 3, num_prompts: int = TOY_NUM_MODES, emb_dim: int = 32):
        super().__init__()
        self.prompt_emb = nn.Embedding(num_prompts, emb_dim)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(6), persistent=False)
        layers, width = [], 2 + 1 + 2 * len(self.freqs) + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x, sigma, prompt_id):
        ts = sigma[:, None] * self.freqs
        h = torch.cat([x, sigma[:, None], ts.sin(), ts.cos(), self.prompt_emb(prompt_id)], dim=-1)
        return self.mlp(h)


class Toy2DPolicy(Policy):
    """toy2d: prompts are "mode 0" ... "mode 7"; the sample is a point in the plane. Full fine-tuning of `net`, the
    base model pretrained by flow matching on the ring (infra/pretrained.py; `infra.tasks.toy2d_policy` builds it);
    the reference is a frozen copy of it."""

    default_shift = None

    def __init__(self, net: ToyVelocityNet, keep_reference: bool = True):
        reference = copy.deepcopy(net).requires_grad_(False).eval() if keep_reference else None
        super().__init__(net, reference)

    def _forward(self, net, x, sigma, cond):
        return net(x, sigma, cond["prompt_id"])

    def encode_prompts(self, prompts):
        return {"prompt_id": torch.tensor([parse_toy_prompt(p) for p in prompts], device=self.device)}

    def decode(self, x):
        return x.float()

    def sample_shape(self):
        return (2,)

    def save(self, directory, state=None):
        from safetensors.torch import save_file
        state = self._unwrapped().state_dict() if state is None else state
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(directory) / "model.safetensors"))

    def load(self, directory):
        from safetensors.torch import load_file
        self._unwrapped().load_state_dict(load_file(str(Path(directory) / "model.safetensors")))


def parse_toy_prompt(prompt: str) -> int:
    try:
        word, idx = prompt.split()
        assert word == "mode" and 0 <= int(idx) < TOY_NUM_MODES
        return int(idx)
    except (ValueError, AssertionError):
        raise ValueError(f"toy2d prompts are 'mode 0' ... 'mode {TOY_NUM_MODES - 1}', got {prompt!r}") from None


def toy_mode_reward(points: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """toy2d's reward: `exp(-|x - mu_c|^2 / 2)`, closeness to the mode the prompt asks for (1 at the mode)."""
    mu = toy_modes().to(points.device)[[parse_toy_prompt(p) for p in prompts]]
    return torch.exp(-((points - mu) ** 2).sum(-1) / 2)


def toy_on_manifold(points: torch.Tensor, prompts: list[str] = None) -> torch.Tensor:
    """toy2d's quality metric: 1 where the sample lies within 1.0 of SOME ring mode (on the data manifold). A reward
    hacker that drifts off the ring loses it."""
    dist = torch.cdist(points.float(), toy_modes().to(points.device))
    return (dist.min(dim=-1).values < 1.0).float()


# ======================================================================================================
# Logging
# ======================================================================================================


def mean_stats(stats: list[dict], sizes: Optional[list[int]] = None) -> dict:
    """Average a list of per-pass statistics dicts key by key, each pass weighted by its number of samples when
    `sizes` is given (so that how the work is cut into micro-batches does not change what is logged)."""
    sizes = sizes or [1] * len(stats)
    return {k: sum(n * s[k] for s, n in zip(stats, sizes)) / sum(sizes) for k in stats[0]}


# ======================================================================================================
# Arguments: the flags every script shares (infra/args.py parses them: defaults < preset < file < flags)
# ======================================================================================================


def arg(default, help: str, **kw):
    """A dataclass field with its help text; infra/args.py turns it into a --flag."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class CommonArgs:
    """Flags shared by every script; each script subclasses this with its method's hyperparameters. Metadata
    `choices`, `min` / `max` (inclusive) and `above` / `below` (exclusive) are checked when the flags are parsed."""

    # run
    model: str = arg("toy2d", "which model: toy2d, tiny-flux, shapes, flux (FLUX.1-dev), sd3 (SD3.5)")
    preset: Optional[str] = arg(None, "named setting (listed below); default: the one named after --model")
    iterations: int = arg(100, "RL iterations (rollout + update)", min=1)
    seed: int = arg(0, "seed; each process adds its rank for rollout noise", min=0, max=2**31 - 1)
    output_dir: Optional[str] = arg(None, "where metrics.jsonl, summary.json and weights go (default: a new "
                                          "runs/<script>_<model>_s<seed>_<time>/); one that holds a run is refused "
                                          "unless resumed (--resume-from-checkpoint) or --overwrite")
    overwrite: bool = arg(False, "start over in an --output-dir that holds a run: its outputs are deleted first")
    resume_from_checkpoint: Optional[str] = arg(None, "continue a run: 'latest' in --output-dir, or a checkpoint "
                                                      "directory; the run's own flags apply, and a flag that would "
                                                      "change what it computes is refused")
    report_to: str = arg("none", "also log to 'tensorboard' or 'wandb' through accelerate's trackers",
                         choices=("none", "tensorboard", "wandb"))
    mixed_precision: Optional[str] = arg(None, "'no', 'bf16' or 'fp16' (accelerate autocast); default: the "
                                               "accelerate launch config's, else 'no'", choices=("no", "bf16", "fp16"))
    log_every: int = arg(10, "print a console line every N iterations, and after one that ends a minute or more "
                             "after the last line (0: never)", min=0)
    save_weights: bool = arg(True, "save the trained weights to <output_dir>/final at the end")
    checkpoint_every: int = arg(100, "save a resumable checkpoint every N iterations and after the last "
                                "(0: never)", min=0)
    checkpoint_minutes: float = arg(60.0, "also save one after an iteration that ends this many minutes or more after "
                                          "the last (FLUX iterations take minutes; a crash loses at most this much "
                                          "work; 0: never)", min=0)
    checkpoints_total_limit: int = arg(2, "keep only the newest N checkpoints", min=1)
    attention_backend: str = arg("auto", "attention kernel: 'auto' (on a GPU flash, else memory-efficient, never "
                                          "cuDNN, whose backward gives NaN on H100/H200 with torch 2.11), 'flash', "
                                          "'efficient', 'cudnn' or 'math'; checked against math before training",
                                 choices=("auto", "flash", "efficient", "cudnn", "math"))
    num_threads: int = arg(0, "CPU threads of torch (0: PyTorch's default, one per core). On an idle 2-core machine 2 "
                              "threads trained tiny-flux 1.46x faster than 1 and the toy as fast; on a machine shared "
                              "with another job, 1 avoids oversubscription", min=0)
    dist_timeout_minutes: int = arg(120, "how long a process waits for the others at a collective (NCCL's default 10 "
                                         "min is shorter than embedding a large prompt set on the main process)", min=1)
    # model
    reward: Optional[str] = arg(None, "training reward (default: the model's), or a weighted sum 'hpsv2:1,clip:0.5': "
                                      "toy_mode, mean_color, geneval, pickscore, hpsv2, clip, imagereward")
    pretrained: Optional[str] = arg(None, "--model flux / sd3: a diffusers pipeline directory (or a hub id already in "
                                          "the local cache); nothing is downloaded")
    max_sequence_length: int = arg(512, "--model flux / sd3: T5 tokens per prompt (FLUX.1-dev: 512)", min=1)
    reward_dir: Optional[str] = arg(None, "where learned reward weights live (default $FLOWRL_REWARDS, else "
                                          "~/.cache/flowrl/rewards); the error for a missing one says what to fetch")
    train_prompts: Optional[str] = arg(None, "training prompts from a .txt (one per line) or .jsonl ('prompt' field) "
                                             "file, instead of the model's default set")
    eval_prompts: Optional[str] = arg(None, "evaluation prompts from a .txt or .jsonl file")
    resolution: int = arg(32, "image resolution in pixels (image models)", min=8)
    guidance_scale: float = arg(3.5, "FLUX's guidance embedding (FLUX.1-dev is guidance-distilled: no CFG); SD3's CFG "
                                     "scale")
    lora_rank: int = arg(0, "LoRA rank for image models; 0 means full fine-tuning", min=0)
    lora_alpha: Optional[float] = arg(None, "LoRA alpha (default 2 x rank, as the reference code)", above=0)
    gradient_checkpointing: bool = arg(False, "recompute transformer activations in backward (less memory, ~1 more "
                                              "forward per gradient call)")
    compile: bool = arg(False, "regional torch.compile of the transformer blocks (diffusers models; compiles on first "
                               "use, ~20-30 s per variant on a CPU); unmeasured on a GPU, so off by default")
    fit_memory: bool = arg(False, "choose the rollout, eval and training micro-batches and gradient checkpointing from "
                                  "free device memory (infra/memory.py); unmeasured on a GPU, so off by default")
    memory_budget_gib: float = arg(0.0, "--fit-memory: the GiB it may fill (0: 85% of the device's free memory; "
                                        "needed off CUDA)", min=0)
    # sampling
    num_steps: int = arg(10, "sampling steps N of a training rollout", min=1)
    shift: Optional[float] = arg(None, "static timestep shift; default: the model's (FLUX: dynamic shift, toy: none)",
                                 above=0)
    prompts_per_iteration: int = arg(8, "prompts (groups) per iteration, over all processes together: each process "
                                        "takes an equal share, so a preset's batch does not change with the launch",
                                     min=1)
    group_size: int = arg(16, "samples per prompt, G (a group needs 2 to have an advantage)", min=2)
    rollout_batch_size: int = arg(0, "model-call batch during rollouts (0: all samples at once)", min=0)
    # optimisation
    learning_rate: float = arg(1e-3, "AdamW learning rate", min=0)
    weight_decay: float = arg(1e-4, "AdamW weight decay (1e-4 in every official code here: Flow-GRPO, DanceGRPO, "
                                    "DGPO, G2RPO)", min=0)
    adam_beta2: float = arg(0.999, "AdamW beta2", min=0, below=1)
    max_grad_norm: float = arg(1.0, "gradient clipping norm", above=0)
    # evaluation
    eval_every: int = arg(0, "also evaluate every N iterations (0: only before and after training)", min=0)
    eval_steps: int = arg(20, "ODE steps of the evaluation sampler", min=1)
    eval_solver: str = arg("euler", "evaluation ODE solver: 'euler' or 'dpm2m'", choices=("euler", "dpm2m"))
    eval_samples_per_prompt: int = arg(64, "evaluation samples per eval prompt", min=1)
    eval_batch_size: int = arg(0, "model-call batch during evaluation (0: all at once)", min=0)
    eval_seed: int = arg(12345, "seed of the fixed evaluation noise (distinct from training seeds)", min=0,
                         max=2**63 - 1)
