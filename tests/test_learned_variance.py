"""Learned reverse variance (Nichol & Dhariwal 2021): outputs, interpolation, hybrid loss, CLI."""
import os
import subprocess
import sys

import pytest
import torch

from core.diffusion import GaussianDiffusion
from unet import UNet

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")


def test_the_unet_outputs_2C_channels_when_it_learns_sigma():
    m = UNet(3, 8, (1, 2), (False, True), 1, learn_sigma=True)
    assert m(torch.randn(2, 3, 8, 8), torch.tensor([0, 5])).shape == (2, 6, 8, 8)


def test_the_learned_variance_interpolates_log_beta_tilde_and_log_beta():
    d = GaussianDiffusion(100, learn_sigma=True, prediction="eps")
    t = torch.tensor([1, 50, 99])
    ones = torch.ones(3, 1, 1, 1)
    lo, hi = d.model_logvar(t, -ones).flatten(), d.model_logvar(t, ones).flatten()
    assert torch.allclose(lo.exp(), d.posterior_var[t], rtol=1e-5)
    assert torch.allclose(hi.exp(), d.betas[t], rtol=1e-5)
    mid = d.model_logvar(t, 0 * ones).flatten()
    assert torch.allclose(mid, (lo + hi) / 2)


def test_the_ancestral_step_draws_noise_with_the_learned_variance():
    torch.manual_seed(0)
    d = GaussianDiffusion(100, learn_sigma=True, prediction="eps")
    xt = torch.zeros(20000, 1, 1, 1)
    logvar = torch.full_like(xt, -3.0)
    out = d.p_sample(xt, torch.full((20000,), 40), torch.zeros_like(xt), logvar=logvar)
    assert out.std().item() == pytest.approx(torch.tensor(-1.5).exp().item(), rel=0.03)
    last = d.p_sample(xt[:5], torch.zeros(5, dtype=torch.long), torch.zeros_like(xt[:5]),
                      logvar=logvar[:5])
    assert (last == 0).all()


def test_the_hybrid_loss_trains_the_mean_only_through_L_simple():
    torch.manual_seed(0)

    class Fixed(torch.nn.Module):  # a learnable constant output: prediction and variance halves
        def __init__(self):
            super().__init__()
            self.pred = torch.nn.Parameter(torch.randn(1, 2, 4, 4) * 0.1)
            self.v = torch.nn.Parameter(torch.zeros(1, 2, 4, 4))

        def forward(self, x, t):
            return torch.cat([self.pred, self.v], 1).expand(len(x), -1, -1, -1)

    x0 = torch.rand(8, 2, 4, 4) * 2 - 1
    t, eps = torch.randint(0, 50, (8,)), torch.randn(8, 2, 4, 4)
    model = Fixed()
    d = GaussianDiffusion(50, 1e-3, 0.2, learn_sigma=True, prediction="eps")
    d(model, x0, t, eps).backward()
    simple = (model.pred.expand(8, -1, -1, -1) - eps).pow(2).mean()
    (grad_simple,) = torch.autograd.grad(simple, model.pred)
    assert torch.allclose(model.pred.grad, grad_simple, atol=1e-6)  # L_vlb adds nothing here
    assert model.v.grad.abs().sum() > 0  # ... but trains the variance


def test_a_learned_variance_checkpoint_samples_with_every_sampler(tmp_path):
    flags = ["--train", "--demo", "--demo-images", "16", "--img-size", "8", "--num-channels", "8",
             "--channel-multiples", "1", "--has-attn", "f", "--timesteps", "10", "--beta-max",
             "0.5", "--batch-size", "8", "--epochs", "1", "--learn-sigma", "--seed", "0"]
    r = subprocess.run([sys.executable, DDPM, *flags], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "ckpt" / "ckpt-0.pth", weights_only=True)
    assert ckpt["config"]["learn_sigma"] is True
    for sampler in ("ddpm", "ddim", "dpm++"):
        steps = [] if sampler == "ddpm" else ["--sample-steps", "4"]
        r = subprocess.run([sys.executable, DDPM, "--loadckpt", "ckpt-0.pth", "--sampler", sampler,
                            *steps, "--batch-size", "4", "--save-dir", sampler], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / sampler / "ddpm-3.png").exists()
    r = subprocess.run([sys.executable, DDPM, "--loadckpt", "ckpt-0.pth", "--eval-bpd", "4",
                        "--demo", "--demo-images", "4", "--batch-size", "4"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "bits/dim" in r.stdout, r.stderr
