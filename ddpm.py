"""ddpm.py: train a denoising diffusion model on a folder of images, then draw new ones.

Follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM): Algorithm 1 to train,
Algorithm 2 to sample. `python ddpm.py --help` lists every option.
"""
# Notation (Ho et al. 2020). Paper steps t = 1..T are Python indices t = 0..T-1 (paper t = index + 1).
#   betas[t]      beta_t, the variance added at step t            alphas[t] = 1 - betas[t]
#   alpha_bars[t] prod_{s <= t} alphas[s]                        x_t = q_sample(x_0, t, eps)  (Eq. 4)
#   p_sample      one ancestral step x_t -> x_{t-1} (Algorithm 2, sigma_t^2 = posterior variance)
#   forward(x_0)  the simple loss ||eps - eps_theta(x_t, t)||^2 (Algorithm 1), or its v version
#   ddim_step     x_t -> x_s on a sub-sequence (Song et al. 2021, Eq. 12); dpm_solver_step: the
#                 DPM-Solver++(2M) update (Lu et al. 2022) with lambda_t = log(sqrt(ab) / sqrt(1 - ab))
# Images are float (B, C, H, W) in [-1, 1] inside the model; data.to_model / to_uint8 convert.
import argparse
import contextlib
import copy
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor
from torchvision.utils import save_image

import evaluate
from data import (DataError, ImageDataset, demo_faces, downsample, load_folders, make_lowres,
                  to_model, to_uint8, upsample)
from text import CaptionError, Vocab, drop_captions, empty_like, read_captions, words
from unet import UNet

CKPT_FORMAT = 1
MODEL_FLAGS = ("img_channels", "num_channels", "channel_multiples", "has_attn", "num_blocks", "dropout",
               "learn_sigma")
DIFFUSION_FLAGS = ("img_size", "timesteps", "beta_min", "beta_max", "schedule", "prediction")
COND_FLAGS = ("captions", "super_res")  # what the model is conditioned on, also in the checkpoint
DEFAULT_STEPS = {"ddpm": 0, "ddim": 50, "dpm++": 20}  # 0: all T steps
MAX_BAD_STEPS = 5  # non-finite losses in a row before a run stops


class UserError(Exception):
    """Bad flags, files or checkpoints: printed as one line, exit code 2."""


class NonFiniteLoss(Exception):
    """The loss was NaN or infinite MAX_BAD_STEPS steps in a row."""


# ----------------------------------------------------------------------------------------------
# Diffusion


def linear_betas(T: int, beta_1: float, beta_T: float) -> Tensor:
    """beta_t for t = 1..T, evenly spaced from beta_1 to beta_T (Ho et al. 2020, Sec. 4). (T,) f64."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """beta_t = min(1 - alpha_bar_t / alpha_bar_{t-1}, max_beta) with alpha_bar_t = f(t) / f(0),
    f(t) = cos^2((t / T + s) / (1 + s) * pi / 2) (Nichol & Dhariwal 2021, Eq. 17). (T,) f64."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


