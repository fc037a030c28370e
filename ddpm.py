"""ddpm.py: train a denoising diffusion model on a folder of images, then draw new ones.

Follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM): Algorithm 1 to train,
Algorithm 2 to sample. `python ddpm.py --help` lists every option (declared in config.py); the
maths is in diffusion.py, the network in unet.py, one optimizer step in trainer.py, what each
kind of model trains on in trainer.py (plain), text.py, superres.py and augment.py.

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

import checkpoint
import config
import edit
import evaluate
import monitor
import prompts
import superres
from checkpoint import RunState
from config import UserError
from data import DataError, to_model
from dataset import ImageDataset, training_images
from drawing import Drawer
from text import CaptionError, Vocab, caption_tokens
from trainer import (MAX_BAD_STEPS, NonFiniteLoss, Trainer, ema_decay, init_distributed, lr_at,
                     model_kind, pick_device, resolve_lr, seed_everything, shared_seed)
from ui import RunLength, long_run_warning, make_console
from validation import validate


LONG_RUN_S = 600.0  # a CPU run expected to take this long gets a note with its expected time


class Program:
    """One run: its flags, device, data, model kind, networks (trainer) and outputs; `run` does
    what was asked. parent: the run this one is the super-resolution stage of (a cascade): it
    shares the parent's processes and console."""

    def __init__(self, args, typed: set[str], parent: "Program | None" = None):
        a = self.args = args
        if parent:
            self.rank, self.world, self.console = parent.rank, parent.world, parent.console
            device = str(parent.device)
        else:
            self.rank, self.world, device = init_distributed(a.device)
            self.console = make_console(quiet=self.rank != 0)
        self.is_main = self.rank == 0  # only the first process writes files and prints
        ckpt = self.load_checkpoint(typed) if a.loadckpt else None
        validate(a, cascade=parent is not None)
        self.device, amp_dtype = pick_device(device, a.precision)
        if a.batch_size % self.world:
            raise UserError(f"--batch-size {a.batch_size} (the global batch) must be divisible by "
                            f"the {self.world} processes")
        seed = shared_seed(a.seed, self.world)
        if a.seed is not None or self.world > 1:
            seed_everything(seed)
        self.data_gen = torch.Generator().manual_seed(seed)
        # A text model's vocabulary comes from its checkpoint, or from the captions of a new run.
        self.vocab = Vocab.from_state(ckpt["text"]) if ckpt and ckpt.get("text") else None
        self.data = self.load_data() if a.train else None
        self.kind = model_kind(a, self.vocab, self.data.images[:8] if self.data else None)
        resolve_lr(a, self.kind)
        self.trainer = Trainer(a, self.kind, self.device, amp_dtype, self.rank, self.world)
        self.drawer = Drawer(a, self.kind, self.trainer, self.console, self.vocab,
                             quiet=not self.is_main)
        self.state = RunState()
        # A resumed run keeps its id (the folder's checkpoints are its own); a new run gets one.
        self.run_id = (ckpt or {}).get("run_id") or checkpoint.new_run_id()
        self.saved = True  # whether the last checkpoint save succeeded (the exit code says)
        if ckpt:
            self.restore(ckpt, typed)
        self.make_folders()
        self.grids = None  # monitor.ProgressGrids, made at the first progress grid
        self.clock = time.monotonic  # what --max-minutes is measured with (seconds)
        self.deadline, self.out_of_time = math.inf, False  # --max-minutes: set as training starts
        self.tensorboard = (monitor.TensorBoard(a.save_dir)
                            if a.train and a.tensorboard and self.is_main else None)
        if not parent:
            params = sum(p.numel() for p in self.trainer.model.parameters())
            monitor.summary(self.drawer, params, len(self.data or ()), amp_dtype, self.world,
                            write=self.is_main)

    def load_checkpoint(self, typed: set[str]) -> dict:
        """--loadckpt read, its stored config applied to the flags."""
        a = self.args
        ckpt, a.loadckpt = checkpoint.read(a.loadckpt, a.ckpt_save_dir)
        if a.train and "optimizer" not in ckpt:
            raise UserError(f"{a.loadckpt} holds exported weights without optimizer state: "
                            f"it samples, but training resumes only from a .pth checkpoint")
        config.apply_stored(a, typed, config.stored_config(ckpt))
        checkpoint.resume_recipe(a, ckpt, typed)
        self.console.print(f"loaded {a.loadckpt} (epoch {ckpt['epoch']}, step {ckpt['step']})")
        return ckpt

    def restore(self, ckpt: dict, typed: set[str]) -> None:
        """Weights, optimizer and counters from ckpt; for training also the RNG states."""
        try:
            self.trainer.load_state_dict(ckpt, self.args.lr)
            self.state = checkpoint.run_state(ckpt, typed)
            if self.args.train:
                checkpoint.restore_rng(ckpt, self.data_gen, self.device)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:120]
            raise UserError(f"checkpoint {self.args.loadckpt} does not fit this program (damaged, "
                            f"or from another version): {type(e).__name__}: {first}") from None

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

    # -- training ------------------------------------------------------------------------------

    def load_data(self) -> ImageDataset:
        """The training images, and with --captions their caption tokens (a new run builds the
        vocabulary from the captions; a resumed one keeps the checkpoint's)."""
        a, t0, tokens = self.args, time.time(), None
        images, paths, resident = training_images(a, self.device, self.console.print)
        if a.captions != "off" and not a.demo:
            tokens, self.vocab = caption_tokens(paths, a.data_folders, a.captions, self.vocab,
                                                self.console.print)
        self.console.print(f"training set ready in {time.time() - t0:.1f}s")
        return ImageDataset(images, self.device, tokens, hflip=a.hflip == "on", resident=resident)

    def train_step(self, x0: Tensor, tokens: Tensor | None) -> Tensor:
        """One optimizer step on a batch (this process's share): the learning rate of the step,
        Trainer.step, the counters -> the batch's mean loss (on the device). A step skipped for a
        non-finite loss is taken off the counters at the next `check_steps`."""
        a, s = self.args, self.state
        lr = lr_at(s.step, a.lr, a.lr_warmup, a.lr_schedule, s.schedule_steps)
        loss = self.trainer.step(x0, tokens, lr, ema_decay(s.step + 1, a.ema_decay))
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

    def batches(self):
        """An epoch of (x0, tokens) batches of --batch-size x --grad-accum: this process's share.
        A compiled model skips the last partial batch (a new shape would recompile it)."""
        a = self.args
        batches_of = (self.data.batches_with_tokens if a.data_path == "device"
                      else self.data.plain_batches)
        return batches_of(a.batch_size * a.grad_accum, self.data_gen, self.rank, self.world,
                          drop_last=a.compile)

    def train_loop(self) -> None:
        """Algorithm 1, epoch after epoch: a step per batch, the figures on the progress bars
        every 10 steps, a progress grid every --sample-every steps, a checkpoint (and FID) at
        each epoch's end; --epochs, --max-steps or --max-minutes ends it."""
        a, s = self.args, self.state
        start = self.clock()
        self.deadline = start + 60 * a.max_minutes if a.max_minutes else math.inf
        per_epoch = self.data.num_batches(a.batch_size * a.grad_accum, self.world, a.compile)
        s.schedule_steps = s.schedule_steps or a.max_steps or s.step + a.epochs * per_epoch
        planned = min(a.epochs * per_epoch, a.max_steps - s.step if a.max_steps else math.inf)
        self.planned = max(planned, 0)
        self.run_length = RunLength(self.planned, clock=self.clock)
        with self.drawer.progress("info") as progress:
            run_bar = progress.add_task("this run", total=max(planned, 0), info="")
            for e in range(s.epoch, s.epoch + a.epochs):
                self.read_clock()  # the last epoch's end waited for the device
                if self.done():
                    break
                self.train_epoch(e, progress, run_bar, per_epoch)
        if self.out_of_time:
            self.console.print(f"--max-minutes {a.max_minutes:g} spent: stopped at step {s.step} "
                               f"after {(self.clock() - start) / 60:.1f} minutes of training")

    def note_long_run(self, seconds_per_step: float, total: float) -> None:
        """On a CPU, one line with the whole run's expected time when it is long (ui)."""
        a = self.args
        default_64 = (a.img_size, a.num_channels, list(a.channel_multiples)) == (64, 64, [1, 2, 4, 8])
        steps = self.planned
        if a.max_minutes:  # at most what --max-minutes leaves room for
            steps = min(steps, math.ceil(60 * a.max_minutes / seconds_per_step))
            total = min(total, 60 * a.max_minutes)
        line = long_run_warning(seconds_per_step, total, steps, self.device.type, default_64,
                                LONG_RUN_S)
        if line:
            self.console.print(line)

    def done(self) -> bool:
        """--max-steps reached, or --max-minutes spent (as last read)."""
        a = self.args
        return bool(a.max_steps) and self.state.step >= a.max_steps or self.out_of_time

    def read_clock(self) -> None:
        """Whether --max-minutes are spent, read where the loop waits for the device anyway: the
        host queues steps ahead of the device, so its clock between those points runs early.
        Under torchrun the processes agree (any one's clock), so that all stop at one step."""
        out = self.clock() >= self.deadline
        if self.world > 1 and self.args.max_minutes:
            flag = torch.tensor(float(out), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out = bool(flag.item())
        self.out_of_time = out

    def train_epoch(self, e: int, progress, run_bar, per_epoch: int) -> None:
        """Epoch e: its steps with their bar, the figures every 10 steps, a progress grid every
        --sample-every steps (default: once an epoch), then end_epoch."""
        a, s = self.args, self.state
        every = per_epoch if a.sample_every is None else a.sample_every
        bar = progress.add_task(f"epoch {e}", total=per_epoch, info="")
        t0, seen, steps = time.time(), 0, 0
        loss_sum, counted = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x0, tokens in self.batches():
            loss = self.train_step(x0, tokens)
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
                self.read_clock()
            if self.is_main and every and s.step % every == 0:
                self.progress_grid()
            progress.advance(run_bar)
            if self.done():
                break
        progress.remove_task(bar)
        self.check_steps()
        self.end_epoch(e, (loss_sum / counted.clamp(min=1)).item(), seen, time.time() - t0)

    def progress_grid(self):
        """The fixed-noise grid of this step (monitor.ProgressGrids), also to TensorBoard ->
        its uint8 (H, W, C) picture."""
        self.grids = self.grids or monitor.ProgressGrids(self.args)
        row = self.grids.draw(self.drawer, self.state.step)
        if self.tensorboard:
            self.tensorboard.image(self.state.step, "progress", row)
        return row

    def train(self) -> None:
        """The training run, owning its checkpoint folder (checkpoint.claim_folder: no other
        run's checkpoints, no second live run); the exit code says how it ended and whether its
        last save succeeded (checkpoint.exit_code; docs/safety.md)."""
        a = self.args
        lock = (checkpoint.claim_folder(a.ckpt_save_dir, self.run_id, bool(a.loadckpt),
                                        a.start_over) if self.is_main else None)
        try:
            how = self.train_run()
        finally:
            if lock:
                lock.release()
        code = checkpoint.exit_code(how, self.saved)
        if code:
            sys.exit(code)

    def train_run(self) -> str:
        """The run with its pictures -> how it ended: done, interrupted, terminated (SIGTERM, a
        cluster's pre-emption) or nonfinite. A stop saves a checkpoint first."""
        a, how = self.args, "done"
        if self.is_main:
            with self.drawer.side_rng():
                monitor.save_forward_strip(self.drawer, to_model(self.data.images[:4]))
            monitor.strip(self.drawer, "run-before")
        previous = signal.signal(signal.SIGTERM, checkpoint.stop_on_sigterm)
        try:
            self.train_loop()
        except (KeyboardInterrupt, checkpoint.Preempted) as stop:
            path = self.save_checkpoint(self.state.epoch, last=True)  # the epoch restarts
            how = "terminated" if isinstance(stop, checkpoint.Preempted) else "interrupted"
            why = "stopped by SIGTERM" if isinstance(stop, checkpoint.Preempted) else "interrupted"
            self.console.print(f"{why}: saved {path} (epoch {self.state.epoch}, step "
                               f"{self.state.step})")
            if isinstance(stop, checkpoint.Preempted):
                return how
        except NonFiniteLoss:
            path = self.save_checkpoint(self.state.epoch, last=True)
            self.console.print(
                f"stopped: the loss was not finite {MAX_BAD_STEPS} steps in a row; the last good "
                f"weights are in {path} (step {self.state.step}). Lower --lr (now {a.lr}) or "
                f"--grad-clip, or look for broken images in the data, then resume with --loadckpt")
            return "nonfinite"
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.tensorboard:
                self.tensorboard.close()
        if self.is_main:
            monitor.strip(self.drawer, "run-after")
        self.console.print(f"pictures in {a.save_dir}/: forward-steps.png, run-before.png, "
                           f"run-after.png, progress.png, loss.png; metrics.jsonl")
        return how

    def save_checkpoint(self, epoch_index: int, name: str = "", last: bool = False):
        """The run's checkpoint as ckpt-{epoch_index % 5}.pth (or `name`) in --ckpt-save-dir
        -> its path (None if the write failed). Only the first process writes. SIGTERM and
        Ctrl-C wait until the file is whole (then act; dropped after the last save of a run
        that is stopping)."""
        if not self.is_main:
            return None
        a = self.args
        ckpt = checkpoint.state(a, self.run_id, self.state, self.trainer.state_dict(),
                                vocab=self.vocab, data_gen=self.data_gen, device=self.device)
        path = os.path.join(a.ckpt_save_dir, name or checkpoint.rotation_name(epoch_index))
        with checkpoint.signals_held(deliver=not last):
            path = checkpoint.save(path, ckpt, self.console.print)
        if not name:  # best.pth is an extra: the rotation holds the run
            self.saved = path is not None
        return path

    def end_epoch(self, e: int, loss: float, seen: int, secs: float) -> None:
        """Checkpoint, metrics.jsonl + loss.png, FID every --eval-every epochs, one line."""
        a, s = self.args, self.state
        s.epoch = e + 1
        path = self.save_checkpoint(e)
        record = {"epoch": e, "step": s.step, "loss": loss,
                  "lr": self.trainer.optimizer.param_groups[0]["lr"],
                  "img_per_s": seen / secs, "seconds": secs}
        if a.eval_every and (e + 1) % a.eval_every == 0:  # every process draws its share
            with self.drawer.side_rng():
                record.update(evaluate.sample_quality(self.drawer, a.eval_samples, self.rank,
                                                      self.world))
        if not self.is_main:
            return
        if record.get("fid", math.inf) < s.best_fid:
            s.best_fid = record["fid"]
            self.save_checkpoint(e, "best.pth")
        if self.tensorboard:
            self.tensorboard.scalars(s.step, **{k: v for k, v in record.items() if k in ("fid", "kid")})
        records = evaluate.append_metrics(os.path.join(a.save_dir, "metrics.jsonl"), record)
        evaluate.plot_curves(records, os.path.join(a.save_dir, "loss.png"))
        self.console.print(f"epoch {e}: mean loss {loss:.4f}, {secs:.1f}s, "
                           f"{seen / secs:.0f} img/s, {'saved ' + path if path else 'NOT saved'}")

    # -- sampling and measuring ----------------------------------------------------------------

    def sr_stage(self) -> Drawer | None:
        """--sr-ckpt: the cascade's super-resolution stage (its flags from its checkpoint, the
        sampler flags shared), checked to fit this base model."""
        if not self.args.sr_ckpt:
            return None
        sr = Program(superres.cascade_args(self.args), set(), parent=self)
        superres.check_cascade(self.args, sr.args)
        return sr.drawer

    def run(self) -> None:
        """The one thing asked: the first command whose flag is given, in this order."""
        a, drawer = self.args, self.drawer
        commands = [
            (a.train, self.train), (a.lowres_folder, lambda: superres.sample_folder(drawer)),
            (a.eval_sr, lambda: superres.evaluate_sr(drawer, a.eval_sr)),
            (a.eval_prompts, lambda: prompts.evaluate_prompts(drawer, a.eval_prompts)),
            (a.init_folder and (a.mask_folder or a.mask_box), lambda: edit.inpaint(drawer)),
            (a.init_folder, lambda: edit.img2img(drawer)),
            (a.interpolate or a.interpolate_seeds, lambda: edit.interpolate(drawer)),
            (a.prompt, lambda: prompts.sample_prompts(drawer, self.sr_stage())),
            (a.eval_fid, lambda: evaluate.sample_quality(drawer, a.eval_fid)),
            (a.eval_bpd, lambda: evaluate.likelihood(drawer, self.load_data().images, a.eval_bpd)),
            (True, lambda: monitor.write_samples(drawer, self.sr_stage()))]
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
    except KeyboardInterrupt:  # Ctrl-C outside training (sampling, measuring): nothing to save
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `--info ckpt.pth | head`: the reader has gone; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
