"""Pro-GRPO: proactive GRPO, expand a group and prune it early to its highest-variance subset.

Pro-GRPO (CVPR 2026, arXiv 2512.15347; no official code). Two observations: (1) in a large group most
trajectories cluster at the mean reward and carry almost no advantage (reward clustering); (2) the subset of
size k with the highest reward variance (Optimal Variance Filtering, OVF) trains better than the whole group.
Doing OVF after sampling still pays for the discarded trajectories, so Pro-GRPO prunes DURING sampling:

    1. expand    start G_max SDE trajectories per prompt (Flow-GRPO's sampler)
    2. prune     at checkpoint steps j, score the one-step projection x0_hat = x_j - s_j v_j with the training
                 reward (v_j is the velocity the SDE step needs anyway: no extra model call), keep the OVF
                 subset of the next funnel size, stop the rest (they cost nothing afterwards)
    3. update    on the survivors only: advantages from their TRUE final rewards (z-score within the survivors),
                 the baseline's PPO-clipped loss and optional KL

Paper setting (SD3.5-M, Flow-GRPO base, 10 steps): 48 -> 24 -> 12 at steps {5, 7} (Flash: 24 -> 16 -> 12);
claimed -26% full-epoch FLOPs (Flash -41%) against Flow-GRPO with G = 24, at higher PickScore.

Run:
    python pro_grpo.py                                   # toy2d: 32 -> 16 -> 8, CPU
    python pro_grpo.py --model tiny-flux --iterations 2  # the FLUX code path, random weights
    python pro_grpo.py --model shapes                    # text-to-image on CPU: coloured shapes (infra/shapes.py)
    accelerate launch pro_grpo.py --preset pro-grpo-sd3 --pretrained <SD3.5-M dir> --train-prompts <file>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from common import (EMA, CommonArgs, arg, check_finite, gathered_group_advantages, mean_stats, sde_step_with_logprob,
                    select)
from infra.args import int_list, parse_args
from infra.distributed import accumulating, optimizer_step
from infra.run import Run
from infra.tasks import load_task


@dataclass
class Args(CommonArgs):
    # the funnel
    group_sizes: str = arg("32,16,8", "group size before the first checkpoint and after each one: G_max,...,G_final")
    group_size: Optional[int] = arg(None, "not used: the funnel's sizes are --group-sizes",
                                    unused="Pro-GRPO's group sizes are --group-sizes G_max,...,G_final")
    prune_steps: str = arg("5,7", "sampling steps j at which the group is pruned (one per funnel stage)")
    # the SDE (Flow-GRPO's, as the paper's base method)
    sde_variant: str = arg("flow_grpo", "'flow_grpo': std = a sqrt(s/(1-s)); 'dance_grpo': constant eta",
                           choices=("flow_grpo", "dance_grpo"))
    noise_level: float = arg(0.7, "Flow-GRPO's a (0.7 SD3)", min=0)
    timestep_fraction: float = arg(0.99, "train the first int(N * fraction) transitions (0.99: all but the last)",
                                   above=0, max=1)
    # GRPO / PPO on the survivors
    adv_std: str = arg("group", "advantage std: 'group' = z-score within each group's survivors (paper), or 'global'",
                       choices=("group", "global"))
    adv_clip: float = arg(5.0, "advantage clip", above=0)
    clip_range: float = arg(1e-4, "PPO ratio clip eps", above=0)
    kl_beta: float = arg(0.0, "weight of the KL to the frozen reference (Flow-GRPO base: 0.01 PickScore, 0.04 "
                              "GenEval/OCR on SD3)", min=0)
    updates_per_iteration: int = arg(2, "optimizer steps per iteration, each on 1/this of the survivors", min=1)
    train_micro_batch_size: int = arg(0, "samples per forward/backward (0: the whole minibatch); memory only", min=0)
    eval_ema: bool = arg(True, "evaluate, and save as final/, an EMA of the trained weights (the Flow-GRPO base's "
                               "train.ema: decay 0.9, every 8 optimizer steps)")

    def __post_init__(self):  # a bad funnel stops as the flags are parsed, with one line
        parse_funnel(self)


PRESETS = {
    # The toy, Flow-GRPO base with per-group std: expand to 32, keep 16 after step 5 and 8 after step 7. Compare
    # with `flow_grpo.py --group-size 8` (the unpruned group of the same final size) at the same budget.
    "toy2d": dict(model="toy2d", iterations=400, num_steps=10, group_sizes="32,16,8", prune_steps="5,7",
                  prompts_per_iteration=8, learning_rate=1e-3, clip_range=0.2, log_every=50),
    # The FLUX code path with random weights. No evaluation EMA: it updates every 8 optimizer steps, so after 4 the
    # "after" evaluation and final/ would be the base weights.
    "tiny-flux": dict(model="tiny-flux", iterations=4, num_steps=6, group_sizes="8,4,2", prune_steps="3,4",
                      prompts_per_iteration=2, lora_rank=8, learning_rate=1e-3, eval_steps=6,
                      eval_samples_per_prompt=2, log_every=1, eval_ema=False),
    # Stops at 20 iterations: later the reward rises slowly while the quality metric falls (seed 0, trained weights:
    # reward 0.390 -> 0.458 at 20, 0.473 at 40; quality 0.602 -> 0.582, 0.562; docs/benchmarks.md, reward hacking).
    "shapes": dict(model="shapes", iterations=20, num_steps=10, group_sizes="32,16,8", prune_steps="5,7",
                   prompts_per_iteration=8, lora_rank=16, learning_rate=3e-4, clip_range=1e-3, eval_steps=20,
                   eval_samples_per_prompt=2, log_every=5),
    # Paper, SD3.5-M on the Flow-GRPO base (no official code): 10 steps, 48 -> 24 -> 12 at steps 5 and 7; the rest is
    # Flow-GRPO's pickscore_sd3 config (48 groups per iteration, LoRA r32, lr 3e-4, KL 0.01, the EMA evaluated).
    "pro-grpo-sd3": dict(model="sd3", reward="pickscore", resolution=512, num_steps=10, shift=3.0, guidance_scale=4.5,
                         group_sizes="48,24,12", prune_steps="5,7", prompts_per_iteration=48, noise_level=0.7,
                         lora_rank=32, lora_alpha=64, learning_rate=3e-4, clip_range=1e-4, kl_beta=0.01, eval_steps=40,
                         eval_samples_per_prompt=1, iterations=1000, train_micro_batch_size=8, rollout_batch_size=8,
                         eval_batch_size=8, mixed_precision="bf16"),
    # The paper's Flash funnel: 24 -> 16 -> 12.
    "pro-grpo-flash-sd3": dict(model="sd3", reward="pickscore", resolution=512, num_steps=10, shift=3.0,
                               guidance_scale=4.5, group_sizes="24,16,12", prune_steps="5,7",
                               prompts_per_iteration=48, noise_level=0.7, lora_rank=32, lora_alpha=64,
                               learning_rate=3e-4, clip_range=1e-4, kl_beta=0.01, eval_steps=40,
                               eval_samples_per_prompt=1, iterations=1000, train_micro_batch_size=8,
                               rollout_batch_size=8, eval_batch_size=8, mixed_precision="bf16"),
}


# ======================================================================================================
# ALGO LOGIC: Optimal Variance Filtering
# ======================================================================================================


def optimal_variance_filter(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the size-k subset with the largest reward variance: K* = argmax_{|K| = k} Var({R_g : g in K}).

    The optimum is always the j largest plus the k - j smallest rewards for some j (PODS, arXiv 2504.13818:
    moving any kept value toward the extremes never lowers the variance), so sort once and scan j = 0..k,
    O(N log N) instead of C(N, k). Ties are broken by the sort order.
    """
    n = rewards.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} trajectories")
    order = torch.argsort(rewards.float(), descending=True)
    r = rewards.float()[order]
    best, best_j = -1.0, 0
    for j in range(k + 1):  # j from the top, k - j from the bottom
        subset = torch.cat([r[:j], r[n - (k - j):]])
        var = subset.var(unbiased=False).item() if k > 1 else 0.0
        if var > best + 1e-12:
            best, best_j = var, j
    return torch.cat([order[:best_j], order[n - (k - best_j):]])


