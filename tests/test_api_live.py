"""The HTTP API as it runs: a real ``embedq api`` (uvicorn) process, answered by the session's
real worker (which takes both queues). schemathesis runs every check against it (seeded,
bounded); the issue's hostile inputs, oversized and chunked bodies and slow clients each get
a clear 4xx, never a 5xx or a database's words."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, env, free_port, process, wait_until

BIN = Path(sys.executable).parent
KEY = "live-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY_MB = 1
TIMEOUT_S = 2  # the header and body deadlines of this API process
DATABASE_WORDS = ("OperationalError", "JSON path", "Untranslatable", "Expression tree", "sqlite")


@pytest.fixture(scope="module")
def api(celery_worker, tmp_path_factory) -> Iterator[str]:
    """The URL of a live ``embedq api`` on the session's Redis and store."""
    port = free_port()
    environ = env(
        EMBEDQ_API_KEYS=KEY,
        # Small limits, so that what schemathesis generates within the schema stays cheap.
        EMBEDQ_API_MAX_TEXTS="8",
        EMBEDQ_API_MAX_TEXT_CHARS="256",
        EMBEDQ_API_MAX_BODY_MB=str(MAX_BODY_MB),
        EMBEDQ_API_RATE_LIMIT_PER_MIN=str(10**6),
        EMBEDQ_API_HEADER_TIMEOUT_S=str(TIMEOUT_S),
        EMBEDQ_API_BODY_TIMEOUT_S=str(TIMEOUT_S),
    )
    log = tmp_path_factory.mktemp("api") / "api.log"
    cmd = [str(BIN / "embedq"), "api", "--port", str(port)]
    with process(cmd, environ, log):
        url = f"http://127.0.0.1:{port}"
        ready = lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200  # noqa: E731
        wait_until(ready, 120, 0.3, lambda: log.read_text()[-2000:], (httpx.HTTPError,))
        yield url


def test_schemathesis_with_every_check_finds_nothing(api, tmp_path):
    """Coverage (every boundary the schema states) and fuzzing, all checks, seeded."""
    started = time.monotonic()
    out = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"),
            "run",
            f"{api}/openapi.json",
            "--checks=all",
            f"--header=Authorization: Bearer {KEY}",
            "--max-examples=30",
            "--seed=24",
            # One worker: CPython 3.11's ast module is not thread-safe, and hypothesis parses
            # its lambdas' sources for path parameters ("AST constructor recursion depth
            # mismatch" with 4); one takes about as long here.
            "--workers=1",
            "--generation-database=none",
            # Generation speed depends on the machine's load, not on the API.
            "--suppress-health-check=too_slow",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    print(f"schemathesis: {time.monotonic() - started:.1f} s\n{out.stdout[-1500:]}")
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert "Operations:       10 selected / 10 total" in out.stdout


def _search(api: str, where: object) -> httpx.Response:
    body = {"query": "x", "collection": "live", "where": where}
    return httpx.post(f"{api}/search", json=body, headers=AUTH, timeout=30)


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ({"n": 1180591620717411303424}, "outside the numbers"),
        ({"n": {"$lt": -(2**63) - 1}}, "outside the numbers"),
        ({"a\u0000b": 1}, "NUL"),
        ({"a": "nul\u0000"}, "NUL"),
        ({f"k{i}": i for i in range(2000)}, "at most 64"),
        ({"k": {"$regex": "a.*"}}, "unknown operator"),
    ],
    ids=["int-2^70", "below-int64", "nul-key", "nul-value", "2000-keys", "regex"],
)
def test_the_issue_s_filters_get_a_4xx_that_names_the_problem(api, where, says):
    response = _search(api, where)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] == "InvalidFilterError"
    assert not any(word in response.text for word in DATABASE_WORDS)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": "x", "collection": "c", "k": "5"}, "k"),
        ({"query": "x", "collection": "c", "k": True}, "k"),
        ({"query": "", "collection": "c"}, "query"),
        ({"query": "x", "collection": "bad name!"}, "collection"),
    ],
    ids=["k-string", "k-bool", "empty-query", "bad-collection"],
)
def test_the_schema_s_constraints_are_the_ones_enforced(api, body, field):
    response = httpx.post(f"{api}/search", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 422 and field in response.json()["error"]["message"]
    schema = httpx.get(f"{api}/openapi.json").json()
    search = schema["components"]["schemas"]["SearchBody"]["properties"]
    assert search["query"]["minLength"] == 1 and search["k"]["type"] == "integer"
    assert "pattern" in search["collection"]


def test_a_json_integer_may_be_written_5_0(api):
    body = {"query": "x", "collection": "c", "k": 5.0}
    response = httpx.post(f"{api}/search", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text


def test_responses_are_documented_as_they_are_sent(api):
    schema = httpx.get(f"{api}/openapi.json").json()
    metrics = schema["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]
    assert "application/json" in metrics["401"]["content"]
    sent = httpx.get(f"{api}/metrics", headers=AUTH)
    assert sent.headers["content-type"].startswith("text/plain")
    for path in ("/embed", "/v1/embeddings", "/search"):
        codes = set(schema["paths"][path]["post"]["responses"])
        assert {"400", "401", "404", "413", "422", "429", "503", "504"} <= codes, path
    error = schema["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["error"]["$ref"].endswith("ErrorDetail")


def _raw(api: str, payload: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send ``payload`` on a raw socket, then read until the server closes (or ``wait_s``);
    what came back and how long the server took to close."""
    host, port = api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received, time.monotonic() - started


def test_a_content_length_the_body_never_reaches_gets_408_in_time(api):
    head = (
        f"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    answer, took = _raw(api, head.encode() + b'{"texts": ["a"', wait_s=TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"EMBEDQ_API_BODY_TIMEOUT_S" in answer and took < TIMEOUT_S + 3, took


def test_headers_that_never_finish_are_cut_off_in_time(api):
    answer, took = _raw(api, b"POST /embed HTTP/1.1\r\nHost: x\r\nX-Slow: ", TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408") and took < TIMEOUT_S + 3, (answer, took)
    silent, took = _raw(api, b"", TIMEOUT_S + 10)  # connects, sends nothing
    assert silent == b"" and took < TIMEOUT_S + 3, took


def _chunks(total: int, size: int = 2**20) -> Iterator[bytes]:
    yield b'{"texts": ["'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"]}'


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_an_oversized_body_gets_413_chunked_or_declared(api, declared):
    total = 50 * 2**20
    headers = AUTH | {"Content-Type": "application/json"}
    if declared:
        body: bytes | Iterator[bytes] = b"".join(_chunks(total))
    else:
        body = _chunks(total)
    response = httpx.post(f"{api}/embed", content=body, headers=headers, timeout=60)
    assert response.status_code == 413, response.text[:300]
    assert "EMBEDQ_API_MAX_BODY_MB" in response.json()["error"]["message"]


def test_a_body_under_the_limit_still_works_and_the_server_lives(api):
    response = httpx.post(f"{api}/embed", json={"texts": ["still here"]}, headers=AUTH, timeout=60)
    assert response.status_code == 200 and response.json()["dim"] == 384
    assert httpx.get(f"{api}/health").json()["status"] == "ready"
