"""Watching a run: the start-up summary, the forward and reverse strips, progress grids from
fixed noise (--sample-every), and optional TensorBoard logging (--tensorboard).

Everything here draws on a side RNG and its own fixed-noise generator, so watching a run never
changes what it trains on (an exact resume still holds).
"""
import json
import math
import os
import re

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from features import superres
from data import hw
from core.configs import Settings
from core.spec import ModelSpec, size_name, sr_target_name
from ui import UserError

PROGRESS_SAMPLER = ("ddim", 25)  # deterministic (eta 0): grids of one model are identical


def save_reverse_strip(drawer, frames: list[Tensor], name: str, rows: int = 8) -> None:
    """Rows = samples, columns = x_T, ..., x_0 of the reverse chain."""
    strip = torch.stack([f[:rows].float() for f in frames], dim=1)  # (rows, cols, C, H, W)
    drawer.save_grid(strip.flatten(0, 1), name, nrow=len(frames))


def save_forward_strip(drawer, images: Tensor, name: str = "forward-steps.png") -> None:
    """Rows = real images, columns = x_t at t = 0, T/10 - 1, ..., T - 1 (same eps per row)."""
    T, dev = drawer.diffusion.T, drawer.device
    ts = sorted({0, *(k * T // 10 - 1 for k in range(1, 11))} - {-1})
    x0 = images.to(dev)  # (R, C, H, W) in [-1, 1]
    eps = torch.randn_like(x0)
    cols = [drawer.diffusion.q_sample(x0, torch.full((len(x0),), t, device=dev), eps) for t in ts]
    drawer.save_grid(torch.stack(cols, dim=1).flatten(0, 1), name, nrow=len(ts))


def strip(drawer, name: str) -> None:
    """run-before.png / run-after.png: the reverse chain of 8 samples, on a side RNG."""
    with drawer.side_rng():
        cond, base = drawer.kind.preview(8, drawer.device)
        save_reverse_strip(drawer, drawer.draw(8, name, cond, base=base)[1], f"{name}.png")


def summary(drawer, settings: Settings, *, params: int, n_images: int, amp_dtype, world: int,
            write: bool) -> None:
    """What this run is, in a few true lines (after the checkpoint's config is applied), and
    (write) every setting as config.json beside the outputs, part by part. params: the UNet's
    parameter count; n_images: the training set's size."""
    m, t, s, out = settings.model, settings.train, settings.sample, settings.output
    size = f"{m.super_res} -> {m.img_size}" if m.super_res else size_name(m.img_size)
    diffused = f" (diffusing {sr_target_name(m.sr_target)})" if m.super_res else ""
    say = drawer.console.print
    say(f"model: {drawer.kind.name}{diffused}, {params / 1e6:.2f} M parameters, {size} px, "
        f"{m.img_channels} channel(s), T = {m.timesteps} ({m.schedule}, predicts {m.prediction}"
        f"{', learned variance' if m.learn_sigma else ''})"
        + (f", a student for {m.student_steps} step(s)" if m.student_steps else ""))
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast",
                 torch.float16: "fp16 autocast"}[amp_dtype]
    processes = f" x {world} processes" if world > 1 else ""
    if t.train:
        accum = f" x {t.grad_accum} accumulated" if t.grad_accum > 1 else ""
        until = f" or {t.max_steps} steps in all" if t.max_steps else ""
        until += f" or {t.max_minutes:g} minutes" if t.max_minutes else ""
        augmented = f" (augmented, p {m.augment})" if m.augment else ""
        doing = "distilling" if t.distill else "training"
        what = (f"{doing} on {n_images} images{augmented}, batch {t.batch_size}{accum}, "
                f"{t.epochs} epoch(s){until}, lr {t.lr} ({t.lr_schedule}, warm-up {t.lr_warmup}); "
                f"checkpoints in {out.ckpt_save_dir}/")
        if world > 1:
            say(f"distributed: {world} processes, global batch {t.batch_size} = "
                f"{t.batch_size // world} per process")
    else:
        what = f"sampling with {drawer.sampler_name}, {drawer.weights_name} weights"
    say(f"{what}; {drawer.device.type}{processes}, {precision}; outputs in {out.save_dir}/ "
        f"(config.json: every setting)")
    if write:
        with open(os.path.join(out.save_dir, "config.json"), "w") as f:
            json.dump(settings.to_dict(), f, indent=1)
    deterministic = s.sampler in ("dpm++", "heun") or (s.sampler == "ddim" and s.eta == 0)
    if not t.train and m.prediction == "eps" and not m.super_res and deterministic:
        say(f"warning: {s.loadckpt} predicts eps; with --sampler {s.sampler} (deterministic) "
            f"some seeds can come out as noise. Use --sampler ddpm or --eta 1, or train with "
            f"--prediction v (the default)")
    if not t.train and m.student_steps and (s.sampler, s.steps) != ("ddim", m.student_steps):
        say(f"warning: {s.loadckpt} is a student made to draw in {m.student_steps} DDIM step(s); "
            f"with --sampler {s.sampler} in {s.steps} its samples come out worse (for another "
            f"count, distil a student of it: docs/usage.md)")
    ab_T = drawer.diffusion.alpha_bars[-1].item()
    if ab_T > 1e-3:
        say(f"warning: alpha_bar_T = {ab_T:.3g}, so x_T is not pure noise and samples will be "
            f"off; raise --beta-max (about 0.02 * 1000 / T)")


class ProgressGrids:
    """The same n noise images x_T, drawn with the EMA weights at each call (DDIM: 25 steps, a
    student's own steps): a row of n samples
    saved as progress/step-<step>.png, and progress.png with every row so far, oldest on top."""

    def __init__(self, model: ModelSpec, save_dir: str, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)  # its own generator: fixed whatever the run does
        self.x_T = torch.randn(n, model.img_channels, *hw(model.img_size), generator=g)
        # a student draws in the steps it is made for
        self.sampler = ("ddim", model.student_steps) if model.student_steps else PROGRESS_SAMPLER
        self.folder = os.path.join(save_dir, "progress")
        os.makedirs(self.folder, exist_ok=True)

    def draw(self, drawer, step: int) -> np.ndarray:
        """Draw the grid of optimizer step `step` -> its uint8 (H, W, C) row as saved."""
        with drawer.side_rng():
            cond, base = drawer.kind.preview(len(self.x_T), drawer.device)
            x0, _ = drawer.draw(len(self.x_T), f"progress grid at step {step}", cond, base=base,
                                x_T=self.x_T.to(drawer.device), sampler=self.sampler)
        path = os.path.join(self.folder, f"step-{step}.png")
        drawer.save_grid(x0, os.path.relpath(path, drawer.save_dir), nrow=len(x0))
        self.compose(os.path.join(drawer.save_dir, "progress.png"))
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


def log_step(progress, tasks, tensorboard, *, step: int, loss: float, lr: float,
             img_s: float) -> None:
    """The figures of a training step on the progress bars (and to TensorBoard)."""
    info = f"loss {loss:.4f}  lr {lr:.2g}  {img_s:.0f} img/s"
    for task in tasks:
        progress.update(task, info=info)
    if tensorboard:
        tensorboard.scalars(step, loss=loss, lr=lr, img_per_s=img_s)


def write_samples(drawer, sr=None) -> None:
    """--batch-size samples: ddpm-<i>.png, ddpm-all.png, reverse-steps.png; with the cascade's
    super-resolution stage sr (a Drawer), also each super-resolved."""
    x0, frames = drawer.draw(drawer.batch_size)
    for i, img in enumerate(x0):
        drawer.save_grid(img[None], f"ddpm-{i}.png", nrow=1)
    drawer.save_grid(x0, "ddpm-all.png", nrow=math.ceil(math.sqrt(len(x0))))
    save_reverse_strip(drawer, frames, "reverse-steps.png")
    drawer.console.print(f"wrote {len(x0)} samples to {drawer.save_dir}/ddpm-*.png, ddpm-all.png "
                         f"and reverse-steps.png")
    if sr:
        superres.save_sr(sr, x0, superres.super_resolve(sr, x0), list(map(str, range(len(x0)))))
