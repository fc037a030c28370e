"""steps.py: a step of the GPU check as a process that cannot outlive its time: run in a session
of its own with a token in its environment, its output read line by line as it comes, and at its
limit killed with every process it started, wherever they moved (torchrun starts its workers in
sessions of their own). Linux: the processes are found in /proc.
"""
import contextlib
import io
import os
import selectors
import signal
import subprocess
import time
import uuid

# Every process a step starts carries this in its environment (the step's own token), whatever
# session it moves to: torchrun starts its workers in sessions of their own.
TAG = "DDPM_GPU_CHECK_STEP"
# Once a step is killed, its output pipe is read for at most this many seconds more, then closed.
DRAIN = 5.0


def tagged(token: str) -> list[int]:
    """The processes (other than this one) whose environment holds TAG=token: a step's process
    and every process it started, whatever their session or parent now (read from /proc)."""
    want, found = f"{TAG}={token}".encode(), []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            with contextlib.suppress(OSError), open(f"/proc/{name}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    found.append(int(name))
    return found


def alive(pid: int) -> bool:
    """Whether process pid still runs (a zombie has ended; only its exit status is left)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def end_step(proc: subprocess.Popen, token: str, grace: float = 10.0) -> list[int]:
    """SIGKILL a step's process group and every process tagged with its token, again until none
    is left (one may fork while the first kills land), for at most grace seconds; reap the step
    -> the pids still alive then (none, unless the kernel holds one)."""
    deadline = time.monotonic() + grace
    while True:
        pids = [pid for pid in tagged(token) if alive(pid)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return [pid for pid in tagged(token) if alive(pid)]


def run_bounded(cmd: list[str], limit: float, on_line, cwd: str, env: dict) -> int | None:
    """Run cmd in a session of its own, every line of its output (stdout and stderr) to
    on_line as it comes, until it ends or limit seconds pass; then end_step kills whatever of
    it is left (its workers too) -> its exit code, or None if it ran out of time."""
    token = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**env, TAG: token},
                            start_new_session=True)
    fd, pending, deadline = proc.stdout.fileno(), [b""], time.monotonic() + limit
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)

    def feed(chunk: bytes) -> None:
        *lines, pending[0] = (pending[0] + chunk).split(b"\n")
        for line in lines:
            on_line(line.decode(errors="replace"))

    try:
        while (left := deadline - time.monotonic()) > 0 and proc.poll() is None:
            if sel.select(min(left, 0.25)):
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # every writer closed the pipe: the step ends, or runs out of time
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    break
                feed(chunk)
        rc = proc.poll()  # ended (what it started may still hold the pipe open), or ran over
    finally:  # also on Ctrl-C, which reaches this process only: the step's session has its own
        end_step(proc, token)
        try:  # what is left in the pipe, until EOF or DRAIN seconds: a process the kill missed
            drain_end = time.monotonic() + DRAIN  # (one that dropped its tag) may still write
            while (left := drain_end - time.monotonic()) > 0 and sel.select(left):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                feed(chunk)
            if pending[0]:
                on_line(pending[0].decode(errors="replace"))
        finally:
            sel.close()
            proc.stdout.close()
    return rc


class LineSink(io.TextIOBase):
    """A text stream that hands each complete line to on_line (the rest at close)."""

    def __init__(self, on_line):
        self.on_line, self.pending = on_line, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        *lines, self.pending = (self.pending + s).split("\n")
        for line in lines:
            self.on_line(line)
        return len(s)

    def close(self) -> None:
        if self.pending:
            self.on_line(self.pending)
            self.pending = ""
        super().close()
