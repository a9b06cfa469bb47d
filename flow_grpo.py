"""Flow-GRPO / DanceGRPO: GRPO on an SDE version of the flow sampler. The baseline all four papers compare to.

Flow-GRPO (Liu et al. 2025, official code yifan123/flow_grpo, scripts/train_sd3.py) and DanceGRPO (Xue et al. 2025,
official code XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py) turn the deterministic flow ODE into an SDE with the
same marginals, so that every sampling step is a Gaussian policy pi_theta(x_{j+1} | x_j, c) with a log-probability:

    1. rollout   G samples per prompt with the SDE (common.sde_step_with_logprob), storing every state x_j and
                 log pi_old(x_{j+1} | x_j)
    2. reward    score each sample: Flow-GRPO the final SDE state x_N, DanceGRPO the clean prediction
                 x0_hat = x_{N-1} - s_{N-1} v at the last step; GRPO advantages A_i = (r_i - mean_group) / std
    3. update    for the trained transitions j: recompute log pi_theta(x_{j+1} | x_j) and minimise PPO's clipped
                 surrogate  max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),  rho = pi_theta / pi_old
                 (+ Flow-GRPO's KL to the frozen reference), split over several optimizer steps
    4. evaluate  the plain deterministic ODE (the SDE exists only for exploration in training); Flow-GRPO evaluates
                 (and saves) an EMA of the trained weights

Every step of every trajectory is a training sample: NFE_theta per sample is the number of trained transitions
(9 of 10 for Flow-GRPO SD3, 9 of the first 15 for DanceGRPO FLUX), which is the cost the later methods attack.

Where the two codes differ, the presets follow each one (docs/choices.md lists every choice):
- Flow-GRPO: SDE noise a sqrt(s / (1 - s)), the first N - 1 transitions in order, the batch's std, KL 0.01-0.04,
  2 optimizer steps per iteration, the EMA evaluated.
- DanceGRPO (`--sde-variant dance_grpo`): constant eta, reward on x0_hat, each sample a random 60% of the first
  N - 1 transitions, the group's std, one initial noise per group, 3 optimizer steps per iteration (12 samples,
  gradient accumulation 4), no KL, no EMA.

Run:
    python flow_grpo.py                                     # toy2d, Flow-GRPO-style, CPU, ~15 s
    python flow_grpo.py --preset toy2d-dancegrpo            # DanceGRPO's variant on the toy
    python flow_grpo.py --model tiny-flux --iterations 2    # the FLUX code path, random weights
    python flow_grpo.py --model shapes                      # text-to-image on CPU: coloured shapes (infra/shapes.py)
    accelerate launch flow_grpo.py --preset dancegrpo-flux --pretrained <FLUX.1-dev dir> --train-prompts <file>
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import (EMA, CommonArgs, arg, check_finite, gathered_group_advantages, mean_stats, sde_step_with_logprob,
                    select)
from infra.args import parse_args
from infra.distributed import accumulating, optimizer_step
from infra.run import Run
from infra.tasks import load_task


@dataclass
class Args(CommonArgs):
    # the SDE (common.sde_step_with_logprob)
    sde_variant: str = arg("flow_grpo", "'flow_grpo': std = a sqrt(s/(1-s)); 'dance_grpo': constant eta",
                           choices=("flow_grpo", "dance_grpo"))
    noise_level: float = arg(0.7, "Flow-GRPO's a (0.7 SD3, 0.9 FLUX) or DanceGRPO's eta (0.3)", min=0)
    same_noise_per_group: bool = arg(False, "every sample of a group starts from the same initial noise "
                                            "(DanceGRPO's --init_same_noise; Flow-GRPO: one noise per sample)")
    reward_sample: str = arg("final", "what the reward scores: 'final' (the last SDE state, Flow-GRPO) or 'x0_hat' "
                                      "(x_{N-1} - s_{N-1} v, the clean prediction at the last step, DanceGRPO)",
                             choices=("final", "x0_hat"))
    # which transitions train
    timestep_fraction: float = arg(0.99, "train int(pool * fraction) transitions per sample, pool = N (or N - 1 with "
                                         "--ignore-last-step); 0.99 of 10: all but the last", above=0, max=1)
    ignore_last_step: bool = arg(False, "never train the last transition: draw from the first N - 1 (DanceGRPO's "
                                        "--ignore_last)")
    shuffle_timesteps: bool = arg(False, "each sample trains its own random transitions (DanceGRPO) "
                                         "instead of the first ones in order (Flow-GRPO)")
    # GRPO / PPO
    adv_std: str = arg("global", "advantage std: 'global' (Flow-GRPO) or 'group' (DanceGRPO)",
                       choices=("global", "group"))
    adv_clip: float = arg(5.0, "advantage clip", above=0)
    clip_range: float = arg(1e-4, "PPO ratio clip eps", above=0)
    kl_beta: float = arg(0.0, "weight of the KL to the frozen reference (Flow-GRPO SD3: 0.01 PickScore, 0.04 "
                              "GenEval/OCR; 0 for FLUX)", min=0)
    updates_per_iteration: int = arg(2, "optimizer steps per iteration, each on 1/this of the samples (Flow-GRPO: 2, "
                                        "DanceGRPO: 3); from the second on the ratio is off-policy and the clip acts",
                                     min=1)
    train_micro_batch_size: int = arg(0, "samples per forward/backward (0: the whole minibatch); memory only", min=0)
    eval_ema: bool = arg(True, "evaluate, and save as final/, an EMA of the trained weights (Flow-GRPO's train.ema: "
                               "decay 0.9, updated every 8 optimizer steps)")


# Presets are named after the setting they reproduce; command-line flags override them. Batches are global: the
# prompts of an iteration are split over the processes, so a preset trains on the same batch whatever the launch.
PRESETS = {
    # Flow-GRPO's algorithm on the toy: SDE a = 0.7 at all 10 steps, 9 trained in order, global std, eval EMA.
    # Toy-sized lr, group and clip: 2D log-probs are averaged over 2 dims, not 16k, so ratios move more.
    "toy2d": dict(model="toy2d", iterations=400, num_steps=10, noise_level=0.7, group_size=16,
                  prompts_per_iteration=8, learning_rate=1e-3, clip_range=0.2, adv_std="global", log_every=50),
    # DanceGRPO's algorithm on the toy: constant eta 0.3, reward on x0_hat, each sample a random 60% of the first 9
    # transitions, one noise per group, group std, 3 optimizer steps.
    "toy2d-dancegrpo": dict(model="toy2d", iterations=400, num_steps=10, sde_variant="dance_grpo", noise_level=0.3,
                            reward_sample="x0_hat", timestep_fraction=0.6, ignore_last_step=True,
                            shuffle_timesteps=True, same_noise_per_group=True, adv_std="group",
                            updates_per_iteration=3, eval_ema=False, group_size=16, prompts_per_iteration=8,
                            learning_rate=1e-3, clip_range=0.2, log_every=50),
    # The FLUX code path with random weights: a smoke test of packing, guidance, LoRA and VAE decoding. No evaluation
    # EMA: it updates every 8 optimizer steps, so after 4 the "after" evaluation and final/ would be the base weights.
    "tiny-flux": dict(model="tiny-flux", iterations=4, num_steps=6, group_size=4, prompts_per_iteration=2,
                      lora_rank=8, learning_rate=1e-3, eval_steps=6, eval_samples_per_prompt=2, log_every=1,
                      eval_ema=False),
    # The shapes task (infra/shapes.py): Flow-GRPO's SDE (a = 0.7) on all 10 steps, LoRA r16 on the small FLUX.
    "shapes": dict(model="shapes", iterations=40, num_steps=10, noise_level=0.7, group_size=8,
                   prompts_per_iteration=8, lora_rank=16, learning_rate=3e-4, clip_range=1e-3,
                   adv_std="global", eval_steps=20, eval_samples_per_prompt=2, log_every=5),
    "shapes-dancegrpo": dict(model="shapes", iterations=40, num_steps=10, sde_variant="dance_grpo", noise_level=0.3,
                             reward_sample="x0_hat", timestep_fraction=0.6, ignore_last_step=True,
                             shuffle_timesteps=True, same_noise_per_group=True, adv_std="group",
                             updates_per_iteration=3, eval_ema=False, group_size=8, prompts_per_iteration=8,
                             lora_rank=16, learning_rate=3e-4, clip_range=1e-3, eval_steps=20,
                             eval_samples_per_prompt=2, log_every=5),
    # Flow-GRPO's pickscore_sd3 config (config/grpo.py): SD3.5-M 512 px, 10 SDE steps, a 0.7, CFG 4.5, 48 groups of
    # 24 per iteration (32 GPUs x 9 images x 4 batches), 2 optimizer steps, LoRA r32/a64, lr 3e-4, wd 1e-4, clip 1e-4,
    # KL 0.01, global std, EMA evaluated with a 40-step ODE.
    "flow-grpo-sd3": dict(model="sd3", reward="pickscore", resolution=512, num_steps=10, shift=3.0, noise_level=0.7,
                          guidance_scale=4.5, prompts_per_iteration=48, group_size=24, updates_per_iteration=2,
                          lora_rank=32, lora_alpha=64, learning_rate=3e-4, clip_range=1e-4, kl_beta=0.01,
                          adv_std="global", timestep_fraction=0.99, eval_steps=40, eval_samples_per_prompt=1,
                          iterations=1000, train_micro_batch_size=8, rollout_batch_size=8, eval_batch_size=8,
                          mixed_precision="bf16"),
    # DanceGRPO's scripts/finetune/finetune_flux_grpo.sh: FLUX.1-dev 720 px, 16 steps, shift 3, guidance 3.5, eta
    # 0.3, 16 prompts (2 nodes x 8 GPUs, 1 each) x 12 per iteration, init_same_noise, reward on x0_hat, a random 60%
    # of the first 15 transitions, 3 optimizer steps, full fine-tune lr 1e-5, wd 1e-4, clip 1e-4, no KL, 300 steps.
    "dancegrpo-flux": dict(model="flux", reward="hpsv2", resolution=720, num_steps=16, shift=3.0, guidance_scale=3.5,
                           sde_variant="dance_grpo", noise_level=0.3, reward_sample="x0_hat", timestep_fraction=0.6,
                           ignore_last_step=True, shuffle_timesteps=True, same_noise_per_group=True,
                           adv_std="group", updates_per_iteration=3, eval_ema=False, prompts_per_iteration=16,
                           group_size=12, lora_rank=0, learning_rate=1e-5, clip_range=1e-4, kl_beta=0.0,
                           iterations=300, train_micro_batch_size=1, rollout_batch_size=1, eval_batch_size=1,
                           eval_samples_per_prompt=1, mixed_precision="bf16"),
}


# ======================================================================================================
# ALGO LOGIC: SDE rollout, storing every state and the log-probability of every step
# ======================================================================================================


@torch.no_grad()
def sde_rollout(policy, noise, sigmas, cond, noise_level: float, variant: str, chunk: int = 0):
    """Sample with the SDE at every step (`common.sde_step_with_logprob`: Flow-GRPO's `sde_step_with_logprob`,
    DanceGRPO's `flux_step`). Returns the states (N+1, B, ...), the old log-probs (N, B) and x0_hat (B, ...), the
    clean prediction x_{N-1} - s_{N-1} v_{N-1} of the last step (what DanceGRPO's reward scores: `pred_original`).

    The log-probs are those of the sampling weights, i.e. log pi_old. `chunk` (--rollout-batch-size) splits each
    step's model calls (memory); the step's SDE noise is drawn for the whole batch, so the result is the same.
    """
    x, states, log_probs = noise, [noise], []
    for j in range(len(sigmas) - 1):
        v = policy.velocity(x, sigmas[j], cond, chunk)
        x0_hat = x - sigmas[j].float() * v
        x, log_prob, _, _ = sde_step_with_logprob(x, v, sigmas[j], sigmas[j + 1], noise_level, variant=variant)
        states.append(x)
        log_probs.append(log_prob)
    return torch.stack(states), torch.stack(log_probs), x0_hat


def trained_steps(batch: int, num_steps: int, fraction: float, shuffle: bool, ignore_last: bool = False,
                  generator=None) -> torch.Tensor:
    """(B, n_train) indices of the transitions each sample trains on, from a pool of the first N (or, with
    `ignore_last`, N - 1) transitions, n_train = int(pool * fraction).

    Flow-GRPO: the first int(N * 0.99) = N - 1 transitions in order, the same for every sample (train_sd3.py).
    DanceGRPO: each sample its own random int((N - 1) * 0.6) of the first N - 1 (`--ignore_last`; a random
    permutation per sample in `train_one_step`).
    """
    pool = num_steps - 1 if ignore_last else num_steps
    n_train = max(1, int(pool * fraction))
    if shuffle:
        return torch.stack([torch.randperm(pool, generator=generator)[:n_train] for _ in range(batch)])
    return torch.arange(n_train).expand(batch, n_train)


# ======================================================================================================
# ALGO LOGIC: the PPO-clipped GRPO loss of one SDE transition, and the update over all stored transitions
# ======================================================================================================


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

    # TRY NOT TO MODIFY: accelerator, seeding, model, optimizer
    run = Run(args, "flow_grpo")
    acc = run.accelerator
    task = load_task(args, keep_reference=args.kl_beta > 0, device=run.device, log=run.print)
    policy = task.policy
    run.fit_memory(task, train_field="train_micro_batch_size", unit_samples=1, train_cfg=True,  # CFG as it samples
                   units=-(-run.prompts_per_process * args.group_size // args.updates_per_iteration))
    optimizer = run.make_optimizer(policy)
    eval_ema = EMA(policy.trainable_parameters(), decay=0.9, every=8) if args.eval_ema else None
    sigmas = policy.sigmas(args.num_steps, args.shift).to(run.device)
    prompt_gen = torch.Generator().manual_seed(args.seed + 1000 * acc.process_index)
    P, G = run.prompts_per_process, args.group_size  # this process's groups; the iteration's are P x processes
    run.print(f"flow_grpo | {args.num_steps} SDE steps ({args.sde_variant}, a={args.noise_level}), reward on "
              f"{args.reward_sample} | sigmas {[round(s, 3) for s in sigmas.tolist()]}")

    before = run.start(task, eval_ema=eval_ema, prompt_gen=prompt_gen)  # evaluates the base model, or resumes
    for it in run.progress(args.iterations):
        run.begin_iteration(policy)

        # ALGO LOGIC 1: rollout. P prompts, each repeated G times (one group), SDE sampling.
        pick = torch.randint(len(task.train_prompts), (P,), generator=prompt_gen)
        prompts = [task.train_prompts[i] for i in pick for _ in range(G)]
        cond = policy.encode_prompts(prompts)
        noise = policy.initial_noise(P).repeat_interleave(G, 0) if args.same_noise_per_group else \
            policy.initial_noise(P * G)
        states, old_log_probs, x0_hat = sde_rollout(policy, noise, sigmas, cond, args.noise_level, args.sde_variant,
                                                    args.rollout_batch_size)

        # ALGO LOGIC 2: rewards and group advantages. Rewards of all processes are gathered so the global std
        # is the whole batch's (Flow-GRPO); each process keeps the rows of its own groups.
        samples = x0_hat if args.reward_sample == "x0_hat" else states[-1]
        rewards = task.reward_fn(policy.decode(samples), prompts).to(run.device)
        all_rewards, advantages = gathered_group_advantages(acc, rewards.view(P, G), args.adv_std, args.adv_clip)

        # ALGO LOGIC 3: PPO updates over the stored transitions. Each update takes a random 1/U of the samples,
        # accumulates gradients over their trained steps (and micro-batches), then steps the optimizer once.
        steps = trained_steps(P * G, args.num_steps, args.timestep_fraction, args.shuffle_timesteps,
                              args.ignore_last_step).to(run.device)
        stats, grad_norm = ppo_update(policy, optimizer, acc, states, old_log_probs, advantages, sigmas, cond, steps,
                                      noise_level=args.noise_level, variant=args.sde_variant,
                                      clip_range=args.clip_range, kl_beta=args.kl_beta,
                                      updates=args.updates_per_iteration, micro_batch=args.train_micro_batch_size,
                                      max_grad_norm=args.max_grad_norm, eval_ema=eval_ema)

        # TRY NOT TO MODIFY: logging
        run.end_iteration(it, task, all_rewards, stats, grad_norm=grad_norm)

    after = run.evaluate(task, "after")  # the EMA's weights, when it is on
    return run.finish(task, before, after)


if __name__ == "__main__":
    main()
