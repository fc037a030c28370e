"""The diffusion maths of ddpm.py, to be read against the papers: noise schedules, the forward
process q, the reverse process p_theta and its losses, the variational bound, classifier-free
guidance and four samplers (ancestral DDPM, DDIM, DPM-Solver++(2M), EDM's Heun). Ho et al. 2020
throughout.
"""
# Notation (Ho et al. 2020). Paper steps t = 1..T are Python indices t = 0..T-1 (paper t = index + 1):
#   betas[t]        beta_t, the variance the forward process adds at step t; alpha_t = 1 - beta_t
#   alpha_bars[t]   alpha_bar_t = prod_{s <= t} alpha_s; x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (Eq. 4)
#   posterior_var   beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t, the variance of q(x_{t-1} | x_t, x_0)
#                   (Eq. 7); 0 at index 0, where x_{t-1} is the data itself
#   sigma_t         the reverse process's noise: sqrt(beta~_t), or learned (Nichol & Dhariwal 2021)
#   eps, v, x0      the network predicts eps, v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho),
#                   or x_0 itself
#   var_out         the learned-variance half of the network's output, in [-1, 1] (their "v")
#   Algorithm 1     training: losses();  Algorithm 2: ancestral sampling, p_sample()
# Images are float (B, C, H, W) in [-1, 1] here; data.to_model / data.to_uint8 convert.
import math

import torch
import torch.nn as nn
from torch import Tensor

from core.tokens import empty_like  # the empty caption's token ids (classifier-free guidance)


# ----------------------------------------------------------------------------------------------
# Schedules and small formulas


def linear_betas(T: int, beta_1: float, beta_T: float) -> Tensor:
    """beta_t for t = 1..T, evenly spaced from beta_1 to beta_T (Ho et al. 2020, Sec. 4). (T,) f64."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_f(T: int, s: float = 0.008) -> Tensor:
    """f(t) = cos^2((t / T + s) / (1 + s) * pi / 2) for t = 0..T (Nichol & Dhariwal 2021, Eq. 17).
    (T + 1,) f64."""
    return torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(T: int, max_beta: float = 0.999) -> Tensor:
    """beta_t = min(1 - alpha_bar_t / alpha_bar_{t-1}, max_beta) with alpha_bar_t = f(t) / f(0)
    (Nichol & Dhariwal 2021, Eq. 17). (T,) f64."""
    f = cosine_f(T)
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


def shifted_cosine_betas(T: int, shift: float, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule with its log-SNR moved by `shift`: logit(ab'_t) = logit(ab_t) + shift,
    i.e. SNR'_t = e^shift SNR_t, ab_t = f(t) / f(0) as in cosine_betas. Hoogeboom et al. 2023
    (simple diffusion, Sec. 3.1) shift by 2 log(64 / d) for d-pixel images, the cosine schedule
    being made for 64 px: less noise for smaller images, more for larger. (T,) f64."""
    f = cosine_f(T)
    ab = torch.sigmoid(torch.logit(f / f[0]) + shift)  # (T + 1,); ab[0] = 1 stays 1
    return (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def resolution_shift(side: int, reference: int = 64) -> float:
    """The log-SNR shift of the cosine schedule for side-pixel images: 2 log(reference / side)
    (Hoogeboom et al. 2023, Eq. 4 with their reference of 64 px)."""
    return 2.0 * math.log(reference / side)


def log_sigma(alpha_bars: Tensor) -> Tensor:
    """ln sigma_t, sigma_t = sqrt((1 - ab_t) / ab_t): the noise-to-signal ratio in the data's units
    (EDM's sigma, Karras et al. 2022). Same shape as alpha_bars; increasing in t."""
    return 0.5 * (torch.log1p(-alpha_bars) - torch.log(alpha_bars))


def lognormal_t_probs(alpha_bars: Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """EDM's training noise levels on our T steps (Karras et al. 2022, Table 1: ln sigma ~
    N(p_mean, p_std^2), sigma = sqrt((1 - ab) / ab) in the data's units): step t gets the
    probability of the ln sigma values nearer to its own than to its neighbours', i.e. of the
    interval between the midpoints of ln sigma (the ends reaching to -inf and +inf). (T,) f64,
    summing to 1."""
    ln_sigma = log_sigma(alpha_bars)  # (T,), increasing
    edges = (ln_sigma[1:] + ln_sigma[:-1]) / 2  # (T - 1,)
    cdf = torch.special.ndtr((edges - p_mean) / p_std)
    cdf = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])  # (T + 1,)
    return cdf[1:] - cdf[:-1]


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


