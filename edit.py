"""Editing with a trained model (a drawing.Drawer): image-to-image (SDEdit, Meng et al.
2022), inpainting (RePaint, Lugmayr et al. 2022) and interpolation (DDIM inversion + slerp).
The maths (GaussianDiffusion.sample from a start timestep, .inpaint, .invert, slerp) is in
diffusion.py; here are the files, the batches and the pictures.
"""
import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from config import UserError, sample_steps
from data import DataError, SkipImage, load_folders, load_image, to_model, to_uint8
from diffusion import slerp


def prompt_cond(drawer, n: int) -> tuple[dict | None, float]:
    """A text model's edits follow the first --prompt at the first --guidance-scale."""
    a = drawer.args
    if not (drawer.vocab and a.prompt):
        return None, 1.0
    tokens = torch.tensor([drawer.vocab.encode(a.prompt[0])] * n, device=drawer.device)
    return {"tokens": tokens}, a.guidance_scale[0]


def init_images(drawer) -> tuple[Tensor, list[str]]:
    """The --init-folder images, decoded as training data -> float (N, C, S, S) and names."""
    a = drawer.args
    images, paths = load_folders([a.init_folder], a.img_size, a.img_channels,
                                 warn=drawer.console.print, keep_small=True, with_paths=True)
    return to_model(images), [os.path.splitext(os.path.basename(p))[0] for p in paths]


def img2img(drawer) -> Tensor:
    """SDEdit: x_t = q_sample(x0, t, eps) at t = strength T, denoised by the chosen sampler over
    the timesteps [0, t] only -> the results (N, C, S, S); edit-<name>.png and edit-all.png
    (rows: input | result). At strength 1 it is ordinary sampling from the same noise."""
    a, T = drawer.args, drawer.diffusion.T
    x0, names = init_images(drawer)
    start = max(round(a.strength * T) - 1, 0)
    out = []
    for i in range(0, len(x0), a.batch_size):
        batch = x0[i:i + a.batch_size].to(drawer.device)
        eps = torch.randn(batch.shape, device=drawer.device)  # drawn as Drawer.draw draws x_T
        t = torch.full((len(batch),), start, device=drawer.device)
        x_t = eps if start == T - 1 else drawer.diffusion.q_sample(batch, t, eps)
        cond, w = prompt_cond(drawer, len(batch))
        out.append(drawer.draw(len(batch), f"editing {i}..{i + len(batch) - 1}", cond, w,
                             x_T=x_t, start=start)[0])
    out = torch.cat(out)
    for img, name in zip(out, names):
        drawer.save_grid(img[None], f"edit-{name}.png", nrow=1)
    pairs = torch.stack([x0[:32].to(out.device), out[:32]], 1).flatten(0, 1)
    drawer.save_grid(pairs, "edit-all.png", nrow=8)
    drawer.console.print(f"wrote {len(out)} edited images (strength {a.strength}: from t = "
                         f"{start + 1} of {T}) to {a.save_dir}/edit-*.png and edit-all.png "
                         f"(pairs: input | result)")
    return out


def masks(drawer, names: list[str]) -> Tensor:
    """keep (N, 1, S, S) in {0, 1}: 1 = keep. From --mask-box (the box is filled) or one file per
    image in --mask-folder (same name, any image extension; white = keep, black = fill)."""
    a, s = drawer.args, drawer.args.img_size
    if a.mask_box:
        x0, y0, x1, y1 = a.mask_box
        keep = torch.ones(len(names), 1, s, s)
        keep[:, :, y0:y1, x0:x1] = 0
        return keep
    try:
        files = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(a.mask_folder))}
    except OSError as e:  # missing, not a folder, not readable
        raise UserError(f"--mask-folder {a.mask_folder}: {e.strerror or e}") from None
    out = []
    for name in names:
        if name not in files:
            raise UserError(f"no mask for {name} in {a.mask_folder} (a mask per image, same name)")
        path = os.path.join(a.mask_folder, files[name])
        try:
            with Image.open(path) as im:
                if im.size != (s, s):
                    raise UserError(f"mask {path} is {im.size[0]} x {im.size[1]}; the model "
                                    f"draws {s} x {s}: give masks of that size")
                grey = np.asarray(im.convert("L"), dtype=np.float32)
        except OSError:
            raise UserError(f"mask {path} is not an image that can be read") from None
        out.append(torch.from_numpy(grey >= 128).float()[None])
    return torch.stack(out)