def gather(a: Tensor, t: Tensor) -> Tensor:
    """a[t] shaped to broadcast over images: a: (T,), t: (B,) -> (B, 1, 1, 1)."""
    return a[t][:, None, None, None]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element, x in {k / 127.5 - 1}: the mass of N(mean, e^(2 log_scale)) on x's bin
    of width 2/255, the end bins reaching to -inf and +inf (Ho et al. 2020, Eq. 13). Nats."""
    inv_std = torch.exp(-log_scale)
    upper, lower = (x - mean + 1 / 255) * inv_std, (x - mean - 1 / 255) * inv_std
    log_mass = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_mass))


def spaced_timesteps(T: int, n: int) -> list[int]:
    """n indices from T-1 down, evenly spaced and ending at T/n - 1 ("trailing" spacing, Lin et al.
    2024, Table 2): the first step always starts from pure noise; n = T gives T-1, ..., 0."""
    return sorted({round(T - i * T / n) - 1 for i in range(n)}, reverse=True)


class ImportanceSampler:
    """Timesteps drawn with p_t proportional to sqrt(E[L_t^2]) over the last `history` losses seen
    at each t (uniform until every t has them; 0.1 % uniform mixed in), each loss weighted by
    1 / (T p_t) so that the weighted loss stays an unbiased estimate (Nichol & Dhariwal 2021,
    Sec. 3.3)."""

    def __init__(self, T: int, history: int = 10, uniform: float = 1e-3):
        self.history = torch.zeros(T, history, dtype=torch.float64)  # newest last
        self.count = torch.zeros(T, dtype=torch.long)  # losses held per t (at most `history`)
        self.uniform = uniform

    def probs(self) -> Tensor:
        """p_t for t = 0..T-1, (T,) float64."""
        T = len(self.count)
        if (self.count < self.history.shape[1]).any():
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = self.history.pow(2).mean(1).sqrt()
        return p / p.sum() * (1 - self.uniform) + self.uniform / T

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """n timesteps (n,) int64 and their weights 1 / (T p_t) (n,) float32."""
        p = self.probs()
        t = torch.multinomial(p, n, replacement=True)
        return t.to(device), (1.0 / (len(p) * p[t])).float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Remember the loss of each sampled timestep. t, losses: (n,)."""
        for ti, li in zip(t.tolist(), losses.tolist()):
            self.history[ti] = torch.cat([self.history[ti, 1:], torch.tensor([li])])
            self.count[ti] = min(self.count[ti] + 1, self.history.shape[1])

    def state_dict(self) -> dict:
        return {"history": self.history, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.count = state["history"].clone(), state["count"].clone()


class GaussianDiffusion(nn.Module):
    """The DDPM forward process q and the learned reverse process p_theta around a network that
    predicts eps (Ho et al. 2020) or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""

    def __init__(self, model: nn.Module, img_size: int, timesteps: int = 1000,
                 beta_min: float = 1e-4, beta_max: float = 0.02, schedule: str = "linear",
                 prediction: str = "eps", min_snr_gamma: float = 0.0, learn_sigma: bool = False):
        super().__init__()
        assert 0 < beta_min < beta_max < 1, "need 0 < beta_min < beta_max < 1"
        assert schedule in ("linear", "cosine") and prediction in ("eps", "v")
        self.model, self.img_size, self.T = model, img_size, timesteps
        self.prediction, self.min_snr_gamma, self.learn_sigma = prediction, min_snr_gamma, learn_sigma
        betas = (linear_betas(timesteps, beta_min, beta_max) if schedule == "linear"
                 else cosine_betas(timesteps))  # (T,) float64 for the products
        alpha_bars = torch.cumprod(1.0 - betas, dim=0)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        self.ab64 = alpha_bars  # float64 on the CPU: samplers read step coefficients from it
        # beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (Eq. 7); 0 at the last step.
        posterior_var = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
        # Coefficients are formed in float64 (1 - alpha_bar_t is ~1e-4 at t = 1) and stored float32.
        for name, value in [
                ("betas", betas), ("alphas", 1.0 - betas), ("alpha_bars", alpha_bars),
                ("alpha_bars_prev", alpha_bars_prev), ("posterior_var", posterior_var),
                ("sqrt_alpha_bars", alpha_bars.sqrt()),
                ("sqrt_one_minus_alpha_bars", (1.0 - alpha_bars).sqrt()),
                ("eps_coef", betas / (1.0 - alpha_bars).sqrt()),  # beta_t / sqrt(1 - alpha_bar_t)
                ("recip_sqrt_alphas", (1.0 - betas).rsqrt()),
                ("posterior_std", posterior_var.sqrt()), ("log_betas", betas.log()),
                # log beta~ with index 0 (where beta~ = 0) taking index 1's, as improved-diffusion
                ("posterior_logvar", torch.cat([posterior_var[1:2], posterior_var[1:]]).log())]:
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 4). x0, eps: (B, C, H, W)."""
        return gather(self.sqrt_alpha_bars, t) * x0 + gather(self.sqrt_one_minus_alpha_bars, t) * eps

    def v_target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
        return gather(self.sqrt_alpha_bars, t) * eps - gather(self.sqrt_one_minus_alpha_bars, t) * x0

    def eps_and_x0(self, xt: Tensor, t: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """The network output (eps or v) at x_t -> (eps, x0_hat), both (B, C, H, W) float32.

        eps: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab);  v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v,
        eps = sqrt(1 - ab) x_t + sqrt(ab) v.
        """
        a, s, out = gather(self.sqrt_alpha_bars, t), gather(self.sqrt_one_minus_alpha_bars, t), out.float()
        if self.prediction == "eps":
            return out, (xt - s * out) / a
        return s * xt + a * out, a * xt - s * out

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """Network output -> (eps or v prediction (B, C, H, W), variance output v or None)."""
        if not self.learn_sigma:
            return out.float(), None
        pred, v = out.float().chunk(2, dim=1)
        return pred, v

    def model_logvar(self, t: Tensor, v: Tensor) -> Tensor:
        """Learned log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2
        (Nichol & Dhariwal 2021, Eq. 15). v: (B, C, H, W)."""
        frac = (v + 1) / 2
        return frac * gather(self.log_betas, t) + (1 - frac) * gather(self.posterior_logvar, t)

    def p_sample(self, xt: Tensor, t: Tensor, eps: Tensor, noise: Tensor | None = None,
                 logvar: Tensor | None = None) -> Tensor:
        """One ancestral step x_t -> x_{t-1} given the predicted eps (Algorithm 2, line 4):

        x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z,
        with sigma_t^2 = beta~_t (the posterior variance, Sec. 3.2), which is 0 at t = 1 (index 0),
        or the learned exp(logvar) (no noise at index 0 either).
        """
        if noise is None:
            noise = torch.randn_like(xt)
        mean = gather(self.recip_sqrt_alphas, t) * (xt - gather(self.eps_coef, t) * eps.float())
        if logvar is None:
            return mean + gather(self.posterior_std, t) * noise
        return mean + (t > 0).float()[:, None, None, None] * (0.5 * logvar).exp() * noise

    def vb_terms(self, x0: Tensor, xt: Tensor, t: Tensor, eps: Tensor, v: Tensor | None,
                 true_eps: Tensor) -> Tensor:
        """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for index t > 0, and the decoder
        L_0 = -log p(x0 | x_1) (discretised Gaussian) at index 0, in bits/dim -> (B,)."""
        zeros = torch.zeros_like(xt)
        mean = self.p_sample(xt, t, eps, noise=zeros)  # mu_theta(x_t, t)
        true_mean = self.p_sample(xt, t, true_eps, noise=zeros)  # mu~(x_t, x0), Eq. 7
        true_lv = gather(self.posterior_logvar, t).expand_as(xt)
        lv = true_lv if v is None else self.model_logvar(t, v)
        nats = torch.where((t == 0)[:, None, None, None],
                           -discretized_gaussian_log_likelihood(x0, mean, 0.5 * lv),
                           normal_kl(true_mean, true_lv, mean, lv))
        return nats.flatten(1).mean(1) / math.log(2.0)

    @staticmethod
    def ddim_step(eps: Tensor, x0: Tensor, ab_t: float, ab_s: float, eta: float,
                  noise: Tensor) -> Tensor:
        """x_t -> x_s, s < t (Song et al. 2021, Eq. 12), from the predicted eps and x0:

        x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s); ab_s = 1 is the clean end.
        """
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        return math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps + sigma * noise

    @staticmethod
    def dpm_solver_step(xt: Tensor, x0: Tensor, x0_prev: Tensor | None, ab_t: float, ab_s: float,
                        h_prev: float | None) -> tuple[Tensor, float]:
        """DPM-Solver++(2M) x_t -> x_s in data-prediction form (Lu et al. 2022, Algorithm 2).

        With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), h = lambda_s -
        lambda_t: x_s = sigma_s / sigma_t x_t - alpha_s (e^{-h} - 1) D, where D = x0 (first order)
        or D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h (second order).
        Returns x_s and h. The step to the clean end (ab_s = 1, lambda_s = inf) gives D = x0.
        """
        if ab_s >= 1.0:
            return x0, math.inf
        lam = lambda ab: 0.5 * (math.log(ab) - math.log1p(-ab))
        h = lam(ab_s) - lam(ab_t)
        D = x0
        if x0_prev is not None:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x_s = math.sqrt((1 - ab_s) / (1 - ab_t)) * xt - math.sqrt(ab_s) * math.expm1(-h) * D
        return x_s, h

    def forward(self, x0: Tensor, t: Tensor | None = None, eps: Tensor | None = None,
                cond: dict | None = None) -> Tensor:
        """Algorithm 1's loss, averaged over the batch (see losses)."""
        return self.losses(x0, t, eps, cond).mean()

    def losses(self, x0: Tensor, t: Tensor | None = None, eps: Tensor | None = None,
               cond: dict | None = None) -> Tensor:
        """Per image: ||target - net(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t)||^2 -> (B,), t uniform
        (B,) and eps ~ N(0, I) unless given; target eps or v, weighted by min(SNR, gamma) / SNR
        (or / (SNR + 1) for v) if gamma > 0 (min-SNR-gamma, Hang et al. 2023).
        cond: the network's conditioning inputs (tokens=..., or lowres=..., aug=...)."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)  # (B,)
        if eps is None:
            eps = torch.randn_like(x0)
        xt = self.q_sample(x0, t, eps)
        out, v = self.split(self.model(xt, t, **(cond or {})))
        target = eps if self.prediction == "eps" else self.v_target(x0, t, eps)
        mse = (out - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if self.min_snr_gamma > 0:
            snr = self.alpha_bars[t] / (1 - self.alpha_bars[t])
            mse = mse * snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)
        if v is not None:  # hybrid loss: + lambda L_vlb, lambda = 1e-3, the mean frozen (Sec. 3.1)
            eps_hat, _ = self.eps_and_x0(xt, t, out.detach())
            mse = mse + self.vb_terms(x0, xt, t, eps_hat, v, eps) * self.T * 1e-3
        return mse

    @torch.no_grad()
    def bits_per_dim(self, x0: Tensor, model: nn.Module | None = None, track=iter,
                     cond: dict | None = None) -> dict:
        """The variational bound -log p(x0) <= L_T + sum_{t>1} L_{t-1} + L_0 (Ho et al. 2020, Eq. 5)
        with sigma_t^2 = beta~_t or the learned variance, in bits per dimension, per term.

        L_T = KL(q(x_T|x0) || N(0, I)); L_{t-1} = KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t));
        L_0 = -log p(x0|x1), a discretised Gaussian. x0: (B, C, H, W) on the 256-level grid.
        """
        model = self.model if model is None else model
        nats_per_bit = math.log(2.0) * x0[0].numel()  # nats of a whole image -> bits/dim
        ab_T = self.alpha_bars[-1]
        prior = normal_kl(ab_T.sqrt() * x0, (1 - ab_T).log(), torch.zeros_like(x0),
                          torch.zeros_like(x0)).flatten(1).sum(1) / nats_per_bit  # (B,)
        terms = torch.zeros(len(x0), self.T, device=x0.device)  # (B, T) bits/dim
        for t in track(range(self.T - 1, -1, -1)):
            tt = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
            true_eps = torch.randn_like(x0)
            xt = self.q_sample(x0, tt, true_eps)
            out, v = self.split(model(xt, tt, **(cond or {})))
            eps, _ = self.eps_and_x0(xt, tt, out)
            terms[:, t] = self.vb_terms(x0, xt, tt, eps, v, true_eps)
        return {"total": (prior + terms.sum(1)).mean().item(), "prior": prior.mean().item(),
                "decoder": terms[:, 0].mean().item(), "kl_terms": terms[:, 1:].sum(1).mean().item()}

    def guided(self, model: nn.Module, x: Tensor, t: Tensor, cond: dict | None,
               w: float = 1.0) -> Tensor:
        """The network output at x_t, with classifier-free guidance (Ho & Salimans 2022, Eq. 6)
        when a caption is given and w != 1: out = out(empty) + w (out(caption) - out(empty)).

        w = 1 is the plain conditional model, w = 0 the unconditional one. Guiding eps or v is the
        same (each is linear in the other at fixed x_t, t). A learned variance is not guided: it
        comes from the conditional output (as GLIDE). Both halves run as one batch of 2B."""
        cond = cond or {}
        if w == 1.0 or "tokens" not in cond:
            return model(x, t, **cond)
        tokens = cond["tokens"]  # (B, L)
        both = model(torch.cat([x, x]), torch.cat([t, t]),
                     tokens=torch.cat([tokens, empty_like(tokens)]))  # (2B, C or 2C, H, W)
        c, u = both.float().chunk(2)
        if not self.learn_sigma:
            return u + w * (c - u)
        (c, var), (u, _) = c.chunk(2, dim=1), u.chunk(2, dim=1)
        return torch.cat([u + w * (c - u), var], dim=1)

    @torch.no_grad()
    def sample(self, x_T: Tensor, sampler: str = "ddpm", steps: int = 0, eta: float = 0.0,
               model: nn.Module | None = None, strips: int = 0, clip_x0: bool = True, track=iter,
               cond: dict | None = None, guidance: float = 1.0):
        """x_T: (B, C, H, W) noise -> x_0 with the ancestral sampler (all T steps, Algorithm 2),
        DDIM or DPM-Solver++(2M) on `steps` respaced timesteps, using `model` (default: self.model),
        conditioned on cond (a caption, guided with scale `guidance`, or a low-res image).

        clip_x0 clips the predicted x0 to the data range [-1, 1] and re-derives eps from it
        (eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)), as Ho et al.'s and Nichol & Dhariwal's code do:
        without it, a partly trained model's small eps errors at large t (amplified by
        1 / sqrt(ab_t)) drive the chain off to saturated colours.
        Also returns the frames [x_T, ..., x_0]: about `strips` evenly spaced states of the chain.
        """
        model = self.model if model is None else model
        ts = list(range(self.T - 1, -1, -1)) if sampler == "ddpm" else spaced_timesteps(self.T, steps)
        every = max(1, len(ts) // strips) if strips else 0
        x, frames, x0_prev, h_prev = x_T, [x_T], None, None
        for i, t in enumerate(track(ts)):
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            out, v = self.split(self.guided(model, x, tt, cond, guidance))
            eps, x0 = self.eps_and_x0(x, tt, out)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - gather(self.sqrt_alpha_bars, tt) * x0) / gather(self.sqrt_one_minus_alpha_bars, tt)
            ab_t = self.ab64[t].item()
            ab_s = self.ab64[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
            if sampler == "ddpm":
                x = self.p_sample(x, tt, eps, logvar=None if v is None else self.model_logvar(tt, v))
            elif sampler == "ddim":
                x = self.ddim_step(eps, x0, ab_t, ab_s, eta, torch.randn_like(x))
            else:
                x, h_prev = self.dpm_solver_step(x, x0, x0_prev, ab_t, ab_s, h_prev)
                x0_prev = x0
            if every and ((len(ts) - 1 - i) % every == 0):
                frames.append(x)
        return x, frames


# ----------------------------------------------------------------------------------------------
# Command line


def ema_decay(step: int, max_decay: float) -> float:
    """EMA decay at optimizer step `step` (1, 2, ...), warmed up: min(max_decay, (1+step)/(10+step))."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def str2bool(s: str) -> bool:
    """'t'/'f' (or true/false, yes/no, 1/0) -> bool; argparse's type=bool would take 'f' as True."""
    v = s.lower()
    if v in ("t", "true", "y", "yes", "1"):
        return True
    if v in ("f", "false", "n", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected t or f, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a DDPM on a folder of images (--train), or draw samples from a "
                    "checkpoint (--loadckpt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-folders", nargs="+", metavar="DIR",
                   help="image folders (searched recursively), merged into one training set")
    g.add_argument("--demo", action="store_true",
                   help="train on built-in procedurally drawn cartoon faces instead of folders")
    g.add_argument("--demo-images", type=int, default=4096, help="how many demo faces to draw")
    g.add_argument("--img-channels", type=int, default=3, choices=[1, 3],
                   help="3 = RGB, 1 = grayscale")
    g.add_argument("--img-size", type=int, default=64,
                   help="images are resized (shorter side) and centre-cropped to this square")
    g.add_argument("--keep-small", action="store_true",
                   help="upscale images smaller than --img-size instead of skipping them")
    g = p.add_argument_group("model (stored in the checkpoint)")
    g.add_argument("--num-channels", type=int, default=64, help="UNet base width")
    g.add_argument("--channel-multiples", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="width multiple per resolution level")
    g.add_argument("--has-attn", type=str2bool, nargs="+", default=[False, False, True, True],
                   metavar="t|f", help="self-attention per resolution level, one per multiple")
    g.add_argument("--num-blocks", type=int, default=2, help="residual blocks per resolution")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout inside residual blocks")
    g.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T")
    g.add_argument("--beta-min", type=float, default=1e-4, help="beta_1 of the linear schedule")
    g.add_argument("--beta-max", type=float, default=0.02, help="beta_T of the linear schedule")
    g.add_argument("--learn-sigma", action="store_true",
                   help="learn the reverse variance (2C outputs, hybrid loss L_simple + 1e-3 L_vlb; "
                        "Nichol & Dhariwal 2021); the ancestral sampler and --eval-bpd use it")
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine"],
                   help="noise schedule: linear betas (Ho et al.) or cosine alpha_bar (Nichol & "
                        "Dhariwal; ignores --beta-min/--beta-max)")
    g.add_argument("--prediction", default="eps", choices=["eps", "v"],
                   help="what the network predicts: the noise eps, or v (Salimans & Ho 2022)")
    g = p.add_argument_group("training and sampling")
    g.add_argument("--train", action="store_true", help="train (otherwise: sample from --loadckpt)")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--min-snr-gamma", type=float, default=0.0,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is typical); 0 = off")
    g.add_argument("--importance-sampling", action="store_true",
                   help="draw t with p_t ~ sqrt(E[L_t^2]) over the last 10 losses per t, loss "
                        "reweighted to stay unbiased (Nichol & Dhariwal 2021); kept on resume")
    g.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay of the weights; warms up as min(decay, (1 + step) / (10 + step))")
    g.add_argument("--raw-weights", action="store_true",
                   help="sample with the raw weights instead of their EMA")
    g.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim", "dpm++"],
                   help="ancestral DDPM (all T steps), DDIM or DPM-Solver++(2M) (respaced steps)")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="steps for ddim / dpm++ (default 50 / 20); ddpm always takes all T")
    g.add_argument("--clip-x0", type=str2bool, default=True, metavar="t|f",
                   help="clip the predicted x0 to [-1, 1] at every sampling step (as Ho et al.'s "
                        "code does); keeps partly trained models from drifting")
    g.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise: 0 = deterministic, 1 = ancestral-like")
    g.add_argument("--epochs", type=int, default=5, help="epochs to train in this run")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute UNet block activations in the backward pass: less GPU memory "
                        "for about a third more compute")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet for training and sampling (a slow first step; "
                        "pays off on GPUs)")
    g.add_argument("--data-path", default="device", choices=["device", "plain"],
                   help="device: batches gathered, flipped and scaled on the device in one go; "
                        "plain: the per-image reference path (for benchmarks and tests)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="training batch size (the global batch under torchrun); number of "
                        "samples drawn when sampling")
    g.add_argument("--ckpt-save-dir", default="ckpt", help="checkpoint folder")
    g.add_argument("--save-dir", default="output", help="folder for samples and pictures")
    g.add_argument("--loadckpt", metavar="PATH",
                   help="checkpoint to sample from, or to resume training from; a bare name is "
                        "also looked up in --ckpt-save-dir")
    g.add_argument("--seed", type=int, default=None,
                   help="seed every RNG: the same seed gives the same samples (on one device)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    g = p.add_argument_group("text conditioning with classifier-free guidance (Ho & Salimans 2022)")
    g.add_argument("--captions", default="off", choices=["off", "files", "folders"],
                   help="train a text-conditioned model. files: a .txt beside each image, else "
                        "its row in a captions.csv (file,caption) in the data folder; folders: "
                        "each image's sub-folder name (class-conditional). Images without a "
                        "caption train unconditionally")
    g.add_argument("--cond-drop", type=float, default=0.1,
                   help="training: the probability that an image's caption is replaced by the "
                        "empty caption (this trains the unconditional model guidance needs)")
    g.add_argument("--prompt", nargs="+", metavar="TEXT",
                   help='with a text model\'s --loadckpt: --batch-size samples per prompt, a grid '
                        'each, e.g. --prompt "blue hair, red eyes" "pink hair, green eyes"')
    g.add_argument("--guidance-scale", type=float, nargs="+", default=[3.0], metavar="W",
                   help="guidance w: out(empty) + w (out(prompt) - out(empty)); 1 = plain "
                        "conditional, 0 = unconditional; several values: a grid each")
    g.add_argument("--eval-prompts", metavar="DIR",
                   help="with a text model's --loadckpt: fit a hair/eye colour classifier on the "
                        "captioned images in DIR (held out from training), then report per "
                        "--guidance-scale how often prompted colours are drawn, and FID vs DIR")
    g = p.add_argument_group("super-resolution (Saharia et al. 2021, SR3)")
    g.add_argument("--super-res", type=int, default=0, metavar="LOW",
                   help="train a super-resolution model from LOW x LOW to --img-size; each "
                        "(low, high) pair is made on the fly from the training images")
    g.add_argument("--sr-noise-max", type=float, default=0.2,
                   help="training: the upsampled low-res input gets Gaussian noise of std "
                        "a ~ U(0, this), and the model is told a (noise-conditioning augmentation)")
    g.add_argument("--sr-noise", type=float, default=0.05,
                   help="sampling: the noise std a added to the low-res input")
    g.add_argument("--lowres-folder", metavar="DIR",
                   help="with a super-resolution --loadckpt: upsample every image in DIR "
                        "(resized to LOW) into --save-dir")
    g.add_argument("--sr-ckpt", metavar="PATH",
                   help="with a base model's --loadckpt: the cascade: draw --batch-size samples, "
                        "then super-resolve them with this super-resolution model")
    g.add_argument("--eval-sr", type=int, default=0, metavar="N",
                   help="with a super-resolution --loadckpt: on the first N images of "
                        "--data-folders (held back from training), PSNR / SSIM and FID of ours "
                        "and of bicubic upsampling against the real images; sr-compare.png")
    g = p.add_argument_group("quality (FID / KID against the --data-folders)")
    g.add_argument("--eval-fid", type=int, default=0, metavar="N",
                   help="with --loadckpt: draw N samples and print FID and KID against the "
                        "training images, and write nearest.png (instead of the 64 samples)")
    g.add_argument("--eval-bpd", type=int, default=0, metavar="N",
                   help="with --loadckpt: the variational bound in bits/dim on the first N "
                        "training images (prior, KL and decoder terms; T model calls per batch)")
    g.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="while training: measure FID every K epochs, keep the best as best.pth")
    g.add_argument("--eval-samples", type=int, default=1000,
                   help="samples per FID measurement during training")
    g.add_argument("--cache-dir", default=".cache",
                   help="folder for caches: the decoded training images and their Inception "
                        "features (rebuilt when a file changes; safe to delete)")
    return p


