"""Redis with a password and with an ACL user: a private redis-server whose embedq user has
exactly the rules the README documents, a real worker, the API, a client ingesting,
searching, rebuilding an index and reading the status, all as that user; another client
with the default user's password (``requirepass``'s form). Nothing is refused but what the
README says, and no password reaches a log or an answer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis

from tests.helpers import (
    ROOT,
    RedisServer,
    free_port,
    isolated_env,
    process,
    run_client,
    wait_until,
    worker,
)

BIN = Path(sys.executable).parent
# What a URL cannot hold as is: the README says to percent-encode it.
PASSWORD = f"acl@pw/{uuid.uuid4().hex[:10]}"
ADMIN_PASSWORD = f"admin-{uuid.uuid4().hex[:10]}"
DOCUMENTED = re.compile(r"^(user embedq on >CHANGE-ME .*)$", re.M)
KEY = "auth-key-" + uuid.uuid4().hex[:8]

CLIENT = textwrap.dedent(
    """
    import json
    from embedq import search
    from embedq.broker.client import shared_client
    from embedq.ops.status import build_report
    from embedq.producer import ingest
    from embedq.search.build import rebuild_changed
    from embedq.settings import get_settings
    from embedq.store.factory import create_store

    docs = [{"id": f"d{i}", "text": f"note {i} about {t}"} for i, t in
            enumerate(["json parsing", "bread baking", "car insurance"] * 4)]
    summary = ingest(docs, collection="auth-docs")
    hits = search("how to parse json", collection="auth-docs", k=1)
    store = create_store(get_settings().database_url)
    built = rebuild_changed(store, get_settings().data_dir)
    report = build_report(shared_client(), store, get_settings())
    print(json.dumps({"stored": summary.stored, "failed": summary.failed, "hit": hits[0].text,
                      "built": built, "workers": len(report.workers.get("cpu", [])),
                      "redis": report.redis, "indexes": report.indexes}))
    """
)


def _acl_file(folder: Path) -> Path:
    readme = (ROOT / "README.md").read_text()
    documented = DOCUMENTED.search(readme)
    assert documented, "the README no longer documents the ACL user this test runs as"
    path = folder / "users.acl"
    # The default user, with a password (requirepass's form), may do anything: it reads
    # the ACL log here, and is the password-only client.
    path.write_text(
        f"user default on >{ADMIN_PASSWORD} ~* &* +@all\n"
        + documented.group(1).replace("CHANGE-ME", PASSWORD)
        + "\n"
    )
    return path


def _refused(server: RedisServer) -> set[str]:
    """What Redis refused the embedq user (its ACL log): commands, keys, channels."""
    admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD, decode_responses=True)
    entries = admin.acl_log()
    admin.close()
    return {f"{e['reason']}:{e['object']}" for e in entries if e["username"] == "embedq"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("redis-acl")
    server = RedisServer(folder, config=["--aclfile", str(_acl_file(folder))])
    yield server
    server.close()


def test_a_worker_the_api_and_clients_run_as_the_documented_acl_user(server, tmp_path):
    url = f"redis://embedq:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
    environ = isolated_env(tmp_path, url, EMBEDQ_API_KEYS=KEY)
    log, api_log = tmp_path / "worker.log", tmp_path / "api.log"
    with worker(environ, log):
        ran = json.loads(run_client(environ, CLIENT))
        answers = _through_the_api(environ, api_log)
        plain = environ | {
            "EMBEDQ_REDIS_URL": f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0"
        }
        code = "from embedq.tasks import embed_texts; print(embed_texts.delay(['x']).get(60).shape)"
        with_password_only = run_client(plain, code)
    assert ran["stored"] == 12 and ran["failed"] == 0 and "json parsing" in ran["hit"]
    assert ran["built"]["auth-docs"]["tuned_on"] == "held_out" and ran["workers"] == 1
    assert ran["redis"]["used_mb"] > 0, "INFO is allowed: the memory figures are known"
    assert answers == {
        "health": "ready",
        "stored": 2,
        "hit": "b",
        "collections": ["api-docs", "auth-docs"],
    }
    assert with_password_only == "(1, 384)"
    # Only what the README says is refused: CONFIG GET (the eviction-policy check).
    assert _refused(server) <= {"command:config|get"}, _refused(server)
    said = log.read_text() + api_log.read_text() + json.dumps(ran) + json.dumps(answers)
    for secret in (PASSWORD, quote(PASSWORD, safe=""), ADMIN_PASSWORD):
        assert secret not in said
    assert "embedq:**@" in log.read_text()  # the URL is named, masked


def _through_the_api(environ: dict[str, str], log: Path) -> dict[str, object]:
    port = free_port()
    with process([str(BIN / "embedq"), "api", "--port", str(port)], environ, log):
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
        ready = lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200  # noqa: E731
        wait_until(ready, 120, 0.3, lambda: log.read_text()[-2000:], (httpx.HTTPError,))
        docs = [{"id": "a", "text": "a cake recipe"}, {"id": "b", "text": "train timetable"}]
        stored = httpx.post(
            f"{base}/collections/api-docs/documents",
            json={"documents": docs},
            headers=auth,
            timeout=60,
        ).json()
        body = {"query": "when does the train leave", "collection": "api-docs", "k": 1}
        hits = httpx.post(f"{base}/search", json=body, headers=auth, timeout=60).json()["hits"]
        listed = httpx.get(f"{base}/collections", headers=auth, timeout=30).json()
        return {
            "health": httpx.get(f"{base}/health", timeout=10).json()["status"],
            "stored": stored["stored"],
            "hit": hits[0]["id"],
            "collections": [c["name"] for c in listed["collections"]],
        }


def test_a_wrong_password_stops_a_command_at_once_without_showing_it(server, tmp_path):
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    url = f"redis://embedq:{wrong}@127.0.0.1:{server.port}/0"
    ran = subprocess.run(
        [str(BIN / "embedq"), "status"],
        env=isolated_env(tmp_path, url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 78, ran.stderr
    assert "redis://embedq:***@" in ran.stderr and wrong not in ran.stdout + ran.stderr
