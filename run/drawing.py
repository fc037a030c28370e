"""Drawing pictures with a trained model: the chosen sampler and weights, in batches, with a
progress bar, into PNG grids. A Drawer is what the feature modules (edit, prompts, superres,
evaluate, monitor) are given of a run: the model's spec, the sampling settings, the device, the
model kind and the diffusion.
"""
import math
import os

import torch
import torch.nn as nn
from rich.console import Console
from torch import Tensor

from core.configs import SampleConfig
from core.spec import ModelSpec
from data import grid, hw, save_png, to_uint8
from features.text import Vocab
from ui import progress_bar


class Drawer:
    """Draws from a run's networks (trainer.Trainer: its ema or model, its diffusion). model:
    what the network is; sample: the sampler, its steps and weights, the prompts; kind: the
    model kind (kinds.ModelKind); batch_size: samples drawn at once; save_dir: where pictures
    go; vocab: a text model's vocabulary; quiet: no progress bars (processes other than the
    first)."""

    def __init__(self, model: ModelSpec, sample: SampleConfig, kind, trainer, console: Console,
                 *, batch_size: int, save_dir: str, vocab: Vocab | None = None,
                 quiet: bool = False):
        self.model, self.sample, self.kind, self.trainer = model, sample, kind, trainer
        self.batch_size, self.save_dir, self.console = batch_size, save_dir, console
        self.vocab, self.quiet = vocab, quiet
        self.device, self.diffusion = trainer.device, trainer.diffusion

    def side_rng(self):
        """Pictures and FID drawn during training use a forked RNG, so that they leave the
        training's random stream (and so an exact resume) untouched."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def autocast(self):
        return self.trainer.autocast()

    def progress(self, *fields: str):
        return progress_bar(self.console, *fields, disable=self.quiet)

    def save_grid(self, images: Tensor, name: str, nrow: int) -> None:
        """images: (N, C, H, W) in [-1, 1] (or uint8) -> one PNG grid in --save-dir."""
        images = images if images.dtype == torch.uint8 else to_uint8(images)
        save_png(grid(images.cpu(), nrow, padding=1, pad_value=0),
                 os.path.join(self.save_dir, name))

    @property
    def sampler_name(self) -> str:
        """E.g. 'heun, 18 karras-spaced steps (35 network calls)' or 'ddpm, all T steps'."""
        a = self.sample
        if a.sampler == "ddpm":
            return "ddpm, all T steps"
        n = len(self.diffusion.tau(a.sampler, a.steps, a.spacing))
        calls = f" ({2 * n - 1} network calls)" if a.sampler == "heun" else ""
        eta = f", eta {a.eta}" if a.sampler == "ddim" else ""
        return f"{a.sampler}, {n} {a.spacing}-spaced steps{calls}{eta}"

    @property
    def weights_name(self) -> str:
        return "raw" if self.sample.raw_weights else "EMA"

    def sampling_model(self) -> nn.Module:
        """The weights we sample and measure with: the EMA, or the raw ones (--raw-weights)."""
        return self.trainer.model if self.sample.raw_weights else self.trainer.ema

    @torch.inference_mode()
    def draw(self, n: int, desc: str = "sampling", cond: dict | None = None, guidance: float = 1.0,
             *, base: Tensor | None = None, x_T: Tensor | None = None,
             sampler: tuple[str, int] | None = None, start: int | None = None):
        """n samples with the chosen sampler and weights, with a progress bar -> images
        (n, C, H, W) and about 10 frames of the reverse chain. cond: the network's conditioning
        (default: the kind's unconditional one); base: what each sample is added to (a residual
        super-resolution model's bicubic image). x_T: the noise (default: fresh); sampler:
        (name, steps) instead of the flags' (eta 0, uniform spacing); start: x_T is at that
        timestep, and the sampler's steps shrink in proportion (image-to-image)."""
        a, model, T = self.sample, self.sampling_model(), self.diffusion.T
        cond = self.kind.unconditional(n, self.device) if cond is None else cond
        if x_T is None:
            x_T = torch.randn(n, self.model.img_channels, *hw(self.model.img_size),
                              device=self.device)
        name, steps = sampler or (a.sampler, a.steps)
        if start is not None:
            steps = max(1, math.ceil(steps * (start + 1) / T))
        eta, spacing = (a.eta, a.spacing) if sampler is None else (0.0, "uniform")
        model.eval()
        with self.progress() as progress, self.autocast():
            track = lambda ts: progress.track(ts, description=f"{desc} ({name})")
            x0, frames = self.diffusion.sample(
                model, x_T, name, steps, eta=eta, spacing=spacing, start=start,
                clip_x0=a.clip_x0, cond=cond, guidance=guidance, strips=10, track=track)
        model.train()
        if base is None:
            return x0, frames
        return base + x0, [base + f for f in frames]

    def draw_many(self, n: int, desc: str, inputs=lambda i, j: (None, None),
                  guidance: float = 1.0, *, seed: int | None = None, rank: int = 0,
                  world: int = 1) -> Tensor:
        """n samples drawn --batch-size at a time -> uint8 (n, C, H, W) on the CPU. inputs(i, j):
        (cond, base) of samples i..j-1 (None: the kind's unconditional ones, no base).
        seed: batch k is drawn from torch.manual_seed(seed + k), so that which process draws
        it does not matter; with world > 1 this process draws batches rank, rank + world, ...
        only (in that order)."""
        out, bs = [], self.batch_size
        for k, i in enumerate(range(0, n, bs)):
            if k % world != rank:
                continue
            j = min(i + bs, n)
            if seed is not None:
                torch.manual_seed(seed + k)
            cond, base = inputs(i, j)
            x0, _ = self.draw(j - i, f"{desc} {i}/{n}", cond, guidance, base=base)
            out.append(to_uint8(x0).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)
