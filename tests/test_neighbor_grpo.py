"""Neighbor GRPO: the neighbourhood noise, the quasi-norm, pull and push, the ratio, NFE, training."""

import json
import math

import pytest
import torch

import common
from conftest import assert_trained
from infra import tasks
import neighbor_grpo as ng


def test_perturbed_noise_keeps_unit_variance_and_correlation():
    g = torch.Generator().manual_seed(0)
    eps_star = torch.randn(4000, 8, generator=g)
    out = ng.perturb_noise(eps_star, 3, 0.3, generator=g)
    assert out.shape == (12000, 8)
    base = eps_star.repeat_interleave(3, dim=0)
    assert out.var().item() == pytest.approx(1.0, abs=0.02)
    corr = ((out - out.mean()) * (base - base.mean())).mean() / (out.std() * base.std())
    assert corr.item() == pytest.approx(math.sqrt(1 - 0.09), abs=0.01)
    # the neighbours of one base noise differ from each other (sigma delta_i are independent)
    assert not torch.allclose(out[0], out[1])


def test_quasi_norm_p2_gives_unit_l2_norm_per_group():
    a = torch.randn(5, 12)
    torch.testing.assert_close(ng.quasi_norm_advantages(a, 2.0).norm(dim=-1), torch.ones(5))


@pytest.mark.parametrize("p", [0.5, 0.8, 2.0])
def test_quasi_norm_is_invariant_to_scaling(p):
    a = torch.randn(3, 8)
    torch.testing.assert_close(ng.quasi_norm_advantages(7.5 * a, p), ng.quasi_norm_advantages(a, p))


