"""Solvers at few network calls (docs/results/distillation.md): DPM-Solver++(3M), the
third-order multistep solver of Lu et al. 2022 ("DPM-Solver++", Sec. 4 and Appendix; the form
of diffusers' DPMSolverMultistepScheduler), against the program's DPM-Solver++(2M), both on
Karras-spaced timesteps, and UniPC as diffusers implements it, at 5, 10 and 20 calls, by FID and
KID of 1,000 samples of a checkpoint against held-out faces (the noise of the distillation
study's rows). Only a solver that wins would join the program's samplers; these are here to be
measured. One JSON line per row in WORK/solvers.jsonl.

    PYTHONPATH=.:/tmp/diffusers python -m tools.solver_study --loadckpt \\
        .cache/distill-study/s0/teacher/final.pth --held-out .cache/distill-study/held-out \\
        --work .cache/distill-study --solvers dpm++2m dpm++3m unipc --calls 5 10 20
"""
import argparse
import json
import math
import os
import time

import torch
from torch import Tensor

import config
import ddpm
from core.diffusion import GaussianDiffusion
from features import evaluate
from run.drawing import to_uint8


def dpm_solver_3m_step(xt: Tensor, x0s: list[Tensor], lams: list[float], ab_t: float,
                       ab_s: float) -> Tensor:
    """DPM-Solver++(3M) x_t -> x_s in data-prediction form, from the network's x0 at the last
    three timesteps (x0s newest first: m0, m1, m2) and their lambda = log(alpha / sigma):

    h = lambda_s - lambda_t, r0 = h_0 / h, r1 = h_1 / h (h_0, h_1 the two steps before),
    D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
    D2 = (D1_0 - D1_1) / (r0 + r1);
    x_s = sigma_s / sigma_t x_t - alpha_s (e^-h - 1) m0 + alpha_s ((e^-h - 1) / h + 1) D1
          - alpha_s ((e^-h - 1 + h) / h^2 - 1/2) D2.
    With fewer than three x0s it is the 2M (two) or DDIM (one) step; to the clean end
    (ab_s = 1) it is the x0 itself."""
    if ab_s >= 1.0:
        return x0s[0]
    lam = lambda ab: 0.5 * (math.log(ab) - math.log1p(-ab))  # noqa: E731
    alpha_s, h = math.sqrt(ab_s), lam(ab_s) - lam(ab_t)
    x = math.sqrt((1 - ab_s) / (1 - ab_t)) * xt - alpha_s * math.expm1(-h) * x0s[0]
    if len(x0s) == 1:
        return x
    r0 = (lams[0] - lams[1]) / h
    if len(x0s) == 2:  # 2M: D = (1 + 1/(2 r)) m0 - 1/(2 r) m1, i.e. + (-(e^-h - 1)/2) D1_0
        return x - alpha_s * math.expm1(-h) * 0.5 * (x0s[0] - x0s[1]) / r0
    r1 = (lams[1] - lams[2]) / h
    d1_0, d1_1 = (x0s[0] - x0s[1]) / r0, (x0s[1] - x0s[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return (x + alpha_s * (math.expm1(-h) / h + 1) * d1
            - alpha_s * ((math.expm1(-h) + h) / h**2 - 0.5) * d2)


@torch.no_grad()
def sample_3m(d: GaussianDiffusion, net, x_T: Tensor, ts: list[int], *, clip_x0: bool = True,
              order: int = 3, stop: int = -1) -> Tensor:
    """x_T -> x_0 with DPM-Solver++(3M) (order 3; 2: the 2M step in this form) on timesteps ts,
    then to the clean end (or to timestep `stop`), as GaussianDiffusion.sample does with dpm++."""
    x, x0s, lams = x_T, [], []
    lam = lambda ab: 0.5 * (math.log(ab) - math.log1p(-ab))  # noqa: E731
    for i, t in enumerate(ts):
        tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        _, x0, _ = d.denoise(net, x, tt, None, 1.0, clip_x0)
        ab_t = d.ab64[t].item()
        ab_s = d.ab64[ts[i + 1] if i + 1 < len(ts) else stop].item() if i + 1 < len(ts) or \
            stop >= 0 else 1.0
        x0s, lams = ([x0] + x0s)[:order], ([lam(ab_t)] + lams)[:order]
        x = dpm_solver_3m_step(x, x0s, lams, ab_t, ab_s)
    return x


@torch.no_grad()
def sample_unipc(d: GaussianDiffusion, net, x_T: Tensor, calls: int) -> Tensor:
    """x_T -> x_0 with diffusers' UniPC (bh2, order 2, Karras sigmas, to sigma 0) in `calls`
    network calls, on our schedule and network (a v model)."""
    from diffusers import UniPCMultistepScheduler
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=d.T, trained_betas=d.betas.double().cpu().numpy(),
        prediction_type="v_prediction", solver_type="bh2", solver_order=2,
        use_karras_sigmas=True, final_sigmas_type="zero")
    scheduler.set_timesteps(calls)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, torch.full((len(x),), int(t))).float(), t, x).prev_sample
    return x.clamp(-1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loadckpt", required=True)
    p.add_argument("--held-out", required=True, help="the folder of held-out faces")
    p.add_argument("--work", default=".cache/distill-study")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--calls", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--solvers", nargs="+", default=["dpm++3m"],
                   choices=["dpm++2m", "dpm++3m", "unipc"],
                   help="unipc: UniPC (Zhao et al. 2023; bh2, order 2, Karras sigmas) as diffusers' "
                        "UniPCMultistepScheduler implements it (diffusers on PYTHONPATH; x0 not "
                        "clipped)")
    a = p.parse_args()
    args, typed = config.parse_args(["--loadckpt", a.loadckpt, "--device", "cpu",
                                     "--save-dir", os.path.join(a.work, "draw")])
    prog = ddpm.Program(args, typed)
    d, net = prog.trainer.diffusion, prog.drawer.sampling_model()
    inception = evaluate.InceptionFeatures("cpu")
    ref = evaluate.reference_features([a.held_out], prog.cfg.model.img_size, 3, inception,
                                      os.path.join(a.work, "cache"))[0]
    shape = (prog.cfg.model.img_channels, prog.cfg.model.img_size, prog.cfg.model.img_size)
    karras = lambda calls: d.tau("dpm++", calls, "karras")  # noqa: E731
    solvers = {"dpm++2m": lambda x_T, calls: sample_3m(d, net, x_T, karras(calls), order=2),
               "dpm++3m": lambda x_T, calls: sample_3m(d, net, x_T, karras(calls)),
               "unipc": lambda x_T, calls: sample_unipc(d, net, x_T, calls)}
    solvers = {name: solvers[name] for name in a.solvers}
    for calls in a.calls:
        for name, solve in solvers.items():
            t0, out = time.time(), []
            for k, i in enumerate(range(0, a.samples, 250)):  # the noise of draw_many(seed=0)
                torch.manual_seed(k)
                x_T = torch.randn(min(250, a.samples - i), *shape)
                out.append(to_uint8(solve(x_T, calls)))
            row = evaluate.score(evaluate.extract(torch.cat(out), inception, 250), ref)
            row.update(row=f"{a.loadckpt} {name} {calls} karras", calls=calls,
                       secs=round(time.time() - t0, 1))
            print(json.dumps(row), flush=True)
            with open(os.path.join(a.work, "solvers.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
