"""Watching a run: the start-up summary, the forward and reverse strips, progress grids from
fixed noise (--sample-every), and optional TensorBoard logging (--tensorboard).

Everything here draws on a side RNG and its own fixed-noise generator, so watching a run never
changes what it trains on (an exact resume still holds).
"""
import json
import os
import re

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from config import UserError, size_name, sr_target_name
from data import hw
from superres import strip_cond

PROGRESS_SAMPLER = ("ddim", 25)  # deterministic (eta 0): grids of one model are identical


def save_reverse_strip(prog, frames: list[Tensor], name: str, rows: int = 8) -> None:
    """Rows = samples, columns = x_T, ..., x_0 of the reverse chain."""
    strip = torch.stack([f[:rows].float() for f in frames], dim=1)  # (rows, cols, C, H, W)
    prog.save_grid(strip.flatten(0, 1), name, nrow=len(frames))


def save_forward_strip(prog, images: Tensor, name: str = "forward-steps.png") -> None:
    """Rows = real images, columns = x_t at t = 0, T/10 - 1, ..., T - 1 (same eps per row)."""
    T = prog.diffusion.T
    ts = sorted({0, *(k * T // 10 - 1 for k in range(1, 11))} - {-1})
    x0 = images.to(prog.device)  # (R, C, H, W) in [-1, 1]
    eps = torch.randn_like(x0)
    cols = [prog.diffusion.q_sample(x0, torch.full((len(x0),), t, device=prog.device), eps)
            for t in ts]
    prog.save_grid(torch.stack(cols, dim=1).flatten(0, 1), name, nrow=len(ts))


def strip(prog, name: str) -> None:
    """run-before.png / run-after.png: the reverse chain of 8 samples, on a side RNG."""
    with prog.side_rng():
        cond = strip_cond(prog, 8) if prog.args.super_res else None
        save_reverse_strip(prog, prog.draw(8, name, cond)[1], f"{name}.png")


def summary(prog) -> None:
    """What this run is, in a few true lines (after the checkpoint's config is applied), and
    the whole resolved config as config.json beside the outputs."""
    a = prog.args
    kind = ("super-resolution" if a.super_res else "text-conditioned" if prog.vocab
            else "unconditional")
    size = f"{a.super_res} -> {a.img_size}" if a.super_res else size_name(a.img_size)
    diffused = f" (diffusing {sr_target_name(a.sr_target)})" if a.super_res else ""
    params = sum(p.numel() for p in prog.model.parameters())
    prog.console.print(
        f"model: {kind}{diffused}, {params / 1e6:.2f} M parameters, {size} px, {a.img_channels} "
        f"channel(s), T = {a.timesteps} ({a.schedule}, predicts {a.prediction}"
        f"{', learned variance' if a.learn_sigma else ''})")
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast",
                 torch.float16: "fp16 autocast"}[prog.amp_dtype]
    world = f" x {prog.world} processes" if prog.world > 1 else ""
    if a.train:
        accum = f" x {a.grad_accum} accumulated" if a.grad_accum > 1 else ""
        until = f" or {a.max_steps} steps in all" if a.max_steps else ""
        augmented = f" (augmented, p {a.augment})" if a.augment else ""
        what = (f"training on {len(prog.data)} images{augmented}, batch {a.batch_size}{accum}, "
                f"{a.epochs} epoch(s){until}, lr {a.lr} ({a.lr_schedule}, warm-up {a.lr_warmup}); "
                f"checkpoints in {a.ckpt_save_dir}/")
        if prog.world > 1:
            prog.console.print(f"distributed: {prog.world} processes, global batch "
                               f"{a.batch_size} = {a.batch_size // prog.world} per process")
    else:
        what = f"sampling with {prog.sampler_name}, {prog.weights_name} weights"
    prog.console.print(f"{what}; {prog.device.type}{world}, {precision}; "
                       f"outputs in {a.save_dir}/ (config.json: every setting)")
    if prog.main:
        with open(os.path.join(a.save_dir, "config.json"), "w") as f:
            json.dump(vars(a), f, indent=1)
    deterministic = a.sampler in ("dpm++", "heun") or (a.sampler == "ddim" and a.eta == 0)
    if not a.train and a.prediction == "eps" and not a.super_res and deterministic:
        prog.console.print(f"warning: {a.loadckpt} predicts eps; with --sampler {a.sampler} "
                           f"(deterministic) some seeds can come out as noise. Use --sampler ddpm "
                           f"or --eta 1, or train with --prediction v (the default)")
    ab_T = prog.diffusion.alpha_bars[-1].item()
    if ab_T > 1e-3:
        prog.console.print(f"warning: alpha_bar_T = {ab_T:.3g}, so x_T is not pure noise and "
                           f"samples will be off; raise --beta-max (about 0.02 * 1000 / T)")


class ProgressGrids:
    """The same n noise images x_T, drawn with the EMA weights at each call: a row of n samples
    saved as progress/step-<step>.png, and progress.png with every row so far, oldest on top."""

    def __init__(self, prog, n: int = 8, seed: int = 0):
        a = prog.args
        g = torch.Generator().manual_seed(seed)  # its own generator: fixed whatever the run does
        self.x_T = torch.randn(n, a.img_channels, *hw(a.img_size), generator=g)
        self.folder = os.path.join(a.save_dir, "progress")
        os.makedirs(self.folder, exist_ok=True)

    def draw(self, prog) -> np.ndarray:
        """Draw the grid for prog.step -> its uint8 (H, W, C) row as saved."""
        with prog.side_rng():
            cond = strip_cond(prog, len(self.x_T)) if prog.args.super_res else None
            x0, _ = prog.draw(len(self.x_T), f"progress grid at step {prog.step}", cond,
                              x_T=self.x_T.to(prog.device), sampler=PROGRESS_SAMPLER)
        path = os.path.join(self.folder, f"step-{prog.step}.png")
        prog.save_grid(x0, os.path.relpath(path, prog.args.save_dir), nrow=len(x0))
        self.compose(os.path.join(prog.args.save_dir, "progress.png"))
        with Image.open(path) as im:
            return np.asarray(im)

    def compose(self, out: str) -> None:
        """progress.png: every step-<step>.png in the folder, a row each, by step."""
        steps = sorted(int(m.group(1)) for f in os.listdir(self.folder)
                       if (m := re.fullmatch(r"step-(\d+)\.png", f)))
        rows = [np.asarray(Image.open(os.path.join(self.folder, f"step-{s}.png")).convert("RGB"))
                for s in steps]
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        Image.fromarray(np.concatenate(rows)).save(out)


class TensorBoard:
    """--tensorboard: scalars and the progress grids in <--save-dir>/tensorboard."""

    def __init__(self, save_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard"
                            ) from None
        self.log_dir = os.path.join(save_dir, "tensorboard")
        self.writer = SummaryWriter(self.log_dir)

    def scalars(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, step: int, name: str, hwc: np.ndarray) -> None:
        self.writer.add_image(name, hwc, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def log_step(prog, progress, tasks, loss: float, lr: float, img_s: float) -> None:
    """The figures of a training step on the progress bars (and to TensorBoard)."""
    info = f"loss {loss:.4f}  lr {lr:.2g}  {img_s:.0f} img/s"
    for task in tasks:
        progress.update(task, info=info)
    if prog.tensorboard:
        prog.tensorboard.scalars(prog.step, loss=loss, lr=lr, img_per_s=img_s)


def progress_grid(prog) -> np.ndarray:
    """--sample-every: the fixed-noise grid of this step (ProgressGrids) -> its uint8 (H, W, C)
    picture."""
    prog.grids = prog.grids or ProgressGrids(prog)
    row = prog.grids.draw(prog)
    if prog.tensorboard:
        prog.tensorboard.image(prog.step, "progress", row)
    return row
