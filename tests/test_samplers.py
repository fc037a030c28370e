"""DDIM, DPM-Solver++(2M), the cosine schedule, v-prediction and EMA against closed forms."""
import math
import os
import subprocess
import sys

import pytest
import torch

from config import parse_args
from ddpm import Program
from run.trainer import ema_decay, update_ema
from core.diffusion import (GaussianDiffusion, cosine_betas, ddim_step, dpm_solver_step, heun_step,
                       karras_timesteps, spaced_timesteps)
from unet import UNet

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")


class Oracle(torch.nn.Module):
    """Returns the true eps (or v) of x_t for one known x0: a perfect denoiser of that image."""

    def __init__(self, d, x0):
        super().__init__()
        self.d, self.x0 = d, x0

    def forward(self, xt, t):
        a = self.d.sqrt_alpha_bars[t][:, None, None, None]
        s = self.d.sqrt_one_minus_alpha_bars[t][:, None, None, None]
        eps = (xt - a * self.x0) / s
        return eps if self.d.prediction == "eps" else a * eps - s * self.x0


def test_spaced_timesteps_run_from_T_minus_1_to_0():
    assert spaced_timesteps(1000, 5) == [999, 799, 599, 399, 199]
    assert spaced_timesteps(10, 10) == list(range(9, -1, -1))


def test_ddim_with_eta_1_on_the_full_sequence_is_the_ancestral_step(make_diffusion):
    torch.manual_seed(0)
    d = make_diffusion(1000, beta_max=0.02)
    xt, eps, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for t in (0, 1, 37, 500, 999):
        tt = torch.full((3,), t)
        _, x0 = d.eps_and_x0(xt, tt, eps)
        ab_t, ab_s = d.ab64[t].item(), (d.ab64[t - 1].item() if t > 0 else 1.0)
        ddim_mean = ddim_step(eps, x0, ab_t, ab_s, 1.0, torch.zeros_like(xt))
        ancestral_mean = d.p_sample(xt, tt, eps, noise=torch.zeros_like(xt))
        assert torch.allclose(ddim_mean, ancestral_mean, atol=2e-4, rtol=1e-4), t
        ddim_noise = ddim_step(eps, x0, ab_t, ab_s, 1.0, z) - ddim_mean
        assert torch.allclose(ddim_noise, d.posterior_std[t] * z, atol=1e-6), t


def test_ddim_with_eta_0_is_deterministic_given_x_T():
    torch.manual_seed(0)
    model = UNet(1, 8, (1, 2), (False, True), 1).eval()
    d = GaussianDiffusion(100, prediction="eps")
    x_T = torch.randn(2, 1, 8, 8)
    torch.manual_seed(1)
    a, _ = d.sample(model, x_T, "ddim", 10, eta=0.0)
    torch.manual_seed(2)
    b, _ = d.sample(model, x_T, "ddim", 10, eta=0.0)
    assert torch.equal(a, b)
    torch.manual_seed(3)
    c, _ = d.sample(model, x_T, "ddim", 10, eta=1.0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps,spacing", [
    ("ddim", 4, "uniform"), ("dpm++", 4, "uniform"), ("heun", 4, "uniform"), ("ddpm", 0, "uniform"),
    ("ddim", 4, "karras"), ("dpm++", 4, "karras"), ("heun", 4, "karras")])
def test_a_perfect_denoiser_recovers_x0(make_diffusion, sampler, steps, spacing, schedule,
                                        prediction):
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    d = make_diffusion(100 if sampler == "ddpm" else 1000, schedule,
                       prediction, beta_max=0.02)
    out, frames = d.sample(Oracle(d, x0), torch.randn_like(x0), sampler, steps, spacing=spacing,
                           strips=10)
    assert torch.allclose(out, x0, atol=1e-4)
    assert torch.equal(frames[-1], out)


