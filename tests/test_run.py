"""A training run you can watch, steer, stop and pick up again: progress grids, run length and
learning-rate schedule, gradient accumulation, precision, 'latest', SIGTERM, --info, --export,
--tensorboard."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from run import checkpoint
from config import parse_args
from ddpm import Program, main
from run.trainer import lr_at

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "text-model-bc9cbb7.pth")


def test_progress_grids_of_an_unchanged_model_are_identical_and_stack_into_progress_png(
        tiny, tmp_path):
    p = Program(*parse_args(tiny(tmp_path, "--epochs", "1")))
    first, again = p.progress_grid(), p.progress_grid()
    assert np.array_equal(first, again) and first.std() > 1
    p.run()  # 4 steps; one grid at the end of the epoch (the default: once per epoch)
    after = np.asarray(Image.open(tmp_path / "out" / "progress" / "step-4.png"))
    assert not np.array_equal(after, first)
    rows = np.asarray(Image.open(tmp_path / "out" / "progress.png"))
    assert rows.shape[0] == 2 * first.shape[0]  # step 0 (drawn above), then step 4: oldest on top
    assert np.array_equal(rows[:first.shape[0]], first) and np.array_equal(rows[first.shape[0]:], after)


def test_resume_stays_exact_with_progress_grids_and_a_cosine_warm_up_schedule(tiny, tmp_path):
    flags = ["--sample-every", "1", "--lr-warmup", "3", "--lr-schedule", "cosine", "--max-steps", "8"]
    Program(*parse_args(tiny(tmp_path / "a", "--epochs", "2", *flags))).run()
    Program(*parse_args(tiny(tmp_path / "b", "--epochs", "1", *flags))).run()
    Program(*parse_args(tiny(tmp_path / "b", "--epochs", "1", "--loadckpt",
                             str(tmp_path / "b" / "ckpt" / "ckpt-0.pth")))).run()  # schedule stored
    a, b = (torch.load(tmp_path / r / "ckpt" / "ckpt-1.pth", weights_only=True) for r in "ab")
    assert a["step"] == b["step"] == 8 and len(os.listdir(tmp_path / "a" / "out" / "progress")) == 8
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    lrs = [[json.loads(line)["lr"] for line in open(tmp_path / r / "out" / "metrics.jsonl")]
           for r in "ab"]
    assert lrs[0] == lrs[1] == [lr_at(3, 1e-4, 3, "cosine", 8), lr_at(7, 1e-4, 3, "cosine", 8)]


def test_warm_up_and_cosine_learning_rates_at_chosen_steps():
    assert lr_at(0, 1e-3, 10, "constant", 0) == pytest.approx(1e-4)  # (0 + 1) / 10
    assert lr_at(4, 1e-3, 10, "constant", 0) == pytest.approx(5e-4)
    assert lr_at(9, 1e-3, 10, "constant", 0) == lr_at(500, 1e-3, 10, "constant", 0) == 1e-3
    assert lr_at(0, 1e-3, 0, "cosine", 100) == pytest.approx(1e-3)
    assert lr_at(50, 1e-3, 0, "cosine", 100) == pytest.approx(0.55e-3)  # halfway down to 0.1
    cos = lambda f: 0.1 + 0.45 * (1 + math.cos(math.pi * f))  # noqa: E731
    assert lr_at(25, 1e-3, 0, "cosine", 100) == pytest.approx(1e-3 * cos(0.25))
    assert lr_at(100, 1e-3, 0, "cosine", 100) == pytest.approx(1e-4)
    assert lr_at(10**6, 1e-3, 0, "cosine", 100) == pytest.approx(1e-4)  # stays at the floor
    assert lr_at(2, 1e-3, 4, "cosine", 100) == pytest.approx(1e-3 * 3 / 4 * cos(0.02))


def test_max_steps_stops_the_run_and_sets_the_schedule_length(tiny, tmp_path):
    Program(*parse_args(tiny(tmp_path, "--epochs", "10", "--max-steps", "6", "--lr-schedule",
                             "cosine"))).run()
    saved = [torch.load(p, weights_only=True) for p in (tmp_path / "ckpt").glob("*.pth")]
    assert max(c["step"] for c in saved) == 6 and len(saved) == 2  # epoch 0 (4 steps), then 2
    assert all(c["train"]["schedule_steps"] == 6 for c in saved)
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert lrs[-1] == pytest.approx(lr_at(5, 1e-4, 0, "cosine", 6))


def test_four_accumulated_micro_batches_equal_one_batch_four_times_larger(tiny, tmp_path):
    grads, saved = {}, {}
    for run, flags in (("k4", ["--batch-size", "4", "--grad-accum", "4"]),
                       ("k1", ["--batch-size", "16"])):
        p = Program(*parse_args(tiny(tmp_path / run, "--epochs", "2", "--grad-clip", "1e9", *flags)))
        step = p.trainer.scaler.step

        def record(optimizer, run=run, p=p):  # the gradient of each optimizer step, then Adam
            grads.setdefault(run, []).append(
                {n: w.grad.clone() for n, w in p.trainer.model.named_parameters()})
            return step(optimizer)

        p.trainer.scaler.step = record
        p.run()
        saved[run] = torch.load(tmp_path / run / "ckpt" / "ckpt-1.pth", weights_only=True)
    assert saved["k4"]["step"] == saved["k1"]["step"] == 4  # 32 images / 16 a step, 2 epochs
    for g4, g1 in zip(grads["k4"], grads["k1"]):  # the same gradient (a wrong scale would show)
        for n in g1:
            assert torch.allclose(g4[n], g1[n], atol=1e-7, rtol=1e-4), n
    for k, w in saved["k4"]["model"].items():  # Adam amplifies rounding of near-zero gradients
        assert torch.allclose(w, saved["k1"]["model"][k], atol=1e-5), k  # 1/10 of one lr step


def test_latest_picks_the_most_steps_after_the_rotation_wrapped(tiny, tmp_path, capsys):
    Program(*parse_args(tiny(tmp_path, "--epochs", "6", "--sample-every", "0"))).run()
    steps = {p.name: torch.load(p, weights_only=True)["step"] for p in (tmp_path / "ckpt").glob("*.pth")}
    assert steps["ckpt-0.pth"] == 24 and steps["ckpt-4.pth"] == 20  # epoch 5 overwrote ckpt-0
    assert checkpoint.latest(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt" / "ckpt-0.pth")
    capsys.readouterr()
    assert main(["--resume", *tiny(tmp_path, "--epochs", "1")[1:]]) == 0
    out = capsys.readouterr().out
    assert f"loaded {tmp_path / 'ckpt' / 'ckpt-0.pth'} (epoch 6, step 24)" in out
    assert "epoch 6: mean loss" in out


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigterm_saves_a_checkpoint_and_exits_with_143(tiny, tmp_path):
    proc = subprocess.Popen([sys.executable, DDPM, *tiny(tmp_path, "--epochs", "1000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "ckpt" / "ckpt-1.pth").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM: saved" in out and "Traceback" not in err
    saved = [torch.load(p, weights_only=True) for p in (tmp_path / "ckpt").glob("*.pth")]
    assert max(c["epoch"] for c in saved) >= 2


def test_info_describes_base_and_text_checkpoints(tiny, tmp_path, capsys):
    assert main(["--info", FIXTURE]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{FIXTURE}: text-conditioned ddpm.py model"
    assert "self-attention at 8 px" in out[1] and "8 px, 3 channel(s)" in out[2]
    assert "T = 10, linear schedule" in out[3] and "1 epochs, 2 optimizer steps" in out[4]
    assert out[-1] == "  vocabulary: 3 words, captions of up to 8 tokens"
    Program(*parse_args(tiny(tmp_path, "--epochs", "1", "--grad-accum", "2", "--batch-size",
                             "4"))).run()
    assert main(["--info", str(tmp_path / "ckpt" / "ckpt-0.pth")]) == 0
    out = capsys.readouterr().out
    assert "unconditional ddpm.py model" in out and "32 images seen" in out
    assert "batch 4 x 2 accumulated, lr 0.0001 (constant, warm-up 0 steps), EMA decay 0.9999" in out


def test_info_into_a_closed_pipe_stops_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line, like `--info ckpt.pth | head -0`
    r = subprocess.run([sys.executable, DDPM, "--info", FIXTURE], stdout=write,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert r.returncode == 1 and r.stderr == ""  # no BrokenPipeError traceback


def test_an_export_samples_the_same_images_as_its_checkpoint_and_cannot_resume(tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "model.safetensors"
    assert main(["--loadckpt", FIXTURE, "--export", str(out)]) == 0
    for src, folder in ((FIXTURE, "a"), (str(out), "b")):
        assert main(["--loadckpt", src, "--seed", "3", "--batch-size", "4", "--sampler", "ddim",
                     "--sample-steps", "3", "--save-dir", str(tmp_path / folder)]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f / "ddpm-all.png")) for f in "ab")
    assert np.array_equal(a, b) and a.std() > 1
    assert main(["--info", str(out)]) == 0
    (tmp_path / "faces").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "faces" / "0.png")
    r = subprocess.run([sys.executable, DDPM, "--train", "--data-folders", str(tmp_path / "faces"),
                        "--loadckpt", str(out), "--save-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "without optimizer state" in r.stderr


def test_tensorboard_without_the_package_is_one_line_and_exit_2(
        tiny, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith(("tensorboard", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(tiny(tmp_path, "--tensorboard")) == 2
    err = capsys.readouterr().err
    assert err == "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"


@pytest.mark.parametrize("precision,dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_precision_decides_the_autocast_dtype(tiny, tmp_path, precision, dtype):
    p = Program(*parse_args(tiny(tmp_path, "--precision", precision)))
    assert p.trainer.amp_dtype == dtype
    assert Program(*parse_args(tiny(tmp_path))).trainer.amp_dtype is None  # auto on a CPU: fp32


def test_hflip_off_is_stored_and_a_resume_keeps_it(tiny, tmp_path):
    Program(*parse_args(tiny(tmp_path, "--epochs", "1", "--hflip", "off"))).run()
    ckpt = torch.load(tmp_path / "ckpt" / "ckpt-0.pth", weights_only=True)
    assert ckpt["train"]["hflip"] == "off"
    p = Program(*parse_args(tiny(tmp_path, "--epochs", "1", "--loadckpt", "latest")))
    assert p.cfg.train.hflip == "off" and p.data.hflip is False
    q = Program(*parse_args(tiny(tmp_path, "--loadckpt", "latest", "--hflip", "on")))
    assert q.data.hflip is True  # typed again: the new value


def test_info_describes_a_super_resolution_checkpoint(tmp_path, capsys):
    assert main(["--train", "--demo", "--demo-images", "8", "--img-size", "8", "--super-res", "4",
                 "--num-channels", "4", "--channel-multiples", "1", "--has-attn", "f",
                 "--timesteps", "10", "--beta-max", "0.5", "--batch-size", "4", "--epochs", "1",
                 "--ckpt-save-dir", str(tmp_path), "--save-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["--info", str(tmp_path / "ckpt-0.pth")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path / 'ckpt-0.pth'}: super-resolution ddpm.py model"
    assert out[2] == "  images: 8 px from 4 px, diffusing the residual over bicubic, 3 channel(s)"
    assert out[3].endswith("predicts x0")
    assert "1 epochs, 2 optimizer steps, 8 images seen" in out[4]
