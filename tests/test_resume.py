"""Runs that survive a cluster: one command (--resume) for the first launch and every restart,
checkpoints by steps that resume in mid-epoch exactly as if never stopped (after kill -9, and
under torchrun's restarts), SIGUSR1, and the decode cache built once by two processes."""
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from config import parse_args
from ddpm import Program, main
from run import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDPM = os.path.join(ROOT, "ddpm.py")
IN_ROOT = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
# ddpm.main(argv[2:]); the first process of the first launch (torchrun's restart count 0) kills
# itself with SIGKILL once it has taken step argv[1] and its checkpoint writes have ended.
KILLER = """import os, signal, sys
import ddpm
k, step = int(sys.argv[1]), ddpm.Program.train_step
def train_step(self, x0, tokens):
    loss = step(self, x0, tokens)
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and self.rank == 0
    if first and self.state.step == k:
        self.writer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return loss
ddpm.Program.train_step = train_step
sys.exit(ddpm.main(sys.argv[2:]))
"""
# ddpm.main(argv[2:]), every decode of images appended to the file argv[1] (one line a decode).
COUNTER = """import sys
import data, ddpm
real = data.decode_into
def decode_into(*args, **kwargs):
    with open(sys.argv[1], "a") as f:
        f.write("decode\\n")
    return real(*args, **kwargs)
data.decode_into = decode_into
sys.exit(ddpm.main(sys.argv[2:]))
"""
STEPS, EVERY = 14, 3  # 4 batches an epoch: step saves at 3, 6, 9; epoch ends at 4, 8, 12, 14


def flags(folder) -> list[str]:
    """One command for every launch: --resume, a tiny model on 32 demo faces (4 batches an
    epoch), --max-steps 14 in all, a checkpoint every 3 steps."""
    return ["--resume", "--demo", "--demo-images", "32", "--img-size", "8", "--num-channels", "8",
            "--channel-multiples", "1", "--has-attn", "t", "--num-blocks", "2", "--timesteps",
            "10", "--beta-min", "1e-4", "--beta-max", "0.5", "--lr", "1e-4", "--batch-size", "8",
            "--seed", "7", "--epochs", "100", "--max-steps", str(STEPS), "--save-every",
            str(EVERY), "--device", "cpu", "--sample-every", "0",
            "--ckpt-save-dir", str(folder / "ckpt"), "--save-dir", str(folder / "out")]


