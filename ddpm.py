"""ddpm.py: train a denoising diffusion model on a folder of images, then draw new ones.

Follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM): Algorithm 1 to train,
Algorithm 2 to sample. `python ddpm.py --help` lists every option (declared in config.py, which
also works out the run's frozen Settings); the maths is in core/diffusion.py, the network in
unet.py, one optimizer step in run/trainer.py, what each kind of model trains on in
features/kinds.py (plain), text.py, superres.py and augment.py. The layers: docs/design.md.

Notation: Python t = 0..T-1 is the paper's step t+1; betas, alpha_bars (ab), q_sample (x_t from
x_0 and eps), p_sample (x_t -> x_{t-1}); eps is the true noise, eps_hat the network's.
"""
if __name__ == "__main__":  # --help and flag errors answer before torch loads (it takes seconds)
    import config
    config.check_command_line()

import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import Tensor

import config
import settings
from core import spec
from data import DataError, to_model
from features import edit, evaluate, prompts, superres
from features.kinds import make_model
from features.text import CaptionError, Vocab, caption_tokens
from run import checkpoint, monitor
from run.checkpoint import RunState
from run.dataset import ImageDataset, training_images
from run.drawing import Drawer
from run.trainer import (MAX_BAD_STEPS, NonFiniteLoss, Trainer, default_lr, ema_decay,
                         init_distributed, lr_at, pick_device, seed_everything, shared_seed)
from ui import RunLength, UserError, long_run_warning, make_console


LONG_RUN_S = 600.0  # a CPU run expected to take this long gets a note with its expected time


