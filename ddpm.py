"""ddpm.py: train a denoising diffusion model on a folder of images, then draw new ones.

Follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM): Algorithm 1 to train,
Algorithm 2 to sample. `python ddpm.py --help` lists every option (declared in config.py); the
maths is in diffusion.py, the network in unet.py, super-resolution and prompts in their modules.
"""
if __name__ == "__main__":  # --help and flag errors answer before torch loads (it takes seconds)
    import config
    config.check_command_line()

import contextlib
import copy
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torchvision.utils import save_image

import augment
import checkpoint
import config
import edit
import evaluate
import prompts
import superres
from config import UserError
from data import (DataError, ImageDataset, MappedImages, demo_faces, hw, load_folders,
                  placement, to_model, to_uint8)
from diffusion import GaussianDiffusion, ImportanceSampler
import monitor
from monitor import TensorBoard
from text import CaptionError, Vocab, drop_captions, read_captions
from ui import make_console, progress_bar
from unet import UNet

MAX_BAD_STEPS = 5  # non-finite losses in a row before a run stops


class NonFiniteLoss(Exception):
    """The loss was NaN or infinite MAX_BAD_STEPS steps in a row."""


class Preempted(BaseException):
    """SIGTERM arrived (a cluster's scheduler stops the job): save, then exit."""


def stop_on_sigterm(signum, frame):
    raise Preempted()


def micro_batches(n: int, k: int) -> list[slice]:
    """k consecutive slices of range(n), as equal as can be (--grad-accum): the last may be short."""
    m = math.ceil(n / k)
    return [slice(i, min(i + m, n)) for i in range(0, n, m)]


def ema_decay(step: int, max_decay: float) -> float:
    """EMA decay at optimizer step `step` (1, 2, ...), warmed up: min(max_decay, (1+step)/(10+step))."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def lr_at(step: int, lr: float, warmup: int, schedule: str, total: int) -> float:
    """The learning rate of optimizer step `step` (0, 1, ...): linear warm-up to lr over `warmup`
    steps ((step + 1) / warmup), then constant, or cosine from lr to 0.1 lr at step `total`:
    lr (0.1 + 0.9 (1 + cos(pi min(step / total, 1))) / 2)."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "cosine" and total > 0:
        scale *= 0.1 + 0.9 * (1 + math.cos(math.pi * min(step / total, 1.0))) / 2
    return lr * scale


