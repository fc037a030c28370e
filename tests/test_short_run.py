"""The prepared short run for a lent GPU: --max-minutes, tools/gpu_run.py (rehearsed on the CPU
with a tiny model on tiny generated images) and evaluate.py scoring its .npz samples."""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from run import checkpoint
from features import evaluate
from config import parse_args
from ui import UserError
from ddpm import Program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_run.py")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeNet:
    """Stands in for the Inception network: uint8 (B, C, H, W) -> 6 cheap features (B, 6)."""

    def __call__(self, images):
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


class StepClock:
    """A clock (seconds) that stands still but for one minute at the end of each training step:
    the minutes spent are the steps taken, however often the program reads it."""

    def __init__(self, program: Program):
        self.minutes = 0
        step = program.train_step

        def step_then_tick(*args):
            loss = step(*args)
            self.minutes += 1
            return loss

        program.train_step = step_then_tick  # the instance's: Program stays as it was

    def __call__(self) -> float:
        return 60.0 * self.minutes


def test_max_minutes_stops_the_run_with_a_checkpoint_and_a_resume_gets_as_long_again(
        tiny, tmp_path, capsys):
    images, batch, minutes = 128, 8, 2.5
    flags = tiny(tmp_path, "--demo-images", str(images), "--epochs", "100", "--sample-every", "0",
                 "--max-minutes", str(minutes))
    # ddpm.py reads the clock (read_flags) at each epoch's start and after steps 1, 11, 21, ...
    # of an epoch: the deadline passes during step 3, the first read that sees it is after
    # step 11, in the middle of the first epoch (16 steps).
    read_after = [k for k in range(1, images // batch + 1) if k % 10 == 1]
    expected = next(k for k in read_after if k >= minutes)
    p = Program(*parse_args(flags))
    p.clock = StepClock(p)
    p.run()
    first = p.state.step
    assert first == expected
    assert "--max-minutes 2.5 spent" in capsys.readouterr().out
    saved = torch.load(checkpoint.latest(str(tmp_path / "ckpt")), weights_only=True)
    assert (saved["step"], saved["batch"]) == (first, first)  # where it stopped, in mid-epoch
    q = Program(*parse_args(flags + ["--loadckpt", "latest"]))
    q.clock = StepClock(q)
    q.run()
    # The resumed run goes on in mid-epoch, with the same budget again (it is this run's): its
    # clock reads after its first step (1 minute) and at the epoch's end, which sees it spent.
    assert q.state.step == images // batch > first + minutes


def test_save_every_minutes_saves_where_the_clock_is_read_once_the_minutes_have_passed(
        tiny, tmp_path):
    flags = tiny(tmp_path, "--demo-images", "128", "--epochs", "1", "--sample-every", "0",
                 "--save-every-minutes", "3", "--max-steps", "14")
    p = Program(*parse_args(flags))
    p.clock = StepClock(p)  # a minute a step; read after steps 1 and 11 of the 16-step epoch
    p.clock.minutes = 1000  # the clock's zero is not the run's start
    p.run()
    saved = {torch.load(f, weights_only=True)["step"]: torch.load(f, weights_only=True)["batch"]
             for f in (tmp_path / "ckpt").glob("ckpt-*.pth")}
    assert saved == {11: 11, 14: 14}  # 11 minutes since the start at step 11, then the end


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "inf"])
def test_max_minutes_must_be_a_positive_number(tiny, tmp_path, minutes, settings):
    with pytest.raises(UserError, match="--max-minutes must be a positive number"):
        settings(tiny(tmp_path, "--max-minutes", minutes))


@pytest.mark.parametrize("n,image_bytes,mib", [(5000, 64 * 64 * 3, 16), (10, 768, 0.002),
                                               (7, 100, 1), (1365, 12288, 16), (1366, 12288, 16)])
def test_sample_files_are_as_few_as_the_cap_allows_and_each_under_it(n, image_bytes, mib):
    sizes = load_script().file_sizes(n, image_bytes, mib)
    per_file = int(mib * 2**20) // image_bytes  # images that fit in one file
    assert sum(sizes) == n and len(sizes) == math.ceil(n / per_file)
    assert max(sizes) * image_bytes <= mib * 2**20 and max(sizes) - min(sizes) <= 1


def test_the_checkpoint_cost_is_read_from_the_gaps_between_epoch_lines():
    steps = [4.0, 5.0, 6.0]  # each epoch's steps, as its line says
    ends = [1.0, 2.0, 3.0]  # what follows them: the save (and metrics.jsonl, loss.png)
    lines, now = [(0.0, "decoding 16 images")], 0.5
    for e, (secs, end) in enumerate(zip(steps, ends)):
        now += secs + end
        saved = "NOT saved" if e == 1 else f"saved /tmp/a b/ckpt-{e}.pth"
        lines.append((now, f"epoch {e}: mean loss 0.1234, {secs:.1f}s, 9 img/s, {saved}"))
        lines.append((now, "a line between"))
    saves, steps_s, ends_s, gaps = load_script().epoch_ends(lines)
    assert (saves, steps_s, gaps) == (2, sum(steps), 2)
    assert ends_s == pytest.approx(sum(ends[1:]))  # the first epoch's start is not in the output
    assert load_script().epoch_ends(lines[:2]) == (1, steps[0], 0, 0)


