"""A live progress bar for ingestion: done/total, documents/s, ETA, and why it waits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from embedq.producer.bulk import IngestSummary


@contextmanager
def ingest_progress(
    total: int | None, enabled: bool = True, console: Console | None = None
) -> Iterator[Callable[[IngestSummary, int], None]]:
    """Yields an ``on_progress`` callback for :func:`embedq.producer.ingest`."""
    if not enabled:
        yield lambda summary, done: None
        return
    columns = (
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} docs/s"),
        TextColumn("skipped {task.fields[skipped]} failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        # Empty unless the run waits for something (a full Redis), in words.
        TextColumn("{task.fields[note]}", style="bold yellow"),
    )
    with Progress(*columns, transient=False, console=console) as progress:
        task = progress.add_task("ingest", total=total, rate="-", skipped=0, failed=0, note="")

        def update(summary: IngestSummary, done: int) -> None:
            progress.advance(task, done)
            elapsed = progress.tasks[0].elapsed or 1e-9
            rate = f"{progress.tasks[0].completed / elapsed:.0f}"
            note = f"waiting: {summary.waiting}" if summary.waiting else ""
            fields = {"skipped": summary.skipped, "failed": summary.failed, "note": note}
            progress.update(task, rate=rate, **fields)

        yield update
