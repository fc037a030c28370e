"""The consistency-distillation study's loss (tools/consistency_study.py) on Gaussian data,
where the exact consistency function, the probability-flow ODE's map to t = 0, is known."""
import math

import torch
from torch import nn

from core.diffusion import GaussianDiffusion
from tests.test_distill import MU, S, ExactV, flow
from tools.consistency_study import Consistency


class ExactConsistency(nn.Module):
    """A v model whose x0 estimate sqrt(ab) x_t - sqrt(1 - ab) v is the exact ODE map of x_t
    to t = 0 (flow), the consistency function of Gaussian data."""

    def __init__(self, d: GaussianDiffusion):
        super().__init__()
        self.ab = d.ab64

    def forward(self, x, t):
        ab = self.ab[t][:, None, None, None]
        f = torch.stack([flow(x[i], ab[i].item(), self.ab[0].item()) for i in range(len(x))])
        return (ab.sqrt() * x - f) / (1 - ab).sqrt()


def batch(c: Consistency, n: int = 64):
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    return x0, c.draw(n, "cpu"), eps


def test_the_teachers_step_is_the_programs_ddim_step_to_the_next_lower_timestep():
    d = GaussianDiffusion(1000, 1e-4, 0.02, prediction="v").double()
    c = Consistency(d, ExactV(d), 18, clip_x0=False)
    assert c.ts[0] == 0 and c.ts[-1] == 999 and len(c.ts) == 19
    x0, t, eps = batch(c, 8)
    x_t = d.q_sample(x0, t, eps)
    for i in range(8):
        u, s = t[i].item(), c.lower[t[i]].item()
        assert s == c.ts[c.ts.index(u) - 1]
        stepped, _ = d.sample(ExactV(d), x_t[i:i + 1], "ddim", ts=[u], stop=s, clip_x0=False)
        x0_hat = c.f(ExactV(d), x_t[i:i + 1], t[i:i + 1])  # the same step by hand
        eps_hat = (x_t[i] - math.sqrt(d.ab64[u]) * x0_hat) / math.sqrt(1 - d.ab64[u])
        by_hand = math.sqrt(d.ab64[s]) * x0_hat + math.sqrt(1 - d.ab64[s]) * eps_hat
        torch.testing.assert_close(stepped, by_hand)


def test_the_exact_consistency_function_has_a_loss_that_vanishes_as_the_grid_gets_finer():
    d = GaussianDiffusion(1000, 1e-4, 0.02, prediction="v").double()
    loss = {}
    for n in (18, 72):
        c = Consistency(d, ExactV(d), n, clip_x0=False)
        x0, t, eps = batch(c)
        loss[n] = c.losses(ExactConsistency(d), x0, t, eps).mean().item()
        teacher_as_student = c.losses(ExactV(d), x0, t, eps).mean().item()
        assert loss[n] < teacher_as_student / 10  # E[x0 | x_t] is not consistent along a path
    assert loss[72] < loss[18] / 8  # only the teacher's DDIM step errs: O(h^2) a step, squared
