"""G2RPO: Granular-GRPO, singular stochastic sampling with multi-granularity advantages.

G2RPO (CVPR 2026; official code bcmi/Granular-GRPO). Flow-GRPO injects SDE noise at every step and hands the
final reward to every step of the trajectory: no single step can be credited. G2RPO injects noise at ONE
step k, so the group's reward differences are caused by that step alone, and judges each branch after
completing it at several denoising granularities:

    1. anchor    one deterministic Euler ODE trajectory per prompt from its initial noise; store every state
    2. branch    for each k in M (the first half of the steps): G branches take ONE SDE step (Flow-GRPO's
                 formula, a = 0.7) from the shared anchor state x_k to x_{k+1}^i; store log pi_old
    3. complete  each branch by the ODE on the grids  sigmas[:k+2] + sigmas[k+2::lam]  (last node -> 0) for lam
                 in Lambda: fine for the first step after the branch, strided after it (Multi-Granularity
                 Advantage Integration, MGAI)
    4. advantage per k and lam: group z-score of the G rewards; A_mix = sum_lam A^(lam), clipped at 5
    5. update    per k: v_theta at the shared x_k ONCE (all branches share it), the branches' SDE log-probs,
                 PPO-clipped loss (clip 1e-4), no KL, one optimizer step

Gradient NFE per group and iteration is |M| (one forward per shared state), against Flow-GRPO's G x (N - 1).

Run:
    python g2rpo.py                                   # toy2d, CPU
    python g2rpo.py --model tiny-flux --iterations 2  # the FLUX code path, random weights
    python g2rpo.py --model shapes                    # text-to-image on CPU: coloured shapes (infra/shapes.py)
    accelerate launch g2rpo.py --preset g2rpo-flux --pretrained <FLUX.1-dev dir> --train-prompts <file>
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import (CommonArgs, arg, check_finite, euler_step, group_advantages, sample_ode, sde_step_with_logprob,
                    select)
from infra.args import int_list, parse_args
from infra.distributed import optimizer_step
from infra.run import Run
from infra.tasks import load_task


@dataclass
class Args(CommonArgs):
    branch_steps: str = arg("", "the set M of steps k that branch, e.g. '0,1,2,3'; empty: the first half, "
                                "k = 0 .. N/2 - 1 (paper)")
    granularities: str = arg("1,2,3", "Lambda, the completion strides (paper {1,2,3}; official scripts {1,2})")
    noise_level: float = arg(0.7, "a of the one SDE step (Flow-GRPO formula)", above=0)
    adv_clip: float = arg(5.0, "clip of A_mix", above=0)
    clip_range: float = arg(1e-4, "PPO ratio clip eps", above=0)

    def __post_init__(self):  # a bad schedule stops as the flags are parsed, with one line
        parse_schedule(self)


PRESETS = {
    # The toy: 10 Euler steps, branch at k = 0..4, G = 8 over 32 prompts, Lambda = {1, 2} (the official scripts'; the
    # paper's {1, 2, 3} completes with stride 3 on only 10 steps, whose last jump to x0_hat from s = 0.3 scores blurry
    # conditional means: seed 0 ends at eval reward 0.630, on-manifold 0.621, against 0.919 / 0.986 with {1, 2}).
    # The gradient only touches the shared anchor states (one per prompt and k), so the toy needs many prompts per
    # iteration and a gentle lr: with 8 prompts (40 trained states per iteration) the 2D field bends around those
    # points and samples leave the ring (on-manifold 0.25-0.77 at lr 1e-4..1e-3).
    "toy2d": dict(model="toy2d", iterations=200, num_steps=10, group_size=8, prompts_per_iteration=32,
                  granularities="1,2", learning_rate=3e-4, clip_range=0.2, log_every=25),
    "tiny-flux": dict(model="tiny-flux", iterations=4, num_steps=6, group_size=4, prompts_per_iteration=2,
                      lora_rank=8, learning_rate=1e-3, eval_steps=6, eval_samples_per_prompt=2, log_every=1),
    # Stops at 10 iterations: the reward gains nothing after that while the quality metric falls (seed 0: reward
    # 0.390 -> 0.453 at 10, 0.450 at 40; quality 0.610 at 10, 0.550 at 40; docs/benchmarks.md, reward hacking).
    "shapes": dict(model="shapes", iterations=10, num_steps=10, group_size=8, prompts_per_iteration=8,
                   granularities="1,2", lora_rank=16, learning_rate=3e-4, clip_range=1e-3, eval_steps=20,
                   eval_samples_per_prompt=2, log_every=5),  # Lambda {1, 2} on 10 steps, as the toy (above)
    # The paper's FLUX.1-dev setting (official scripts/finetune/finetune_g2rpo_hps.sh): 720 px, 16 steps, shift 3,
    # guidance 3.5, G 12, a 0.7, M = k 0..7, Lambda {1,2,3} (the script: {1,2}), 16 prompts per iteration (2 nodes x
    # 8 GPUs, 1 each), one initial noise per prompt, full fine-tune lr 2e-6, wd 1e-4, clip 1e-4, no KL, 300 steps.
    "g2rpo-flux": dict(model="flux", reward="hpsv2", resolution=720, num_steps=16, shift=3.0, guidance_scale=3.5,
                       prompts_per_iteration=16, group_size=12, noise_level=0.7, granularities="1,2,3", lora_rank=0,
                       learning_rate=2e-6, clip_range=1e-4, iterations=300, rollout_batch_size=4, eval_batch_size=4,
                       eval_samples_per_prompt=1, mixed_precision="bf16"),
}


# ======================================================================================================
# ALGO LOGIC: the multi-granularity completion grid
# ======================================================================================================


def granular_sigmas(sigmas: torch.Tensor, k: int, lam: int) -> torch.Tensor:
    """The schedule on which a branch born at step k is completed with stride lam (Multi-Granularity Advantage
    Integration): `sigmas[:k+2] + sigmas[k+2::lam]`, the anchor's nodes up to the branch's x_{k+1}, the first ODE
    step after it at full resolution, then every lam-th node.

    When that grid does not end at 0, its last node is replaced by 0: the official loop (`run_ode_sample_step` over
    `range(k + 1, len(grid) - 1)`) never evaluates the grid's last node and returns x0_hat predicted at the node
    before it, which is exactly an Euler step from there to s = 0."""
    grid = torch.cat([sigmas[:k + 2], sigmas[k + 2::lam]])
    if grid[-1] != 0:
        grid = grid.clone()
        grid[-1] = 0.0
    return grid


def completion_nfe(sigmas, k, lam) -> int:
    """Model calls to complete one branch from x_{k+1} on its grid."""
    return len(granular_sigmas(sigmas, k, lam)) - (k + 2)


def mixed_advantages(rewards: torch.Tensor, clip: float) -> torch.Tensor:
    """MGAI: rewards (J, P, G), one group z-score per granularity, summed over granularities, then clipped."""
    per_granularity = group_advantages(rewards, std="group", clip=float("inf"))
    return per_granularity.sum(0).clamp(-clip, clip)


# ======================================================================================================
# ALGO LOGIC: singular stochastic rollout
# ======================================================================================================


@torch.no_grad()
def singular_rollout(policy, prompts, sigmas, branch_steps, granularities, G: int, noise_level: float, reward_fn,
                     chunk: int = 0):
    """Anchor ODE per prompt, then for each k: G one-step SDE branches from the shared x_k, completed at every
    granularity and scored.

    Returns the anchor states (N+1, P, ...) and per k a dict with the branches' x_{k+1} (P*G, ...), their old
    log-probs (P*G,) and rewards (J, P, G). The anchor's velocity at x_k is reused for the branch step (same
    weights, same value: the shared state needs one model call, not G).
    """
    P = len(prompts)
    cond = policy.encode_prompts(prompts)
    x = policy.initial_noise(P)
    states, velocities = [x], []
    for j in range(len(sigmas) - 1):  # the deterministic anchor (Euler, as the official code)
        v = policy.velocity(x, sigmas[j], cond)
        x = euler_step(x, v, sigmas[j], sigmas[j + 1])
        states.append(x)
        velocities.append(v)
    rows = torch.arange(P, device=x.device).repeat_interleave(G)
    cond_g, prompts_g = select(cond, rows), [prompts[i] for i in rows.tolist()]
    chunk = chunk or P * G
    branches = []
    for k in branch_steps:
        x_next, log_prob, _, _ = sde_step_with_logprob(states[k][rows], velocities[k][rows], sigmas[k], sigmas[k + 1],
                                                       noise_level)
        rewards = []
        for lam in granularities:
            grid = granular_sigmas(sigmas, k, lam)[k + 1:]  # from x_{k+1} on
            x0 = torch.cat([sample_ode(policy, x_next[i:i + chunk], grid, select(cond_g, slice(i, i + chunk)),
                                       solver="euler") for i in range(0, P * G, chunk)])
            rewards.append(reward_fn(policy.decode(x0), prompts_g).view(P, G))
        branches.append({"k": k, "x_next": x_next, "log_prob": log_prob, "rewards": torch.stack(rewards)})
    return torch.stack(states), branches


def parse_schedule(args):
    """(M, Lambda): the branch steps and the granularities; a ValueError names the flag at fault."""
    grans = int_list(args.granularities, "--granularities")
    steps = int_list(args.branch_steps, "--branch-steps") if args.branch_steps else list(range(args.num_steps // 2))
    if any(g < 1 for g in grans) or len(set(grans)) < len(grans):
        raise ValueError(f"--granularities takes distinct positive integers; got {args.granularities!r}")
    if any(not 0 <= k < args.num_steps for k in steps) or len(set(steps)) < len(steps):
        raise ValueError(f"--branch-steps takes distinct steps in [0, {args.num_steps}) (--num-steps "
                         f"{args.num_steps}); got {args.branch_steps!r}")
    if not steps:
        raise ValueError(f"--num-steps {args.num_steps} has no first half to branch in: give --branch-steps or more "
                         f"steps")
    return steps, grans


# ======================================================================================================
# ALGO LOGIC: the PPO-clipped loss (the official code's, as Flow-GRPO's)
# ======================================================================================================


# Copied from flow_grpo.ppo_clip_loss
def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """PPO's clipped surrogate `mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))`, rho = exp(logp - logp_old)
    (Flow-GRPO train_sd3.py's `policy_loss`, DanceGRPO's `train_one_step`).

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


