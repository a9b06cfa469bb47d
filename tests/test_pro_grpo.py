"""Pro-GRPO: OVF against brute force, the funnel's NFE, the free proxy, equality with the baseline."""

import itertools
import json

import pytest
import torch

import common
from conftest import assert_trained
from infra import tasks
from infra.args import parse_args
import flow_grpo
import pro_grpo


@pytest.mark.parametrize("seed", range(30))
def test_ovf_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 13, (1,), generator=g))
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    r = torch.rand(n, generator=g) if seed % 3 else torch.randint(0, 4, (n,), generator=g).float()  # with ties
    best = max(r[list(c)].var(unbiased=False).item() if k > 1 else 0.0 for c in itertools.combinations(range(n), k))
    idx = pro_grpo.optimal_variance_filter(r, k)
    assert len(idx) == k and len(set(idx.tolist())) == k
    got = r[idx].var(unbiased=False).item() if k > 1 else 0.0
    assert got == pytest.approx(best, abs=1e-6)


def test_ovf_keeps_the_extremes_of_a_clustered_group():
    r = torch.tensor([0.50, 0.51, 0.49, 0.50, 0.95, 0.05, 0.50, 0.52])
    assert sorted(pro_grpo.optimal_variance_filter(r, 2).tolist()) == [4, 5]


def test_funnel_nfe_arithmetic():
    # paper: 48 x 6 steps (0..5, pruned after computing v_5) + 24 x 2 (6, 7) + 12 x 2 (8, 9)
    assert pro_grpo.funnel_nfe(10, [48, 24, 12], [5, 7]) == 48 * 6 + 24 * 2 + 12 * 2
    assert pro_grpo.funnel_nfe(10, [24], []) == 240


def test_pruned_trajectories_cost_nothing_and_the_proxy_costs_no_model_call():
    policy = tasks.toy2d_policy(keep_reference=False)
    sigmas = policy.sigmas(10)
    calls = []

    def reward(samples, prompts):
        calls.append(samples.clone())
        return common.toy_mode_reward(samples, prompts)

    prompts = ["mode 1", "mode 5", "mode 2"]
    survivors, states, log_probs, alive, proxies = pro_grpo.expand_and_prune_rollout(
        policy, prompts, sigmas, [16, 8, 4], [5, 7], reward, noise_level=0.7, variant="flow_grpo")
    # exactly the funnel's model calls: proxies reuse the step's velocity and pruned trajectories stop
    assert policy.nfe == {"no_grad": 3 * pro_grpo.funnel_nfe(10, [16, 8, 4], [5, 7]), "grad": 0}
    assert states.shape == (11, 12, 2) and log_probs.shape == (10, 12)
    assert survivors == [p for p in prompts for _ in range(4)] and len(calls) == 2
    assert [p.shape for p in proxies] == [(3, 16), (3, 8)]
    # the proxy at each checkpoint is the reward of x0_hat = x_j - s_j v(x_j) for the trajectories alive then (at
    # step 7, s = 0.3: x - (1 - s) v would differ; at step 5, s = 0.5, the two coincide); the survivors' stored x_j
    # must be among the scored states' preimages
    assert abs(sigmas[7].item() - 0.5) > 0.1  # a checkpoint where the candidate formulas differ
    for call, j in zip(calls, (5, 7)):
        with policy.nfe_paused(), torch.no_grad():
            x_j = states[j]
            v_j = policy.velocity(x_j, sigmas[j], policy.encode_prompts(survivors))
        x0_hat = x_j - sigmas[j].float() * v_j
        for row in x0_hat:
            assert torch.isclose(call, row, atol=1e-5).all(-1).any(), j


def test_the_survivors_are_the_optimal_variance_subset_of_each_groups_proxy_rewards():
    """At the checkpoint each group keeps OVF's choice on its own proxy rewards: the survivors' initial noises are
    those of the trajectories optimal_variance_filter picks, group by group, in its order."""
    policy = tasks.toy2d_policy(keep_reference=False)
    drawn, draw = [], policy.initial_noise
    policy.initial_noise = lambda n, generator=None: drawn.append(draw(n, generator)) or drawn[-1]
    _, states, _, alive, proxies = pro_grpo.expand_and_prune_rollout(
        policy, ["mode 1", "mode 6"], policy.sigmas(6), [8, 3], [2], common.toy_mode_reward, noise_level=0.7,
        variant="flow_grpo")
    assert alive.tolist() == [0, 0, 0, 1, 1, 1]
    for p in range(2):
        keep = pro_grpo.optimal_variance_filter(proxies[0][p], 3)
        assert keep.tolist() != [0, 1, 2]  # (not the first three: the test would not see an unfiltered funnel)
        torch.testing.assert_close(states[0][3 * p:3 * p + 3], drawn[0][8 * p + keep], rtol=0, atol=0)


