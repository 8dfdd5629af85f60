"""Alembic migrations: a database the last release (before Alembic) created is upgraded in
place, rows intact; older SQLite tables are rebuilt with AUTOINCREMENT; Postgres indexes are
built CONCURRENTLY; concurrent first use migrates once. On SQLite files and on fresh Postgres
databases created and dropped here."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np
import pytest
from alembic.script import ScriptDirectory
from setuptools import find_packages
from sqlalchemy import create_engine, event, inspect, make_url, text

from embedq.errors import CollectionModelError
from embedq.store import migrations
from embedq.store.base import Fingerprint, Item, meta_hash
from embedq.store.factory import create_store
from tests.helpers import ROOT

# What `SQLStore` created before Alembic (git show <release>:embedq/store/sql.py), as DDL.
RELEASE_DDL = {
    "sqlite": """
CREATE TABLE embedq_blob_parts (
    name VARCHAR(256) NOT NULL, version INTEGER NOT NULL, part INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (name, version, part));
CREATE TABLE embedq_blob_versions (
    name VARCHAR(256) NOT NULL, version INTEGER NOT NULL, metadata JSON NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (name));
CREATE TABLE embedq_items (
    pk INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, collection VARCHAR(128) NOT NULL,
    external_id VARCHAR(512) NOT NULL, content_hash VARCHAR(64) NOT NULL, text TEXT NOT NULL,
    metadata JSON NOT NULL, model VARCHAR(256) NOT NULL, dim INTEGER NOT NULL,
    vector BLOB NOT NULL, truncated BOOLEAN NOT NULL, parent_id VARCHAR(512),
    chunk_index INTEGER, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    CONSTRAINT uq_embedq_item UNIQUE (collection, external_id));
CREATE INDEX ix_embedq_item_updated ON embedq_items (collection, updated_at);
CREATE INDEX ix_embedq_items_collection ON embedq_items (collection);
CREATE INDEX ix_embedq_item_parent ON embedq_items (collection, parent_id);
""",
    "postgresql": """
CREATE TABLE embedq_blob_parts (
    name VARCHAR(256) NOT NULL, version INTEGER NOT NULL, part INTEGER NOT NULL,
    data BYTEA NOT NULL, PRIMARY KEY (name, version, part));
CREATE TABLE embedq_blob_versions (
    name VARCHAR(256) NOT NULL, version INTEGER NOT NULL, metadata JSON NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, PRIMARY KEY (name));
CREATE TABLE embedq_items (
    pk SERIAL NOT NULL, collection VARCHAR(128) NOT NULL, external_id VARCHAR(512) NOT NULL,
    content_hash VARCHAR(64) NOT NULL, text TEXT NOT NULL, metadata JSONB NOT NULL,
    model VARCHAR(256) NOT NULL, dim INTEGER NOT NULL, vector BYTEA NOT NULL,
    truncated BOOLEAN NOT NULL, parent_id VARCHAR(512), chunk_index INTEGER,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (pk), CONSTRAINT uq_embedq_item UNIQUE (collection, external_id));
CREATE INDEX ix_embedq_item_updated ON embedq_items (collection, updated_at);
CREATE INDEX ix_embedq_items_collection ON embedq_items (collection);
CREATE INDEX ix_embedq_item_parent ON embedq_items (collection, parent_id);
""",
}
INDEXES = {"ix_embedq_item_updated", "ix_embedq_items_collection", "ix_embedq_item_parent"}
ROWS = [
    ("a", "first text", {"lang": "en", "tags": ["x"]}, None, None),
    ("b", "second text", {}, "parent", 0),
    ("c", "third text", {"n": 3}, "parent", 1),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request, tmp_path) -> Iterator[str]:
    """The URL of a new, empty database: a SQLite file, or a Postgres database made here."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'release.db'}"
        return
    with _fresh_postgres(request.getfixturevalue("postgres_url")) as url:
        yield url


@contextmanager
def _fresh_postgres(server_url: str) -> Iterator[str]:
    name = f"embedq_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def _run_ddl(url: str, ddl: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in filter(str.strip, ddl.split(";")):
            conn.exec_driver_sql(statement)
    engine.dispose()


