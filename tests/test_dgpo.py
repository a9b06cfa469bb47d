"""DGPO: the partition-function cancellation, the loss gradient against Eq. 17, shared noise, the timestep
clip, the frozen reference, and end-to-end training."""

import importlib
import json

import pytest
import torch

import common
from conftest import assert_trained
from infra import tasks
import dgpo


def eq17(dsm, dsm_ref, adv, group_index, beta):
    """Paper Eq. 17 summed over groups: sum_g -log sigmoid(-beta * S_g), S_g = sum_{i in g} A_i (l_i - l_ref,i)."""
    s = torch.zeros(int(group_index.max()) + 1, dtype=dsm.dtype).index_add(0, group_index, adv * (dsm - dsm_ref))
    return -torch.nn.functional.logsigmoid(-beta * s).sum()


@pytest.mark.parametrize("seed", range(5))
def test_partition_function_cancels_sum_of_weights_equal(seed):
    """sum_{G+} |A| == sum_{G-} |A| for any rewards: A has zero mean within the group (no clip active)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(6, 24, generator=g) ** 3 * 10  # skewed, arbitrary scale
    for std in ("group", "global"):
        a = common.group_advantages(rewards, std=std, clip=1e9)
        pos = torch.where(a > 0, a, torch.zeros_like(a)).sum(-1)
        neg = torch.where(a <= 0, -a, torch.zeros_like(a)).sum(-1)
        torch.testing.assert_close(pos, neg, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_loss_gradient_is_eq17_gradient_up_to_the_documented_constant(seed):
    """d loss / d l_i = sigmoid(beta' S_g) A_i / N, and Eq. 17's gradient is beta' sigmoid(beta' S_g) A_i with
    beta' = beta / G; so grad(surrogate) == grad(Eq. 17) / (beta' N), and it has the sign of A_i."""
    g = torch.Generator().manual_seed(seed)
    num_groups, G, beta = 3, 8, 20.0
    group_index = torch.arange(num_groups).repeat_interleave(G)
    adv = common.group_advantages(torch.randn(num_groups, G, generator=g)).reshape(-1)
    dsm_ref = torch.rand(num_groups * G, generator=g, dtype=torch.float64)
    dsm = (dsm_ref + 0.05 * torch.randn(num_groups * G, generator=g, dtype=torch.float64)).requires_grad_(True)
    a = adv.double()

    dgpo.dgpo_loss(dsm, dsm_ref, a, group_index, beta).backward()
    ours = dsm.grad.clone()
    dsm.grad = None
    eq17(dsm, dsm_ref, a, group_index, beta / G).backward()
    paper = dsm.grad
    n = num_groups * G
    torch.testing.assert_close(ours, paper / (beta / G * n))
    nonzero = a != 0
    assert (torch.sign(ours[nonzero]) == torch.sign(a[nonzero])).all()


def test_only_dsm_carries_gradient():
    dsm = torch.rand(8, requires_grad=True)
    ref = torch.rand(8, requires_grad=True)
    dgpo.dgpo_loss(dsm, ref, torch.randn(8), torch.zeros(8, dtype=torch.long), 10.0).backward()
    assert dsm.grad is not None and ref.grad is None


def test_all_reduced_group_sums_reproduce_the_single_process_gradient():
    """A group split over two 'processes': with group sums and sizes all-reduced, the two halves' gradients
    together equal the gradient of the whole group computed in one place."""
    g = torch.Generator().manual_seed(0)
    G = 8
    adv = common.group_advantages(torch.randn(2, G, generator=g)).reshape(-1)
    group_index = torch.arange(2).repeat_interleave(G)
    ref = torch.rand(2 * G, generator=g)
    dsm = (ref + 0.1 * torch.randn(2 * G, generator=g)).requires_grad_(True)
    dgpo.dgpo_loss(dsm, ref, adv, group_index, 50.0).backward()
    whole = dsm.grad.clone()

    halves = [torch.arange(0, 2 * G, 2), torch.arange(1, 2 * G, 2)]  # each process holds half of every group
    parts = []
    for h in halves:  # the sums each process would contribute, gathered as an all-reduce would
        term = adv[h] * (dsm[h].detach() - ref[h])
        parts.append((torch.zeros(2).index_add(0, group_index[h], term),
                      torch.zeros(2).index_add(0, group_index[h], torch.ones(len(h)))))
    total_sums, total_sizes = parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
    grad = torch.zeros(2 * G)
    for h in halves:
        x = dsm.detach()[h].clone().requires_grad_(True)
        fake_reduce = iter([total_sums, total_sizes])
        loss = dgpo.dgpo_loss(x, ref[h], adv[h], group_index[h], 50.0, num_groups=2,
                              all_reduce=lambda t: next(fake_reduce))
        # each process's loss is a mean over its N/2 samples; DDP averages gradients over the 2 processes
        (loss / 2).backward()
        grad[h] = x.grad
    torch.testing.assert_close(grad, whole)


def test_timestep_clip_draws_distinct_schedule_nodes_at_or_above_t_min():
    sigmas = common.make_sigmas(10, shift=3.0)
    for seed in range(20):
        ts = dgpo.train_timesteps(sigmas, 0.66, 4, torch.Generator().manual_seed(seed))
        assert len(set(ts.tolist())) == 4 and (ts >= 0.66).all() and all(t in sigmas for t in ts)
    with pytest.raises(ValueError, match="t_min"):
        dgpo.train_timesteps(sigmas, 0.95, 4)


def test_ema_swaps_in_and_restores():
    net = torch.nn.Linear(2, 2)
    ema = dgpo.EMA(net.parameters(), decay=0.3)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.shadow[0], 0.3 * start + 0.7 * (start + 1))
    with ema.swapped_in():
        torch.testing.assert_close(net.weight, ema.shadow[0])
    torch.testing.assert_close(net.weight.detach(), start + 1)


def test_training_uses_group_shared_noise_and_clipped_timesteps(tmp_path, monkeypatch, capture_policy):
    """Spy on the training forward passes: every trained t is >= t_min, and the noise eps = x_t + (1 - t)
    target recovered from each sample is identical within its group and differs between groups."""
    seen = []
    original_dsm = dgpo.dsm_loss
    original_velocity = common.Policy.velocity
    last = {}

    def velocity(self, x, sigma, cond):
        if torch.is_grad_enabled():
            last["x"], last["t"] = x.detach().clone(), float(sigma)
        return original_velocity(self, x, sigma, cond)

    def dsm_loss(v, target):
        if v.requires_grad:
            seen.append((last["t"], last["x"] + (1 - last["t"]) * target))
        return original_dsm(v, target)

    monkeypatch.setattr(common.Policy, "velocity", velocity)
    monkeypatch.setattr(dgpo, "dsm_loss", dsm_loss)
    dgpo.main(["--iterations", "2", "--group-size", "4", "--prompts-per-iteration", "3", "--t-min", "0.5",
               "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights", "false"])
    assert len(seen) == 2 * 4  # 2 iterations x M = 4 timesteps
    for t, eps in seen:
        assert t >= 0.5
        eps = eps.view(3, 4, 2)
        torch.testing.assert_close(eps, eps[:, :1].expand_as(eps), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(eps[0, 0], eps[1, 0])
    # the frozen reference is the pretrained base, untouched by training
    policy = capture_policy["policy"]
    base = tasks.toy2d_policy(keep_reference=False).net.state_dict()
    for k, v in policy.reference_net.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert any(not torch.equal(v, base[k]) for k, v in policy.net.state_dict().items())


def test_nfe_accounting(tmp_path):
    s = dgpo.main(["--iterations", "2", "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights",
                   "false"])
    B = 8 * 16
    assert s["nfe_rollout"] == 2 * (B * 10 + B * 4)  # 10 ODE steps + the reference at M = 4 timesteps
    assert s["nfe_train"] == 2 * B * 4


@pytest.mark.slow
def test_toy2d_dgpo_raises_eval_reward(tmp_path):
    s = dgpo.main(["--iterations", "300", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert s == json.loads((tmp_path / "summary.json").read_text())
    assert s["algorithm"] == "dgpo" and s["eval_reward_before"] < 0.2
    assert s["eval_reward_after"] > s["eval_reward_before"] + 0.3, s
    assert s["on_manifold_after"] > s["on_manifold_before"] - 0.15, s


def test_tiny_flux_trains_its_lora(tmp_path):
    s = dgpo.main(["--model", "tiny-flux", "--iterations", "2", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert_trained(tmp_path)
    assert s["trainable_tensors_changed"] == s["trainable_tensors"]  # every LoRA tensor moved
    # 2 iterations x 8 samples: 6 rollout steps + the reference at M = 2 timesteps; 2 gradient calls each
    assert s["nfe_rollout"] == 2 * 8 * (6 + 2) and s["nfe_train"] == 2 * 8 * 2


def test_official_options_kl_and_dsm_ratio_clip_run_and_count_their_calls(tmp_path):
    """--clip-dsm scores every sample under the EMA model too (one more no-grad call per sample and timestep),
    --kl-beta adds mean((v - v_ref)^2); both from the official code."""
    s = dgpo.main(["--iterations", "2", "--clip-dsm", "--kl-beta", "0.1", "--ema-start", "0", "--output-dir",
                   str(tmp_path), "--log-every", "0", "--save-weights", "false", "--checkpoint-every", "0"])
    B = 8 * 16
    assert s["nfe_rollout"] == 2 * (B * 10 + B * 4 + B * 4)  # rollout + reference + EMA model at M = 4
    assert s["nfe_train"] == 2 * B * 4
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["loss/clipfrac"] <= 1.0 for r in rows)
    # one optimizer step per iteration: during the first, theta is still the reference and theta_minus
    assert rows[0]["loss/kl"] == 0 and rows[0]["loss/clipfrac"] == 0
    assert rows[1]["loss/kl"] > 0 and rows[1]["loss/clipfrac"] > 0  # after it, theta has left both


def test_the_dpm_flow_schedule_is_the_official_schedulers_and_the_preset_trains_on_its_first_7_nodes():
    """The official code rolls out with DPMSolverMultistepScheduler(use_flow_sigmas, flow_shift 3) (Sana's config):
    at 10 steps its last nonzero sigma is 0.25 (SD3's pipeline schedule: 0.009). trunc_steps 6 = its first 7 nodes."""
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    for n in (6, 10, 20):
        sched.set_timesteps(n)
        torch.testing.assert_close(dgpo.dpm_flow_sigmas(n, 3.0), sched.sigmas.double(), rtol=0, atol=1e-6)
    sigmas = dgpo.dpm_flow_sigmas(10, 3.0)
    assert abs(sigmas[-2].item() - 0.25) < 1e-3
    preset = dgpo.PRESETS["dgpo-sd3"]
    assert preset["rollout_schedule"] == "dpm-flow"
    assert int(((sigmas >= preset["t_min"]) & (sigmas > 0)).sum()) == 7


def test_one_optimizer_step_and_one_theta_minus_update_per_iteration(tmp_path, monkeypatch):
    """The official config steps once per epoch: gradients of all M timesteps (and micro-batches) add up first. Then
    theta_minus takes the EMA of the weights that step produced (updated before the step, it would lag one step)."""
    events = []
    original_step, original_update = dgpo.optimizer_step, common.EMA.update
    monkeypatch.setattr(dgpo, "optimizer_step", lambda *a, **k: events.append("step") or original_step(*a, **k))
    monkeypatch.setattr(common.EMA, "update", lambda self, *a: events.append(f"update {self.decay}") or
                        original_update(self, *a))
    dgpo.main(["--iterations", "3", "--num-train-timesteps", "4", "--train-micro-batch-groups", "2", "--eval-ema",
               "false", "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights", "false"])
    assert events == ["step", "update 0.3"] * 3


def test_the_step_takes_the_gradient_of_the_mean_over_timesteps_of_the_whole_batchs_group_loss(tmp_path,
                                                                                              monkeypatch):
    """The backward weights (len(micro-batch) / (P G) / M): with M = 3 timesteps and micro-batches of 3 + 3 + 2
    groups, the optimizer step sees the gradient of the mean over the M timesteps of dgpo_pass on the whole batch
    (KL on), recomputed here from each pass's own inputs at the weights the step is about to change."""
    passes, checked = [], []
    original_pass = dgpo.dgpo_pass
    monkeypatch.setattr(dgpo, "dgpo_pass", lambda *a: passes.append(a) or original_pass(*a))

    def step(acc, policy, optimizer, max_grad_norm):
        params = policy.trainable_parameters()
        by_t = {}
        for a in passes:
            by_t.setdefault(float(a[3]), []).append(a)
        total = 0
        for t, parts in by_t.items():
            x0, eps, adv, gi = (torch.cat([q[i] for q in parts]) for i in (1, 2, 5, 6))
            cond = {k: torch.cat([q[4][k] for q in parts]) for k in parts[0][4]}
            first = parts[0]
            loss, _ = original_pass(first[0], x0, eps, first[3], cond, adv, gi, *first[7:])
            total = total + loss / len(by_t)
        assert len(by_t) == 3 and len(x0) == 8 * 16
        for got, want in zip([p.grad for p in params], torch.autograd.grad(total, params)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
        checked.append(1)
        optimizer.zero_grad()
        return torch.tensor(0.0)

    monkeypatch.setattr(dgpo, "optimizer_step", step)
    flags = ["--iterations", "1", "--num-train-timesteps", "3", "--kl-beta", "0.01", "--eval-ema", "false",
             "--eval-samples-per-prompt", "2", "--log-every", "0", "--save-weights", "false"]
    dgpo.main(flags + ["--train-micro-batch-groups", "3", "--output-dir", str(tmp_path / "micro")])
    assert checked == [1] and len(passes) == 3 * 3
    times, eps = [float(a[3]) for a in passes], torch.cat([a[2] for a in passes])
    passes.clear()
    dgpo.main(flags + ["--output-dir", str(tmp_path / "whole")])  # the same timesteps and noise without micro-batches
    assert [float(a[3]) for a in passes] == times[::3]
    torch.testing.assert_close(torch.cat([a[2] for a in passes]), eps, rtol=0, atol=0)


def test_the_evaluation_ema_is_flow_grpos_ema_module_wrapper():
    """flow_grpo/ema.py's EMAModuleWrapper(decay 0.9, update_step_interval 8), transcribed: after optimizer step n,
    if (n + 1) % 8 == 0, ema += (1 - min((1 + n) / (10 + n), 0.9)) (theta - ema)."""
    net = torch.nn.Linear(3, 2)
    ema = common.EMA(net.parameters(), decay=0.9, every=8)
    reference = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(0)
    for n in range(40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.step()
        if (n + 1) % 8 == 0:
            decay = min((1 + n) / (10 + n), 0.9)
            reference = [r + (1 - decay) * (p.detach() - r) for r, p in zip(reference, net.parameters())]
    for r, s in zip(reference, ema.shadow):
        torch.testing.assert_close(s, r)
    assert not torch.allclose(ema.shadow[0], net.weight)


def test_every_training_call_is_cfg_free_the_reference_and_theta_minus_too():
    """DGPO trains CFG-free (official train_sd3_dgpo.py: the conditional velocity alone) while its rollouts sample
    with CFG 4.5 (SD3). On a policy with CFG on, every velocity `dgpo_pass` computes (the policy's, the frozen
    reference's and theta_minus's, with the KL and the dsm clip on) must be the conditional one: the reference's
    denoising loss is the baseline the policy's is compared with, so a reference with CFG would shift every
    l_i - l_ref,i by a term of its own."""
    from conftest import GaussianPolicy

    class WithCFG(GaussianPolicy):
        cfg_scale = 4.5

        def __init__(self):
            super().__init__()
            self.reference_net = torch.nn.Linear(1, 1)
            self.calls = []

        def _forward(self, net, x, sigma, cond):
            self.calls.append(("reference" if net is self.reference_net else "policy", self.cfg_active()))
            return super()._forward(net, x, sigma, cond)

    policy = WithCFG()
    theta_minus = common.EMA(policy.trainable_parameters(), 0.3)
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    dgpo.dgpo_pass(policy, x0, eps, torch.tensor(0.7), {}, torch.tensor([1.0, -1.0, 0.5, -0.5]),
                   torch.tensor([0, 0, 1, 1]), 2, beta=10.0, all_reduce=None, kl_beta=0.01, clip_dsm=True,
                   clip_range=0.05, theta_minus=theta_minus)
    assert sorted(policy.calls) == [("policy", False), ("policy", False), ("reference", False)]
    assert policy.cfg_active()  # outside the training pass, CFG is on again


def test_the_kl_term_pulls_the_policy_toward_the_reference():
    """DGPO's KL beta_kl mean((v - v_ref)^2), averaged over the dimensions as the official code: with zero advantages
    the group loss has no gradient, and one SGD step on the KL must bring v closer to v_ref. Flipping its sign pushes
    v away."""
    policy = tasks.toy2d_policy(keep_reference=True)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    cond = policy.encode_prompts(["mode 5"] * 16)
    theta_minus = common.EMA(policy.trainable_parameters(), 0.3)

    def loss_and_kl():
        return dgpo.dgpo_pass(policy, x0, eps, 0.7, cond, torch.zeros(16), torch.zeros(16, dtype=torch.long), 1, 1.0,
                              None, kl_beta=1.0, clip_dsm=False, clip_range=0.05, theta_minus=theta_minus)

    loss, st = loss_and_kl()
    with torch.no_grad():  # the official kl_loss: the mean over samples AND dimensions
        x_t = 0.3 * x0 + 0.7 * eps
        v = policy.velocity(x_t, 0.7, cond)
        with policy.reference():
            v_ref = policy.velocity(x_t, 0.7, cond)
    assert st["kl"] == pytest.approx((v - v_ref).pow(2).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(st["kl"], rel=1e-5)  # zero advantages: the KL alone, at kl_beta 1
    loss.backward()
    with torch.no_grad():
        for p in policy.net.parameters():
            p -= 1e-3 * p.grad
    assert st["kl"] > 0 and loss_and_kl()[1]["kl"] < st["kl"]


def test_rollouts_come_from_theta_minus_only_after_ema_start(tmp_path, monkeypatch):
    """theta_minus = theta for the first --ema-start iterations, then its EMA: the rollout swaps the EMA in from
    iteration ema_start on (5 iterations, ema_start 2: 3 swaps)."""
    swaps = []
    original = common.EMA.swapped_in
    monkeypatch.setattr(common.EMA, "swapped_in", lambda self: swaps.append(self.decay) or original(self))
    dgpo.main(["--iterations", "5", "--ema-start", "2", "--eval-ema", "false", "--output-dir", str(tmp_path),
               "--log-every", "0", "--save-weights", "false", "--eval-samples-per-prompt", "2"])
    assert swaps == [0.3] * 3


def test_the_dsm_clip_freezes_a_sample_once_theta_passed_theta_minus_in_the_direction_its_advantage_asks(
        monkeypatch):
    """The official clip_dsm, read as PPO's: rho_i = exp(l_old,i - l_i) is sample i's likelihood ratio against
    theta_minus (a lower denoising loss is a higher likelihood). A sample with A > 0 whose rho already exceeds 1 + eps,
    or with A < 0 whose rho is below 1 - eps, gets no gradient from the group loss; every other sample keeps it."""
    policy = tasks.toy2d_policy(keep_reference=True)
    theta_minus = common.EMA(policy.trainable_parameters(), 0.3)  # holds the weights before the move below
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    n, t, clip = 32, 0.7, 0.02
    x0, eps, adv = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g), torch.randn(n, generator=g)
    cond = policy.encode_prompts(["mode 4"] * n)
    x_t, target = (1 - t) * x0 + t * eps, eps - x0
    with torch.no_grad():
        loss_now = (policy.velocity(x_t, t, cond) - target).pow(2).mean(1)
        with theta_minus.swapped_in():
            loss_old = (policy.velocity(x_t, t, cond) - target).pow(2).mean(1)
    rho = torch.exp(loss_old - loss_now)
    frozen = ((adv > 0) & (rho > 1 + clip)) | ((adv < 0) & (rho < 1 - clip))
    assert frozen.any() and (~frozen).any(), rho

    captured = []
    original = dgpo.dgpo_loss
    monkeypatch.setattr(dgpo, "dgpo_loss", lambda dsm, *a, **k: captured.append(dsm) or original(dsm, *a, **k))
    _, st = dgpo.dgpo_pass(policy, x0, eps, t, cond, adv, torch.zeros(n, dtype=torch.long), 1, 10.0, None,
                           kl_beta=0.0, clip_dsm=True, clip_range=clip, theta_minus=theta_minus)
    params = policy.trainable_parameters()
    gets_gradient = torch.tensor([
        any(g is not None and g.abs().sum() > 0
            for g in torch.autograd.grad(captured[0][i], params, retain_graph=True, allow_unused=True))
        for i in range(n)])
    assert torch.equal(gets_gradient, ~frozen)
    assert st["clipfrac"] == pytest.approx(frozen.float().mean().item())


@pytest.mark.parametrize("name", ["dgpo", "flow_grpo", "pro_grpo"])
def test_the_evaluation_ema_steps_once_per_optimizer_step(name, tmp_path, monkeypatch):
    """The evaluation EMA (EMAModuleWrapper: every 8th step updates) must see every optimizer step: 3 iterations
    make 3 steps in DGPO (one per iteration), 6 in Flow-GRPO and Pro-GRPO (two)."""
    script = importlib.import_module(name)
    optimizer_steps, ema_steps = [], []
    original_step, original_ema_step = script.optimizer_step, common.EMA.step
    monkeypatch.setattr(script, "optimizer_step", lambda *a, **k: optimizer_steps.append(1) or original_step(*a, **k))
    monkeypatch.setattr(common.EMA, "step", lambda self: ema_steps.append(self.every) or original_ema_step(self))
    script.main(["--iterations", "3", "--prompts-per-iteration", "2", "--eval-samples-per-prompt", "1",
                 "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights", "false"])
    assert len(optimizer_steps) == 3 * (1 if name == "dgpo" else 2)
    assert ema_steps == [8] * len(optimizer_steps)