# ======================================================================================================
# ALGO LOGIC: expand-and-prune SDE rollout
# ======================================================================================================


@torch.no_grad()
def expand_and_prune_rollout(policy, prompts, sigmas, group_sizes, prune_steps, reward_fn, noise_level: float,
                             variant: str, chunk: int = 0):
    """Flow-GRPO's SDE rollout of P groups of G_max, pruned at `prune_steps` to the next funnel size.

    At a checkpoint j the velocity v_j of every live trajectory is computed (as for any step), then the proxy
    x0_hat = x_j - s_j v_j is decoded and scored by the training reward, OVF keeps `group_sizes[c + 1]` per
    group, and only the survivors take the SDE step and continue. Returns the survivors' prompts, their states
    (N+1, B_final, ...) and old log-probs (N, B_final), their group id, and the proxy rewards seen. `chunk`
    (--rollout-batch-size) splits the model calls of a step (memory); the SDE noise is drawn for the whole batch, so
    the result is the same.
    """
    P = len(prompts)
    alive_prompt = torch.arange(P).repeat_interleave(group_sizes[0])  # which prompt each live trajectory serves
    cond_all = policy.encode_prompts(prompts)
    x = policy.initial_noise(len(alive_prompt))
    states, log_probs, proxies = [x], [], []
    stage = 0
    for j in range(len(sigmas) - 1):
        cond = select(cond_all, alive_prompt.to(x.device))
        v = policy.velocity(x, sigmas[j], cond, chunk)
        if stage < len(prune_steps) and j == prune_steps[stage]:
            x0_hat = x - sigmas[j].float() * v  # one-step projection: no extra model call
            proxy = reward_fn(policy.decode(x0_hat), [prompts[i] for i in alive_prompt]).view(P, -1)
            keep_k = group_sizes[stage + 1]
            g = proxy.shape[1]
            keep = torch.cat([p * g + optimal_variance_filter(proxy[p].cpu(), keep_k) for p in range(P)])
            keep = keep.to(x.device)
            proxies.append(proxy)
            x, v, alive_prompt = x[keep], v[keep], alive_prompt[keep.cpu()]
            states = [s[keep] for s in states]
            log_probs = [lp[keep] for lp in log_probs]
            stage += 1
        x, lp, _, _ = sde_step_with_logprob(x, v, sigmas[j], sigmas[j + 1], noise_level, variant=variant)
        states.append(x)
        log_probs.append(lp)
    survivors = [prompts[i] for i in alive_prompt]
    return survivors, torch.stack(states), torch.stack(log_probs), alive_prompt, proxies


