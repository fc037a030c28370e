"""The variational bound in bits/dim: KL and decoder terms against closed forms and invariants."""
import math

import pytest
import torch

from data import to_model
from core.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl


def test_normal_kl_matches_torch_distributions():
    torch.manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 10).unbind(0)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-6


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.3, -1.0), (-0.9, 0.5), (1.5, -5.0)])
def test_discretised_gaussian_likelihood_sums_to_one_over_256_pixel_values(mean, log_scale):
    x = to_model(torch.arange(256, dtype=torch.uint8))
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean),
                                               torch.full_like(x, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_prior_term_is_near_zero_for_the_standard_schedules(schedule):
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    d = GaussianDiffusion(1000, schedule=schedule, prediction="eps")
    x0 = to_model(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))
    assert 0 <= d.bits_per_dim(Zero(), x0)["prior"] < 1e-3


def test_the_bound_of_a_perfect_denoiser_beats_a_zero_model():
    torch.manual_seed(0)
    x0 = to_model(torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8))

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    d = GaussianDiffusion(100, 1e-4, 0.2, prediction="eps")

    class Perfect(torch.nn.Module):  # the true eps of x_t for this one image
        def forward(self, xt, t):
            a = d.sqrt_alpha_bars[t][:, None, None, None]
            return (xt - a * x0) / d.sqrt_one_minus_alpha_bars[t][:, None, None, None]

    perfect, zero = d.bits_per_dim(Perfect(), x0), d.bits_per_dim(Zero(), x0)
    assert perfect["kl_terms"] < 1e-3 and perfect["total"] < zero["total"] - 1.0
    assert math.isclose(perfect["total"], perfect["prior"] + perfect["kl_terms"] + perfect["decoder"],
                        rel_tol=1e-6)
