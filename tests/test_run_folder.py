"""A training run owns its checkpoint folder (run ids, a lock released however the run ends),
saves are never cut short by a signal, and the exit code says whether the work was saved."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from run import checkpoint
from ui import UserError
from data import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_ckpt(folder, name, run_id=None, step=1):
    """A minimal checkpoint file of run `run_id` (None: written before runs had ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": checkpoint.FORMAT, "step": step, "model": {"w": torch.ones(2)}}
    if run_id is not None:
        ckpt["run_id"] = run_id
    torch.save(ckpt, folder / name)


def test_run_ids_are_new_each_time_and_say_when_the_run_began():
    a, b = checkpoint.new_run_id(), checkpoint.new_run_id()
    assert a != b and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", a)


def test_a_new_run_into_a_folder_of_another_run_is_refused_in_one_line(tmp_path):
    write_ckpt(tmp_path / "ck", "ckpt-0.pth", "run-a", step=4)
    write_ckpt(tmp_path / "ck", "ckpt-1.pth", "run-a", step=8)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(UserError) as refused:
        checkpoint.claim_folder(str(tmp_path / "ck"), "run-b")
    msg = str(refused.value)
    assert "\n" not in msg and "run run-a" in msg and "ckpt-0.pth, ckpt-1.pth" in msg
    assert "--resume" in msg and "--start-over" in msg
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before  # untouched
    with checkpoint.claim_folder(str(tmp_path / "ck"), "run-a"):  # the same run goes on
        pass


def test_checkpoints_without_a_run_id_are_another_runs_unless_continuing_one(tmp_path):
    write_ckpt(tmp_path / "ck", "ckpt-0.pth")
    with pytest.raises(UserError, match="run without an id"):
        checkpoint.claim_folder(str(tmp_path / "ck"), "run-b")
    with checkpoint.claim_folder(str(tmp_path / "ck"), "run-b", continuing=True):
        pass
    write_ckpt(tmp_path / "ck", "ckpt-1.pth", "run-c")  # continuing never takes another id's
    with pytest.raises(UserError, match="run run-c"):
        checkpoint.claim_folder(str(tmp_path / "ck"), "run-b", continuing=True)


def test_start_over_moves_the_other_runs_checkpoints_aside_and_keeps_other_files(tmp_path):
    ck = tmp_path / "ck"
    write_ckpt(ck, "ckpt-0.pth", "run-a")
    write_ckpt(ck, "best.pth", "run-a")
    write_ckpt(ck, "ckpt-1.pth", "run-b")  # this run's own
    (ck / "notes.pth").write_bytes(b"not a checkpoint")  # not a run's: left alone
    with checkpoint.claim_folder(str(ck), "run-b", start_over=True):
        assert sorted(os.listdir(ck / "replaced-run-a")) == ["best.pth", "ckpt-0.pth"]
        assert sorted(p.name for p in ck.glob("*.pth")) == ["ckpt-1.pth", "notes.pth"]
    assert torch.load(ck / "replaced-run-a" / "ckpt-0.pth", weights_only=True)["run_id"] == "run-a"


def test_the_temporary_of_a_killed_save_is_removed_when_the_folder_is_claimed(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "ckpt-0.pth.4242.tmp").write_bytes(b"")  # a save killed before it wrote anything
    (ck / "keep.txt").write_text("x")
    with checkpoint.claim_folder(str(ck), "run-a"):
        assert sorted(os.listdir(ck)) == ["keep.txt", "run.lock"]
    assert os.listdir(ck) == ["keep.txt"]  # the lock file goes with the run


def test_a_live_run_keeps_a_second_one_out_of_its_folder(tmp_path):
    ck = str(tmp_path / "ck")
    with checkpoint.claim_folder(ck, "run-a"):
        with pytest.raises(UserError) as refused:
            checkpoint.claim_folder(ck, "run-a")  # even the same run, started twice
        assert f"pid {os.getpid()}" in str(refused.value) and "run run-a" in str(refused.value)
    checkpoint.claim_folder(ck, "run-b").release()  # free again once released


HOLD = ("import sys; from run import checkpoint; "  # run in the repository root
        "lock = checkpoint.claim_folder(sys.argv[1], 'run-a'); print('locked', flush=True); "
        "sys.stdin.read()")


def test_the_lock_of_a_killed_run_is_free_at_once(tmp_path):
    ck = str(tmp_path / "ck")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, ck], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            checkpoint.claim_folder(ck, "run-b", start_over=True)
    finally:
        holder.kill()  # SIGKILL: nothing of the run runs any more
        holder.wait()
    assert os.path.exists(os.path.join(ck, "run.lock"))  # left behind, naming a dead process
    checkpoint.claim_folder(ck, "run-b").release()


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises Stop in this process (a handler that acts at once), whatever handler the
    test runner had; restored afterwards."""
    class Stop(BaseException):
        pass

    def handler(signum, frame):
        raise Stop()

    before = signal.signal(signal.SIGTERM, handler)
    yield Stop, handler
    signal.signal(signal.SIGTERM, before)


def save_with_signals(path, n):
    """A real checkpoint save during which this process gets SIGTERM n times."""
    def write(f):
        for _ in range(n):
            os.kill(os.getpid(), signal.SIGTERM)
        torch.save({"step": 7, "w": torch.arange(1000)}, f)
    atomic_write(path, write)


def test_sigterms_during_a_held_save_are_delivered_once_it_is_whole(tmp_path, sigterm_raises):
    Stop, handler = sigterm_raises
    with pytest.raises(Stop):
        with checkpoint.signals_held():
            save_with_signals(tmp_path / "a.pth", 2)
            reached_the_end = True
    assert reached_the_end and torch.load(tmp_path / "a.pth", weights_only=True)["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is handler
    with pytest.raises(Stop):  # and without holding them, the save is cut short, nothing written
        save_with_signals(tmp_path / "b.pth", 1)
    assert sorted(os.listdir(tmp_path)) == ["a.pth"]


def test_sigterms_during_the_last_save_of_a_stopping_run_are_dropped(tmp_path, sigterm_raises):
    Stop, handler = sigterm_raises
    with checkpoint.signals_held(deliver=False):
        save_with_signals(tmp_path / "a.pth", 3)
    assert torch.load(tmp_path / "a.pth", weights_only=True)["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is handler


def test_the_exit_code_says_how_the_run_ended_and_whether_its_work_was_saved():
    assert [checkpoint.exit_code(how, True) for how in
            ("done", "nonfinite", "interrupted", "requeue", "terminated")] == [0, 1, 130, 138, 143]
    assert {checkpoint.exit_code(how, False) for how in checkpoint.EXIT} == {74}


def test_start_over_is_a_training_flag_that_contradicts_resume(settings, reader):
    settings(["--train", "--demo", "--start-over"])
    for argv, says in ((["--resume", "--demo", "--start-over"], "give one of them"),
                       (["--loadckpt", "x.pth", "--start-over"], "give --train")):
        with pytest.raises(UserError, match=says):
            settings(argv, read=reader())