def write_pngs(folder, images):
    """uint8 (N, H, W, 3) -> folder/000.png, 001.png, ..."""
    folder.mkdir(parents=True)
    for i, x in enumerate(images):
        Image.fromarray(x).save(folder / f"{i:03d}.png")


def score_line(argv, capsys):
    """evaluate.main(argv) -> (exit code, its last line of output)."""
    code = evaluate.main(argv)
    out = capsys.readouterr()
    return code, (out.out.strip().splitlines() or [""])[-1], out.err


def test_npz_samples_score_as_the_same_images_in_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "InceptionFeatures", lambda device: FakeNet())
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    write_pngs(tmp_path / "ref", rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    write_pngs(tmp_path / "png", samples)
    (tmp_path / "npz").mkdir()
    np.savez_compressed(tmp_path / "npz" / "samples-0.npz", arr_0=samples[:5])
    np.savez_compressed(tmp_path / "npz" / "samples-1.npz", arr_0=samples[5:])
    Image.fromarray(samples[0]).save(tmp_path / "npz" / "loss.png")  # beside them: not a sample
    flags = [str(tmp_path / "ref"), "--img-size", "16", "--cache-dir", str(tmp_path / "cache"),
             "--device", "cpu"]
    code, folder_line, _ = score_line([str(tmp_path / "png"), *flags], capsys)
    assert code == 0 and folder_line.startswith("12 vs 10 images: FID")
    for side in ("npz", os.path.join("npz", "samples-*.npz")):
        assert score_line([str(tmp_path / side), *flags], capsys)[:2] == (0, folder_line)
    one = score_line([str(tmp_path / "npz" / "samples-0.npz"), *flags], capsys)
    assert one[0] == 0 and one[1].startswith("5 vs 10 images: FID")


def test_unusable_npz_sides_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "InceptionFeatures", lambda device: FakeNet())
    write_pngs(tmp_path / "ref", np.zeros((3, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "small.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((3, 16, 16, 3), np.float32))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    flags = [str(tmp_path / "ref"), "--img-size", "16", "--cache-dir", str(tmp_path / "cache"),
             "--device", "cpu"]
    for side, message in (("small.npz", "give --img-size 8"), ("float.npz", "want uint8"),
                          ("broken.npz", "not a readable .npz"), ("none-*.npz", "no .npz file")):
        code, _, err = score_line([str(tmp_path / side), *flags], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_the_short_run_rehearsal_writes_npz_samples_that_evaluate_scores(
        tmp_path, tiny_flags, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    write_pngs(tmp_path / "faces", rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    zip_path, out = tmp_path / "carry" / "faces.zip", tmp_path / "out"
    load_script().make_zip(str(tmp_path / "faces"), 16, str(zip_path), seed=0)
    with zipfile.ZipFile(zip_path) as z:
        assert len(z.namelist()) == 16 and set(z.namelist()) < set(os.listdir(tmp_path / "faces"))
    image_bytes, mib = 16 * 16 * 3, 0.0015  # 2 images a file (1,572 bytes)
    r = subprocess.run([sys.executable, "-m", "tools.gpu_run", "--data", str(zip_path), "--out", str(out),
                        "--minutes", "0.01", "--samples", "5", "--sample-batch", "2",
                        "--file-mib", str(mib), "--device", "cpu", *tiny_flags,
                        "--sample-every", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(glob.glob(str(out / "samples-*.npz")))
    assert len(files) == 3  # 5 samples, 2 a file
    counts = []
    for f in files:
        with np.load(f) as z:
            x = z["arr_0"]
        assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3)
        assert x.nbytes <= mib * 2**20 and x.nbytes == len(x) * image_bytes
        counts.append(len(x))
    assert sum(counts) == 5
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records and all(math.isfinite(rec["loss"]) for rec in records)
    for picture in ("loss.png", "progress.png"):
        with Image.open(out / picture) as im:
            assert im.width > 0
    log = open(out / "gpu-run.log").read()
    assert "--max-minutes 0.01 spent" in log
    saves = len([line for line in log.splitlines() if line.startswith("epoch ")
                 and ", saved " in line])
    assert saves >= 1 and f"checkpoints: {saves} saved, one at each epoch's end" in log
    assert not os.path.exists(out / "ckpt")  # the checkpoints stay out of --out
    monkeypatch.setattr(evaluate, "InceptionFeatures", lambda device: FakeNet())
    code, line, _ = score_line([str(out), str(tmp_path / "faces"), "--img-size", "16",
                                "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
                               capsys)
    assert code == 0 and line.startswith("5 vs 24 images: FID")


def test_two_gloo_processes_stop_together_at_max_minutes(tmp_path, unused_port):
    flags = ["--train", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
             "--channel-multiples", "1", "--has-attn", "f", "--num-blocks", "1", "--timesteps",
             "10", "--beta-max", "0.5", "--batch-size", "8", "--epochs", "100000", "--seed", "2",
             "--device", "cpu", "--sample-every", "0", "--max-minutes", "0.005",
             "--ckpt-save-dir", str(tmp_path), "--save-dir", str(tmp_path)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={unused_port}",
                        os.path.join(ROOT, "ddpm.py"), *flags], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]  # neither waits for the other's next step
    assert r.stdout.count("--max-minutes 0.005 spent") == 1  # only rank 0 prints
    saved = torch.load(checkpoint.latest(str(tmp_path)), weights_only=True)
    assert f"stopped at step {saved['step']} " in r.stdout
