"""G2RPO: the completion grids, singular stochasticity, MGAI advantages, NFE accounting, training."""

import pytest
import torch

import common
from conftest import assert_trained
from infra import tasks
from infra.args import parse_args
import g2rpo


@pytest.mark.parametrize("num_steps,shift,ks,lams", [(16, 3.0, range(8), (1, 2, 3)), (10, None, range(5), (1, 2, 3)),
                                                     (6, None, range(6), (1, 2, 4))])
def test_granular_sigmas(num_steps, shift, ks, lams):
    sigmas = common.make_sigmas(num_steps, shift=shift)
    for k in ks:
        for lam in lams:
            grid = g2rpo.granular_sigmas(sigmas, k, lam)
            assert torch.equal(grid[:k + 2], sigmas[:k + 2])  # the anchor's nodes and the first fine step
            assert grid[-1].item() == 0.0
            assert (grid[1:] < grid[:-1]).all()
            assert set(grid.tolist()) <= set(sigmas.tolist())
            if lam == 1:
                assert torch.equal(grid, sigmas)


def test_granular_sigmas_example():
    s = common.make_sigmas(10)  # 1.0, 0.9, ..., 0.0
    grid = g2rpo.granular_sigmas(s, 1, 3)  # [s0 s1 s2] + s[3::3] = s3 s6 s9; s9 is never evaluated: it becomes 0
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.9, 0.8, 0.7, 0.4, 0.0], dtype=s.dtype))
    assert g2rpo.completion_nfe(s, 1, 3) == 3  # from x_2: at s2, s3 and s6 (then the jump to x0_hat)


def official_completion(policy, x, sigmas, k, lam, cond):
    """bcmi/Granular-GRPO's train_g2rpo_hps.py, transcribed: the grid `sigmas[:k+2] + sigmas[k+2::lam]`, then
    `run_ode_sample_step` over i in range(k + 1, len(grid) - 1): v at node i, an eta = 0 step to node i + 1, and
    `pred_original = x_i - s_i v` returned from the last i."""
    grid = torch.cat([sigmas[:k + 2], sigmas[k + 2::lam]])
    calls = 0
    for i in range(k + 1, len(grid) - 1):
        v = policy.velocity(x, grid[i], cond)
        calls += 1
        pred_original = x - grid[i].float() * v
        x = x + (grid[i + 1] - grid[i]).float() * v
    return pred_original, calls


