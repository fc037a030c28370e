"""Importance-sampled timesteps (Nichol & Dhariwal 2021, Sec. 3.3): warm-up, p_t, unbiasedness."""
import torch

from config import parse_args
from ddpm import Program
from core.diffusion import ImportanceSampler


def warmed(T, loss_of_t):
    s = ImportanceSampler(T)
    for _ in range(10):
        t = torch.arange(T)
        s.update(t, loss_of_t(t))
    return s


def test_timesteps_are_uniform_until_every_t_has_ten_losses():
    s = ImportanceSampler(5)
    for _ in range(9):
        s.update(torch.arange(5), torch.arange(5.0) + 1)
    s.update(torch.arange(4), torch.ones(4))  # t = 4 still has only 9
    assert torch.equal(s.probs(), torch.full((5,), 0.2, dtype=torch.float64))
    s.update(torch.tensor([4]), torch.tensor([7.0]))
    assert not torch.allclose(s.probs(), torch.full((5,), 0.2, dtype=torch.float64))


def test_p_t_is_proportional_to_the_root_mean_square_of_the_last_ten_losses():
    s = ImportanceSampler(3, uniform=0.0)
    for k in range(15):  # only the last 10 losses per t count
        s.update(torch.arange(3), torch.tensor([100.0 if k < 5 else 1.0, 2.0, 3.0 + k % 2]))
    rms = torch.tensor([1.0, 2.0, (0.5 * 9 + 0.5 * 16) ** 0.5], dtype=torch.float64)
    assert torch.allclose(s.probs(), rms / rms.sum())


def test_the_weighted_loss_stays_an_unbiased_estimate():
    T = 50
    loss_of_t = lambda t: (t.double() + 1) ** 1.5 / 100  # larger losses at large t
    s = warmed(T, loss_of_t)
    torch.manual_seed(0)
    t, w = s.sample(200_000, torch.device("cpu"))
    true_mean = loss_of_t(torch.arange(T)).mean().item()
    weighted = (w.double() * loss_of_t(t)).mean().item()
    unweighted = loss_of_t(t).mean().item()
    assert abs(weighted - true_mean) / true_mean < 0.01
    assert abs(unweighted - true_mean) / true_mean > 0.2  # the weights are what fixes the bias
    assert (t >= T // 2).float().mean() > 0.6  # and large-loss timesteps are drawn more often


def test_the_sampler_state_survives_a_resume(tmp_path):
    flags = ["--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
             "--channel-multiples", "1", "--has-attn", "f", "--timesteps", "4", "--beta-max", "0.5",
             "--batch-size", "8", "--epochs", "1", "--importance-sampling", "--seed", "1",
             "--ckpt-save-dir", str(tmp_path), "--save-dir", str(tmp_path)]
    p = Program(*parse_args(flags))
    p.run()
    assert p.trainer.importance.count.sum() > 0
    saved = torch.load(tmp_path / "ckpt-0.pth", weights_only=True)["importance"]
    q = Program(*parse_args(flags + ["--loadckpt", str(tmp_path / "ckpt-0.pth")]))
    assert torch.equal(q.trainer.importance.history, saved["history"])
    assert torch.equal(q.trainer.importance.count, p.trainer.importance.count)