def inpaint(drawer) -> Tensor:
    """RePaint on the --init-folder images with their masks -> the results (N, C, S, S);
    inpaint-<name>.png and inpaint-all.png (rows: input | masked | result)."""
    a = drawer.args
    x0, names = init_images(drawer)
    keep = masks(drawer, names)
    out, model = [], drawer.sampling_model()
    model.eval()
    for i in range(0, len(x0), a.batch_size):
        known = x0[i:i + a.batch_size].to(drawer.device)
        cond, w = prompt_cond(drawer, len(known))
        cond = drawer.kind.unconditional(len(known), drawer.device) if cond is None else cond
        with drawer.progress() as progress, drawer.autocast():
            track = lambda ts: progress.track(ts, description=f"inpainting {i}.. ({a.sampler})")
            out.append(drawer.diffusion.inpaint(
                model, torch.randn_like(known), known, keep[i:i + a.batch_size].to(drawer.device),
                a.sampler, sample_steps(drawer.args), resample=a.resample, eta=a.eta,
                clip_x0=a.clip_x0, cond=cond, guidance=w, track=track))
    out = torch.cat(out)
    for img, name in zip(out, names):
        drawer.save_grid(img[None], f"inpaint-{name}.png", nrow=1)
    masked = x0 * keep  # the filled region shown mid-grey (0)
    rows = torch.stack([x0[:24], masked[:24], out[:24].cpu()], 1).flatten(0, 1)
    drawer.save_grid(rows, "inpaint-all.png", nrow=6)
    drawer.console.print(f"wrote {len(out)} inpainted images ({a.sampler}, resample {a.resample}) "
                         f"to {a.save_dir}/inpaint-*.png and inpaint-all.png (triples: input | "
                         f"masked | result)")
    return out


def interpolate(drawer) -> Tensor:
    """--interpolate A B: both images to noise by DDIM inversion; --interpolate-seeds S1 S2: the
    noise of two seeds. Then --frames noises slerped from one to the other, each decoded with
    DDIM (eta 0), --batch-size at a time -> uint8 (frames, C, S, S) on the CPU;
    interpolation.png, one strip."""
    a, c, s = drawer.args, drawer.args.img_channels, drawer.args.img_size
    steps = sample_steps(drawer.args) if a.sampler == "ddim" else 50
    model = drawer.sampling_model()
    cond, w = prompt_cond(drawer, 1)
    if a.interpolate:
        images = []
        for path in a.interpolate:
            if not os.path.isfile(path):
                raise DataError(f"--interpolate {path}: no such file")
            try:
                images.append(load_image(path, s, c, keep_small=True))
            except SkipImage as e:
                raise DataError(f"--interpolate {path}: {e}") from None
        x0 = to_model(torch.from_numpy(np.stack(images))).to(drawer.device)  # (2, C, S, S)
        model.eval()
        ends = drawer.diffusion.invert(model, x0, steps,
                                       cond=drawer.kind.unconditional(2, drawer.device))
    else:
        ends = torch.stack([torch.randn(c, s, s, generator=torch.Generator().manual_seed(seed))
                            for seed in a.interpolate_seeds]).to(drawer.device)
    frames = []
    for i in range(0, a.frames, a.batch_size):  # --batch-size frames at a time: bounded memory
        ks = range(i, min(i + a.batch_size, a.frames))
        noise = torch.stack([slerp(ends[0], ends[1], k / (a.frames - 1)) for k in ks])
        part = None if cond is None else {"tokens": cond["tokens"].expand(len(ks), -1)}
        x0, _ = drawer.draw(len(ks), f"interpolating {i}..{ks[-1]}", part, w, x_T=noise,
                            sampler=("ddim", steps))
        frames.append(to_uint8(x0).cpu())
    frames = torch.cat(frames)  # uint8 (frames, C, S, S)
    drawer.save_grid(frames, "interpolation.png", nrow=a.frames)
    what = " -> ".join(a.interpolate) if a.interpolate else \
        f"seed {a.interpolate_seeds[0]} -> seed {a.interpolate_seeds[1]}"
    drawer.console.print(f"wrote {a.save_dir}/interpolation.png: {a.frames} frames, {what} "
                         f"(DDIM, {steps} steps{', inverted' if a.interpolate else ''})")
    return frames