def gaussian_data_ode_error(sampler, steps, c=0.5, spacing="uniform"):
    """Data x0 ~ N(0, c^2): E[x0 | x_t] is linear and the probability-flow ODE is solvable in
    closed form (x0 = c x_T / sqrt(ab c^2 + 1 - ab)), so a sampler's error is measurable."""
    d = GaussianDiffusion(1000, 1e-4, 0.02, prediction="eps")

    class Exact(torch.nn.Module):
        def forward(self, xt, t):
            ab = d.ab64[t].double()[:, None, None, None]
            x0_hat = ab.sqrt() * c**2 / (ab * c**2 + 1 - ab) * xt.double()
            return ((xt.double() - ab.sqrt() * x0_hat) / (1 - ab).sqrt()).float()

    ab_T = d.ab64[-1].item()
    x_T = torch.ones(1, 1, 1, 1)
    out, _ = d.sample(Exact(), x_T, sampler, steps, spacing=spacing)
    return abs(out.item() - c / math.sqrt(ab_T * c**2 + 1 - ab_T))


def test_dpm_solver_pp_is_more_accurate_than_ddim_on_the_probability_flow_ode():
    ddim = {n: gaussian_data_ode_error("ddim", n) for n in (10, 20, 50)}
    dpm = {n: gaussian_data_ode_error("dpm++", n) for n in (10, 20, 50)}
    assert ddim[50] < ddim[20] < ddim[10] and dpm[50] < dpm[20] < dpm[10]
    assert dpm[10] < ddim[10] and dpm[20] < ddim[20] / 2 and dpm[50] < ddim[50] / 20


def test_karras_timesteps_start_from_noise_and_crowd_towards_low_noise(make_diffusion):
    d = make_diffusion(1000, beta_max=0.02)
    for n in (5, 10, 18, 50):
        ts = karras_timesteps(d.ab64, n)
        assert len(ts) == n and ts[0] == 999 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))  # strictly decreasing
        # sigma^(1/7) is evenly spaced up to rounding t to the nearest log sigma
        root = ((1 - d.ab64[ts]) / d.ab64[ts]).sqrt() ** (1 / 7)
        gaps = root[:-1] - root[1:]
        assert torch.allclose(gaps, gaps.mean().expand_as(gaps), rtol=0.15)
        # more steps at low noise (t < T/10) than the uniform spacing puts there
        assert sum(t < 100 for t in ts) > sum(t < 100 for t in spaced_timesteps(1000, n))
    assert karras_timesteps(d.ab64, 1) == [999]
    assert len(karras_timesteps(d.ab64, 400)) < 400  # near t = 0, sigmas round to the same t


def test_heun_step_is_the_trapezoid_rule_on_the_sigma_ode(make_diffusion):
    # With the same slope at both ends the Heun step is the Euler step, which is DDIM (eta 0).
    torch.manual_seed(0)
    d = make_diffusion(1000, beta_max=0.02)
    x, eps = torch.randn(3, 4), torch.randn(3, 4)
    ab_t, ab_s = d.ab64[700].item(), d.ab64[300].item()
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    euler = ddim_step(eps, x0, ab_t, ab_s, 0.0, torch.zeros_like(x))
    assert torch.allclose(heun_step(x, eps, eps, ab_t, ab_s), euler, atol=1e-5)
    # Otherwise it averages the slopes: x^_s = x^_t + (sigma_s - sigma_t) (eps_t + eps_s) / 2.
    eps_s = torch.randn(3, 4)
    sig_t, sig_s = math.sqrt((1 - ab_t) / ab_t), math.sqrt((1 - ab_s) / ab_s)
    expected = math.sqrt(ab_s) * (x / math.sqrt(ab_t) + (sig_s - sig_t) * (eps + eps_s) / 2)
    assert torch.allclose(heun_step(x, eps, eps_s, ab_t, ab_s), expected, atol=1e-6)


def test_heun_is_second_order_and_beats_ddim_at_equal_network_calls():
    heun = {n: gaussian_data_ode_error("heun", n) for n in (10, 20, 35)}  # 19, 39, 69 calls
    assert heun[35] < heun[20] < heun[10]
    assert heun[20] < heun[10] / 2.5  # halving the step cuts a 2nd-order error about 4x
    ddim = {n: gaussian_data_ode_error("ddim", 2 * n - 1) for n in heun}
    assert all(heun[n] < ddim[n] for n in heun) and heun[35] < ddim[35] / 2


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "heun"])
def test_karras_spacing_errors_fall_with_steps(sampler):
    err = {n: gaussian_data_ode_error(sampler, n, spacing="karras") for n in (10, 20, 50)}
    assert err[50] < err[20] < err[10]