class Program:
    """One run: its flags, device, data, model kind, networks (trainer) and outputs; `run` does
    what was asked. parent: the run this one is the super-resolution stage of (a cascade): it
    shares the parent's processes and console."""

    def __init__(self, args, typed: set[str], parent: "Program | None" = None):
        if parent:
            self.rank, self.world, self.console = parent.rank, parent.world, parent.console
            device = str(parent.device)
        else:
            self.rank, self.world, device = init_distributed(settings.device_of(args.device))
            self.console = make_console(quiet=self.rank != 0)
        self.is_main = self.rank == 0  # only the first process writes files and prints
        self.typed = frozenset(typed)  # the flags given on the command line (a cascade's stage)
        # The settings, worked out once (settings.resolve; the checkpoint read and applied) and
        # then only read: each part goes to what uses it.
        cfg, ckpt = settings.resolve(args, typed, checkpoint.reader(self.rank, self.world),
                                   cascade=parent is not None)
        # --distill from a teacher's checkpoint: a new run, of a student that starts as it.
        self.new_student = bool(cfg.train.train and cfg.train.distill and ckpt and
                                spec.read(ckpt).student_steps != cfg.model.student_steps)
        if self.new_student:
            self.console.print(f"teacher: {cfg.sample.loadckpt} (step {ckpt['step']}); a new "
                               f"student for {cfg.model.student_steps} step(s) starts from its "
                               f"EMA weights")
        elif ckpt:
            batch = f"batch {ckpt['batch']}, " if ckpt.get("batch") else ""  # in mid-epoch
            self.console.print(f"loaded {cfg.sample.loadckpt} (epoch {ckpt['epoch']}, {batch}"
                               f"step {ckpt['step']})")
        self.device, amp_dtype = pick_device(device, cfg.train.precision)
        if cfg.train.batch_size % self.world:
            raise UserError(f"--batch-size {cfg.train.batch_size} (the global batch) must be "
                            f"divisible by the {self.world} processes")
        seed = shared_seed(cfg.train.seed, self.world)
        if cfg.train.seed is not None or self.world > 1:
            seed_everything(seed)
        self.data_gen = torch.Generator().manual_seed(seed)
        # A text model's vocabulary comes from its checkpoint, or from the captions of a new run.
        self.cfg, self.data = cfg, None
        self.vocab = Vocab.from_state(ckpt["text"]) if ckpt and ckpt.get("text") else None
        if cfg.train.train:
            self.data, self.vocab = self.load_data(self.vocab)
        unet, self.kind = make_model(
            cfg.model, self.vocab, cond_drop=cfg.train.cond_drop,
            sr_noise_max=cfg.train.sr_noise_max, sr_noise=cfg.sample.sr_noise,
            preview_images=self.data.images[:8] if self.data else None)
        if cfg.train.lr is None:  # the last derived setting: the default follows the UNet's size
            params = sum(p.numel() for p in unet.parameters())
            self.cfg = cfg = settings.with_lr(cfg, default_lr(params))
        teacher, teacher_steps = self.load_teacher(ckpt) if cfg.train.distill else (None, 0)
        self.trainer = Trainer(unet, cfg.model, cfg.train, self.kind, self.device,
                               amp_dtype=amp_dtype, rank=self.rank, world=self.world,
                               teacher=teacher, teacher_steps=teacher_steps)
        self.drawer = Drawer(cfg.model, cfg.sample, self.kind, self.trainer, self.console,
                             batch_size=cfg.train.batch_size, save_dir=cfg.output.save_dir,
                             vocab=self.vocab, quiet=not self.is_main)
        self.state = RunState()
        # A resumed run keeps its id (the folder's checkpoints are its own); a new run gets one.
        resumed = None if self.new_student else ckpt
        self.run_id = (resumed or {}).get("run_id") or checkpoint.new_run_id()
        self.saved = True  # whether the last checkpoint save succeeded (the exit code says)
        if resumed:
            self.restore(resumed, typed)
        elif teacher is not None:
            self.trainer.model.load_state_dict(teacher.state_dict())
            self.trainer.ema.load_state_dict(teacher.state_dict())
        self.make_folders()
        self.grids = None  # monitor.ProgressGrids, made at the first progress grid
        self.clock = time.monotonic  # what --max-minutes is measured with (seconds)
        self.deadline, self.out_of_time = math.inf, False  # --max-minutes: set as training starts
        self.writer = checkpoint.Writer(self.console.print)  # saves on a thread of their own
        self.last_save = 0.0  # self.clock() at the last save (--save-every-minutes)
        self.save_due = False  # --save-every-minutes: as last read (read_flags)
        # A stop signal (SIGTERM, SIGUSR1, Ctrl-C) as it arrived, and as the processes agreed
        # on it (read_flags): the run stops after the step in progress, saves, and exits.
        self.stop = self.stopping = None
        self.epoch_rng = None  # the data generator's state at the epoch's start (the saves')
        self.tensorboard = (monitor.TensorBoard(cfg.output.save_dir)
                            if cfg.train.train and cfg.train.tensorboard and self.is_main else None)
        if not parent:
            params = sum(p.numel() for p in self.trainer.model.parameters())
            monitor.summary(self.drawer, cfg, params=params, n_images=len(self.data or ()),
                            amp_dtype=amp_dtype, world=self.world, write=self.is_main)

    def load_teacher(self, ckpt: dict) -> tuple[torch.nn.Module, int]:
        """A distillation's teacher -> (its network, its steps: 0 for a diffusion model): the
        loaded checkpoint's EMA weights for a new student, else the teacher the run's
        checkpoints hold. The same UNet as the student's (the spec differs in student_steps
        only)."""
        unet, _ = make_model(self.cfg.model, self.vocab)
        weights, steps = ((ckpt.get("ema", ckpt["model"]), spec.read(ckpt).student_steps)
                          if self.new_student else
                          (ckpt["teacher"]["ema"], ckpt["teacher"]["student_steps"]))
        try:
            unet.load_state_dict(weights)
        except RuntimeError as e:
            raise UserError(f"the teacher's weights in {self.cfg.sample.loadckpt} do not fit its "
                            f"config: {str(e).strip().splitlines()[0][:120]}") from None
        return unet, steps

    def restore(self, ckpt: dict, typed: set[str]) -> None:
        """Weights, optimizer and counters from ckpt; for training also the RNG states."""
        try:
            self.trainer.load_state_dict(ckpt, self.cfg.train.lr)
            self.state = checkpoint.run_state(ckpt, typed)
            if self.cfg.train.train:
                checkpoint.restore_rng(ckpt, self.data_gen, self.device)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:120]
            raise UserError(f"checkpoint {self.cfg.sample.loadckpt} does not fit this program "
                            f"(damaged, or from another version): {type(e).__name__}: {first}"
                            ) from None

    def make_folders(self) -> None:
        c = self.cfg
        for folder in (c.output.save_dir, c.output.ckpt_save_dir if c.train.train else None):
            try:
                if folder:
                    os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create folder {folder}: {e.strerror}") from None
            if folder and not os.access(folder, os.W_OK):
                raise UserError(f"cannot write to folder {folder}: choose another one")

    # -- training ------------------------------------------------------------------------------

    def load_data(self, vocab: Vocab | None) -> tuple[ImageDataset, Vocab | None]:
        """The training images, and with --captions their caption tokens -> (the dataset, the
        vocabulary: vocab, or for a new run (None) the one built from the captions)."""
        c, t0, tokens = self.cfg, time.time(), None
        # Under torchrun the first process of each node decodes the images into the cache, and
        # the others wait for it, then read the cache: the images are decoded once a node.
        shared = self.world > 1 and bool(c.data.cache_dir) and not c.data.demo
        first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if shared and not first:
            dist.barrier()
        images, paths, resident = training_images(c.data, c.model, self.device,
                                                  self.console.print)
        if shared and first:
            dist.barrier()
        if c.model.captions != "off" and not c.data.demo:
            tokens, vocab = caption_tokens(paths, c.data.data_folders, c.model.captions, vocab,
                                           self.console.print)
        self.console.print(f"training set ready in {time.time() - t0:.1f}s")
        return ImageDataset(images, self.device, tokens, hflip=c.train.hflip == "on",
                            resident=resident), vocab

    def train_step(self, x0: Tensor, tokens: Tensor | None) -> Tensor:
        """One optimizer step on a batch (this process's share): the learning rate of the step,
        Trainer.step, the counters -> the batch's mean loss (on the device). A step skipped for a
        non-finite loss is taken off the counters at the next `check_steps`."""
        c, s = self.cfg, self.state
        lr = lr_at(s.step, c.train.lr, c.train.lr_warmup, c.train.lr_schedule, s.schedule_steps)
        loss = self.trainer.step(x0, tokens, lr, ema_decay(s.step + 1, c.train.ema_decay))
        s.step, s.images_seen = s.step + 1, s.images_seen + len(x0) * self.world
        return loss

    def check_steps(self) -> None:
        """The steps skipped on the device since the last check (a host read) taken off the
        counters, with a warning; NonFiniteLoss after MAX_BAD_STEPS in a row."""
        steps, images, in_a_row = self.trainer.check()
        if steps:
            s = self.state
            s.step, s.images_seen = s.step - steps, s.images_seen - images
            self.console.print(f"warning: {steps} step(s) skipped for a non-finite loss (NaN or "
                               f"inf) before step {s.step + 1}; the weights are untouched")
        if in_a_row >= MAX_BAD_STEPS:
            raise NonFiniteLoss()

    def batches(self, skip: int = 0):
        """An epoch of (x0, tokens) batches of --batch-size x --grad-accum: this process's share,
        from batch `skip` on. A compiled model skips the last partial batch (a new shape would
        recompile it)."""
        c, t = self.cfg, self.cfg.train
        batches_of = (self.data.batches_with_tokens if c.data.data_path == "device"
                      else self.data.plain_batches)
        return batches_of(t.batch_size * t.grad_accum, self.data_gen, self.rank, self.world,
                          drop_last=t.compile, skip=skip)

    def plan(self) -> int:
        """This run's steps (self.planned: --epochs, or fewer to --max-steps) and the learning
        rate schedule's length (kept from the checkpoint when resumed) -> batches an epoch."""
        t, s = self.cfg.train, self.state
        per_epoch = self.data.num_batches(t.batch_size * t.grad_accum, self.world, t.compile)
        s.schedule_steps = s.schedule_steps or t.max_steps or s.step + t.epochs * per_epoch
        planned = min(t.epochs * per_epoch, t.max_steps - s.step if t.max_steps else math.inf)
        self.planned = max(planned, 0)
        return per_epoch

    def train_loop(self) -> None:
        """Algorithm 1, epoch after epoch: a step per batch, the figures on the progress bars
        every 10 steps, a progress grid every --sample-every steps, a checkpoint (and FID) at
        each epoch's end; --epochs, --max-steps or --max-minutes ends it."""
        t, s = self.cfg.train, self.state
        start = self.last_save = self.clock()  # --save-every-minutes counts from here
        self.deadline = start + 60 * t.max_minutes if t.max_minutes else math.inf
        per_epoch = self.plan()
        self.run_length = RunLength(self.planned, clock=self.clock)
        with self.drawer.progress("info") as progress:
            run_bar = progress.add_task("this run", total=self.planned, info="")
            for e in range(s.epoch, s.epoch + t.epochs):
                self.read_flags()  # the last epoch's end waited for the device
                if self.done():
                    break
                self.train_epoch(e, progress, run_bar, per_epoch)
        if self.out_of_time:
            self.console.print(f"--max-minutes {t.max_minutes:g} spent: stopped at step {s.step} "
                               f"after {(self.clock() - start) / 60:.1f} minutes of training")

    def note_long_run(self, seconds_per_step: float, total: float) -> None:
        """On a CPU, one line with the whole run's expected time when it is long (ui)."""
        c = self.cfg
        default_64 = settings.is_default_model(c.model)
        steps = self.planned
        if c.train.max_minutes:  # at most what --max-minutes leaves room for
            steps = min(steps, math.ceil(60 * c.train.max_minutes / seconds_per_step))
            total = min(total, 60 * c.train.max_minutes)
        line = long_run_warning(seconds_per_step, total, steps, self.device.type, default_64,
                                LONG_RUN_S)
        if line:
            self.console.print(line)

    def done(self) -> bool:
        """--max-steps reached, --max-minutes spent or a stop signal agreed (as last read)."""
        c = self.cfg
        return (bool(c.train.max_steps) and self.state.step >= c.train.max_steps
                or self.out_of_time or self.stopping is not None)

    def read_flags(self) -> None:
        """Whether --max-minutes are spent, a stop signal came and a --save-every-minutes save is
        due, read where the loop waits for the device anyway: the host queues steps ahead of the
        device, so its clock between those points runs early. Under torchrun the processes
        agree (any one's clock, any one's signal), so that all stop, or save, at one step."""
        t, now = self.cfg.train, self.clock()
        flags = [float(now >= self.deadline), float(self.stop or 0),
                 float(bool(t.save_every_minutes) and now - self.last_save
                       >= 60 * t.save_every_minutes)]
        if self.world > 1:
            agreed = torch.tensor(flags, dtype=torch.float64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        self.out_of_time, self.save_due = bool(flags[0]), bool(flags[2])
        self.stopping = int(flags[1]) or None

    def on_signal(self, signum: int, frame) -> None:
        """SIGTERM, SIGUSR1 or Ctrl-C while training: stop after the step in progress (and save).
        A second Ctrl-C stops at once, without a save."""
        if self.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = self.stop or signum

    def train_epoch(self, e: int, progress, run_bar, per_epoch: int) -> None:
        """Epoch e from its batch state.batch on (a resume in mid-epoch): its steps with their
        bar, the figures every 10 steps, a progress grid every --sample-every steps (default:
        once an epoch), a checkpoint every --save-every steps or --save-every-minutes, then
        end_epoch (also when the run stops in mid-epoch)."""
        c, s = self.cfg, self.state
        every = per_epoch if c.train.sample_every is None else c.train.sample_every
        bar = progress.add_task(f"epoch {e}", total=per_epoch, completed=s.batch, info="")
        self.epoch_rng = self.data_gen.get_state()  # the epoch's order and flips come from it
        t0, seen, steps = time.time(), 0, 0
        loss_sum, counted = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x0, tokens in self.batches(skip=s.batch):
            loss = self.train_step(x0, tokens)
            s.batch += 1
            ok = self.trainer.ok  # on the device: a skipped step's loss is not averaged
            steps, seen = steps + 1, seen + len(x0) * self.world
            loss_sum, counted = loss_sum + torch.where(ok, loss, 0.0), counted + ok
            progress.advance(bar)
            if speed := self.run_length.tick():  # known after the warm-up: is the run long?
                self.note_long_run(*speed)
            if steps % 10 == 1:  # the host reads the device here only: the figures, the guard
                self.check_steps()
                monitor.log_step(progress, (bar, run_bar), self.tensorboard, step=s.step,
                                 loss=loss.item(),
                                 lr=self.trainer.optimizer.param_groups[0]["lr"],
                                 img_s=seen / (time.time() - t0))
                self.read_flags()
            elif self.world == 1:  # one process: a signal is seen at once
                self.stopping = self.stop
            if self.is_main and every and s.step % every == 0:
                self.progress_grid()
            progress.advance(run_bar)
            if self.done():
                break
            due = self.save_due or c.train.save_every and s.step % c.train.save_every == 0
            if due and s.batch < per_epoch:  # (the epoch's end saves anyway)
                self.check_steps()  # the counters exact, as saved
                self.save_checkpoint()
        progress.remove_task(bar)
        self.check_steps()
        self.end_epoch(e, (loss_sum / counted.clamp(min=1)).item(), seen, time.time() - t0,
                       complete=s.batch >= per_epoch)

    def progress_grid(self):
        """The fixed-noise grid of this step (monitor.ProgressGrids), also to TensorBoard ->
        its uint8 (H, W, C) picture."""
        self.grids = self.grids or monitor.ProgressGrids(self.cfg.model, self.cfg.output.save_dir)
        row = self.grids.draw(self.drawer, self.state.step)
        if self.tensorboard:
            self.tensorboard.image(self.state.step, "progress", row)
        return row

    def train(self) -> None:
        """The training run, owning its checkpoint folder (checkpoint.claim_folder: no other
        run's checkpoints, no second live run) until its last save is written; the exit code
        says how it ended and whether its last save succeeded (checkpoint.exit_code;
        docs/safety.md)."""
        c = self.cfg
        resuming = bool(c.sample.loadckpt) and not self.new_student
        lock = (checkpoint.claim_folder(c.output.ckpt_save_dir, self.run_id, resuming,
                                        c.train.start_over)
                if self.is_main else None)
        try:
            how = self.train_run()
        finally:
            with checkpoint.signals_held(deliver=False):  # a save is never cut short
                self.writer.wait()
            if lock:
                lock.release()
        code = checkpoint.exit_code(how, self.saved)
        if code:
            sys.exit(code)

    def train_run(self) -> str:
        """The run with its pictures -> how it ended: done, nonfinite, or stopped by a signal
        (checkpoint.STOPPED: terminated by SIGTERM, requeue by SIGUSR1, interrupted by Ctrl-C),
        which saves a checkpoint of where the run is first (a resume goes on from there)."""
        c, s = self.cfg, self.state
        if self.is_main:
            with self.drawer.side_rng():
                monitor.save_forward_strip(self.drawer, to_model(self.data.images[:4]))
            monitor.strip(self.drawer, "run-before")
        if c.train.resume and not c.sample.loadckpt:
            self.console.print(f"--resume: no checkpoint in {c.output.ckpt_save_dir}/ yet, so a "
                               f"new run begins there")
        previous = {n: signal.signal(n, self.on_signal) for n in checkpoint.STOPPED}
        try:
            self.train_loop()
        except NonFiniteLoss:
            path = self.save_checkpoint(wait=True)
            self.console.print(
                f"stopped: the loss was not finite {MAX_BAD_STEPS} steps in a row; the last good "
                f"weights are in {path} (step {s.step}). Lower --lr (now {c.train.lr}) or "
                f"--grad-clip, or look for broken images in the data, then resume with --loadckpt")
            return "nonfinite"
        finally:
            try:
                self.writer.wait()  # the last save is on disk before the signals' handlers go
            finally:
                for n, handler in previous.items():
                    signal.signal(n, handler)
                if self.tensorboard:
                    self.tensorboard.close()
        if self.stopping is not None:  # end_epoch saved where the run is
            how = checkpoint.STOPPED[self.stopping]
            self.console.print(f"stopped by {signal.Signals(self.stopping).name}: saved at "
                               f"epoch {s.epoch}, batch {s.batch}, step {s.step}; --resume goes "
                               f"on from there")
            if how != "interrupted":  # a scheduler's stop: no time for pictures
                return how
        else:
            how = "done"
        if self.is_main:
            monitor.strip(self.drawer, "run-after")
        self.console.print(f"pictures in {c.output.save_dir}/: forward-steps.png, run-before.png, "
                           f"run-after.png, progress.png, loss.png; metrics.jsonl")
        return how

    def save_checkpoint(self, name: str = "", wait: bool = False, done=None):
        """The run's checkpoint, into the rotation's next file (checkpoint.rotation_name) or
        `name`, in --ckpt-save-dir -> its path. Only the first process writes, on the writer's
        thread (checkpoint.Writer: training goes on meanwhile); wait: until the file is written
        (then None if it failed). done(path or None): called when it is. A signal that
        arrives meanwhile stops the run after the save, never in it."""
        c, s = self.cfg, self.state
        self.last_save, self.save_due = self.clock(), False
        if not name:
            s.saves += 1
        if not self.is_main:
            return None
        path = os.path.join(c.output.ckpt_save_dir, name or checkpoint.rotation_name(s.saves - 1))
        # Mid-epoch the data generator has drawn the epoch's order: store its state before it.
        data_rng = self.epoch_rng if s.batch and self.epoch_rng is not None else \
            self.data_gen.get_state()
        ckpt = checkpoint.state(c.model, c.train, self.run_id, s, self.trainer.state_dict(),
                                vocab=self.vocab, data_rng=data_rng, device=self.device)
        written = [None]

        def finished(result):
            written[0] = result
            if not name:  # best.pth is an extra: the rotation holds the run
                self.saved = result is not None
            if done:
                done(result)
        self.writer.write(path, ckpt, finished)
        if wait:
            self.writer.wait()
            return written[0]
        return path

    def end_epoch(self, e: int, loss: float, seen: int, secs: float, complete: bool) -> None:
        """Checkpoint (of the next epoch's start, or of where a run that stopped in mid-epoch
        is), metrics.jsonl + loss.png, FID every --eval-every epochs, one line (printed when the
        checkpoint is written)."""
        c, s = self.cfg, self.state
        if complete:
            s.epoch, s.batch = e + 1, 0
        record = {"epoch": e, "step": s.step, "loss": loss,
                  "lr": self.trainer.optimizer.param_groups[0]["lr"],
                  "img_per_s": seen / secs, "seconds": secs}
        line = (f"epoch {e}: mean loss {loss:.4f}, {secs:.1f}s, {seen / secs:.0f} img/s, "
                + "{}")
        self.save_checkpoint(done=lambda path: self.console.print(
            line.format(f"saved {path}" if path else "NOT saved")))
        ev = c.evaluation
        if ev.eval_every and (e + 1) % ev.eval_every == 0 and self.stopping is None:
            with self.drawer.side_rng():  # every process draws its share
                record.update(evaluate.sample_quality(
                    self.drawer, c.data, ev.eval_samples, eval_folders=ev.eval_folders,
                    rank=self.rank, world=self.world))
        if not self.is_main:
            return
        if record.get("fid", math.inf) < s.best_fid:
            s.best_fid = record["fid"]
            self.save_checkpoint("best.pth")
        if self.tensorboard:
            self.tensorboard.scalars(s.step, **{k: v for k, v in record.items()
                                                if k in ("fid", "kid")})
        records = evaluate.append_metrics(os.path.join(c.output.save_dir, "metrics.jsonl"), record)
        evaluate.plot_curves(records, os.path.join(c.output.save_dir, "loss.png"))

    # -- sampling and measuring ----------------------------------------------------------------

    def sr_stage(self) -> Drawer | None:
        """--sr-ckpt: the cascade's super-resolution stage (its flags from its checkpoint, the
        sampler flags shared), checked to fit this base model."""
        if not self.cfg.sample.sr_ckpt:
            return None
        sr = Program(settings.cascade_args(self.cfg, self.typed),
                     self.typed & settings.CASCADE_TYPED, parent=self)
        superres.check_cascade(self.cfg.model, sr.cfg.model, self.cfg.sample.sr_ckpt)
        return sr.drawer

    def run(self) -> None:
        """The one thing asked: the first command whose flag is given, in this order."""
        c, drawer, e, ev = self.cfg, self.drawer, self.cfg.edit, self.cfg.evaluation
        commands = [
            (c.train.train, self.train),
            (c.sample.lowres_folder, lambda: superres.sample_folder(drawer)),
            (ev.eval_sr, lambda: superres.evaluate_sr(drawer, c.data, ev.eval_sr)),
            (ev.eval_prompts, lambda: prompts.evaluate_prompts(
                drawer, ev.eval_prompts, samples=ev.eval_samples, cache_dir=c.data.cache_dir)),
            (e.init_folder and (e.mask_folder or e.mask_box), lambda: edit.inpaint(drawer, e)),
            (e.init_folder, lambda: edit.img2img(drawer, e)),
            (e.interpolate or e.interpolate_seeds, lambda: edit.interpolate(drawer, e)),
            (c.sample.prompt, lambda: prompts.sample_prompts(drawer, self.sr_stage())),
            (ev.eval_fid, lambda: evaluate.sample_quality(drawer, c.data, ev.eval_fid,
                                                          eval_folders=ev.eval_folders)),
            (ev.eval_bpd, lambda: evaluate.likelihood(drawer, self.load_data(self.vocab)[0].images,
                                                      ev.eval_bpd)),
            (True, lambda: monitor.write_samples(drawer, self.sr_stage()))]
        next(command for given, command in commands if given)()
        if self.world > 1:  # together: a process that leaves its group while another is still
            dist.barrier()  # at work (the first one's pictures) can abort at exit in gloo
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        args, typed = config.parse_args(argv)
        if args.info:
            checkpoint.info(args.info, args.ckpt_save_dir)
        elif args.export:
            cfg, ckpt = settings.resolve(args, typed, checkpoint.read)
            checkpoint.export_weights(ckpt, cfg.sample.loadckpt, cfg.output.export)
        else:
            Program(args, typed).run()
    except (UserError, DataError, CaptionError, evaluate.MissingNetwork) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (sampling, measuring): nothing to save
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `--info ckpt.pth | head`: the reader has gone; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
