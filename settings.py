"""The parsed flags -> the run's frozen Settings (core/configs.py): `resolve`, the one place
where the checkpoint's stored config and recipe and the derived values (what --resume and --demo
mean, the default sampler, the device) are worked out, then validation.py's checks. The flags
themselves, their defaults and help, are config.py's.
"""
import argparse
import dataclasses
import os

from config import DEMO_PRESET, stored_img_size, build_parser, stored_keys
from core import configs, spec
from ui import NoCheckpoint, UserError
from validation import validate


def resolve(args: argparse.Namespace, typed: set[str], read=None, *,
            cascade: bool = False) -> tuple[configs.Settings, dict | None]:
    """The run's Settings from the parsed flags: the one place where values are worked out,
    in this order, into new objects (the namespace is left as parsed; nothing changes the
    Settings after; the learning rate, when not given, waits for the network: with_lr).
      1. --resume is --train --loadckpt latest; --train --demo sets the preset's untyped flags.
         --distill trains; its --loadckpt is the teacher (with --resume: when the folder holds
         no checkpoint of its own).
      2. --img-size as stored (an int for a square); a super-resolution model of the residual
         predicts x0 and one of uniform-t losses draws t uniformly, unless typed.
      3. --loadckpt is read (read(path, ckpt_dir) -> (ckpt, its path)): its stored config
         wins over the flags (a typed flag that contradicts it is an error), and a run goes on
         with its recipe (checkpoint's `train`) unless typed again. --resume into a folder
         without checkpoints (read raises NoCheckpoint) starts a new run there. A new
         student takes the teacher's spec, made for --student-steps (_student_spec), and
         its hflip; a checkpoint with a teacher in it goes on distilling.
      4. The sampler where none is typed (_default_sampler), the device where --device auto.
      5. validation.validate: flags that cannot work are one-line errors.
    -> (Settings, the checkpoint read or None). cascade: the super-resolution stage of a
    cascade (validate)."""
    v = dict(vars(args))
    # --distill --loadckpt names the teacher; with --resume the folder's run is tried first.
    teacher = v["loadckpt"] if v["distill"] and "loadckpt" in typed else None
    if v["resume"] or v["distill"]:
        v["train"] = True
    if v["resume"]:
        v["loadckpt"] = "latest" if teacher else v["loadckpt"] or "latest"
    if v["train"] and v["demo"]:
        v.update({k: x for k, x in DEMO_PRESET.items() if k not in typed})
    v["img_size"] = stored_img_size(v["img_size"])
    if v["super_res"] and v["sr_target"] == "residual" and "prediction" not in typed:
        v["prediction"] = "x0"  # zero-initialised output = zero residual = bicubic
    if "t_sampling" not in typed and (v["super_res"] or v["learn_sigma"]
                                      or v["importance_sampling"]):
        v["t_sampling"] = "uniform"  # their losses are set up for uniform t, or draw t themselves
    ckpt = None
    if v["loadckpt"]:
        try:
            ckpt, v["loadckpt"] = read(v["loadckpt"], v["ckpt_save_dir"])
            teacher = None if v["resume"] else teacher  # the folder's run goes on
        except NoCheckpoint:
            if not v["resume"] or "loadckpt" in typed and not teacher:
                raise
            v["loadckpt"] = None  # the first launch of a resumable command: a new run
            if teacher:  # ... a new student, of this teacher
                ckpt, v["loadckpt"] = read(teacher, v["ckpt_save_dir"])
    if ckpt and teacher:
        folder = os.path.dirname(os.path.abspath(v["loadckpt"]))  # the teacher's
        if os.path.isdir(v["ckpt_save_dir"]) and os.path.samefile(folder, v["ckpt_save_dir"]):
            raise UserError(f"--distill: {v['ckpt_save_dir']}/ holds the teacher's run; give the "
                            f"student a --ckpt-save-dir of its own (e.g. "
                            f"{v['ckpt_save_dir'].rstrip('/')}-student)")
        _apply_stored(v, typed, _student_spec(v, typed, spec.stored_dict(ckpt), v["loadckpt"]))
        v.update({k: x for k, x in _recipe(ckpt, typed).items() if k == "hflip"})  # the data's
    elif ckpt:
        if "teacher" in ckpt and v["train"]:  # a distillation run goes on as one
            v["distill"] = True
        elif v["distill"]:
            raise UserError(f"{v['loadckpt']} is a diffusion model's run, not a distillation: "
                            f"to distil it, give --loadckpt {v['loadckpt']} without --resume "
                            f"and a --ckpt-save-dir of its own")
        if v["train"] and "optimizer" not in ckpt:
            raise UserError(f"{v['loadckpt']} holds exported weights without optimizer state: "
                            f"it samples, but training resumes only from a .pth checkpoint")
        _apply_stored(v, typed, spec.stored_dict(ckpt))
        v.update(_recipe(ckpt, typed))
    _default_sampler(v, typed)
    v["device"] = device_of(v["device"])
    validate(argparse.Namespace(**v), cascade=cascade)
    return settings_of(v), ckpt


