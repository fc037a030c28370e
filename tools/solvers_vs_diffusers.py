"""Our DPM-Solver++ (the program's 2M sampler and tools/solver_study's 3M) against an
independent implementation, diffusers' DPMSolverMultistepScheduler, on the same Karras-spaced
timesteps, with the exact v-prediction of Gaussian data as the network: prints the largest
difference of the samples. Needs diffusers, which the program does not (pip install diffusers
into a scratch folder and put it on PYTHONPATH after the repository):

    PYTHONPATH=.:/tmp/diffusers python -m tools.solvers_vs_diffusers
"""
import torch
from diffusers import DPMSolverMultistepScheduler

from core.diffusion import GaussianDiffusion, karras_timesteps
from tests.test_distill import ExactV
from tools.solver_study import sample_3m


def main() -> None:
    d = GaussianDiffusion(1000, 1e-4, 0.02, prediction="v").double()
    net = ExactV(d)
    x_T = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for order in (2, 3):
        for n in (20, 30):  # 15 and more: diffusers keeps the order to the step before the last
            ts = karras_timesteps(d.ab64, n)
            scheduler = DPMSolverMultistepScheduler(
                num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                solver_order=order, prediction_type="v_prediction", algorithm_type="dpmsolver++",
                thresholding=False, lower_order_final=True, final_sigmas_type="zero")
            scheduler.set_timesteps(timesteps=ts)
            x = x_T.clone()
            for t in scheduler.timesteps:
                x = scheduler.step(net(x, torch.full((len(x),), int(t))), t, x).prev_sample
            ours = (d.sample(net, x_T, "dpm++", ts=ts, clip_x0=False)[0] if order == 2 else
                    sample_3m(d, net, x_T, ts, clip_x0=False))
            print(f"DPM-Solver++({order}M), {len(ts)} steps: largest |ours - diffusers'| = "
                  f"{(ours - x).abs().max().item():.1e} (samples of mean |x| "
                  f"{x.abs().mean().item():.2f})")


if __name__ == "__main__":
    main()
