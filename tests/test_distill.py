"""Progressive distillation's maths (core/distill.py) on Gaussian data, where the exact
denoiser, the probability-flow ODE's solution and so the student's target and loss are known in
closed form."""
import math

import pytest
import torch
from torch import nn

from core.diffusion import GaussianDiffusion, karras_between, karras_timesteps, spaced_timesteps
from core.distill import Distillation, ddim_target

MU, S = 0.3, 0.5  # the data: every pixel ~ N(MU, S^2), independent


class ExactV(nn.Module):
    """The exact v-prediction of Gaussian data: x0^ = E[x0 | x_t] = MU + a (x_t - alpha MU),
    a = alpha S^2 / (alpha^2 S^2 + sigma^2); v = (alpha x_t - x0^) / sigma."""

    def __init__(self, d: GaussianDiffusion):
        super().__init__()
        self.ab = d.ab64

    def forward(self, x, t):
        ab = self.ab[t].to(x)[:, None, None, None]
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        x0 = MU + alpha * S**2 / (ab * S**2 + 1 - ab) * (x - alpha * MU)
        return (alpha * x - x0) / sigma


def flow(x_t, ab_t: float, ab_s: float):
    """The probability-flow ODE's exact map x_t -> x_s for Gaussian data: each pixel keeps its
    standard score, x_s = alpha_s MU + sd_s / sd_t (x_t - alpha_t MU), sd^2 = ab S^2 + 1 - ab."""
    sd = lambda ab: math.sqrt(ab * S**2 + 1 - ab)  # noqa: E731
    return math.sqrt(ab_s) * MU + sd(ab_s) / sd(ab_t) * (x_t - math.sqrt(ab_t) * MU)


@pytest.fixture
def d():
    return GaussianDiffusion(1000, 1e-4, 0.02, prediction="v").double()


def ab(d, t):
    return 1.0 if t < 0 else d.ab64[t].item()


def test_the_ddim_target_takes_one_ddim_step_to_where_the_teacher_landed(d):
    g = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), \
        torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    for t, s in [(999, 499), (499, 100), (100, -1)]:
        x0 = ddim_target(x_t, x_s, ab(d, t), ab(d, s))
        eps = (x_t - math.sqrt(ab(d, t)) * x0) / math.sqrt(1 - ab(d, t))
        landed = math.sqrt(ab(d, s)) * x0 + math.sqrt(1 - ab(d, s)) * eps  # DDIM, eta 0
        torch.testing.assert_close(landed, x_s)


def test_a_diffusion_teacher_solves_each_student_step_to_the_exact_ode_map(d):
    x_t = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dist = Distillation(d, ExactV(d), 2, calls=100, clip_x0=False)
    assert dist.tau == [999, 499] and dist.end == {999: 499, 499: -1}
    for t in dist.tau:
        s = dist.end[t]
        exact = ddim_target(x_t, flow(x_t, ab(d, t), ab(d, s)), ab(d, t), ab(d, s))
        torch.testing.assert_close(dist.target(x_t, t, None), exact, atol=2e-3, rtol=0)
        # and a single teacher call (DDIM) is not the exact map: the target is a real change
        one = Distillation(d, ExactV(d), 2, calls=1, clip_x0=False).target(x_t, t, None)
        assert (one - exact).abs().max() > 1e-2


def test_the_loss_of_the_teacher_as_student_is_its_closed_form(d):
    """With the exact denoiser as the student, x^_0 - x~ = (a - c) y, y = x_t - alpha_t MU ~
    N(0, alpha_t^2 S^2 + sigma_t^2): the expected loss is max(SNR, 1) (a - c)^2 sd_t^2, where
    x~ = MU + c y, c = (sd_s / sd_t - r) / (alpha_s - r alpha_t), r = sigma_s / sigma_t."""
    torch.manual_seed(0)
    dist = Distillation(d, ExactV(d), 2, calls=100, clip_x0=False)
    n = 4000
    x0 = MU + S * torch.randn(n, 1, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x0)
    for t in dist.tau:
        s = dist.end[t]
        a_t, a_s = ab(d, t), ab(d, s)
        sd = lambda v: math.sqrt(v * S**2 + 1 - v)  # noqa: E731
        r = math.sqrt((1 - a_s) / (1 - a_t))
        c = (sd(a_s) / sd(a_t) - r) / (math.sqrt(a_s) - r * math.sqrt(a_t))
        a = math.sqrt(a_t) * S**2 / sd(a_t) ** 2
        expected = max(a_t / (1 - a_t), 1.0) * (a - c) ** 2 * sd(a_t) ** 2
        losses = dist.losses(ExactV(d), x0, torch.full((n,), t), eps)
        assert expected > 1e-3  # the teacher's own x0 is not the target
        assert losses.mean().item() == pytest.approx(expected, rel=0.06)


