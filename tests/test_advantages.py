"""Group advantages and the PPO-clipped loss."""

import importlib
from types import SimpleNamespace

import pytest
import torch

import common
import flow_grpo


def test_group_advantages_zero_mean_unit_std_per_group():
    r = torch.randn(6, 12) * torch.arange(1, 7)[:, None] + torch.arange(6)[:, None]
    a = common.group_advantages(r, std="group", clip=100.0)
    torch.testing.assert_close(a.mean(-1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std(-1), torch.ones(6), atol=1e-3, rtol=0)


def test_global_std_divides_by_the_whole_batch_std_but_centres_per_group():
    r = torch.randn(4, 8)
    a = common.group_advantages(r, std="global", clip=100.0, eps=0.0)
    torch.testing.assert_close(a, (r - r.mean(-1, keepdim=True)) / r.std())
    torch.testing.assert_close(a.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)


def test_advantages_are_clipped():
    r = torch.tensor([[0.0] * 99 + [1.0]])  # one outlier: z-score ~ 9.9
    a = common.group_advantages(r, std="group", clip=5.0)
    assert a.max().item() == 5.0 and a.min().item() > -5.0


def test_constant_group_gives_negligible_advantage():
    # the group mean of 0.3s is off by float rounding (~3e-8); dividing by eps = 1e-4 leaves ~3e-4, not 0
    a = common.group_advantages(torch.full((2, 8), 0.3), std="group")
    assert a.abs().max() < 1e-3


def test_unknown_std_mode_is_an_error():
    with pytest.raises(ValueError, match="std mode"):
        common.group_advantages(torch.randn(2, 4), std="batch")


def test_ppo_loss_matches_the_formula_and_its_gradient_has_the_sign_of_A():
    old = torch.randn(32)
    new = (old + 0.01 * torch.randn(32)).requires_grad_(True)
    adv = torch.randn(32)
    eps = 1e-3
    loss, stats = flow_grpo.ppo_clip_loss(new, old, adv, eps)
    ratio = torch.exp(new - old)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # unclipped samples push log pi up where A > 0 (gradient of the loss negative) and down where A < 0;
    # clipped ones (ratio outside the range in the direction A favours) get no gradient at all
    active = new.grad != 0
    assert (torch.sign(new.grad[active]) == -torch.sign(adv[active])).all()
    clipped_out = ((ratio > 1 + eps) & (adv > 0)) | ((ratio < 1 - eps) & (adv < 0))
    assert torch.equal(~active, clipped_out)
    assert stats["clipfrac"] == pytest.approx(((ratio - 1).abs() > eps).float().mean().item())
    # Flow-GRPO's logged approx_kl: 0.5 mean((logp - logp_old)^2)
    assert stats["approx_kl"] == pytest.approx(0.5 * (new.detach() - old).pow(2).mean().item(), rel=1e-6)


def test_ppo_loss_at_ratio_one_is_the_policy_gradient():
    logp = torch.randn(10, requires_grad=True)
    adv = torch.randn(10)
    loss, _ = flow_grpo.ppo_clip_loss(logp, logp.detach(), adv, 1e-4)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 10)


@pytest.mark.parametrize("std", ["global", "group"])
def test_each_process_keeps_its_own_groups_advantages_with_the_whole_batchs_statistics(std):
    """3 processes x 2 groups of 5: every process gets the rows of ITS groups, centred on each group's mean and divided
    by the std of the whole gathered batch (global) or of the group; the gathered rewards come back for logging."""
    rewards = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7)[:, None]
    scale = rewards.std() if std == "global" else rewards.std(-1, keepdim=True)
    expected = (rewards - rewards.mean(-1, keepdim=True)) / (scale + 1e-4)
    for rank in range(3):
        fake = SimpleNamespace(gather=lambda mine: rewards, process_index=rank)  # gather: every process's rows
        gathered, adv = common.gathered_group_advantages(fake, rewards[2 * rank:2 * rank + 2], std, clip=100.0)
        assert gathered is rewards
        torch.testing.assert_close(adv, expected[2 * rank:2 * rank + 2].reshape(-1))


@pytest.mark.parametrize("std", ["global", "group"])
@pytest.mark.parametrize("name", ["flow_grpo", "pro_grpo", "dgpo"])
def test_the_update_gets_the_advantages_of_the_rewards_just_scored_with_adv_std(tmp_path, monkeypatch, name, std):
    """One iteration: the advantages the update receives are the z-scores (--adv-std's std) of the training rewards
    scored just before it, group by group."""
    script = importlib.import_module(name)
    events, load = [], script.load_task

    def recording_task(*a, **k):
        task = load(*a, **k)
        reward_fn = task.reward_fn
        task.reward_fn = lambda samples, prompts: (lambda r: events.append(("reward", r)) or r)(
            reward_fn(samples, prompts))
        return task

    update = "dgpo_pass" if name == "dgpo" else "ppo_update"  # both take the advantages as their 6th argument
    original = getattr(script, update)
    monkeypatch.setattr(script, "load_task", recording_task)
    monkeypatch.setattr(script, update, lambda *a, **k: events.append(("update", a[5])) or original(*a, **k))
    script.main(["--iterations", "1", "--adv-std", std, "--adv-clip", "100", "--prompts-per-iteration", "2",
                 "--eval-samples-per-prompt", "1", "--output-dir", str(tmp_path), "--log-every", "0",
                 "--save-weights", "false", "--checkpoint-every", "0"])
    first_update = next(i for i, (kind, _) in enumerate(events) if kind == "update")
    rewards = [r for kind, r in events[:first_update] if kind == "reward"][-1].view(2, -1)
    scale = rewards.std() if std == "global" else rewards.std(-1, keepdim=True)
    expected = ((rewards - rewards.mean(-1, keepdim=True)) / (scale + 1e-4)).reshape(-1)
    torch.testing.assert_close(events[first_update][1], expected)
