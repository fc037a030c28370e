"""Drawing pictures with a trained model: the chosen sampler and weights, in batches, with a
progress bar, into PNG grids. A Drawer is what the feature modules (edit, prompts, superres,
evaluate, monitor) are given of a run: the flags, the device, the model kind and the diffusion.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from rich.console import Console
from torch import Tensor

import config
from data import hw, to_uint8
from text import Vocab
from ui import progress_bar


def grid(images: Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> Tensor:
    """uint8 (N, C, H, W) -> one uint8 (3, rows (H + padding) + padding, cols (W + padding) +
    padding) picture: nrow images a row (fewer if N is smaller), in order, on a pad_value
    background; one channel is shown as grey. A single image is returned as it is (C, H, W),
    unpadded, as torchvision's make_grid does."""
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    out = torch.full((3, rows * (h + padding) + padding, cols * (w + padding) + padding),
                     pad_value, dtype=torch.uint8)
    for i, img in enumerate(images.expand(-1, 3, -1, -1) if c == 1 else images):
        y, x = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        out[:, y:y + h, x:x + w] = img
    return out


def save_png(picture: Tensor, path: str) -> None:
    """uint8 (C, H, W) -> a PNG file."""
    hwc = np.ascontiguousarray(picture.permute(1, 2, 0).cpu().numpy())
    Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(path)


class Drawer:
    """Draws from a run's networks (trainer.Trainer: its ema or model, its diffusion). args: the
    flags; kind: the model kind (trainer.ModelKind); vocab: a text model's vocabulary;
    quiet: no progress bars (processes other than the first)."""

    def __init__(self, args, kind, trainer, console: Console, vocab: Vocab | None = None,
                 quiet: bool = False):
        self.args, self.kind, self.trainer, self.console = args, kind, trainer, console
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
                 os.path.join(self.args.save_dir, name))

    @property
    def sampler_name(self) -> str:
        """E.g. 'heun, 18 karras-spaced steps (35 network calls)' or 'ddpm, all T steps'."""
        a = self.args
        if a.sampler == "ddpm":
            return "ddpm, all T steps"
        n = len(self.diffusion.tau(a.sampler, config.sample_steps(a), a.spacing))
        calls = f" ({2 * n - 1} network calls)" if a.sampler == "heun" else ""
        eta = f", eta {a.eta}" if a.sampler == "ddim" else ""
        return f"{a.sampler}, {n} {a.spacing}-spaced steps{calls}{eta}"

    @property
    def weights_name(self) -> str:
        return "raw" if self.args.raw_weights else "EMA"

    def sampling_model(self) -> nn.Module:
        """The weights we sample and measure with: the EMA, or the raw ones (--raw-weights)."""
        return self.trainer.model if self.args.raw_weights else self.trainer.ema

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
        a, model, T = self.args, self.sampling_model(), self.diffusion.T
        cond = self.kind.unconditional(n, self.device) if cond is None else cond
        if x_T is None:
            x_T = torch.randn(n, a.img_channels, *hw(a.img_size), device=self.device)
        name, steps = sampler or (a.sampler, config.sample_steps(a))
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
        out, bs = [], self.args.batch_size
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
