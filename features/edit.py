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

from core.configs import EditConfig
from ui import UserError
from data import DataError, SkipImage, load_folders, load_image, to_model, to_uint8
from core.diffusion import slerp


def prompt_cond(drawer, n: int) -> tuple[dict | None, float]:
    """A text model's edits follow the first --prompt at the first --guidance-scale."""
    if not (drawer.vocab and drawer.sample.prompt):
        return None, 1.0
    tokens = torch.tensor([drawer.vocab.encode(drawer.sample.prompt[0])] * n, device=drawer.device)
    return {"tokens": tokens}, drawer.sample.guidance_scale[0]


def init_images(drawer, folder: str) -> tuple[Tensor, list[str]]:
    """The --init-folder images, decoded as training data -> float (N, C, S, S) and names."""
    images, paths = load_folders([folder], drawer.model.img_size, drawer.model.img_channels,
                                 warn=drawer.console.print, keep_small=True, with_paths=True)
    return to_model(images), [os.path.splitext(os.path.basename(p))[0] for p in paths]


def img2img(drawer, edit: EditConfig) -> Tensor:
    """SDEdit: x_t = q_sample(x0, t, eps) at t = strength T, denoised by the chosen sampler over
    the timesteps [0, t] only -> the results (N, C, S, S); edit-<name>.png and edit-all.png
    (rows: input | result). At strength 1 it is ordinary sampling from the same noise."""
    T = drawer.diffusion.T
    x0, names = init_images(drawer, edit.init_folder)
    start = max(round(edit.strength * T) - 1, 0)
    out = []
    for i in range(0, len(x0), drawer.batch_size):
        batch = x0[i:i + drawer.batch_size].to(drawer.device)
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
    drawer.console.print(f"wrote {len(out)} edited images (strength {edit.strength}: from t = "
                         f"{start + 1} of {T}) to {drawer.save_dir}/edit-*.png and edit-all.png "
                         f"(pairs: input | result)")
    return out


def masks(drawer, edit: EditConfig, names: list[str]) -> Tensor:
    """keep (N, 1, S, S) in {0, 1}: 1 = keep. From --mask-box (the box is filled) or one file per
    image in --mask-folder (same name, any image extension; white = keep, black = fill)."""
    s = drawer.model.img_size
    if edit.mask_box:
        x0, y0, x1, y1 = edit.mask_box
        keep = torch.ones(len(names), 1, s, s)
        keep[:, :, y0:y1, x0:x1] = 0
        return keep
    try:
        files = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(edit.mask_folder))}
    except OSError as e:  # missing, not a folder, not readable
        raise UserError(f"--mask-folder {edit.mask_folder}: {e.strerror or e}") from None
    out = []
    for name in names:
        if name not in files:
            raise UserError(f"no mask for {name} in {edit.mask_folder} (a mask per image, same "
                            f"name)")
        path = os.path.join(edit.mask_folder, files[name])
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


def inpaint(drawer, edit: EditConfig) -> Tensor:
    """RePaint on the --init-folder images with their masks -> the results (N, C, S, S);
    inpaint-<name>.png and inpaint-all.png (rows: input | masked | result)."""
    x0, names = init_images(drawer, edit.init_folder)
    keep = masks(drawer, edit, names)
    out, model, s, bs = [], drawer.sampling_model(), drawer.sample, drawer.batch_size
    model.eval()
    for i in range(0, len(x0), bs):
        known = x0[i:i + bs].to(drawer.device)
        cond, w = prompt_cond(drawer, len(known))
        cond = drawer.kind.unconditional(len(known), drawer.device) if cond is None else cond
        with drawer.progress() as progress, drawer.autocast():
            track = lambda ts: progress.track(ts, description=f"inpainting {i}.. ({s.sampler})")
            out.append(drawer.diffusion.inpaint(
                model, torch.randn_like(known), known, keep[i:i + bs].to(drawer.device),
                s.sampler, s.steps, resample=edit.resample, eta=s.eta, clip_x0=s.clip_x0,
                cond=cond, guidance=w, track=track))
    out = torch.cat(out)
    for img, name in zip(out, names):
        drawer.save_grid(img[None], f"inpaint-{name}.png", nrow=1)
    masked = x0 * keep  # the filled region shown mid-grey (0)
    rows = torch.stack([x0[:24], masked[:24], out[:24].cpu()], 1).flatten(0, 1)
    drawer.save_grid(rows, "inpaint-all.png", nrow=6)
    drawer.console.print(f"wrote {len(out)} inpainted images ({s.sampler}, resample "
                         f"{edit.resample}) to {drawer.save_dir}/inpaint-*.png and inpaint-all.png "
                         f"(triples: input | masked | result)")
    return out


def interpolate(drawer, edit: EditConfig) -> Tensor:
    """--interpolate A B: both images to noise by DDIM inversion; --interpolate-seeds S1 S2: the
    noise of two seeds. Then --frames noises slerped from one to the other, each decoded with
    DDIM (eta 0), --batch-size at a time -> uint8 (frames, C, S, S) on the CPU;
    interpolation.png, one strip."""
    c, s = drawer.model.img_channels, drawer.model.img_size
    steps = drawer.sample.steps if drawer.sample.sampler == "ddim" else 50
    model = drawer.sampling_model()
    cond, w = prompt_cond(drawer, 1)
    if edit.interpolate:
        images = []
        for path in edit.interpolate:
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
                            for seed in edit.interpolate_seeds]).to(drawer.device)
    frames = []
    for i in range(0, edit.frames, drawer.batch_size):  # --batch-size at a time: bounded memory
        ks = range(i, min(i + drawer.batch_size, edit.frames))
        noise = torch.stack([slerp(ends[0], ends[1], k / (edit.frames - 1)) for k in ks])
        part = None if cond is None else {"tokens": cond["tokens"].expand(len(ks), -1)}
        x0, _ = drawer.draw(len(ks), f"interpolating {i}..{ks[-1]}", part, w, x_T=noise,
                            sampler=("ddim", steps))
        frames.append(to_uint8(x0).cpu())
    frames = torch.cat(frames)  # uint8 (frames, C, S, S)
    drawer.save_grid(frames, "interpolation.png", nrow=edit.frames)
    what = " -> ".join(edit.interpolate) if edit.interpolate else \
        f"seed {edit.interpolate_seeds[0]} -> seed {edit.interpolate_seeds[1]}"
    drawer.console.print(f"wrote {drawer.save_dir}/interpolation.png: {edit.frames} frames, {what} "
                         f"(DDIM, {steps} steps{', inverted' if edit.interpolate else ''})")
    return frames
