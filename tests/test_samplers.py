"""Schedules, ODE solvers and the SDE step, checked against diffusers, torch.distributions and closed forms."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import common
from conftest import GaussianPolicy


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("n", [4, 10, 16])
def test_static_shift_matches_diffusers_sd3_scheduler(n):
    # SD3's scheduler applies its static shift to the sigmas it is given and appends 0.
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).numpy())
    torch.testing.assert_close(common.make_sigmas(n, shift=3.0).float(), sched.sigmas.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n,seq_len", [(6, 64), (16, 1024), (28, 4096)])
def test_flux_dynamic_shift_matches_flux_pipeline(n, seq_len):
    # What FluxPipeline does: linspace(1, 1/N, N) + calculate_shift(image_seq_len) into a dynamic-shift scheduler.
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sched.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).numpy(), mu=calculate_shift(seq_len))
    ours = common.make_sigmas(n, image_seq_len=seq_len)
    torch.testing.assert_close(ours.float(), sched.sigmas.float(), atol=1e-6, rtol=0)
    assert ours[0] == 1 and ours[-1] == 0 and (ours[1:] < ours[:-1]).all()


# ---------------------------------------------------------------------------------------------- ODE solvers
@pytest.mark.parametrize("n", [5, 10, 20])
def test_dpm_solver_2m_matches_diffusers(n):
    """Same velocity field, same sigmas: our DPM-Solver++(2M) equals diffusers' DPMSolverMultistepScheduler."""
    policy = GaussianPolicy()
    sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        solver_order=2, algorithm_type="dpmsolver++")
    sched.set_timesteps(n)
    sigmas = sched.sigmas.double()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        v = policy.velocity(ref, sigmas[i], {})
        ref = sched.step(v, t, ref).prev_sample
    ours = common.sample_ode(policy, x, sigmas, {}, solver="dpm2m")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_euler_last_step_is_x0_hat():
    x, v = torch.randn(8, 3), torch.randn(8, 3)
    torch.testing.assert_close(common.euler_step(x, v, 0.3, 0.0), x - 0.3 * v)


# DPM-Solver's last step returns x0_hat = E[x0 | x_s], whose spread is smaller than the data's by the
# posterior variance at the last nonzero sigma; with 25 linear steps (last sigma 0.04) that is < 0.01 in std.
@pytest.mark.parametrize("solver,steps,shift", [("euler", 100, 3.0), ("dpm2m", 25, None)])
def test_ode_reproduces_gaussian_data(solver, steps, shift, tol=0.03):
    policy = GaussianPolicy(mean=(1.0, -2.0), std=0.5)
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    x0 = common.sample_ode(policy, x, common.make_sigmas(steps, shift=shift), {}, solver=solver)
    torch.testing.assert_close(x0.mean(0), torch.tensor([1.0, -2.0]), atol=tol, rtol=0)
    torch.testing.assert_close(x0.std(0), torch.tensor([0.5, 0.5]), atol=tol, rtol=0)


def test_sample_ode_returns_full_trajectory(gaussian_policy):
    sigmas = common.make_sigmas(6)
    traj = common.sample_ode(gaussian_policy, torch.randn(4, 2), sigmas, {}, return_trajectory=True)
    assert len(traj) == 7
    assert gaussian_policy.nfe == {"no_grad": 6 * 4, "grad": 0}


# ---------------------------------------------------------------------------------------------- SDE step
def test_sde_zero_noise_is_euler():
    x, v = torch.randn(8, 4, 4), torch.randn(8, 4, 4)
    x_next, _, mean, _ = common.sde_step_with_logprob(x, v, 0.7, 0.6, noise_level=0.0)
    torch.testing.assert_close(x_next, common.euler_step(x, v, 0.7, 0.6))
    torch.testing.assert_close(mean, x_next)


@pytest.mark.parametrize("variant,level", [("flow_grpo", 0.7), ("dance_grpo", 0.3)])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.5, 0.4), (0.2, 0.0)])
def test_sde_log_prob_is_the_gaussian_density(variant, level, sigma, sigma_next):
    x, v = torch.randn(16, 3, 5), torch.randn(16, 3, 5)
    x_next, log_prob, mean, std = common.sde_step_with_logprob(x, v, sigma, sigma_next, level, variant=variant)
    step_std = std * math.sqrt(sigma - sigma_next)
    expected = torch.distributions.Normal(mean, step_std).log_prob(x_next).mean(dim=(1, 2))
    torch.testing.assert_close(log_prob, expected)
    assert log_prob.dtype == torch.float32


def test_sde_std_formula_and_first_step_convention():
    """std = a sqrt(s/(1-s)); at s = 1 the denominator uses sigmas[1] (= s' there), as Flow-GRPO's code. (Checked at
    s = 0.3, where s / (1 - s) = 0.43: at s = 0.5 it is 1, and sqrt((1-s)/s) or sqrt(s) * ... would pass too.)"""
    x, v = torch.zeros(1, 2), torch.zeros(1, 2)
    _, _, _, std = common.sde_step_with_logprob(x, v, 0.3, 0.2, noise_level=0.7)
    assert std.item() == pytest.approx(0.7 * math.sqrt(0.3 / 0.7))
    _, _, _, std = common.sde_step_with_logprob(x, v, 1.0, 0.9, noise_level=0.7)
    assert std.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.9)))


def test_sde_drift_formula():
    """mean = x + [v + std^2/(2s) (x + (1-s) v)] dt (the Flow-GRPO SDE of common.sde_step_with_logprob), per-sample sigmas."""
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    s, s_next = torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.7, 0.3, 0.0])
    _, _, mean, std = common.sde_step_with_logprob(x, v, s, s_next, noise_level=0.7)
    s_, dt = s[:, None], (s_next - s)[:, None]
    std_ = 0.7 * torch.sqrt(s_ / (1 - s_))
    torch.testing.assert_close(std, std_)
    torch.testing.assert_close(mean, x + (v + std_**2 / (2 * s_) * (x + (1 - s_) * v)) * dt)


def test_sde_scoring_a_given_sample_is_deterministic_and_differentiable():
    x, x_next = torch.randn(4, 2), torch.randn(4, 2)
    v = torch.randn(4, 2, requires_grad=True)
    out, lp, _, _ = common.sde_step_with_logprob(x, v, 0.6, 0.5, 0.7, prev_sample=x_next)
    torch.testing.assert_close(out, x_next)
    lp.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_sde_generator_makes_steps_reproducible():
    x, v = torch.randn(4, 2), torch.randn(4, 2)
    a = common.sde_step_with_logprob(x, v, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(3))[0]
    b = common.sde_step_with_logprob(x, v, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant,level", [("flow_grpo", 0.7), ("dance_grpo", 0.3)])
def test_sde_has_the_ode_marginals_on_gaussian_data(variant, level):
    """The score term in the drift makes the SDE keep the ODE's marginals: on a field that is exact for
    Gaussian data, SDE samples at s = 0 have the data's mean and covariance (statistical tolerance)."""
    policy = GaussianPolicy(mean=(1.0, -2.0), std=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g)
    sigmas = common.make_sigmas(50, shift=3.0)
    for j in range(50):
        v = policy.velocity(x, sigmas[j], {})
        x = common.sde_step_with_logprob(x, v, sigmas[j], sigmas[j + 1], level, generator=g, variant=variant)[0]
    torch.testing.assert_close(x.mean(0), torch.tensor([1.0, -2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.tensor([0.5, 0.5]), atol=0.03, rtol=0)
    # and the covariance is isotropic: no spurious correlation
    assert abs(torch.corrcoef(x.T)[0, 1]) < 0.03
