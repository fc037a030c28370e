"""Consistency distillation beside progressive distillation (docs/results/distillation.md): is
it the better way to a 1- or 2-step model at the 16-px budget? A study, not a program feature:
the program's --distill is progressive distillation, which this measures against.

Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) trains f(x_t, t),
here the student's x0 estimate (for a v model x^0 = sqrt(ab) x_t - sqrt(1 - ab) v, which is x_t
at t = 0: the boundary condition holds as closely as ab_0 is 1), to give the same x0 all along
each probability-flow ODE path. On N + 1 timesteps 0 = t_0 < ... < t_N = T - 1 (Karras-spaced,
as the paper's EDM grid), a training image at t_{n+1} is moved by one DDIM step of the teacher
to t_n, and the loss is

    || f_theta(x_{t_{n+1}}, t_{n+1}) - sg(f_theta(x^_{t_n}, t_n)) ||^2,

with the target network the student itself with gradients stopped (mu = 0: Song & Dhariwal
2023's "improved consistency training" found it better than an EMA target), starting from the
teacher's weights. It draws in 1 step, x0 = f(x_T, T - 1), or in 2: x0 = f(x_tau, tau) with
x_tau = sqrt(ab) x0 + sqrt(1 - ab) z, fresh noise z, tau the middle timestep (the
multistep sampler of Algorithm 1).

The student is trained by the program's own loop (Program.train_step, Adam, EMA) on a
`--distill` run whose loss is replaced by this one; the distillation study's split, teacher
and scoring are reused:

    python -m tools.distill_study --faces anime-faces-64/ --seeds 0      # the teacher first
    python -m tools.consistency_study --work .cache/distill-study --seeds 0 --max-steps 900

One JSON line per row in WORK/results.jsonl, beside the distillation study's rows; 64 samples
in 1 and in 2 steps side by side in WORK/<row> s<seed>.png (pictures of the data: not for the
repository).
"""
import argparse
import json
import os
import time

import torch
from torch import Tensor, nn

from core.diffusion import GaussianDiffusion, gather
from features import evaluate
from tools.distill_study import side_by_side
from tools.recipe_study import train


