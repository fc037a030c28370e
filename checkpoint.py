"""Checkpoints that describe themselves: the stored config (one dict) beside the weights, EMA,
optimizer, counters and RNG states, so `--loadckpt` alone rebuilds the model and a resumed run
goes on exactly as if it had never stopped. Read safely (weights_only), written atomically.
"""
import glob
import json
import math
import os
from dataclasses import dataclass

import torch

from config import UserError, config_of, size_name, sr_target_name, stored_config, validate
from data import atomic_write

FORMAT = 2  # 1: three dicts (model_config, diffusion_config, cond_config); still read
READABLE = (1, 2)
ROTATION = 5  # ckpt-0.pth .. ckpt-4.pth, by epoch


def latest(ckpt_dir: str) -> str:
    """The checkpoint in ckpt_dir with the most optimizer steps (the rotation may have wrapped,
    so names say nothing); on a tie the newer file."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "*.pth")):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            found.append((ckpt["step"], os.path.getmtime(path), path))
        except Exception:  # a damaged or foreign file is not a candidate
            continue
    if not found:
        raise UserError(f"--loadckpt latest: no readable checkpoint in {ckpt_dir}/")
    return max(found)[2]


def read(path: str, ckpt_dir: str) -> tuple[dict, str]:
    """Load a ddpm.py checkpoint safely (weights_only: opening it never runs code) -> (the
    checkpoint, the path it was found at). A bare name is also looked up in ckpt_dir; 'latest'
    is the one there with the most steps; a .safetensors file is an export (see export)."""
    if path == "latest":
        path = latest(ckpt_dir)
    if not os.path.exists(path) and os.path.dirname(path) == "":
        path = os.path.join(ckpt_dir, path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (also looked in {ckpt_dir}/)")
    if path.endswith(".safetensors"):
        return read_export(path), path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: damaged or not a ddpm.py checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE:
        raise UserError(f"{path} is not a ddpm.py checkpoint (format {FORMAT})")
    return ckpt, path


@dataclass
class RunState:
    """Where a training run stands, counting what is completed; saved in every checkpoint."""
    epoch: int = 0
    step: int = 0  # optimizer steps
    images_seen: int = 0
    best_fid: float = math.inf
    schedule_steps: int = 0  # the learning-rate schedule's length in steps (0: not yet set)


def state(a, run: RunState, weights: dict, vocab, data_gen: torch.Generator,
          device: torch.device) -> dict:
    """Everything a training checkpoint holds: the stored config, the recipe and length, the
    vocabulary, weights (Trainer.state_dict: model, EMA, optimizer, timestep sampler), the
    counters and the RNG states."""
    train = {"batch_size": a.batch_size, "grad_accum": a.grad_accum, "lr": a.lr,
             "lr_warmup": a.lr_warmup, "lr_schedule": a.lr_schedule, "hflip": a.hflip,
             "schedule_steps": run.schedule_steps, "ema_decay": a.ema_decay,
             "images_seen": run.images_seen}  # the recipe and length (--info, resume)
    return {"format": FORMAT, "config": config_of(a), "train": train,
            "text": vocab.state() if vocab else None, **weights, "epoch": run.epoch,
            "step": run.step, "best_fid": run.best_fid, "data_rng": data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def rotation_name(epoch_index: int) -> str:
    """The file of the checkpoint at the end of epoch epoch_index: ckpt-0.pth .. ckpt-4.pth."""
    return f"ckpt-{epoch_index % ROTATION}.pth"


def save(path: str, ckpt: dict, warn) -> str | None:
    """Write ckpt to path atomically -> path. A failed write (a full disk, no permission) is
    reported through warn, leaves the older checkpoints intact and returns None: training
    goes on."""
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except OSError as e:
        warn(f"warning: could not save {path}: {e.strerror or e}; the previous checkpoints are "
             f"intact and training goes on")
        return None
    return path


RECIPE = ("lr_warmup", "lr_schedule", "hflip")  # training flags a resume goes on with


def resume_recipe(a, ckpt: dict, typed: set[str]) -> None:
    """A resumed run goes on with its learning-rate warm-up and schedule and its flips, unless
    typed again."""
    train = ckpt.get("train", {})
    for k in RECIPE:
        if k in train and k not in typed:
            setattr(a, k, train[k])


def run_state(ckpt: dict, typed: set[str]) -> RunState:
    """The counters a checkpoint was saved at; a typed --max-steps sets the schedule anew."""
    train = ckpt.get("train", {})
    return RunState(epoch=ckpt["epoch"], step=ckpt["step"],
                    images_seen=train.get("images_seen", 0),
                    best_fid=ckpt.get("best_fid", math.inf),
                    schedule_steps=0 if "max_steps" in typed else train.get("schedule_steps", 0))


def restore_rng(ckpt: dict, data_gen: torch.Generator, device: torch.device) -> None:
    """A resumed training run's random streams, so that it goes on as if never stopped."""
    data_gen.set_state(ckpt["data_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def export(ckpt: dict, path: str) -> None:
    """The EMA weights as safetensors, the model's config (and vocabulary) in the metadata: the
    format the ecosystem shares weights in. No optimizer state, so it cannot resume training."""
    from safetensors.torch import save
    weights = {k: v.contiguous() for k, v in ckpt.get("ema", ckpt["model"]).items()}
    meta = {"format": "ddpm.py", "config": json.dumps(stored_config(ckpt)),
            "text": json.dumps(ckpt.get("text")), "epoch": str(ckpt["epoch"]),
            "step": str(ckpt["step"])}
    blob = save(weights, metadata=meta)  # bytes
    atomic_write(path, lambda f: f.write(blob))


def read_export(path: str) -> dict:
    """An exported .safetensors file -> a checkpoint dict (weights as both model and EMA)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: not a safetensors file ({e})") from None
    if meta.get("format") != "ddpm.py":
        raise UserError(f"{path} was not exported by ddpm.py (no model config in its metadata)")
    return {"format": FORMAT, "config": json.loads(meta["config"]),
            "text": json.loads(meta["text"]), "model": weights, "ema": weights,
            "epoch": int(meta["epoch"]), "step": int(meta["step"]), "exported": True}


def describe(ckpt: dict, path: str) -> list[str]:
    """What a checkpoint is, a few lines for --info."""
    c, train = stored_config(ckpt), ckpt.get("train", {})
    kind = ("super-resolution" if c["super_res"] else "text-conditioned" if ckpt.get("text")
            else "unconditional")
    params = sum(v.numel() for v in ckpt["model"].values())
    attn = [size_name(c["img_size"] >> i if isinstance(c["img_size"], int)
                      else [s >> i for s in c["img_size"]])
            for i, on in enumerate(c["has_attn"]) if on]
    sr = (f" from {c['super_res']} px, diffusing {sr_target_name(c['sr_target'])}"
          if c["super_res"] else "")
    lines = [f"{path}: {kind} ddpm.py model" + (" (exported weights: samples, cannot resume)"
                                                if ckpt.get("exported") else ""),
             f"  UNet: {params / 1e6:.2f} M parameters, width {c['num_channels']} x "
             f"{c['channel_multiples']}, {c['num_blocks']} blocks a level, self-attention at "
             + (f"{', '.join(attn)} px" if attn else "no level") + f", dropout {c['dropout']}"
             + (", learned variance" if c["learn_sigma"] else "")
             + (f", augmentation labels (trained with --augment {c['augment']})"
                if c["augment"] else ""),
             f"  images: {size_name(c['img_size'])} px{sr}, {c['img_channels']} channel(s)",
             f"  diffusion: T = {c['timesteps']}, {c['schedule']} schedule"
             + (f" (beta {c['beta_min']} .. {c['beta_max']})" if c["schedule"] == "linear" else "")
             + f", predicts {c['prediction']}",
             f"  trained: {ckpt['epoch']} epochs, {ckpt['step']} optimizer steps, "
             + (f"{train['images_seen']:,} images seen" if "images_seen" in train
                else "images seen not recorded")]
    if train:
        lines.append(f"  recipe: batch {train['batch_size']} x {train['grad_accum']} accumulated, "
                     f"lr {train['lr']} ({train['lr_schedule']}, warm-up {train['lr_warmup']} "
                     f"steps), EMA decay {train['ema_decay']}")
    best = ckpt.get("best_fid", math.inf)
    lines.append(f"  best FID: {best:.2f}" if math.isfinite(best) else "  best FID: not measured")
    if ckpt.get("text"):
        lines.append(f"  vocabulary: {len(ckpt['text']['words'])} words, captions of up to "
                     f"{ckpt['text']['max_len']} tokens")
    return lines


def inspect(a) -> None:
    """--info PATH: what a checkpoint is; --export FILE with --loadckpt: its EMA weights."""
    if a.info:
        ckpt, path = read(a.info, a.ckpt_save_dir)
        print("\n".join(describe(ckpt, path)))
        return
    validate(a)
    ckpt, path = read(a.loadckpt, a.ckpt_save_dir)
    export(ckpt, a.export)
    print(f"exported the EMA weights of {path} (step {ckpt['step']}) to {a.export}: they sample "
          f"(--loadckpt {a.export}) but hold no optimizer state, so they cannot resume training")
