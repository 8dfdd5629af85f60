"""The ``embedq`` command. Every flag can also be set by the environment variable it names."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import typer

from embedq.broker.traffic import Traffic
from embedq.ops.probe import BROKER, MODEL, STORE, requires
from embedq.settings import QUEUES

cli = typer.Typer(help="embedq: asynchronous text embeddings at any scale.", no_args_is_help=True)


@cli.callback()
def _options(
    debug: bool = typer.Option(
        False,
        "--debug",
        envvar="EMBEDQ_DEBUG",
        help="On failure print the traceback too, not only the one line that says why.",
    ),
) -> None:
    if debug:
        # Read by embedq.ops.failures in this process, and inherited by the workers it starts.
        os.environ["EMBEDQ_DEBUG"] = "1"


def _check_queue(queue: str | None) -> str | None:
    if queue is not None and queue not in QUEUES:
        raise typer.BadParameter(f"queue must be one of {', '.join(QUEUES)}")
    return queue


@cli.command()
@requires(BROKER, STORE, MODEL)
def worker(
    queue: str = typer.Option("cpu", envvar="EMBEDQ_QUEUE", callback=_check_queue),
    concurrency: int | None = typer.Option(
        None, envvar="EMBEDQ_WORKER_CONCURRENCY", help="Tasks at once (default 32 threads)."
    ),
    loglevel: str = typer.Option("INFO", envvar="EMBEDQ_LOGLEVEL"),
    hostname: str | None = typer.Option(None, envvar="EMBEDQ_HOSTNAME"),
    devices: str | None = typer.Option(
        None,
        envvar="EMBEDQ_DEVICES",
        help="One worker process per device: all, GPU numbers (0,1,3), or cpu,cpu (no GPU).",
    ),
    direct_queue: bool = typer.Option(
        False,
        "--direct-queue",
        envvar="EMBEDQ_DIRECT_QUEUE",
        help="Also consume a queue of this worker's own (the router weighs it by speed).",
    ),
) -> None:
    """Run a Celery worker that consumes QUEUE (same as: celery -A embedq.app worker -Q QUEUE)."""
    if devices:
        raise typer.Exit(_supervise(devices, queue, concurrency, loglevel))
    from celery.utils.nodenames import host_format

    from embedq.app import app
    from embedq.keys import direct_queue as direct_name

    name = host_format(hostname or f"{queue}@%h")
    queues = f"{queue},{direct_name(queue, name)}" if direct_queue else queue
    argv = ["worker", "-Q", queues, "-n", name, "--loglevel", loglevel]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    app.worker_main(argv)
    from embedq.worker.stop import exit_code

    # Stopped by its failed device, or unable to start: exit non-zero (Celery's own is 0).
    if code := exit_code():
        raise typer.Exit(code)


def _supervise(devices: str, queue: str, concurrency: int | None, loglevel: str) -> int:
    """``worker --devices``: one worker per device, started and stopped together."""
    from embedq.errors import ConfigurationError
    from embedq.worker.supervisor import parse_devices, supervise

    try:
        slots = parse_devices(devices)
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--devices") from exc
    options = ["--loglevel", loglevel]
    options += ["--concurrency", str(concurrency)] if concurrency else []
    return supervise(slots, queue, options)


@cli.command()
@requires(BROKER)
def embed(
    texts: list[str] = typer.Argument(..., help="Texts to embed."),
    queue: str | None = typer.Option(None, envvar="EMBEDQ_QUEUE", callback=_check_queue),
    timeout_s: float = typer.Option(60.0, envvar="EMBEDQ_TIMEOUT_S"),
    full: bool = typer.Option(False, "--full", help="Print whole vectors, not a preview."),
    model: str | None = typer.Option(
        None, envvar="EMBEDQ_EMBED_MODEL", help="Model name (default: the workers' first)."
    ),
    traffic: Traffic | None = typer.Option(
        None,
        envvar="EMBEDQ_EMBED_TRAFFIC",
        help="interactive or bulk (default: by the number of texts).",
    ),
) -> None:
    """Embed TEXTS through the queue and print the vectors as JSON lines."""
    from embedq.producer import embed as embed_many

    vectors = embed_many(texts, queue=queue, timeout_s=timeout_s, model=model, traffic=traffic)
    for i, vector in enumerate(vectors):
        shown = vector.tolist() if full else [round(float(x), 4) for x in vector[:8]]
        line = {"index": i, "dim": int(vector.shape[0]), "truncated": i in vectors.truncated}
        print(json.dumps(line | {"vector": shown}))


@cli.command()
@requires(BROKER)
def ingest(
    path: Path = typer.Argument(
        ..., help="JSONL, CSV or text file (one document a line); - for stdin."
    ),
    collection: str = typer.Option(..., envvar="EMBEDQ_COLLECTION"),
    fmt: str = typer.Option(
        "auto", "--format", envvar="EMBEDQ_INGEST_FORMAT", help="auto, jsonl, csv, text"
    ),
    id_field: str = typer.Option("id", envvar="EMBEDQ_ID_FIELD"),
    text_field: str = typer.Option("text", envvar="EMBEDQ_TEXT_FIELD"),
    chunk_size: int = typer.Option(64, envvar="EMBEDQ_CHUNK_SIZE", help="Texts per task."),
    max_in_flight: int = typer.Option(
        16, envvar="EMBEDQ_MAX_IN_FLIGHT", help="Tasks queued at once."
    ),
    chunk_tokens: int | None = typer.Option(
        None, envvar="EMBEDQ_CHUNK_TOKENS", help="Split long texts."
    ),
    overlap: int = typer.Option(
        0, envvar="EMBEDQ_OVERLAP", help="Tokens shared by neighbouring chunks."
    ),
    queue: str | None = typer.Option(None, envvar="EMBEDQ_QUEUE", callback=_check_queue),
    model: str | None = typer.Option(
        None, envvar="EMBEDQ_INGEST_MODEL", help="Model name (default: the workers' first)."
    ),
    quiet: bool = typer.Option(False, "--quiet", envvar="EMBEDQ_QUIET"),
    as_json: bool = typer.Option(
        False, "--json", envvar="EMBEDQ_JSON", help="Print the summary as JSON."
    ),
    traffic: Traffic = typer.Option(
        Traffic.BULK,
        envvar="EMBEDQ_INGEST_TRAFFIC",
        help="bulk (the default: applications' interactive calls go first) or interactive.",
    ),
) -> None:
    """Embed and store every document of PATH; a rerun skips what is already stored."""
    from embedq.producer.bulk import ingest as run_ingest
    from embedq.producer.progress import ingest_progress
    from embedq.producer.reader import count_records, read_documents

    if str(path) != "-" and not path.is_file():
        raise typer.BadParameter(f"{path} is not a readable file", param_hint="PATH")
    records = read_documents(path, fmt, id_field, text_field)
    with ingest_progress(count_records(path), enabled=not (quiet or as_json)) as on_progress:
        summary = run_ingest(
            records,
            collection,
            chunk_size=chunk_size,
            max_in_flight=max_in_flight,
            queue=queue,
            chunk_tokens=chunk_tokens,
            overlap=overlap,
            on_progress=on_progress,
            model=model,
            traffic=traffic,
        )
    _report_ingest(summary, as_json, quiet)


def _report_ingest(summary: Any, as_json: bool, quiet: bool) -> None:
    """Print the summary; exit 130 when interrupted, 1 when any document was not stored."""
    if as_json:
        print(json.dumps(summary.as_dict()))
    elif not quiet:
        failures = "".join(f"\n  {f['where']}: {f['reason']}" for f in summary.failures)
        print(
            f"read {summary.read}, stored {summary.stored} (embedded {summary.embedded}, "
            f"cached {summary.cached}), skipped {summary.skipped} already stored, "
            f"truncated {summary.truncated}, failed {summary.failed}, "
            f"{summary.wall_s:.1f}s{' (interrupted)' if summary.interrupted else ''}{failures}"
        )
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.error:
        from embedq.errors import BrokerUnavailableError

        # One line and exit 69 (embedq.ops.failures), after the summary of what was stored.
        raise BrokerUnavailableError(f"{summary.error}; a rerun skips what was stored")
    # Scripts must notice: any document not stored makes the exit status 1.
    if summary.failed:
        raise typer.Exit(1)


@cli.command()
@requires(BROKER, STORE)
def search(
    text: str = typer.Argument(..., help="What to look for."),
    collection: str = typer.Option(..., envvar="EMBEDQ_COLLECTION"),
    k: int = typer.Option(5, "-k", envvar="EMBEDQ_K"),
    where: list[str] = typer.Option(
        [],
        help='Metadata filter key=value, the value parsed as JSON (n={"$gt": 2} too); repeat '
        "for more (all must hold). See the README's Filters.",
    ),
    parents: bool = typer.Option(False, "--parents", help="One hit per document, not per chunk."),
    as_json: bool = typer.Option(False, "--json", envvar="EMBEDQ_JSON"),
) -> None:
    """Print the K items of COLLECTION nearest to TEXT."""
    from embedq.search.searcher import search as run_search

    hits = run_search(text, collection, k=k, where=_where(where), parents=parents)
    for rank, hit in enumerate(hits, 1):
        if as_json:
            print(json.dumps(asdict(hit)))
        else:
            print(f"{rank}. {hit.score:.4f}  {hit.id}  {hit.text[:100]!r}")


def _where(pairs: list[str]) -> dict[str, object] | None:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--where takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out or None


@cli.command()
@requires(STORE)
def delete(
    collection: str = typer.Option(..., envvar="EMBEDQ_COLLECTION"),
    ids: list[str] = typer.Option(..., "--id", help="Id to delete (repeat the flag)."),
) -> None:
    """Delete items from the store (searches stop returning them at once)."""
    from embedq.settings import get_settings
    from embedq.store.factory import create_store

    removed = create_store(get_settings().database_url).delete(collection, ids)
    print(f"deleted {removed} of {len(ids)}")


index_cli = typer.Typer(help="The HNSW indexes.", no_args_is_help=True)
cli.add_typer(index_cli, name="index")


@index_cli.command("rebuild")
@requires(STORE, BROKER)
def index_rebuild(
    collection: str | None = typer.Option(None, envvar="EMBEDQ_COLLECTION"),
) -> None:
    """Rebuild now, in this process, the indexes of collections that changed."""
    from embedq.search.build import rebuild_changed
    from embedq.settings import get_settings
    from embedq.store.factory import create_store

    settings = get_settings()
    report = rebuild_changed(
        create_store(settings.database_url), settings.data_dir, only=collection
    )
    print(json.dumps(report, indent=2))


@cli.command()
def status(
    as_json: bool = typer.Option(False, "--json", envvar="EMBEDQ_JSON", help="Print JSON."),
) -> None:
    """One health report: servers, workers, queues, throughput, cache, SLOs, indexes, alerts.

    Within a few seconds whatever answers; exit 69 when a server does not."""
    from embedq.ops.status import collect, render
    from embedq.settings import get_settings

    report = collect(get_settings())
    print(json.dumps(report.as_dict(), indent=2) if as_json else render(report))
    if unreachable := report.unreachable():
        raise unreachable


@cli.command()
@requires(BROKER, STORE)
def api(
    host: str = typer.Option("127.0.0.1", envvar="EMBEDQ_API_HOST"),
    port: int = typer.Option(8000, envvar="EMBEDQ_API_PORT"),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Serve without API keys (never on a shared network)."
    ),
) -> None:
    """Serve the HTTP API (needs EMBEDQ_API_KEYS unless --insecure-no-auth)."""
    from embedq.api import create_app
    from embedq.ops.probe import check_port
    from embedq.settings import get_settings
    from embedq.web.limits import serve

    app = create_app(allow_anonymous=insecure_no_auth)
    check_port(host, port, "--port (EMBEDQ_API_PORT)")
    serve(app, host, port, get_settings())


@cli.command()
@requires(BROKER)
def beat(loglevel: str = typer.Option("INFO", envvar="EMBEDQ_LOGLEVEL")) -> None:
    """Run Celery beat: rebuilds changed indexes every EMBEDQ_INDEX_REBUILD_S."""
    from embedq.app import app
    from embedq.settings import get_settings

    data_dir = get_settings().data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    schedule = data_dir / "celerybeat-schedule"
    app.start(["beat", "--loglevel", loglevel, "--schedule", str(schedule)])


@cli.command()
@requires(BROKER)
def flower(
    address: str = typer.Option("127.0.0.1", envvar="EMBEDQ_FLOWER_ADDRESS"),
    port: int = typer.Option(5555, envvar="EMBEDQ_FLOWER_PORT"),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Serve Flower without a password."
    ),
) -> None:
    """Run Flower on our app, with basic auth from EMBEDQ_FLOWER_BASIC_AUTH."""
    import os

    from embedq.app import app
    from embedq.errors import ConfigurationError
    from embedq.ops.probe import check_port
    from embedq.settings import get_settings

    auth = get_settings().flower_basic_auth
    if not auth and not insecure_no_auth:
        raise ConfigurationError(
            "Flower needs credentials: set EMBEDQ_FLOWER_BASIC_AUTH=user:password "
            "(or pass --insecure-no-auth)"
        )
    check_port(address, port, "--port (EMBEDQ_FLOWER_PORT)")
    if auth:
        # Through the environment, so the password never shows in `ps`.
        os.environ["FLOWER_BASIC_AUTH"] = auth
    app.start(["flower", f"--address={address}", f"--port={port}"])


@cli.command()
@requires(BROKER, MODEL)
def bench(
    data: list[str] = typer.Option(
        ["sick", "pydoc", "mixed"], "--data", envvar="EMBEDQ_BENCH_DATA", help="Data sets."
    ),
    device: list[str] = typer.Option(
        [], "--device", envvar="EMBEDQ_BENCH_DEVICE", help="cpu, cuda (default: all visible)."
    ),
    data_dir: Path = typer.Option(Path("../shared/data"), envvar="EMBEDQ_BENCH_DATA_DIR"),
    out: Path = typer.Option(Path("bench-results"), envvar="EMBEDQ_BENCH_OUT"),
    repeats: int = typer.Option(3, envvar="EMBEDQ_BENCH_REPEATS", min=1),
    chunk: int = typer.Option(64, envvar="EMBEDQ_BENCH_CHUNK", min=1, help="Texts per task."),
    limit: int | None = typer.Option(None, envvar="EMBEDQ_BENCH_LIMIT", help="Texts per set."),
    latency_n: int = typer.Option(200, envvar="EMBEDQ_BENCH_LATENCY_N", min=1),
    callers: int = typer.Option(
        32, envvar="EMBEDQ_BENCH_CALLERS", min=1, help="Concurrent one-text callers."
    ),
    interactive_n: int = typer.Option(
        1000, envvar="EMBEDQ_BENCH_INTERACTIVE_N", min=1, help="Requests per interactive run."
    ),
    redis_db: int = typer.Option(
        13, envvar="EMBEDQ_BENCH_REDIS_DB", help="Flushed before each repeat: keep it unused."
    ),
    mixed_docs: int = typer.Option(
        6000,
        envvar="EMBEDQ_BENCH_MIXED_DOCS",
        min=0,
        help="Documents ingested while one-text callers run (0: no mixed scenario).",
    ),
    fair_docs: str = typer.Option(
        "500,20000",
        envvar="EMBEDQ_BENCH_FAIR_DOCS",
        help="Two ingests started together, small,large (large 0: none).",
    ),
) -> None:
    """Raw SentenceTransformer.encode vs the pipeline: texts/s, tokens/s, latency; JSON+PNG."""
    from embedq.broker.url import redis_url
    from embedq.tools.bench import BenchOptions, launch, with_db

    options = BenchOptions(
        redis_url=with_db(redis_url(), redis_db),
        out=out,
        data_dir=data_dir,
        datasets=data,
        devices=device or None,
        repeats=repeats,
        chunk=chunk,
        limit=limit,
        latency_n=latency_n,
        callers=callers,
        interactive_n=interactive_n,
        mixed_docs=mixed_docs,
        fair_docs=_pair(fair_docs, "--fair-docs"),
        command=" ".join(["embedq", *sys.argv[1:]]),
    )
    raise typer.Exit(launch(options))


def _pair(text: str, flag: str) -> tuple[int, int]:
    try:
        first, second = (int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{flag} takes two numbers, small,large: got {text!r}") from None
    return first, second


@cli.command()
@requires(BROKER, STORE, MODEL)
def demo() -> None:
    """Start a CPU worker, embed a few texts, print their similarity matrix, stop the worker."""
    from embedq.tools.demo import main as run_demo

    sys.exit(run_demo())


def main() -> None:
    """Console-script entry point: a failure is one line on stderr and an exit code (see
    :mod:`embedq.ops.failures`), with its traceback under ``--debug`` or ``EMBEDQ_DEBUG=1``."""
    from embedq.ops.failures import run_cli

    np.set_printoptions(precision=3, suppress=True)
    sys.exit(run_cli(cli))


if __name__ == "__main__":
    main()