# ======================================================================================================
# Main loop
# ======================================================================================================


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    branch_steps, granularities = parse_schedule(args)

    # TRY NOT TO MODIFY: accelerator, seeding, model, optimizer
    run = Run(args, "g2rpo")
    acc = run.accelerator
    task = load_task(args, keep_reference=False, device=run.device, log=run.print)
    policy = task.policy
    run.fit_memory(task, train_field=None, unit_samples=run.prompts_per_process, units=1,  # one call on P anchors
                   train_cfg=True)
    optimizer = run.make_optimizer(policy)
    sigmas = policy.sigmas(args.num_steps, args.shift).to(run.device)
    prompt_gen = torch.Generator().manual_seed(args.seed + 1000 * acc.process_index)
    P, G = run.prompts_per_process, args.group_size  # this process's groups; the iteration's are P x processes
    completions = sum(completion_nfe(sigmas, k, lam) for k in branch_steps for lam in granularities)
    rollout_nfe = args.num_steps + G * completions
    run.print(f"g2rpo | G={G} | branch at "
              f"k={branch_steps} | Lambda={granularities} | rollout NFE per prompt {rollout_nfe}, "
              f"gradient NFE per prompt {len(branch_steps)}")

    before = run.start(task, prompt_gen=prompt_gen)  # evaluates the base model, or resumes
    for it in run.progress(args.iterations):
        run.begin_iteration(policy)

        # ALGO LOGIC 1-3: anchor, one-step branches, multi-granularity completion and rewards
        pick = torch.randint(len(task.train_prompts), (P,), generator=prompt_gen)
        prompts = [task.train_prompts[i] for i in pick]
        anchor, branches = singular_rollout(policy, prompts, sigmas, branch_steps, granularities, G, args.noise_level,
                                            task.reward_fn, args.rollout_batch_size)
        cond = policy.encode_prompts(prompts)

        # ALGO LOGIC 4-5: per k, A_mix, then the PPO loss of the G branches from ONE velocity at the shared x_k
        stats = {"policy_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
        for b in branches:
            k = b["k"]
            advantages = mixed_advantages(b["rewards"].to(run.device), args.adv_clip).reshape(-1)
            v = policy.velocity(anchor[k], sigmas[k], cond)  # P calls with gradient, shared by G branches each
            x_k = anchor[k].repeat_interleave(G, dim=0)
            _, log_prob, _, _ = sde_step_with_logprob(x_k, v.repeat_interleave(G, dim=0), sigmas[k], sigmas[k + 1],
                                                      args.noise_level, prev_sample=b["x_next"])
            loss, st = ppo_clip_loss(log_prob, b["log_prob"], advantages, args.clip_range)
            acc.backward(loss)
            grad_norm = optimizer_step(acc, policy, optimizer, args.max_grad_norm)  # one step per k, as the code
            stats["policy_loss"] += loss.item() / len(branches)
            for key in ("clipfrac", "approx_kl"):
                stats[key] += st[key] / len(branches)

        # TRY NOT TO MODIFY: logging (the reward of the full-resolution completion, lam = Lambda[0]; the anchors')
        all_rewards = acc.gather(torch.stack([b["rewards"][0] for b in branches]).to(run.device))
        anchor_rewards = acc.gather(task.reward_fn(policy.decode(anchor[-1]), prompts).to(run.device))
        run.end_iteration(it, task, all_rewards, stats, grad_norm=grad_norm, **{"reward/anchor": anchor_rewards.mean()})

    after = run.evaluate(task, "after")
    return run.finish(task, before, after, branch_steps=branch_steps, granularities=granularities)


if __name__ == "__main__":
    main()
