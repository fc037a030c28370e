"""The training program's side of docs/safety.md: run ownership of the checkpoint folder, a
second SIGTERM during the pre-emption save, Ctrl-C and failed-save exit codes, interpolation
drawn in batches. The pieces they use (checkpoint.new_run_id, claim_folder, signals_held,
exit_code) are tested in test_run_folder.py; these tests check that ddpm.py uses them."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from core import diffusion
import unet
from ddpm import main

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "text-model-bc9cbb7.pth")


def tiny(tmp_path, *extra, folder="ckpt"):
    return ["--train", "--demo", "--demo-images", "16", "--img-size", "8", "--num-channels", "8",
            "--channel-multiples", "1", "--has-attn", "f", "--timesteps", "10", "--beta-max",
            "0.5", "--batch-size", "8", "--seed", "7", "--sample-every", "0",
            "--ckpt-save-dir", str(tmp_path / folder), "--save-dir", str(tmp_path / "out"), *extra]


def exit_code_of(argv) -> int:
    """main(argv)'s exit code, whether it returns it or raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def steps_in(folder) -> dict:
    return {p.name: torch.load(p, weights_only=True)["step"] for p in folder.glob("*.pth")}


def test_a_new_run_into_a_folder_of_another_run_is_refused_and_start_over_moves_it(tmp_path,
                                                                                    capsys):
    assert exit_code_of(tiny(tmp_path, "--epochs", "3")) == 0
    first = steps_in(tmp_path / "ckpt")
    capsys.readouterr()
    assert exit_code_of(tiny(tmp_path, "--epochs", "1", "--lr", "5e-4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another run" in err and "--resume" in err
    assert steps_in(tmp_path / "ckpt") == first  # untouched
    assert exit_code_of(["--resume", *tiny(tmp_path, "--epochs", "1")[1:]]) == 0  # continuing
    ids = {torch.load(p, weights_only=True)["run_id"] for p in (tmp_path / "ckpt").glob("*.pth")}
    assert len(ids) == 1
    assert exit_code_of(tiny(tmp_path, "--epochs", "1", "--start-over")) == 0
    assert steps_in(tmp_path / "ckpt") == {"ckpt-0.pth": 2}
    moved = next((tmp_path / "ckpt").glob("replaced-*"))
    assert sorted(p.name for p in moved.glob("*.pth")) == sorted(["ckpt-3.pth", *first])


def test_a_second_live_run_into_the_same_folder_is_refused(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from run import checkpoint; "
         "lock = checkpoint.claim_folder(sys.argv[1], 'other-run'); print('locked', flush=True); "
         "sys.stdin.read()", str(tmp_path / "ckpt")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
    try:
        assert holder.stdout.readline() == "locked\n"
        assert exit_code_of(tiny(tmp_path, "--epochs", "1")) == 2
        assert "other-run" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert exit_code_of(tiny(tmp_path, "--epochs", "1")) == 0  # a killed holder's lock is free


def test_a_zero_byte_temporary_of_a_killed_first_save_is_removed(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ckpt-0.pth.999999.tmp").write_bytes(b"")
    assert exit_code_of(tiny(tmp_path, "--epochs", "1")) == 0
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["ckpt-0.pth"]


def signal_at_call(monkeypatch, cls, name, n, signum):
    """Send this process `signum` (a real signal) when cls.name is called the n-th time."""
    real, calls = getattr(cls, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here, whatever the test runner inherited."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_second_sigterm_during_the_preemption_save_is_ignored(tmp_path, monkeypatch):
    signal_at_call(monkeypatch, diffusion.GaussianDiffusion, "losses", 2, signal.SIGTERM)
    real_save, saves = torch.save, []

    def save_then_sigterm(obj, f, *a, **k):  # the scheduler's second SIGTERM, mid-save
        saves.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_sigterm)
    assert exit_code_of(tiny(tmp_path, "--epochs", "1000")) == 143
    # The step in progress (the 2nd) ends first, then the one save, whole.
    assert len(saves) == 1 and steps_in(tmp_path / "ckpt") == {"ckpt-0.pth": 2}


def test_ctrl_c_during_training_saves_and_exits_130(tmp_path, monkeypatch, sigint_raises):
    signal_at_call(monkeypatch, diffusion.GaussianDiffusion, "losses", 2, signal.SIGINT)
    assert exit_code_of(tiny(tmp_path, "--epochs", "1000")) == 130
    assert steps_in(tmp_path / "ckpt") == {"ckpt-0.pth": 2}  # after the step in progress


def test_ctrl_c_during_sampling_is_one_line_and_130(tmp_path, monkeypatch, capsys, sigint_raises):
    signal_at_call(monkeypatch, unet.UNet, "forward", 2, signal.SIGINT)
    assert exit_code_of(["--loadckpt", FIXTURE, "--batch-size", "2",
                         "--save-dir", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err


def test_a_run_whose_every_save_failed_exits_74(tmp_path, monkeypatch, capsys):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert exit_code_of(tiny(tmp_path, "--epochs", "2")) == 74
    assert "could not save" in capsys.readouterr().out


def test_interpolation_draws_many_frames_in_batches_of_batch_size(tmp_path, monkeypatch):
    real, sizes = unet.UNet.forward, []
    monkeypatch.setattr(unet.UNet, "forward",
                        lambda self, x, *a, **k: sizes.append(len(x)) or real(self, x, *a, **k))
    assert exit_code_of(["--loadckpt", FIXTURE, "--interpolate-seeds", "1", "2", "--frames", "10",
                         "--batch-size", "4", "--save-dir", str(tmp_path / "out")]) == 0
    assert max(sizes) == 4 and sum(sizes) % 10 == 0  # 4 + 4 + 2 frames a step
    from PIL import Image
    assert Image.open(tmp_path / "out" / "interpolation.png").size == (10 * 9 + 1, 10)
