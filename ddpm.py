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
        # The settings, worked out once (config.resolve; the checkpoint read and applied) and
        # then only read: each part goes to what uses it.
        cfg, ckpt = config.resolve(args, typed, checkpoint.read, cascade=parent is not None)
        if parent:
            self.rank, self.world, self.console = parent.rank, parent.world, parent.console
            device = str(parent.device)
        else:
            self.rank, self.world, device = init_distributed(cfg.train.device)
            self.console = make_console(quiet=self.rank != 0)
        self.is_main = self.rank == 0  # only the first process writes files and prints
        if ckpt:
            self.console.print(f"loaded {cfg.sample.loadckpt} (epoch {ckpt['epoch']}, step "
                               f"{ckpt['step']})")
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
            self.cfg = cfg = config.with_lr(cfg, default_lr(params))
        self.trainer = Trainer(unet, cfg.model, cfg.train, self.kind, self.device,
                               amp_dtype=amp_dtype, rank=self.rank, world=self.world)
        self.drawer = Drawer(cfg.model, cfg.sample, self.kind, self.trainer, self.console,
                             batch_size=cfg.train.batch_size, save_dir=cfg.output.save_dir,
                             vocab=self.vocab, quiet=not self.is_main)
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
        self.tensorboard = (monitor.TensorBoard(cfg.output.save_dir)
                            if cfg.train.train and cfg.train.tensorboard and self.is_main else None)
        if not parent:
            params = sum(p.numel() for p in self.trainer.model.parameters())
            monitor.summary(self.drawer, cfg, params=params, n_images=len(self.data or ()),
                            amp_dtype=amp_dtype, world=self.world, write=self.is_main)

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
        images, paths, resident = training_images(c.data, c.model, self.device,
                                                  self.console.print)
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

    def batches(self):
        """An epoch of (x0, tokens) batches of --batch-size x --grad-accum: this process's share.
        A compiled model skips the last partial batch (a new shape would recompile it)."""
        c, t = self.cfg, self.cfg.train
        batches_of = (self.data.batches_with_tokens if c.data.data_path == "device"
                      else self.data.plain_batches)
        return batches_of(t.batch_size * t.grad_accum, self.data_gen, self.rank, self.world,
                          drop_last=t.compile)

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
        start = self.clock()
        self.deadline = start + 60 * t.max_minutes if t.max_minutes else math.inf
        per_epoch = self.plan()
        self.run_length = RunLength(self.planned, clock=self.clock)
        with self.drawer.progress("info") as progress:
            run_bar = progress.add_task("this run", total=self.planned, info="")
            for e in range(s.epoch, s.epoch + t.epochs):
                self.read_clock()  # the last epoch's end waited for the device
                if self.done():
                    break
                self.train_epoch(e, progress, run_bar, per_epoch)
        if self.out_of_time:
            self.console.print(f"--max-minutes {t.max_minutes:g} spent: stopped at step {s.step} "
                               f"after {(self.clock() - start) / 60:.1f} minutes of training")

    def note_long_run(self, seconds_per_step: float, total: float) -> None:
        """On a CPU, one line with the whole run's expected time when it is long (ui)."""
        c = self.cfg
        default_64 = config.is_default_model(c.model)
        steps = self.planned
        if c.train.max_minutes:  # at most what --max-minutes leaves room for
            steps = min(steps, math.ceil(60 * c.train.max_minutes / seconds_per_step))
            total = min(total, 60 * c.train.max_minutes)
        line = long_run_warning(seconds_per_step, total, steps, self.device.type, default_64,
                                LONG_RUN_S)
        if line:
            self.console.print(line)

    def done(self) -> bool:
        """--max-steps reached, or --max-minutes spent (as last read)."""
        c = self.cfg
        return bool(c.train.max_steps) and self.state.step >= c.train.max_steps or self.out_of_time

    def read_clock(self) -> None:
        """Whether --max-minutes are spent, read where the loop waits for the device anyway: the
        host queues steps ahead of the device, so its clock between those points runs early.
        Under torchrun the processes agree (any one's clock), so that all stop at one step."""
        out = self.clock() >= self.deadline
        if self.world > 1 and self.cfg.train.max_minutes:
            flag = torch.tensor(float(out), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out = bool(flag.item())
        self.out_of_time = out

    def train_epoch(self, e: int, progress, run_bar, per_epoch: int) -> None:
        """Epoch e: its steps with their bar, the figures every 10 steps, a progress grid every
        --sample-every steps (default: once an epoch), then end_epoch."""
        c, s = self.cfg, self.state
        every = per_epoch if c.train.sample_every is None else c.train.sample_every
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
        self.grids = self.grids or monitor.ProgressGrids(self.cfg.model, self.cfg.output.save_dir)
        row = self.grids.draw(self.drawer, self.state.step)
        if self.tensorboard:
            self.tensorboard.image(self.state.step, "progress", row)
        return row

    def train(self) -> None:
        """The training run, owning its checkpoint folder (checkpoint.claim_folder: no other
        run's checkpoints, no second live run); the exit code says how it ended and whether its
        last save succeeded (checkpoint.exit_code; docs/safety.md)."""
        c = self.cfg
        lock = (checkpoint.claim_folder(c.output.ckpt_save_dir, self.run_id,
                                        bool(c.sample.loadckpt), c.train.start_over)
                if self.is_main else None)
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
        c, how = self.cfg, "done"
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
                f"weights are in {path} (step {self.state.step}). Lower --lr (now {c.train.lr}) or "
                f"--grad-clip, or look for broken images in the data, then resume with --loadckpt")
            return "nonfinite"
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.tensorboard:
                self.tensorboard.close()
        if self.is_main:
            monitor.strip(self.drawer, "run-after")
        self.console.print(f"pictures in {c.output.save_dir}/: forward-steps.png, run-before.png, "
                           f"run-after.png, progress.png, loss.png; metrics.jsonl")
        return how

    def save_checkpoint(self, epoch_index: int, name: str = "", last: bool = False):
        """The run's checkpoint as ckpt-{epoch_index % 5}.pth (or `name`) in --ckpt-save-dir
        -> its path (None if the write failed). Only the first process writes. SIGTERM and
        Ctrl-C wait until the file is whole (then act; dropped after the last save of a run
        that is stopping)."""
        if not self.is_main:
            return None
        c = self.cfg
        ckpt = checkpoint.state(c.model, c.train, self.run_id, self.state,
                                self.trainer.state_dict(),
                                vocab=self.vocab, data_gen=self.data_gen, device=self.device)
        path = os.path.join(c.output.ckpt_save_dir, name or checkpoint.rotation_name(epoch_index))
        with checkpoint.signals_held(deliver=not last):
            path = checkpoint.save(path, ckpt, self.console.print)
        if not name:  # best.pth is an extra: the rotation holds the run
            self.saved = path is not None
        return path

    def end_epoch(self, e: int, loss: float, seen: int, secs: float) -> None:
        """Checkpoint, metrics.jsonl + loss.png, FID every --eval-every epochs, one line."""
        c, s = self.cfg, self.state
        s.epoch = e + 1
        path = self.save_checkpoint(e)
        record = {"epoch": e, "step": s.step, "loss": loss,
                  "lr": self.trainer.optimizer.param_groups[0]["lr"],
                  "img_per_s": seen / secs, "seconds": secs}
        ev = c.evaluation
        if ev.eval_every and (e + 1) % ev.eval_every == 0:  # every process draws its share
            with self.drawer.side_rng():
                record.update(evaluate.sample_quality(
                    self.drawer, c.data, ev.eval_samples, eval_folders=ev.eval_folders,
                    rank=self.rank, world=self.world))
        if not self.is_main:
            return
        if record.get("fid", math.inf) < s.best_fid:
            s.best_fid = record["fid"]
            self.save_checkpoint(e, "best.pth")
        if self.tensorboard:
            self.tensorboard.scalars(s.step, **{k: v for k, v in record.items() if k in ("fid", "kid")})
        records = evaluate.append_metrics(os.path.join(c.output.save_dir, "metrics.jsonl"), record)
        evaluate.plot_curves(records, os.path.join(c.output.save_dir, "loss.png"))
        self.console.print(f"epoch {e}: mean loss {loss:.4f}, {secs:.1f}s, "
                           f"{seen / secs:.0f} img/s, {'saved ' + path if path else 'NOT saved'}")

    # -- sampling and measuring ----------------------------------------------------------------

    def sr_stage(self) -> Drawer | None:
        """--sr-ckpt: the cascade's super-resolution stage (its flags from its checkpoint, the
        sampler flags shared), checked to fit this base model."""
        if not self.cfg.sample.sr_ckpt:
            return None
        sr = Program(config.cascade_args(self.cfg), set(), parent=self)
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
        if self.world > 1:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        args, typed = config.parse_args(argv)
        if args.info:
            checkpoint.info(args.info, args.ckpt_save_dir)
        elif args.export:
            cfg, ckpt = config.resolve(args, typed, checkpoint.read)
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