def _student_spec(v: dict, typed: set[str], teacher: dict, path: str) -> dict:
    """The spec of a new student of the teacher (its stored spec): the teacher's, made for
    --student-steps (default: half the teacher's steps, 2 from a diffusion model), or UserError
    where it cannot be (which kinds of model can be distilled: validation)."""
    k = teacher["student_steps"]
    n = v["student_steps"] if "student_steps" in typed else k // 2 if k else 2
    if n < 1 or k and (n >= k or k % n):
        raise UserError(f"--student-steps {n}: a student of {path}, a student of {k} steps, "
                        f"takes fewer steps that divide {k} (e.g. {k // 2})" if k else
                        f"--student-steps must be at least 1, got {n}")
    return {**teacher, "student_steps": n}


def device_of(name: str) -> str:
    """--device as given, with auto: cuda where a GPU is visible, else cpu."""
    if name != "auto":
        return name
    import torch  # here, not at the top: --help and flag errors need no torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def settings_of(v: dict) -> configs.Settings:
    """Every flag's value (a dict by flag name) -> the Settings, each group into its part."""
    parts = {}
    for g in build_parser().flag_groups:
        parts.setdefault(g.part, {}).update({a.dest: v[a.dest] for a in g.actions})
    return configs.Settings(**{name: configs.PART_TYPES[name](**fields)
                               for name, fields in parts.items()})


def flat(settings: configs.Settings) -> dict:
    """Settings -> every flag's value by name (the inverse of settings_of)."""
    return {k: x for f in dataclasses.fields(settings)
            for k, x in dataclasses.asdict(getattr(settings, f.name)).items()}


def with_lr(settings: configs.Settings, default: float) -> configs.Settings:
    """The Settings with --lr `default` where none was given (nor by a resumed checkpoint): the
    default depends on the network's size (trainer.default_lr)."""
    if settings.train.lr is not None:
        return settings
    return dataclasses.replace(settings, train=dataclasses.replace(settings.train, lr=default))


def cascade_args(settings: configs.Settings, typed: set[str]) -> argparse.Namespace:
    """The flags of the cascade's second stage after a base model with these settings:
    --sr-ckpt loaded, the sampler flags shared, nothing else asked of it (resolve it with the
    flags typed & CASCADE_TYPED). The steps and spacing the base model's kind chose for itself
    (_default_sampler) are not passed on: the stage's own kind chooses."""
    own = {k: build_parser().get_default(k) for k in ("sample_steps", "spacing") if k not in typed}
    return argparse.Namespace(**{**flat(settings), **own, "loadckpt": settings.sample.sr_ckpt,
                                 "sr_ckpt": None, "prompt": None, "eval_fid": 0, "eval_bpd": 0})


