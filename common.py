"""Shared pieces for the flow-matching RL scripts: schedules, samplers, advantages, models, rewards, run plumbing.

Everything an algorithm file needs but that is not the algorithm itself lives here, so that `dgpo.py`,
`flow_grpo.py`, ... each read top to bottom like the paper's Algorithm box. The math follows
`ALGORITHMS.md` section 0 (rectified-flow convention of SD3/FLUX and diffusers):

    x_s = (1 - s) * x0 + s * eps        s in [0, 1], s = 1 is pure noise
    v   = v_theta(x_s, s, c)            target eps - x0
    x0_hat  = x_s - s * v               (predicted clean sample)
    eps_hat = x_s + (1 - s) * v         (predicted noise)
    sigmas  = [1 = s_0 > s_1 > ... > s_N = 0]

Sections: schedules, ODE solvers, the SDE step with log-probability, advantages and the PPO loss,
policies (the model interface: toy2d, tiny-flux, shapes), rewards, tasks, arguments and presets, run plumbing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    checkpoint stays as it was, no final weights are written). The run in progress sets `where` (the iteration, the
    last checkpoint)."""

    where: Callable[[], str] = staticmethod(lambda: "")

    def __init__(self, name: str, value):
        value = torch.as_tensor(value).detach().float().flatten()
        bad = value[~torch.isfinite(value)]
        self.quantity = name
        super().__init__(f"stopped: {name} is {bad[0].item()} ({len(bad)} of {len(value)} values non-finite)"
                         f"{NonFiniteError.where()}. Likely causes: the attention kernel (try --attention-backend "
                         f"efficient or math), a learning rate too high for this model (--learning-rate), or the "
                         f"precision (--mixed-precision no)")


def check_finite(name: str, value):
    """Raise NonFiniteError unless every element of `value` is finite."""
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise NonFiniteError(name, value)


# ======================================================================================================
# Group advantages and the PPO-clipped loss
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


def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """PPO's clipped surrogate `mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))`, rho = exp(logp - logp_old).

    Returns `(loss, stats)` with the clip fraction and the approx-KL `0.5 (logp - logp_old)^2` of the
    official Flow-GRPO logging.
    """
    log_ratio = log_prob - old_log_prob
    check_finite("log-probability ratio", log_ratio.detach())
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {"clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item(),
             "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean().item()}
    return loss, stats


def sde_grpo_loss(policy: "Policy", states, old_log_probs, advantages, sigmas, cond: Cond, idx, steps, args):
    """The PPO-clipped GRPO loss of samples `idx` at their SDE transitions `steps` (one per sample), shared by the
    SDE-based scripts (Flow-GRPO, DanceGRPO, Pro-GRPO).

    states (N+1, B, ...) and old_log_probs (N, B) come from the rollout. Recomputes v_theta(x_j) WITH gradient
    and scores the stored x_{j+1} under the new Gaussian policy; ratio = exp(log pi_theta - log pi_old).
    With `args.kl_beta > 0` adds Flow-GRPO's KL to the frozen reference: the squared distance of the two
    policies' means over 2 std^2 (the closed-form KL of Gaussians with the same std, up to the step's dt).
    Reads `args.noise_level`, `args.sde_variant`, `args.clip_range`, `args.kl_beta`.
    """
    x, x_next = states[steps, idx], states[steps + 1, idx]
    s, s_next = sigmas[steps], sigmas[steps + 1]
    c = select(cond, idx)
    v = policy.velocity(x, s, c)
    _, log_prob, mean, std = sde_step_with_logprob(x, v, s, s_next, args.noise_level, prev_sample=x_next,
                                                   variant=args.sde_variant)
    loss, stats = ppo_clip_loss(log_prob, old_log_probs[steps, idx], advantages[idx], args.clip_range)
    stats["policy_loss"] = loss.item()
    if args.kl_beta > 0:
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, s, c)
        _, _, mean_ref, _ = sde_step_with_logprob(x, v_ref, s, s_next, args.noise_level, prev_sample=x_next,
                                                  variant=args.sde_variant)
        kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std.flatten() ** 2)
        loss = loss + args.kl_beta * kl.mean()
        stats["kl"] = kl.mean().item()
    return loss, stats


def sde_ppo_update(policy: "Policy", optimizer, accelerator, states, old_log_probs, advantages, sigmas, cond: Cond,
                   steps, args):
    """PPO updates over stored SDE transitions (Flow-GRPO / DanceGRPO; Pro-GRPO on its survivors).

    `steps` (B, n_train) are each sample's trained transitions. Each of `args.updates_per_iteration` updates
    takes a random 1/U of the samples, accumulates gradients over their trained steps (and micro-batches of
    `args.train_micro_batch_size`), then steps the optimizer once; from the second update on the ratio is
    off-policy and the clip acts. Returns the averaged loss statistics and the last gradient norm.
    """
    batch_size, n_train = steps.shape
    stats = []
    for batch in torch.randperm(batch_size, device=steps.device).chunk(args.updates_per_iteration):
        micro = batch.split(args.train_micro_batch_size or len(batch))
        passes = [(j, mb) for j in range(n_train) for mb in micro]
        for n, (j, mb) in enumerate(passes):
            with accumulating(accelerator, policy, last=n == len(passes) - 1):
                loss, st = sde_grpo_loss(policy, states, old_log_probs, advantages, sigmas, cond, mb, steps[mb, j],
                                         args)
                accelerator.backward(loss * len(mb) / len(batch) / n_train)
            stats.append(st)
        grad_norm = optimizer_step(accelerator, policy, optimizer, args.max_grad_norm)
    return mean_stats(stats), grad_norm


# ======================================================================================================
# Gradient accumulation and the optimizer step under DDP, FSDP and DeepSpeed
# ======================================================================================================


