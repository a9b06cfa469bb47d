"""DGPO: Direct Group Preference Optimization (Luo et al., ICLR 2026; official code Luo-Yihong/DGPO).

GRPO's strength is the group-relative signal, not the policy gradient. DGPO keeps the signal and drops the
stochastic policy: rollouts are plain deterministic ODE samples, and training is a Bradley-Terry preference
"the group's better half beats its worse half", which for a diffusion model reduces to a weighted difference
of denoising losses at ONE timestep (no trajectory, no log-probabilities, no SDE):

    1. rollout   G samples per prompt with a deterministic ODE (DPM-Solver++, 10 steps) from theta_minus
                 (= theta for the first iterations, then an EMA of theta); keep only x0
    2. reward    GRPO advantages A_i; G+ = {A > 0}, G- = {A <= 0}, weights w = |A|
                 (A has zero mean, so sum_{G+} w = sum_{G-} w and the partition function Z(c) cancels)
    3. update    at M timesteps t from [t_min, 1] (the timestep clip), with one noise eps shared by the group:
                 l_i     = || v_theta(x_t,i, t, c) - (eps - x0_i) ||^2        (denoising loss, Eq. 17's L_dsm)
                 l_ref,i = the same for the frozen reference
                 L = -log sigmoid(-beta * sum_i A_i (l_i - l_ref,i))          (paper Eq. 17)
                 summed over the M timesteps into ONE optimizer step, then theta_minus <- EMA (official code)
    4. evaluate  with the plain ODE (the official configs evaluate an EMA of the weights: `--eval-ema`)

Cost per sample and iteration: `num_steps` rollout NFE (no grad) and M training NFE (with grad) plus M
reference NFE (no grad), versus Flow-GRPO's N-1 gradient NFE on an SDE trajectory.

Run:
    python dgpo.py                                   # toy2d, CPU
    python dgpo.py --model tiny-flux --iterations 2  # the FLUX code path, random weights
    python dgpo.py --model shapes                    # text-to-image on CPU: coloured shapes (infra/shapes.py)
    accelerate launch dgpo.py --preset dgpo-sd3 --pretrained <SD3.5-M dir> --train-prompts <file>   # paper
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from common import EMA, CommonArgs, arg, gathered_group_advantages, mean_stats, sample_ode, select, static_shift
from infra.args import parse_args
from infra.distributed import accumulating, optimizer_step
from infra.pipelines import pipeline_sigmas
from infra.run import Run
from infra.tasks import load_task


@dataclass
class Args(CommonArgs):
    # rollout
    rollout_solver: str = arg("dpm2m", "rollout ODE solver: 'dpm2m' (paper: Flow-DPM-Solver) or 'euler'",
                              choices=("dpm2m", "euler"))
    rollout_schedule: str = arg("model", "rollout sigmas: 'model' (the model's own schedule, as evaluation) or "
                                         "'dpm-flow' (the official code's DPMSolverMultistepScheduler flow schedule: "
                                         "last nonzero sigma 0.25 at 10 steps, against SD3's 0.009)",
                                choices=("model", "dpm-flow"))
    ema_start: int = arg(0, "iterations during which theta_minus = theta; after them rollouts use the EMA "
                            "(paper/code: 200 for OCR/PickScore, 500 for GenEval)", min=0)
    ema_decay: float = arg(0.3, "EMA decay mu of theta_minus: mu * ema + (1 - mu) * theta after every "
                                "optimizer step (paper 0.3; the code ramps min(0.3, 0.001 * step))", min=0, max=1)
    # the group preference loss
    beta: float = arg(100.0, "beta of Eq. 17 (100; 10 for PickScore); the sigmoid sees beta * S_g / G, as the code",
                      above=0)
    adv_std: str = arg("group", "advantage std: 'group' (paper: intra-group normalisation) or 'global'",
                       choices=("group", "global"))
    adv_clip: float = arg(5.0, "advantage clip (clipping slightly breaks sum A = 0; rare in practice)", above=0)
    # timesteps
    num_train_timesteps: int = arg(4, "M: timesteps trained per iteration; their gradients add up to ONE optimizer "
                                      "step (official config: 'update once per epoch')", min=1)
    t_min: float = arg(0.6, "timestep clip: train only at t >= t_min (the low-noise end carries the "
                            "few-step rollouts' artifacts). Nodes of the rollout schedule in [t_min, 1] are drawn",
                       min=0)
    # optional terms of the official code
    kl_beta: float = arg(0.0, "weight of the KL term beta_kl * mean((v_theta - v_ref)^2) (official code; 0 = off)",
                         min=0)
    clip_dsm: bool = arg(False, "PPO-style clip of the denoising-loss ratio exp(l_old - l) against the EMA model")
    clip_range: float = arg(1e-4, "ratio clip range for --clip-dsm", above=0)
    train_micro_batch_groups: int = arg(0, "whole groups per forward/backward (0: all); memory only. Whole groups, "
                                           "because S_g needs every sample of its group", min=0)
    merge_lora_rollouts: bool = arg(False, "roll out with the LoRA update merged into the base weights (no-grad calls: "
                                           "one matrix product per layer instead of three; one more copy of the "
                                           "adapted weights' memory); unmeasured on a GPU, so off by default")
    eval_ema: bool = arg(True, "evaluate, and save as final/, an EMA of the trained weights (the official config's "
                               "train.ema: Flow-GRPO's EMAModuleWrapper, decay 0.9, every 8 optimizer steps)")

    def __post_init__(self):  # checked as the flags are parsed, before minutes of model loading
        if self.num_train_timesteps > self.num_steps:
            raise ValueError(f"--num-train-timesteps {self.num_train_timesteps} must be at most --num-steps "
                             f"{self.num_steps} (the nodes of the rollout schedule it draws from)")
        # How many nodes lie above --t-min, before FLUX or SD3 load (minutes): the DPM flow schedule (the official
        # config's) depends on no model, theirs on the pipeline's config files (FLUX's also on the resolution). The
        # other models' schedules are checked once they have loaded (seconds).
        sigmas = rollout_sigmas(self) if self.rollout_schedule == "dpm-flow" else pipeline_sigmas(self, self.num_steps)
        if sigmas is not None:
            check_t_min(self, sigmas)


PRESETS = {
    # The toy: G 16 x 8 prompts, 10 DPM-Solver++ steps, 4 timesteps per iteration from the 7 nodes t >= 0.4,
    # EMA rollouts after 50 iterations. beta 1, not 100: the toy's per-sample denoising losses differ by O(1)
    # (an average over 2 dims), images' by ~1e-3 (over ~16k dims); at beta 100 the sigmoid saturates and the
    # negatives are pushed off the ring (eval reward 0.29, on-manifold 0.44 after 150 iterations).
    "toy2d": dict(model="toy2d", iterations=600, num_steps=10, group_size=16, prompts_per_iteration=8,
                  learning_rate=1e-3, beta=1.0, num_train_timesteps=4, t_min=0.4, ema_start=50, log_every=50),
    # The FLUX code path with random weights. No evaluation EMA: it updates every 8 optimizer steps, so after 4 the
    # "after" evaluation and final/ would be the base weights.
    "tiny-flux": dict(model="tiny-flux", iterations=4, num_steps=6, group_size=4, prompts_per_iteration=2,
                      lora_rank=8, learning_rate=1e-3, num_train_timesteps=2, t_min=0.5, eval_steps=6,
                      eval_samples_per_prompt=2, log_every=1, eval_ema=False),
    "shapes": dict(model="shapes", iterations=40, num_steps=10, group_size=8, prompts_per_iteration=8,
                   lora_rank=16, learning_rate=3e-4, beta=100.0, num_train_timesteps=4, t_min=0.6, ema_start=20,
                   eval_steps=20, eval_samples_per_prompt=2, log_every=5),
    # The official pickscore_sd3_4gpu config (config/dgpo.py): SD3.5-M 512 px, 10-step DPM-Solver++ ODE rollouts on
    # the DPM flow schedule (flow_shift 3), CFG 4.5 in rollouts and CFG-free training, G 24, 24 groups per iteration
    # (the config ships 8, "set to be 24 for better performance"), beta 10, the denoising-loss clip 5e-2 against
    # theta_minus, KL 0.001, M = 4 of the first 7 nodes (trunc_steps 6: t >= 0.666), LoRA r32 (the paper's; the code
    # uses r64), lr 3e-4, wd 1e-4, theta_minus = EMA after 200 steps, evaluation EMA, one optimizer step per iteration.
    "dgpo-sd3": dict(model="sd3", reward="pickscore", resolution=512, num_steps=10, shift=3.0, guidance_scale=4.5,
                     rollout_schedule="dpm-flow", prompts_per_iteration=24, group_size=24, beta=10.0, clip_dsm=True,
                     clip_range=5e-2, kl_beta=0.001, num_train_timesteps=4, t_min=0.66, lora_rank=32, lora_alpha=64,
                     learning_rate=3e-4, ema_start=200, ema_decay=0.3, eval_steps=40, eval_samples_per_prompt=1,
                     iterations=1000, rollout_batch_size=8, train_micro_batch_groups=1, eval_batch_size=8,
                     mixed_precision="bf16"),
}


# ======================================================================================================
# ALGO LOGIC: the group preference loss (paper Eq. 17, official surrogate)
# ======================================================================================================


def dgpo_loss(dsm, dsm_ref, advantages, group_index, beta, num_groups=None, all_reduce=None):
    """DGPO's group preference loss, as the official code computes it.

    Eq. 17:  L = -log sigmoid(-beta' S_g),  S_g = sum_{i in g} A_i (l_i - l_ref,i)
             (= sum_{G+} w (l - l_ref) - sum_{G-} w (l - l_ref) with w = |A|)
    Its gradient is dL/dl_i = beta' sigmoid(beta' S_g) A_i: positive advantage lowers that sample's denoising
    loss (raises its likelihood), negative raises it, and the sigmoid weight fades once the group is
    already ranked right. The official code optimises the surrogate
             loss = mean_i[ sigmoid(beta S_g / G).detach() * A_i * l_i ]
    i.e. Eq. 17 with beta' = beta / G (group mean in the sigmoid), whose gradient equals Eq. 17's times
    1 / (beta' N), N the number of samples. Only `dsm` carries gradient.

    group_index (N,) names each sample's group in [0, num_groups); `all_reduce` (a sum over processes) makes
    S_g and G whole when a group's samples sit on several processes.
    """
    num_groups = num_groups or int(group_index.max()) + 1
    term = advantages * (dsm.detach() - dsm_ref.detach())
    sums = torch.zeros(num_groups, device=dsm.device, dtype=term.dtype).index_add_(0, group_index, term)
    sizes = torch.zeros(num_groups, device=dsm.device, dtype=term.dtype).index_add_(
        0, group_index, torch.ones_like(term))
    if all_reduce is not None:
        sums, sizes = all_reduce(sums), all_reduce(sizes)
    weight = torch.sigmoid(beta * sums / sizes.clamp(min=1))[group_index]
    return (weight.detach() * advantages * dsm).mean()


def dsm_loss(v, target):
    """Per-sample denoising (flow-matching) loss ||v - (eps - x0)||^2, averaged over dims as the code."""
    return (v.float() - target).pow(2).flatten(1).mean(1)


def dpm_flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """DGPO's rollout schedule: diffusers' DPMSolverMultistepScheduler with `use_flow_sigmas` and `flow_shift` 3
    (the Sana scheduler config the official code loads): shift(1 - alpha) for alpha = linspace(1, 1/1000, N + 1),
    largest first, the last of them dropped, then 0. At N = 10 the last nonzero sigma is shift(0.0999) = 0.25."""
    s = (1 - torch.linspace(1.0, 1 / 1000, num_steps + 1, dtype=torch.float64)).flip(0)[:-1]
    return torch.cat([static_shift(s, shift), s.new_zeros(1)])


def rollout_sigmas(args, policy=None) -> torch.Tensor:
    """The rollout schedule `--rollout-schedule` names (the model's own needs its `policy`)."""
    if args.rollout_schedule == "dpm-flow":
        return dpm_flow_sigmas(args.num_steps, args.shift or 3.0)
    return policy.sigmas(args.num_steps, args.shift)


def check_t_min(args, sigmas):
    """The timestep clip must leave M nodes of the rollout schedule to draw from (`train_timesteps`)."""
    nodes = int(((sigmas >= args.t_min) & (sigmas > 0)).sum())
    if nodes < args.num_train_timesteps:
        raise ValueError(f"--t-min {args.t_min} leaves {nodes} nodes of the rollout schedule "
                         f"{[round(s, 3) for s in sigmas.tolist()]} for --num-train-timesteps "
                         f"{args.num_train_timesteps}; lower one of them")


def dgpo_pass(policy, x0, eps, t, cond, advantages, group_index, num_groups, beta, all_reduce, kl_beta: float,
              clip_dsm: bool, clip_range: float, theta_minus):
    """DGPO at one timestep t for a batch of whole groups (the official train_sd3_dgpo.py inner loop): the noised
    x_t = (1 - t) x0 + t eps and target eps - x0, the denoising losses of the policy and of the frozen reference,
    the group preference loss (`dgpo_loss`), and the official options: the PPO-style clip of the denoising-loss
    ratio against theta_minus, and the KL `kl_beta * mean((v - v_ref)^2)`. Training is CFG-free (SD3: the
    conditional velocity alone). Returns (loss, stats)."""
    x_t = (1 - t) * x0 + t * eps
    target = eps - x0
    with torch.no_grad(), policy.reference(), policy.without_cfg():
        v_ref = policy.velocity(x_t, t, cond)
    if clip_dsm:  # theta_minus's loss BEFORE the gradient forward: swapping weights in between breaks autograd
        with torch.no_grad(), theta_minus.swapped_in(), policy.without_cfg():
            dsm_old = dsm_loss(policy.velocity(x_t, t, cond), target)
    with policy.without_cfg():
        v = policy.velocity(x_t, t, cond)
    dsm, dsm_ref = dsm_loss(v, target), dsm_loss(v_ref, target)
    stats = {"dsm": dsm.mean().item(), "dsm_minus_ref": (dsm - dsm_ref).mean().item()}
    if clip_dsm:  # freeze the samples whose loss ratio against theta_minus left the range in A's favoured direction
        ratio = torch.exp(dsm_old - dsm.detach())
        frozen = torch.where(advantages > 0, ratio > 1 + clip_range, ratio < 1 - clip_range)
        dsm = torch.where(frozen, dsm.detach(), dsm)
        stats["clipfrac"] = frozen.float().mean().item()
    loss = dgpo_loss(dsm, dsm_ref, advantages, group_index, beta, num_groups=num_groups, all_reduce=all_reduce)
    stats["dgpo_loss"] = loss.item()
    if kl_beta > 0:
        kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()
        loss = loss + kl_beta * kl
        stats["kl"] = kl.item()
    return loss, stats


def train_timesteps(sigmas, t_min, m, generator=None):
    """The timestep clip: M distinct nodes of the rollout schedule with t >= t_min (official code draws M of
    the first 5 or 7 nodes of its 10-step schedule; the paper writes t ~ U[t_min, T])."""
    nodes = torch.nonzero((sigmas >= t_min) & (sigmas > 0)).flatten()
    if len(nodes) < m:
        raise ValueError(f"only {len(nodes)} schedule nodes have t >= t_min={t_min}; lower --t-min or "
                         f"--num-train-timesteps ({m})")
    return sigmas[nodes[torch.randperm(len(nodes), generator=generator)[:m]]]


# ======================================================================================================
# Main loop
# ======================================================================================================


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)

    # TRY NOT TO MODIFY: accelerator, seeding, model, optimizer
    run = Run(args, "dgpo")
    acc = run.accelerator
    task = load_task(args, keep_reference=True, device=run.device, log=run.print)
    policy = task.policy
    run.fit_memory(task, train_field="train_micro_batch_groups", unit_samples=args.group_size,  # trains CFG-free
                   units=run.prompts_per_process, train_cfg=False)
    optimizer = run.make_optimizer(policy)
    theta_minus = EMA(policy.trainable_parameters(), args.ema_decay)  # the sampling model
    eval_ema = EMA(policy.trainable_parameters(), decay=0.9, every=8) if args.eval_ema else None
    sigmas = rollout_sigmas(args, policy).to(run.device)
    try:  # the schedule of a model other than FLUX and SD3 is known only now; before anything is written
        check_t_min(args, sigmas)
    except ValueError as e:
        raise SystemExit(f"dgpo.py: {e}") from None
    # prompts and timesteps: per-process prompt streams; timesteps and group noise come from shared seeds
    prompt_gen = torch.Generator().manual_seed(args.seed + 1000 * acc.process_index)
    shared_gen = torch.Generator().manual_seed(args.seed)
    P, G = run.prompts_per_process, args.group_size  # this process's groups; the iteration's are P x processes
    world, rank = acc.num_processes, acc.process_index
    all_reduce = (lambda t: acc.reduce(t, reduction="sum")) if world > 1 else None
    run.print(f"dgpo | G={G} | {args.num_steps}-step {args.rollout_solver} ODE rollouts on sigmas "
              f"{[round(s, 3) for s in sigmas.tolist()]} | M={args.num_train_timesteps} timesteps from "
              f"t >= {args.t_min} | beta {args.beta}")

    # evaluate the base model, or resume (the generators and both EMAs are part of the checkpoint)
    before = run.start(task, eval_ema=eval_ema, prompt_gen=prompt_gen, shared_gen=shared_gen, ema=theta_minus)
    for it in run.progress(args.iterations):
        run.begin_iteration(policy)

        # ALGO LOGIC 1: deterministic ODE rollout from theta_minus (theta until ema_start, then its EMA)
        pick = torch.randint(len(task.train_prompts), (P,), generator=prompt_gen)
        prompts = [task.train_prompts[i] for i in pick for _ in range(G)]
        cond = policy.encode_prompts(prompts)
        noise = policy.initial_noise(P * G)
        chunk = args.rollout_batch_size or P * G
        with theta_minus.swapped_in() if it >= args.ema_start else contextlib.nullcontext(), \
                policy.lora_merged() if args.merge_lora_rollouts else contextlib.nullcontext():
            x0 = torch.cat([sample_ode(policy, noise[i:i + chunk], sigmas, select(cond, slice(i, i + chunk)),
                                       solver=args.rollout_solver) for i in range(0, P * G, chunk)])

        # ALGO LOGIC 2: rewards -> advantages; the groups are this process's P prompts (global ids rank*P + k)
        rewards = task.reward_fn(policy.decode(x0), prompts).to(run.device)
        all_rewards, advantages = gathered_group_advantages(acc, rewards.view(P, G), args.adv_std, args.adv_clip)
        group_index = torch.arange(P, device=run.device).repeat_interleave(G) + rank * P

        # ALGO LOGIC 3: M timesteps from [t_min, 1]; at each, one noise eps per group and the group preference loss
        # (dgpo_pass) over micro-batches of whole groups. All M timesteps' gradients add up to ONE optimizer step,
        # then theta_minus's EMA update.
        timesteps = train_timesteps(sigmas, args.t_min, args.num_train_timesteps, shared_gen)
        micro = torch.arange(P * G, device=run.device).split(G * (args.train_micro_batch_groups or P))
        passes = [(t, mb) for t in timesteps for mb in micro]
        stats, sizes = [], []
        for n, (t, mb) in enumerate(passes):
            if mb[0] == 0:  # a new timestep: one noise per group, the same for all its samples
                eps = policy.initial_noise(world * P, shared_gen)[rank * P:(rank + 1) * P].repeat_interleave(G, dim=0)
            with accumulating(acc, policy, last=n == len(passes) - 1):  # one all-reduce per optimizer step
                loss, st = dgpo_pass(policy, x0[mb], eps[mb], t, select(cond, mb), advantages[mb], group_index[mb],
                                     world * P, args.beta, all_reduce, args.kl_beta, args.clip_dsm, args.clip_range,
                                     theta_minus)
                acc.backward(loss * len(mb) / (P * G) / len(timesteps))
            stats.append(st)
            sizes.append(len(mb))
        grad_norm = optimizer_step(acc, policy, optimizer, args.max_grad_norm)
        theta_minus.update()
        if eval_ema is not None:
            eval_ema.step()

        # TRY NOT TO MODIFY: logging
        run.end_iteration(it, task, all_rewards, mean_stats(stats, sizes), grad_norm=grad_norm)

    after = run.evaluate(task, "after")  # the evaluation EMA's weights, when it is on
    return run.finish(task, before, after)


if __name__ == "__main__":
    main()
