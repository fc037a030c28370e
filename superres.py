"""Super-resolution (SR3, Saharia et al. 2021) around a ddpm.py Program: the training input, the
cascade after a base model, upsampling a folder, and the comparison with bicubic (--eval-sr).

The model sees x_t and the bicubic-upsampled low-res image, noised with std a, and a itself
(noise-conditioning augmentation, Ho et al. 2022, Cascaded Diffusion, Sec. 4.1). It diffuses the
residual x_high - bicubic(x_low) (SRDiff, Li et al. 2022; --sr-target residual, predicting x0: a
zero output returns bicubic) or, as checkpoints before issue 20 do, x_high itself.
"""
import os

import torch
import torch.nn.functional as F
from torch import Tensor

import evaluate
from config import UserError
from data import downsample, load_folders, make_lowres, to_model, to_uint8, upsample


def train_cond(prog, x0: Tensor, n: int, share: slice) -> dict:
    """A training batch's input: make_lowres(x0) + a z with a ~ U(0, --sr-noise-max), and a.
    Draws are for the global batch of n, this process's share taken. x0: (B, C, H, W)."""
    aug = torch.rand(n, device=prog.device)[share] * prog.args.sr_noise_max  # (B,)
    z = torch.randn(n, *x0.shape[1:], device=prog.device)[share]
    return {"lowres": make_lowres(x0, prog.args.super_res) + aug[:, None, None, None] * z, "aug": aug}


def train_target(prog, x0: Tensor) -> Tensor:
    """What a training batch x0 (B, C, H, W) diffuses: the residual x0 - make_lowres(x0), or x0."""
    return x0 - make_lowres(x0, prog.args.super_res) if prog.args.sr_target == "residual" else x0


def sample_cond(prog, up: Tensor) -> dict:
    """The input at sampling: the upsampled low-res image up (B, C, H, W) with noise of std
    a = --sr-noise, and a; for a residual model also the base the sample is added to (up itself,
    without the noise; Program.draw adds it)."""
    level = prog.args.sr_noise
    cond = {"lowres": up + level * torch.randn_like(up),
            "aug": torch.full((len(up),), level, device=up.device)}
    return {**cond, "base": up} if prog.args.sr_target == "residual" else cond


def strip_cond(prog, n: int) -> dict:
    """The conditioning of the training-time strips: the first n training images, made low-res."""
    return sample_cond(prog, make_lowres(to_model(prog.data.images[:n]), prog.args.super_res))


def super_resolve(prog, low: Tensor) -> Tensor:
    """low (N, C, LOW, LOW) in [-1, 1] (or uint8) -> uint8 (N, C, H, W) samples of the SR model."""
    low = to_model(low) if low.dtype == torch.uint8 else low
    up = lambda i, j: upsample(low[i:j].to(prog.device), prog.args.img_size)  # noqa: E731
    return prog.draw_many(len(low), "super-resolving", lambda i, j: sample_cond(prog, up(i, j)))


def save_sr(prog, low: Tensor, high: Tensor, names: list[str]) -> None:
    """sr-<name>.png for each result, and sr-all.png: pairs (bicubic | ours), 4 pairs a row."""
    low = to_model(low) if low.dtype == torch.uint8 else low.float().cpu()
    for img, name in zip(high, names):
        prog.save_grid(img[None], f"sr-{name}.png", nrow=1)
    pairs = torch.stack([to_uint8(upsample(low[:32], high.shape[-1])), high[:32]], 1)
    prog.save_grid(pairs.flatten(0, 1), "sr-all.png", nrow=8)
    prog.console.print(f"wrote {len(high)} super-resolved images ({low.shape[-1]} -> "
                       f"{high.shape[-1]} px) to {prog.args.save_dir}/sr-*.png and sr-all.png "
                       f"(pairs: bicubic | ours)")


def sample_folder(prog) -> None:
    """--lowres-folder DIR: super-resolve every image in DIR (resized to LOW)."""
    a = prog.args
    images, paths = load_folders([a.lowres_folder], a.super_res, a.img_channels,
                                 warn=prog.console.print, keep_small=True, with_paths=True)
    save_sr(prog, images, super_resolve(prog, images),
            [os.path.splitext(os.path.basename(p))[0] for p in paths])


def cascade(prog):
    """The cascade's second stage after the base model `prog`: a Program around --sr-ckpt (its
    stored flags from that checkpoint; the sampler flags shared), checked to fit the base."""
    a = prog.args
    sr = type(prog)(type(a)(**{**vars(a), "loadckpt": a.sr_ckpt, "sr_ckpt": None, "prompt": None,
                            "eval_fid": 0, "eval_bpd": 0}), set(), cascade=True)
    if not sr.args.super_res:
        raise UserError(f"--sr-ckpt {a.sr_ckpt} is not a super-resolution model (it draws "
                        f"from noise); train one with --super-res LOW")
    low, c = sr.args.super_res, sr.args.img_channels
    if (low, c) != (a.img_size, a.img_channels):
        raise UserError(f"--sr-ckpt {a.sr_ckpt} upsamples {low} px, {c}-channel images, but this "
                        f"base model draws {a.img_size} px, {a.img_channels}-channel ones")
    return sr


def evaluate_sr(prog, n: int) -> dict:
    """On the first n images of --data-folders (held back from training): PSNR / SSIM and FID
    against the real images of our super-resolution and of bicubic upsampling, and
    sr-compare.png (rows: low-res, bicubic, ours, real)."""
    a, size = prog.args, prog.args.img_size
    real = load_folders(a.data_folders, size, a.img_channels, warn=prog.console.print,
                        cache_dir=a.cache_dir)[:n]  # (n, C, H, W) uint8
    low = downsample(to_model(real), a.super_res)  # as training made its inputs
    out = {"bicubic": to_uint8(upsample(low, size)), "ours": super_resolve(prog, low)}
    net = evaluate.InceptionFeatures(prog.device)
    ref = evaluate.extract(real, net, a.batch_size, progress="real image features")
    rows = {}
    for name, images in out.items():
        psnr, ssim = evaluate.psnr_ssim(images, real)
        feats = evaluate.extract(images, net, a.batch_size, progress=f"{name} features")
        rows[name] = {"psnr": psnr, "ssim": ssim, **evaluate.score(feats, ref)}
        prog.console.print(f"{name:8s} {a.super_res} -> {size} px on {len(real)} held-back "
                           f"images: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}, FID "
                           f"{rows[name]['fid']:.2f}, KID {rows[name]['kid'] * 1e3:.2f} x 1e-3")
    shown = [to_uint8(F.interpolate(low[:8], size=(size, size), mode="nearest")),
             out["bicubic"][:8], out["ours"][:8], real[:8]]
    prog.save_grid(torch.cat(shown), "sr-compare.png", nrow=len(shown[0]))
    prog.console.print(f"wrote {a.save_dir}/sr-compare.png (rows: {a.super_res} px input, "
                       f"bicubic, ours, real)")
    return rows