@contextlib.contextmanager
def accumulating(accelerator, policy: "Policy", last: bool):
    """Context for ONE forward + backward pass of several whose gradients add up to one optimizer step (every
    script sums over trained timesteps and micro-batches). `last=False` on every pass but the last:

    - DDP: those passes skip the gradient all-reduce (`no_sync`, which must cover the forward too: DDP decides
      there); the last one reduces the summed gradients. Same update, one all-reduce per optimizer step
      instead of one per pass (tests/test_distributed.py counts them).
    - DeepSpeed: the engine accumulates without stepping; on the last pass it reduces, clips (`gradient_clipping`
      = --max-grad-norm) and steps inside `backward` (accelerate's wrapper), so `optimizer.step()` is a no-op.
      Without the boundary the engine would step after every pass.
    - FSDP: every pass reduce-scatters into the sharded gradients (its `no_sync` would keep the full unsharded
      gradients on every GPU, the memory FSDP exists to save).
    """
    from accelerate.utils import DistributedType
    # accelerate's accumulation flag: DeepSpeed's wrapper reads it as the boundary, and the wrapped optimizer
    # steps only when it is True. (`accelerator.accumulate` sets it from a fixed count of passes; here the count
    # varies per script and iteration, so each pass says whether it is the last.)
    accelerator.gradient_state._set_sync_gradients(last)
    skip_reduce = not last and accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    with accelerator.no_sync(policy.net) if skip_reduce else contextlib.nullcontext():
        yield


