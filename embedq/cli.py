"""The ``embedq`` command. Every flag can also be set by the environment variable it names."""

from __future__ import annotations

import json
import sys

import numpy as np
import typer

from embedq.app import QUEUES

cli = typer.Typer(help="embedq: asynchronous text embeddings at any scale.", no_args_is_help=True)


def _check_queue(queue: str) -> str:
    if queue not in QUEUES:
        raise typer.BadParameter(f"queue must be one of {', '.join(QUEUES)}")
    return queue


@cli.command()
def worker(
    queue: str = typer.Option("cpu", envvar="EMBEDQ_QUEUE", callback=_check_queue),
    concurrency: int | None = typer.Option(
        None, envvar="EMBEDQ_WORKER_CONCURRENCY", help="Tasks at once (default 32 threads)."
    ),
    loglevel: str = typer.Option("INFO", envvar="EMBEDQ_LOGLEVEL"),
    hostname: str | None = typer.Option(None, envvar="EMBEDQ_HOSTNAME"),
) -> None:
    """Run a Celery worker that consumes QUEUE (same as: celery -A embedq.app worker -Q QUEUE)."""
    from embedq.app import app

    argv = ["worker", "-Q", queue, "-n", hostname or f"{queue}@%h", "--loglevel", loglevel]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    app.worker_main(argv)


@cli.command()
def embed(
    texts: list[str] = typer.Argument(..., help="Texts to embed."),
    queue: str | None = typer.Option(None, envvar="EMBEDQ_QUEUE"),
    timeout_s: float = typer.Option(60.0, envvar="EMBEDQ_TIMEOUT_S"),
    full: bool = typer.Option(False, "--full", help="Print whole vectors, not a preview."),
) -> None:
    """Embed TEXTS through the queue and print the vectors as JSON lines."""
    from embedq.producer import embed as embed_many

    vectors = embed_many(texts, queue=queue, timeout_s=timeout_s)
    for i, vector in enumerate(vectors):
        shown = vector.tolist() if full else [round(float(x), 4) for x in vector[:8]]
        line = {"index": i, "dim": int(vector.shape[0]), "truncated": i in vectors.truncated}
        print(json.dumps(line | {"vector": shown}))


@cli.command()
def demo() -> None:
    """Start a CPU worker, embed a few texts, print their similarity matrix, stop the worker."""
    from embedq.demo import main as run_demo

    sys.exit(run_demo())


def main() -> None:
    """Console-script entry point."""
    np.set_printoptions(precision=3, suppress=True)
    cli()


if __name__ == "__main__":
    main()