def pick_device(name: str, precision: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None: fp32). auto: on CUDA bf16 where supported,
    else fp16 (with loss scaling); fp32 on the CPU, where bf16 is slow."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else (
            "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                        f"use fp16 or fp32")
    return device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def init_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (its RANK / WORLD_SIZE / LOCAL_RANK environment): join the process group
    (NCCL on GPUs, gloo on CPUs) -> (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, f"cuda:{os.environ['LOCAL_RANK']}" if cuda else device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Program:
    """One run: its flags, device, data, model, optimizer and outputs; `run` does what was asked.
    cascade: the super-resolution stage after a base model (its input is the base's samples)."""

    def __init__(self, args, typed: set[str], cascade: bool = False):
        a = self.args = args
        self.rank, self.world, device = init_distributed(a.device)
        self.main = self.rank == 0  # only the first process writes files and prints
        self.console = make_console(quiet=not self.main)
        ckpt, self.schedule_steps = None, 0  # the length of the lr schedule, kept on resume
        if a.loadckpt:
            ckpt, a.loadckpt = checkpoint.read(a.loadckpt, a.ckpt_save_dir)
            if a.train and "optimizer" not in ckpt:
                raise UserError(f"{a.loadckpt} holds exported weights without optimizer state: "
                                f"it samples, but training resumes only from a .pth checkpoint")
            config.apply_stored(a, typed, config.stored_config(ckpt))
            self.schedule_steps = checkpoint.resume_recipe(a, ckpt, typed)
            self.console.print(f"loaded {a.loadckpt} (epoch {ckpt['epoch']}, step {ckpt['step']})")
        config.validate(a, cascade)
        self.device, self.amp_dtype = pick_device(device, a.precision)
        if a.batch_size % self.world:
            raise UserError(f"--batch-size {a.batch_size} (the global batch) must be divisible by "
                            f"the {self.world} processes")
        if a.seed is not None:
            seed_everything(a.seed)
        self.data_gen = torch.Generator().manual_seed(
            a.seed if a.seed is not None else random.randrange(2**63))
        self.epoch, self.step, self.images_seen = 0, 0, 0  # completed
        self.best_fid, self.bad_steps = math.inf, 0
        # A text model's vocabulary comes from its checkpoint, or from the captions of a new run.
        self.vocab = Vocab.from_state(ckpt["text"]) if ckpt and ckpt.get("text") else None
        self.data = self.load_data() if a.train else None
        self.build()
        if ckpt:
            try:
                checkpoint.restore(self, ckpt)
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                first = str(e).strip().splitlines()[0][:120]
                raise UserError(f"checkpoint {a.loadckpt} does not fit this program (damaged, or "
                                f"from another version): {type(e).__name__}: {first}") from None
        self.make_folders()
        self.grids = None  # monitor.ProgressGrids, made at the first progress grid
        self.tensorboard = TensorBoard(a.save_dir) if a.train and a.tensorboard and self.main else None
        if not cascade:
            monitor.summary(self)

    def build(self) -> None:
        """The UNet, its EMA copy, the diffusion around it, the optimizer (and DDP, compile)."""
        a = self.args
        self.model = UNet(
            img_channels=a.img_channels, num_channels=a.num_channels,
            channel_multiples=a.channel_multiples, has_attn=a.has_attn, num_blocks=a.num_blocks,
            dropout=a.dropout, learn_sigma=a.learn_sigma,
            vocab_size=len(self.vocab) if self.vocab else 0,
            text_len=self.vocab.max_len if self.vocab else 0,
            lowres_channels=a.img_channels if a.super_res else 0,
            augment_dim=augment.AUGMENT_DIM if a.augment > 0 else 0).to(self.device)
        self.diffusion = GaussianDiffusion(
            self.model, a.timesteps, a.beta_min, a.beta_max, schedule=a.schedule,
            prediction=a.prediction, min_snr_gamma=a.min_snr_gamma,
            learn_sigma=a.learn_sigma).to(self.device)
        self.model.grad_checkpoint = a.grad_checkpoint
        self.ema = copy.deepcopy(self.model).requires_grad_(False)  # the weights we sample with
        self.importance = ImportanceSampler(a.timesteps) if a.importance_sampling else None
        if a.compile:  # in place: state_dict keys and the objects other code holds stay the same
            self.model.compile()
            self.ema.compile()
        if self.world > 1:  # training goes through DDP (gradients averaged); sampling does not
            self.diffusion.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # Fused Adam (one kernel per tensor) on CUDA and CPU: the same update, about 7x faster
        # than the per-op loop on a CPU core. A resumed checkpoint keeps the flag it was saved with.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=a.lr,
                                          fused=self.device.type in ("cuda", "cpu"))
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)

    def make_folders(self) -> None:
        a = self.args
        for folder in (a.save_dir, a.ckpt_save_dir if a.train else None):
            try:
                if folder:
                    os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create folder {folder}: {e.strerror}") from None
            if folder and not os.access(folder, os.W_OK):
                raise UserError(f"cannot write to folder {folder}: choose another one")

    # -- helpers -------------------------------------------------------------------------------

    def side_rng(self):
        """Pictures and FID drawn during training use a forked RNG, so that they leave the
        training's random stream (and so an exact resume) untouched."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def progress(self, *fields: str):
        return progress_bar(self.console, *fields, disable=not self.main)

    def save_grid(self, images: Tensor, name: str, nrow: int) -> None:
        """images: (N, C, H, W) in [-1, 1] (or uint8) -> one PNG grid in --save-dir."""
        images = images if images.dtype == torch.uint8 else to_uint8(images)
        save_image(images.float() / 255, os.path.join(self.args.save_dir, name), nrow=nrow,
                   padding=1)

    @property
    def sampler_name(self) -> str:
        """E.g. 'heun, 18 karras-spaced steps (35 network calls)' or 'ddpm, all T steps'."""
        a = self.args
        if a.sampler == "ddpm":
            return "ddpm, all T steps"
        n = len(self.diffusion.timesteps(a.sampler, config.sample_steps(a), a.spacing))
        calls = f" ({2 * n - 1} network calls)" if a.sampler == "heun" else ""
        eta = f", eta {a.eta}" if a.sampler == "ddim" else ""
        return f"{a.sampler}, {n} {a.spacing}-spaced steps{calls}{eta}"

    @property
    def weights_name(self) -> str:
        return "raw" if self.args.raw_weights else "EMA"

    def sampling_model(self) -> nn.Module:
        """The weights we sample and measure with: the EMA, or the raw ones (--raw-weights)."""
        return self.model if self.args.raw_weights else self.ema

    def unconditional(self, n: int) -> dict | None:
        """The conditioning of n unprompted samples: the empty caption for a text model."""
        return {"tokens": self.vocab.empty(n, self.device)} if self.vocab else None

    @torch.inference_mode()
    def draw(self, n: int, desc: str = "sampling", cond: dict | None = None, guidance: float = 1.0,
             *, x_T: Tensor | None = None, sampler: tuple[str, int] | None = None,
             start: int | None = None):
        """n samples with the chosen sampler and weights, with a progress bar -> x_0 (n, C, H, W)
        and about 10 frames of the reverse chain. Without cond a text model draws from the empty
        caption; a super-resolution model needs cond. x_T: the noise (default: fresh);
        sampler: (name, steps) instead of the flags' (eta 0, uniform spacing); start: x_T is
        at that timestep, and the sampler's steps shrink in proportion (image-to-image).
        A residual SR model's cond holds its base (the bicubic image): x_0 and the frames are
        base + the sampled residual."""
        a, model, T = self.args, self.sampling_model(), self.diffusion.T
        cond = self.unconditional(n) if cond is None else dict(cond)
        base = cond.pop("base", 0.0) if cond else 0.0  # (n, C, H, W), or 0: no base
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
                x_T, name, steps, eta=eta, spacing=spacing, start=start, model=model,
                clip_x0=a.clip_x0, cond=cond, guidance=guidance, strips=10, track=track)
        model.train()
        return base + x0, [base + f for f in frames]

    def draw_many(self, n: int, desc: str, cond_for=lambda i, j: None,
                  guidance: float = 1.0) -> Tensor:
        """n samples drawn --batch-size at a time -> uint8 (n, C, H, W) on the CPU. cond_for(i, j):
        the conditioning of samples i..j-1 (None: unconditional)."""
        out, bs = [], self.args.batch_size
        for i in range(0, n, bs):
            j = min(i + bs, n)
            out.append(to_uint8(self.draw(j - i, f"{desc} {i}/{n}", cond_for(i, j), guidance)[0]).cpu())
        return torch.cat(out)

    # -- training ------------------------------------------------------------------------------

    def load_data(self) -> ImageDataset:
        """The training images, and with --captions their caption tokens (a new run builds the
        vocabulary from the captions; a resumed one keeps the checkpoint's)."""
        a, t0, tokens = self.args, time.time(), None
        if a.demo:
            images = demo_faces(a.demo_images, a.img_size, a.img_channels, seed=0)
        else:  # a memory-mapped view of the decode cache: nothing is read into memory yet
            images, paths = load_folders(a.data_folders, a.img_size, a.img_channels,
                                         warn=self.console.print, cache_dir=a.cache_dir,
                                         keep_small=a.keep_small, with_paths=True, mapped=True)
        limit = None if a.data_memory is None else int(a.data_memory * 2**20)
        on_disk, resident, why = placement(images, self.device, a.data_on, limit)
        self.console.print(why)
        if isinstance(images, MappedImages) and not on_disk:
            images = images.images.to(self.device, copy=True)  # read into memory once
        if a.captions != "off" and not a.demo:
            captions = read_captions(paths, a.data_folders, a.captions)
            have = sum(map(bool, captions))
            if not have:
                where = ("a .txt beside it or a captions.csv row" if a.captions == "files"
                         else "no sub-folders")
                raise UserError(f"--captions {a.captions}: none of the {len(paths)} images has a "
                                f"caption ({where})")
            self.vocab = self.vocab or Vocab.build([c for c in captions if c])
            tokens = self.vocab.encode_all(captions)  # (N, L); words the vocabulary lacks: dropped
            self.console.print(f"captions: {have} of {len(images)} images have one "
                               f"({a.captions}); vocabulary of {len(self.vocab) - 2} words, up to "
                               f"{self.vocab.max_len} per caption")
        self.console.print(f"training set ready in {time.time() - t0:.1f}s")
        return ImageDataset(images, self.device, tokens, hflip=a.hflip == "on", resident=resident)

    def train_cond(self, x0: Tensor, tokens: Tensor | None, n: int, share: slice) -> dict:
        """A training batch's conditioning: captions, each dropped with probability --cond-drop;
        or the noise-augmented low-res image. Random draws are for the global batch of n, this
        process's share taken, as for t and eps."""
        if self.vocab:
            u = torch.rand(n, device=self.device)[share]  # (B,)
            return {"tokens": drop_captions(tokens, self.args.cond_drop, u)}
        if self.args.super_res:
            return superres.train_cond(self, x0, n, share)
        return {}

    def loss_is_finite(self, loss: Tensor) -> bool:
        """False skips the step (a NaN must never reach the weights); MAX_BAD_STEPS in a row stop
        the run. A host-device sync every step; all processes skip together."""
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite:
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        self.console.print(f"warning: non-finite loss at step {self.step + 1}, step skipped")
        if self.bad_steps >= MAX_BAD_STEPS:
            raise NonFiniteLoss()
        return False

    def train_loop(self) -> None:
        """Algorithm 1, optimizer step after step: batch -> t, eps -> loss (by micro-batch) ->
        backward -> clip -> Adam -> EMA -> log; a checkpoint (and FID) at each epoch's end."""
        a, data, T, dev, K = self.args, self.data, self.diffusion.T, self.device, self.args.grad_accum
        batches_of = data.batches_with_tokens if a.data_path == "device" else data.plain_batches
        per_epoch = data.num_batches(a.batch_size * K, self.world)  # optimizer steps
        self.schedule_steps = self.schedule_steps or a.max_steps or self.step + a.epochs * per_epoch
        planned = min(a.epochs * per_epoch, a.max_steps - self.step if a.max_steps else math.inf)
        every, lr = per_epoch if a.sample_every is None else a.sample_every, a.lr
        with self.progress("info") as progress:
            run = progress.add_task("this run", total=max(planned, 0), info="")
            for e in range(self.epoch, self.epoch + a.epochs):
                if a.max_steps and self.step >= a.max_steps:
                    break
                bar = progress.add_task(f"epoch {e}", total=per_epoch, info="")
                t0, seen, steps, loss_sum = time.time(), 0, 0, torch.zeros((), device=dev)
                for x0, tokens in batches_of(a.batch_size * K, self.data_gen, self.rank, self.world):
                    # t and eps for the whole global batch of n, this process's share taken as
                    # the data is: N processes draw what one process with the global batch would.
                    n, share = len(x0) * self.world, slice(self.rank, None, self.world)
                    if a.augment:  # non-leaking: the network is told what was done (labels)
                        x0, labels = augment.augment(x0, a.augment, n, share)
                    t_all, w_all = (self.importance.sample(n, dev) if self.importance
                                    else (torch.randint(0, T, (n,), device=dev), None))
                    t, eps = t_all[share], torch.randn(n, *x0.shape[1:], device=dev)[share]
                    w = torch.ones_like(t, dtype=torch.float) if w_all is None else w_all[share]
                    cond = self.train_cond(x0, tokens, n, share)
                    if a.augment:
                        cond["augment_labels"] = labels
                    if a.super_res:  # what it diffuses: the residual x0 - bicubic(x_low), or x0
                        x0 = superres.train_target(self, x0)
                    lr = self.set_lr()
                    self.optimizer.zero_grad(set_to_none=True)
                    per_image, loss = [], torch.zeros((), device=dev)
                    parts = micro_batches(len(x0), K)
                    for k, part in enumerate(parts):  # --grad-accum: the gradients add up
                        last = k == len(parts) - 1  # DDP all-reduces after the last one only
                        with contextlib.nullcontext() if last or self.world == 1 else \
                                self.diffusion.model.no_sync():
                            with self.autocast():
                                part_cond = {c: v[part] for c, v in cond.items()}
                                losses = self.diffusion.losses(x0[part], t[part], eps[part], part_cond)
                                part_loss = (losses * w[part]).sum() / len(x0)  # -> batch mean
                            self.scaler.scale(part_loss).backward()
                        per_image, loss = per_image + [losses.detach()], loss + part_loss.detach()
                    progress.advance(bar)
                    if not self.loss_is_finite(loss):
                        continue
                    if self.importance:  # every process learns from the global batch's losses
                        self.importance.update(t_all, self.gather_global(torch.cat(per_image).float()))
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.step, steps, self.images_seen = self.step + 1, steps + 1, self.images_seen + n
                    update_ema(self.ema, self.model, ema_decay(self.step, a.ema_decay))
                    seen, loss_sum = seen + n, loss_sum + loss
                    if steps % 10 == 1:  # another host-device sync, to show the figures
                        monitor.log_step(self, progress, (bar, run), loss.item(), lr,
                                         seen / (time.time() - t0))
                    if self.main and every and self.step % every == 0:
                        monitor.progress_grid(self)
                    progress.advance(run)
                    if a.max_steps and self.step >= a.max_steps:
                        break
                progress.remove_task(bar)
                self.end_epoch(e, loss_sum.item() / max(steps, 1), seen, time.time() - t0, lr)

    def set_lr(self) -> float:
        """The learning rate of the coming optimizer step (warm-up, schedule), set and returned."""
        a = self.args
        lr = lr_at(self.step, a.lr, a.lr_warmup, a.lr_schedule, self.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train(self) -> None:
        """The training run with its pictures; Ctrl-C or SIGTERM (a cluster's pre-emption)
        saves a checkpoint and ends it cleanly. After SIGTERM the exit code is 143."""
        a = self.args
        if self.main:
            with self.side_rng():
                monitor.save_forward_strip(self, to_model(self.data.images[:4]))
            monitor.strip(self, "run-before")
        previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            self.train_loop()
        except (KeyboardInterrupt, Preempted) as stop:
            path = checkpoint.save(self, self.epoch)  # the epoch in progress restarts on resume
            why = "stopped by SIGTERM" if isinstance(stop, Preempted) else "interrupted"
            self.console.print(f"{why}: saved {path} (epoch {self.epoch}, step {self.step})")
            if isinstance(stop, Preempted):
                sys.exit(143)
        except NonFiniteLoss:
            path = checkpoint.save(self, self.epoch)
            self.console.print(
                f"stopped: the loss was not finite {MAX_BAD_STEPS} steps in a row; the last good "
                f"weights are in {path} (step {self.step}). Lower --lr (now {a.lr}) or "
                f"--grad-clip, or look for broken images in the data, then resume with --loadckpt")
            sys.exit(1)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.tensorboard:
                self.tensorboard.close()
        if self.main:
            monitor.strip(self, "run-after")
        self.console.print(f"pictures in {a.save_dir}/: forward-steps.png, run-before.png, "
                           f"run-after.png, progress.png, loss.png; metrics.jsonl")

    def gather_global(self, x: Tensor) -> Tensor:
        """This process's share x (n / world,) of a global batch -> the global batch (n,) on the
        CPU, in global order (process r holds positions r, r + world, ...)."""
        if self.world == 1:
            return x.cpu()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.stack(parts, 1).flatten().cpu()

    def end_epoch(self, e: int, loss: float, seen: int, secs: float, lr: float) -> None:
        """Checkpoint, metrics.jsonl + loss.png, FID every --eval-every epochs, one line."""
        a = self.args
        self.epoch = e + 1
        path = checkpoint.save(self, e)
        if not self.main:
            return
        record = {"epoch": e, "step": self.step, "loss": loss, "lr": lr,
                  "img_per_s": seen / secs, "seconds": secs}
        if a.eval_every and (e + 1) % a.eval_every == 0:
            with self.side_rng():
                record.update(evaluate.sample_quality(self, a.eval_samples))
            if record["fid"] < self.best_fid:
                self.best_fid = record["fid"]
                checkpoint.save(self, e, "best.pth")
        if self.tensorboard:
            self.tensorboard.scalars(self.step, **{k: record[k] for k in ("fid", "kid") if k in record})
        records = evaluate.append_metrics(os.path.join(a.save_dir, "metrics.jsonl"), record)
        evaluate.plot_curves(records, os.path.join(a.save_dir, "loss.png"))
        self.console.print(f"epoch {e}: mean loss {loss:.4f}, {secs:.1f}s, "
                           f"{seen / secs:.0f} img/s, {'saved ' + path if path else 'NOT saved'}")

    # -- sampling and measuring ----------------------------------------------------------------

    def sample(self) -> None:
        """--batch-size samples: ddpm-<i>.png, ddpm-all.png, reverse-steps.png (and the cascade)."""
        a = self.args
        sr = superres.cascade(self) if a.sr_ckpt else None  # checked before any sampling
        x0, frames = self.draw(a.batch_size)
        for i, img in enumerate(x0):
            self.save_grid(img[None], f"ddpm-{i}.png", nrow=1)
        self.save_grid(x0, "ddpm-all.png", nrow=math.ceil(math.sqrt(len(x0))))
        monitor.save_reverse_strip(self, frames, "reverse-steps.png")
        self.console.print(f"wrote {len(x0)} samples to {a.save_dir}/ddpm-*.png, "
                           f"ddpm-all.png and reverse-steps.png")
        if sr:
            superres.save_sr(sr, x0, superres.super_resolve(sr, x0), [str(i) for i in range(len(x0))])

    def run(self) -> None:
        """The one thing asked: the first command whose flag is given, in this order."""
        a = self.args
        commands = [
            (a.train, self.train), (a.lowres_folder, lambda: superres.sample_folder(self)),
            (a.eval_sr, lambda: superres.evaluate_sr(self, a.eval_sr)),
            (a.eval_prompts, lambda: prompts.evaluate_prompts(self, a.eval_prompts)),
            (a.init_folder and (a.mask_folder or a.mask_box), lambda: edit.inpaint(self)),
            (a.init_folder, lambda: edit.img2img(self)),
            (a.interpolate or a.interpolate_seeds, lambda: edit.interpolate(self)),
            (a.prompt, lambda: prompts.sample_prompts(self)),
            (a.eval_fid, lambda: evaluate.sample_quality(self, a.eval_fid)),
            (a.eval_bpd, lambda: evaluate.likelihood(self, a.eval_bpd)), (True, self.sample)]
        next(command for given, command in commands if given)()
        if self.world > 1:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        args, typed = config.parse_args(argv)
        if args.info or args.export:
            checkpoint.inspect(args)
        else:
            Program(args, typed).run()
    except (UserError, DataError, CaptionError, evaluate.MissingNetwork) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `--info ckpt.pth | head`: the reader has gone; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