def _insert_release_rows(url: str) -> None:
    """Rows as the release wrote them, with raw SQL (its ORM classes are gone)."""
    now = datetime.now(UTC)
    engine = create_engine(url)
    json_cast = "CAST(:metadata AS JSONB)" if engine.dialect.name == "postgresql" else ":metadata"
    insert = text(
        "INSERT INTO embedq_items (collection, external_id, content_hash, text, metadata, model,"
        " dim, vector, truncated, parent_id, chunk_index, created_at, updated_at) VALUES "
        f"('old', :id, :hash, :text, {json_cast}, 'm@1', 4, :vector, false, :parent, :chunk,"
        " :now, :now)"
    )
    with engine.begin() as conn:
        for i, (id_, body, meta, parent, chunk) in enumerate(ROWS):
            vector = np.full(4, i, dtype=np.float32).tobytes()
            conn.execute(insert, dict(id=id_, hash=f"h-{id_}", text=body, vector=vector,
                                      metadata=json.dumps(meta), parent=parent, chunk=chunk,
                                      now=now))  # fmt: skip
        conn.execute(
            text("INSERT INTO embedq_blob_versions VALUES ('index:old', 1, '{\"n\": 3}', :now)"),
            {"now": now},
        )
        conn.execute(
            text("INSERT INTO embedq_blob_parts VALUES ('index:old', 1, 0, :data)"),
            {"data": b"blob-bytes"},
        )
    engine.dispose()


def _pks(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT external_id, pk FROM embedq_items").all()
    engine.dispose()
    return dict(rows)


def test_a_database_of_the_last_release_is_upgraded_in_place(empty_db):
    dialect = create_engine(empty_db).dialect.name
    _run_ddl(empty_db, RELEASE_DDL[dialect])
    _insert_release_rows(empty_db)
    keys = _pks(empty_db)
    store = create_store(empty_db)
    items = {item.id: item for item in store.get("old", ["a", "b", "c"])}
    assert {i: items[i].pk for i in items} == keys, "rows kept, under the same keys"
    for i, (id_, body, meta, parent, chunk) in enumerate(ROWS):
        item = items[id_]
        assert (item.text, item.metadata, item.parent_id, item.chunk_index) == (
            body, meta, parent, chunk)  # fmt: skip
        np.testing.assert_array_equal(item.vector, np.full(4, i, dtype=np.float32))
        assert item.version == 0, "old rows: version 0, so any new write replaces them"
    columns = {c["name"] for c in inspect(store.engine).get_columns("embedq_items")}
    assert {"version", "meta_hash"} <= columns
    assert {ix["name"] for ix in inspect(store.engine).get_indexes("embedq_items")} >= INDEXES
    assert store.blob_version("index:old") == (1, {"n": 3})
    assert store.get_blob("index:old", 1) == b"blob-bytes"
    with store.engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        if dialect == "postgresql":  # migrating lifted it; the pooled connection has it back
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "2min"
    # The digest was filled in: an unchanged re-ingest of an old row is still skipped.
    unchanged = Fingerprint("c", "h-c", "m@1", meta_hash({"n": 3}, "parent", 1))
    assert store.mark_current("old", [unchanged], 5) == {"c"}
    store.upsert([Item("old", "a", "new text", np.ones(4), "m@1", "h-new", version=1)])
    assert store.get("old", ["a"])[0].text == "new text"
    # 0004 bound the old collection to the model its rows hold.
    assert store.collection_model("old") == "m@1"
    with pytest.raises(CollectionModelError):
        store.upsert([Item("old", "z", "t", np.ones(4), "n@2", "h-z")])
    store.close()
    reopened = create_store(empty_db)
    assert reopened.count("old") == 3, "opening again changes nothing"
    reopened.close()


def test_a_sqlite_table_without_autoincrement_is_rebuilt_with_its_rows_and_keys(tmp_path):
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    _run_ddl(url, RELEASE_DDL["sqlite"].replace(" AUTOINCREMENT", ""))
    _insert_release_rows(url)
    keys = _pks(url)
    store = create_store(url)
    with store.engine.connect() as conn:
        sql = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE name = 'embedq_items'"
        ).scalar()
    assert "AUTOINCREMENT" in sql
    assert _pks(url) == keys
    assert {ix["name"] for ix in inspect(store.engine).get_indexes("embedq_items")} >= INDEXES
    newest = max(keys.values())
    store.delete("old", [k for k, v in keys.items() if v == newest])
    store.upsert([Item("other", "new", "t", np.ones(4), "m@1", "h")])
    [new] = store.get("other", ["new"])
    assert new.pk is not None and new.pk > newest, "a freed key was handed out again"
    store.close()


