"""The one progress helper: rich progress bars, silent when not on a terminal or when quiet.

Long work (training, streaming merges, pool building) reports progress through
:func:`progress`. Bars are shown only when stderr is a terminal and quiet mode is off;
``set_quiet(True)`` (the CLI's ``--quiet``) or ``MODELFUSE_QUIET=1`` silences them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_QUIET = os.environ.get("MODELFUSE_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Turn progress output off (True) or back on (False) for this process."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


def enabled(show: bool | None = None) -> bool:
    """Whether progress should be drawn: ``show`` overrides, else a terminal and not quiet."""
    if show is not None:
        return bool(show) and not _QUIET
    return not _QUIET and sys.stderr.isatty()


class _Silent:
    """Stands in for a task handle when nothing is drawn."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def advance(self, amount: float = 1) -> None:
        pass


class _Task:
    def __init__(self, bar: Any, task_id: Any) -> None:
        self._bar = bar
        self._id = task_id

    def update(self, **fields: Any) -> None:
        self._bar.update(self._id, **fields)

    def advance(self, amount: float = 1) -> None:
        self._bar.advance(self._id, amount)


@contextmanager
def progress(
    description: str, total: float | None, *, unit: str = "steps", show: bool | None = None
) -> Iterator[_Task | _Silent]:
    """A progress bar for one long task: ``with progress("train", total=n) as p: p.advance()``.

    ``unit="bytes"`` shows transferred size and speed. The handle's ``update(**fields)``
    accepts rich task fields (``description=``, ``completed=``, ``info=``: text shown after the bar).
    """
    if not enabled(show):
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn()]
    if unit == "bytes":
        columns += [DownloadColumn(), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task_id = bar.add_task(description, total=total, info="")
        yield _Task(bar, task_id)