CASCADE_TYPED = {"sample_steps", "spacing"}  # typed flags the stage is resolved with


# The training flags a resume goes on with (whatever the defaults are now), and the values of
# those that older checkpoints do not store: the only way they trained then.
RECIPE = ("lr", "lr_warmup", "lr_schedule", "hflip", "ema_decay", "min_snr_gamma", "t_sampling",
          "teacher_calls")
RECIPE_NOT_STORED = {"min_snr_gamma": 0.0, "t_sampling": "uniform"}


def _recipe(ckpt: dict, typed: set[str]) -> dict:
    """A loaded run's recipe (learning rate, its warm-up and schedule, flips, EMA decay, loss
    weighting and how t is drawn): what a resume goes on with, each unless typed again."""
    train = {**RECIPE_NOT_STORED, **ckpt.get("train", {})}
    return {k: train[k] for k in RECIPE if k in train and k not in typed}


def _default_sampler(v: dict, typed: set[str]) -> None:
    """Where no --sampler is typed: DPM-Solver++ (the flag's default), but the ancestral sampler
    for eps models (their deterministic samples can turn to noise: see --prediction) and for
    inpainting (it pastes the known region in after every step, which needs ddpm or ddim).
    A student of distillation draws with DDIM in the steps it was made for, its x0 unclipped
    (its step lands where the teacher's solve did only with the x0 it learned), unless typed."""
    if v["student_steps"]:
        defaults = {"sampler": "ddim", "sample_steps": v["student_steps"], "clip_x0": False}
        v.update({k: x for k, x in defaults.items() if k not in typed})
        return
    if "sampler" not in typed and (v["prediction"] == "eps" or v["mask_folder"] or v["mask_box"]):
        v["sampler"] = "ddpm"
    if v["sampler"] == "dpm++" and karras_ten_measured(v):
        if "spacing" not in typed:
            v["spacing"] = "karras"
        if v["spacing"] == "karras" and "sample_steps" not in typed:
            v["sample_steps"] = KARRAS_STEPS


# DPM-Solver++'s default for the models the default recipe trains: 10 Karras-spaced steps, as
# good as the finely solved ODE and better than 20 evenly spaced ones, in half the network calls
# (FID at 16 px, docs/results/distillation.md and samplers.md: 46.7 and 48.4 against 53.0 and
# 55.8 on two seeds, 70.0 against 77.2 on a third model). Elsewhere it was not measured: 20
# evenly spaced steps, as the flags' defaults say.
KARRAS_STEPS = 10


def karras_ten_measured(v: dict) -> bool:
    """Whether the model is of the kind the 10 Karras-spaced steps were measured on: a v target
    trained with log-normal t, unconditional (no captions, not super-resolution)."""
    return (v["prediction"] == "v" and v["t_sampling"] == "lognormal" and v["captions"] == "off"
            and not v["super_res"])


def is_default_model(model: spec.ModelSpec) -> bool:
    """Whether the model is the parser's default 64-px, 63 M-parameter UNet (its size flags)."""
    size = ("img_size", "num_channels", "channel_multiples", "num_blocks")
    return all(getattr(model, k) == getattr(spec.DEFAULTS, k) for k in size)


def _as_list(v):
    """Tuples and lists compare equal as lists (checkpoint configs store lists)."""
    return list(v) if isinstance(v, (list, tuple)) else v


def _apply_stored(v: dict, typed: set[str], stored: dict) -> None:
    """The checkpoint's architecture wins; a typed flag that disagrees with it is an error."""
    for k in stored_keys():
        if k == "augment" and k in typed and v[k] > 0 and stored[k] > 0:
            continue  # the probability may change; on or off is the architecture
        if k in typed and _as_list(v[k]) != _as_list(stored[k]):
            raise UserError(f"--{k.replace('_', '-')} {v[k]} contradicts the "
                            f"checkpoint ({stored[k]}); drop the flag")
        v[k] = stored[k]
