"""The command line: every ddpm.py flag, declared once with its default and help, in groups; the
--demo preset; and `resolve`, the one place where the parsed flags, the checkpoint's stored
config and the derived values (the device, the default sampler, what --resume and --demo mean)
become the run's frozen Settings (core/configs.py; their checks: validation.py).

Each flag group fills one part of the Settings (its `part`). The flags of the model, diffusion
and conditioning groups are the fields of spec.ModelSpec and take their defaults from it: they
are saved in every checkpoint as one dict (`config`), and loading a checkpoint sets them, so
`--loadckpt ckpt-4.pth` alone rebuilds the model. Nothing here imports torch at the top, so that
`--help` and flag errors answer at once.
"""
import argparse
import sys

from core import configs, spec
from ui import UserError

STORED_GROUPS = ("model", "diffusion", "conditioning")  # the groups of spec.ModelSpec's flags
DEFAULT_STEPS = configs.DEFAULT_STEPS  # sampler steps; 0: all T
MODEL = spec.DEFAULTS  # the stored flags' defaults
# `--train --demo`: a 1.1 M-parameter 32-px model that trains on the built-in faces in about
# 9 minutes on 2 CPU cores. T = 200 with beta_T = 0.1 keeps alpha_bar_T near 3e-5, as T = 1000
# with 0.02 gives 4e-5. Each flag typed on the command line wins over its preset value.
DEMO_PRESET = {"img_size": 32, "num_channels": 32, "channel_multiples": [1, 2, 2],
               "has_attn": [False, True, False], "num_blocks": 1, "timesteps": 200,
               "beta_min": 5e-4, "beta_max": 0.1, "lr": 1e-3, "epochs": 10, "seed": 0}
COMMON_COMMANDS = """\
The five most common commands:
  python ddpm.py --train --demo                 train a small model on built-in faces (CPU: ~9 min)
  python ddpm.py --loadckpt latest              draw 64 samples from the newest checkpoint
  python ddpm.py --train --data-folders DIR     train the 64-px model on your images (a GPU job)
  python ddpm.py --resume --data-folders DIR    go on training from the newest checkpoint
  python ddpm.py --loadckpt latest --eval-fid 10000 --data-folders DIR    FID and KID
"""
RARE = "[rarely needed] "  # marks the flags that are for benchmarks, tests and old checkpoints