def karras_timesteps(alpha_bars: Tensor, n: int, rho: float = 7.0) -> list[int]:
    """n indices from T-1 down to 0 spaced evenly in sigma^(1/rho), where sigma_t =
    sqrt((1 - ab_t) / ab_t) is the noise-to-signal ratio (Karras et al. 2022, Eq. 5):

    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    each taken to the timestep of nearest log sigma (so the solvers keep the trained t's);
    steps crowd towards low noise. Fewer than n where two sigma_i round to one t."""
    return karras_between(alpha_bars, len(alpha_bars) - 1, -1, n, rho)


def karras_between(alpha_bars: Tensor, t: int, s: int, n: int, rho: float = 7.0) -> list[int]:
    """n indices from t down, spaced evenly in sigma^(1/rho) as karras_timesteps, towards s:
    s = -1 is the clean end, and the last index is 0 (sigma_min); else the last is short of s,
    where the step after it lands (sigma_i at i / n of the way from sigma_t to sigma_s).
    Fewer than n where two sigma_i round to one t."""
    ln_sigma = log_sigma(alpha_bars)  # (T,), increasing
    if n == 1:
        return [t]
    lo = ln_sigma[max(s, 0)].exp() ** (1 / rho)
    hi = ln_sigma[t].exp() ** (1 / rho)
    u = torch.arange(n, dtype=torch.float64) / (n - 1 if s < 0 else n)  # (n,) in [0, 1]
    sigmas = (hi + u * (lo - hi)) ** rho  # (n,)
    ts = (sigmas.log()[:, None] - ln_sigma[None]).abs().argmin(1).tolist()
    return sorted(set(ts), reverse=True)


# ----------------------------------------------------------------------------------------------
# Sampler steps: x_t -> x_s (s < t) from the network's eps and x0 at x_t


def ddim_step(eps_hat: Tensor, x0: Tensor, ab_t: float, ab_s: float, eta: float,
              noise: Tensor) -> Tensor:
    """x_t -> x_s, s < t (Song et al. 2021, Eq. 12), from the predicted eps_hat and x0:

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s); ab_s = 1 is the clean end.
    """
    sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    return math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps_hat + sigma * noise


def heun_step(xt: Tensor, eps_t: Tensor, eps_s: Tensor, ab_t: float, ab_s: float) -> Tensor:
    """The 2nd-order (Heun) step x_t -> x_s of EDM's deterministic sampler (Karras et al. 2022,
    Algorithm 1, lines 5-8) on our schedule. In x^ = x / sqrt(ab) and sigma = sqrt((1 - ab) / ab)
    the probability-flow ODE is dx^/dsigma = eps, so with the slopes eps at both ends:

    x^_s = x^_t + (sigma_s - sigma_t) (eps_t + eps_s) / 2,  x_s = sqrt(ab_s) x^_s.
    (One slope alone, the Euler step, is DDIM with eta = 0.)"""
    sigma = lambda ab: math.sqrt((1 - ab) / ab)
    x_hat = xt / math.sqrt(ab_t) + (sigma(ab_s) - sigma(ab_t)) * 0.5 * (eps_t + eps_s)
    return math.sqrt(ab_s) * x_hat


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


# ----------------------------------------------------------------------------------------------
# Importance sampling of t


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


# ----------------------------------------------------------------------------------------------
# The forward and reverse processes


SCHEDULES = ("linear", "cosine", "cosine-shifted")


