"""The progress bar of Loopwise's long commands: export, rebuild, publish, simulate, closed loop."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

__all__ = ["progress_bar"]


def progress_bar(
    title: str,
    fields: str,
    *,
    enabled: bool = True,
    console: Console | None = None,
    count: ProgressColumn | None = None,
) -> Progress:
    """``title``, the bar, done/total (or ``count``), ``fields``, the time remaining.

    ``title`` and ``fields`` are rich text templates (``{task.fields[name]}`` reads a field
    of the task); ``enabled=False`` shows nothing; ``console``: rich's default when None.
    """
    return Progress(
        TextColumn(title),
        BarColumn(),
        MofNCompleteColumn() if count is None else count,
        TextColumn(fields),
        TimeRemainingColumn(),
        disable=not enabled,
        console=console,
    )