def test_a_student_that_fits_its_targets_draws_the_exact_ode_map_in_two_steps(d):
    """A student whose x0 at each t of tau_2 is the closed-form target x~ (linear in x_t),
    sampled with DDIM on tau_2, maps x_T to the ODE's exact x_0: what distillation aims at."""
    class FittedStudent(nn.Module):
        def forward(self, x, t):
            ab_t = d.ab64[t[0]].item()
            s = {999: 499, 499: -1}[t[0].item()]
            x0 = ddim_target(x, flow(x, ab_t, ab(d, s)), ab_t, ab(d, s))
            return (math.sqrt(ab_t) * x - x0) / math.sqrt(1 - ab_t)  # as v
    x_T = torch.randn(6, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x, _ = d.sample(FittedStudent(), x_T, "ddim", 2, clip_x0=False)
    torch.testing.assert_close(x, flow(x_T, ab(d, 999), 1.0))
    # (the teacher itself, in two DDIM steps, is far from it)
    x_teacher, _ = d.sample(ExactV(d), x_T, "ddim", 2, clip_x0=False)
    assert (x_teacher - x).abs().max() > 0.05


def test_a_student_teacher_takes_its_own_ddim_steps_within_each_student_step(d):
    dist = Distillation(d, ExactV(d), 2, teacher_steps=4)
    assert dist.tau == spaced_timesteps(1000, 2) == [999, 499]
    assert dist.solves == {999: [999, 749], 499: [499, 249]}  # tau_4: 999, 749, 499, 249
    # its target is that of the teacher's two DDIM steps
    x_t = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    mid, _ = d.sample(ExactV(d), x_t, "ddim", ts=[999], stop=749)
    x_s, _ = d.sample(ExactV(d), mid, "ddim", ts=[749], stop=499)
    torch.testing.assert_close(dist.target(x_t, 999, None),
                               ddim_target(x_t, x_s, ab(d, 999), ab(d, 499)))
    with pytest.raises(AssertionError):
        Distillation(d, ExactV(d), 2, teacher_steps=3)  # tau_2 is not part of tau_3


def test_karras_steps_between_two_timesteps_start_at_t_and_stop_short_of_s(d):
    assert karras_between(d.ab64, 999, -1, 7) == karras_timesteps(d.ab64, 7)
    for t, s, n in [(999, 499, 4), (499, -1, 4), (30, 2, 3)]:
        ts = karras_between(d.ab64, t, s, n)
        assert ts[0] == t and all(s < u <= t for u in ts) and len(ts) <= n
        assert ts == sorted(set(ts), reverse=True)
    assert karras_between(d.ab64, 499, -1, 4)[-1] == 0  # to the clean end: sigma_min is visited
    # evenly spaced in sigma^(1/7): the first gap (at high noise) is the widest
    sig = lambda u: math.sqrt((1 - ab(d, u)) / ab(d, u)) ** (1 / 7)  # noqa: E731
    ts = karras_between(d.ab64, 999, 100, 5)
    gaps = [sig(a) - sig(b) for a, b in zip(ts, ts[1:] + [100])]
    assert max(gaps) / min(gaps) < 1.3


def test_the_draws_are_the_student_timesteps_uniformly(d):
    torch.manual_seed(0)
    t = Distillation(d, ExactV(d), 4).draw(8000, "cpu")
    counts = torch.stack([(t == u).sum() for u in [999, 749, 499, 249]])
    assert counts.sum() == 8000 and (counts - 2000).abs().max() < 150


def test_the_3m_solver_converges_faster_than_2m_and_its_2m_form_is_the_samplers(d):
    """tools/solver_study's DPM-Solver++(3M) on Gaussian data from t = 999 to t = 100 against
    the exact ODE map: doubling the steps from 20 divides its error by more than 2^2 (its
    first two steps, DDIM and 2M, keep it from a clean 2^3 here), and it is closer than 2M at
    every step count; in its 2M form it is the program's dpm++ sampler."""
    from tools.solver_study import sample_3m
    x_T = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    net = ExactV(d)
    ts = karras_timesteps(d.ab64, 10)
    torch.testing.assert_close(sample_3m(d, net, x_T, ts, clip_x0=False, order=2),
                               d.sample(net, x_T, "dpm++", ts=ts, clip_x0=False)[0])
    exact = flow(x_T, ab(d, 999), ab(d, 100))
    errors = {order: [(sample_3m(d, net, x_T, karras_between(d.ab64, 999, 100, n), stop=100,
                                 clip_x0=False, order=order) - exact).abs().max().item()
                       for n in (20, 40, 80)] for order in (2, 3)}
    assert all(a / b > 4 for a, b in zip(errors[3], errors[3][1:])), errors[3]
    assert all(e3 < e2 for e3, e2 in zip(errors[3], errors[2])), errors