@pytest.mark.parametrize("num_steps,shift", [(16, 3.0), (10, None)])
def test_completion_equals_the_official_loop_at_every_granularity(num_steps, shift):
    """Our completion (an Euler ODE on granular_sigmas from x_{k+1}) gives the official loop's sample with the same
    number of model calls, for every branch step and stride, including the grids that do not end at 0."""
    policy = tasks.toy2d_policy(keep_reference=False)
    sigmas = common.make_sigmas(num_steps, shift=shift)
    cond = policy.encode_prompts(["mode 3"] * 5)
    x_next = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    coarse_grids = 0
    for k in range(num_steps // 2):
        for lam in (1, 2, 3):
            coarse_grids += torch.cat([sigmas[:k + 2], sigmas[k + 2::lam]])[-1].item() != 0
            with torch.no_grad():
                want, calls = official_completion(policy, x_next, sigmas, k, lam, cond)
                got = common.sample_ode(policy, x_next, g2rpo.granular_sigmas(sigmas, k, lam)[k + 1:], cond,
                                        solver="euler")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert g2rpo.completion_nfe(sigmas, k, lam) == calls
    assert coarse_grids >= 4  # the case that differed: grids whose last node is not 0


def test_mixed_advantages_are_the_sum_of_per_granularity_z_scores():
    r = torch.rand(3, 4, 12, generator=torch.Generator().manual_seed(0))
    expected = sum(common.group_advantages(r[j], std="group", clip=1e9) for j in range(3))
    torch.testing.assert_close(g2rpo.mixed_advantages(r, clip=1e9), expected)
    # the clip acts on the sum, not on each granularity's z-score: sample 0 alone scores at the coarse granularity
    # (z = 11 / sqrt(12) = 3.18) and is one of the many low at the fine one (z = -0.29): 2.89, clipped to 2 (clipping
    # each first would give 2 - 0.29)
    outlier = torch.zeros(2, 1, 12)
    outlier[0, 0, 0], outlier[1, 0, 1] = 1.0, 1.0
    assert g2rpo.mixed_advantages(outlier, clip=2.0)[0, 0].item() == pytest.approx(2.0)
    torch.testing.assert_close(g2rpo.mixed_advantages(outlier, clip=2.0),
                               sum(common.group_advantages(outlier[j], clip=1e9) for j in range(2)).clamp(-2, 2))


def test_singular_rollout_branches_share_x_k_and_completion_is_deterministic(monkeypatch):
    policy = tasks.toy2d_policy(keep_reference=False)
    sigmas = policy.sigmas(10)
    seen = []
    original = g2rpo.sde_step_with_logprob

    def spy(x, *a, **kw):
        seen.append(x.clone())
        return original(x, *a, **kw)

    monkeypatch.setattr(g2rpo, "sde_step_with_logprob", spy)
    anchor, branches = g2rpo.singular_rollout(policy, ["mode 1", "mode 6"], sigmas, [0, 2, 4], [1, 2], 6, 0.7,
                                              common.toy_mode_reward)
    assert anchor.shape == (11, 2, 2) and len(branches) == 3 and len(seen) == 3
    for x_k, b in zip(seen, branches):
        x_k = x_k.view(2, 6, 2)
        assert torch.equal(x_k, x_k[:, :1].expand_as(x_k))  # every branch starts from the SAME state, bit for bit
        torch.testing.assert_close(x_k[:, 0], anchor[b["k"]])
        assert b["x_next"].view(2, 6, 2).std(1).min() > 0  # and they differ only after the one SDE step
        assert b["rewards"].shape == (2, 2, 6)
    # the rest is deterministic: completing the same x_{k+1} twice gives the same sample
    b = branches[1]
    grid = g2rpo.granular_sigmas(sigmas, 2, 2)[3:]
    cond = policy.encode_prompts(["mode 1"] * 6 + ["mode 6"] * 6)
    a1 = common.sample_ode(policy, b["x_next"], grid, cond, solver="euler")
    a2 = common.sample_ode(policy, b["x_next"], grid, cond, solver="euler")
    assert torch.equal(a1, a2)
    torch.testing.assert_close(common.toy_mode_reward(a1, ["mode 1"] * 6 + ["mode 6"] * 6).view(2, 6),
                               b["rewards"][1])


def test_nfe_accounting_matches_the_schedule(tmp_path):
    s = g2rpo.main(["--iterations", "2", "--prompts-per-iteration", "3", "--group-size", "4", "--granularities",
                    "1,2,3", "--output-dir", str(tmp_path), "--log-every", "0", "--save-weights", "false"])
    sigmas = common.make_sigmas(10)
    completion = sum(g2rpo.completion_nfe(sigmas, k, lam) for k in range(5) for lam in (1, 2, 3))
    assert s["nfe_rollout"] == 2 * 3 * (10 + 4 * completion)  # anchor + G branches x every grid
    assert s["nfe_train"] == 2 * 3 * 5  # one gradient NFE per k per group


@pytest.mark.slow
def test_toy2d_g2rpo_raises_eval_reward(tmp_path):
    s = g2rpo.main(["--iterations", "150", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert s["eval_reward_before"] < 0.2 and s["eval_reward_after"] > s["eval_reward_before"] + 0.3, s
    assert s["on_manifold_after"] > s["on_manifold_before"] - 0.15, s


def test_tiny_flux_trains_its_lora(tmp_path):
    s = g2rpo.main(["--model", "tiny-flux", "--iterations", "2", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert_trained(tmp_path)
    assert s["trainable_tensors_changed"] == s["trainable_tensors"]
    assert s["nfe_train"] == 2 * 2 * 3  # 6 steps: branch at k = 0, 1, 2


@pytest.mark.parametrize("flags, message", [
    (["--granularities", "0,1"], "--granularities takes distinct positive integers; got '0,1'"),
    (["--granularities", "1,1"], "--granularities takes distinct positive integers; got '1,1'"),
    (["--granularities", "1,a"], "--granularities takes comma-separated integers such as '1,2'; got '1,a'"),
    (["--branch-steps", "3,12"], "--branch-steps takes distinct steps in [0, 10) (--num-steps 10); got '3,12'"),
    (["--branch-steps", "0,,1"], "--branch-steps takes comma-separated integers such as '1,2'; got '0,,1'"),
    (["--num-steps", "1"], "--num-steps 1 has no first half to branch in: give --branch-steps or more steps"),
])
def test_a_bad_schedule_stops_at_parse_time_with_one_line(flags, message):
    with pytest.raises(SystemExit) as e:
        parse_args(g2rpo.Args, g2rpo.PRESETS, flags, prog="g2rpo.py")
    assert str(e.value) == f"g2rpo.py: {message}"
    assert g2rpo.parse_schedule(parse_args(g2rpo.Args, g2rpo.PRESETS, ["--branch-steps", "3,1", "--granularities",
                                                                        "2,1"])) == ([3, 1], [2, 1])


def test_the_ratio_is_exactly_one_at_the_first_update_of_an_iteration(tmp_path, monkeypatch):
    """One branch step per iteration: its PPO loss sees the weights that sampled the branches, so the ratio is
    exactly 1 (approx_kl 0, clipfrac 0): the velocity is recomputed at the branch's own state x_k and sigma_k."""
    seen = []
    original = g2rpo.ppo_clip_loss
    monkeypatch.setattr(g2rpo, "ppo_clip_loss", lambda *a: (lambda out: seen.append(out[1]) or out)(original(*a)))
    g2rpo.main(["--iterations", "3", "--branch-steps", "3", "--prompts-per-iteration", "4", "--output-dir",
                str(tmp_path), "--log-every", "0", "--save-weights", "false", "--eval-samples-per-prompt", "2"])
    assert len(seen) == 3 and all(st["approx_kl"] == 0 and st["clipfrac"] == 0 for st in seen), seen


def test_every_branch_step_sees_its_own_branches_under_its_noise_level_and_every_granularity(tmp_path, monkeypatch):
    """At learning rate 0 the weights never move, so every branch step's PPO loss, not only the first, must see
    ratio exactly 1: its own branches' old log-probs, scored at --noise-level. Its advantages are MGAI's: each
    granularity's group z-score, summed over the granularities, then clipped."""
    seen, rollouts = [], []
    ppo, rollout = g2rpo.ppo_clip_loss, g2rpo.singular_rollout

    def recording_ppo(log_prob, old_log_prob, advantages, clip_range):
        loss, stats = ppo(log_prob, old_log_prob, advantages, clip_range)
        seen.append((advantages.clone(), stats))
        return loss, stats

    monkeypatch.setattr(g2rpo, "ppo_clip_loss", recording_ppo)
    monkeypatch.setattr(g2rpo, "singular_rollout", lambda *a, **k: rollouts.append(rollout(*a, **k)) or rollouts[-1])
    g2rpo.main(["--iterations", "2", "--branch-steps", "1,3,5", "--granularities", "1,2,3", "--noise-level", "0.5",
                "--learning-rate", "0", "--prompts-per-iteration", "2", "--group-size", "6", "--output-dir",
                str(tmp_path), "--log-every", "0", "--save-weights", "false", "--eval-samples-per-prompt", "2"])
    assert len(seen) == 2 * 3
    for n, (advantages, stats) in enumerate(seen):
        assert stats["approx_kl"] == 0 and stats["clipfrac"] == 0, (n, stats)
        rewards = rollouts[n // 3][1][n % 3]["rewards"]  # (granularities, prompts, G)
        assert rewards.shape == (3, 2, 6)
        z = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-4)
        torch.testing.assert_close(advantages, z.sum(0).clamp(-5, 5).reshape(-1))
