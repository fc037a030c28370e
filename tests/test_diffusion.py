"""Facts about the schedule, q(x_t | x_0) and the reverse step, checked against closed forms."""
import math

import pytest
import torch

from core.diffusion import GaussianDiffusion, linear_betas
from unet import UNet


def test_linear_betas_run_evenly_from_beta_1_to_beta_T():
    b = linear_betas(7, 0.1, 0.4)
    assert b.dtype == torch.float64 and b.shape == (7,)
    assert b[0].item() == pytest.approx(0.1) and b[-1].item() == pytest.approx(0.4)
    assert torch.allclose(b.diff(), torch.full((6,), 0.05, dtype=torch.float64))


@pytest.mark.parametrize("T", [10, 1000])
def test_alpha_bars_strictly_decrease_inside_the_unit_interval(make_diffusion, T):
    ab = make_diffusion(T).alpha_bars
    assert (ab > 0).all() and (ab < 1).all()
    assert (ab.diff() < 0).all()


def test_betas_outside_0_1_are_refused():
    with pytest.raises(AssertionError, match="0 < beta_min < beta_max < 1"):
        GaussianDiffusion(10, 1e-4, 2.0, prediction="eps")


def test_alpha_bar_T_is_near_zero_for_the_standard_schedule(make_diffusion):
    # The prior p(x_T) = N(0, I) only holds if alpha_bar_T ~ 0 (Ho et al.: L_T ~ 1e-5 bits/dim).
    assert make_diffusion(1000).alpha_bars[-1].item() < 1e-4


def test_posterior_variance_lies_in_zero_beta_and_vanishes_at_the_last_step(make_diffusion):
    d = make_diffusion(50)
    var = d.posterior_var
    assert var[0].item() == 0.0
    assert (var[1:] > 0).all() and (var <= d.betas + 1e-12).all()


def test_q_sample_with_zero_noise_is_sqrt_alpha_bar_times_x0(make_diffusion):
    d = make_diffusion()
    x0, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    out = d.q_sample(x0, t, torch.zeros_like(x0))
    expected = d.alpha_bars[t].sqrt()[:, None, None, None] * x0
    assert torch.allclose(out, expected)


def test_q_sample_has_the_closed_form_mean_and_variance(make_diffusion):
    torch.manual_seed(0)
    d = make_diffusion()
    t = torch.full((20000,), 300)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    ab = d.alpha_bars[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.03)


def test_q_sample_keeps_unit_variance_data_at_unit_variance(make_diffusion):
    torch.manual_seed(0)
    d = make_diffusion()
    for t in (0, 200, 999):
        x0 = torch.randn(10000, 1, 2, 2)
        xt = d.q_sample(x0, torch.full((10000,), t), torch.randn_like(x0))
        assert xt.var().item() == pytest.approx(1.0, rel=0.03)


def test_p_sample_mean_is_the_closed_form_posterior_mean(make_diffusion):
    torch.manual_seed(0)
    d = make_diffusion()
    xt, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([1, 400, 999])
    out = d.p_sample(xt, t, eps, noise=torch.zeros_like(xt)).double()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # the schedule, in float64
    ab_all = torch.cumprod(1 - betas, 0)
    beta, ab, ab_prev = (v[:, None, None, None] for v in (betas[t], ab_all[t], ab_all[t - 1]))
    xt, eps = xt.double(), eps.double()
    # Algorithm 2: mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t).
    mu = (xt - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
    assert torch.allclose(out, mu, rtol=1e-5, atol=1e-6)
    # Independently, Eq. 7's posterior mean of q(x_{t-1} | x_t, x_0) at x_0 = x0_hat(x_t, eps).
    x0_hat = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
    mu_tilde = (ab_prev.sqrt() * beta / (1 - ab) * x0_hat
                + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * xt)
    assert torch.allclose(out, mu_tilde, rtol=1e-5, atol=1e-6)


def test_p_sample_adds_noise_with_the_posterior_standard_deviation(make_diffusion):
    torch.manual_seed(0)
    d = make_diffusion()
    xt = torch.zeros(20000, 1, 1, 1)
    out = d.p_sample(xt, torch.full((20000,), 500), torch.zeros_like(xt))
    assert out.std().item() == pytest.approx(d.posterior_var[500].sqrt().item(), rel=0.03)
    last = d.p_sample(xt[:10], torch.zeros(10, dtype=torch.long), torch.zeros_like(xt[:10]))
    assert (last == 0).all()  # no noise on the final step


def test_loss_of_the_freshly_initialised_model_is_E_eps_squared(make_diffusion):
    # The zero-initialised output conv predicts eps = 0, so the loss is E[eps^2] = 1.
    torch.manual_seed(0)
    d = make_diffusion()
    loss = d(UNet(1, 8, (1, 2), (False, False), 1), torch.rand(64, 1, 8, 8) * 2 - 1)
    assert loss.item() == pytest.approx(1.0, abs=0.05)


def test_training_draws_t_from_every_index_0_to_T_minus_1():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t)
            return torch.zeros_like(x)

    d, spy = GaussianDiffusion(timesteps=5, beta_min=0.1, beta_max=0.5, prediction="eps"), Spy()
    for _ in range(50):
        d(spy, torch.zeros(16, 1, 4, 4))
    assert set(torch.cat(seen).tolist()) == {0, 1, 2, 3, 4}


def test_sample_runs_T_steps_and_records_the_strip(make_diffusion):
    torch.manual_seed(0)
    d = make_diffusion(20)
    x_T = torch.randn(2, 1, 8, 8)
    x0, frames = d.sample(UNet(1, 8, (1, 2), (False, False), 1), x_T, "ddpm", strips=10)
    assert len(frames) == 11  # x_T, then x_t for t = 18, 16, ..., 2 (paper), then x_0
    assert frames[0] is x_T and torch.equal(frames[-1], x0)
    assert torch.isfinite(x0).all()