def test_rollout_batch_size_splits_the_model_calls_only():
    """--rollout-batch-size: chunks of 5 (not dividing any funnel size) give the unchunked rollout's survivors, states
    and log-probs, and the calls are that small."""
    policy = tasks.toy2d_policy(keep_reference=False)
    sigmas = policy.sigmas(10)
    prompts = ["mode 1", "mode 5", "mode 2"]
    runs = []
    for chunk in (0, 5):
        batches = []
        forward = policy._forward
        policy._forward = lambda net, x, s, c: (batches.append(len(x)), forward(net, x, s, c))[1]
        torch.manual_seed(0)
        runs.append(pro_grpo.expand_and_prune_rollout(policy, prompts, sigmas, [16, 8, 4], [5, 7],
                                                      common.toy_mode_reward, 0.7, "flow_grpo", chunk))
        del policy._forward
        assert max(batches) == (48 if chunk == 0 else 5)
    (s0, x0, lp0, a0, _), (s1, x1, lp1, a1, _) = runs
    assert s0 == s1 and torch.equal(a0, a1)
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)


def test_no_expansion_no_pruning_is_the_baseline(tmp_path):
    """Same seed, group 8, no funnel, per-group std: Pro-GRPO's iteration is Flow-GRPO's, loss for loss."""
    common_flags = ["--iterations", "2", "--log-every", "0", "--seed", "3", "--adv-std", "group"]
    a = flow_grpo.main(common_flags + ["--group-size", "8", "--output-dir", str(tmp_path / "a")])
    b = pro_grpo.main(common_flags + ["--group-sizes", "8", "--prune-steps", "", "--output-dir", str(tmp_path / "b")])
    la = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(la, lb):
        for k in ["reward/mean", "loss/policy_loss", "loss/approx_kl", "grad_norm", "nfe/rollout", "nfe/train"]:
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), k
    assert a["eval_reward_after"] == pytest.approx(b["eval_reward_after"], rel=1e-6)
    from safetensors.torch import load_file
    wa = load_file(tmp_path / "a" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k])


@pytest.mark.parametrize("flags, message", [
    (["--group-sizes", "8,16", "--prune-steps", "5"], "--group-sizes must not increase and must end at 2 or more; "
                                                      "got '8,16'"),
    (["--group-sizes", "16,8", "--prune-steps", "12"], "--prune-steps takes increasing steps in [0, 10) (--num-steps "
                                                       "10); got '12'"),
    (["--group-sizes", "16,8,4", "--prune-steps", "5"], "--group-sizes '16,8,4' needs one more entry than "
                                                        "--prune-steps '5'"),
    (["--group-sizes", "16,8", "--prune-steps", "five"], "--prune-steps takes comma-separated integers such as '1,2'; "
                                                         "got 'five'"),
])
def test_a_bad_funnel_stops_at_parse_time_with_one_line(flags, message):
    with pytest.raises(SystemExit) as e:
        parse_args(pro_grpo.Args, pro_grpo.PRESETS, flags, prog="pro_grpo.py")
    assert str(e.value) == f"pro_grpo.py: {message}"
    assert pro_grpo.parse_funnel(parse_args(pro_grpo.Args, pro_grpo.PRESETS, ["--group-sizes", "16,8,4",
                                                                              "--prune-steps", "2,5"])) == \
        ([16, 8, 4], [2, 5])


@pytest.mark.slow
def test_toy2d_pro_grpo_raises_eval_reward_and_reports_nfe(tmp_path):
    s = pro_grpo.main(["--iterations", "250", "--output-dir", str(tmp_path), "--log-every", "0"])
    assert s["eval_reward_before"] < 0.2 and s["eval_reward_after"] > s["eval_reward_before"] + 0.3, s
    assert s["on_manifold_after"] > s["on_manifold_before"] - 0.1, s
    assert s["nfe_rollout"] == 250 * 8 * pro_grpo.funnel_nfe(10, [32, 16, 8], [5, 7])
    assert s["nfe_train"] == 250 * 8 * 8 * 9
    assert s["nfe_rollout_unpruned_same_final_group"] == 250 * 8 * 8 * 10


def test_tiny_flux_trains_its_lora(tmp_path):
    s = pro_grpo.main(["--model", "tiny-flux", "--iterations", "2", "--output-dir", str(tmp_path), "--log-every", "0",
                       "--eval-ema", "false"])
    assert_trained(tmp_path)
    assert s["trainable_tensors_changed"] == s["trainable_tensors"]
    assert s["nfe_rollout"] == 2 * 2 * pro_grpo.funnel_nfe(6, [8, 4, 2], [3, 4])


def test_the_shared_group_size_flag_is_refused_not_ignored(tmp_path):
    """Pro-GRPO's groups are --group-sizes; --group-size (which every other script reads) would change nothing here,
    so it stops the run with one line before anything is written, instead of running another group size."""
    with pytest.raises(SystemExit, match="--group-size is not used here: .*--group-sizes"):
        pro_grpo.main(["--group-size", "4", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
