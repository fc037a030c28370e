"""A prepared short run for a GPU lent for minutes (docs/README.md): train the default 64-px model
for a fixed time on a zip of faces, then draw samples into .npz files that evaluate.py scores
where the FID network is.

    python -m tools.gpu_run --make-zip ../shared/data/anime-faces-64 --count 12000  # here
    python3 -m tools.gpu_run --out $OUT --minutes 6                              # on the GPU
    python -m features.evaluate OUT/ ../shared/data/anime-faces-64                                # here

Training is `ddpm.py --train` in a process of its own (the Python this script runs with), ended
by --max-minutes; the samples come from the program's Drawer (the default sampler, EMA weights),
in files of at most --file-mib MiB of raw uint8 each. Into --out go only the samples,
metrics.jsonl, loss.png, progress.png and gpu-run.log: checkpoints (about 1 GB each for the
default model) and the other pictures stay in --work. Flags this script does not know go to the
training run (a tiny model for a rehearsal on the CPU).
"""
import argparse
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import config
import ddpm
from data import DataError, atomic_write, hw, list_images
from ui import UserError

DATA = os.path.join(".carry", "faces-64.zip")  # .carry/ is kept out of git (.git/info/exclude)
KEPT = ("metrics.jsonl", "loss.png", "progress.png")  # what of the run's --save-dir comes back
LOG = "gpu-run.log"
SAMPLE_EVERY = 2000  # a progress-grid row every 2,000 steps: about 10 rows in 6 minutes
# The line ddpm.py's end_epoch prints: the epoch's seconds of steps, whether its save succeeded.
EPOCH_LINE = re.compile(r"epoch \d+: mean loss \S+, ([\d.]+)s, .*, (saved \S|NOT saved)")


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and the rest (for `ddpm.py --train`)."""
    p = argparse.ArgumentParser(
        description="Train the default model for --minutes on a zip of faces, then draw "
                    "--samples samples into .npz files (uint8 (N, H, W, C) as arr_0) in --out. "
                    "Any other flag goes to `ddpm.py --train`.")
    p.add_argument("--make-zip", metavar="DIR",
                   help="instead: write --count images of DIR (a choice seeded by --seed, stored "
                        "as they are) into the --data zip")
    p.add_argument("--count", type=int, default=12000,
                   help="images in the zip of --make-zip (12000)")
    p.add_argument("--data", default=DATA, help=f"the zip of training images ({DATA})")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for the samples, metrics.jsonl, loss.png, progress.png and "
                        f"{LOG} (default: $OUT)")
    p.add_argument("--work", help="folder for the checkpoints and the run's other pictures "
                                  "(default: a temporary one, removed at the end)")
    p.add_argument("--minutes", type=float, default=6.0,
                   help="training time, ddpm.py's --max-minutes (6)")
    p.add_argument("--samples", type=int, default=5000, help="samples to draw (5000)")
    p.add_argument("--sample-batch", type=int, default=500, help="samples drawn at a time (500)")
    p.add_argument("--file-mib", type=float, default=16.0,
                   help="the most raw image data (uint8) per .npz file, in MiB (16)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, sampling and the zip (0)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (auto, the default: cuda if there is one)")
    return p.parse_known_args(argv)


def file_sizes(n: int, image_bytes: int, mib: float) -> list[int]:
    """n images of image_bytes each, in the fewest files of at most mib MiB, as even as can be:
    5,000 of 64 x 64 x 3 in 16 MiB -> four files of 1,250 (15.4 MB each; 1,365 would fit)."""
    per_file = int(mib * 2**20) // image_bytes
    if per_file < 1:
        raise DataError(f"--file-mib {mib} is smaller than one image ({image_bytes} bytes)")
    files = math.ceil(n / per_file)
    return [n // files + (i < n % files) for i in range(files)]


def make_zip(folder: str, count: int, path: str, seed: int) -> None:
    """count images of folder, chosen at random with seed, into the zip path (stored: JPEG and
    PNG do not compress further)."""
    if not os.path.isdir(folder):
        raise DataError(f"--make-zip {folder}: not a folder")
    paths = list_images([folder])
    if len(paths) < count:
        raise DataError(f"{folder} holds {len(paths)} images, fewer than --count {count}")
    chosen = sorted(random.Random(seed).sample(paths, count))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            for p in chosen:
                z.write(p, os.path.relpath(p, folder))

    atomic_write(path, write)
    print(f"wrote {path}: {count:,} images of {folder}, {os.path.getsize(path) / 2**20:.1f} MiB")


def epoch_ends(lines: list[tuple[float, str]]) -> tuple[int, float, float, int]:
    """The training output as (arrival time in seconds, line) -> the checkpoints saved at epoch
    ends, the seconds of the epochs' steps (as each epoch line says), and the seconds between
    epoch lines outside the steps with the number of such gaps. ddpm.py prints an epoch's line
    after its save (and its metrics.jsonl line and loss.png), and times the steps alone: from one
    epoch line to the next, what is not the next epoch's steps is mostly that save. The first
    epoch's start is not in the output: n epoch lines give n - 1 gaps."""
    matches = [(t, EPOCH_LINE.match(line)) for t, line in lines]
    epochs = [(t, float(m.group(1)), m.group(2) != "NOT saved") for t, m in matches if m]
    ends = sum(t1 - t0 - secs for (t0, _, _), (t1, secs, _) in zip(epochs, epochs[1:]))
    return (sum(saved for *_, saved in epochs), sum(secs for _, secs, _ in epochs), ends,
            max(len(epochs) - 1, 0))


