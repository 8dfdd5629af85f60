"""Writes that never go backwards, and a store that outlasts a Postgres restart.

Against a real SQLite file, the machine's real Postgres, a private Postgres started here
(Debian's initdb/pg_ctl) and the real model. The restart test runs a real worker process and
the real ``embedq ingest`` CLI, and prints its figures (``pytest -s``) for
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError

from embedq.errors import StoreError
from embedq.inputs import parse_documents
from embedq.keys import content_hash
from embedq.settings import get_settings
from embedq.store.base import Fingerprint, Item, meta_hash, now_version
from embedq.store.engine import RetryPolicy
from embedq.store.factory import create_store
from embedq.worker.runtime import Runtime, get_runtime
from tests.helpers import ROOT, audit, corpus, free_port, wait_rows, worker

BIN = Path(sys.executable).parent
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'integrity.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    s = create_store(_url(request.param, request, tmp_path))
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def runtime_on(request, tmp_path):
    """A runtime with the real model and Redis cache, storing into SQLite or Postgres."""
    settings = get_settings().model_copy(
        update={"database_url": _url(request.param, request, tmp_path)}
    )
    rt = Runtime(settings, encoder=get_runtime().encoder)
    yield rt
    rt.close()


def _item(collection: str, text_: str, version: int | None, **extra: object) -> Item:
    vector = np.full(8, len(text_), dtype=np.float32)
    return Item(
        collection, "doc", text_, vector, "m@1", content_hash(text_), version=version, **extra
    )


def _ingest(rt: Runtime, collection: str, docs: list[dict], version: int | None = None, **kw):
    request = parse_documents(collection, docs, version=version)
    return rt.ingest(request, kw.get("chunks", {}))


# Upserts never go backwards -------------------------------------------------------------


def test_a_stale_upsert_leaves_the_newer_row_untouched(store):
    collection = _unique("stale")
    store.upsert([_item(collection, "newer text", 2_000, metadata={"v": 2})])
    store.upsert([_item(collection, "older text", 1_000, metadata={"v": 1})])
    [row] = store.get(collection, ["doc"])
    assert (row.text, row.metadata, row.version) == ("newer text", {"v": 2}, 2_000)
    np.testing.assert_array_equal(row.vector, np.full(8, len("newer text")))
    store.upsert([_item(collection, "same version again", 2_000)])
    assert store.get(collection, ["doc"])[0].text == "same version again", "equal: replaces"
    store.upsert([_item(collection, "newest", 3_000)])
    assert store.get(collection, ["doc"])[0].text == "newest"
    store.upsert([_item(collection, "unversioned: written now", None)])
    [row] = store.get(collection, ["doc"])
    assert row.text == "unversioned: written now" and row.version > 3_000
    assert store.count(collection) == 1


def test_an_upsert_writes_parent_and_chunk_changes(store):
    collection = _unique("chunks")
    store.upsert([_item(collection, "t", 1, parent_id="p1", chunk_index=0)])
    store.upsert([_item(collection, "t", 2, parent_id="p2", chunk_index=3)])
    [row] = store.get(collection, ["doc"])
    assert (row.parent_id, row.chunk_index) == ("p2", 3)


def test_mark_current_never_vouches_for_an_item_that_differs(store):
    collection = _unique("mark")
    store.upsert([_item(collection, "stored", 10, metadata={"a": 1})])
    same = Fingerprint("doc", content_hash("stored"), "m@1", meta_hash({"a": 1}, None, None))
    other_meta = Fingerprint("doc", same.content_hash, "m@1", meta_hash({"a": 2}, None, None))
    other_model = Fingerprint("doc", same.content_hash, "m@2", same.meta_hash)
    absent = Fingerprint("absent", same.content_hash, "m@1", same.meta_hash)
    assert store.mark_current(collection, [other_meta, other_model, absent], 20) == set()
    assert store.get(collection, ["doc"])[0].version == 10, "a differing item keeps its version"
    assert store.mark_current(collection, [same], 20) == {"doc"}
    assert store.get(collection, ["doc"])[0].version == 20, "an equal item takes the version"
    assert store.mark_current(collection, [other_meta], 15) == {"doc"}, "newer: leave it"
    assert store.get(collection, ["doc"])[0].version == 20


def test_a_metadata_only_change_is_written_and_an_unchanged_rerun_skipped(runtime_on):
    collection = _unique("meta")
    doc = {"id": "d1", "text": "The metadata of this document changes; its text does not."}
    first = _ingest(runtime_on, collection, [{**doc, "metadata": {"lang": "en", "rev": 1}}])
    assert first["stored"] == 1
    again = _ingest(runtime_on, collection, [{**doc, "metadata": {"lang": "en", "rev": 1}}])
    assert again["skipped"] == 1 and again["stored"] == 0
    changed = _ingest(runtime_on, collection, [{**doc, "metadata": {"lang": "en", "rev": 2}}])
    assert changed["stored"] == 1 and changed["skipped"] == 0
    [row] = runtime_on.store.get(collection, ["d1"])
    assert row.metadata == {"lang": "en", "rev": 2}
    assert row.text == doc["text"]
    moved = _ingest(runtime_on, collection, [{**doc, "metadata": row.metadata, "parent": "p"}])
    assert moved["stored"] == 1, "a new parent is a change too"
    assert runtime_on.store.get(collection, ["d1"])[0].parent_id == "p"


def test_a_redelivered_older_task_never_undoes_a_newer_one(runtime_on):
    """v1 stores A; v3 (A again) is skipped but takes version 3; the redelivered v2 (B)
    then arrives last and must change nothing, text or chunks."""
    collection = _unique("order")
    doc = {"id": "d", "text": "Version A of the document."}
    chunks = [
        {"id": f"p#{i}", "text": f"chunk {i} of A", "parent": "p", "chunk": i} for i in range(5)
    ]
    _ingest(runtime_on, collection, [doc, *chunks], version=1_000, chunks={"p": 5})
    newer = _ingest(runtime_on, collection, [doc, *chunks], version=3_000, chunks={"p": 5})
    assert newer["skipped"] == 6
    stale_docs = [{**doc, "text": "Version B, sent before A was sent again."}, *chunks[:3]]
    stale = _ingest(runtime_on, collection, stale_docs, version=2_000, chunks={"p": 3})
    assert stale["stored"] == 0 and stale["skipped"] == 4
    [row] = runtime_on.store.get(collection, ["d"])
    assert (row.text, row.version) == (doc["text"], 3_000)
    assert runtime_on.store.count(collection) == 6, "the stale task deleted newer chunks"


def test_the_producer_s_version_travels_to_the_stored_rows(celery_worker):
    from embedq.producer.bulk import ingest

    collection = _unique("bulk")
    before = now_version()
    summary = ingest([{"id": "x", "text": "versioned by its producer"}], collection)
    assert summary.stored == 1, summary
    [row] = create_store(get_settings().database_url).get(collection, ["x"])
    assert before <= row.version <= now_version()


def test_a_malformed_version_is_refused_before_queueing():
    from embedq.errors import InvalidInputError
    from embedq.tasks import ingest_documents

    for bad in (-1, 1.5, "1", True, 2**63):
        with pytest.raises(InvalidInputError, match="version"):
            ingest_documents.delay("c", [{"id": "a", "text": "t"}], None, None, bad)


# Postgres: timeouts and retries --------------------------------------------------------


def test_postgres_connections_carry_connect_keepalive_and_statement_timeouts(postgres_url):
    settings = get_settings().model_copy(
        update={"db_statement_timeout_s": 1.5, "db_connect_timeout_s": 7}
    )
    from embedq.store.sql import SQLStore

    store = SQLStore(postgres_url, settings)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1500ms"
        params = conn.connection.dbapi_connection.info.get_parameters()
        assert params["connect_timeout"] == "7"
        assert params["keepalives"] == "1" and params["keepalives_idle"] == "10"
        assert int(params["tcp_user_timeout"]) == 25_000
        with pytest.raises(OperationalError, match="statement timeout"):
            conn.exec_driver_sql("SELECT pg_sleep(5)")
    store.close()


def test_options_in_the_url_are_kept_beside_the_statement_timeout(postgres_url):
    url = postgres_url + "?options=-c%20application_name%3Dembedq-test"
    store = create_store(url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW application_name").scalar() == "embedq-test"
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "2min"
    store.close()


def _failing(errors: list[Exception]):
    calls: list[float] = []

    def fn() -> str:
        calls.append(time.monotonic())
        if errors:
            raise errors.pop(0)
        return "done"

    return fn, calls


def _operational() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("server closed the connection"))


def test_the_retry_policy_waits_out_connection_errors_with_growing_jittered_waits():
    fn, calls = _failing([_operational() for _ in range(3)])
    assert RetryPolicy(budget_s=30).call(fn) == "done"
    assert len(calls) == 4
    waits = np.diff(calls)
    assert all(0 <= w <= 8.5 for w in waits), waits
    # Full jitter: each wait is drawn below 0.5 s x 2^n, so the later bounds are larger.
    assert waits[:2].sum() <= 1.6


def test_the_retry_policy_gives_up_when_the_budget_is_spent_and_never_retries_integrity():
    fn, calls = _failing([_operational() for _ in range(100)])
    with pytest.raises(OperationalError):
        RetryPolicy(budget_s=2).call(fn)
    assert 2 <= len(calls) < 100 and calls[-1] - calls[0] <= 2
    integrity = IntegrityError("INSERT", {}, Exception("duplicate key"))
    fn, calls = _failing([integrity])
    with pytest.raises(IntegrityError):
        RetryPolicy(budget_s=30).call(fn)
    assert len(calls) == 1


def test_a_data_error_on_postgres_is_reported_at_once_not_retried(postgres_url):
    store = create_store(postgres_url)
    statements: list[str] = []
    event.listen(
        store.engine,
        "before_cursor_execute",
        lambda *a: statements.append(" ".join(a[2].split()[:3])),
    )
    too_long = _item(_unique("data"), "t", 1)
    too_long.id = "x" * 600  # the column holds 512 characters
    with pytest.raises(StoreError, match="could not write 1 items"):
        store.upsert([too_long])
    # One write of the items (the collection's binding to its model is written before it).
    assert statements.count("INSERT INTO embedq_items") == 1
    store.close()


def test_the_retry_budget_outlasts_a_failover_by_default():
    assert get_settings().db_retry_budget_s >= 60


# A private Postgres, restarted mid-ingest ------------------------------------------------


@dataclass
class PrivatePostgres:
    """A throwaway cluster on a free port, run as the ``postgres`` user when we are root
    (initdb refuses root)."""

    folder: Path
    port: int
    bin: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def init(self) -> None:
        cmd = self._as_owner(str(self.bin / "initdb"), "-D", str(self.folder / "data"))
        subprocess.run([*cmd, "-A", "trust", "-U", "postgres"], check=True, capture_output=True)

    def start(self) -> None:
        # fsync off: the cluster is stopped and killed, never its machine (committed rows
        # stay in the page cache); it only makes the test faster.
        opts = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("start", "-w", "-o", opts, "-l", str(self.folder / "server.log"))

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-m", mode)

    def _ctl(self, *args: str) -> None:
        cmd = self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), *args)
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private Postgres for destructive tests, removed at the end."""
    if not PG_BINS or not (PG_BINS[-1] / "initdb").exists():
        pytest.skip("Debian's postgresql binaries (initdb, pg_ctl) are not installed")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: initdb would refuse")
    # Not under pytest's tmp_path: the postgres user must be able to reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="embedq-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    pg = PrivatePostgres(folder, free_port(), PG_BINS[-1])
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        subprocess.run(
            pg._as_owner(
                str(pg.bin / "pg_ctl"), "-D", str(folder / "data"), "stop", "-m", "immediate"
            ),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(folder, ignore_errors=True)


DOCUMENTS = 3000
DOWN_S = 6.0


@pytest.mark.slow
def test_a_postgres_restart_mid_ingest_loses_and_duplicates_nothing(tmp_path, side_redis):
    """Stop the store's Postgres (immediate: as a crash or failover would) at ~1,000 of
    3,000 documents, keep it down for 6 s, start it again: the worker's store calls wait
    it out; every document is stored exactly once, with no failures reported."""
    with private_postgres() as pg:
        env = dict(
            os.environ,
            EMBEDQ_REDIS_URL=side_redis(12),
            EMBEDQ_DATABASE_URL=pg.url,
            EMBEDQ_DATA_DIR=str(tmp_path / "data"),
            EMBEDQ_WORKER_CONCURRENCY="4",
            EMBEDQ_METRICS_PORT="0",
        )
        docs = corpus(tmp_path / "docs.jsonl", DOCUMENTS)
        collection, log = _unique("pg-restart"), tmp_path / "worker.log"
        store = create_store(pg.url)
        cmd = [
            str(BIN / "embedq"),
            "ingest",
            str(tmp_path / "docs.jsonl"),
            "--collection",
            collection,
            "--json",
        ]
        with worker(env, log, ready=False):
            ingest = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            at_stop = wait_rows(store, collection, 1000)
            store.close()
            stopped = time.monotonic()
            pg.stop("immediate")
            time.sleep(DOWN_S)
            pg.start()
            restarted = time.monotonic() - stopped
            out, err = ingest.communicate(timeout=600)
        summary = json.loads(out.strip().splitlines()[-1])
        figures = audit(pg.url, collection, docs)
    retries = log.read_text(errors="replace").count("store: ")
    print(
        f"\nFIGURES pg-restart: stopped at {at_stop}, down {restarted:.1f} s, "
        f"{retries} store retries, ingest {summary['wall_s']} s, failed {summary['failed']}, "
        f"{json.dumps(figures)}"
    )
    assert ingest.returncode == 0, (out + err)[-3000:]
    assert retries > 0, "the restart never reached a store call: the test proved nothing"
    assert summary["failed"] == 0 and summary["stored"] + summary["skipped"] >= DOCUMENTS
    assert figures == {
        "attempted": DOCUMENTS,
        "stored": DOCUMENTS,
        "lost": 0,
        "duplicated": 0,
        "wrong": 0,
    }
