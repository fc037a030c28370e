"""One optimizer step of Algorithm 1 (Ho et al. 2020) and everything it changes: the UNet, its
EMA copy, Adam, the loss scaler and the timestep sampler. `Trainer.step` is the step that the
training loop (ddpm.py) and the benchmark (tools/bench.py) both call.

What a batch trains on (the image or a residual, captions, a low-res input, augmentation labels)
is the model kind's answer (the `kinds.ModelKind` interface: kinds.Plain, text.Captioned,
superres.SuperRes, augment.Augmented).
"""
import contextlib
import copy
import datetime
import functools
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from core.configs import TrainConfig
from core.diffusion import GaussianDiffusion, ImportanceSampler, lognormal_t_probs
from core.distill import Distillation
from core.spec import ModelSpec, hw
from features.kinds import ModelKind
from ui import UserError

MAX_BAD_STEPS = 5  # non-finite losses in a row before a run stops
FUSED_DEVICES = ("cuda", "cpu")  # fused Adam: one kernel per tensor; it skips a step on the device


class NonFiniteLoss(Exception):
    """The loss was NaN or infinite MAX_BAD_STEPS steps in a row."""


def micro_batches(n: int, k: int) -> list[slice]:
    """range(n) cut into consecutive slices of ceil(n / k) images (--grad-accum k): at most k
    slices, fewer when k does not divide n evenly (n = 9, k = 4: sizes 3, 3, 3); the last may
    be short."""
    m = math.ceil(n / k)
    return [slice(i, min(i + m, n)) for i in range(0, n, m)]


def ema_decay(step: int, max_decay: float) -> float:
    """EMA decay at optimizer step `step` (1, 2, ...), warmed up:
    min(max_decay, (1 + step) / (10 + step))."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, ok: Tensor | None = None) -> None:
    """ema <- ema + w (model - ema) = decay * ema + (1 - decay) * model, w = 1 - decay, for every
    parameter; where ok (a 0-dim bool tensor on the device) is False, w = 0 and ema stays as it
    is (a skipped step), without a host read."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if ok is None:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        return
    w = ok.to(params[0].dtype) * (1.0 - decay)  # () on the device, the parameters' dtype
    if w.device.type == "cpu":  # foreach ops loop over the tensors here: lerp, one pass each
        torch._foreach_lerp_(ema_params, params, [w] * len(params))
    else:
        ema_step(ema_params, params, w)


@torch.no_grad()
def ema_step(ema_params: list[Tensor], params: list[Tensor], w: Tensor) -> None:
    """ema += w (model - ema) with one 0-dim weight tensor w on the device, in three multi-tensor
    ops (difference, scale, add): a few kernel launches for all parameters on a GPU, where lerp
    with a list of 0-dim weights launches one kernel per parameter."""
    delta = torch._foreach_sub(params, ema_params)  # model - ema
    torch._foreach_mul_(delta, w)
    torch._foreach_add_(ema_params, delta)