def funnel_nfe(num_steps: int, group_sizes: list[int], prune_steps: list[int]) -> int:
    """Rollout NFE per prompt of the funnel: a trajectory pruned at step j has paid for steps 0..j."""
    nfe, stage = 0, 0
    for j in range(num_steps):
        nfe += group_sizes[stage]
        if stage < len(prune_steps) and j == prune_steps[stage]:
            stage += 1
    return nfe


def parse_funnel(args):
    """(group sizes G_max, ..., G_final; the pruning steps); a ValueError names the flag at fault."""
    sizes = int_list(args.group_sizes, "--group-sizes")
    steps = int_list(args.prune_steps, "--prune-steps") if args.prune_steps else []
    if len(sizes) != len(steps) + 1:
        raise ValueError(f"--group-sizes {args.group_sizes!r} needs one more entry than --prune-steps "
                         f"{args.prune_steps!r}")
    if any(b > a for a, b in zip(sizes, sizes[1:])) or sizes[-1] < 2:
        raise ValueError(f"--group-sizes must not increase and must end at 2 or more; got {args.group_sizes!r}")
    if steps != sorted(set(steps)) or (steps and (steps[0] < 0 or steps[-1] >= args.num_steps)):
        raise ValueError(f"--prune-steps takes increasing steps in [0, {args.num_steps}) (--num-steps "
                         f"{args.num_steps}); got {args.prune_steps!r}")
    return sizes, steps