def test_heun_calls_the_network_twice_a_step_but_the_last(make_diffusion):
    calls = []

    class Count(torch.nn.Module):
        def forward(self, xt, t):
            calls.append(int(t[0]))
            return torch.zeros_like(xt)

    d = make_diffusion(1000, beta_max=0.02)
    d.sample(Count(), torch.randn(1, 1, 2, 2), "heun", 6)
    ts = spaced_timesteps(1000, 6)
    assert calls == [c for t, s in zip(ts, ts[1:]) for c in (t, s)] + [ts[-1]]  # 2 x 6 - 1


def test_dpm_solver_2m_step_matches_the_d0_d1_form():
    # The same update written as in the DPM-Solver++ reference code: D0 = m0, D1 = (m0 - m1) / r0,
    # x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D0 - 0.5 alpha_t (e^{-h} - 1) D1.
    torch.manual_seed(0)
    x, m0, m1 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    ab_prev2, ab_prev, ab_t = 0.2, 0.35, 0.6
    lam = lambda ab: math.log(math.sqrt(ab) / math.sqrt(1 - ab))
    h, h0 = lam(ab_t) - lam(ab_prev), lam(ab_prev) - lam(ab_prev2)
    r0 = h0 / h
    D0, D1 = m0, (m0 - m1) / r0
    alpha_t, sigma_t, sigma_s = math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(1 - ab_prev)
    ref = (sigma_t / sigma_s * x - alpha_t * (math.exp(-h) - 1) * D0
           - 0.5 * alpha_t * (math.exp(-h) - 1) * D1)
    ours, h_ours = dpm_solver_step(x, m0, m1, ab_prev, ab_t, h0)
    assert h_ours == pytest.approx(h)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_cosine_alpha_bar_matches_its_closed_form():
    T, s = 1000, 0.008
    betas = cosine_betas(T)
    assert (betas > 0).all() and (betas <= 0.999).all()
    ab = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    unclipped = int((betas < 0.999).sum())  # only the last steps hit the clip
    assert unclipped > 990
    for t in (1, 10, 500, 900, unclipped):  # paper step t = index t - 1
        assert ab[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_eps_and_x0_round_trip(make_diffusion, schedule):
    torch.manual_seed(0)
    d = make_diffusion(1000, schedule, beta_max=0.02, prediction="v")
    x0, eps = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 998])
    xt = d.q_sample(x0, t, eps)
    eps_hat, x0_hat = d.eps_and_x0(xt, t, d.v_target(x0, t, eps))
    assert torch.allclose(eps_hat, eps, atol=1e-4) and torch.allclose(x0_hat, x0, atol=1e-4)
    d.prediction = "eps"
    eps_hat, x0_hat = d.eps_and_x0(xt, t, eps)
    assert torch.equal(eps_hat, eps) and torch.allclose(x0_hat, x0, atol=1e-3)


def test_min_snr_gamma_weights_the_loss_by_min_snr_gamma_over_snr():
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    x0 = torch.zeros(512, 1, 2, 2)
    losses = {}
    for gamma in (0.0, 1.0):
        torch.manual_seed(0)
        d = GaussianDiffusion(1000, min_snr_gamma=gamma, prediction="eps")
        losses[gamma] = d(Zero(), x0).item()
    torch.manual_seed(0)
    d = GaussianDiffusion(1000, prediction="eps")
    t = torch.randint(0, 1000, (512,))
    eps = torch.randn_like(x0)
    snr = d.alpha_bars[t] / (1 - d.alpha_bars[t])
    expected = (eps.pow(2).mean((1, 2, 3)) * snr.clamp(max=1.0) / snr).mean().item()
    assert losses[0.0] == pytest.approx(eps.pow(2).mean().item(), rel=1e-5)
    assert losses[1.0] == pytest.approx(expected, rel=1e-5)