def optimizer_step(accelerator, policy: "Policy", optimizer, max_grad_norm: float):
    """Clip the gradient norm, step, zero the gradients; returns the norm before clipping (for logging).

    The norm is over ALL the network's parameters (frozen ones have no gradient and count zero): under FSDP
    accelerate computes the global norm across shards only when handed exactly the wrapped model's parameters,
    and would otherwise clip each process's shard by its local norm. Under DeepSpeed the engine has already
    clipped and stepped in the last backward pass (see `accumulating`); this returns its global norm. A non-finite
    norm stops the run (NonFiniteError) before the step.
    """
    grad_norm = accelerator.clip_grad_norm_(policy.net.parameters(), max_grad_norm)
    if grad_norm is not None:  # checked before the step: the weights never take a non-finite update
        check_finite("gradient norm", grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return grad_norm


# ======================================================================================================
# Policies: the one interface every algorithm uses, whatever model is behind it
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
    - `save(dir)` / `load(dir)` for the trained weights.
    Subclasses implement `_forward(net, x, sigma, cond)`.
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
        self.accelerator = None

    # --- the model call ---------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma, cond: Cond) -> torch.Tensor:
        if self._count:  # classifier-free guidance calls the transformer on 2 copies of each sample
            self.nfe["grad" if torch.is_grad_enabled() else "no_grad"] += x.shape[0] * (2 if self.cfg_active() else 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        net = self.net
        if self._use_reference and self.reference_net is not None:
            net = self.reference_net
        autocast = self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()
        with autocast:
            return self._forward(net, x, sigma, cond).float()

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
    def enable_gradient_checkpointing(self):
        """Recompute each transformer block's activations in the backward pass instead of storing them: the
        memory of calls with gradient drops to about one block's, for about one more forward of compute."""
        net = self._unwrapped()
        if not hasattr(net, "enable_gradient_checkpointing"):
            raise SystemExit(f"--gradient-checkpointing needs a diffusers transformer; {type(net).__name__} has none")
        net.enable_gradient_checkpointing()

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

    # --- saving: EVERY process calls `save` (FSDP gathers its shards collectively); the main process writes ---
    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The network's whole state dict, keyed as the unwrapped model's. Under FSDP the shards are gathered to
        the main process (a collective: every process must call this; the others may get an empty dict); under
        DeepSpeed the trainable entries are the optimizer's fp32 masters."""
        if self.accelerator is None:
            return self.net.state_dict()
        state = self.accelerator.get_state_dict(self.net)
        from accelerate.utils import DistributedType
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # the engine computes with a bf16 copy; the trained weights are the optimizer's fp32 masters (sharded
            # across processes under ZeRO: gathering them is a collective too)
            from deepspeed.utils import safe_get_full_fp32_param
            for name, p in self._unwrapped().named_parameters():
                if p.requires_grad:
                    state[name] = safe_get_full_fp32_param(p).cpu()
        return state

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


# ------------------------------------------------------------------------------------------------------
# toy2d: a 2D flow model on an 8-mode ring. Prompt c asks for mode c; the base model ignores the prompt.
# ------------------------------------------------------------------------------------------------------

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


def cached_model_path(name: str, config: dict) -> Path:
    """Where a base model pretrained by the project is cached: $FLOWRL_CACHE (default ~/.cache/flowrl)/
    <name>-<hash of its config>.pt, so a changed config never loads stale weights."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.environ.get("FLOWRL_CACHE") or Path.home() / ".cache" / "flowrl") / f"{name}-{key}.pt"


def atomic_save(obj, path: Path):
    """torch.save through a temporary file and a rename: concurrent runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def pretrain_toy_base(config: dict, log: Callable[[str], None] = print) -> ToyVelocityNet:
    """Flow-matching pretraining of the toy base model on the ring (data independent of the prompt).

    Cached on disk under $FLOWRL_CACHE (default ~/.cache/flowrl), keyed by a hash of its config, so only the
    first run pays the few seconds it takes.
    """
    path = cached_model_path("toy2d-base", config)
    net = ToyVelocityNet(hidden=config["hidden"], depth=config["depth"])
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net
    log(f"[toy2d] pretraining the base flow model ({config['steps']} steps); cached at {path}")
    g = torch.Generator().manual_seed(config["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["steps"])
    modes = toy_modes()
    for _ in range(config["steps"]):
        n = config["batch"]
        x0 = modes[torch.randint(TOY_NUM_MODES, (n,), generator=g)] + TOY_MODE_STD * torch.randn(n, 2, generator=g)
        eps = torch.randn(n, 2, generator=g)
        s = torch.rand(n, generator=g)
        xs = (1 - s[:, None]) * x0 + s[:, None] * eps
        c = torch.randint(TOY_NUM_MODES, (n,), generator=g)  # the prompt carries no information here
        loss = F.mse_loss(net(xs, s, c), eps - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.zero_grad(set_to_none=True)  # the last step's gradients must not leak into the first RL update
    atomic_save(net.state_dict(), path)
    return net


TOY_BASE_CONFIG = {"hidden": 128, "depth": 3, "steps": 3000, "batch": 512, "lr": 3e-3, "seed": 0,
                   "modes": TOY_NUM_MODES, "radius": TOY_RING_RADIUS, "std": TOY_MODE_STD}


class Toy2DPolicy(Policy):
    """toy2d: prompts are "mode 0" ... "mode 7"; the sample is a point in the plane. Full fine-tuning."""

    default_shift = None

    def __init__(self, device="cpu", keep_reference: bool = True, log=print):
        net = pretrain_toy_base(TOY_BASE_CONFIG, log).to(device)
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
        state = self.full_state_dict() if state is None else state
        if not self.is_main:
            return
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


# ------------------------------------------------------------------------------------------------------
# tiny-flux: FLUX.1-dev's code path (FluxTransformer2DModel, packed latents, RoPE ids, guidance embedding,
# AutoencoderKL, LoRA through peft) with diffusers' tiny test configs and random weights.
# ------------------------------------------------------------------------------------------------------

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
        `<Transformer>.from_pretrained` reads. Every process calls this (or passes the `full_state_dict()` it
        gathered already); the main process writes."""
        state = self.full_state_dict() if state is None else state  # gathered from the FSDP shards
        if not self.is_main:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self._unwrapped()
        if self._has_adapters():  # with the adapter's config: without its alpha, diffusers assumes alpha = rank
            import diffusers
            getattr(diffusers, self.pipeline_class).save_lora_weights(
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
        self.image_seq_len = (latent_hw // 2) ** 2
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
    CFG-free. Flow-GRPO keeps CFG in its training log-probs (official code, `train.cfg`).
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
            v = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return v

    def sample_shape(self):
        return (self.latent_channels, self.latent_hw, self.latent_hw)

    def attention_shape(self):
        from infra.attention import AttentionShape
        cfg = self._unwrapped().config
        return AttentionShape(cfg.num_attention_heads, cfg.attention_head_dim,
                              (self.latent_hw // cfg.patch_size) ** 2 + self.uncond["prompt_embeds"].shape[1])

    def sigmas(self, num_steps: int, shift: Optional[float] = None) -> torch.Tensor:
        """The pipeline scheduler's own N-step schedule, as StableDiffusion3Pipeline and Flow-GRPO's SD3 code
        take it (`set_timesteps(N)`): N timesteps from sigma 1 down to the scheduler's shifted sigma_min, shifted,
        then 0. Its last nonzero sigma is near 0, unlike the FLUX/DanceGRPO `shift(linspace(1, 0, N + 1))`."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        config = {**self.scheduler_config, **({"shift": shift} if shift is not None else {})}
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
    def write(directory: Path, prompts: list[str], encode: Callable[[list[str]], tuple], batch: int = 32):
        """Embed `prompts` in batches with `encode(prompts) -> (embeds (B, T, D), pooled (B, D_pooled))`, each batch
        written straight into the files (never the whole set in memory), into a temporary directory renamed into
        place at the end: a crashed or concurrent writer never leaves a half cache behind."""
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = None
        for i in range(0, len(prompts), batch):
            embeds, pooled = (t.detach().cpu().contiguous() for t in encode(prompts[i:i + batch]))
            if files is None:  # the shapes are known after the first batch
                meta = {"prompts": prompts, "dtype": str(embeds.dtype).removeprefix("torch."),
                        "embeds_shape": [len(prompts), *embeds.shape[1:]],
                        "pooled_shape": [len(prompts), *pooled.shape[1:]]}
                files = [torch.from_file(str(tmp / name), shared=True, size=math.prod(meta[key]),
                                         dtype=embeds.dtype).view(meta[key])
                         for name, key in (("embeds.bin", "embeds_shape"), ("pooled.bin", "pooled_shape"))]
            files[0][i:i + len(embeds)] = embeds
            files[1][i:i + len(pooled)] = pooled
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
    "flux": ("FluxPipeline", "FluxPolicy", "hf download black-forest-labs/FLUX.1-dev --local-dir <dir>"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Policy",
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


def prompt_cache_dir(model: str, prompts: list[str], max_sequence_length: int, source: str) -> Path:
    """$FLOWRL_CACHE/<model>-prompt-embeds-<hash>/, keyed by the weights' source, the sequence length and the
    prompt set."""
    key = {"model": model, "source": source, "max_sequence_length": max_sequence_length,
           "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
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


def build_pipeline_task(args, keep_reference: bool, device="cpu", log=print) -> Task:
    """FLUX.1-dev (`--model flux`) or SD3.5 (`--model sd3`) from `--pretrained` (a diffusers directory, or a hub
    id already in the local cache). The text encoders embed the prompt set once into a memory-mapped disk cache
    (`CachedTextEncoder`) and are released; once the cache exists they are not even loaded. The transformer is held
    in the mixed-precision dtype (bf16) with fp32 LoRA adapters, or in fp32 for full fine-tuning (AdamW needs fp32
    master weights)."""
    import diffusers
    pipeline_name, policy_name, fetch = PIPELINES[args.model]
    fetch = f"{fetch}, then --pretrained <dir>"
    if not args.pretrained:
        raise SystemExit(f"--model {args.model} needs --pretrained: weights are never downloaded at run time "
                         f"({fetch})")
    if not args.train_prompts:
        raise SystemExit(f"--model {args.model} needs --train-prompts <file.txt|file.jsonl> (and usually "
                         f"--eval-prompts)")
    source = Path(args.pretrained)
    if source.exists() and not (source / "model_index.json").is_file():
        raise SystemExit(f"{source} is not a diffusers pipeline directory (no model_index.json); {fetch}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    offline = source.exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    train = read_prompts(args.train_prompts)
    evals = read_prompts(args.eval_prompts) if args.eval_prompts else train
    prompts = list(dict.fromkeys(train + evals + ([""] if args.model == "sd3" else [])))
    cache = prompt_cache_dir(args.model, prompts, args.max_sequence_length,
                             str(source.resolve()) if source.exists() else args.pretrained)
    encoders = TEXT_ENCODERS[args.model]

    def load(with_text_encoders: bool):
        try:
            return getattr(diffusers, pipeline_name).from_pretrained(
                args.pretrained, dtype=dtype, local_files_only=offline,
                **({} if with_text_encoders else {name: None for name in encoders}))
        except (OSError, ValueError, EnvironmentError) as e:
            raise SystemExit(f"could not load {pipeline_name} from {args.pretrained!r} ({type(e).__name__}: {e}); "
                             f"{fetch}") from None

    # Without a cache, the node's main process loads the whole pipeline and embeds while the others wait; they
    # then find the cache. With one, every process loads the pipeline at once, without its text encoders.
    pipe = None
    with local_main_process_first():
        if not (cache / "meta.json").is_file():
            pipe = load(with_text_encoders=True)
            for name in encoders:
                getattr(pipe, name).to(device)
            CachedTextEncoder.write(cache, prompts, pipeline_encoder(pipe, args.model, args.max_sequence_length,
                                                                     device))
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
    policy = globals()[policy_name](pipe.transformer, pipe.vae, text, resolution=args.resolution,
                                    guidance_scale=args.guidance_scale, lora_rank=args.lora_rank,
                                    lora_alpha=args.lora_alpha, keep_reference=keep_reference, device=device,
                                    **extra)
    return Task(policy, get_reward(args.reward or "pickscore", device, args.reward_dir), train, evals)


def build_shapes_flux(lora_rank=16, lora_alpha=None, keep_reference=False, device="cpu", log=print) -> FluxPolicy:
    """The shapes task's base model (see shapes.py): a small FLUX transformer pretrained by the project on
    rendered coloured shapes (cached; the first call pretrains it, about 15 min on 2 CPU cores), its learned
    word-embedding text encoder and the lossless pixel "VAE". 32x32 images, 64 image tokens."""
    import shapes
    transformer, text_encoder = shapes.pretrain_shapes_base(shapes.SHAPES_BASE_CONFIG, log)
    codec = shapes.PixelCodec(shapes.SHAPES_BASE_CONFIG["pixel_unshuffle"])
    return FluxPolicy(transformer, codec, text_encoder.to(device), resolution=shapes.IMAGE_SIZE,
                      lora_rank=lora_rank, lora_alpha=lora_alpha, keep_reference=keep_reference, device=device)


# ======================================================================================================
# Rewards
# ======================================================================================================
# A reward is a callable `(decoded_samples, prompts) -> (B,) float tensor`; REWARDS maps names to factories.


def toy_mode_reward(points: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """toy2d: `exp(-|x - mu_c|^2 / 2)`, closeness to the mode the prompt asks for (1 at the mode)."""
    mu = toy_modes().to(points.device)[[parse_toy_prompt(p) for p in prompts]]
    return torch.exp(-((points - mu) ** 2).sum(-1) / 2)


def toy_on_manifold(points: torch.Tensor, prompts: list[str] = None) -> torch.Tensor:
    """toy2d quality metric: 1 where the sample lies within 1.0 of SOME ring mode (on the data manifold)."""
    dist = torch.cdist(points.float(), toy_modes().to(points.device))
    return (dist.min(dim=-1).values < 1.0).float()


COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
          "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
          "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5), "gray": (0.5, 0.5, 0.5), "pink": (1.0, 0.75, 0.8)}


def mean_color_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """tiny-flux: `1 - |mean RGB - colour named by the prompt| / sqrt(3)`, in [0, 1]. Prompts end in a colour."""
    try:
        target = torch.tensor([COLORS[p.split()[-1]] for p in prompts], device=images.device)
    except KeyError as e:
        raise ValueError(f"mean_color prompts must end in one of {sorted(COLORS)}; got {e.args[0]!r}") from None
    return 1 - (images.float().mean(dim=(2, 3)) - target).norm(dim=-1) / math.sqrt(3)


def geneval_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """shapes: the fraction of the prompt's GenEval-style checks (colour, shape, count, position) that pass."""
    import shapes
    return shapes.check(images, prompts)["score"]


REWARDS: dict[str, Callable] = {"toy_mode": toy_mode_reward, "mean_color": mean_color_reward,
                                "geneval": geneval_reward}

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
    with the unmaintained `hpsv2` package (ENGINEERING notes)."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else \
            model.visual.image_size

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


class WeightedReward:
    """sum_k w_k r_k(images, prompts): the multi-reward training of Flow-GRPO / DanceGRPO (e.g. "hpsv2:1,clip:1")."""

    def __init__(self, parts: list[tuple[float, Callable]]):
        self.parts = parts

    def __call__(self, images, prompts):
        return sum(w * fn(images, prompts).float().to(images.device) for w, fn in self.parts)


def get_reward(spec: str, device="cpu", root: Optional[str] = None) -> Callable:
    """A reward by name ("pickscore"), or a weighted sum ("hpsv2:1.0,clip:0.5")."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:  # before loading a model: a typo must not cost a model load first
            weight = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward weight must be a number: {item!r} (use name:weight)") from None
        if name in REWARDS:
            fn = REWARDS[name]
        elif name in LEARNED_REWARDS:
            fn = LEARNED_REWARDS[name](reward_dir(root), device)
        else:
            raise ValueError(f"unknown reward {name!r}; available: {sorted(REWARDS) + sorted(LEARNED_REWARDS)}")
        parts.append((weight, fn))
    return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else WeightedReward(parts)


# ======================================================================================================
# Tasks: a model with its prompts, its training reward and its quality metrics
# ======================================================================================================


@dataclass
class Task:
    policy: Policy
    reward_fn: Callable
    train_prompts: list[str]
    eval_prompts: list[str]
    metrics: dict[str, Callable] = field(default_factory=dict)  # name -> (samples, prompts) -> (B,) per-sample
    grid_prompts: list[str] = field(default_factory=list)  # image tasks: rows of samples_{before,after}.png


MODELS = ("toy2d", "tiny-flux", "shapes", "flux", "sd3")  # flux / sd3: FLUX.1-dev / SD3.5 from --pretrained
CUSTOM_MODELS: dict[str, Callable] = {}


def register_model(name: str, build_task: Callable):
    """Make `--model name` build `build_task(args, keep_reference, device, log) -> Task`: your own model and prompts
    through every script unchanged (pass a --preset; benchmarks/overhead.py and gpu_timing.py time other FLUX
    configs this way)."""
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


def load_task(args, keep_reference: bool, device="cpu", log=print) -> Task:
    """Build the model named by `args.model` with its default prompts, reward and metrics; `--train-prompts` /
    `--eval-prompts` files replace the default prompt sets."""
    task = _build_task(args, keep_reference, device, log)
    if args.gradient_checkpointing:
        task.policy.enable_gradient_checkpointing()
    if args.train_prompts:
        task.train_prompts = read_prompts(args.train_prompts)
    if args.eval_prompts:
        task.eval_prompts = read_prompts(args.eval_prompts)
    log(f"prompts: {len(task.train_prompts)} train, {len(task.eval_prompts)} eval")
    return task


def _build_task(args, keep_reference: bool, device="cpu", log=print) -> Task:
    if args.model in CUSTOM_MODELS:
        return CUSTOM_MODELS[args.model](args, keep_reference, device, log)
    if args.model == "toy2d":
        prompts = [f"mode {i}" for i in range(TOY_NUM_MODES)]
        policy = Toy2DPolicy(device=device, keep_reference=keep_reference, log=log)
        reward = get_reward(args.reward or "toy_mode", device, args.reward_dir)
        return Task(policy, reward, prompts, prompts, {"on_manifold": toy_on_manifold})
    if args.model == "tiny-flux":
        policy = build_tiny_flux(resolution=args.resolution, guidance_scale=args.guidance_scale,
                                 lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, keep_reference=keep_reference,
                                 device=device, seed=args.seed)
        colors = list(COLORS)
        reward = get_reward(args.reward or "mean_color", device, args.reward_dir)
        return Task(policy, reward, [f"a photo of {c}" for c in colors[:8]],
                    [f"a photo of {c}" for c in colors[8:]])
    if args.model == "shapes":
        import shapes
        policy = build_shapes_flux(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                   keep_reference=keep_reference, device=device, log=log)
        train, held_out = shapes.split_prompts(shapes.SHAPES_BASE_CONFIG["eval_fraction"],
                                               shapes.SHAPES_BASE_CONFIG["split_seed"])
        return Task(policy, get_reward(args.reward or "geneval", device, args.reward_dir), train, held_out,
                    {"accuracy": lambda x, p: shapes.check(x, p)["accuracy"],
                     "quality": lambda x, p: shapes.check(x, p)["quality"]}, grid_prompts=shapes.grid_prompts())
    if args.model in PIPELINES:
        return build_pipeline_task(args, keep_reference, device, log)
    raise ValueError(f"unknown model {args.model!r}; available: {', '.join(MODELS)}")


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


@torch.no_grad()
def evaluate(task: Task, args) -> dict[str, float]:
    """Deterministic-ODE evaluation on the eval prompts with fixed seeds (the same noise before and after).

    Returns the mean reward and the mean of each task metric. NFE spent here is not counted.
    """
    policy = task.policy
    prompts = [p for p in task.eval_prompts for _ in range(args.eval_samples_per_prompt)]
    generator = torch.Generator().manual_seed(args.eval_seed)
    noise = policy.initial_noise(len(prompts), generator)
    sigmas = policy.sigmas(args.eval_steps, args.shift)
    rewards, metrics = [], {k: [] for k in task.metrics}
    chunk = args.eval_batch_size or len(prompts)
    with policy.nfe_paused():
        for i in range(0, len(prompts), chunk):
            p = prompts[i:i + chunk]
            x0 = sample_ode(policy, noise[i:i + chunk], sigmas, policy.encode_prompts(p), solver=args.eval_solver)
            samples = policy.decode(x0)
            rewards.append(task.reward_fn(samples, p))
            for k, fn in task.metrics.items():
                metrics[k].append(fn(samples, p))
    check_finite("evaluation reward", torch.cat(rewards))
    out = {"reward": torch.cat(rewards).mean().item()}
    out.update({k: torch.cat(v).mean().item() for k, v in metrics.items()})
    return out


# ======================================================================================================
# Arguments and presets
# ======================================================================================================


def arg(default, help: str, **kw):
    """A dataclass field with its help text (HfArgumentParser turns it into a --flag)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class CommonArgs:
    """Flags shared by every script. Each script subclasses this with its method's hyperparameters."""

    # run
    model: str = arg("toy2d", f"which model: {', '.join(MODELS)}")
    preset: Optional[str] = arg(None, "named setting (see the script's PRESETS); default: the one named after --model")
    iterations: int = arg(100, "RL iterations (rollout + update)")
    seed: int = arg(0, "seed; each process adds its rank for rollout noise")
    output_dir: Optional[str] = arg(None, "where metrics.jsonl, summary.json and weights go (default under runs/)")
    report_to: str = arg("none", "also log to 'tensorboard' or 'wandb' through accelerate's trackers")
    mixed_precision: Optional[str] = arg(None, "'no', 'bf16' or 'fp16' (accelerate autocast); default: the "
                                               "accelerate launch config's, else 'no'")
    log_every: int = arg(10, "print a console line every N iterations")
    save_weights: bool = arg(True, "save the trained weights to <output_dir>/final at the end")
    checkpoint_every: int = arg(100, "save a resumable checkpoint every N iterations (0: never)")
    checkpoints_total_limit: int = arg(2, "keep only the newest N checkpoints")
    resume_from_checkpoint: Optional[str] = arg(None, "resume from a checkpoint directory, or 'latest' in --output-dir")
    attention_backend: str = arg("auto", "attention kernel: 'auto' (on a GPU flash, else memory-efficient, never "
                                          "cuDNN, whose backward gives NaN on H100/H200 with torch 2.11), 'flash', "
                                          "'efficient', 'cudnn' or 'math'; checked against math before training")
    dist_timeout_minutes: int = arg(120, "how long a process waits for the others at a collective (NCCL's default 10 "
                                         "min is shorter than embedding a large prompt set on the main process)")
    # model
    reward: Optional[str] = arg(None, "training reward (default: the model's), or a weighted sum 'hpsv2:1,clip:0.5'; "
                                      f"available: {sorted(REWARDS) + sorted(LEARNED_REWARDS)}")
    pretrained: Optional[str] = arg(None, "--model flux: a diffusers FLUX.1-dev directory (or a hub id already in the "
                                          "local cache); nothing is downloaded")
    max_sequence_length: int = arg(512, "--model flux: T5 tokens per prompt (FLUX.1-dev: 512)")
    reward_dir: Optional[str] = arg(None, "where learned reward weights live (default $FLOWRL_REWARDS, else "
                                          "~/.cache/flowrl/rewards); the error for a missing one says what to fetch")
    train_prompts: Optional[str] = arg(None, "training prompts from a .txt (one per line) or .jsonl ('prompt' field) "
                                             "file, instead of the model's default set")
    eval_prompts: Optional[str] = arg(None, "evaluation prompts from a .txt or .jsonl file")
    resolution: int = arg(32, "image resolution in pixels (image models)")
    guidance_scale: float = arg(3.5, "FLUX guidance embedding value (FLUX.1-dev is guidance-distilled: no CFG)")
    lora_rank: int = arg(0, "LoRA rank for image models; 0 means full fine-tuning")
    lora_alpha: Optional[float] = arg(None, "LoRA alpha (default 2 x rank, as the reference code)")
    gradient_checkpointing: bool = arg(False, "recompute transformer activations in backward (less memory, ~1 more "
                                              "forward per gradient call)")
    # sampling
    num_steps: int = arg(10, "sampling steps N of a training rollout")
    shift: Optional[float] = arg(None, "static timestep shift; default: the model's (FLUX: dynamic shift, toy: none)")
    prompts_per_iteration: int = arg(8, "prompts (groups) per iteration per process")
    group_size: int = arg(16, "samples per prompt, G")
    rollout_batch_size: int = arg(0, "model-call batch during rollouts (0: all samples at once)")
    # optimisation
    learning_rate: float = arg(1e-3, "AdamW learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    # evaluation
    eval_every: int = arg(0, "also evaluate every N iterations (0: only before and after training)")
    eval_steps: int = arg(20, "ODE steps of the evaluation sampler")
    eval_solver: str = arg("euler", "evaluation ODE solver: 'euler' or 'dpm2m'")
    eval_samples_per_prompt: int = arg(64, "evaluation samples per eval prompt")
    eval_batch_size: int = arg(0, "model-call batch during evaluation (0: all at once)")
    eval_seed: int = arg(12345, "seed of the fixed evaluation noise (distinct from training seeds)")


def parse_args(args_cls, presets: dict[str, dict], argv: Optional[list[str]] = None):
    """Parse flags into `args_cls`: dataclass defaults < preset < command line (or a .json/.yaml file).

    The preset defaults to the one named after `--model`. A single argument ending in .json/.yaml is read
    as a config file by HfArgumentParser (its keys are the field names).
    """
    from transformers import HfArgumentParser
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(args_cls)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        reader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        (args,) = reader(argv[0])
        return _check_args(args, presets)
    pre = HfArgumentParser(args_cls)
    known, _ = pre.parse_known_args(argv)
    name = known.preset
    if name is None:  # the preset named after the model, else the (paper) preset made for that model
        if known.model not in MODELS + tuple(CUSTOM_MODELS):
            raise SystemExit(f"unknown model {known.model!r}; available: {', '.join(MODELS + tuple(CUSTOM_MODELS))}")
        matching = [n for n, p in presets.items() if p.get("model") == known.model]
        name = known.model if known.model in presets else (matching[0] if matching else None)
        if name is None:
            raise SystemExit(f"this script has no preset for --model {known.model}; available: {', '.join(presets)}")
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r}; available: {', '.join(presets)}")
    names = {f.name for f in dataclasses.fields(args_cls)}
    bad = set(presets[name]) - names
    if bad:
        raise ValueError(f"preset {name!r} sets unknown fields {sorted(bad)}")
    parser.set_defaults(**presets[name], preset=name)
    (args,) = parser.parse_args_into_dataclasses(argv)
    return _check_args(args, presets)


def _check_args(args, presets):
    if args.model not in MODELS + tuple(CUSTOM_MODELS):
        raise SystemExit(f"unknown model {args.model!r}; available: {', '.join(MODELS + tuple(CUSTOM_MODELS))}")
    if args.eval_solver not in ("euler", "dpm2m"):
        raise SystemExit(f"unknown eval solver {args.eval_solver!r}: use 'euler' or 'dpm2m'")
    return args


# ======================================================================================================
# Run plumbing: accelerator, seeding, logging, metrics.jsonl / summary.json
# ======================================================================================================


def weight_fingerprint(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(len(names), 2) float64: each named tensor's sum and sum of squares. Any real update changes it, and it keeps
    no copy of the weights (12B parameters in fp32 are 48 GB)."""
    return torch.stack([torch.stack([state[n].double().sum(), state[n].double().square().sum()]) for n in names])


def mean_stats(stats: list[dict]) -> dict:
    """Average a list of per-step statistics dicts key by key."""
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}


class Run:
    """One training run: the Accelerator, per-process seeding, console + jsonl + tracker logging, summary."""

    def __init__(self, args, algorithm: str):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        self.args, self.algorithm = args, algorithm
        resume = args.resume_from_checkpoint
        if args.output_dir is None and resume not in (None, "latest"):
            args.output_dir = str(Path(resume).resolve().parent.parent)  # <output_dir>/checkpoints/checkpoint-N
        if args.output_dir is None:
            if resume == "latest":
                raise SystemExit("--resume-from-checkpoint latest needs the --output-dir of the run to resume")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            args.output_dir = str(Path("runs") / f"{algorithm}_{args.model}_s{args.seed}_{stamp}")
        self.out = Path(args.output_dir)
        if args.report_to not in ("none", "tensorboard", "wandb"):
            raise SystemExit(f"--report-to must be 'none', 'tensorboard' or 'wandb', got {args.report_to!r}")
        if args.report_to != "none":  # accelerate skips a tracker whose package is missing, silently
            from accelerate.utils import is_tensorboard_available, is_wandb_available
            if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[args.report_to]():
                raise SystemExit(f"--report-to {args.report_to} needs its package: pip install {args.report_to}")
        # Each main() is a run of its own: forget the precision and accumulation state an earlier run left in this
        # process (tests and notebooks call several; accelerate keeps it process-wide). The process group stays.
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs
        # trackers write under <output_dir> (tensorboard: <output_dir>/<algorithm>/)
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision,
                                       log_with=None if args.report_to == "none" else args.report_to,
                                       project_dir=str(self.out), cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[InitProcessGroupKwargs(
                                           timeout=timedelta(minutes=args.dist_timeout_minutes))])
        args.mixed_precision = self.accelerator.mixed_precision  # None: what `accelerate launch` configured
        set_seed(args.seed + self.accelerator.process_index)  # rollout noise differs per process
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
            if resume is None:
                (self.out / "metrics.jsonl").write_text("")
        if args.report_to != "none":
            self.accelerator.init_trackers(algorithm, config={k: v for k, v in dataclasses.asdict(args).items()
                                                              if isinstance(v, (int, float, str, bool))})
        self.start_time = time.time()
        self.eval_seconds = 0.0
        self.elapsed_before = 0.0  # wall seconds of the run before a resume
        self.first_iteration = 0
        self.iteration = None  # the iteration in progress (None: before training)
        self.evaluating = None  # the label of the evaluation in progress
        NonFiniteError.where = self._position

    def _position(self) -> str:
        """Where a stopped run stands, for its one-line message: the iteration and what is on disk."""
        found = self._checkpoints()
        where = (f" in the {self.evaluating} evaluation" if self.evaluating else
                 f" at iteration {self.iteration}" if self.iteration is not None else " before training")
        resume = (f"last checkpoint {found[-1]} (resume: --resume-from-checkpoint latest --output-dir {self.out})"
                  if found else "no checkpoint")
        return f"{where}; {resume}; no final weights were written"

    @property
    def device(self):
        return self.accelerator.device

    def print(self, msg: str):
        if self.is_main:
            from tqdm.auto import tqdm
            tqdm.write(msg)

    def start(self, task: Task, **state) -> dict[str, float]:
        """Begin training: resume from a checkpoint if asked, else evaluate the base model. Returns the
        "before" evaluation. `state` names whatever else a checkpoint must restore for an exact resume: torch
        Generators and objects with state_dict / load_state_dict (the model, optimizer and RNGs are handled)."""
        self.task, self.state = task, state
        from infra import attention
        mp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.mixed_precision)
        dtype = mp or next(task.policy._unwrapped().parameters()).dtype  # what the attention inputs are in
        attention.configure(self.args.attention_backend, task.policy.attention_shape(), dtype, self.device,
                            self.print)
        if self.args.resume_from_checkpoint is None:
            self.before = self.evaluate(task, "before")
            return self.before
        path = self._resolve_checkpoint(self.args.resume_from_checkpoint)
        self.accelerator.load_state(str(path))
        saved = torch.load(path / f"run_state_{self.accelerator.process_index}.pt", weights_only=False)
        for name, obj in state.items():
            if isinstance(obj, torch.Generator):
                obj.set_state(saved["state"][name])
            else:
                obj.load_state_dict(saved["state"][name])
        progress = saved["progress"]
        task.policy.nfe = dict(progress["nfe"])
        self.first_iteration, self.before = progress["iteration"], progress["before"]
        self.fingerprint_before = progress["fingerprint_before"]
        self.elapsed_before, self.eval_seconds = progress["elapsed"], progress["eval_seconds"]
        if self.is_main:  # drop metrics logged after the checkpoint: those iterations run again
            log = self.out / "metrics.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            kept = [l for l in lines if json.loads(l)["iteration"] < self.first_iteration]
            log.write_text("".join(l + "\n" for l in kept))
        self.print(f"resumed from {path} at iteration {self.first_iteration}")
        return self.before

    def _checkpoints(self) -> list[Path]:
        """This run's checkpoint directories, oldest first."""
        return sorted((self.out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))

    def _resolve_checkpoint(self, resume: str) -> Path:
        if resume == "latest":
            found = self._checkpoints()
            if not found:
                raise SystemExit(f"no checkpoint to resume in {self.out / 'checkpoints'}")
            return found[-1]
        path = Path(resume)
        if not (path / f"run_state_{self.accelerator.process_index}.pt").exists():
            raise SystemExit(f"{path} is not a checkpoint of this script (no run_state_*.pt); "
                             f"checkpoints live in <output_dir>/checkpoints/checkpoint-N")
        return path

    def save_checkpoint(self, iterations_done: int):
        """<output_dir>/checkpoints/checkpoint-N: accelerate's state (model, optimizer, every process's RNGs), each
        process's run state (generators, EMA, counters, the before-evaluation), and the weights in the format
        the policy's `save` writes (for FLUX LoRA: what `FluxPipeline.load_lora_weights` reads)."""
        path = self.out / "checkpoints" / f"checkpoint-{iterations_done}"
        self.accelerator.save_state(str(path))
        state = {name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
                 for name, obj in self.state.items()}
        progress = {"iteration": iterations_done, "nfe": dict(self.task.policy.nfe), "before": self.before,
                    "fingerprint_before": self.fingerprint_before,
                    "elapsed": self.elapsed_before + time.time() - self.start_time, "eval_seconds": self.eval_seconds}
        torch.save({"state": state, "progress": progress}, path / f"run_state_{self.accelerator.process_index}.pt")
        self.task.policy.save(path / "weights")  # every process: FSDP gathers the weights collectively
        self.accelerator.wait_for_everyone()
        if self.is_main:
            limit = self.args.checkpoints_total_limit
            for p in self._checkpoints()[:-limit] if limit > 0 else []:
                shutil.rmtree(p)

    def progress(self, iterations: int):
        from tqdm.auto import tqdm
        # disable=None: a bar on a terminal only; logs get the console lines instead
        return tqdm(range(self.first_iteration, iterations), initial=self.first_iteration, total=iterations,
                    desc=self.algorithm, disable=None if self.is_main else True, dynamic_ncols=True)

    def evaluate(self, task: Task, label: str) -> dict[str, float]:
        t0 = time.time()
        self.evaluating = label
        result = evaluate(task, self.args)
        self.evaluating = None
        if task.grid_prompts and label in ("before", "after") and self.is_main:
            sample_grid(task, self.args, self.out / f"samples_{label}.png")
        self.eval_seconds += time.time() - t0
        self.print(f"[eval {label}] " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def make_optimizer(self, policy: Policy):
        """AdamW over the trainable parameters, handed with the model to accelerate (DDP/FSDP/DeepSpeed, autocast)."""
        a = self.args
        from accelerate.utils import DistributedType
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self._configure_deepspeed()
        if self.accelerator.num_processes > 1:
            # Every process starts from rank 0's trainable weights. They can differ: LoRA adapters are initialised
            # from each process's own seed. DDP and DeepSpeed broadcast on wrapping; FSDP shards what each holds.
            with torch.no_grad():
                for p in policy.trainable_parameters():
                    torch.distributed.broadcast(p.data, src=0)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=a.learning_rate, weight_decay=a.weight_decay,
                                      betas=(0.9, a.adam_beta2))
        self.trainable_names = [n for n, p in policy.net.named_parameters() if p.requires_grad]
        self.fingerprint_before = weight_fingerprint(policy.net.state_dict(), self.trainable_names)
        return policy.prepare(self.accelerator, optimizer)

    def _configure_deepspeed(self):
        """The DeepSpeed engine clips and steps by itself, at the accumulation boundary each script marks (see
        `accumulating`). So: its clipping is --max-grad-norm; its own accumulation count stays 1 (a count would also
        divide every loss by it); and it gets the micro-batch sizes it insists on (no dataloader passes through
        accelerate here: each script builds its batches from rollouts)."""
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("gradient_accumulation_steps", 1) not in (1, "auto"):
            raise SystemExit(f"DeepSpeed config: set gradient_accumulation_steps to 1 (got "
                             f"{config['gradient_accumulation_steps']}); the scripts accumulate over their own "
                             f"backward passes and mark the optimizer step themselves")
        config.update(gradient_accumulation_steps=1, gradient_clipping=self.args.max_grad_norm,
                      train_micro_batch_size_per_gpu=1, train_batch_size=self.accelerator.num_processes)

    def begin_iteration(self, policy: Policy):
        self._t0, self._nfe0 = time.time(), dict(policy.nfe)
        self.iteration = getattr(self, "_next_iteration", self.first_iteration)
        self._next_iteration = self.iteration + 1

    def end_iteration(self, iteration: int, task: Task, rewards: torch.Tensor, losses: dict, **extra):
        """Log one iteration: reward statistics of the (gathered) rewards (groups, G), this iteration's NFE
        without and with gradient, its time, the loss statistics, any extra metric, and an evaluation every
        `--eval-every` iterations."""
        nfe = task.policy.nfe
        metrics = {"reward/mean": rewards.mean(), "reward/std": rewards.std(),
                   "reward/group_std": rewards.std(dim=-1).mean(),
                   "nfe/rollout": nfe["no_grad"] - self._nfe0["no_grad"], "nfe/train": nfe["grad"] - self._nfe0["grad"],
                   "time/iteration_seconds": time.time() - self._t0,
                   **{f"loss/{k}": v for k, v in losses.items()}, **extra}
        every = self.args.eval_every
        if every and (iteration + 1) % every == 0 and iteration + 1 < self.args.iterations:
            metrics.update({f"eval/{k}": v for k, v in self.evaluate(task, f"it {iteration + 1}").items()})
        self.log(iteration, metrics)
        for k, v in metrics.items():  # before any checkpoint is written from this state
            if isinstance(v, (float, int, torch.Tensor)):
                check_finite(k, v)
        every = self.args.checkpoint_every
        if every and (iteration + 1) % every == 0 and iteration + 1 < self.args.iterations:
            self.save_checkpoint(iteration + 1)

    def log(self, iteration: int, metrics: dict):
        """One line of metrics.jsonl per iteration, a console line every `log_every`, and the trackers."""
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
            if self.args.log_every and (iteration % self.args.log_every == 0 or iteration == self.args.iterations - 1):
                self.print(f"it {iteration:4d}  " + "  ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
        if self.args.report_to != "none":
            self.accelerator.log(metrics, step=iteration)

    def finish(self, task: Task, before: dict, after: dict, **extra) -> dict:
        """Write summary.json (keys every benchmark reads) and the trained weights."""
        wall = self.elapsed_before + time.time() - self.start_time
        # NFE totals of the whole run: every process's model calls
        nfe = self.accelerator.reduce(torch.tensor([task.policy.nfe["no_grad"], task.policy.nfe["grad"]],
                                                   device=self.device), reduction="sum").tolist()
        summary = {"algorithm": self.algorithm, "model": self.args.model, "preset": self.args.preset,
                   "iterations": self.args.iterations, "seed": self.args.seed,
                   "eval_reward_before": before["reward"], "eval_reward_after": after["reward"],
                   "nfe_rollout": nfe[0], "nfe_train": nfe[1],
                   "wall_seconds": wall, "train_seconds": wall - self.eval_seconds,
                   "num_processes": self.accelerator.num_processes}
        for k in before:
            if k != "reward":
                summary[f"{k}_before"], summary[f"{k}_after"] = before[k], after[k]
        summary.update(extra)
        self.accelerator.wait_for_everyone()
        state = task.policy.full_state_dict()  # every process: FSDP gathers the weights collectively
        if self.is_main:  # did training move the weights? (a smoke run must fail when it did not)
            changed = weight_fingerprint(state, self.trainable_names) != self.fingerprint_before
            summary["trainable_tensors_changed"] = int(changed.any(-1).sum())
            summary["trainable_tensors"] = len(self.trainable_names)
        if self.args.save_weights:
            task.policy.save(self.out / "final", state)
            summary["weights"] = str(self.out / "final")
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self.print(f"summary: {self.out / 'summary.json'}\n" + json.dumps(summary, indent=2))
        if self.args.report_to != "none":
            self.accelerator.end_training()
        return summary
