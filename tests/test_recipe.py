"""The training recipe's pieces against their closed forms: the shifted cosine schedule, EDM's
log-normal noise levels, v-prediction as EDM's preconditioning, and a resume keeping its recipe."""
import math

import pytest
import torch

import config
from settings import with_lr
from core.diffusion import (cosine_betas, linear_betas, lognormal_t_probs, resolution_shift,
                       shifted_cosine_betas)


def alpha_bars(betas):
    return torch.cumprod(1 - betas, 0)


def test_the_shifted_cosine_schedule_moves_every_log_snr_by_the_shift():
    T, shift = 1000, resolution_shift(16)
    assert shift == pytest.approx(2 * math.log(4))  # 16 px: SNR x 16 (Hoogeboom et al.)
    assert resolution_shift(64) == 0 and resolution_shift(128) == pytest.approx(-2 * math.log(2))
    ab, ab_shifted = alpha_bars(cosine_betas(T)), alpha_bars(shifted_cosine_betas(T, shift))
    moved = torch.logit(ab_shifted) - torch.logit(ab)  # (T,)
    # every step but the last, where both schedules' beta is clipped to 0.999
    torch.testing.assert_close(moved[:-1], torch.full((T - 1,), shift, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(shifted_cosine_betas(T, 0.0), cosine_betas(T), rtol=1e-12, atol=1e-15)
    assert bool((ab_shifted[:-1] > ab[:-1]).all())  # a small image: less noise at every step


def test_lognormal_t_probabilities_are_edms_noise_levels_rounded_to_the_nearest_step():
    ab = alpha_bars(linear_betas(1000, 1e-4, 0.02))
    p = lognormal_t_probs(ab)  # (T,)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12) and bool((p >= 0).all())
    # Draw ln sigma ~ N(-1.2, 1.2^2) directly and take each to the step of nearest ln sigma.
    log_sigma = 0.5 * (torch.log1p(-ab) - torch.log(ab))
    g = torch.Generator().manual_seed(0)
    draws = -1.2 + 1.2 * torch.randn(400_000, generator=g, dtype=torch.float64)
    nearest = torch.searchsorted(log_sigma, draws).clamp(1, 999)
    nearest = torch.where((draws - log_sigma[nearest - 1]).abs() < (log_sigma[nearest] - draws).abs(),
                          nearest - 1, nearest)
    counts = torch.bincount(nearest, minlength=1000).double() / len(draws)
    # within 4 binomial standard deviations at every step (and 1e-4 where p is ~0)
    tolerance = 4 * (p * (1 - p) / len(draws)).sqrt() + 1e-4
    assert bool(((counts - p).abs() <= tolerance).all())


def test_training_draws_t_with_the_lognormal_probabilities(tiny, tmp_path):
    import ddpm
    args, typed = config.parse_args(tiny(tmp_path, "--t-sampling", "lognormal", "--timesteps",
                                         "50", "--device", "cpu"))
    prog = ddpm.Program(args, typed)
    torch.manual_seed(0)
    t = prog.trainer.draw_t(100_000)
    p = lognormal_t_probs(prog.trainer.diffusion.ab64)
    freq = torch.bincount(t, minlength=50).double() / len(t)
    assert bool(((freq - p).abs() <= 4 * (p * (1 - p) / len(t)).sqrt() + 1e-4).all())


def test_v_prediction_is_edms_preconditioning_with_unit_data_variance():
    """EDM (Karras et al. 2022, Table 1) with sigma_data = 1: D(x) = c_skip x + c_out F(c_in x),
    F trained towards (x0 - c_skip x) / c_out, at x = x0 + sigma eps. In our variables x_t =
    sqrt(ab) x and sigma^2 = (1 - ab) / ab that target is -v, the network sees c_in x = x_t,
    and both have unit variance on unit-variance data."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 200_000, generator=g, dtype=torch.float64)
    for ab in (0.999, 0.5, 0.01):
        sigma = math.sqrt((1 - ab) / ab)
        c_skip, c_out, c_in = 1 / (sigma**2 + 1), sigma / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma**2 + 1)
        x = x0 + sigma * eps
        v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0  # our target (diffusion.v_target)
        torch.testing.assert_close((x0 - c_skip * x) / c_out, -v)
        torch.testing.assert_close(c_in * x, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps)
        assert (c_in * x).var().item() == pytest.approx(1.0, abs=0.01)
        assert v.var().item() == pytest.approx(1.0, abs=0.01)


def test_a_resume_goes_on_with_its_recipe_and_older_checkpoints_with_the_old_one(settings,
                                                                                 reader):
    stored = {"lr": 1e-3, "lr_warmup": 10, "lr_schedule": "cosine", "hflip": "off",
              "ema_decay": 0.999, "min_snr_gamma": 0.0, "t_sampling": "uniform"}
    resume = ["--resume", "--data-folders", "faces", "--min-snr-gamma", "5"]
    t = settings([*resume, "--lr", "5e-4"], read=reader(train=stored)).train
    recipe = {k: getattr(t, k) for k in stored}
    assert recipe == {**stored, "lr": 5e-4, "min_snr_gamma": 5.0}  # stored, but what is typed
    older = {k: v for k, v in stored.items() if k not in ("min_snr_gamma", "t_sampling")}
    t = settings(["--resume", "--data-folders", "faces"], read=reader(train=older)).train
    assert (t.min_snr_gamma, t.t_sampling) == (0.0, "uniform")  # how all runs trained then


def test_lognormal_t_and_importance_sampling_together_are_refused(run_ddpm, tiny, tmp_path):
    r = run_ddpm(tmp_path, *tiny(tmp_path, "--t-sampling", "lognormal", "--importance-sampling"))
    assert r.returncode == 2 and "give one" in r.stderr and "Traceback" not in r.stderr


def test_the_default_learning_rate_follows_the_size_rule(settings):
    from features.kinds import make_model
    from run.trainer import default_lr
    assert default_lr(400_000) == 1e-3 and default_lr(1_000_000) == 1e-3
    assert default_lr(4_000_000) == pytest.approx(5e-4)  # 1e-3 / sqrt(4)
    assert default_lr(10**9) == 1e-4  # the floor
    s = settings([])  # the 64-px model: 1e-3 sqrt(1 M / its parameters)
    from unet import UNet
    params = sum(p.numel() for p in UNet(3, 64, (1, 2, 4, 8), (False, False, True, True), 2).parameters())
    assert sum(p.numel() for p in make_model(s.model, None)[0].parameters()) == params
    assert s.train.lr is None  # until the network's size decides it
    lr = with_lr(s, default_lr(params)).train.lr
    assert lr == pytest.approx(1e-3 * math.sqrt(1e6 / params))
    typed = settings(["--lr", "3e-4"])
    assert with_lr(typed, lr).train.lr == 3e-4  # a typed --lr is kept


def test_lognormal_t_is_the_default_where_the_loss_allows_it(settings):
    assert settings([]).train.t_sampling == "lognormal"
    for flags in (["--super-res", "16"], ["--learn-sigma"], ["--importance-sampling"]):
        assert settings(flags).train.t_sampling == "uniform", flags  # uniform-t losses
    assert settings(["--learn-sigma", "--t-sampling", "lognormal"]).train.t_sampling == "lognormal"