class GaussianDiffusion(nn.Module):
    """The DDPM forward process q and the learned reverse process p_theta of a network that
    predicts eps (Ho et al. 2020), v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022) or x0.
    It holds the schedule, not the network: the losses and samplers are given the network `net`
    (the model being trained, its DDP or compiled wrapper, or the EMA copy) as their first
    argument, as improved-diffusion's training_losses(model, x_start, t)."""

    def __init__(self, timesteps: int = 1000, beta_min: float = 1e-4,
                 beta_max: float = 0.02, *, prediction: str, schedule: str = "linear",
                 min_snr_gamma: float = 0.0, learn_sigma: bool = False, image_side: int = 64):
        """schedule: linear (beta_min .. beta_max), cosine, or cosine-shifted for image_side-pixel
        images (the longer side)."""
        super().__init__()
        assert 0 < beta_min < beta_max < 1, "need 0 < beta_min < beta_max < 1"
        assert schedule in SCHEDULES and prediction in ("eps", "v", "x0")
        self.T = timesteps
        self.prediction, self.min_snr_gamma, self.learn_sigma = prediction, min_snr_gamma, learn_sigma
        betas = (linear_betas(timesteps, beta_min, beta_max) if schedule == "linear"
                 else cosine_betas(timesteps) if schedule == "cosine"
                 else shifted_cosine_betas(timesteps, resolution_shift(image_side)))  # (T,) f64
        alpha_bars = torch.cumprod(1.0 - betas, dim=0)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        self.ab64 = alpha_bars  # float64 on the CPU: samplers read step coefficients from it
        posterior_var = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)  # beta~_t, Eq. 7
        # Coefficients are formed in float64 (1 - alpha_bar_t is ~1e-4 at t = 1) and stored float32.
        for name, value in [
                ("betas", betas), ("alpha_bars", alpha_bars), ("posterior_var", posterior_var),
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
        """The network output (eps, v or x0) at x_t -> (eps, x0_hat), both (B, C, H, W) float32.

        eps: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab);  v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v,
        eps = sqrt(1 - ab) x_t + sqrt(ab) v;  x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab).
        """
        sqrt_ab, sqrt_1m_ab = gather(self.sqrt_alpha_bars, t), gather(self.sqrt_one_minus_alpha_bars, t)
        out = out.float()
        if self.prediction == "eps":
            return out, (xt - sqrt_1m_ab * out) / sqrt_ab
        if self.prediction == "x0":
            return (xt - sqrt_ab * out) / sqrt_1m_ab, out
        return sqrt_1m_ab * xt + sqrt_ab * out, sqrt_ab * xt - sqrt_1m_ab * out

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """Network output -> (the eps, v or x0 prediction (B, C, H, W), var_out or None)."""
        if not self.learn_sigma:
            return out.float(), None
        pred, var_out = out.float().chunk(2, dim=1)
        return pred, var_out

    def model_logvar(self, t: Tensor, var_out: Tensor) -> Tensor:
        """Learned log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (var_out + 1) / 2
        (Nichol & Dhariwal 2021, Eq. 15). var_out: (B, C, H, W)."""
        frac = (var_out + 1) / 2
        return frac * gather(self.log_betas, t) + (1 - frac) * gather(self.posterior_logvar, t)

    def p_sample(self, xt: Tensor, t: Tensor, eps_hat: Tensor, noise: Tensor | None = None,
                 logvar: Tensor | None = None) -> Tensor:
        """One ancestral step x_t -> x_{t-1} given the predicted noise eps_hat (Algorithm 2, line 4):

        x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) + sigma_t z,
        with sigma_t^2 = beta~_t (the posterior variance, Sec. 3.2), which is 0 at t = 1 (index 0),
        or the learned exp(logvar) (no noise at index 0 either).
        """
        if noise is None:
            noise = torch.randn_like(xt)
        mean = gather(self.recip_sqrt_alphas, t) * (xt - gather(self.eps_coef, t) * eps_hat.float())
        if logvar is None:
            return mean + gather(self.posterior_std, t) * noise
        return mean + (t > 0).float()[:, None, None, None] * (0.5 * logvar).exp() * noise

    # -- losses and the bound ------------------------------------------------------------------

    def forward(self, net: nn.Module, x0: Tensor, t: Tensor | None = None,
                eps: Tensor | None = None, cond: dict | None = None) -> Tensor:
        """Algorithm 1's loss, averaged over the batch (see losses)."""
        return self.losses(net, x0, t, eps, cond).mean()

    def losses(self, net: nn.Module, x0: Tensor, t: Tensor | None = None,
               eps: Tensor | None = None, cond: dict | None = None) -> Tensor:
        """Per image: ||target - net(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t)||^2 -> (B,), t uniform
        (B,) and eps ~ N(0, I) unless given; target eps, v or x0, weighted by min(SNR, gamma) / SNR
        (/ (SNR + 1) for v, / 1 for x0) if gamma > 0 (min-SNR-gamma, Hang et al. 2023).
        cond: the network's conditioning inputs (tokens=..., or lowres=..., noise_level=...)."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)  # (B,)
        if eps is None:
            eps = torch.randn_like(x0)
        xt = self.q_sample(x0, t, eps)
        out, var_out = self.split(net(xt, t, **(cond or {})))
        target = (eps if self.prediction == "eps" else x0 if self.prediction == "x0"
                  else self.v_target(x0, t, eps))
        mse = (out - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if self.min_snr_gamma > 0:
            snr = self.alpha_bars[t] / (1 - self.alpha_bars[t])
            mse = mse * snr.clamp(max=self.min_snr_gamma) / {"eps": snr, "v": snr + 1, "x0": 1}[
                self.prediction]
        if var_out is not None:  # hybrid loss: + lambda L_vlb, lambda = 1e-3, the mean frozen (Sec. 3.1)
            eps_hat, _ = self.eps_and_x0(xt, t, out.detach())
            mse = mse + self.vb_terms(x0, xt, t, eps_hat, var_out, eps) * self.T * 1e-3
        return mse

    def vb_terms(self, x0: Tensor, xt: Tensor, t: Tensor, eps_hat: Tensor,
                 var_out: Tensor | None, eps: Tensor) -> Tensor:
        """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for index t > 0, and the decoder
        L_0 = -log p(x0 | x_1) (discretised Gaussian) at index 0, in bits/dim -> (B,).
        eps_hat: the network's noise; eps: the true noise that made x_t from x0."""
        zeros = torch.zeros_like(xt)
        mean = self.p_sample(xt, t, eps_hat, noise=zeros)  # mu_theta(x_t, t)
        true_mean = self.p_sample(xt, t, eps, noise=zeros)  # mu~(x_t, x0), Eq. 7
        true_lv = gather(self.posterior_logvar, t).expand_as(xt)
        lv = true_lv if var_out is None else self.model_logvar(t, var_out)
        nats = torch.where((t == 0)[:, None, None, None],
                           -discretized_gaussian_log_likelihood(x0, mean, 0.5 * lv),
                           normal_kl(true_mean, true_lv, mean, lv))
        return nats.flatten(1).mean(1) / math.log(2.0)

    @torch.no_grad()
    def bits_per_dim(self, net: nn.Module, x0: Tensor, track=iter,
                     cond: dict | None = None) -> dict:
        """The variational bound -log p(x0) <= L_T + sum_{t>1} L_{t-1} + L_0 (Ho et al. 2020, Eq. 5)
        with sigma_t^2 = beta~_t or the learned variance, in bits per dimension, per term.

        L_T = KL(q(x_T|x0) || N(0, I)); L_{t-1} = KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t));
        L_0 = -log p(x0|x1), a discretised Gaussian. x0: (B, C, H, W) on the 256-level grid.
        """
        nats_per_bit = math.log(2.0) * x0[0].numel()  # nats of a whole image -> bits/dim
        ab_T = self.alpha_bars[-1]
        prior = normal_kl(ab_T.sqrt() * x0, (1 - ab_T).log(), torch.zeros_like(x0),
                          torch.zeros_like(x0)).flatten(1).sum(1) / nats_per_bit  # (B,)
        terms = torch.zeros(len(x0), self.T, device=x0.device)  # (B, T) bits/dim
        for t in track(range(self.T - 1, -1, -1)):
            tt = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
            eps = torch.randn_like(x0)
            xt = self.q_sample(x0, tt, eps)
            out, var_out = self.split(net(xt, tt, **(cond or {})))
            eps_hat, _ = self.eps_and_x0(xt, tt, out)
            terms[:, t] = self.vb_terms(x0, xt, tt, eps_hat, var_out, eps)
        return {"total": (prior + terms.sum(1)).mean().item(), "prior": prior.mean().item(),
                "decoder": terms[:, 0].mean().item(), "kl_terms": terms[:, 1:].sum(1).mean().item()}

    # -- sampling ------------------------------------------------------------------------------

    def guided(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict | None,
               w: float = 1.0) -> Tensor:
        """The network output at x_t, with classifier-free guidance (Ho & Salimans 2022, Eq. 6)
        when a caption is given and w != 1: out = out(empty) + w (out(caption) - out(empty)).

        w = 1 is the plain conditional model, w = 0 the unconditional one. Guiding eps or v is the
        same (each is linear in the other at fixed x_t, t). A learned variance is not guided: it
        comes from the conditional output (as GLIDE). Both halves run as one batch of 2B."""
        cond = cond or {}
        if w == 1.0 or "tokens" not in cond:
            return net(x, t, **cond)
        tokens = cond["tokens"]  # (B, L)
        both = net(torch.cat([x, x]), torch.cat([t, t]),
                   tokens=torch.cat([tokens, empty_like(tokens)]))  # (2B, C or 2C, H, W)
        c, u = both.float().chunk(2)
        if not self.learn_sigma:
            return u + w * (c - u)
        (c, var_out), (u, _) = c.chunk(2, dim=1), u.chunk(2, dim=1)
        return torch.cat([u + w * (c - u), var_out], dim=1)

    def denoise(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict | None, guidance: float,
                clip_x0: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """The network's view of x_t: (eps_hat, x0_hat, var_out or None), each (B, C, H, W).

        clip_x0 clips x0_hat to the data range [-1, 1] and re-derives eps_hat from it
        (eps_hat = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab)), as Ho et al.'s and Nichol & Dhariwal's code do."""
        out, var_out = self.split(self.guided(net, x, t, cond, guidance))
        eps_hat, x0 = self.eps_and_x0(x, t, out)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps_hat = (x - gather(self.sqrt_alpha_bars, t) * x0) / gather(self.sqrt_one_minus_alpha_bars, t)
        return eps_hat, x0, var_out

    def tau(self, sampler: str, steps: int = 0, spacing: str = "uniform",
            start: int | None = None) -> list[int]:
        """τ, the timesteps a sampler visits (DDIM's sub-sequence), from `start` (default T-1)
        down: all of them for ddpm
        (or steps > start); else `steps` of them, evenly spaced ("uniform", trailing) or crowded
        towards low noise ("karras")."""
        n = self.T if start is None else start + 1  # the timesteps 0..n-1 are in play
        if sampler == "ddpm" or steps >= n:
            return list(range(n - 1, -1, -1))
        if spacing == "karras":
            return karras_timesteps(self.ab64[:n], steps)
        return spaced_timesteps(n, steps)

    @torch.no_grad()
    def sample(self, net: nn.Module, x_T: Tensor, sampler: str = "ddpm", steps: int = 0, *,
               eta: float = 0.0, spacing: str = "uniform", start: int | None = None,
               clip_x0: bool = True, cond: dict | None = None, guidance: float = 1.0,
               strips: int = 0, track=iter, ts: list[int] | None = None,
               stop: int = -1) -> tuple[Tensor, list[Tensor]]:
        """x_T: (B, C, H, W) noise -> x_0 with the ancestral sampler (all T steps, Algorithm 2),
        DDIM, DPM-Solver++(2M) or EDM's Heun on `steps` timesteps (see tau), using the network
        `net`, conditioned on cond (a caption, guided with scale `guidance`, or a
        low-res image). Heun evaluates the network twice a step but the last (2 steps - 1).
        Also returns the frames [x_T, ..., x_0]: about `strips` evenly spaced states of the chain.
        start: x_T is x_start instead, at that timestep (image-to-image). ts: these timesteps
        instead of tau's, ending at timestep `stop` instead of the clean end (-1): part of the
        way (a teacher's solve in distillation).
        """
        assert stop < 0 or sampler in ("ddim", "dpm++"), "a solve part of the way: ddim, dpm++"
        ts = ts or self.tau(sampler, steps, spacing, start)
        ab_stop = 1.0 if stop < 0 else self.ab64[stop].item()
        every = max(1, len(ts) // strips) if strips else 0
        x, frames, x0_prev, h_prev = x_T, [x_T], None, None
        for i, t in enumerate(track(ts)):
            # The network's eps_hat and x0 at x_t; ab_s of the next timestep (1 after the last).
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            eps_hat, x0, var_out = self.denoise(net, x, tt, cond, guidance, clip_x0)
            ab_t = self.ab64[t].item()
            ab_s = self.ab64[ts[i + 1]].item() if i + 1 < len(ts) else ab_stop
            # One step of the chosen sampler.
            if sampler == "ddpm":
                logvar = None if var_out is None else self.model_logvar(tt, var_out)
                x = self.p_sample(x, tt, eps_hat, logvar=logvar)
            elif sampler == "ddim":
                x = ddim_step(eps_hat, x0, ab_t, ab_s, eta, torch.randn_like(x))
            elif sampler == "heun":  # Euler (DDIM, eta 0), then the correction but to sigma = 0
                x_s = ddim_step(eps_hat, x0, ab_t, ab_s, 0.0, torch.zeros_like(x))
                if ab_s < 1.0:
                    t_s = torch.full_like(tt, ts[i + 1])
                    eps_s, _, _ = self.denoise(net, x_s, t_s, cond, guidance, clip_x0)
                    x_s = heun_step(x, eps_hat, eps_s, ab_t, ab_s)
                x = x_s
            else:
                x, h_prev = dpm_solver_step(x, x0, x0_prev, ab_t, ab_s, h_prev)
                x0_prev = x0
            if every and ((len(ts) - 1 - i) % every == 0):
                frames.append(x)
        return x, frames

    @torch.no_grad()
    def inpaint(self, net: nn.Module, x_T: Tensor, known: Tensor, keep: Tensor,
                sampler: str = "ddpm", steps: int = 0, *, resample: int = 1, eta: float = 0.0,
                clip_x0: bool = True, cond: dict | None = None,
                guidance: float = 1.0, track=iter) -> Tensor:
        """RePaint (Lugmayr et al. 2022, Algorithm 1): x_T -> x_0 where keep = 1, the region
        stays `known`. At each reverse step t -> s the known part of x_s is the forward-noised
        image sqrt(ab_s) known + sqrt(1 - ab_s) z, the unknown part the sampler's step; with
        resample = R the step is redone R times, each after a jump back x_t ~ q(x_t | x_s)
        (x_t = sqrt(ab_t / ab_s) x_s + sqrt(1 - ab_t / ab_s) z), so the two parts harmonise.
        known: (B, C, H, W) in [-1, 1]; keep: (B, 1, H, W) in {0, 1}; sampler ddpm or ddim."""
        ts = self.tau(sampler, steps)
        x = x_T
        for i, t in enumerate(track(ts)):
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            ab_t = self.ab64[t].item()
            ab_s = self.ab64[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
            for r in range(resample):
                # The sampler's step for the unknown region.
                eps_hat, x0, var_out = self.denoise(net, x, tt, cond, guidance, clip_x0)
                if sampler == "ddpm":
                    logvar = None if var_out is None else self.model_logvar(tt, var_out)
                    x_s = self.p_sample(x, tt, eps_hat, logvar=logvar)
                else:
                    x_s = ddim_step(eps_hat, x0, ab_t, ab_s, eta, torch.randn_like(x))
                # The known region noised to s (the image itself at the clean end), pasted in.
                noised = math.sqrt(ab_s) * known + math.sqrt(1 - ab_s) * torch.randn_like(x)
                x_s = keep * noised + (1 - keep) * x_s
                if r < resample - 1 and ab_s < 1.0:  # jump back to t and redo the step
                    x = (math.sqrt(ab_t / ab_s) * x_s
                         + math.sqrt(1 - ab_t / ab_s) * torch.randn_like(x))
            x = x_s
        return x

    @torch.no_grad()
    def invert(self, net: nn.Module, x0: Tensor, steps: int, *, cond: dict | None = None,
               track=iter) -> Tensor:
        """DDIM inversion (Song et al. 2021, Sec. 4.3): the deterministic DDIM ODE run from the
        data up to x_T on `steps` uniform timesteps, each step x_t -> x_u (u > t) as
        x_u = sqrt(ab_u) x0_hat + sqrt(1 - ab_u) eps_hat with eps_hat, x0_hat of the network at (x_t, t)
        (at the clean start, at the first timestep). DDIM with eta = 0 maps x_T back."""
        ts = self.tau("ddim", steps)[::-1]  # increasing
        x, t_eval = x0, ts[0]
        for t in track(ts):
            tt = torch.full((len(x),), t_eval, device=x.device, dtype=torch.long)
            eps_hat, x0_hat, _ = self.denoise(net, x, tt, cond, 1.0, clip_x0=False)
            ab_u = self.ab64[t].item()
            x = math.sqrt(ab_u) * x0_hat + math.sqrt(1 - ab_u) * eps_hat
            t_eval = t
        return x


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation of two noise images (Shoemake 1985), w in [0, 1]:
    sin((1 - w) theta) / sin theta a + sin(w theta) / sin theta b, theta the angle between
    them; for high-dimensional Gaussian noise it keeps the norm where a straight line shrinks
    it. w = 0 and 1 return a and b exactly."""
    if w <= 0.0:
        return a.clone()
    if w >= 1.0:
        return b.clone()
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1).item()
    theta = math.acos(cos)
    if theta < 1e-6:  # (nearly) parallel: the straight line
        return (1 - w) * a + w * b
    return (math.sin((1 - w) * theta) * a + math.sin(w * theta) * b) / math.sin(theta)
