"""Faults lose nothing: exact resume, a SIGKILL mid-run, non-finite losses, failed saves."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from config import parse_args
from ddpm import Program

DDPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm.py")


def test_resume_is_exact_two_epochs_equal_one_plus_one(tiny, tmp_path):
    Program(*parse_args(tiny(tmp_path / "a", "--epochs", "2"))).run()
    Program(*parse_args(tiny(tmp_path / "b", "--epochs", "1"))).run()
    ckpt_b0 = str(tmp_path / "b" / "ckpt" / "ckpt-0.pth")
    Program(*parse_args(tiny(tmp_path / "b", "--epochs", "1", "--loadckpt", ckpt_b0))).run()
    a = torch.load(tmp_path / "a" / "ckpt" / "ckpt-1.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt" / "ckpt-1.pth", weights_only=True)
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    first = torch.load(ckpt_b0, weights_only=True)
    assert not torch.equal(first["model"]["conv_in.weight"], b["model"]["conv_in.weight"])


def test_a_killed_run_resumes_from_the_last_checkpoint_on_disk(tiny, tmp_path):
    flags = tiny(tmp_path, "--epochs", "1000", "--demo-images", "64")
    proc = subprocess.Popen([sys.executable, DDPM, *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(ckpt_dir.glob("ckpt-*.pth"))) < 3:
        time.sleep(0.05)
    time.sleep(0.37)  # land anywhere in an epoch, possibly in the middle of a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(ckpt_dir.glob("ckpt-*.pth"))
    assert len(saved) >= 3
    epochs = [torch.load(p, weights_only=True)["epoch"] for p in saved]  # all intact
    newest = saved[int(np.argmax(epochs))]
    r = subprocess.run([sys.executable, DDPM, *tiny(tmp_path, "--epochs", "1", "--loadckpt",
                                                     str(newest))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"epoch {max(epochs)}: mean loss" in r.stdout


def test_non_finite_losses_skip_steps_then_stop_after_saving(tiny, tmp_path, capsys):
    p = Program(*parse_args(tiny(tmp_path, "--epochs", "3")))
    real_losses = p.trainer.diffusion.losses
    calls = []

    def sometimes_nan(*args):  # (net, x0, t, eps, cond)
        calls.append(1)
        loss = real_losses(*args)
        return loss * float("nan") if len(calls) in (2,) or len(calls) >= 6 else loss

    p.trainer.diffusion.losses = sometimes_nan
    before = {k: v.clone() for k, v in p.trainer.model.state_dict().items()}
    with pytest.raises(SystemExit) as stop:
        p.run()
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "--lr" in out
    assert p.state.step == 4  # steps 1, 3, 4, 5 were taken; 2 was skipped; 6.. stopped the run
    saved = torch.load(tmp_path / "ckpt" / "ckpt-2.pth", weights_only=True)  # in epoch 2
    assert saved["step"] == 4 and saved["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert any(not torch.equal(before[k], v) for k, v in saved["model"].items())


def test_a_failed_save_is_reported_and_training_goes_on(tiny, tmp_path, capsys, monkeypatch):
    p = Program(*parse_args(tiny(tmp_path, "--epochs", "2")))
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        if p.state.epoch == 1:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    p.run()
    out = capsys.readouterr().out
    assert "could not save" in out and "No space left on device" in out
    assert p.state.epoch == 2 and os.path.exists(tmp_path / "ckpt" / "ckpt-1.pth")
    assert not os.path.exists(tmp_path / "ckpt" / "ckpt-0.pth")
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".tmp")]


def default_sigint():
    """In the child before exec: Ctrl-C's default action, even where the test runner was started
    with SIGINT ignored (a background job, nohup), which a child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_a_checkpoint_then_the_after_strip(tiny, tmp_path):
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        proc = subprocess.Popen([sys.executable, DDPM, *tiny(tmp_path, "--epochs", "1000")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)
    finally:
        signal.signal(signal.SIGINT, before)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "ckpt" / "ckpt-1.pth").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # 128 + SIGINT, as shells report a Ctrl-C
    assert "stopped by SIGINT: saved at epoch" in out and "Traceback" not in err
    assert (tmp_path / "out" / "run-after.png").exists()
    epochs = [torch.load(p, weights_only=True)["epoch"] for p in (tmp_path / "ckpt").glob("*.pth")]
    assert max(epochs) >= 2
