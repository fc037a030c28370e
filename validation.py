"""The checks of a run's flags, after a checkpoint's stored config is applied: values that cannot
work and flags that do not go together -> UserError, one line that says what to change. Nothing
here imports torch.
"""
import argparse
import math

from core.spec import hw, size_name
from ui import UserError

# --eval-prompts' colour classifier (tags.TagClassifier) halves the image three times: it
# takes images of this side and up.
TAG_MIN_SIDE = 16


def validate(a: argparse.Namespace, cascade: bool = False) -> None:
    """Reject flags that cannot work, with a message that says what to change. Run after a
    checkpoint's stored config is applied; cascade: a super-resolution stage after a base model."""
    _check_values(a)
    _check_task(a, cascade)


def _check_values(a: argparse.Namespace) -> None:
    for name in ("num_channels", "num_blocks", "timesteps", "epochs", "batch_size",
                 "demo_images", "grad_accum"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if min(hw(a.img_size)) <= 0:
        raise UserError(f"--img-size must be positive, got {size_name(a.img_size)}")
    if a.data_memory is not None and not a.data_memory > 0:
        raise UserError(f"--data-memory must be positive (MiB), got {a.data_memory}")
    if any(m <= 0 for m in a.channel_multiples):
        raise UserError(f"--channel-multiples must be positive, got {a.channel_multiples}")
    if len(a.has_attn) != len(a.channel_multiples):
        raise UserError(f"--has-attn needs one t/f per --channel-multiples entry "
                        f"({len(a.channel_multiples)}), got {len(a.has_attn)}")
    f = 2 ** (len(a.channel_multiples) - 1)
    if any(s % f for s in hw(a.img_size)):
        raise UserError(f"--img-size {size_name(a.img_size)} must be divisible by {f} for "
                        f"{len(a.channel_multiples)} levels; change it or use fewer multiples")
    if not 0 < a.beta_min < a.beta_max < 1:
        raise UserError(f"need 0 < --beta-min < --beta-max < 1, got {a.beta_min}, {a.beta_max}")
    if not 0 <= a.augment <= 1:
        raise UserError(f"--augment is a probability in [0, 1], got {a.augment}")
    if not 0 <= a.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.teacher_calls < 1:
        raise UserError(f"--teacher-calls must be at least 1, got {a.teacher_calls}")
    if a.sample_steps is not None and a.sample_steps <= 0:
        raise UserError(f"--sample-steps must be positive, got {a.sample_steps}")
    if a.sampler == "ddpm" and (a.sample_steps or a.spacing != "uniform"):
        raise UserError("--sampler ddpm always takes all T steps; use --sampler ddim, dpm++ or "
                        "heun with --sample-steps or --spacing")
    # KID averages a kernel over pairs of distinct samples: it needs two at least.
    if min(a.eval_fid, a.eval_every, a.eval_bpd) < 0 or a.eval_fid == 1 or a.eval_samples < 2:
        raise UserError("--eval-every and --eval-bpd must be >= 0, --eval-fid 0 (off) or >= 2, "
                        "--eval-samples >= 2")
    if not 0 <= a.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
    _check_numbers(a)
    if min(a.max_steps, a.lr_warmup) < 0 or (a.sample_every is not None and a.sample_every < 0):
        raise UserError("--max-steps, --lr-warmup and --sample-every must be >= 0")
    if a.max_minutes is not None and not (math.isfinite(a.max_minutes) and a.max_minutes > 0):
        raise UserError(f"--max-minutes must be a positive number of minutes, got {a.max_minutes}")
    if a.save_every < 0 or not (math.isfinite(a.save_every_minutes) and a.save_every_minutes >= 0):
        raise UserError(f"--save-every and --save-every-minutes must be >= 0 (0 = off), got "
                        f"{a.save_every} and {a.save_every_minutes}")
    if not 0 <= a.cond_drop <= 1 or not a.sr_noise >= 0 or not a.sr_noise_max >= 0 \
            or a.eval_sr < 0:  # "not x >= 0" also refuses NaN
        raise UserError("need 0 <= --cond-drop <= 1, and --sr-noise, --sr-noise-max, --eval-sr >= 0")
    if a.super_res and a.captions != "off":
        raise UserError("a model is either text-conditioned (--captions) or super-resolution "
                        "(--super-res), not both")
    if a.super_res and not isinstance(a.img_size, int):
        raise UserError(f"super-resolution models are square: --img-size takes one number, "
                        f"got {size_name(a.img_size)}")
    if a.super_res and not 0 < a.super_res < a.img_size:
        raise UserError(f"--super-res {a.super_res} must be between 0 and --img-size "
                        f"{a.img_size} (the low and the high resolution)")


def _check_numbers(a: argparse.Namespace) -> None:
    """Real-valued training and sampling flags; NaN fails every comparison, so each test is
    written as the range the value must lie in."""
    if a.lr is not None and not (math.isfinite(a.lr) and a.lr > 0):
        raise UserError(f"--lr must be a positive number, got {a.lr}")
    if not a.grad_clip > 0:  # 0 would zero every gradient, a negative one flip its sign
        raise UserError(f"--grad-clip is the largest gradient norm and must be > 0 (inf: no "
                        f"clipping), got {a.grad_clip}")
    if not (math.isfinite(a.min_snr_gamma) and a.min_snr_gamma >= 0):
        raise UserError(f"--min-snr-gamma must be >= 0 (0 = off; 5 is typical), got "
                        f"{a.min_snr_gamma}")
    if a.t_sampling != "uniform" and a.importance_sampling:
        raise UserError(f"--t-sampling {a.t_sampling} and --importance-sampling both say how to "
                        f"draw t: give one")
    # DDIM's sigma = eta sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s) stays within the
    # sqrt(1 - ab_s) the step has room for only for eta <= 1 (Song et al. 2021, Eq. 16).
    if not 0 <= a.eta <= 1:
        raise UserError(f"--eta must be in [0, 1] (0 = deterministic DDIM, 1 = ancestral-like), "
                        f"got {a.eta}")
    bad = [w for w in a.guidance_scale if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise UserError(f"--guidance-scale must be >= 0 (0 = unconditional, 1 = plain "
                        f"conditional), got {bad[0]}")


def _check_task(a: argparse.Namespace, cascade: bool) -> None:
    """What to do, and whether this kind of model (base, text, super-resolution) can do it."""
    if (a.eval_fid or a.eval_every) and not a.data_folders:
        raise UserError("FID is measured against image folders: give --data-folders DIR")
    if a.eval_sr and not a.data_folders:
        raise UserError("--eval-sr measures held-back real images: give --data-folders DIR")
    if a.eval_bpd and not (a.data_folders or a.demo):
        raise UserError("--eval-bpd measures training images: give --data-folders DIR or --demo")
    if a.export and not a.loadckpt:
        raise UserError("--export writes a checkpoint's weights: give --loadckpt PATH")
    if a.export and not a.export.endswith(".safetensors"):
        raise UserError(f"--export {a.export}: the file name must end in .safetensors")
    if a.train:
        if a.export:
            raise UserError("--export and --train do different things: give one of them")
        if a.start_over and a.resume:
            raise UserError("--start-over begins a new run, --resume continues the folder's: "
                            "give one of them")
        if a.distill:
            _check_distill(a)
        if not a.demo and not a.data_folders:
            raise UserError("--train needs --data-folders DIR (or --demo for built-in faces)"
                            if not a.loadckpt else "resuming with --loadckpt needs the "
                            "--data-folders to train on (or --demo)")
        if a.captions != "off" and a.demo:
            raise UserError("--captions reads captions beside images: give --data-folders DIR")
        if a.super_res and a.eval_every:  # its samples start from low-res images, not noise
            raise UserError("--eval-every measures samples drawn from noise; a super-resolution "
                            "model is measured against held-back images: train without it, "
                            "then --loadckpt PATH --eval-sr N")
        return
    if a.start_over:
        raise UserError("--start-over begins a training run into --ckpt-save-dir: give --train")
    if not a.loadckpt:
        raise UserError("nothing to do: give --train to train, or --loadckpt PATH to sample")
    name, sr = a.loadckpt, f"a super-resolution model ({a.super_res} -> {a.img_size} px)"
    if a.super_res and not cascade:
        if a.prompt or a.sr_ckpt or a.eval_fid or a.eval_bpd or a.eval_prompts:
            raise UserError(f"{name} is {sr}: it takes --lowres-folder DIR or --eval-sr N, or goes "
                            f"in a cascade as --sr-ckpt after a base model")
        if not (a.lowres_folder or a.eval_sr):
            raise UserError(f"{name} is {sr}: give --lowres-folder DIR to upsample a folder of "
                            f"images, or use it as --sr-ckpt after a base model's --loadckpt")
    elif not a.super_res and (a.lowres_folder or a.eval_sr):
        raise UserError(f"{name} is not a super-resolution model (it draws {a.img_size} px "
                        f"images from noise); --lowres-folder and --eval-sr need one trained "
                        f"with --super-res")
    _check_edit(a, name)
    if (a.prompt or a.eval_prompts) and a.captions == "off":
        raise UserError(f"{name} is not text-conditioned (trained without --captions): drop "
                        f"--prompt / --eval-prompts")
    if a.eval_prompts and min(hw(a.img_size)) < TAG_MIN_SIDE:
        raise UserError(f"{name} draws {size_name(a.img_size)} px images; the colour classifier "
                        f"of --eval-prompts needs {TAG_MIN_SIDE} px and up")


def _check_distill(a: argparse.Namespace) -> None:
    """--distill: a teacher, of a kind progressive distillation makes students of."""
    if not a.loadckpt:
        raise UserError("--distill makes a student of a trained model: give --loadckpt TEACHER "
                        "(a checkpoint, or an exported .safetensors)")
    if a.prediction == "eps":
        raise UserError(f"--distill: {a.loadckpt} predicts eps; a student needs a v model (the "
                        f"default) or an x0 one: at pure noise an eps model's x0 is its error "
                        f"times 1 / sqrt(ab_T)")
    if a.captions != "off" or a.super_res:
        what = ("text-conditioned (its student would need guidance distilled too)"
                if a.captions != "off" else "a super-resolution model (its steps start from "
                "a low-res image, not from noise)")
        raise UserError(f"--distill makes students of models that draw from noise alone; "
                        f"{a.loadckpt} is {what}")
    if a.importance_sampling:
        raise UserError("--importance-sampling draws the timesteps of diffusion training; a "
                        "student trains on its own steps: drop it")


def _check_edit(a: argparse.Namespace, name: str) -> None:
    """Editing flags (image-to-image, inpainting, interpolation) that cannot work."""
    editing = a.init_folder or a.interpolate or a.interpolate_seeds
    if (a.mask_folder or a.mask_box) and not a.init_folder:
        raise UserError("--mask-folder / --mask-box mark what to fill in the --init-folder images: "
                        "give --init-folder DIR")
    if not editing:
        return
    if a.super_res:
        raise UserError(f"{name} is a super-resolution model: --init-folder and --interpolate "
                        f"need a model that draws from noise")
    if not isinstance(a.img_size, int):
        raise UserError(f"{name} draws {size_name(a.img_size)} images: editing (--init-folder, "
                        f"--interpolate) works with square models only")
    if sum(map(bool, (a.init_folder, a.interpolate, a.interpolate_seeds))) > 1:
        raise UserError("give one of --init-folder, --interpolate, --interpolate-seeds")
    if not 0 < a.strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {a.strength}")
    if a.resample < 1 or a.frames < 2:
        raise UserError("--resample must be >= 1 and --frames >= 2")
    if (a.mask_folder or a.mask_box) and a.sampler not in ("ddpm", "ddim"):
        raise UserError(f"inpainting takes --sampler ddpm or ddim (not {a.sampler}): it pastes "
                        f"the known region in after every step")
    if a.mask_box and not (0 <= a.mask_box[0] < a.mask_box[2] <= a.img_size
                           and 0 <= a.mask_box[1] < a.mask_box[3] <= a.img_size):
        raise UserError(f"--mask-box {' '.join(map(str, a.mask_box))} must lie within the "
                        f"{a.img_size} x {a.img_size} image, x0 < x1 and y0 < y1")
