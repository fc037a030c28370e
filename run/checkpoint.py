"""Checkpoints that describe themselves: the stored config (one dict) beside the weights, EMA,
optimizer, counters and RNG states, so `--loadckpt` alone rebuilds the model and a resumed run
goes on exactly as if it had never stopped. Read safely (weights_only), written atomically.
"""
import contextlib
import glob
import json
import math
import os
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass

import torch

from core import spec
from core.configs import TrainConfig
from core.spec import ModelSpec, size_name, sr_target_name
from data import atomic_write
from features.kinds import make_model
from features.text import Vocab
from ui import NoCheckpoint, UserError
from unet import UNet

try:
    import fcntl  # file locks (POSIX)
except ImportError:  # Windows: the checkpoint folder is not locked
    fcntl = None

FORMAT = 2  # 1: three dicts (model_config, diffusion_config, cond_config); still read
READABLE = (1, 2)  # the model's part of either: spec.py, by its schema
ROTATION = 5  # ckpt-0.pth .. ckpt-4.pth, a save each in turn


def latest(ckpt_dir: str) -> str:
    """The checkpoint in ckpt_dir with the most optimizer steps (the rotation may have wrapped,
    so names say nothing); on a tie the newer file."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "*.pth")):
        try:  # memory-mapped: only the counters are read
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.append((ckpt["step"], os.path.getmtime(path), path))
        except Exception:  # a damaged or foreign file is not a candidate
            continue
    if not found:
        raise NoCheckpoint(f"--loadckpt latest: no readable checkpoint in {ckpt_dir}/")
    return max(found)[2]


def find(path: str, ckpt_dir: str) -> str:
    """--loadckpt as given -> the file: a bare name is also looked up in ckpt_dir; 'latest' is
    the one there with the most steps (NoCheckpoint where there is none)."""
    if path == "latest":
        path = latest(ckpt_dir)
    if not os.path.exists(path) and os.path.dirname(path) == "":
        path = os.path.join(ckpt_dir, path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (also looked in {ckpt_dir}/)")
    return path


def read(path: str, ckpt_dir: str) -> tuple[dict, str]:
    """Load a ddpm.py checkpoint safely (weights_only: opening it never runs code) -> (the
    checkpoint, the path it was found at: find). A .safetensors file is an export (see
    export)."""
    path = find(path, ckpt_dir)
    if path.endswith(".safetensors"):
        return read_export(path), path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: damaged or not a ddpm.py checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE:
        raise UserError(f"{path} is not a ddpm.py checkpoint (format {FORMAT})")
    check(ckpt, path)
    return ckpt, path


def reader(rank: int, world: int):
    """read for this process. Under torchrun the first process picks the file (the newest, for
    'latest') and the others are given its name, so that every process loads the same one; if
    one cannot read it (a --ckpt-save-dir that is not on a file system every node shares), all
    stop with one line that says so."""
    if world == 1:
        return read

    def read_shared(path: str, ckpt_dir: str) -> tuple[dict, str]:
        import torch.distributed as dist
        box = [None]
        if rank == 0:
            try:
                box = [find(path, ckpt_dir)]
            except UserError as e:  # the same error in every process
                box = [e]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], UserError):
            raise box[0]
        try:
            ckpt, error = read(box[0], ckpt_dir)[0], ""
        except UserError as e:
            ckpt, error = None, str(e)
        errors = [None] * world
        dist.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            r, e = failed[0]
            raise UserError(f"process {r} cannot read {box[0]}, the checkpoint process 0 chose "
                            f"({e}): --ckpt-save-dir must be a folder every node can read")
        return ckpt, box[0]
    return read_shared


def check(ckpt: dict, path: str) -> None:
    """A checkpoint (or export) whose parts are all there, or UserError saying which is not: a
    crafted or damaged file stops here in one line, before anything reads it. (Whether the
    weights are those of the config's UNet: check_fit, or loading them.)"""
    what = f"{path} is damaged or was not written by ddpm.py"
    try:
        spec.stored_dict(ckpt)
    except spec.SpecError as e:
        raise UserError(f"{what}: {e}") from None
    for k in ("epoch", "step"):
        if not isinstance(ckpt.get(k), int):
            raise UserError(f"{what}: no {k} count")
    text = ckpt.get("text")
    if text is not None and not (isinstance(text, dict) and isinstance(text.get("words"), list)
                                 and isinstance(text.get("max_len"), int)):
        raise UserError(f"{what}: its vocabulary is not a word list and a caption length")
    teacher = ckpt.get("teacher", {"ema": {}, "student_steps": 0})
    for part, weights in [("model", ckpt.get("model")), ("ema", ckpt.get("ema", {})),
                          ("teacher's", teacher.get("ema") if isinstance(teacher, dict) else None)]:
        if not (isinstance(weights, dict) and all(isinstance(v, torch.Tensor)
                                                  for v in weights.values())):
            raise UserError(f"{what}: its {part} weights are not a dict of tensors")
    if not isinstance(teacher.get("student_steps"), int):
        raise UserError(f"{what}: its teacher's steps are not recorded")


def check_fit(ckpt: dict, path: str) -> None:
    """UserError unless the weights (and EMA) are exactly those of the UNet the checkpoint's
    config describes: for --info and --export, which do not load them."""
    c, text = spec.stored_dict(ckpt), ckpt.get("text")
    for part in ("model", "ema"):
        wrong = misfit(ckpt[part], c, text) if part in ckpt else ""
        if wrong:
            raise UserError(f"{path} does not fit this program: its {part} weights are not the "
                            f"UNet its config describes ({wrong})")


def model_of(c: dict, text: dict | None, device="meta") -> UNet:
    """The UNet a stored config (and vocabulary) describes (kinds.make_model); on the meta
    device by default: shapes only, no memory, no time."""
    with torch.device(device):
        return make_model(ModelSpec(**c), Vocab.from_state(text) if text else None)[0]


def misfit(weights: dict, c: dict, text: dict | None) -> str:
    """'' where the weights are exactly those of the config's UNet (names and shapes), else
    what differs, briefly."""
    try:
        want = {k: tuple(v.shape) for k, v in model_of(c, text).state_dict().items()}
    except Exception as e:  # a config no UNet can be built from
        first = (str(e).strip().splitlines() or [""])[0][:80]
        return f"no UNet can be built from it: {type(e).__name__}: {first}"
    have = {k: tuple(v.shape) for k, v in weights.items()}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    shaped = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    out = ([f"{len(missing)} missing, e.g. {missing[0]}"] if missing else []) + \
          ([f"{len(extra)} unexpected, e.g. {extra[0]}"] if extra else []) + \
          [f"{k} is {'x'.join(map(str, have[k]))}, the config builds "
           f"{'x'.join(map(str, want[k]))}" for k in shaped[:1]]
    return "; ".join(out)


@dataclass
class RunState:
    """Where a training run stands, counting what is completed; saved in every checkpoint."""
    epoch: int = 0  # epochs completed: the index of the epoch in progress
    batch: int = 0  # batches of the epoch in progress taken (a mid-epoch save resumes there)
    saves: int = 0  # checkpoints saved (the rotation's count)
    step: int = 0  # optimizer steps
    images_seen: int = 0
    best_fid: float = math.inf
    schedule_steps: int = 0  # the learning-rate schedule's length in steps (0: not yet set)


def state(model: ModelSpec, train: TrainConfig, run_id: str, run: RunState, weights: dict, *,
          vocab, data_rng: torch.Tensor, device: torch.device) -> dict:
    """Everything a training checkpoint holds: the run's id, the stored config (the model's
    spec), the recipe and length, the vocabulary, weights (Trainer.state_dict: model, EMA,
    optimizer, timestep sampler), the counters and the RNG states. data_rng: the data
    generator's state at the start of the epoch in progress (the epoch's order and flips are
    drawn from it again on resume, and run.batch of its batches skipped)."""
    recipe = {"batch_size": train.batch_size, "grad_accum": train.grad_accum, "lr": train.lr,
              "lr_warmup": train.lr_warmup, "lr_schedule": train.lr_schedule,
              "hflip": train.hflip, "schedule_steps": run.schedule_steps,
              "ema_decay": train.ema_decay, "min_snr_gamma": train.min_snr_gamma,
              "t_sampling": train.t_sampling, "teacher_calls": train.teacher_calls,
              "images_seen": run.images_seen}  # the recipe and length (--info, resume)
    return {"format": FORMAT, "schema": spec.SCHEMA, "run_id": run_id, "config": model.to_dict(),
            "train": recipe,
            "text": vocab.state() if vocab else None, **weights, "epoch": run.epoch,
            "batch": run.batch, "saves": run.saves, "step": run.step,
            "best_fid": run.best_fid, "data_rng": data_rng,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def snapshot(obj):
    """A checkpoint's tensors copied to the CPU (nested dicts, lists and tuples kept): what the
    writer thread saves while training goes on and changes the originals in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Writer:
    """Writes checkpoints on a thread of its own, one at a time: `write` returns once the
    checkpoint is copied (snapshot), and the file is written (save: whole or not at all) while
    training goes on; then done(path or None) is called on the writer's thread. A write waits
    for the one before it to end; `wait` waits for the last."""

    def __init__(self, warn):
        self.warn, self.thread = warn, None

    def write(self, path: str, ckpt: dict, done=lambda path: None) -> None:
        self.wait()
        copied = snapshot(ckpt)

        def work():
            try:
                written = save(path, copied, self.warn)
            except Exception as e:  # not a disk error (those are save's): say so, go on
                self.warn(f"warning: could not save {path}: {type(e).__name__}: {e}")
                written = None
            done(written)
        self.thread = threading.Thread(target=work, name="checkpoint-writer")
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def rotation_name(saves: int) -> str:
    """The file of a run's checkpoint after `saves` earlier ones: ckpt-0.pth .. ckpt-4.pth in
    turn (one a save: at each epoch's end, and by --save-every; without those, the checkpoint
    of epoch e is ckpt-{e % 5}.pth)."""
    return f"ckpt-{saves % ROTATION}.pth"


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


def run_state(ckpt: dict, typed: set[str]) -> RunState:
    """The counters a checkpoint was saved at; a typed --max-steps sets the schedule anew."""
    train = ckpt.get("train", {})
    return RunState(epoch=ckpt["epoch"], batch=ckpt.get("batch", 0),
                    saves=ckpt.get("saves", ckpt["epoch"]), step=ckpt["step"],
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
    meta = {"format": "ddpm.py", "schema": str(spec.SCHEMA),
            "config": json.dumps(spec.stored_dict(ckpt)),
            "text": json.dumps(ckpt.get("text")), "epoch": str(ckpt["epoch"]),
            "step": str(ckpt["step"])}
    blob = save(weights, metadata=meta)  # bytes
    try:
        atomic_write(path, lambda f: f.write(blob))
    except OSError as e:  # a missing or read-only folder, a full disk
        raise UserError(f"cannot write --export {path}: {e.strerror or e}") from None


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
    try:
        ckpt = {"format": FORMAT, "schema": int(meta.get("schema", 2)),
                "config": json.loads(meta["config"]),
                "text": json.loads(meta.get("text", "null")), "model": weights, "ema": weights,
                "epoch": int(meta["epoch"]), "step": int(meta["step"]), "exported": True}
    except (KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path}: its metadata is damaged ({type(e).__name__}: {e}); export "
                        f"it again from its .pth") from None
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"{path}: its metadata holds no model config; export it again")
    check(ckpt, path)
    return ckpt


def describe(ckpt: dict, path: str) -> list[str]:
    """What a checkpoint is, a few lines for --info."""
    c, train = spec.stored_dict(ckpt), ckpt.get("train", {})
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
                     f"steps), EMA decay {train['ema_decay']}, min-SNR gamma "
                     f"{train.get('min_snr_gamma', 'not recorded')}, t "
                     f"{train.get('t_sampling', 'not recorded')}")
    best = ckpt.get("best_fid", math.inf)
    lines.append(f"  best FID: {best:.2f}" if math.isfinite(best) else "  best FID: not measured")
    if c["student_steps"]:
        teacher = ckpt.get("teacher")
        of = ("" if not teacher else " of a diffusion model" if not teacher["student_steps"]
              else f" of a student of {teacher['student_steps']} steps")
        lines.append(f"  a student of distillation{of}: draws in {c['student_steps']} step(s) "
                     f"(DDIM; --sample-steps changes it)")
    if ckpt.get("text"):
        lines.append(f"  vocabulary: {len(ckpt['text']['words'])} words, captions of up to "
                     f"{ckpt['text']['max_len']} tokens")
    return lines


def info(path: str, ckpt_dir: str) -> None:
    """--info PATH: what a checkpoint is, printed."""
    ckpt, path = read(path, ckpt_dir)
    check_fit(ckpt, path)
    print("\n".join(describe(ckpt, path)))


def export_weights(ckpt: dict, path: str, out: str) -> None:
    """--export OUT with --loadckpt PATH (read as ckpt): its EMA weights as safetensors."""
    check_fit(ckpt, path)
    export(ckpt, out)
    print(f"exported the EMA weights of {path} (step {ckpt['step']}) to {out}: they sample "
          f"(--loadckpt {out}) but hold no optimizer state, so they cannot resume training")


# -- the run that owns a checkpoint folder, stops safely, and says so in its exit code ---------

LOCK = "run.lock"  # in the checkpoint folder while a run trains into it
# The signals that stop a training run after its step in progress, with a save, and how it then
# ended: a scheduler's stop (SIGTERM), a cluster's notice before it kills the job (SIGUSR1:
# SLURM's --signal=USR1@90), Ctrl-C.
STOPPED = {signal.SIGTERM: "terminated", signal.SIGINT: "interrupted",
           **({signal.SIGUSR1: "requeue"} if hasattr(signal, "SIGUSR1") else {})}  # not Windows
# Exit codes with the work saved: a stop by signal N exits with 128 + N, as a shell reports a
# process that signal killed: 130 Ctrl-C (2), 138 SIGUSR1 (10), 143 SIGTERM (15); docs/safety.md.
EXIT = {"done": 0, "nonfinite": 1, "interrupted": 130, "requeue": 138, "terminated": 143}
NOT_SAVED = 74  # sysexits' EX_IOERR: the run ended but its last save failed


def new_run_id() -> str:
    """A new training run's id, stored in each of its checkpoints: when it began and 24 random
    bits, e.g. '20250131-142501-9f3ac2'."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class FolderLock:
    """An exclusive lock (flock) on <folder>/run.lock, held while a run trains into the folder.
    The operating system drops it when the process ends, however it ends, so the lock of a
    killed run is free again at once; the file says which run holds it."""

    def __init__(self, path: str | None, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # first, so a run that opened the file re-checks it
            os.close(self.fd)  # closing unlocks
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str, run_id: str) -> FolderLock:
    """Lock `folder` for this run, or UserError naming the live run that holds it. Where the
    file system cannot lock (some network file systems; Windows has no flock) the folder is
    not locked."""
    path = os.path.join(folder, LOCK)
    if fcntl is None:
        return FolderLock(None, None)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 500).decode(errors="replace").strip() or "a run"
            os.close(fd)
            raise UserError(f"{folder}/ is in use by another live run ({holder}): wait for it to "
                            f"end, or train into another --ckpt-save-dir") from None
        except OSError:  # no locks on this file system
            os.close(fd)
            return FolderLock(None, None)
        try:  # the holder may have removed the file between our open and lock: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"run {run_id}, pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return FolderLock(path, fd)


def run_of(path: str) -> str | None:
    """The run id a checkpoint file records ('' for one written before runs had ids), or None
    for a file that is not a readable ddpm.py checkpoint. Memory-maps the file: cheap."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE:
        return None
    return str(ckpt.get("run_id") or "")


def claim_folder(ckpt_dir: str, run_id: str, continuing: bool = False,
                 start_over: bool = False) -> FolderLock:
    """Make ckpt_dir this run's, before it writes anything there -> the folder's lock, to hold
    (and release) for the whole run. Refuses (UserError, one line) a folder in use by another
    live run, and one that holds checkpoints of another run, which the new run's rotation and
    --resume would mix with its own; continuing: the run goes on from a checkpoint written
    before runs had ids, so checkpoints without an id count as its own. start_over moves the
    other run's checkpoints into ckpt_dir/replaced-<their run id>/ instead (nothing is
    deleted). Temporaries of saves that were killed are removed (the lock is held: no live
    run is writing them). Files that are not readable checkpoints are left alone."""
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {ckpt_dir}: {e.strerror}") from None
    lock = lock_folder(ckpt_dir, run_id)
    try:
        others = {}  # checkpoint file -> the other run's id ('' unknown)
        for path in sorted(glob.glob(os.path.join(ckpt_dir, "*.pth"))):
            rid = run_of(path)
            if rid is not None and rid != run_id and not (rid == "" and continuing):
                others[path] = rid
        if others and not start_over:
            names = ", ".join(os.path.basename(p) for p in others)
            rids = sorted(set(others.values()))
            whose = f"run {', '.join(r or 'without an id' for r in rids)}"
            raise UserError(f"{ckpt_dir}/ holds checkpoints of another run ({whose}: {names}): "
                            f"continue it with --resume, train into another --ckpt-save-dir, or "
                            f"give --start-over to move them into {ckpt_dir}/replaced-<run>/")
        for path, rid in others.items():
            aside = os.path.join(ckpt_dir, f"replaced-{rid or 'unknown'}")
            os.makedirs(aside, exist_ok=True)
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        for name in os.listdir(ckpt_dir):
            if re.fullmatch(r".+\.pth\.\d+\.tmp", name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(ckpt_dir, name))
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def signals_held(deliver: bool = True, signums=tuple(STOPPED)):
    """Hold the stop signals (SIGTERM, SIGUSR1, Ctrl-C) off a block (a save) so that they never
    interrupt it half-way:
    those that arrive meanwhile are delivered once it ends (deliver, for the saves of a run that
    goes on: it then stops as asked) or dropped (for the last save of a run that is already
    stopping: a scheduler's second SIGTERM must not cut it short). Main thread only."""
    got = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if deliver:
            for s in dict.fromkeys(got):  # each kind once, in the order they came
                signal.raise_signal(s)


def exit_code(how: str, saved: bool) -> int:
    """The exit code of a training run that ended `how` (done | nonfinite | interrupted |
    requeue | terminated): EXIT[how] when its last save succeeded, else NOT_SAVED (74), so the
    code alone says whether the work is on disk."""
    return EXIT[how] if saved else NOT_SAVED
