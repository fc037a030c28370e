"""Terminal output shared by every command: one console setup and one progress-bar style.

Lines are never hard-wrapped (rich wraps at 80 columns when stdout is not a terminal), so a log
file, `nohup` or `tee` keeps every path and message on one line.
"""
import contextlib
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class UserError(Exception):
    """Bad flags, files or checkpoints: printed as one line, exit code 2."""


class NoCheckpoint(UserError):
    """--loadckpt latest in a folder that holds no readable checkpoint (--resume: a new run)."""


def make_console(quiet: bool = False) -> Console:
    """A console that prints whole lines (soft wrap: the terminal wraps, rich does not)."""
    return Console(highlight=False, soft_wrap=True, quiet=quiet)


def progress_bar(console: Console | None = None, *fields: str, disable: bool = False) -> Progress:
    """A transient bar: description, bar, done/total, time elapsed and left, then the named task
    fields. (Training's first bar counts the whole run's optimizer steps.)"""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    *(TextColumn(f"{{task.fields[{f}]}}") for f in fields),
                    console=console, transient=True, disable=disable)


@contextlib.contextmanager
def task_bar(progress, total: int, default: str):
    """A task on a bar -> yields advance(n). progress: a rich Progress to add the task to (named
    `default`), a description for a bar of its own, or None for no bar."""
    if progress is None:
        yield lambda n=1: None
        return
    own = isinstance(progress, str)
    bar = progress_bar() if own else progress
    with bar if own else contextlib.nullcontext():
        task = bar.add_task(progress if own else default, total=total)
        yield lambda n=1: bar.advance(task, n)
        bar.remove_task(task)


def duration(seconds: float) -> str:
    """3725 -> '1 h 02 min', 150 -> '3 min', 40 -> '40 s'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(seconds / 60 + 0.5)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class RunLength:
    """The expected length of a training run, from the speed of its steps after the warm-up.

    A run's first steps are slow (memory allocations, lazy start-up, caches and cuDNN's search
    for the fastest kernels): on the demo preset its first 3 steps take 2.4 times as long as a
    step after them. They are left out: once `measure` steps after the first `warm` are timed,
    or `enough` seconds of them (at least 2 steps), the speed is known, and the run's expected
    length is the time so far plus the steps left at that speed."""

    def __init__(self, planned: int, warm: int = 2, measure: int = 10, enough: float = 30.0,
                 clock=time.monotonic):
        self.planned, self.warm, self.measure, self.enough = planned, warm, measure, enough
        self.clock, self.steps, self.said = clock, 0, False
        self.start = self.warm_end = clock()

    def tick(self) -> tuple[float, float] | None:
        """After each optimizer step -> (seconds a step, expected seconds of the whole run),
        once, when the speed is first known; None before and after."""
        self.steps += 1
        now = self.clock()
        if self.steps == self.warm:
            self.warm_end = now
        timed = self.steps - self.warm
        if self.said or timed < 1 or (timed < self.measure and
                                      (timed < 2 or now - self.warm_end < self.enough)):
            return None
        self.said = True
        per_step = (now - self.warm_end) / timed
        return per_step, now - self.start + per_step * max(self.planned - self.steps, 0)


def long_run_warning(seconds_per_step: float, total: float, steps_planned: int, device_type: str,
                     is_default_64px: bool, at_least: float = 600.0) -> str | None:
    """On a CPU: one line with the time the whole run will take (`total` seconds, RunLength),
    when that is at least `at_least` seconds, and for the default 64-px model a pointer to the
    small models. None on other devices and for shorter runs."""
    if device_type != "cpu" or total < at_least:
        return None
    line = (f"note: {steps_planned:,} steps at {seconds_per_step:.2f} s a step on the CPU: about "
            f"{duration(total)} for this run")
    if is_default_64px:
        line += ("; the default 64-px model (63 M parameters) is meant for a GPU: for a first try "
                 "use --demo (a 1.1 M-parameter model, about 9 minutes on 2 cores) or smaller "
                 "flags (--img-size 32 --num-channels 32 --channel-multiples 1 2 2 --has-attn "
                 "f t f --num-blocks 1)")
    return line