def lr_at(step: int, lr: float, warmup: int, schedule: str, total: int) -> float:
    """The learning rate of optimizer step `step` (0, 1, ...): linear warm-up to lr over `warmup`
    steps ((step + 1) / warmup), then constant, or cosine from lr to 0.1 lr at step `total`:
    lr (0.1 + 0.9 (1 + cos(pi min(step / total, 1))) / 2)."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "cosine" and total > 0:
        scale *= 0.1 + 0.9 * (1 + math.cos(math.pi * min(step / total, 1.0))) / 2
    return lr * scale


def default_lr(params: int) -> float:
    """--lr when not given: 1e-3 up to 1 M parameters (the small models of the recipe study),
    shrinking as 1 / sqrt(parameters) above, at least 1e-4 (1.3e-4 at 63 M, between the 1e-4
    of Nichol & Dhariwal 2021 and EDM's 2e-4 at 64 px)."""
    return max(1e-4, 1e-3 * min(1.0, math.sqrt(1e6 / params)))


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 natively (compute capability 8.0 on, Ampere and later);
    torch.cuda.is_bf16_supported() also says yes where it is only emulated (T4, V100), slowly."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pick_device(name: str, precision: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None: fp32). auto: on a GPU bf16 where it is native,
    else fp16 (with loss scaling); fp32 on the CPU, where bf16 is slow. On a GPU also lets
    cuDNN pick its fastest convolutions and fp32 matrix products use TF32."""
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
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.backends.cudnn.benchmark = True  # the input shapes repeat: measure once, reuse
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else "bf16" if native_bf16(device) else "fp16"
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} only emulates "
                        f"bf16, slowly; use fp16 (the default there) or fp32")
    return device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def init_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (its RANK / WORLD_SIZE / LOCAL_RANK environment): join the process group
    (NCCL on GPUs, gloo on CPUs) -> (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:  # each process on its own GPU, before NCCL starts
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # The first process alone measures FID after the others have drawn their share of the
    # samples; the first time it also extracts the training set's features (cached after),
    # which can take minutes while the others wait in the next step: wait up to 30 minutes.
    timeout = datetime.timedelta(minutes=30)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    # Each launch of torchrun's --max-restarts its own keys in the rendezvous store: a restarted
    # process must not find the addresses of the round before, whose processes are gone.
    store = dist.PrefixStore(f"launch-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout)
    return dist.get_rank(), world, f"cuda:{os.environ['LOCAL_RANK']}" if cuda else device


def shared_seed(seed: int | None, world: int) -> int:
    """The run's seed: --seed, or a random one; under torchrun every process takes the first
    process's, so that the shards of an epoch partition the data (each process draws the same
    epoch order and takes its share) and the draws for the global batch agree."""
    seed = random.randrange(2**63) if seed is None else seed
    if world > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def seed_everything(seed: int) -> None:
    """Python's, NumPy's (which takes 32 bits of the seed) and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """The networks of a run and its optimizer step. model: the UNet being trained; net: what
    the loss calls, the model itself or its DDP wrapper when world > 1 (compiled with
    --compile); ema: the model's EMA copy, the weights we sample with; diffusion: the forward
    process and the losses, given net; amp_dtype: autocast dtype or None (fp32). unet and
    kind: what kinds.make_model built from model_spec; train: the step's settings (lr set).
    teacher: with --distill, the frozen network the student (unet) learns from, a student of
    teacher_steps steps or a diffusion model (0); the step's loss is then distill's."""

    def __init__(self, unet: nn.Module, model_spec: ModelSpec, train: TrainConfig,
                 kind: ModelKind, device: torch.device, *, amp_dtype: torch.dtype | None,
                 rank: int = 0, world: int = 1, teacher: nn.Module | None = None,
                 teacher_steps: int = 0):
        a, m = train, model_spec
        self.train, self.kind, self.device, self.amp_dtype = train, kind, device, amp_dtype
        self.rank, self.world = rank, world
        self.model = unet.to(device)
        self.diffusion = GaussianDiffusion(
            m.timesteps, m.beta_min, m.beta_max, schedule=m.schedule,
            prediction=m.prediction, min_snr_gamma=a.min_snr_gamma, learn_sigma=m.learn_sigma,
            image_side=max(hw(m.img_size))).to(device)
        self.model.grad_checkpoint = a.grad_checkpoint
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.importance = ImportanceSampler(m.timesteps) if a.importance_sampling else None
        # --t-sampling lognormal: t = the first index whose cumulative probability passes u ~ U(0, 1)
        self.t_cdf = (lognormal_t_probs(self.diffusion.ab64).cumsum(0).float().to(device)
                      if a.t_sampling == "lognormal" else None)  # (T,)
        self.teacher, self.teacher_steps, self.distill = teacher, teacher_steps, None
        if teacher is not None:  # a diffusion teacher's solves clip x0 as its sampling does
            teacher.to(device).eval().requires_grad_(False)
            self.distill = Distillation(self.diffusion, teacher, m.student_steps,
                                        teacher_steps=teacher_steps, calls=a.teacher_calls,
                                        clip_x0=not teacher_steps)
        self.net = self.model
        if world > 1:  # training goes through DDP (gradients averaged); sampling does not
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if a.compile:  # in place: state_dict keys and the objects other code holds stay the
            # same; the DDP wrapper is compiled (not wrapped around a compiled module), so that
            # the compiler can overlap its gradient buckets with the backward pass
            self.net.compile()
            self.ema.compile()
            if teacher is not None:
                teacher.compile()
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        # Skipped steps, counted on the device and read by the host in `check` (no sync a step).
        zero = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        self.skipped, self.skipped_images, self.bad_in_a_row = zero(), zero(), zero()
        self.ok = torch.ones((), dtype=torch.bool, device=device)  # did the last step count

    @functools.cached_property
    def optimizer(self) -> torch.optim.Adam:
        """Adam over the model's weights, made when first used: sampling never makes one (making
        one imports torch's compiler, seconds of every start on a CPU). Fused (one kernel per
        tensor) on CUDA and CPU: the same update, about 7x faster than the per-op loop on a CPU
        core, and it can skip a step on the device (found_inf)."""
        return torch.optim.Adam(self.model.parameters(), lr=self.train.lr,
                                fused=self.device.type in FUSED_DEVICES)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, x0: Tensor, tokens: Tensor | None, lr: float, decay: float) -> Tensor:
        """One optimizer step on this process's share x0 (B, C, H, W) of a global batch (tokens
        (B, L) or None): the kind's target and conditioning -> t, eps -> loss by micro-batch ->
        backward -> clip -> Adam at lr -> EMA with `decay` -> the batch's mean loss (a 0-dim
        tensor on the device). A non-finite loss or gradient skips the step on the device (no
        NaN reaches the weights; self.ok says so, `check` counts); nothing here waits for the
        device, unless --importance-sampling (its loss history lives on the host)."""
        a, dev, world = self.train, self.device, self.world
        # t and eps for the whole global batch of n, this process's share taken as the data is:
        # N processes draw what one process with the global batch would.
        n, share = len(x0) * world, slice(self.rank, None, world)
        target, cond = self.kind.train_batch(x0, tokens, n, share)
        t_all, w_all = (self.importance.sample(n, dev) if self.importance
                        else (self.distill.draw(n, dev) if self.distill else self.draw_t(n), None))
        t, eps = t_all[share], torch.randn(n, *target.shape[1:], device=dev)[share]
        w = torch.ones_like(t, dtype=torch.float) if w_all is None else w_all[share]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, per_image = self.backward(target, t, eps, w, cond)
        self.scaler.unscale_(self.optimizer)
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        ok = torch.isfinite(loss)  # () bool, on the device
        if not self.scaler.is_enabled():  # fp16's scaler skips overflowing gradients itself
            ok = ok & torch.isfinite(norm)  # (and lowers its scale: not a bad step)
        if world > 1:  # all processes skip together
            ok = ok.float()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            ok = ok.bool()
        if not self.scaler.is_enabled():  # fp16's scaler sets found_inf itself
            self.optimizer.found_inf, self.optimizer.grad_scale = (~ok).float(), None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema, self.model, decay, ok)
        if self.importance and ok.item():  # its loss history is on the host: a sync a step
            self.importance.update(t_all, self.gather_global(per_image.float()))  # global batch
        self.count(ok, n)
        return loss

    def draw_t(self, n: int) -> Tensor:
        """n training timesteps (n,) int64 on the device, uniform or as --t-sampling says."""
        if self.t_cdf is None:
            return torch.randint(0, self.diffusion.T, (n,), device=self.device)
        u = torch.rand(n, device=self.device)
        return torch.searchsorted(self.t_cdf, u).clamp(max=self.diffusion.T - 1)

    def count(self, ok: Tensor, n: int) -> None:
        """Book a step of n images on the device: skipped or not, and how many in a row."""
        self.ok = ok
        self.skipped += ~ok
        self.skipped_images += (~ok) * n
        self.bad_in_a_row = (self.bad_in_a_row + 1) * ~ok

    def check(self) -> tuple[int, int, int]:
        """Read the skip counters (a host-device sync; the loop calls it every few steps) ->
        (steps, images) skipped since the last check, and the non-finite losses in a row now."""
        skipped, images, in_a_row = torch.stack(
            [self.skipped, self.skipped_images, self.bad_in_a_row]).tolist()
        self.skipped.zero_()
        self.skipped_images.zero_()
        return skipped, images, in_a_row

    def backward(self, x0: Tensor, t: Tensor, eps: Tensor, w: Tensor, cond: dict):
        """Gradients of the weighted batch-mean loss, --grad-accum micro-batches adding up (DDP
        all-reduces after the last one only) -> (mean loss, per-image losses (B,)), detached."""
        parts = micro_batches(len(x0), self.train.grad_accum)
        per_image, loss = [], torch.zeros((), device=self.device)
        losses_of = self.distill.losses if self.distill else self.diffusion.losses
        for k, part in enumerate(parts):
            sync = k == len(parts) - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.net.no_sync(), \
                    self.autocast():
                losses = losses_of(self.net, x0[part], t[part], eps[part],
                                   {c: v[part] for c, v in cond.items()})
                part_loss = (losses * w[part]).sum() / len(x0)  # -> the batch mean
            self.scaler.scale(part_loss).backward()
            per_image, loss = per_image + [losses.detach()], loss + part_loss.detach()
        return loss, torch.cat(per_image)

    def gather_global(self, x: Tensor) -> Tensor:
        """This process's share x (n / world,) of a global batch -> the global batch (n,) on the
        CPU, in global order (process r holds positions r, r + world, ...)."""
        if self.world == 1:
            return x.cpu()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.stack(parts, 1).flatten().cpu()

    def state_dict(self) -> dict:
        """The weights, EMA, optimizer and timestep sampler (and a student's teacher), as a
        checkpoint stores them."""
        teacher = ({"teacher": {"ema": self.teacher.state_dict(), "student_steps":
                                self.teacher_steps}} if self.teacher is not None else {})
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "importance": self.importance.state_dict() if self.importance else None,
                **teacher}

    def load_state_dict(self, ckpt: dict, lr: float) -> None:
        """A checkpoint's weights (its model as EMA if it has none), and its optimizer state if
        it has one, at learning rate lr (--lr applies on resume, e.g. a lower one after a NaN)."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt.get("ema", ckpt["model"]))
        if self.train.train:  # sampling makes no optimizer
            if "optimizer" in ckpt:  # fused where this device has it, whatever it was saved with
                saved = ckpt["optimizer"]
                fused = self.optimizer.defaults["fused"]
                self.optimizer.load_state_dict({**saved, "param_groups": [
                    {**group, "fused": fused} for group in saved["param_groups"]]})
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if self.importance and ckpt.get("importance"):
            self.importance.load_state_dict(ckpt["importance"])
