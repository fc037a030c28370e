"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student learns to take in one DDIM step what its teacher
takes in several, so that it draws in N network calls what the teacher draws in many.

The student of N steps samples with DDIM (eta = 0) on tau_N = spaced_timesteps(T, N): N
timesteps from T-1 down, evenly spaced (trailing), the last step going to the clean end. For
each of its steps t -> s (s the next timestep of tau_N, or the clean end) the teacher solves the
probability-flow ODE from x_t to x_s with its own steps:
  - a diffusion model: DPM-Solver++(2M) in `calls` steps, Karras-spaced between t and s
    (karras_between), which matches the finely solved ODE at 10 calls on our models;
  - a student of K steps (N divides K: tau_N is part of tau_K): DDIM on its own tau_K, K / N
    steps (the paper's halving, K = 2N).
The target is the x0 with which one DDIM step from x_t lands exactly on the teacher's x_s
(Algorithm 2, with alpha = sqrt(ab), sigma = sqrt(1 - ab)):

    x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

x~ = x_s at the clean end (alpha_s = 1, sigma_s = 0). The loss is the paper's "truncated SNR"
weighting of the student's x0 error (Sec. 4): max(SNR_t, 1) ||x^_0(x_t) - x~||^2.

The student starts from the teacher's weights and is trained like any model (Adam, EMA); x_t is
the forward process's sample q(x_t | x_0) of a training image, which is where the teacher's
ODE passes at t.
"""
import math

import torch
from torch import Tensor, nn

from core.diffusion import GaussianDiffusion, karras_between, spaced_timesteps


def ddim_target(x_t: Tensor, x_s: Tensor, ab_t: float, ab_s: float) -> Tensor:
    """The x0 whose DDIM step (eta 0) from x_t at ab_t lands on x_s at ab_s (ab_s = 1: the clean
    end, x0 = x_s): x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
    r = math.sqrt((1 - ab_s) / (1 - ab_t))  # sigma_s / sigma_t
    return (x_s - r * x_t) / (math.sqrt(ab_s) - r * math.sqrt(ab_t))


class Distillation:
    """A student of `steps` steps and the teacher it learns from (its frozen network; a student
    of teacher_steps steps, or a diffusion model: teacher_steps 0, solved with DPM-Solver++ in
    `calls` calls a student step). clip_x0: whether the teacher's solves clip its x0 to [-1, 1]
    (as sampling does). `losses` is the training loss, as GaussianDiffusion.losses is."""

    def __init__(self, diffusion: GaussianDiffusion, teacher: nn.Module, steps: int, *,
                 teacher_steps: int = 0, calls: int = 4, clip_x0: bool = True):
        T = diffusion.T
        assert steps >= 1 and (teacher_steps == 0 or teacher_steps % steps == 0 and
                               teacher_steps > steps), "the teacher's steps: a multiple of N"
        self.diffusion, self.teacher, self.clip_x0 = diffusion, teacher, clip_x0
        self.steps, self.teacher_steps, self.calls = steps, teacher_steps, calls
        self.tau = spaced_timesteps(T, steps)  # the student's timesteps, T-1 first
        self.end = dict(zip(self.tau, self.tau[1:] + [-1]))  # t -> s; -1: the clean end
        teacher_tau = spaced_timesteps(T, teacher_steps) if teacher_steps else None
        # The teacher's timesteps from each t of tau_N to (not including) its s.
        self.solves = {t: ([u for u in teacher_tau if s < u <= t] if teacher_tau else
                           karras_between(diffusion.ab64, t, s, calls))
                       for t, s in self.end.items()}

    def draw(self, n: int, device) -> Tensor:
        """n training timesteps (n,), uniform over the student's tau_N (Algorithm 2: t = i / N)."""
        tau = torch.tensor(self.tau, device=device)
        return tau[torch.randint(0, len(tau), (n,), device=device)]

    @torch.no_grad()
    def target(self, x_t: Tensor, t: int, cond: dict | None) -> Tensor:
        """x~ for the images x_t (B, C, H, W) at timestep t of tau_N: the teacher's solve to s,
        then ddim_target."""
        s = self.end[t]
        solver = "ddim" if self.teacher_steps else "dpm++"
        x_s, _ = self.diffusion.sample(self.teacher, x_t, solver, ts=self.solves[t], stop=s,
                                       clip_x0=self.clip_x0, cond=cond)
        ab = self.diffusion.ab64
        return ddim_target(x_t, x_s, ab[t].item(), 1.0 if s < 0 else ab[s].item())

    def losses(self, net: nn.Module, x0: Tensor, t: Tensor, eps: Tensor,
               cond: dict | None = None) -> Tensor:
        """Per image: max(SNR_t, 1) ||x^_0 - x~||^2 (mean over pixels) -> (B,), where x_t =
        sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t (B,) on tau_N, x^_0 the student net's x0 at x_t
        and x~ the teacher's target (one teacher solve per distinct t in the batch)."""
        d, cond = self.diffusion, cond or {}
        x_t = d.q_sample(x0, t, eps)  # (B, C, H, W)
        target = torch.empty_like(x_t)
        for u in t.unique().tolist():  # the batch's images at each t solve together
            rows = t == u
            target[rows] = self.target(x_t[rows], u, {k: v[rows] for k, v in cond.items()})
        out, _ = d.split(net(x_t, t, **cond))
        _, x0_hat = d.eps_and_x0(x_t, t, out)
        snr = d.alpha_bars[t] / (1 - d.alpha_bars[t])  # (B,)
        return snr.clamp(min=1.0) * (x0_hat - target).pow(2).mean(dim=(1, 2, 3))