class Consistency:
    """The consistency-distillation loss on `n` intervals, with the interface the trainer calls
    (draw, losses) in place of progressive distillation's."""

    def __init__(self, diffusion: GaussianDiffusion, teacher: nn.Module, n: int = 18, *,
                 clip_x0: bool = True):
        self.diffusion, self.teacher, self.clip_x0 = diffusion, teacher, clip_x0
        ts = sorted(set(diffusion.tau("ddim", n + 1, "karras")))  # t_0 = 0 < ... < T - 1
        self.ts = ts
        self.lower = torch.zeros(diffusion.T, dtype=torch.long)  # t_{n+1} -> t_n
        self.lower[ts[1:]] = torch.tensor(ts[:-1])

    def draw(self, n: int, device) -> Tensor:
        """n training timesteps t_{n+1} (n,), uniform over the intervals."""
        upper = torch.tensor(self.ts[1:], device=device)
        return upper[torch.randint(0, len(upper), (n,), device=device)]

    def f(self, net: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        """The consistency function: the network's x0 estimate at x_t (B, C, H, W)."""
        out, _ = self.diffusion.split(net(x, t))
        return self.diffusion.eps_and_x0(x, t, out)[1]

    def losses(self, net: nn.Module, x0: Tensor, t: Tensor, eps: Tensor,
               cond: dict | None = None) -> Tensor:
        """Per image ||f(x_t, t) - sg f(x^_s, s)||^2 (mean over pixels) -> (B,): x_t from the
        forward process, x^_s one DDIM step of the teacher from it to the next lower t_n."""
        d = self.diffusion
        x_t = d.q_sample(x0, t, eps)  # (B, C, H, W)
        with torch.no_grad():  # the teacher's DDIM step t -> s, x0 clipped as sampling does
            s = self.lower.to(t.device)[t]  # (B,)
            x0_hat = self.f(self.teacher, x_t, t)
            x0_hat = x0_hat.clamp(-1, 1) if self.clip_x0 else x0_hat
            eps_hat = (x_t - gather(d.sqrt_alpha_bars, t) * x0_hat) / gather(
                d.sqrt_one_minus_alpha_bars, t)
            x_s = gather(d.sqrt_alpha_bars, s) * x0_hat + gather(
                d.sqrt_one_minus_alpha_bars, s) * eps_hat
            target = self.f(net, x_s, s)
        return (self.f(net, x_t, t) - target).pow(2).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def draw_samples(self, net: nn.Module, x_T: Tensor, steps: int,
                     gen: torch.Generator) -> Tensor:
        """Algorithm 1 in 1 or 2 steps (the second from the middle timestep) -> x0 in [-1, 1]."""
        d, T = self.diffusion, self.diffusion.T
        t = torch.full((len(x_T),), T - 1, device=x_T.device)
        x0 = self.f(net, x_T, t).clamp(-1, 1)
        if steps == 2:
            tau = torch.full_like(t, T // 2 - 1)
            z = torch.randn(x_T.shape, generator=gen, device=x_T.device)
            x = gather(d.sqrt_alpha_bars, tau) * x0 + gather(d.sqrt_one_minus_alpha_bars, tau) * z
            x0 = self.f(net, x, tau).clamp(-1, 1)
        return x0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=".cache/distill-study",
                   help="the distillation study's folder (its split, teachers and results)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-steps", type=int, default=900, help="the student's training steps")
    p.add_argument("--intervals", type=int, default=18, help="N, the ODE's discretisation")
    p.add_argument("--samples", type=int, default=1000, help="samples per FID")
    p.add_argument("--lr", type=float, help="the student's learning rate (default: the program's)")
    a = p.parse_args()
    net = evaluate.InceptionFeatures("cpu")
    ref = evaluate.reference_features([os.path.join(a.work, "held-out")], 16, 3, net,
                                      os.path.join(a.work, "cache"))[0]
    out = os.path.join(a.work, "results.jsonl")
    for seed in a.seeds:
        folder = os.path.join(a.work, f"s{seed}")
        name = f"consistency {a.max_steps} N{a.intervals}" + (f" lr{a.lr:g}" if a.lr else "")
        flags = ["--distill", "--loadckpt", os.path.join(folder, "teacher", "final.pth"),
                 "--data-folders", os.path.join(a.work, "train"), "--seed", str(seed),
                 "--device", "cpu", "--cache-dir", os.path.join(a.work, "cache"),
                 "--sample-every", "0", "--start-over", "--ckpt-save-dir",
                 os.path.join(folder, name), "--save-dir", os.path.join(folder, name),
                 "--batch-size", "64", "--student-steps", "1", "--max-steps", str(a.max_steps)]
        flags += ["--lr", str(a.lr)] if a.lr else []
        prog, secs, _ = train(flags, [], setup=lambda pr: setattr(  # the trainer's loss and t
            pr.trainer, "distill", Consistency(pr.trainer.diffusion, pr.trainer.teacher,
                                               a.intervals)))
        rows = [{"row": f"s{seed} {name} distillation", "seed": seed, "train_s": round(secs, 1),
                 "steps": prog.state.step}]
        cd, grids = prog.trainer.distill, {}
        for steps in (1, 2):
            t0, gen = time.time(), torch.Generator().manual_seed(0)
            x_T = torch.randn(a.samples, 3, 16, 16, generator=gen)
            x0 = torch.cat([cd.draw_samples(prog.trainer.ema, x, steps, gen)
                            for x in x_T.split(250)])
            pixels = ((x0 + 1) * 127.5).round().to(torch.uint8)  # (n, 3, 16, 16)
            grids[f"{steps} step(s)"] = pixels[:64]
            score = evaluate.score(evaluate.extract(pixels, net, 250), ref)
            rows.append({"row": f"s{seed} {name} student at {steps}", "seed": seed, **score,
                         "eval_s": round(time.time() - t0, 1)})
        side_by_side(grids, os.path.join(a.work, f"{name} s{seed}.png"))
        with open(out, "a") as f:
            for row in rows:
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