# ======================================================================================================
# ALGO LOGIC: the base method's update on the survivors (Flow-GRPO's PPO loss, KL and update, unchanged)
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


# Copied from flow_grpo.sde_transition_loss
def sde_transition_loss(policy, x, x_next, sigma, sigma_next, old_log_prob, advantages, cond, noise_level: float,
                        variant: str, clip_range: float, kl_beta: float):
    """The GRPO loss of stored transitions x -> x_next (one per sample; sigma, sigma_next per sample).

    Recomputes v_theta(x) WITH gradient and scores the stored x_next under the current Gaussian policy (Flow-GRPO's
    `compute_log_prob`); ratio = exp(log pi_theta - log pi_old). With `kl_beta > 0` adds Flow-GRPO's KL to the
    frozen reference: the squared distance of the two policies' means over 2 std^2 (the closed form for Gaussians of
    the same std, up to the step's dt, as the official `kl_loss`).
    """
    v = policy.velocity(x, sigma, cond)
    _, log_prob, mean, std = sde_step_with_logprob(x, v, sigma, sigma_next, noise_level, prev_sample=x_next,
                                                   variant=variant)
    loss, stats = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range)
    stats["policy_loss"] = loss.item()
    if kl_beta > 0:
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, sigma, cond)
        _, _, mean_ref, _ = sde_step_with_logprob(x, v_ref, sigma, sigma_next, noise_level, prev_sample=x_next,
                                                  variant=variant)
        kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std.flatten() ** 2)
        loss = loss + kl_beta * kl.mean()
        stats["kl"] = kl.mean().item()
    return loss, stats


# Copied from flow_grpo.ppo_update
def ppo_update(policy, optimizer, accelerator, states, old_log_probs, advantages, sigmas, cond, steps, *,
               noise_level: float, variant: str, clip_range: float, kl_beta: float, updates: int, micro_batch: int,
               max_grad_norm: float, eval_ema=None):
    """PPO updates over the stored SDE transitions. states (N+1, B, ...), old_log_probs (N, B), advantages (B,),
    `steps` (B, n_train): each sample's trained transitions.

    Each of the `updates` optimizer steps takes a random 1/updates of the samples and accumulates gradients over
    their trained transitions (and micro-batches of `micro_batch` samples), as Flow-GRPO's config accumulates over
    timesteps and half the batches; from the second step on the ratio is off-policy and the clip acts. After each
    optimizer step the evaluation EMA (if any) takes its step. Returns the averaged loss statistics and the last
    gradient norm.
    """
    batch_size, n_train = steps.shape
    stats, sizes = [], []
    for batch in torch.randperm(batch_size, device=steps.device).chunk(updates):
        micro = batch.split(micro_batch or len(batch))
        passes = [(j, mb) for j in range(n_train) for mb in micro]
        for n, (j, mb) in enumerate(passes):
            t = steps[mb, j]  # each sample's own transition t -> t + 1
            with accumulating(accelerator, policy, last=n == len(passes) - 1):  # one all-reduce per optimizer step
                loss, st = sde_transition_loss(policy, states[t, mb], states[t + 1, mb], sigmas[t], sigmas[t + 1],
                                               old_log_probs[t, mb], advantages[mb], select(cond, mb), noise_level,
                                               variant, clip_range, kl_beta)
                accelerator.backward(loss * len(mb) / len(batch) / n_train)
            stats.append(st)
            sizes.append(len(mb))
        grad_norm = optimizer_step(accelerator, policy, optimizer, max_grad_norm)
        if eval_ema is not None:
            eval_ema.step()
    return mean_stats(stats, sizes), grad_norm