def test_ema_warm_up_follows_its_formula():
    assert ema_decay(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_decay(10**7, 0.9999) == 0.9999
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, 0.75 * before + 0.25 * model.weight)


def test_an_ema_checkpoint_round_trips(tmp_path):
    flags = ["--train", "--demo", "--img-size", "8", "--num-channels", "8", "--channel-multiples",
             "1", "--has-attn", "f", "--timesteps", "10", "--beta-max", "0.5",
             "--ckpt-save-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "out")]
    p = Program(*parse_args(flags))
    with torch.no_grad():
        for w in p.trainer.ema.parameters():
            w.normal_()
    p.save_checkpoint(wait=True)
    q = Program(*parse_args(flags + ["--loadckpt", str(tmp_path / "ckpt" / "ckpt-0.pth")]))
    for a, b in zip(p.trainer.ema.state_dict().values(), q.trainer.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(next(q.trainer.ema.parameters()), next(q.trainer.model.parameters()))


@pytest.mark.parametrize("sampler,steps", [("ddpm", 0), ("ddim", 10), ("dpm++", 10)])
def test_clipping_x0_keeps_a_bad_model_inside_the_data_range(sampler, steps):
    class Zero(torch.nn.Module):  # eps = 0 everywhere: x0_hat = x_t / sqrt(ab) explodes
        def forward(self, x, t):
            return torch.zeros_like(x)

    torch.manual_seed(0)
    d = GaussianDiffusion(100, 1e-4, 0.2, prediction="eps")
    x_T = torch.randn(4, 3, 4, 4)
    clipped, _ = d.sample(Zero(), x_T, sampler, steps, clip_x0=True)
    assert clipped.abs().max() <= 1.0 + 1e-5
    raw, _ = d.sample(Zero(), x_T, sampler, steps, clip_x0=False)
    assert raw.abs().max() > 2.0


def test_new_models_predict_v():
    """With eps prediction DDIM / DPM-Solver++ turn about 1 in 5 seeds into noise (below), so the
    default parameterisation is v; checkpoints keep what they were trained with."""
    args, _ = parse_args([])
    assert args.prediction == "v"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_small_network_error_stays_small_in_x0_at_every_t_with_v(make_diffusion, schedule):
    """x0_hat = sqrt(ab) x_t - sqrt(1 - ab) v moves by at most the network's own error; with eps,
    x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab) multiplies it by up to 1 / sqrt(ab_T) (160 for
    the linear schedule). A network that misses the per-image amplitude of x_t by 1 % (as our
    GroupNorm-ended UNet does: its output norm barely follows |x_T|) must not put +-1.6 of noise
    into x0_hat, which the deterministic samplers then carry to the end."""
    torch.manual_seed(0)
    x0, eps = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    worst = {}
    for prediction in ("v", "eps"):
        d = make_diffusion(1000, schedule, beta_max=0.02,
                           prediction=prediction)
        worst[prediction] = 0.0
        for t in (0, 100, 500, 900, 999):
            tt = torch.full((4,), t)
            xt = d.q_sample(x0, tt, eps)
            out = eps if prediction == "eps" else d.v_target(x0, tt, eps)
            _, a = d.eps_and_x0(xt, tt, out)
            _, b = d.eps_and_x0(xt, tt, out * 1.01)
            worst[prediction] = max(worst[prediction], (a - b).abs().max().item())
    assert worst["v"] < 0.05 and worst["eps"] > 1.0, worst  # 1 % x 160 x |eps| at t = T-1


def test_sampling_an_eps_model_deterministically_warns_in_one_line(tmp_path):
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                           "text-model-bc9cbb7.pth")  # written before v became the default
    r = subprocess.run([sys.executable, DDPM, "--loadckpt", fixture, "--sampler", "dpm++",
                        "--sample-steps", "2", "--batch-size", "2", "--save-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "predicts eps; with --sampler dpm++ (deterministic) some seeds" in r.stdout
    r = subprocess.run([sys.executable, DDPM, "--loadckpt", fixture, "--batch-size", "2",
                        "--save-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "some seeds" not in r.stdout  # ancestral: fresh noise each step
