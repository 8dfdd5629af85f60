"""A server or a setting that is wrong: one line on stderr, a distinct exit code, in seconds.

Every command runs as a real subprocess against real servers (the test Redis, a private
redis-server, the machine's Postgres) or against ports where nothing listens or nothing
answers. Each test starts its commands at once and waits for all of them (the machine has
two cores: the time bounds of the commands run side by side leave room for that; the
issue's table rows run one at a time, each within 5 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from embedq.ops.failures import EX_CONFIG, EX_OSERR, EX_UNAVAILABLE, classify, scrub
from embedq.ops.probe import redact
from embedq.settings import Settings
from tests.helpers import BIN, ROOT, corpus, env, free_port, redis_server

CLI = str(BIN / "embedq")
# The bound for one command, start to exit, on its own.
ALONE_S = 5.0
# The same for commands run side by side on this 2-core machine (a Python start each).
TOGETHER_S = 20.0
# What each command needs, and a harmless way to call it.
COMMANDS = {
    "worker": ["worker", "--queue", "cpu"],
    "ingest": ["ingest", "{corpus}", "--collection", "c"],
    "search": ["search", "x", "--collection", "c"],
    "status": ["status"],
    "api": ["api", "--insecure-no-auth", "--port", "{port}"],
    "beat": ["beat"],
    "flower": ["flower", "--insecure-no-auth", "--port", "{port}"],
    "index": ["index", "rebuild"],
    "bench": ["bench", "--limit", "1", "--repeats", "1"],
    "demo": ["demo"],
    "embed": ["embed", "x"],
    "delete": ["delete", "--collection", "c", "--id", "x"],
}
NEED_BROKER = ("worker", "ingest", "search", "status", "api", "beat", "flower", "index")
NEED_BROKER += ("bench", "demo", "embed")
NEED_STORE = ("worker", "search", "status", "api", "index", "demo", "delete")
LOAD_MODEL = ("worker", "demo", "bench")


@dataclass
class Ran:
    """One finished command: exit code, output, seconds from start to exit."""

    name: str
    code: int | None
    out: str
    err: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        """Its stderr, line by line."""
        return self.err.strip().splitlines()

    def __str__(self) -> str:
        return f"{self.name}: exit {self.code} in {self.seconds:.1f} s\n{self.err[-2000:]}"


def run_all(
    commands: dict[str, tuple[list[str], dict[str, str]]], tmp: Path, timeout_s: float = 60
) -> dict[str, Ran]:
    """Start every command at once, wait for all; each one's :class:`Ran` (output in files:
    a pipe nobody reads could stall a chatty one)."""
    procs, started, ended = {}, {}, {}
    for name, (argv, environ) in commands.items():
        out, err = (tmp / f"{name}.out").open("w"), (tmp / f"{name}.err").open("w")
        started[name] = time.monotonic()
        procs[name] = subprocess.Popen(
            argv, env=environ, cwd=tmp, stdout=out, stderr=err, start_new_session=True
        )
        out.close(), err.close()
    deadline = time.monotonic() + timeout_s
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic()
        time.sleep(0.02)
    for proc in procs.values():
        if proc.poll() is None:  # still running: a hang, killed with its children
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {
        name: Ran(
            name,
            None if name not in ended else proc.returncode,
            (tmp / f"{name}.out").read_text(errors="replace"),
            (tmp / f"{name}.err").read_text(errors="replace"),
            ended.get(name, deadline) - started[name],
        )
        for name, proc in procs.items()
    }


def cli(names: tuple[str, ...] | list[str], environ: dict[str, str], tmp: Path) -> dict:
    """``embedq <command>`` for each of ``names``, as :func:`run_all` takes them."""
    docs = tmp / "docs.jsonl"
    if not docs.exists():
        corpus(docs, 3)
    port = str(free_port())
    return {
        name: ([CLI, *(a.format(corpus=docs, port=port) for a in COMMANDS[name])], environ)
        for name in names
    }


def assert_one_line(ran: Ran, code: int, *says: str, within_s: float = TOGETHER_S) -> str:
    """``ran`` exited ``code`` within ``within_s`` with one line on stderr, no traceback,
    saying each of ``says``; the line."""
    print(f"\nFIGURES {ran.name}: exit {ran.code}, {len(ran.lines)} line(s), {ran.seconds:.2f} s")
    assert ran.code == code, str(ran)
    assert len(ran.lines) == 1 and ran.lines[0].startswith("error: "), str(ran)
    assert "Traceback" not in ran.err + ran.out, str(ran)
    assert ran.seconds < within_s, str(ran)
    for word in says:
        assert word in ran.lines[0], str(ran)
    return ran.lines[0]


@pytest.fixture
def closed_port() -> int:
    """A TCP port where nothing listens (connections are refused)."""
    return free_port()


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: what a
    blackholing firewall or a hung server looks like to a client that got through."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


# -- the table, row by row, each alone -------------------------------------------


def test_row_ingest_on_an_unreachable_redis(tmp_path, closed_port):
    environ = env(EMBEDQ_REDIS_URL=f"redis://:hunter22@127.0.0.1:{closed_port}/0")
    ran = run_all(cli(["ingest"], environ, tmp_path), tmp_path)["ingest"]
    line = assert_one_line(ran, EX_UNAVAILABLE, "Redis broker", "refused", within_s=ALONE_S)
    # The URL is named, its password is not.
    assert f"redis://:***@127.0.0.1:{closed_port}/0" in line and "hunter22" not in ran.err


def test_row_status_on_an_unreachable_redis_reports_the_store(tmp_path, closed_port):
    environ = env(EMBEDQ_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    ran = run_all(cli(["status"], environ, tmp_path), tmp_path)["status"]
    assert_one_line(ran, EX_UNAVAILABLE, f"127.0.0.1:{closed_port}", within_s=ALONE_S)
    assert f"redis: redis://127.0.0.1:{closed_port}/0 DOES NOT ANSWER" in ran.out, ran.out
    assert "store: sqlite:///" in ran.out and " ok (" in ran.out, ran.out
    assert "Redis broker at" in ran.out.split("alerts:")[1], "and an alert"


def test_row_delay_on_an_unreachable_redis_raises_a_named_error(tmp_path, closed_port):
    code = (
        "import time\n"
        "from embedq.errors import BrokerUnavailableError\n"
        "from embedq.tasks import embed_texts\n"
        "from embedq.producer import embed\n"
        "for call in (lambda: embed_texts.delay(['x']).get(timeout=5), lambda: embed(['x'])):\n"
        "    started = time.monotonic()\n"
        "    try:\n"
        "        call()\n"
        "    except BrokerUnavailableError as exc:\n"
        "        print(f'{time.monotonic() - started:.2f}', exc)\n"
    )
    environ = env(EMBEDQ_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )
    seconds = time.monotonic() - started
    print(f"\nFIGURES delay: exit {out.returncode}, {seconds:.2f} s in all: {out.stdout}")
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr
    assert all(f"127.0.0.1:{closed_port}" in line for line in lines), lines
    assert out.stderr == "", "nothing logged on the way (no retry warnings)"
    assert seconds < ALONE_S


def test_row_status_on_an_unreachable_postgres_reports_the_others(tmp_path, closed_port):
    environ = env(EMBEDQ_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port}/test")
    ran = run_all(cli(["status"], environ, tmp_path), tmp_path)["status"]
    assert_one_line(ran, EX_UNAVAILABLE, "store", f"127.0.0.1:{closed_port}", within_s=ALONE_S)
    assert "redis: redis://" in ran.out and " ok (" in ran.out, ran.out
    assert "workers:" in ran.out and "SLOs:" in ran.out, "the other components' states"
    assert "indexes: unknown (the store does not answer)" in ran.out


def test_row_worker_with_a_missing_model_exits_78_never_ready(tmp_path, side_redis):
    environ = env(EMBEDQ_REDIS_URL=side_redis(3), EMBEDQ_MODEL="/nonexistent/model")
    ran = run_all(cli(["worker"], environ, tmp_path), tmp_path)["worker"]
    assert_one_line(ran, EX_CONFIG, "/nonexistent/model", "EMBEDQ_MODEL", within_s=ALONE_S)
    assert "ready" not in ran.out + ran.err


# -- every command, one thing wrong at a time ---------------------------------------------


def test_every_command_on_an_unreachable_redis_exits_69(tmp_path, closed_port):
    environ = env(EMBEDQ_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    for ran in run_all(cli(NEED_BROKER, environ, tmp_path), tmp_path).values():
        assert_one_line(
            ran, EX_UNAVAILABLE, f"redis://127.0.0.1:{closed_port}/0", "EMBEDQ_REDIS_URL"
        )


def test_every_command_on_an_unreachable_store_exits_69(tmp_path, closed_port, side_redis):
    url = f"postgresql://postgres:pw-{uuid.uuid4().hex[:6]}@127.0.0.1:{closed_port}/test"
    environ = env(EMBEDQ_DATABASE_URL=url, EMBEDQ_REDIS_URL=side_redis(3))
    for ran in run_all(cli(NEED_STORE, environ, tmp_path), tmp_path).values():
        line = assert_one_line(ran, EX_UNAVAILABLE, "the store", "EMBEDQ_DATABASE_URL")
        assert redact(url) in line and url not in ran.err + ran.out


def test_every_command_with_an_invalid_setting_exits_78_naming_it(tmp_path):
    environ = env(EMBEDQ_PROBE_TIMEOUT_S="-1")
    for ran in run_all(cli(list(COMMANDS), environ, tmp_path), tmp_path).values():
        assert_one_line(ran, EX_CONFIG, "EMBEDQ_PROBE_TIMEOUT_S='-1'")


def test_wrong_urls_credentials_and_flags_from_the_environment_exit_78(tmp_path, side_redis):
    with redis_server(tmp_path / "locked", password="s3cret-pw") as locked:
        cases = {
            "redis-scheme": (["status"], {"EMBEDQ_REDIS_URL": "http://127.0.0.1:6379/0"}),
            "redis-password": (
                ["ingest"],
                {"EMBEDQ_REDIS_URL": locked.url().replace("s3cret-pw", "wrong-pw")},
            ),
            "redis-no-password": (
                ["embed"],
                {"EMBEDQ_REDIS_URL": locked.url().replace(":s3cret-pw@", "")},
            ),
            "store-scheme": (["search"], {"EMBEDQ_DATABASE_URL": "mysql://db/x"}),
            "store-database": (
                ["delete"],
                {"EMBEDQ_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/no_such_db_x"},
            ),
            "flag-from-env": (["ingest"], {"EMBEDQ_CHUNK_SIZE": "many"}),
            "queue-from-env": (["embed"], {"EMBEDQ_QUEUE": "tpu"}),
            "debug-from-env": (["status"], {"EMBEDQ_DEBUG": "perhaps"}),
            "flower-credentials": (["flower"], {"EMBEDQ_FLOWER_BASIC_AUTH": ""}),
        }
        commands = {}
        for case, (names, overrides) in cases.items():
            environ = env(EMBEDQ_REDIS_URL=side_redis(3)) | overrides
            argv = cli(names, environ, tmp_path)[names[0]][0]
            if case == "flower-credentials":
                argv = [CLI, "flower", "--port", str(free_port())]
            commands[case] = (argv, environ)
        results = run_all(commands, tmp_path)
    says = {
        "redis-scheme": "not a Redis URL",
        "redis-password": "EMBEDQ_REDIS_URL",
        "redis-no-password": "a password is required",
        "store-scheme": "EMBEDQ_DATABASE_URL='mysql://db/x'",
        "store-database": "does not exist",
        "flag-from-env": "EMBEDQ_CHUNK_SIZE='many' (--chunk-size)",
        "queue-from-env": "EMBEDQ_QUEUE='tpu'",
        "debug-from-env": "EMBEDQ_DEBUG='perhaps'",
        "flower-credentials": "EMBEDQ_FLOWER_BASIC_AUTH",
    }
    for case, ran in results.items():
        line = assert_one_line(ran, EX_CONFIG, says[case])
        assert "s3cret-pw" not in line and "wrong-pw" not in line


def test_a_missing_model_stops_every_command_that_loads_one(tmp_path, side_redis):
    environ = env(EMBEDQ_REDIS_URL=side_redis(3), EMBEDQ_MODEL="/nonexistent/model")
    commands = cli(LOAD_MODEL, environ, tmp_path)
    commands["worker-devices"] = ([CLI, "worker", "--devices", "cpu,cpu"], environ)
    for ran in run_all(commands, tmp_path).values():
        assert_one_line(ran, EX_CONFIG, "/nonexistent/model")
        assert "ready" not in ran.out + ran.err


def test_a_taken_port_exits_71(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        commands = {
            name: ([CLI, name, "--insecure-no-auth", "--port", port], env())
            for name in ("api", "flower")
        }
        for ran in run_all(commands, tmp_path).values():
            assert_one_line(ran, EX_OSERR, f"127.0.0.1:{port}", "--port")


def test_debug_adds_the_traceback_and_keeps_the_line_and_code(tmp_path, closed_port):
    environ = env(EMBEDQ_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    commands = {
        "flag": ([CLI, "--debug", "embed", "x"], environ),
        "env": ([CLI, "embed", "x"], environ | {"EMBEDQ_DEBUG": "1"}),
    }
    for ran in run_all(commands, tmp_path).values():
        assert ran.code == EX_UNAVAILABLE, str(ran)
        assert "Traceback (most recent call last)" in ran.err, str(ran)
        assert ran.lines[-1].startswith("error: the Redis broker"), str(ran)


# -- status and /health never hang ---------------------------------------------------------


def test_status_answers_within_5_s_when_redis_and_postgres_blackhole(tmp_path):
    with silent_port() as port:
        environ = env(
            EMBEDQ_REDIS_URL=f"redis://127.0.0.1:{port}/0",
            EMBEDQ_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/test",
        )
        ran = run_all(cli(["status"], environ, tmp_path), tmp_path)["status"]
    assert_one_line(ran, EX_UNAVAILABLE, "no answer within", within_s=ALONE_S)
    assert ran.out.count("DOES NOT ANSWER") == 2, ran.out


def test_status_reports_a_cache_redis_apart_that_does_not_answer(tmp_path, closed_port):
    environ = env(EMBEDQ_CACHE_URL=f"redis://127.0.0.1:{closed_port}/0")
    ran = run_all(cli(["status"], environ, tmp_path), tmp_path)["status"]
    assert_one_line(ran, EX_UNAVAILABLE, "the cache Redis", "EMBEDQ_CACHE_URL", within_s=ALONE_S)
    servers = ran.out.split("workers:")[0]
    assert f"cache: redis://127.0.0.1:{closed_port}/0 DOES NOT ANSWER" in servers, ran.out
    assert servers.count(" ok (") == 2, "the broker and the store answered"


def test_health_is_503_within_seconds_when_redis_does_not_answer(tmp_path):
    code = (
        "import json, time\n"
        "from fastapi.testclient import TestClient\n"
        "from embedq.api import create_app\n"
        "client = TestClient(create_app(allow_anonymous=True))\n"
        "started = time.monotonic()\n"
        "response = client.get('/health')\n"
        "print(json.dumps([response.status_code, response.json(), time.monotonic() - started]))\n"
    )
    with silent_port() as port:
        environ = env(EMBEDQ_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        out = subprocess.run(
            [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 0, out.stderr[-3000:]
    status, body, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nFIGURES /health, Redis silent: {status} in {seconds:.2f} s")
    assert status == 503 and body["status"] == "redis_unreachable", body
    assert [s["name"] for s in body["servers"]] == ["redis", "store"]
    assert body["servers"][1]["reachable"] and seconds < ALONE_S


def test_health_is_degraded_when_the_store_does_not_answer(celery_worker, closed_port):
    from fastapi.testclient import TestClient

    from embedq.api import create_app
    from embedq.settings import get_settings

    url = f"postgresql://postgres@127.0.0.1:{closed_port}/test"
    app = create_app(get_settings().model_copy(update={"database_url": url}), True)
    body = TestClient(app).get("/health").json()
    assert body["status"] == "degraded" and "EMBEDQ_DATABASE_URL" in body["message"], body
    states = {s["name"]: s["reachable"] for s in body["servers"]}
    assert states == {"redis": True, "store": False}


# -- workers that cannot start, producers that keep what they did ------------------------


def test_a_worker_whose_model_fails_to_load_exits_78_before_ready(tmp_path, side_redis):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")  # passes the file check, fails to load
    environ = env(EMBEDQ_REDIS_URL=side_redis(3), EMBEDQ_MODEL=str(broken))
    ran = run_all({"worker": ([CLI, "worker", "--queue", "cpu"], environ)}, tmp_path, 120)
    print(f"\nFIGURES broken model: exit {ran['worker'].code} in {ran['worker'].seconds:.1f} s")
    log = ran["worker"].out + ran["worker"].err
    assert ran["worker"].code == EX_CONFIG, log[-3000:]
    assert "cannot start: could not load model" in log and "Traceback" not in log
    assert " ready" not in log, "Celery's ready line never comes"


def test_ingest_rerun_after_an_unreachable_broker_skips_what_was_stored(
    celery_worker, tmp_path, closed_port
):
    docs = corpus(tmp_path / "all.jsonl", 8)
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(d) + "\n" for d in docs[:4]))
    collection = f"resume-{uuid.uuid4().hex[:6]}"
    first = _ingest(half, collection, env())
    assert first.returncode == 0 and json.loads(first.stdout)["stored"] == 4, first.stderr
    down = _ingest(
        tmp_path / "all.jsonl",
        collection,
        env(EMBEDQ_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0"),
    )
    assert down.returncode == EX_UNAVAILABLE and len(down.stderr.strip().splitlines()) == 1
    again = json.loads(_ingest(tmp_path / "all.jsonl", collection, env()).stdout)
    assert (again["stored"], again["skipped"]) == (4, 4), again


def _ingest(path: Path, collection: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [CLI, "ingest", str(path), "--collection", collection, "--json"]
    return subprocess.run(argv, env=environ, cwd=ROOT, capture_output=True, text=True, timeout=300)


# -- the pure parts ------------------------------------------------------------------------


def test_settings_errors_name_each_variable_and_hide_secrets():
    with pytest.raises(ValidationError) as caught:
        Settings(worker_concurrency="lots", cache_max_share=3, api_keys=["not", "text"])
    failure = classify(caught.value)
    assert failure.code == EX_CONFIG
    assert "EMBEDQ_WORKER_CONCURRENCY='lots'" in failure.message
    assert "EMBEDQ_CACHE_MAX_SHARE=3" in failure.message
    assert "EMBEDQ_API_KEYS=***" in failure.message and "'text'" not in failure.message


def test_urls_and_messages_never_show_passwords(monkeypatch):
    assert redact("redis://:p4ss@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("postgresql://u:p%40ss@h/db") == "postgresql://u:***@h/db"
    assert redact("rediss://h:1/0?password=abc&x=1") == "rediss://h:1/0?password=***&x=1"
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    monkeypatch.setenv("EMBEDQ_DATABASE_URL", "postgresql://u:p%40ss@h/db")
    monkeypatch.setenv("EMBEDQ_API_KEYS", "key-one,key-two")
    assert scrub("p@ss key-two p%40ss") == "*** *** ***"


@pytest.mark.soak
def test_ingest_keeps_and_reports_what_it_stored_when_redis_dies_midway(tmp_path):
    from embedq.store.factory import create_store
    from tests.helpers import audit, finish, isolated_env, start_ingest, wait_rows, worker

    with redis_server(tmp_path / "redis") as server:
        environ = isolated_env(tmp_path, server.url(0), EMBEDQ_INGEST_DRAIN_TIMEOUT_S="3")
        docs = corpus(tmp_path / "docs.jsonl", 2000)
        store = create_store(environ["EMBEDQ_DATABASE_URL"])
        with worker(environ, tmp_path / "worker.log", ready=False):
            ingest = start_ingest(tmp_path / "docs.jsonl", "midway", environ, "--chunk-size", "8")
            wait_rows(store, "midway", 200, alive=ingest)
            server.close()  # Redis gone for good: no restart to wait out
            began = time.monotonic()
            out, err = ingest.communicate(timeout=300)
            took = time.monotonic() - began
            summary = json.loads(out.strip().splitlines()[-1])
            stored_then = store.count("midway")
            server.restart()
            again = finish(start_ingest(tmp_path / "docs.jsonl", "midway", environ))
    lines = err.strip().splitlines()
    print("\n".join(lines))
    print(
        f"\nFIGURES Redis killed at {summary['stored']} stored: ingest exit {ingest.returncode} "
        f"{took:.1f} s later, {len(lines)} stderr line(s); rerun: {again['stored']} stored, "
        f"{again['skipped']} skipped"
    )
    assert ingest.returncode == EX_UNAVAILABLE, err[-3000:]
    assert lines[-1].startswith("error: ") and "a rerun skips what was stored" in lines[-1]
    assert "Traceback" not in err
    assert summary["stored"] >= 200 and summary["error"], summary
    assert again["skipped"] >= stored_then, "the rerun skips what was stored"
    figures = audit(environ["EMBEDQ_DATABASE_URL"], "midway", docs)
    assert figures == {"attempted": 2000, "stored": 2000, "lost": 0, "duplicated": 0, "wrong": 0}


def _caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def test_each_kind_of_failure_has_its_code():
    import redis
    from celery.exceptions import TimeoutError as CeleryTimeout

    from embedq import errors

    cases = [
        (errors.ConfigurationError("x"), EX_CONFIG),
        (errors.ModelLoadError("x"), EX_CONFIG),
        (PermissionError(13, "Permission denied", "/var/embedq"), EX_CONFIG),
        (redis.AuthenticationError("invalid password"), EX_CONFIG),
        (errors.BrokerUnavailableError("x"), EX_UNAVAILABLE),
        (errors.StoreUnavailableError("x"), EX_UNAVAILABLE),
        (redis.ConnectionError("Error 111 connecting"), EX_UNAVAILABLE),
        # Celery's result consumer, giving up on a lost Redis.
        (_caused(RuntimeError("Retry limit exceeded"), redis.ConnectionError("x")), 69),
        (errors.PortInUseError("x"), EX_OSERR),
        (errors.InvalidInputError("x"), 2),
        (errors.DeviceFailedError("x"), 70),
        (errors.StoreError("x"), 1),
        (CeleryTimeout("x"), 75),
        (KeyError("surprise"), 70),
    ]
    for error, code in cases:
        assert classify(error).code == code, (error, classify(error))
    multi = classify(errors.StoreError("first\nsecond")).message
    assert multi == "first second", "one line, whatever the message"