UNSET = object()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed flags, and the names of the flags the user actually typed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = vars(parser.parse_args([])).keys()
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**{k: UNSET for k in names}))
    return args, {k for k, v in vars(typed).items() if v is not UNSET}


def check_args(a: argparse.Namespace) -> None:
    """Reject flag values that cannot work, with a message that says what to change."""
    for name in ("img_size", "num_channels", "num_blocks", "timesteps", "epochs", "batch_size",
                 "demo_images"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if any(m <= 0 for m in a.channel_multiples):
        raise UserError(f"--channel-multiples must be positive, got {a.channel_multiples}")
    if len(a.has_attn) != len(a.channel_multiples):
        raise UserError(f"--has-attn needs one t/f per --channel-multiples entry "
                        f"({len(a.channel_multiples)}), got {len(a.has_attn)}")
    f = 2 ** (len(a.channel_multiples) - 1)
    if a.img_size % f:
        raise UserError(f"--img-size {a.img_size} must be divisible by {f} for "
                        f"{len(a.channel_multiples)} levels; change it or use fewer multiples")
    if not 0 < a.beta_min < a.beta_max < 1:
        raise UserError(f"need 0 < --beta-min < --beta-max < 1, got {a.beta_min}, {a.beta_max}")
    if not 0 <= a.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.sample_steps is not None and a.sample_steps <= 0:
        raise UserError(f"--sample-steps must be positive, got {a.sample_steps}")
    if a.sampler == "ddpm" and a.sample_steps:
        raise UserError("--sampler ddpm always takes all T steps; use --sampler ddim or dpm++ "
                        "with --sample-steps")
    if (a.eval_fid or a.eval_every) and not a.data_folders:
        raise UserError("FID is measured against image folders: give --data-folders DIR")
    if a.eval_bpd and not (a.data_folders or a.demo):
        raise UserError("--eval-bpd measures training images: give --data-folders DIR or --demo")
    if min(a.eval_fid, a.eval_every, a.eval_bpd) < 0 or a.eval_samples < 2:
        raise UserError("--eval-fid and --eval-every must be >= 0, --eval-samples >= 2")
    if not 0 <= a.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
    if a.lr <= 0:
        raise UserError(f"--lr must be positive, got {a.lr}")
    if a.train and not a.demo and not a.data_folders and not a.loadckpt:
        raise UserError("--train needs --data-folders DIR (or --demo for built-in faces)")
    if a.train and not a.demo and not a.data_folders:
        raise UserError("resuming with --loadckpt needs the --data-folders to train on (or --demo)")
    if not a.train and not a.loadckpt:
        raise UserError("nothing to do: give --train to train, or --loadckpt PATH to sample")
    if not 0 <= a.cond_drop <= 1 or a.sr_noise < 0 or a.sr_noise_max < 0 or a.eval_sr < 0:
        raise UserError("need 0 <= --cond-drop <= 1, and --sr-noise, --sr-noise-max, --eval-sr >= 0")
    if a.eval_sr and not a.data_folders:
        raise UserError("--eval-sr measures held-back real images: give --data-folders DIR")


def pick_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def init_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (its RANK / WORLD_SIZE / LOCAL_RANK environment): join the process group
    (NCCL on GPUs, gloo on CPUs) -> (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, f"cuda:{os.environ['LOCAL_RANK']}" if cuda else device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Program


class Program:
    """Owns the device, data, model, optimizer and output paths of one run."""

    def __init__(self, args: argparse.Namespace, typed: set[str]):
        a = self.args = args
        self.rank, self.world, device = init_distributed(a.device)
        self.main = self.rank == 0  # only the first process writes files and prints
        self.console = Console(highlight=False, quiet=not self.main)
        self.console.print("config: " + " ".join(f"{k}={v}" for k, v in vars(a).items()))
        self.device = pick_device(device)
        if a.batch_size % self.world:
            raise UserError(f"--batch-size {a.batch_size} (the global batch) must be divisible by "
                            f"the {self.world} processes")
        if self.world > 1:
            self.console.print(f"distributed: {self.world} processes, global batch "
                               f"{a.batch_size} = {a.batch_size // self.world} per process")
        # Mixed precision on CUDA only: bf16 where supported, else fp16 with loss scaling.
        self.amp_dtype = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if a.seed is not None:
            seed_everything(a.seed)
        self.data_gen = torch.Generator().manual_seed(
            a.seed if a.seed is not None else random.randrange(2**63))
        self.epoch, self.step = 0, 0  # epochs and optimizer steps completed
        self.best_fid, self.bad_steps = math.inf, 0

        ckpt = self.read_checkpoint(a.loadckpt) if a.loadckpt else None
        if ckpt:  # the checkpoint's architecture wins; a typed flag that disagrees is an error
            stored = {"schedule": "linear", "prediction": "eps", "learn_sigma": False,  # older
                      "captions": "off", "super_res": 0, **ckpt["model_config"],
                      **ckpt["diffusion_config"], **ckpt.get("cond_config", {})}
            for k in MODEL_FLAGS + DIFFUSION_FLAGS + COND_FLAGS:
                if k in typed and list_or(getattr(a, k)) != list_or(stored[k]):
                    raise UserError(f"--{k.replace('_', '-')} {getattr(a, k)} contradicts the "
                                    f"checkpoint ({stored[k]}); drop the flag")
                setattr(a, k, stored[k])
        self.check_model_kind(a, ckpt)
        # A text model's vocabulary comes from its checkpoint, or from the captions of a new run.
        self.vocab = Vocab.from_state(ckpt["text"]) if ckpt and ckpt.get("text") else None
        self.data = self.load_data() if a.train else None
        self.cond_config = {k: getattr(a, k) for k in COND_FLAGS}
        self.model_config = {k: list_or(getattr(a, k)) for k in MODEL_FLAGS}
        self.model_config.update(vocab_size=len(self.vocab) if self.vocab else 0,
                                 text_len=self.vocab.max_len if self.vocab else 0,
                                 lowres_channels=a.img_channels if a.super_res else 0)
        self.diffusion_config = {k: getattr(a, k) for k in DIFFUSION_FLAGS}
        self.model = UNet(**self.model_config).to(self.device)
        self.diffusion = GaussianDiffusion(self.model, **self.diffusion_config,
                                           min_snr_gamma=a.min_snr_gamma,
                                           learn_sigma=a.learn_sigma).to(self.device)
        self.model.grad_checkpoint = a.grad_checkpoint
        self.ema = copy.deepcopy(self.model).requires_grad_(False)  # the weights we sample with
        self.importance = ImportanceSampler(a.timesteps) if a.importance_sampling else None
        if a.compile:  # in place: state_dict keys and the objects other code holds stay the same
            self.model.compile()
            self.ema.compile()
        if self.world > 1:  # training goes through DDP (gradients averaged); sampling does not
            self.diffusion.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        ab_T = self.diffusion.alpha_bars[-1].item()
        if ab_T > 1e-3:
            self.console.print(f"warning: alpha_bar_T = {ab_T:.3g}, so x_T is not pure noise and "
                               f"samples will be off; raise --beta-max (about 0.02 * 1000 / T)")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=a.lr,
                                          fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        if ckpt:
            try:
                self.restore(ckpt)
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                first = str(e).strip().splitlines()[0][:120]
                raise UserError(f"checkpoint {a.loadckpt} does not fit this program (damaged, or "
                                f"from another version): {type(e).__name__}: {first}") from None
        for folder in (a.save_dir, a.ckpt_save_dir if a.train else None):
            try:
                if folder:
                    os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create folder {folder}: {e.strerror}") from None
            if folder and not os.access(folder, os.W_OK):
                raise UserError(f"cannot write to folder {folder}: choose another one")

    def check_model_kind(self, a: argparse.Namespace, ckpt: dict | None) -> None:
        """Base, text and super-resolution models each take their own flags: a mix-up is one line."""
        name = a.loadckpt
        if a.super_res and a.captions != "off":
            raise UserError("a model is either text-conditioned (--captions) or super-resolution "
                            "(--super-res), not both")
        if a.super_res and not 0 < a.super_res < a.img_size:
            raise UserError(f"--super-res {a.super_res} must be between 0 and --img-size "
                            f"{a.img_size} (the low and the high resolution)")
        if a.train:
            if a.captions != "off" and a.demo:
                raise UserError("--captions reads captions beside images: give --data-folders DIR")
            return
        if a.super_res:
            if a.prompt or a.sr_ckpt or a.eval_fid or a.eval_bpd or a.eval_prompts:
                raise UserError(f"{name} is a super-resolution model ({a.super_res} -> "
                                f"{a.img_size} px): it takes --lowres-folder DIR or --eval-sr N, "
                                f"or goes in a cascade as --sr-ckpt after a base model")
            if not (a.lowres_folder or a.eval_sr):
                raise UserError(f"{name} is a super-resolution model ({a.super_res} -> "
                                f"{a.img_size} px): give --lowres-folder DIR to upsample a folder "
                                f"of images, or use it as --sr-ckpt after a base model's --loadckpt")
        elif a.lowres_folder or a.eval_sr:
            raise UserError(f"{name} is not a super-resolution model (it draws {a.img_size} px "
                            f"images from noise); --lowres-folder and --eval-sr need one trained "
                            f"with --super-res")
        if (a.prompt or a.eval_prompts) and a.captions == "off":
            raise UserError(f"{name} is not text-conditioned (trained without --captions): drop "
                            f"--prompt / --eval-prompts")

    def restore(self, ckpt: dict) -> None:
        """Weights, EMA, optimizer and counters; for training also the RNG states, so that a
        resumed run goes on exactly as if it had never stopped."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt.get("ema", ckpt["model"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # --lr applies on resume (e.g. after a NaN stop)
            group["lr"] = self.args.lr
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best_fid = ckpt.get("best_fid", math.inf)
        if self.importance and ckpt.get("importance"):
            self.importance.load_state_dict(ckpt["importance"])
        if self.args.train:
            self.data_gen.set_state(ckpt["data_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)

    # -- helpers -------------------------------------------------------------------------------

    def side_rng(self):
        """Pictures and FID drawn during training use a forked RNG, so that they leave the
        training's random stream (and so an exact resume) untouched."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def progress(self, *fields: str) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), *(TextColumn(f"{{task.fields[{f}]}}") for f in fields),
                        console=self.console, transient=True, disable=not self.main)

    def read_checkpoint(self, path: str) -> dict:
        """Load a ddpm.py checkpoint safely (weights_only: opening it never runs code)."""
        if not os.path.exists(path) and os.path.dirname(path) == "":
            path = os.path.join(self.args.ckpt_save_dir, path)
        if not os.path.isfile(path):
            raise UserError(f"checkpoint not found: {path} "
                            f"(also looked in {self.args.ckpt_save_dir}/)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read checkpoint {path}: damaged or not a ddpm.py checkpoint "
                            f"({type(e).__name__})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
            raise UserError(f"{path} is not a ddpm.py checkpoint (format {CKPT_FORMAT})")
        self.console.print(f"loaded {path} (epoch {ckpt['epoch']}, step {ckpt['step']})")
        return ckpt

    def save_checkpoint(self, epoch_index: int, name: str = "") -> str:
        """Write ckpt-{epoch_index % 5}.pth (or `name`) atomically: temp file, fsync, rename."""
        if not self.main:
            return None
        path = os.path.join(self.args.ckpt_save_dir, name or f"ckpt-{epoch_index % 5}.pth")
        state = {"format": CKPT_FORMAT, "model_config": self.model_config,
                 "diffusion_config": self.diffusion_config, "cond_config": self.cond_config,
                 "text": self.vocab.state() if self.vocab else None,
                 "model": self.model.state_dict(),
                 "ema": self.ema.state_dict(),
                 "importance": self.importance.state_dict() if self.importance else None,
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step": self.step,
                 "best_fid": self.best_fid, "data_rng": self.data_gen.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                 else None}
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:  # a full disk or a permission error: say so, keep training
            self.console.print(f"warning: could not save {path}: {e.strerror or e}; the previous "
                               f"checkpoints are intact and training goes on")
            with contextlib.suppress(OSError):
                os.remove(tmp)
            return None
        return path

    def save_grid(self, images: Tensor, name: str, nrow: int) -> None:
        """images: (N, C, H, W) in [-1, 1] -> one PNG grid in --save-dir."""
        save_image(to_uint8(images).float() / 255, os.path.join(self.args.save_dir, name),
                   nrow=nrow, padding=1)

    @torch.inference_mode()
    def draw(self, n: int, desc: str = "sampling", cond: dict | None = None, guidance: float = 1.0):
        """n samples with the chosen sampler and weights, with a progress bar
        -> x_0 (n, C, H, W) and about 10 frames of the reverse chain. A text model without cond
        draws unconditionally (the empty caption); a super-resolution model needs cond."""
        a = self.args
        if self.vocab and cond is None:
            cond = {"tokens": self.vocab.empty(n, self.device)}
        c, s = self.model_config["img_channels"], self.diffusion_config["img_size"]
        model = self.model if a.raw_weights else self.ema
        model.eval()
        steps = a.sample_steps or DEFAULT_STEPS[a.sampler]
        x_T = torch.randn(n, c, s, s, device=self.device)
        with self.progress() as progress, self.autocast():
            track = lambda ts: progress.track(ts, description=f"{desc} ({a.sampler})")
            x0, frames = self.diffusion.sample(x_T, a.sampler, steps, a.eta, model, 10, a.clip_x0,
                                               track, cond, guidance)
        model.train()
        return x0, frames

    def save_reverse_strip(self, frames: list[Tensor], name: str, rows: int = 8) -> None:
        """Rows = samples, columns = x_T, ..., x_0 of the reverse chain."""
        strip = torch.stack([f[:rows].float() for f in frames], dim=1)  # (rows, cols, C, H, W)
        self.save_grid(strip.flatten(0, 1), name, nrow=len(frames))

    def save_forward_strip(self, images: Tensor, name: str = "forward-steps.png") -> None:
        """Rows = real images, columns = x_t at t = 0, T/10 - 1, ..., T - 1 (same eps per row)."""
        T = self.diffusion.T
        ts = sorted({0, *(k * T // 10 - 1 for k in range(1, 11))} - {-1})
        x0 = images.to(self.device)  # (R, C, H, W) in [-1, 1]
        eps = torch.randn_like(x0)
        cols = [self.diffusion.q_sample(x0, torch.full((len(x0),), t, device=self.device), eps)
                for t in ts]
        self.save_grid(torch.stack(cols, dim=1).flatten(0, 1), name, nrow=len(ts))

    def evaluate(self, n: int) -> dict:
        """FID and KID of n samples against the --data-folders, and nearest.png of 8 samples."""
        a, c, s = self.args, self.model_config["img_channels"], self.diffusion_config["img_size"]
        net = evaluate.InceptionFeatures(self.device)
        ref, ref_paths = evaluate.reference_features(a.data_folders, s, c, net, a.cache_dir,
                                                     self.console)
        samples = torch.cat([to_uint8(self.draw(min(a.batch_size, n - i), f"{i}/{n} samples")[0])
                             .cpu() for i in range(0, n, a.batch_size)])
        feats = evaluate.extract(samples, net, a.batch_size, progress="sample features")
        result = evaluate.score(feats, ref)
        copy = evaluate.nearest_report(os.path.join(a.save_dir, "nearest.png"), samples[:8],
                                       feats, ref, ref_paths, s, c)
        steps = "all T" if a.sampler == "ddpm" else a.sample_steps or DEFAULT_STEPS[a.sampler]
        self.console.print(
            f"FID {result['fid']:.2f}, KID {result['kid'] * 1e3:.2f} ± "
            f"{result['kid_std'] * 1e3:.2f} (x 1e-3): {n} samples ({a.sampler}, {steps} steps, "
            f"eta {a.eta}, {'raw' if a.raw_weights else 'EMA'} weights) vs {len(ref)} training "
            f"images; {copy['share']:.0%} of the samples are closer to a training image than "
            f"the median training image is to its nearest neighbour ({copy['train_median']:.2f})")
        return result

    @torch.inference_mode()
    def likelihood(self, n: int) -> dict:
        """Bits/dim of the variational bound on the first n training images, batch by batch."""
        a = self.args
        x = to_model(self.load_data().images[:n])
        model = self.model if a.raw_weights else self.ema
        model.eval()
        sums = {}
        with self.progress() as progress:
            for i in range(0, len(x), a.batch_size):
                desc = f"bound of images {i}..{min(i + a.batch_size, len(x)) - 1}"
                track = lambda ts: progress.track(ts, total=self.diffusion.T, description=desc)
                batch = x[i:i + a.batch_size]
                cond = {"tokens": self.vocab.empty(len(batch), self.device)} if self.vocab else None
                for k, v in self.diffusion.bits_per_dim(batch, model, track, cond).items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch)
        r = {k: v / len(x) for k, v in sums.items()}
        self.console.print(f"bits/dim {r['total']:.3f} on {len(x)} training images "
                           f"({'raw' if a.raw_weights else 'EMA'} weights): prior L_T "
                           f"{r['prior']:.2e}, KL terms {r['kl_terms']:.3f}, decoder L_0 "
                           f"{r['decoder']:.3f}")
        return r

    # -- the two commands ----------------------------------------------------------------------

    def load_data(self) -> ImageDataset:
        """The training images, and with --captions their caption tokens (a new run builds the
        vocabulary from the captions; a resumed one keeps the checkpoint's)."""
        a, t0, tokens = self.args, time.time(), None
        if a.demo:
            images = demo_faces(a.demo_images, a.img_size, a.img_channels, seed=0)
        else:
            images, paths = load_folders(a.data_folders, a.img_size, a.img_channels,
                                         warn=self.console.print, cache_dir=a.cache_dir,
                                         keep_small=a.keep_small, with_paths=True)
        if a.captions != "off" and not a.demo:
            captions = read_captions(paths, a.data_folders, a.captions)
            have = sum(map(bool, captions))
            if not have:
                raise UserError(f"--captions {a.captions}: none of the {len(paths)} images has a "
                                f"caption ({'a .txt beside it or a captions.csv row' if a.captions == 'files' else 'no sub-folders'})")
            self.vocab = self.vocab or Vocab.build([c for c in captions if c])
            tokens = self.vocab.encode_all(captions)  # (N, L); words the vocabulary lacks: dropped
            self.console.print(f"captions: {have} of {len(images)} images have one "
                               f"({a.captions}); vocabulary of {len(self.vocab) - 2} words, up to "
                               f"{self.vocab.max_len} per caption")
        self.console.print(f"training set: {len(images)} images of {tuple(images.shape[1:])}, "
                           f"ready in {time.time() - t0:.1f}s")
        return ImageDataset(images, self.device, tokens)

    def train_cond(self, x0: Tensor, tokens: Tensor | None, n: int, share: slice) -> dict:
        """A training batch's conditioning: captions, each replaced by the empty caption with
        probability --cond-drop; or the low-res image, noise-augmented with std a ~ U(0,
        --sr-noise-max) and a given to the model (Ho et al. 2022, Cascaded Diffusion, Sec. 4.1).
        Random draws are for the global batch n, this process's share taken, as for t and eps."""
        a = self.args
        if self.vocab:
            return {"tokens": drop_captions(tokens, a.cond_drop,
                                            torch.rand(n, device=self.device)[share])}
        if a.super_res:
            aug = torch.rand(n, device=self.device)[share] * a.sr_noise_max  # (B,)
            z = torch.randn(n, *x0.shape[1:], device=self.device)[share]
            return {"lowres": make_lowres(x0, a.super_res) + aug[:, None, None, None] * z, "aug": aug}
        return {}

    def train_step(self, x0: Tensor, tokens: Tensor | None = None) -> Tensor | None:
        """One step of Algorithm 1: loss -> backward -> clip -> Adam -> EMA. x0: (B, C, H, W),
        tokens: its captions (B, L) for a text model.
        A non-finite loss skips the step (returns None); MAX_BAD_STEPS in a row stop the run."""
        # t and eps for the whole global batch, this process's share taken as the data is, so
        # N processes draw exactly what one process with the same global batch would.
        n, share = len(x0) * self.world, slice(self.rank, None, self.world)
        if self.importance:
            t_all, w_all = self.importance.sample(n, self.device)
            t, w = t_all[share], w_all[share]
        else:
            t, w = torch.randint(0, self.diffusion.T, (n,), device=self.device)[share], 1.0
        eps = torch.randn(n, *x0.shape[1:], device=self.device)[share]
        cond = self.train_cond(x0, tokens, n, share)
        with self.autocast():
            per_image = self.diffusion.losses(x0, t, eps, cond)
            loss = (per_image * w).mean()
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:  # every process skips together
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:  # a host-device sync, but a NaN must never reach the weights
            self.bad_steps += 1
            self.console.print(f"warning: non-finite loss at step {self.step + 1}, step skipped")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise NonFiniteLoss()
            return None
        self.bad_steps = 0
        if self.importance:  # every process learns from the whole global batch's losses
            self.importance.update(t_all, self.gather_global(per_image.detach().float()))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        update_ema(self.ema, self.model, ema_decay(self.step, self.args.ema_decay))
        return loss.detach()

    def gather_global(self, x: Tensor) -> Tensor:
        """This process's share x (n / world,) of a global batch -> the global batch (n,) on the
        CPU, in global order (process r holds positions r, r + world, ...)."""
        if self.world == 1:
            return x.cpu()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.stack(parts, 1).flatten().cpu()

    def end_epoch(self, e: int, loss: float, seen: int, secs: float) -> None:
        """Checkpoint, metrics.jsonl + loss.png, FID every --eval-every epochs, one line."""
        a = self.args
        self.epoch = e + 1
        path = self.save_checkpoint(e)
        if not self.main:
            return
        record = {"epoch": e, "step": self.step, "loss": loss, "lr": a.lr,
                  "img_per_s": seen / secs, "seconds": secs}
        if a.eval_every and (e + 1) % a.eval_every == 0:
            with self.side_rng():
                record.update(self.evaluate(a.eval_samples))
            if record["fid"] < self.best_fid:
                self.best_fid = record["fid"]
                self.save_checkpoint(e, "best.pth")
        records = evaluate.append_metrics(os.path.join(a.save_dir, "metrics.jsonl"), record)
        evaluate.plot_curves(records, os.path.join(a.save_dir, "loss.png"))
        self.console.print(f"epoch {e}: mean loss {loss:.4f}, {secs:.1f}s, "
                           f"{seen / secs:.0f} img/s, {'saved ' + path if path else 'NOT saved'}")

    def train(self) -> None:
        a, data = self.args, self.data
        if self.main:
            with self.side_rng():
                self.save_forward_strip(to_model(data.images[:4]))
                self.save_reverse_strip(self.draw(8, "run-before strip", self.strip_cond(8))[1],
                                        "run-before.png")
        try:
            with self.progress("info") as progress:
                epochs = progress.add_task("epochs", total=a.epochs, info="")
                for e in range(self.epoch, self.epoch + a.epochs):
                    n = data.num_batches(a.batch_size, self.world)
                    batches = progress.add_task(f"epoch {e}", total=n, info="")
                    t0, seen, loss_sum = time.time(), 0, torch.zeros((), device=self.device)
                    batches_of = (data.batches_with_tokens if a.data_path == "device"
                                  else data.plain_batches)
                    for i, (x0, tokens) in enumerate(batches_of(a.batch_size, self.data_gen,
                                                                self.rank, self.world)):
                        loss = self.train_step(x0, tokens)
                        if loss is None:
                            n -= 1
                            continue
                        seen, loss_sum = seen + len(x0) * self.world, loss_sum + loss
                        if i % 10 == 0:  # the only host-device sync: to show the figures
                            info = f"loss {loss.item():.4f}  {seen / (time.time() - t0):.0f} img/s"
                            progress.update(batches, info=info)
                            progress.update(epochs, info=info)
                        progress.advance(batches)
                    progress.remove_task(batches)
                    self.end_epoch(e, loss_sum.item() / max(n, 1), seen, time.time() - t0)
                    progress.advance(epochs)
        except KeyboardInterrupt:
            path = self.save_checkpoint(self.epoch)  # the epoch in progress restarts on resume
            self.console.print(f"interrupted: saved {path} (epoch {self.epoch}, step {self.step})")
        except NonFiniteLoss:
            path = self.save_checkpoint(self.epoch)
            self.console.print(
                f"stopped: the loss was not finite {MAX_BAD_STEPS} steps in a row; the last good "
                f"weights are in {path} (step {self.step}). Lower --lr (now {a.lr}) or "
                f"--grad-clip, or look for broken images in the data, then resume with --loadckpt")
            sys.exit(1)
        if self.main:
            with self.side_rng():
                self.save_reverse_strip(self.draw(8, "run-after strip", self.strip_cond(8))[1],
                                        "run-after.png")
        self.console.print(f"pictures in {a.save_dir}/: forward-steps.png, run-before.png, "
                           f"run-after.png, loss.png; metrics.jsonl")

    def sample(self) -> None:
        a = self.args
        sr = self.sr_program() if a.sr_ckpt else None  # checked before any sampling
        x0, frames = self.draw(a.batch_size)
        for i, img in enumerate(x0):
            self.save_grid(img[None], f"ddpm-{i}.png", nrow=1)
        self.save_grid(x0, "ddpm-all.png", nrow=math.ceil(math.sqrt(len(x0))))
        self.save_reverse_strip(frames, "reverse-steps.png")
        self.console.print(f"wrote {len(x0)} samples to {a.save_dir}/ddpm-*.png, "
                           f"ddpm-all.png and reverse-steps.png")
        if sr:
            sr.save_sr(x0, sr.super_resolve(x0), [str(i) for i in range(len(x0))])

    def sample_prompts(self) -> None:
        """--batch-size samples per prompt and guidance scale: a grid each, and prompts.png with
        8 of each (a row per prompt and scale)."""
        a, n, rows = self.args, self.args.batch_size, []
        ids = [self.vocab.encode(p) for p in a.prompt]  # unknown words: one line, before any work
        sr = self.sr_program() if a.sr_ckpt else None
        for prompt, tokens in zip(a.prompt, ids):
            for w in a.guidance_scale:
                cond = {"tokens": torch.tensor([tokens] * n, device=self.device)}
                x0, _ = self.draw(n, f"{prompt!r}, w = {w:g}", cond, w)
                slug = "-".join(words(prompt))[:60] or "empty"
                self.save_grid(x0, f"prompt-{slug}-w{w:g}.png", nrow=math.ceil(math.sqrt(n)))
                rows.append(x0[:8])
        self.save_grid(torch.cat(rows), "prompts.png", nrow=min(n, 8))
        if sr:  # the cascade: prompts.png, super-resolved
            sr.save_grid(sr.super_resolve(torch.cat(rows)), "prompts-sr.png", nrow=min(n, 8))
        self.console.print(f"wrote {len(rows)} grids ({len(a.prompt)} prompts x "
                           f"{len(a.guidance_scale)} guidance scales) to {a.save_dir}/prompt-*.png "
                           f"and prompts.png (a row per prompt and scale, in that order)"
                           + (", and prompts-sr.png" if sr else ""))

    # -- super-resolution ----------------------------------------------------------------------

    def sr_cond(self, up: Tensor) -> dict:
        """The SR model's input at sampling: the upsampled low-res image up (B, C, H, W) with
        noise of std --sr-noise, and that level."""
        a = self.args.sr_noise
        return {"lowres": up + a * torch.randn_like(up),
                "aug": torch.full((len(up),), a, device=up.device)}

    def strip_cond(self, n: int) -> dict | None:
        """The conditioning of the training-time strips: for SR, the first n training images."""
        if not self.args.super_res:
            return None
        return self.sr_cond(make_lowres(to_model(self.data.images[:n]), self.args.super_res))

    def super_resolve(self, low: Tensor) -> Tensor:
        """low (N, C, LOW, LOW) in [-1, 1] -> (N, C, H, W) samples of the SR model, in batches."""
        a, size, out = self.args, self.diffusion_config["img_size"], []
        for i in range(0, len(low), a.batch_size):
            up = upsample(low[i:i + a.batch_size].to(self.device), size)
            out.append(self.draw(len(up), f"super-resolving {i}..{i + len(up) - 1} of "
                                          f"{len(low)}", self.sr_cond(up))[0])
        return torch.cat(out)

    def save_sr(self, low: Tensor, high: Tensor, names: list[str]) -> None:
        """sr-<name>.png for each result, and sr-all.png: pairs (bicubic | ours), 4 pairs a row."""
        for img, name in zip(high, names):
            self.save_grid(img[None], f"sr-{name}.png", nrow=1)
        pairs = torch.stack([upsample(low[:32].to(high.device), high.shape[-1]), high[:32]], 1)
        self.save_grid(pairs.flatten(0, 1), "sr-all.png", nrow=8)
        self.console.print(f"wrote {len(high)} super-resolved images ({low.shape[-1]} -> "
                           f"{high.shape[-1]} px) to {self.args.save_dir}/sr-*.png and sr-all.png "
                           f"(pairs: bicubic | ours)")

    def sample_lowres_folder(self) -> None:
        a = self.args
        images, paths = load_folders([a.lowres_folder], a.super_res, a.img_channels,
                                     warn=self.console.print, keep_small=True, with_paths=True)
        low = to_model(images)
        self.save_sr(low, self.super_resolve(low),
                     [os.path.splitext(os.path.basename(p))[0] for p in paths])

    def sr_program(self) -> "Program":
        """The cascade's second stage: a Program around the --sr-ckpt model, checked to fit."""
        a, size, c = self.args, self.diffusion_config["img_size"], self.model_config["img_channels"]
        low = self.read_checkpoint(a.sr_ckpt).get("cond_config", {}).get("super_res", 0)
        if not low:
            raise UserError(f"--sr-ckpt {a.sr_ckpt} is not a super-resolution model (it draws "
                            f"from noise); train one with --super-res LOW")
        # Every stored flag comes from the SR checkpoint (nothing typed); the sampler flags are
        # shared. Its input is our samples, which check_model_kind sees as a low-res folder.
        sr = Program(argparse.Namespace(**{**vars(a), "loadckpt": a.sr_ckpt, "sr_ckpt": None,
                                           "lowres_folder": "(cascade)", "prompt": None}), set())
        if (low, sr.args.img_channels) != (size, c):
            raise UserError(f"--sr-ckpt {a.sr_ckpt} upsamples {low} px, {sr.args.img_channels}-"
                            f"channel images, but this base model draws {size} px, {c}-channel ones")
        return sr

    def evaluate_sr(self, n: int) -> dict:
        """On the first n images of --data-folders (held back from training): PSNR / SSIM and FID
        against the real images of our super-resolution and of bicubic upsampling, and
        sr-compare.png (rows: low-res, bicubic, ours, real)."""
        a, size, c = self.args, self.diffusion_config["img_size"], self.model_config["img_channels"]
        real = load_folders(a.data_folders, size, c, warn=self.console.print,
                            cache_dir=a.cache_dir)[:n]  # (n, C, H, W) uint8
        low = downsample(to_model(real), a.super_res)  # as training made its inputs
        out = {"bicubic": to_uint8(upsample(low, size)), "ours": to_uint8(self.super_resolve(low)).cpu()}
        net = evaluate.InceptionFeatures(self.device)
        ref = evaluate.extract(real, net, a.batch_size, progress="real image features")
        rows = {}
        for name, images in out.items():
            psnr, ssim = evaluate.psnr_ssim(images, real)
            feats = evaluate.extract(images, net, a.batch_size, progress=f"{name} features")
            rows[name] = {"psnr": psnr, "ssim": ssim, **evaluate.score(feats, ref)}
            self.console.print(f"{name:8s} {a.super_res} -> {size} px on {len(real)} held-back "
                               f"images: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}, FID {rows[name]['fid']:.2f}"
                               f", KID {rows[name]['kid'] * 1e3:.2f} x 1e-3")
        shown = [F.interpolate(low[:8], size=(size, size), mode="nearest"),
                 to_model(out["bicubic"][:8]), to_model(out["ours"][:8]), to_model(real[:8])]
        self.save_grid(torch.cat(shown), "sr-compare.png", nrow=len(shown[0]))
        self.console.print(f"wrote {a.save_dir}/sr-compare.png (rows: {a.super_res} px input, "
                           f"bicubic, ours, real)")
        return rows

    def evaluate_prompts(self, folder: str) -> list[dict]:
        """Does the model draw what it is asked? Fit a hair / eye colour classifier on the
        captioned images in `folder` (held out from training), then per --guidance-scale draw
        --eval-samples images prompted "<h> hair, <e> eyes" over every colour pair and report how
        often the classifier sees the prompted colours, and FID against `folder`."""
        a, size, c = self.args, self.diffusion_config["img_size"], self.model_config["img_channels"]
        images, paths = load_folders([folder], size, c, warn=self.console.print,
                                     cache_dir=a.cache_dir, with_paths=True)
        clf, info = evaluate.fit_tag_classifier(images, read_captions(paths, [folder], "files"),
                                                device=self.device, progress="colour classifier")
        hair, eyes = ([k for k in clf.classes[attr] if k in self.vocab.stoi] for attr in ("hair", "eyes"))
        self.console.print(f"colour classifier on {info['n_train']} held-out images: validation "
                           f"accuracy hair {info['val_acc']['hair']:.1%}, eyes "
                           f"{info['val_acc']['eyes']:.1%} on {info['n_val']} (chance for uniform "
                           f"prompts: {1 / len(hair):.1%} / {1 / len(eyes):.1%})")
        n = a.eval_samples
        want = [(hair[i % len(hair)], eyes[(i // len(hair)) % len(eyes)]) for i in range(n)]
        tokens = self.vocab.encode_all([f"{h} hair, {e} eyes" for h, e in want])  # (n, L)
        net = evaluate.InceptionFeatures(self.device)
        ref, _ = evaluate.reference_features([folder], size, c, net, a.cache_dir, self.console)
        rows = []
        for w in a.guidance_scale:
            samples = torch.cat([to_uint8(self.draw(
                len(tokens[i:i + a.batch_size]), f"w = {w:g}: {i}/{n}",
                {"tokens": tokens[i:i + a.batch_size].to(self.device)}, w)[0]).cpu()
                for i in range(0, n, a.batch_size)])
            seen = evaluate.classify(clf, samples)
            row = {"guidance": w, "n": n,
                   "hair_acc": float(np.mean([s == h for s, (h, _) in zip(seen["hair"], want)])),
                   "eyes_acc": float(np.mean([s == e for s, (_, e) in zip(seen["eyes"], want)])),
                   **evaluate.score(evaluate.extract(samples, net, a.batch_size), ref)}
            rows.append(row)
            self.save_grid(to_model(samples[:8 * len(hair)]), f"prompt-eval-w{w:g}.png",
                           nrow=len(hair))
            self.console.print(f"w = {w:g}: prompted hair colour drawn {row['hair_acc']:.1%}, eye "
                               f"colour {row['eyes_acc']:.1%} of {n} samples; FID {row['fid']:.2f} "
                               f"vs {len(ref)} held-out images")
        return rows

    def run(self) -> None:
        if self.args.train:
            self.train()
        elif self.args.lowres_folder:
            self.sample_lowres_folder()
        elif self.args.eval_sr:
            self.evaluate_sr(self.args.eval_sr)
        elif self.args.eval_prompts:
            self.evaluate_prompts(self.args.eval_prompts)
        elif self.args.prompt:
            self.sample_prompts()
        elif self.args.eval_fid:
            self.evaluate(self.args.eval_fid)
        elif self.args.eval_bpd:
            self.likelihood(self.args.eval_bpd)
        else:
            self.sample()
        if self.world > 1:
            dist.destroy_process_group()


def list_or(v):
    """Tuples and lists compare equal as lists (checkpoint configs store lists)."""
    return list(v) if isinstance(v, (list, tuple)) else v


def main(argv: list[str] | None = None) -> int:
    args, typed = parse_args(argv)
    try:
        check_args(args)
        Program(args, typed).run()
    except (UserError, DataError, CaptionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
