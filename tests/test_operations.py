"""Operating embedq: status report, metrics scrape, Flower in a real browser, Procfile, compose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from embedq.cli import cli
from embedq.ops.status import Report, alerts, build_report, render
from embedq.settings import get_settings
from embedq.store.factory import create_store
from tests.helpers import (
    BIN,
    ROOT,
    free_port,
    http_get,
    process,
    unique_texts,
    wait_until,
    worker,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_status_report_counts_what_happened(runtime, redis_client):
    from embedq.tasks import embed_texts

    settings = get_settings()
    store = create_store(settings.database_url)

    def events() -> int:
        slos = {s["name"]: s for s in build_report(redis_client, store, settings).slos}
        return min(slos[n]["events"] for n in ("error_rate", "latency"))

    before = events()
    texts = unique_texts(5, "status")
    embed_texts.delay(texts).get(timeout=60)
    embed_texts.delay(texts).get(timeout=60)  # all from the cache

    def counted() -> Report | None:
        # Workers write their counts a few times a second (slo.FLUSH_INTERVAL_S).
        report = build_report(redis_client, store, settings)
        slos = {s["name"]: s for s in report.slos}
        done = min(slos[n]["events"] for n in ("error_rate", "latency")) >= before + 2
        return report if done and report.cache_hit_rate else None

    report = wait_until(counted, 5, 0.1, "both tasks counted in the SLOs")
    assert report.workers["cpu"] and report.queue_depths["cpu"] == 0
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


def test_worker_metrics_are_scrapable(tmp_path, side_redis):
    port = free_port()
    env = os.environ | {"EMBEDQ_METRICS_PORT": str(port), "EMBEDQ_REDIS_URL": side_redis(10)}
    cmd = [str(BIN / "embedq"), "worker", "--queue", "cpu", "--hostname", f"m-{port}@%h"]
    with worker(env, tmp_path / "worker.log", cmd, ready=False):
        url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: http_get(url)[0] == 200, 120, 0.5, "the metrics port", (OSError,))
        client_env = env | {"EMBEDQ_DATABASE_URL": env["EMBEDQ_DATABASE_URL"]}
        code = "from embedq.tasks import embed_texts; embed_texts.delay(['a b', 'c d e']).get(60)"
        subprocess.run([sys.executable, "-c", code], env=client_env, check=True, timeout=120)

        def scraped() -> str | None:
            # SLO counts reach Redis within slo.FLUSH_INTERVAL_S of the task.
            body = http_get(url)[1]
            return body if 'embedq_slo_sli{slo="error_rate"}' in body else None

        body = wait_until(scraped, 5, 0.1, "the SLIs in the scrape")
    for name in (
        'embedq_texts_embedded_total{device="cpu"}',
        "embedq_tokens_total",
        "embedq_batch_size_bucket",
        "embedq_batch_tokens_bucket",
        "embedq_encode_seconds_bucket",
        'embedq_cache_lookups_total{outcome="miss"}',
        'embedq_queue_depth{class="interactive",queue="gpu"}',
        'embedq_queue_depth{class="bulk",queue="gpu"}',
        'embedq_backlog_seconds{class="bulk",queue="cpu"}',
        'embedq_slo_objective{slo="latency"}',
        'embedq_slo_sli{slo="error_rate"}',
        'embedq_task_seconds_count{task="embedq.embed_texts"}',
        "embedq_truncated_inputs_total",
    ):
        assert name in body, name
    texts = [line for line in body.splitlines() if line.startswith("embedq_texts_embedded_total")]
    assert float(texts[0].split()[-1]) >= 2


def test_flower_refuses_to_start_without_credentials():
    env = {k: v for k, v in os.environ.items() if k != "EMBEDQ_FLOWER_BASIC_AUTH"}
    out = subprocess.run(
        [str(BIN / "embedq"), "flower"], env=env, capture_output=True, text=True, timeout=60
    )
    # A setting that is missing: one line, EX_CONFIG.
    assert out.returncode == 78 and "EMBEDQ_FLOWER_BASIC_AUTH" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


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
        wait_until(lambda: http_get(base)[0] == 401, 60, 0.5, "Flower", (OSError,))
        # Flower switches task events on in the workers; then a task shows up.
        wait_until(lambda: _has_worker(base, password), 60, 0.5, "a worker in Flower", (OSError,))
        from embedq.tasks import embed_texts

        secret = "private document text " + uuid.uuid4().hex
        task_id = embed_texts.delay([secret]).id
        wait_until(
            lambda: task_id in http_get(f"{base}/api/tasks", auth=("ops", password))[1],
            30,
            0.5,
            "the task in Flower",
            (OSError,),
        )
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
    code, body = http_get(f"{base}/api/workers?refresh=1", auth=("ops", password))
    return code == 200 and len(json.loads(body)) > 0


def test_procfile_processes_serve_an_embedding(tmp_path, side_redis):
    ports = {"api": free_port(), "flower": free_port()}
    key, password = uuid.uuid4().hex, uuid.uuid4().hex
    env = os.environ | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "EMBEDQ_REDIS_URL": side_redis(9),
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
        wait_until(
            lambda: http_get(f"{api}/health")[0] == 200,
            180,
            0.5,
            "the api to see a worker",
            (OSError,),
        )
        body = _post_embed(api, key)
        flower = f"http://127.0.0.1:{ports['flower']}"

        def flower_saw_a_task() -> bool:
            # Flower switches task events on in the worker a moment after it starts.
            _post_embed(api, key)
            return (
                "embedq.embed_texts" in http_get(f"{flower}/api/tasks", auth=("ops", password))[1]
            )

        seen = wait_until(flower_saw_a_task, 60, 0.5, "Flower to see a task", (OSError,))
        log = wait_until(
            lambda: _beat_started(tmp_path / "honcho.log"), 30, 0.5, "beat", (OSError,)
        )
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
