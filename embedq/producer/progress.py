"""A live progress bar for ingestion: done/total, documents/s, ETA."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
    total: int | None, enabled: bool = True
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
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("ingest", total=total, rate="-", skipped=0, failed=0)

        def update(summary: IngestSummary, done: int) -> None:
            progress.advance(task, done)
            elapsed = progress.tasks[0].elapsed or 1e-9
            rate = f"{progress.tasks[0].completed / elapsed:.0f}"
            progress.update(task, rate=rate, skipped=summary.skipped, failed=summary.failed)

        yield update