# ======================================================================================================
# Main loop
# ======================================================================================================


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    group_sizes, prune_steps = parse_funnel(args)

    # TRY NOT TO MODIFY: accelerator, seeding, model, optimizer
    run = Run(args, "pro_grpo")
    acc = run.accelerator
    task = load_task(args, keep_reference=args.kl_beta > 0, device=run.device, log=run.print)
    policy = task.policy
    run.fit_memory(task, train_field="train_micro_batch_size", unit_samples=1, train_cfg=True,  # the survivors
                   units=-(-run.prompts_per_process * group_sizes[-1] // args.updates_per_iteration))
    optimizer = run.make_optimizer(policy)
    eval_ema = EMA(policy.trainable_parameters(), decay=0.9, every=8) if args.eval_ema else None
    sigmas = policy.sigmas(args.num_steps, args.shift).to(run.device)
    prompt_gen = torch.Generator().manual_seed(args.seed + 1000 * acc.process_index)
    P, G = run.prompts_per_process, group_sizes[-1]  # this process's groups; the iteration's are P x processes
    n_train = max(1, int(args.num_steps * args.timestep_fraction))
    run.print(f"pro_grpo | funnel "
              f"{' -> '.join(map(str, group_sizes))} at steps {prune_steps} | rollout NFE per prompt "
              f"{funnel_nfe(args.num_steps, group_sizes, prune_steps)} vs {G * args.num_steps} for an unpruned "
              f"group of {G} and {group_sizes[0] * args.num_steps} for one of {group_sizes[0]}")

    before = run.start(task, eval_ema=eval_ema, prompt_gen=prompt_gen)  # evaluates the base model, or resumes
    for it in run.progress(args.iterations):
        run.begin_iteration(policy)

        # ALGO LOGIC 1: expand-and-prune SDE rollout; only the G_final survivors per prompt come back
        pick = torch.randint(len(task.train_prompts), (P,), generator=prompt_gen)
        prompts, states, old_log_probs, _, proxies = expand_and_prune_rollout(
            policy, [task.train_prompts[i] for i in pick], sigmas, group_sizes, prune_steps, task.reward_fn,
            args.noise_level, args.sde_variant, args.rollout_batch_size)
        cond = policy.encode_prompts(prompts)

        # ALGO LOGIC 2: TRUE final rewards of the survivors, z-scored within each group's survivors
        rewards = task.reward_fn(policy.decode(states[-1]), prompts).to(run.device)
        all_rewards, advantages = gathered_group_advantages(acc, rewards.view(P, G), args.adv_std, args.adv_clip)

        # ALGO LOGIC 3: the baseline's PPO update on the survivors (Flow-GRPO: first N-1 steps, in order)
        steps = torch.arange(n_train, device=run.device).expand(P * G, n_train)
        stats, grad_norm = ppo_update(policy, optimizer, acc, states, old_log_probs, advantages, sigmas, cond, steps,
                                      noise_level=args.noise_level, variant=args.sde_variant,
                                      clip_range=args.clip_range, kl_beta=args.kl_beta,
                                      updates=args.updates_per_iteration, micro_batch=args.train_micro_batch_size,
                                      max_grad_norm=args.max_grad_norm, eval_ema=eval_ema)

        # TRY NOT TO MODIFY: logging (the proxies' within-group spread at each pruning, over every process's groups)
        proxy_spread = {f"prune/proxy_group_std_{c}": acc.gather(p.to(run.device)).std(dim=1).mean()
                        for c, p in enumerate(proxies)}
        run.end_iteration(it, task, all_rewards, stats, grad_norm=grad_norm, **proxy_spread)

    after = run.evaluate(task, "after")  # the EMA's weights, when it is on
    per_it = P * acc.num_processes * args.iterations
    return run.finish(task, before, after,
                      nfe_rollout_unpruned_same_final_group=per_it * G * args.num_steps,
                      nfe_rollout_unpruned_expanded_group=per_it * group_sizes[0] * args.num_steps,
                      group_sizes=group_sizes, prune_steps=prune_steps)


if __name__ == "__main__":
    main()
