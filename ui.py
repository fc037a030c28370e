"""Terminal output shared by every command: one console setup and one progress-bar style.

Lines are never hard-wrapped (rich wraps at 80 columns when stdout is not a terminal), so a log
file, `nohup` or `tee` keeps every path and message on one line.
"""
import contextlib

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


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
