"""Checkpoints that describe themselves: the stored config (one dict) beside the weights, EMA,
optimizer, counters and RNG states, so `--loadckpt` alone rebuilds the model and a resumed run
goes on exactly as if it had never stopped. Read safely (weights_only), written atomically.
"""
import math
import os

import torch

from config import UserError, config_of
from data import atomic_write

FORMAT = 2  # 1: before the redesign (model_config, diffusion_config, cond_config); still read
READABLE = (1, 2)
ROTATION = 5  # ckpt-0.pth .. ckpt-4.pth, by epoch


def read(path: str, ckpt_dir: str) -> tuple[dict, str]:
    """Load a ddpm.py checkpoint safely (weights_only: opening it never runs code) -> (the
    checkpoint, the path it was found at). A bare name is also looked up in ckpt_dir."""
    if not os.path.exists(path) and os.path.dirname(path) == "":
        path = os.path.join(ckpt_dir, path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (also looked in {ckpt_dir}/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: damaged or not a ddpm.py checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE:
        raise UserError(f"{path} is not a ddpm.py checkpoint (format {FORMAT})")
    return ckpt, path


def state(prog) -> dict:
    """Everything a Program's checkpoint holds."""
    cuda = prog.device.type == "cuda"
    return {"format": FORMAT, "config": config_of(prog.args),
            "text": prog.vocab.state() if prog.vocab else None,
            "model": prog.model.state_dict(), "ema": prog.ema.state_dict(),
            "importance": prog.importance.state_dict() if prog.importance else None,
            "optimizer": prog.optimizer.state_dict(), "epoch": prog.epoch, "step": prog.step,
            "best_fid": prog.best_fid, "data_rng": prog.data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(prog.device) if cuda else None}


def save(prog, epoch_index: int, name: str = "") -> str | None:
    """Write ckpt-{epoch_index % 5}.pth (or `name`) into --ckpt-save-dir atomically -> its path.
    A failed write (a full disk, no permission) is reported, leaves the older checkpoints
    intact and returns None: training goes on. Only the first process writes."""
    if not prog.main:
        return None
    path = os.path.join(prog.args.ckpt_save_dir, name or f"ckpt-{epoch_index % ROTATION}.pth")
    try:
        atomic_write(path, lambda f: torch.save(state(prog), f))
    except OSError as e:
        prog.console.print(f"warning: could not save {path}: {e.strerror or e}; the previous "
                           f"checkpoints are intact and training goes on")
        return None
    return path


def restore(prog, ckpt: dict) -> None:
    """Weights, EMA, optimizer and counters; for training also the RNG states. --lr applies on
    resume (e.g. a lower one after a NaN stop)."""
    prog.model.load_state_dict(ckpt["model"])
    prog.ema.load_state_dict(ckpt.get("ema", ckpt["model"]))
    prog.optimizer.load_state_dict(ckpt["optimizer"])
    for group in prog.optimizer.param_groups:
        group["lr"] = prog.args.lr
    prog.epoch, prog.step = ckpt["epoch"], ckpt["step"]
    prog.best_fid = ckpt.get("best_fid", math.inf)
    if prog.importance and ckpt.get("importance"):
        prog.importance.load_state_dict(ckpt["importance"])
    if prog.args.train:
        prog.data_gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if prog.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], prog.device)