@pytest.mark.parametrize("p", [0.5, 0.8, 1.5])
def test_quasi_norm_downweights_flat_relative_to_peaked(p):
    G = 12
    flat = torch.tensor([1.0, -1.0] * (G // 2)) / math.sqrt(G)  # unit L2, every sample equally (un)informative
    peaked = torch.zeros(G)
    peaked[0], peaked[1] = 1 / math.sqrt(2), -1 / math.sqrt(2)  # unit L2, two decisive samples
    f, pk = ng.quasi_norm_advantages(flat, p), ng.quasi_norm_advantages(peaked, p)
    assert f.norm() < pk.norm()
    # at p = 2 both keep the same weight
    torch.testing.assert_close(ng.quasi_norm_advantages(flat, 2.0).norm(), ng.quasi_norm_advantages(peaked, 2.0).norm())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pull_and_push_on_the_anchor(sign):
    """One positive-advantage candidate pulls the anchor toward it; a negative one pushes it away."""
    g = torch.Generator().manual_seed(1)
    candidates = torch.randn(1, 6, 2, generator=g)
    anchor = (candidates[:, :1] + 0.3 * torch.randn(1, 1, 2, generator=g)).clone().requires_grad_(True)
    adv = torch.zeros(1, 6)
    adv[0, 3] = sign
    tau = torch.full((1, 1, 1), 0.5)
    old = ng.surrogate_log_policy(anchor.detach(), candidates, tau)
    loss, _ = ng.neighbor_grpo_loss(ng.surrogate_log_policy(anchor, candidates, tau), old, adv, clip_range=0.2)
    loss.backward()
    dist = lambda a: (a - candidates[0, 3]).norm().item()
    moved = anchor.detach() - 1e-2 * anchor.grad
    assert (dist(moved) < dist(anchor.detach())) == (sign > 0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_small_sgd_step_of_the_model_moves_the_candidates_probability_with_its_advantage(sign, seed):
    """Through the network: one small SGD step on the loss of one candidate with advantage A raises that candidate's
    surrogate probability pi(i | k) when A > 0 and lowers it when A < 0. (At ratio 1 the loss is -A rho_i + const,
    so a small enough step must move rho_i, i.e. pi(i | k), with the sign of A. Where the anchor moves in space is
    not determined: lowering pi(i | k) can also be done by moving toward the other candidates.)"""
    policy = tasks.toy2d_policy(keep_reference=False)
    sigmas = policy.sigmas(10)
    G, j = 6, 5
    cond = policy.encode_prompts(["mode 2"] * G)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        states = torch.stack(common.sample_ode(policy, ng.perturb_noise(torch.randn(1, 2, generator=g), G, 0.3, g),
                                               sigmas, cond, return_trajectory=True))
    rows, candidates = torch.tensor([0]), states[j].view(1, G, 2)

    def log_pi():
        anchor = ng.recompute_anchor(policy, states, sigmas, cond, rows, j).view(1, 1, 2)
        return ng.surrogate_log_policy(anchor, candidates, tau)

    with torch.no_grad():
        a0 = ng.recompute_anchor(policy, states, sigmas, cond, rows, j)
        tau = ng.neighbor_distances(a0.view(1, 1, 2), candidates).mean(-1, keepdim=True)
        old = log_pi()
    adv = torch.zeros(1, G)
    adv[0, 4] = sign
    loss, stats = ng.neighbor_grpo_loss(log_pi(), old, adv, 0.2)
    assert stats["approx_kl"] == 0.0  # the ratio is exactly 1 before the update
    loss.backward()
    with torch.no_grad():
        for p in policy.net.parameters():
            p -= 1e-4 * p.grad
        change = (log_pi() - old)[0, 0, 4].item()
    assert change * sign > 0, change


def test_ratio_is_one_before_the_first_update_and_nfe_theta_is_B_times_K(tmp_path):
    s = ng.main(["--iterations", "2", "--updates-per-iteration", "1", "--num-anchors", "3",
                 "--num-train-timesteps", "4", "--output-dir", str(tmp_path), "--log-every", "0",
                 "--save-weights", "false"])
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # with one update all ratios are taken at the pre-update weights: exactly 1
    assert all(l["loss/approx_kl"] == 0.0 and l["loss/clipfrac"] == 0.0 for l in lines)
    P, G, B, K, N = 8, 16, 3, 4, 10
    assert s["nfe_train"] == 2 * P * B * K  # gradient NFE per group per iteration = B x K
    assert s["nfe_rollout"] == 2 * P * (G * N + B * K)  # the ODE rollout + pi_old at the anchors


def test_the_first_update_is_on_policy_and_the_second_off_policy(tmp_path, monkeypatch):
    """2 optimizer steps per iteration over K = 4 timesteps: the first step's 2 timesteps see ratio exactly 1 (the
    pre-update weights), the second step's see the weights the first step moved."""
    kls = []
    original = ng.neighbor_grpo_loss
    monkeypatch.setattr(ng, "neighbor_grpo_loss", lambda *a, **k: (lambda out: kls.append(out[1]["approx_kl"]) or
                                                                    out)(original(*a, **k)))
    ng.main(["--iterations", "3", "--updates-per-iteration", "2", "--num-anchors", "4", "--num-train-timesteps", "4",
             "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights", "false"])
    assert len(kls) == 3 * 4
    for it in range(3):
        first, second = kls[4 * it:4 * it + 2], kls[4 * it + 2:4 * it + 4]
        assert first == [0.0, 0.0] and all(kl > 0 for kl in second), kls


def test_the_loop_reweights_with_the_quasi_norm_p_it_is_given(tmp_path, monkeypatch):
    """The advantages the loss sees have unit Lp quasi-norm per group, p = --quasi-norm-p: sum_i |A'_i|^p = 1."""
    seen = []
    original = ng.neighbor_grpo_loss
    monkeypatch.setattr(ng, "neighbor_grpo_loss", lambda log_pi, old, adv, clip: seen.append(adv.clone()) or
                        original(log_pi, old, adv, clip))
    ng.main(["--iterations", "1", "--quasi-norm-p", "0.5", "--num-train-timesteps", "1", "--updates-per-iteration",
             "1", "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights", "false"])
    groups = seen[0][seen[0].abs().sum(-1) > 0]  # every anchor row of a group carries its group's advantages
    torch.testing.assert_close(groups.abs().pow(0.5).sum(-1), torch.ones(len(groups)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(groups.norm(dim=-1), torch.ones(len(groups)), rtol=1e-2, atol=1e-2)  # not p = 2


def test_each_step_takes_the_gradient_of_the_mean_over_its_timesteps_and_anchors(tmp_path, monkeypatch):
    """The backward weights (len(micro-batch) / (P B) / timesteps in the step): with K = 4 timesteps over 2 optimizer
    steps and micro-batches of 5 anchors (of P B = 8 x 4), each step sees the gradient of the mean over its 2
    timesteps of the mean over all anchors of the clipped objective, recomputed here pass by pass from each pass's
    own inputs at the weights the step is about to change."""
    calls, checked = [], []
    recompute, surrogate, objective = ng.recompute_anchor, ng.surrogate_log_policy, ng.neighbor_grpo_loss
    monkeypatch.setattr(ng, "recompute_anchor", lambda *a: (calls.append({"anchor": a[1:]})
                                                            if torch.is_grad_enabled() else None) or recompute(*a))
    monkeypatch.setattr(ng, "surrogate_log_policy", lambda *a: calls[-1].update(surrogate=a[1:]) or surrogate(*a))
    monkeypatch.setattr(ng, "neighbor_grpo_loss", lambda *a: calls[-1].update(loss=a[1:]) or objective(*a))

    def step(acc, policy, optimizer, max_grad_norm):
        params = policy.trainable_parameters()
        timesteps = {c["anchor"][-1] for c in calls}
        total = 0
        for c in calls:
            anchor = recompute(policy, *c["anchor"])
            loss, _ = objective(surrogate(anchor.unsqueeze(1), *c["surrogate"]), *c["loss"])
            total = total + loss * len(c["anchor"][-2]) / (8 * 4) / len(timesteps)
        assert len(timesteps) == 2 and sum(len(c["anchor"][-2]) for c in calls) == 2 * 8 * 4
        for got, want in zip([p.grad for p in params], torch.autograd.grad(total, params)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
        checked.append(1)
        calls.clear()
        optimizer.zero_grad()
        return torch.tensor(0.0)

    monkeypatch.setattr(ng, "optimizer_step", step)
    ng.main(["--iterations", "1", "--num-anchors", "4", "--num-train-timesteps", "4", "--updates-per-iteration", "2",
             "--train-micro-batch-size", "5", "--eval-samples-per-prompt", "2", "--output-dir", str(tmp_path),
             "--log-every", "0", "--save-weights", "false"])
    assert checked == [1, 1]


def test_the_clipped_objective_is_ppos_pessimistic_bound():
    """Away from ratio 1: loss = -mean over anchors of sum_i min(A_i rho_i, A_i clip(rho_i)). A candidate whose ratio
    already left [1 - eps, 1 + eps] in the direction its advantage asks for gets no gradient; every other candidate
    gets d loss / d log pi_i = -A_i rho_i / (P B)."""
    g = torch.Generator().manual_seed(0)
    P, B, G, eps = 2, 3, 5, 0.1
    old = torch.log_softmax(torch.randn(P, B, G, generator=g), -1)
    new = (old + 0.3 * torch.randn(P, B, G, generator=g)).requires_grad_(True)
    adv = torch.randn(P, G, generator=g)
    loss, stats = ng.neighbor_grpo_loss(new, old, adv, eps)
    loss.backward()
    rho, a = (new - old).exp().detach(), adv[:, None, :].expand(P, B, G)
    done = ((a > 0) & (rho > 1 + eps)) | ((a < 0) & (rho < 1 - eps))
    assert done.any() and (~done).any()
    assert torch.equal(new.grad == 0, done)
    torch.testing.assert_close(new.grad[~done], (-a * rho / (P * B))[~done])
    torch.testing.assert_close(loss, -torch.where(done, a * rho.clamp(1 - eps, 1 + eps), a * rho).sum(-1).mean())
    assert stats["clipfrac"] == pytest.approx(((rho - 1).abs() > eps).float().mean().item())


def test_every_anchor_meets_its_own_groups_candidates_and_advantages_at_times_1_to_n(tmp_path, monkeypatch):
    """The loop's indexing, checked against the rollout it stored. With Euler rollouts the anchor recomputed at t_j (one
    Euler step of the pre-update weights from its stored x_{j-1}) IS one of its group's stored x_j; the candidates it
    is compared with are that group's G states at t_j, under that group's advantages, at the temperature
    docs/choices.md states; K = N draws every j in 1..N. Micro-batches of 2 (group, anchor) rows exercise the
    row -> group arithmetic."""
    N, P, G, B = 4, 3, 4, 2
    trajectories, advantages, calls = [], [], []
    sample_ode, quasi_norm = ng.sample_ode, ng.quasi_norm_advantages
    surrogate, loss = ng.surrogate_log_policy, ng.neighbor_grpo_loss
    monkeypatch.setattr(ng, "sample_ode", lambda *a, **k: trajectories.append(sample_ode(*a, **k)) or trajectories[-1])
    monkeypatch.setattr(ng, "quasi_norm_advantages", lambda *a: advantages.append(quasi_norm(*a)) or advantages[-1])
    monkeypatch.setattr(ng, "surrogate_log_policy", lambda anchor, candidates, tau:
                        calls.append([anchor.detach(), candidates, tau]) or surrogate(anchor, candidates, tau))
    monkeypatch.setattr(ng, "neighbor_grpo_loss", lambda log_pi, old, adv, clip:
                        calls[-1].append(adv) or loss(log_pi, old, adv, clip))
    ng.main(["--iterations", "1", "--num-steps", str(N), "--num-train-timesteps", str(N), "--updates-per-iteration",
             "1", "--group-size", str(G), "--num-anchors", str(B), "--prompts-per-iteration", str(P),
             "--rollout-solver", "euler", "--train-micro-batch-size", "2", "--temperature", "0.7",
             "--output-dir", str(tmp_path),
             "--log-every", "0", "--save-weights", "false", "--checkpoint-every", "0"])
    states = torch.stack(trajectories[0]).view(N + 1, P, G, 2)
    assert len(calls) == N * P * B // 2
    seen = []
    for anchor, candidates, tau, adv in calls:
        # tau: --temperature x the anchor's mean squared distance (averaged over dims) to its candidates, under the
        # pre-update weights (one optimizer step here: the anchor recomputed with gradient is the pre-update one)
        d = (candidates - anchor).pow(2).mean(-1)
        torch.testing.assert_close(tau.flatten(), 0.7 * d.mean(-1))
        for r in range(len(candidates)):
            (j, p), = [(j, p) for j in range(N + 1) for p in range(P) if torch.equal(candidates[r], states[j, p])]
            seen.append(j)
            torch.testing.assert_close(adv[r], advantages[0][p])
            assert (states[j, p] - anchor[r, 0]).norm(dim=-1).min() < 1e-5  # one of the group's own states at t_j
    assert sorted(set(seen)) == list(range(1, N + 1))


@pytest.mark.slow
def test_toy2d_neighbor_grpo_raises_eval_reward(tmp_path):
    s = ng.main(["--iterations", "200", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert s["eval_reward_before"] < 0.2 and s["eval_reward_after"] > s["eval_reward_before"] + 0.3, s
    assert s["on_manifold_after"] > s["on_manifold_before"] - 0.15, s


def test_tiny_flux_trains_its_lora(tmp_path):
    s = ng.main(["--model", "tiny-flux", "--iterations", "2", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert_trained(tmp_path)
    assert s["trainable_tensors_changed"] == s["trainable_tensors"]
    assert s["nfe_train"] == 2 * 2 * 2 * 2  # 2 iterations x 2 groups x B 2 x K 2


@pytest.mark.parametrize("flags, message", [
    (["--num-anchors", "20"], "--num-anchors 20 must be at most --group-size 16"),
    (["--num-train-timesteps", "11"], "--num-train-timesteps 11 must be at most --num-steps 10"),
    (["--updates-per-iteration", "5", "--num-train-timesteps", "4"], "--updates-per-iteration 5 must be at most "
                                                                     "--num-train-timesteps 4 (each step trains its "
                                                                     "own timesteps)"),
])
def test_bad_sizes_stop_before_anything_is_written_with_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        ng.main(flags + ["--output-dir", str(tmp_path / "run")])
    assert str(e.value) == f"neighbor_grpo.py: {message}"
    assert not (tmp_path / "run").exists()
