"""Operating embedq: status report, metrics scrape, Flower in a real browser, Procfile, compose."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from embedq.cli import cli
from embedq.ops.status import Report, alerts, build_report, render
from embedq.settings import get_settings
from embedq.store.factory import create_store
from tests.conftest import ROOT, unique_texts

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(check, timeout_s: float = 60.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess with its output in ``log``, stopped with SIGTERM (then SIGKILL)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_status_report_counts_what_happened(runtime, redis_client):
    from embedq.tasks import embed_texts

    texts = unique_texts(5, "status")
    embed_texts.delay(texts).get(timeout=60)
    embed_texts.delay(texts).get(timeout=60)  # all from the cache
    settings = get_settings()
    store = create_store(settings.database_url)
    report = build_report(redis_client, store, settings)
    assert report.workers["cpu"] and report.queue_depths["cpu"] == 0
    slos = {s["name"]: s for s in report.slos}
    assert slos["error_rate"]["events"] >= 2 and slos["latency"]["events"] >= 2
    assert report.cache_hit_rate is not None and 0 < report.cache_hit_rate <= 1
    text = render(report)
    assert "workers:" in text and "SLOs:" in text and "cache hit rate" in text
    out = CliRunner().invoke(cli, ["status", "--json"])
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.output)) >= {"workers", "queue_depths", "slos", "indexes", "alerts"}


def test_alerts_speak_plainly():
    report = Report(
        workers={"cpu": [{"hostname": "cpu@a"}], "gpu": []},
        queue_depths={"cpu": 0, "gpu": 7},
        texts_last_minute=0,
        requests_last_minute=0,
        cache_hit_rate=0.2,
        slos=[
            {
                "name": "cache_hit_rate",
                "objective": 0.7,
                "sli": 0.2,
                "budget_remaining": -1.67,
                "violated": True,
                "description": "at least 70% of texts are answered by the cache",
            }
        ],
        indexes=[{"collection": "docs", "index_version": None, "behind_s": None}],
    )
    said = "\n".join(alerts(report, get_settings()))
    assert "no gpu worker alive: gpu traffic is falling back to cpu" in said
    assert "7 tasks wait on 'gpu'" in said
    assert "SLO cache_hit_rate violated" in said
    assert "collection 'docs' has no index yet" in said


def test_worker_metrics_are_scrapable(tmp_path, redis_client):
    port = free_port()
    env = os.environ | {"EMBEDQ_METRICS_PORT": str(port), "EMBEDQ_REDIS_URL": _db(redis_client, 10)}
    cmd = [str(BIN / "embedq"), "worker", "--queue", "cpu", "--hostname", f"m-{port}@%h"]
    with process(cmd, env, tmp_path / "worker.log"):
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: http_get(url)[0] == 200, 120, "the metrics port")
        client_env = env | {"EMBEDQ_DATABASE_URL": env["EMBEDQ_DATABASE_URL"]}
        code = "from embedq.tasks import embed_texts; embed_texts.delay(['a b', 'c d e']).get(60)"
        subprocess.run([sys.executable, "-c", code], env=client_env, check=True, timeout=120)
        body = http_get(url)[1]
    for name in (
        'embedq_texts_embedded_total{device="cpu"}',
        "embedq_tokens_total",
        "embedq_batch_size_bucket",
        "embedq_batch_tokens_bucket",
        "embedq_encode_seconds_bucket",
        'embedq_cache_lookups_total{outcome="miss"}',
        'embedq_queue_depth{queue="gpu"}',
        'embedq_slo_objective{slo="latency"}',
        'embedq_slo_sli{slo="error_rate"}',
        'embedq_task_seconds_count{task="embedq.embed_texts"}',
        "embedq_truncated_inputs_total",
    ):
        assert name in body, name
    texts = [line for line in body.splitlines() if line.startswith("embedq_texts_embedded_total")]
    assert float(texts[0].split()[-1]) >= 2


def _db(redis_client, db: int) -> str:
    kwargs = redis_client.connection_pool.connection_kwargs
    if "path" in kwargs:
        pytest.skip("needs a TCP Redis for a second database")
    url = f"redis://{kwargs['host']}:{kwargs['port']}/{db}"
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


def test_flower_refuses_to_start_without_credentials():
    env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_FLOWER_BASIC_AUTH"}
    out = subprocess.run(
        [str(BIN / "embedq"), "flower"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "EMBEDQ_FLOWER_BASIC_AUTH" in out.stderr


def chromium_dom(url: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    cmd = [CHROMIUM, *flags, "--virtual-time-budget=8000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test does it)")
def test_flower_in_a_real_browser(celery_worker, tmp_path):
    port, password = free_port(), uuid.uuid4().hex
    env = os.environ | {"EMBEDQ_FLOWER_BASIC_AUTH": f"ops:{password}"}
    with process([str(BIN / "embedq"), "flower", "--port", str(port)], env, tmp_path / "f.log"):
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(base)[0] == 401, 60, "Flower")
        # Flower switches task events on in the workers; then a task shows up.
        wait_for(lambda: _has_worker(base, password), 60, "a worker in Flower")
        from embedq.tasks import embed_texts

        secret = "private document text " + uuid.uuid4().hex
        task_id = embed_texts.delay([secret]).id
        wait_for(lambda: task_id in http_get(f"{base}/api/tasks", ("ops", password))[1], 30)
        tasks = chromium_dom(f"http://ops:{password}@127.0.0.1:{port}/tasks")
        detail = chromium_dom(f"http://ops:{password}@127.0.0.1:{port}/task/{task_id}")
        workers = chromium_dom(f"http://ops:{password}@127.0.0.1:{port}/workers")
        anonymous = chromium_dom(f"{base}/workers")
    assert "embedq.embed_texts" in tasks and "SUCCESS" in tasks and task_id in tasks
    # Document text stays out of what Flower shows; the args say how many texts.
    assert "1 items" in detail and secret not in detail and secret not in tasks
    assert "Online" in workers and celery_worker.hostname in workers
    assert "Online" not in anonymous and "embed_texts" not in anonymous


def _has_worker(base: str, password: str) -> bool:
    code, body = http_get(f"{base}/api/workers?refresh=1", ("ops", password))
    return code == 200 and len(json.loads(body)) > 0


def test_procfile_processes_serve_an_embedding(tmp_path, redis_client):
    ports = {"api": free_port(), "flower": free_port()}
    key, password = uuid.uuid4().hex, uuid.uuid4().hex
    env = os.environ | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "EMBEDQ_REDIS_URL": _db(redis_client, 9),
        "EMBEDQ_API_KEYS": key,
        "EMBEDQ_API_PORT": str(ports["api"]),
        "EMBEDQ_FLOWER_PORT": str(ports["flower"]),
        "EMBEDQ_FLOWER_BASIC_AUTH": f"ops:{password}",
        "EMBEDQ_METRICS_PORT": str(free_port()),
        "EMBEDQ_DATA_DIR": str(tmp_path / "data"),
    }
    cmd = [str(BIN / "honcho"), "start", "worker_cpu", "beat", "flower", "api"]
    with process(cmd, env, tmp_path / "honcho.log"):
        api = f"http://127.0.0.1:{ports['api']}"
        wait_for(lambda: http_get(f"{api}/health")[0] == 200, 180, "the api to see a worker")
        body = _post_embed(api, key)
        flower = f"http://127.0.0.1:{ports['flower']}"

        def flower_saw_a_task() -> bool:
            # Flower switches task events on in the worker a moment after it starts.
            _post_embed(api, key)
            return "embedq.embed_texts" in http_get(f"{flower}/api/tasks", ("ops", password))[1]

        seen = wait_for(flower_saw_a_task, 60, "Flower to see a task")
        log = wait_for(lambda: _beat_started(tmp_path / "honcho.log"), 30, "beat")
    assert body["dim"] == 384 and len(body["vectors"][0]) == 384
    assert seen and log


def _post_embed(api: str, key: str) -> dict[str, object]:
    request = urllib.request.Request(
        f"{api}/embed",
        data=json.dumps({"texts": ["hello from the Procfile"]}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _beat_started(log: Path) -> bool:
    text = log.read_text(errors="replace")
    return "beat" in text and "Starting" in text


def test_compose_file_has_the_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {
        "redis",
        "postgres",
        "worker_cpu",
        "worker_gpu",
        "beat",
        "flower",
        "api",
    }
    assert "noeviction" in services["redis"]["command"]
    devices = services["worker_gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert set(procfile) == {"worker_cpu", "worker_gpu", "beat", "flower", "api"}
    for name in procfile:
        command = services[name]["command"]
        assert command[:2] == procfile[name].split()[:2], name
        assert "EMBEDQ_REDIS_URL" in services[name]["environment"]
    assert "EMBEDQ_API_KEYS" in services["api"]["environment"]
    assert "EMBEDQ_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