def train(a, extra: list[str], work: str, say) -> tuple[float, str]:
    """`ddpm.py --train` for a.minutes, its output streamed to the console and the log ->
    its wall-clock seconds and a line on its checkpoints (epoch_ends). SystemExit with its code
    if it fails."""
    cmd = [sys.executable, os.path.join(ROOT, "ddpm.py"), "--train", "--data-folders", a.data,
           "--max-minutes", str(a.minutes), "--epochs", "1000000",
           "--sample-every", str(SAMPLE_EVERY), "--seed", str(a.seed), "--device", a.device,
           "--save-dir", os.path.join(work, "run"), "--ckpt-save-dir", os.path.join(work, "ckpt"),
           "--cache-dir", os.path.join(work, "cache"), *extra]  # extra last: its flags win
    say("$ " + " ".join(cmd[1:]))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append((time.monotonic(), line.rstrip("\n")))
        say(lines[-1][1])
    if proc.wait():
        say(f"error: training ended with exit code {proc.returncode}")
        raise SystemExit(proc.returncode)
    saves, steps_s, ends_s, gaps = epoch_ends(lines)
    return time.monotonic() - t0, (
        f"checkpoints: {saves} saved, one at each epoch's end; the epochs' steps {steps_s:.0f} s; "
        f"between the epoch lines outside the steps (the save, metrics.jsonl, loss.png) "
        f"{ends_s:.1f} s at the {gaps} epoch ends after the first")


def draw_samples(a, work: str, say) -> tuple[float, float, float]:
    """a.samples samples of the run's newest checkpoint (default sampler, EMA weights) into
    samples-<k>.npz in a.out -> seconds to load, to draw and to write."""
    t0 = time.monotonic()
    args, typed = config.parse_args([
        "--loadckpt", "latest", "--ckpt-save-dir", os.path.join(work, "ckpt"),
        "--save-dir", os.path.join(work, "samples"), "--batch-size", str(a.sample_batch),
        "--seed", str(a.seed), "--device", a.device])
    drawer = ddpm.Program(args, typed).drawer
    (h, w), c = hw(drawer.model.img_size), drawer.model.img_channels  # the checkpoint's
    sizes = file_sizes(a.samples, c * h * w, a.file_mib)
    load_s, draw_s, write_s, first = time.monotonic() - t0, 0.0, 0.0, 0
    for k, n in enumerate(sizes):
        t0 = time.monotonic()
        # Batch j of this file is seeded a.seed + first + j: no two batches share a seed.
        images = drawer.draw_many(n, f"samples-{k}.npz", seed=a.seed + first)  # (n, C, H, W)
        t1 = time.monotonic()
        path = os.path.join(a.out, f"samples-{k}.npz")
        nhwc = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
        atomic_write(path, lambda f: np.savez_compressed(f, arr_0=nhwc))
        draw_s, write_s, first = draw_s + t1 - t0, write_s + time.monotonic() - t1, first + n
        say(f"wrote {path}: {n} samples, {os.path.getsize(path) / 2**20:.1f} MiB")
    return load_s, draw_s, write_s


def run(a, extra: list[str], work: str, say) -> None:
    """Train, draw, keep the run's figures and pictures; say the time of each part."""
    t0 = time.monotonic()
    train_s, saves = train(a, extra, work, say)
    load_s, draw_s, write_s = draw_samples(a, work, say)
    for name in KEPT:
        src = os.path.join(work, "run", name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(a.out, name))
        else:
            say(f"note: the run wrote no {name}")
    say(f"times: training process {train_s:.0f} s (--max-minutes {a.minutes:g}, start-up and "
        f"the last save included); sampling: start-up {load_s:.0f} s, {a.samples:,} samples "
        f"{draw_s:.0f} s ({a.samples / max(draw_s, 1e-9):.0f} img/s), writing {write_s:.1f} s; "
        f"all {time.monotonic() - t0:.0f} s")
    say(saves)
    say(f"score them: python -m features.evaluate {a.out} FACES_FOLDER")


def main(argv: list[str] | None = None) -> int:
    a, extra = parse(argv)
    try:
        if a.make_zip:
            if a.count < 1:
                raise DataError(f"--count must be >= 1, got {a.count}")
            make_zip(a.make_zip, a.count, a.data, a.seed)
            return 0
        if min(a.samples, a.sample_batch) < 1 or not (a.file_mib > 0 and a.minutes > 0):
            raise DataError("--samples and --sample-batch must be >= 1, --file-mib and "
                            "--minutes > 0")
        if not a.out:
            raise DataError("give --out DIR (or set OUT)")
        if not os.path.isfile(a.data):
            raise DataError(f"{a.data} not found: make it with --make-zip DIR")
        a.data = os.path.abspath(a.data)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, LOG), "a") as log, \
                tempfile.TemporaryDirectory(prefix="gpu-run-") as tmp:

            def say(line: str) -> None:
                print(line, flush=True)
                log.write(line + "\n")
                log.flush()

            run(a, extra, a.work or tmp, say)
    except (DataError, UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
