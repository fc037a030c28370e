"""Super-resolution (SR3, Saharia et al. 2021): the model kind (its training input and target),
the cascade after a base model, upsampling a folder, and the comparison with bicubic (--eval-sr).

The model sees x_t and the bicubic-upsampled low-res image, noised with std a, and a itself
(noise-conditioning augmentation, Ho et al. 2022, Cascaded Diffusion, Sec. 4.1). It diffuses the
residual x_high - bicubic(x_low) (SRDiff, Li et al. 2022; --sr-target residual, predicting x0: a
zero output returns bicubic) or x_high itself (--sr-target image, as SR3).
"""
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from core.configs import DataConfig
from core.spec import ModelSpec
from features import evaluate
from ui import UserError
from data import downsample, load_folders, make_lowres, to_model, to_uint8, upsample


class SuperRes:
    """A super-resolution model from LOW px (the trainer.ModelKind interface). The network sees
    x_t beside the bicubic-upsampled low-res image with noise of std a added, and a itself;
    target "residual": it diffuses x_high - bicubic(x_low), and a sample becomes an image as
    bicubic + sample; "image": it diffuses x_high. preview_images: the images whose low-res versions
    the pictures drawn during training start from, uint8 (n, C, H, W) (on any device)."""

    name = "super-resolution"

    def __init__(self, low: int, channels: int, target: str, noise_max: float, noise: float,
                 preview_images: Tensor | None = None):
        self.low, self.channels, self.target = low, channels, target
        self.noise_max, self.noise, self.preview_images = noise_max, noise, preview_images

    def unet_inputs(self) -> dict:
        return {"lowres_channels": self.channels}

    def train_batch(self, x0: Tensor, tokens: Tensor | None, n: int, share: slice):
        """make_lowres(x0) + a z with a ~ U(0, --sr-noise-max) as input; the residual over
        make_lowres(x0), or x0, as target. x0: (B, C, H, W)."""
        level = torch.rand(n, device=x0.device)[share] * self.noise_max  # (B,)
        z = torch.randn(n, *x0.shape[1:], device=x0.device)[share]
        lowres = make_lowres(x0, self.low)
        target = x0 - lowres if self.target == "residual" else x0
        return target, {"lowres": lowres + level[:, None, None, None] * z, "noise_level": level}

    def unconditional(self, n: int, device):
        raise UserError("a super-resolution model samples from a low-res image, not from nothing")

    def sample_inputs(self, up: Tensor) -> tuple[dict, Tensor | None]:
        """The input at sampling for the upsampled low-res images up (B, C, H, W): up with noise
        of std a = --sr-noise, and a; the base a sample is added to (up itself for a residual
        model, without the noise; None for an image model)."""
        cond = {"lowres": up + self.noise * torch.randn_like(up),
                "noise_level": torch.full((len(up),), self.noise, device=up.device)}
        return cond, up if self.target == "residual" else None

    def preview(self, n: int, device) -> tuple[dict, Tensor | None]:
        """The first n preview images, made low-res, as the input of the training pictures."""
        images = to_model(self.preview_images[:n].to(device))
        return self.sample_inputs(make_lowres(images, self.low))


def super_resolve(drawer, low: Tensor) -> Tensor:
    """low (N, C, LOW, LOW) in [-1, 1] (or uint8) -> uint8 (N, C, H, W) samples of the SR model."""
    low = to_model(low) if low.dtype == torch.uint8 else low
    up = lambda i, j: upsample(low[i:j].to(drawer.device), drawer.model.img_size)  # noqa: E731
    return drawer.draw_many(len(low), "super-resolving",
                            lambda i, j: drawer.kind.sample_inputs(up(i, j)))


def save_sr(drawer, low: Tensor, high: Tensor, names: list[str]) -> None:
    """sr-<name>.png for each result, and sr-all.png: pairs (bicubic | ours), 4 pairs a row."""
    low = to_model(low) if low.dtype == torch.uint8 else low.float().cpu()
    for img, name in zip(high, names):
        drawer.save_grid(img[None], f"sr-{name}.png", nrow=1)
    pairs = torch.stack([to_uint8(upsample(low[:32], high.shape[-1])), high[:32]], 1)
    drawer.save_grid(pairs.flatten(0, 1), "sr-all.png", nrow=8)
    drawer.console.print(f"wrote {len(high)} super-resolved images ({low.shape[-1]} -> "
                         f"{high.shape[-1]} px) to {drawer.save_dir}/sr-*.png and sr-all.png "
                         f"(pairs: bicubic | ours)")


def sample_folder(drawer) -> None:
    """--lowres-folder DIR: super-resolve every image in DIR (resized to LOW)."""
    m = drawer.model
    images, paths = load_folders([drawer.sample.lowres_folder], m.super_res, m.img_channels,
                                 warn=drawer.console.print, keep_small=True, with_paths=True)
    save_sr(drawer, images, super_resolve(drawer, images),
            [os.path.splitext(os.path.basename(p))[0] for p in paths])


def check_cascade(base: ModelSpec, sr: ModelSpec, sr_ckpt: str) -> None:
    """The SR stage (model sr, from --sr-ckpt) must upsample what the base model draws."""
    if not sr.super_res:
        raise UserError(f"--sr-ckpt {sr_ckpt} is not a super-resolution model (it draws "
                        f"from noise); train one with --super-res LOW")
    if (sr.super_res, sr.img_channels) != (base.img_size, base.img_channels):
        raise UserError(f"--sr-ckpt {sr_ckpt} upsamples {sr.super_res} px, "
                        f"{sr.img_channels}-channel images, but this base model draws "
                        f"{base.img_size} px, {base.img_channels}-channel ones")


def evaluate_sr(drawer, source: DataConfig, n: int) -> dict:
    """On the first n images of --data-folders (held back from training): PSNR / SSIM and FID
    against the real images of our super-resolution and of bicubic upsampling, and
    sr-compare.png (rows: low-res, bicubic, ours, real)."""
    m, size = drawer.model, drawer.model.img_size
    real = load_folders(source.data_folders, size, m.img_channels, warn=drawer.console.print,
                        cache_dir=source.cache_dir)[:n]  # (n, C, H, W) uint8
    low = downsample(to_model(real), m.super_res)  # as training made its inputs
    out = {"bicubic": to_uint8(upsample(low, size)), "ours": super_resolve(drawer, low)}
    net = evaluate.InceptionFeatures(drawer.device)
    ref = evaluate.extract(real, net, drawer.batch_size, progress="real image features")
    rows = {}
    for name, images in out.items():
        psnr, ssim = evaluate.psnr_ssim(images, real)
        feats = evaluate.extract(images, net, drawer.batch_size, progress=f"{name} features")
        rows[name] = {"psnr": psnr, "ssim": ssim, **evaluate.score(feats, ref)}
        drawer.console.print(f"{name:8s} {m.super_res} -> {size} px on {len(real)} held-back "
                             f"images: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}, FID "
                             f"{rows[name]['fid']:.2f}, KID {rows[name]['kid'] * 1e3:.2f} x 1e-3")
    shown = [to_uint8(F.interpolate(low[:8], size=(size, size), mode="nearest")),
             out["bicubic"][:8], out["ours"][:8], real[:8]]
    drawer.save_grid(torch.cat(shown), "sr-compare.png", nrow=len(shown[0]))
    drawer.console.print(f"wrote {drawer.save_dir}/sr-compare.png (rows: {m.super_res} px "
                         f"input, bicubic, ours, real)")
    return rows