def final(folder) -> dict:
    return torch.load(checkpoint.latest(str(folder / "ckpt")), weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit for bit: the weights, their EMA and Adam's moments."""
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    moments = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
    assert all(torch.equal(x[k], y[k]) for x, y in moments for k in x)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_resume_starts_a_new_run_in_an_empty_folder_then_continues_it(tiny, tmp_path, capsys):
    assert main(tiny(tmp_path, "--resume", "--epochs", "1")) == 0
    assert "--resume: no checkpoint in" in capsys.readouterr().out  # one line, then a new run
    assert main(tiny(tmp_path, "--resume", "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert f"loaded {tmp_path / 'ckpt'}" in out and "(epoch 1, step 4)" in out
    assert final(tmp_path)["epoch"] == 2 and final(tmp_path)["step"] == 8
    assert main(tiny(tmp_path, "--epochs", "1")) == 2  # a new run into the folder: refused
    assert "holds checkpoints of another run" in capsys.readouterr().err
    empty = tmp_path / "empty"
    assert main(["--loadckpt", "latest", "--ckpt-save-dir", str(empty)]) == 2  # sampling
    assert "no readable checkpoint" in capsys.readouterr().err


def test_a_run_killed_at_a_random_step_after_a_save_every_checkpoint_resumes_exactly(tmp_path):
    k = random.Random(41).choice([s for s in range(EVERY + 1, STEPS) if s % 4])  # mid-epoch
    killer = write(tmp_path / "killer.py", KILLER)
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], capture_output=True, text=True,  # noqa: E731
                                      timeout=300, env=IN_ROOT, cwd=tmp_path)
    killed = run(killer, str(k), *flags(tmp_path / "a"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = final(tmp_path / "a")
    assert saved["step"] == k // EVERY * EVERY or saved["step"] == k // 4 * 4  # the last save
    resumed = run(DDPM, *flags(tmp_path / "a"))  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(epoch {saved['epoch']}, " in resumed.stdout and f"step {saved['step']})" in resumed.stdout
    whole = run(DDPM, *flags(tmp_path / "b"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_weights(final(tmp_path / "a"), final(tmp_path / "b"))


def test_torchrun_restarts_a_killed_worker_and_ends_as_an_uninterrupted_run(tmp_path):
    killer = write(tmp_path / "killer.py", KILLER)
    # --standalone: the c10d rendezvous, on a port of its own; a restart is a new round of it
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "--max-restarts", "1"]
    run = lambda *cmd: subprocess.run([*torchrun, *cmd], capture_output=True, text=True,  # noqa: E731
                                      timeout=300, env=IN_ROOT, cwd=tmp_path)
    restarted = run(killer, "7", *flags(tmp_path / "a"))  # process 0 killed after step 7
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "loaded" in restarted.stdout and "(epoch 1, batch 2, step 6)" in restarted.stdout
    whole = run(DDPM, *flags(tmp_path / "b"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same_weights(final(tmp_path / "a"), final(tmp_path / "b"))


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this system")
def test_sigusr1_saves_where_the_run_is_and_exits_with_138(tiny, tmp_path, capsys):
    p = Program(*parse_args(tiny(tmp_path, "--epochs", "3", "--sample-every", "0")))
    step = p.train_step

    def train_step(x0, tokens):  # SLURM's --signal=USR1 arrives during step 3
        loss = step(x0, tokens)
        if p.state.step == 3:
            signal.raise_signal(signal.SIGUSR1)
        return loss
    p.train_step = train_step
    with pytest.raises(SystemExit) as stop:
        p.run()
    assert stop.value.code == checkpoint.EXIT["requeue"] == 138
    assert "stopped by SIGUSR1: saved at epoch 0, batch 3, step 3" in capsys.readouterr().out
    saved = final(tmp_path)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (0, 3, 3)  # in mid-epoch


def test_two_processes_on_one_node_decode_the_images_once(tmp_path, unused_port, write_images):
    write_images(tmp_path / "faces", 16, h=8, w=8)
    counter = write(tmp_path / "count.py", COUNTER)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", f"--master_port={unused_port}", counter,
         str(tmp_path / "decodes"), "--train", "--data-folders", str(tmp_path / "faces"),
         "--cache-dir", str(tmp_path / "cache"), "--img-size", "8", "--num-channels", "8",
         "--channel-multiples", "1", "--has-attn", "f", "--num-blocks", "1", "--timesteps", "10",
         "--batch-size", "8", "--max-steps", "1", "--device", "cpu", "--sample-every", "0",
         "--ckpt-save-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=IN_ROOT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "decodes").read_text() == "decode\n"  # one process decoded, for both
    assert final(tmp_path)["step"] == 1


# ddpm.main(argv[1:]) where process 1 cannot read checkpoints (as on a node that does not see
# the folder process 0 writes into).
BLIND = """import os, sys
import ddpm
from run import checkpoint
from ui import UserError
real = checkpoint.read
def read(path, ckpt_dir):
    if os.environ["RANK"] == "1":
        raise UserError(f"checkpoint not found: {path}")
    return real(path, ckpt_dir)
checkpoint.read = read
sys.exit(ddpm.main(sys.argv[1:]))
"""


def test_a_checkpoint_one_process_cannot_read_stops_every_process_with_one_line(tmp_path):
    assert main(flags(tmp_path) + ["--max-steps", "1"]) == 0  # a checkpoint to resume
    blind = write(tmp_path / "blind.py", BLIND)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", blind, *flags(tmp_path)], capture_output=True,
                       text=True, timeout=300, env=IN_ROOT, cwd=tmp_path)
    assert r.returncode != 0
    says = "cannot read " + str(tmp_path / "ckpt")
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: process 1 " + says)]
    # Both processes stop with this line; torchrun ends the other as soon as one exits, so the
    # second may be gone before it prints its copy.
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1
    assert lines[0].endswith("must be a folder every node can read")
    assert "[rank0]" not in r.stderr and "[rank1]" not in r.stderr  # no worker's traceback