def str2bool(s: str) -> bool:
    """'t'/'f' (or true/false, yes/no, 1/0) -> bool; argparse's type=bool would take 'f' as True."""
    v = s.lower()
    if v in ("t", "true", "y", "yes", "1"):
        return True
    if v in ("f", "false", "n", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected t or f, got {s!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help, unless it is None (the help then says what happens);
    the description's command list kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one argument group per kind of flag, each declared in its own function."""
    p = argparse.ArgumentParser(
        prog="ddpm.py", usage="python ddpm.py [FLAGS]", formatter_class=_HelpFormatter,
        description="Train a denoising diffusion model on a folder of images (--train), or\n"
                    "draw new images from a checkpoint (--loadckpt).\n" + COMMON_COMMANDS + "\n"
                    + RARE.strip() + " marks the flags for benchmarks, tests and older "
                    "checkpoints.",
        epilog="The usage guide by task is docs/usage.md; every flag, as a table, docs/flags.md.")
    p.flag_groups = []  # FlagGroup, in --help's order
    for add_group in (_data_flags, _model_flags, _diffusion_flags, _conditioning_flags,
                      _training_flags, _distill_flags, _run_flags, _sampling_flags, _editing_flags,
                      _evaluation_flags, _output_flags):
        add_group(p)
    return p


class FlagGroup:
    """An argument group of the parser that keeps its flags (`actions`) and is listed in the
    parser's `flag_groups`: the flag reference and the tests read them there. part: the field
    of configs.Settings its flags fill."""

    def __init__(self, p: argparse.ArgumentParser, title: str, description: str | None = None,
                 *, part: str):
        self.title, self.description, self.actions, self.part = title, description, [], part
        self.group = p.add_argument_group(title, description)
        p.flag_groups.append(self)

    def add_argument(self, *names, **kwargs) -> argparse.Action:
        action = self.group.add_argument(*names, **kwargs)
        self.actions.append(action)
        return action


def flags_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every flag of a parser made by build_parser, group by group."""
    return [a for g in parser.flag_groups for a in g.actions]


def _data_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "data", part="data")
    g.add_argument("--data-folders", nargs="+", metavar="DIR",
                   help="image folders (searched recursively), merged into one training set")
    g.add_argument("--demo", action="store_true",
                   help="train on built-in procedurally drawn cartoon faces instead of folders; "
                        "with --train it also sets a small model that trains in about 9 minutes "
                        "on 2 CPU cores: " + preset_flags(DEMO_PRESET) + " (each flag you type "
                        "wins)")
    g.add_argument("--demo-images", type=int, default=4096, help="how many demo faces to draw")
    g.add_argument("--keep-small", action="store_true",
                   help="upscale images smaller than --img-size instead of skipping them")
    g.add_argument("--data-path", default="device", choices=["device", "plain"],
                   help=RARE + "device: batches gathered, flipped and scaled on the device in one "
                        "go; plain: the per-image reference path (for benchmarks and tests)")
    g.add_argument("--data-on", default="auto", choices=["auto", "memory", "disk"],
                   help="where the training images live: memory (on the training device, the "
                        "fastest), disk (the decode cache file, memory-mapped; batches are read "
                        "ahead by a thread), or auto: memory if they fit in --data-memory")
    g.add_argument("--data-memory", type=float, metavar="MiB",
                   help="the most memory the training images may take: in memory if they fit "
                        "(default: half the device's free memory), else from disk with at most "
                        "this much of the file resident (default: 1024 MiB)")
    g.add_argument("--cache-dir", default=".cache",
                   help="folder for caches: the decoded training images and their Inception "
                        "features (rebuilt when a file changes; safe to delete)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "model", "the UNet (stored in the checkpoint)", part="model")
    g.add_argument("--img-size", type=int, nargs="+", default=MODEL.img_size, metavar="PX",
                   help="S: images are resized (shorter side) and centre-cropped to S x S; "
                        "H W: resized to cover H x W and centre-cropped (non-square)")
    g.add_argument("--img-channels", type=int, default=MODEL.img_channels, choices=[1, 3],
                   help="3 = RGB, 1 = grayscale")
    g.add_argument("--num-channels", type=int, default=MODEL.num_channels, help="UNet base width")
    g.add_argument("--channel-multiples", type=int, nargs="+",
                   default=list(MODEL.channel_multiples),
                   help="width multiple per resolution level")
    g.add_argument("--has-attn", type=str2bool, nargs="+", default=list(MODEL.has_attn),
                   metavar="t|f", help="self-attention per resolution level, one per multiple")
    g.add_argument("--num-blocks", type=int, default=MODEL.num_blocks,
                   help="residual blocks per resolution")
    g.add_argument("--dropout", type=float, default=MODEL.dropout,
                   help="dropout inside residual blocks")
    g.add_argument("--learn-sigma", action="store_true", default=MODEL.learn_sigma,
                   help="learn the reverse variance (2C outputs, hybrid loss L_simple + 1e-3 L_vlb; "
                        "Nichol & Dhariwal 2021); the ancestral sampler and --eval-bpd use it")


def _diffusion_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "diffusion", "the noise process (stored in the checkpoint)", part="model")
    g.add_argument("--timesteps", type=int, default=MODEL.timesteps, help="diffusion steps T")
    g.add_argument("--beta-min", type=float, default=MODEL.beta_min,
                   help="beta_1 of the linear schedule")
    g.add_argument("--beta-max", type=float, default=MODEL.beta_max,
                   help="beta_T of the linear schedule")
    g.add_argument("--schedule", default=MODEL.schedule,
                   choices=["linear", "cosine", "cosine-shifted"],
                   help="noise schedule: linear betas (Ho et al.), cosine alpha_bar (Nichol & "
                        "Dhariwal), or cosine with its SNR times (64 / image side)^2 (Hoogeboom et "
                        "al. 2023: less noise for small images); the cosine ones ignore "
                        "--beta-min/--beta-max")
    g.add_argument("--prediction", default=MODEL.prediction, choices=["eps", "v", "x0"],
                   help="what the network predicts: v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & "
                        "Ho 2022; the default), the noise eps (Ho et al. 2020), or x0 itself (the "
                        "default of a super-resolution model of the residual: untrained, its "
                        "zero output is the bicubic image). An eps model "
                        "must reproduce the size of its input x_t at t = T-1 to within "
                        "sqrt(ab_T) = 0.6%%, which a GroupNorm-ended UNet cannot: DDIM, "
                        "DPM-Solver++ and Heun then turn some seeds into noise, so eps models "
                        "sample with ddpm unless --sampler is given")
    g.add_argument("--student-steps", type=int, default=MODEL.student_steps, metavar="N",
                   help="a student of progressive distillation, made to draw in N steps (0: a "
                        "diffusion model); with --distill: the steps to make it for (default "
                        "half the teacher's, 2 from a diffusion model)")


def _conditioning_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "conditioning", "what the model is conditioned on (stored in the "
                                     "checkpoint)", part="model")
    g.add_argument("--captions", default=MODEL.captions, choices=["off", "files", "folders"],
                   help="train a text-conditioned model (classifier-free guidance, Ho & Salimans "
                        "2022). files: a .txt beside each image, else its row in a captions.csv "
                        "(file,caption) in the data folder; folders: each image's sub-folder name "
                        "(class-conditional). Images without a caption train unconditionally")
    g.add_argument("--super-res", type=int, default=MODEL.super_res, metavar="LOW",
                   help="train a super-resolution model (SR3, Saharia et al. 2021) from LOW x LOW "
                        "to --img-size; each (low, high) pair is made on the fly from the "
                        "training images")
    g.add_argument("--augment", type=float, default=MODEL.augment, metavar="P",
                   help="non-leaking augmentation for small data sets (EDM, Karras et al. 2022): "
                        "with probability P each, flip, quarter-turn, shift, scale and stretch "
                        "each training image and change its brightness, contrast, saturation and "
                        "hue; the network is told what was done (a label embedding) and samples "
                        "with zero labels come out un-augmented. 0 = off; EDM used 0.12-0.15 "
                        "(a positive P may be changed on resume)")
    g.add_argument("--sr-target", default=MODEL.sr_target, choices=["residual", "image"],
                   help=RARE + "super-resolution: diffuse the residual x_high - bicubic(x_low) (SRDiff, "
                        "Li et al. 2022), so that a model that has learned little returns bicubic, "
                        "or the high-res image itself (SR3; what SR checkpoints without an "
                        "sr_target in their config were trained on)")


def _training_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "training", part="train")
    g.add_argument("--train", action="store_true", help="train (otherwise: sample from --loadckpt)")
    g.add_argument("--resume", action="store_true",
                   help="--train --loadckpt latest: go on with the newest checkpoint of "
                        "--ckpt-save-dir, or start a new run there when it holds none (one "
                        "command for the first launch and every restart)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="training batch size (the global batch under torchrun; one micro-batch "
                        "with --grad-accum); number of samples drawn when sampling")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="K micro-batches of --batch-size per optimizer step (gradients added "
                        "up): the step sees K x --batch-size images")
    g.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (the peak); default 1e-3 min(1, sqrt(1 M / the "
                        "UNet's parameters)), at least 1e-4: 1e-3 for the small CPU models "
                        "(docs/results/recipe.md), 1.3e-4 for the 63 M-parameter 64-px model")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay of the weights; warms up as min(decay, (1 + step) / (10 + step))")
    g.add_argument("--min-snr-gamma", type=float, default=0.0,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is typical); 0 = off")
    g.add_argument("--t-sampling", default="lognormal", choices=["lognormal", "uniform"],
                   help="how training draws t: so that ln sigma ~ N(-1.2, 1.2^2), sigma = "
                        "sqrt((1 - ab) / ab) (EDM, Karras et al. 2022; FID 52 against 77 in "
                        "docs/results/recipe.md), or uniformly (Ho et al.; the default of "
                        "super-resolution, --learn-sigma and --importance-sampling runs); kept "
                        "on resume")
    g.add_argument("--importance-sampling", action="store_true",
                   help="draw t with p_t ~ sqrt(E[L_t^2]) over the last 10 losses per t, loss "
                        "reweighted to stay unbiased (Nichol & Dhariwal 2021); kept on resume")
    g.add_argument("--hflip", default="on", choices=["on", "off"],
                   help="mirror each training image left-right with probability 1/2; off for "
                        "digits, letters, logos and anything with a handedness (kept on resume)")
    g.add_argument("--cond-drop", type=float, default=0.1,
                   help="text models: the probability that an image's caption is replaced by "
                        "the empty caption (this trains the unconditional model guidance needs)")
    g.add_argument("--sr-noise-max", type=float, default=0.2,
                   help="super-resolution: the upsampled low-res input gets Gaussian noise of "
                        "std a ~ U(0, this), and the model is told a (noise-conditioning "
                        "augmentation)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute UNet block activations in the backward pass: less GPU memory "
                        "for about a third more compute")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet for training and sampling (a slow first step; "
                        "pays off on GPUs)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed every RNG: the same seed gives the same samples (on one device)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N; auto: cuda if a GPU is visible, else cpu")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on GPUs that have it, else fp16 with loss scaling; "
                        "fp32 on the CPU. fp32 is the fix when mixed-precision samples turn black")


def _distill_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "distillation", "a few-step student from a trained model (progressive "
                                     "distillation, Salimans & Ho 2022)", part="train")
    g.add_argument("--distill", action="store_true",
                   help="train a student that draws in --student-steps steps from the model of "
                        "--loadckpt (the teacher), starting from its weights: each student step "
                        "learns to land where the teacher's solve lands (docs/usage.md). A run "
                        "like any other: --resume, --max-steps, --max-minutes, signals")
    g.add_argument("--teacher-calls", type=int, default=4, metavar="K",
                   help="the network calls a diffusion-model teacher takes for each student "
                        "step (DPM-Solver++, Karras-spaced); a student teacher takes its own "
                        "DDIM steps")


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "run length, schedule and monitoring", part="train")
    g.add_argument("--epochs", type=int, default=5, help="epochs to train in this run")
    g.add_argument("--max-steps", type=int, default=0, metavar="N",
                   help="stop when the model has taken N optimizer steps in all (0 = no limit); "
                        "with --epochs, whichever comes first")
    g.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop once this run has trained for M minutes (a resume gets M more), "
                        "saving a checkpoint as at --max-steps; with --epochs and --max-steps, "
                        "whichever comes first. The clock starts at the first step and is read "
                        "every 10 steps and at each epoch's end, where the loop waits for the "
                        "device anyway; a cosine --lr-schedule still ends at --max-steps or the "
                        "last epoch")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also save a checkpoint every N optimizer steps (0 = only at each "
                        "epoch's end); a resume from one goes on at the same place in its "
                        "epoch, as if never stopped")
    g.add_argument("--save-every-minutes", type=float, default=0.0, metavar="M",
                   help="also save a checkpoint when M minutes have passed since the last save "
                        "(0 = off); with --save-every, whichever comes first")
    g.add_argument("--lr-warmup", type=int, default=0, metavar="N",
                   help="raise the learning rate linearly from --lr / N to --lr over the first "
                        "N optimizer steps (stored: a resume goes on with it)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="after warm-up: constant, or cosine decay to 0.1 x --lr at the end of the "
                        "schedule (--max-steps, else this run's epochs; stored: a resume goes on "
                        "with it)")
    g.add_argument("--sample-every", type=int, default=None, metavar="N",
                   help="every N optimizer steps draw the same fixed noise into a grid with the "
                        "EMA weights (DDIM, 25 steps): output/progress/step-<step>.png and "
                        "output/progress.png, a row each (default: once per epoch; 0 = off)")
    g.add_argument("--start-over", action="store_true",
                   help="train a new run into a --ckpt-save-dir that holds another run's "
                        "checkpoints: they are moved into <ckpt-save-dir>/replaced-<run id>/ "
                        "first (without it such a folder is refused; --resume continues it)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log loss, learning rate, img/s, FID/KID and the progress grids to "
                        "<--save-dir>/tensorboard (needs the tensorboard package)")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "sampling", part="sample")
    g.add_argument("--loadckpt", metavar="PATH",
                   help="checkpoint (.pth, or an exported .safetensors) to sample from, or a .pth "
                        "to resume training from; a bare name is also looked up in "
                        "--ckpt-save-dir; 'latest': the one with the most optimizer steps there")
    g.add_argument("--sampler", default="dpm++", choices=["ddpm", "ddim", "dpm++", "heun"],
                   help="DPM-Solver++(2M): on a model of the default recipe (v target, "
                        "log-normal t, no captions) 10 Karras-spaced steps, as good as the "
                        "finely solved ODE (FID 70.0 against 70.7) and better than 20 even ones "
                        "(77.2); on other models 20 even steps, as good as the ancestral sampler "
                        "(102 against 107) at 1/50 of the network calls. ddpm: the ancestral "
                        "sampler, all T steps (Algorithm 2; the default for eps models, whose deterministic samples can turn to "
                        "noise, and for inpainting); ddim; heun: EDM's 2nd-order sampler (2 "
                        "network calls a step)")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="timesteps for ddim / dpm++ / heun (default 50 / 20 / 18, and 10 for "
                        "dpm++ with Karras spacing on a model of the default recipe); ddpm "
                        "always takes all T. A student of --distill draws with ddim in the "
                        "steps it was made for unless --sampler or this is typed")
    g.add_argument("--spacing", default="uniform", choices=["uniform", "karras"],
                   help="the timesteps of ddim / dpm++ / heun: evenly spaced, or crowded towards "
                        "low noise as in Karras et al. 2022 (rho = 7); karras is dpm++'s default "
                        "on a model of the default recipe (see --sampler)")
    g.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise: 0 = deterministic, 1 = ancestral-like")
    g.add_argument("--clip-x0", type=str2bool, default=True, metavar="t|f",
                   help=RARE + "clip the predicted x0 to [-1, 1] at every sampling step (as Ho et al.'s "
                        "code does); keeps partly trained models from drifting")
    g.add_argument("--raw-weights", action="store_true",
                   help=RARE + "sample with the raw weights instead of their EMA")
    g.add_argument("--prompt", nargs="+", metavar="TEXT",
                   help='with a text model\'s --loadckpt: --batch-size samples per prompt, a grid '
                        'each, e.g. --prompt "blue hair, red eyes" "pink hair, green eyes"')
    g.add_argument("--guidance-scale", type=float, nargs="+", default=[3.0], metavar="W",
                   help="guidance w: out(empty) + w (out(prompt) - out(empty)); 1 = plain "
                        "conditional, 0 = unconditional; several values: a grid each")
    g.add_argument("--lowres-folder", metavar="DIR",
                   help="with a super-resolution --loadckpt: upsample every image in DIR "
                        "(resized to LOW) into --save-dir")
    g.add_argument("--sr-ckpt", metavar="PATH",
                   help="with a base model's --loadckpt: the cascade: draw --batch-size samples, "
                        "then super-resolve them with this super-resolution model")
    g.add_argument("--sr-noise", type=float, default=0.05,
                   help="super-resolution sampling: the noise std a added to the low-res input")


def _editing_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "editing", "with --loadckpt: change pictures with the model", part="edit")
    g.add_argument("--init-folder", metavar="DIR",
                   help="image-to-image (SDEdit): noise each image in DIR to --strength, then "
                        "denoise it with the sampler; with --mask-folder or --mask-box: fill in")
    g.add_argument("--strength", type=float, default=0.6,
                   help="image-to-image: how far to noise, 0 < s <= 1 (t = s T; 1 = from pure "
                        "noise, ignoring the image)")
    g.add_argument("--mask-folder", metavar="DIR",
                   help="inpainting (RePaint): a mask per --init-folder image, by file name, "
                        "--img-size square; white = keep, black = fill")
    g.add_argument("--mask-box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="inpainting: fill this rectangle (pixels, x1 and y1 excluded) in every "
                        "image")
    g.add_argument("--resample", type=int, default=1, metavar="R",
                   help="inpainting: redo each reverse step R times, jumping back in between "
                        "(1 = plain replacement; RePaint uses 10)")
    g.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                   help="invert two images to noise with DDIM, slerp between the noises, decode "
                        "each with DDIM: a strip of --frames images from A to B")
    g.add_argument("--interpolate-seeds", type=int, nargs=2, metavar=("S1", "S2"),
                   help="the same from the noise of two seeds")
    g.add_argument("--frames", type=int, default=8, help="frames of an interpolation strip")


def _evaluation_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "evaluation", "quality against real images (FID / KID, bits/dim)",
                  part="evaluation")
    g.add_argument("--eval-fid", type=int, default=0, metavar="N",
                   help="with --loadckpt: draw N samples and print FID and KID against the "
                        "training images, and write nearest.png (instead of the 64 samples)")
    g.add_argument("--eval-bpd", type=int, default=0, metavar="N",
                   help="with --loadckpt: the variational bound in bits/dim on the first N "
                        "training images (prior, KL and decoder terms; T model calls per batch)")
    g.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="while training: every K epochs measure FID / KID and the copy rate "
                        "(share of samples nearer a training image than training images are to "
                        "each other; a one-line warning when it is above real images' 1/2 by 3 "
                        "standard errors), into metrics.jsonl and loss.png; keep the best FID "
                        "as best.pth")
    g.add_argument("--eval-samples", type=int, default=1000,
                   help="samples per FID measurement during training (and for --eval-prompts)")
    g.add_argument("--eval-folders", nargs="+", metavar="DIR",
                   help="measure FID / KID against these images (e.g. held out from training) "
                        "instead of the --data-folders; the copy rate is always measured "
                        "against the training images")
    g.add_argument("--eval-sr", type=int, default=0, metavar="N",
                   help="with a super-resolution --loadckpt: on the first N images of "
                        "--data-folders (held back from training), PSNR / SSIM and FID of ours "
                        "and of bicubic upsampling against the real images; sr-compare.png")
    g.add_argument("--eval-prompts", metavar="DIR",
                   help="with a text model's --loadckpt: fit a hair/eye colour classifier on the "
                        "captioned images in DIR (held out from training), then report per "
                        "--guidance-scale how often prompted colours are drawn, and FID vs DIR")


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = FlagGroup(p, "output", part="output")
    g.add_argument("--ckpt-save-dir", default="ckpt", help="checkpoint folder")
    g.add_argument("--save-dir", default="output", help="folder for samples and pictures")
    g.add_argument("--info", metavar="PATH",
                   help="print what a checkpoint is (kind, architecture, diffusion, training "
                        "length, EMA, best FID, vocabulary) and exit")
    g.add_argument("--export", metavar="FILE.safetensors",
                   help="with --loadckpt: write its EMA weights, with the model config in the "
                        "metadata, as safetensors (no optimizer state: it samples, but cannot "
                        "resume training)")


def stored_keys() -> list[str]:
    """The stored flags: spec.ModelSpec's fields, in declaration order."""
    return list(spec.FIELDS)


_UNSET = object()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The flags as typed (argparse's defaults for the rest; nothing worked out yet: resolve),
    and the names of the flags the user actually typed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = vars(parser.parse_args([])).keys()
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**{k: _UNSET for k in names}))
    return args, {k for k, v in vars(typed).items() if v is not _UNSET}


def preset_flags(preset: dict) -> str:
    """{"img_size": 32, "has_attn": [False, True]} -> '--img-size 32 --has-attn f t'."""
    return " ".join(f"--{k.replace('_', '-')} {_words(v)}" for k, v in preset.items())


def preset_line(a: argparse.Namespace, typed: set[str]) -> str | None:
    """The start-up line that names the --demo preset and the flags it set (None without it).
    Resuming, the checkpoint's model wins, so only the training flags are named."""
    if not ((a.train or a.resume) and a.demo):
        return None
    stored = set(stored_keys()) if a.loadckpt or a.resume else set()
    used = {k: v for k, v in DEMO_PRESET.items() if k not in typed and k not in stored}
    kept = [f"--{k.replace('_', '-')}" for k in DEMO_PRESET if k in typed]
    return (f"demo preset: {preset_flags(used) or 'none of its flags'}"
            + (f"; your {' '.join(kept)} kept" if kept else ""))


def check_command_line(argv: list[str] | None = None) -> None:
    """Parse the command line before the slow imports: --help and flag errors answer at once, and
    the --demo preset is named while torch loads. Exits on a bad flag (code 2, one line)."""
    try:
        args, typed = parse_args(argv)
        stored_img_size(args.img_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    line = preset_line(args, typed)
    if line:
        print(line, flush=True)


def stored_img_size(v):
    """--img-size as typed -> an int for a square (as checkpoints have always stored it), [H, W]
    for a non-square size."""
    v = [v] if isinstance(v, int) else list(v)
    if len(v) not in (1, 2):
        raise UserError(f"--img-size takes one number (a square) or two (H W), got {len(v)}")
    return v[0] if len(set(v)) == 1 else v


def flag_reference() -> str:
    """docs/flags.md: every flag of build_parser as Markdown, group by group, in --help's order
    (a test checks that the file is this; `make docs/flags.md` writes it)."""
    parser = build_parser()
    lines = ["# Flags", "",
             "Every flag of `python ddpm.py`, generated from its parser (`config.py`) by "
             "`make docs/flags.md`; a test fails when this page and the parser disagree. The "
             "groups *model*, *diffusion* and *conditioning* are stored in every checkpoint. "
             "`" + RARE.strip() + "` marks the flags for benchmarks, tests and older "
             "checkpoints. The usage guide by task is [usage.md](usage.md)."]
    for g in parser.flag_groups:
        actions = g.actions
        if not actions:
            continue
        lines += ["", f"## {g.title}", ""] + ([g.description + ".", ""] if g.description else [])
        lines += ["| flag | default | meaning |", "|---|---|---|"]
        for a in actions:
            arg = f" {{{','.join(map(str, a.choices))}}}" if a.choices else (
                "" if a.nargs == 0 else f" {_metavar(a)}")
            default = "—" if a.default is None or a.default is False else _words(a.default)
            meaning = (a.help or "").replace("%%", "%").replace("|", "\\|")
            flag = f"{a.option_strings[0]}{arg}".replace("|", "\\|")
            lines.append(f"| `{flag}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def _metavar(a: argparse.Action) -> str:
    m = a.metavar or a.dest.upper()
    m = " ".join(m) if isinstance(m, tuple) else m
    return {None: m, "?": f"[{m}]", "*": f"[{m} ...]", "+": f"{m} [{m} ...]"}.get(a.nargs, m)


def _words(v) -> str:
    """A default as typed on the command line: [False, True] -> 'f t'."""
    vs = v if isinstance(v, list) else [v]
    return " ".join("t" if x is True else "f" if x is False else str(x) for x in vs)