def test_an_older_schema_without_later_columns_and_indexes_is_completed(tmp_path):
    """Releases before the last one lacked parent and chunk: they are added, as nullable."""
    url = f"sqlite:///{tmp_path / 'older.db'}"
    ddl = RELEASE_DDL["sqlite"].replace(" parent_id VARCHAR(512),\n    chunk_index INTEGER,", "")
    ddl = ddl.split("CREATE INDEX ix_embedq_item_parent")[0]
    assert "parent_id" not in ddl
    _run_ddl(url, ddl)
    store = create_store(url)
    columns = {c["name"] for c in inspect(store.engine).get_columns("embedq_items")}
    assert {"parent_id", "chunk_index", "version", "meta_hash"} <= columns
    assert {ix["name"] for ix in inspect(store.engine).get_indexes("embedq_items")} >= INDEXES
    store.upsert([Item("c", "x", "t", np.ones(4), "m@1", "h", parent_id="p", chunk_index=2)])
    assert store.get("c", ["x"])[0].chunk_index == 2
    store.close()


def test_postgres_indexes_are_built_concurrently_and_invalid_ones_replaced(postgres_url):
    with _fresh_postgres(postgres_url) as url:
        ddl = RELEASE_DDL["postgresql"].split("CREATE INDEX ix_embedq_items_collection")[0]
        _run_ddl(url, ddl + "CREATE INDEX ix_embedq_items_collection ON embedq_items (collection)")
        engine = create_engine(url)
        with engine.begin() as conn:  # as a CONCURRENTLY build that failed half-way leaves it
            conn.exec_driver_sql(
                "UPDATE pg_index SET indisvalid = false "
                "WHERE indexrelid = 'ix_embedq_items_collection'::regclass"
            )
        seen: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2].strip()))
        migrations.upgrade(engine)
        built = [s for s in seen if s.startswith("CREATE INDEX")]
        assert len(built) == 3 and all("CONCURRENTLY" in s for s in built), built
        assert "DROP INDEX CONCURRENTLY ix_embedq_items_collection" in seen
        with engine.connect() as conn:
            valid = conn.exec_driver_sql(
                "SELECT c.relname, i.indisvalid FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE left(c.relname, 9) = 'ix_embedq'"
            ).all()
        assert dict(valid) == dict.fromkeys(INDEXES, True)
        engine.dispose()


OPEN_STORE = "import sys; from embedq.store.factory import create_store; create_store(sys.argv[1])"


def test_concurrent_first_use_migrates_once(empty_db):
    """Four processes open the same new database at once: all succeed, at head."""
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_STORE, empty_db], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(4)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)[-3000:]
    engine = create_engine(empty_db)
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        versions = conn.exec_driver_sql(f"SELECT COUNT(*) FROM {migrations.VERSION_TABLE}")
        assert versions.scalar() == 1
    engine.dispose()


def test_the_revisions_form_one_line_and_ship_with_the_package():
    script = ScriptDirectory.from_config(migrations.config())
    chain = [rev.revision for rev in script.walk_revisions()]
    assert chain == ["0004", "0003", "0002", "0001"] and migrations.head() == "0004"
    # pyproject finds packages with include = ["embedq*"]: folders need an __init__.py.
    packages = find_packages(str(ROOT), include=["embedq*"])
    assert {"embedq.store.migrations", "embedq.store.migrations.versions"} <= set(packages)
    shipped = {p.name for p in (migrations.HERE / "versions").glob("v*.py")}
    assert len(shipped) == len(chain)


def test_the_migrated_schema_matches_the_store_s_models(empty_db):
    """Whoever changes ItemRow and friends must add a revision: autogenerate finds no gap."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from embedq.store.sql import Base

    store = create_store(empty_db)
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(context, Base.metadata)
    store.close()
    gaps = [
        d for d in diffs if not (d[0] == "remove_table" and d[1].name == "embedq_alembic_version")
    ]
    assert gaps == []
