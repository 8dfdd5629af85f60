"""Prometheus and Grafana out of the box: the shipped Prometheus config passes promtool and,
run by a real Debian ``prometheus``, scrapes a live worker and the API; every query of the
shipped Grafana dashboard names metrics embedq exports and runs in that Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, free_port, http_get, process, unique_texts, wait_until

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "embedq.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "embedq.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMETHEUS = "Debian prometheus is not installed (make test does it)"
# PromQL words that look like metric names: binary operators and modifiers.
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals may hold anything
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, range selectors
    # Label lists of aggregations and vector matching.
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return set(names) - KEYWORDS


def exported_names(exposition: str) -> set[str]:
    """Every series name a scrape's families can have, declared samples or not."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the shipped dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def keda_queries() -> list[str]:
    """Every PromQL expression of the KEDA example (deploy/keda)."""
    scaled = yaml.safe_load((DEPLOY / "keda" / "scaledobject.yaml").read_text())
    return [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]


def test_metric_names_are_read_out_of_promql():
    expr = (
        'sum by (queue) (rate(embedq_a_total{x="y}{"}[$__rate_interval]) * on(job, instance)'
        " group_left(queue) embedq_b) / 1e6 > bool 0.5 or histogram_quantile(0.9, c:d_bucket)"
    )
    assert metric_names(expr) == {"embedq_a_total", "embedq_b", "c:d_bucket"}


def test_dashboard_covers_what_operators_ask_for():
    queries = dashboard_queries()
    named = set().union(*map(metric_names, queries))
    for name in (
        "embedq_texts_embedded_total",
        "embedq_tokens_total",
        "embedq_batch_size_bucket",
        "embedq_batch_tokens_bucket",
        "embedq_encode_seconds_bucket",
        "embedq_queue_depth",
        "embedq_cache_lookups_total",
        "embedq_router_decisions",
        "embedq_slo_error_budget_remaining",
        "embedq_gpu_memory_bytes",
        "embedq_cost_per_million_tokens",
    ):
        assert name in named, name
    assert all(metric_names(q) for q in queries), "a query that names no metric"
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {uid}


def test_compose_runs_prometheus_and_grafana():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert not source.startswith(".") or (ROOT / source).exists(), volume
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load(PROVIDER.read_text())["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert "GF_SECURITY_ADMIN_PASSWORD" in services["grafana"]["environment"]
    assert "3000:3000" in services["grafana"]["ports"]
    # Prometheus scrapes the compose services by name, on the ports they serve.
    jobs = {
        job["job_name"]: job
        for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    }
    for worker in ("worker_cpu", "worker_gpu"):
        assert jobs[f"embedq_{worker}"]["dns_sd_configs"][0]["names"] == [worker]
    api_port = services["api"]["ports"][0].split(":")[-1]
    assert jobs["embedq_api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    assert "api-key" in " ".join(services["prometheus"]["command"])


def test_readme_names_the_ports_and_every_dashboard_metric():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Monitoring: Prometheus and Grafana", 1)[1].split("\n## ", 1)[0]
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        published = services[name]["ports"][0].rsplit(":", 1)[-1]
        assert f":{published}" in section, name
    for name in set().union(*map(metric_names, dashboard_queries())):
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{family}" in readme, f"{family} is not in the README's metrics table"


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
def test_promtool_passes_the_shipped_config_as_compose_sets_it_up(tmp_path):
    # compose's own shell line, its paths moved here and `promtool check config` run in
    # place of prometheus: it copies the file and writes the first API key beside it.
    line = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["prometheus"]
    line = line["command"][0].replace("$$", "$").replace("/etc/embedq-prometheus", "@DEPLOY@")
    line = line.replace("/bin/prometheus --config.file=", f"{PROMTOOL} check config ")
    line = line.split(" --storage.tsdb.path")[0].replace("/prometheus/", "@TMP@/")
    line = line.replace("@DEPLOY@", str(PROMETHEUS_CONFIG.parent)).replace("@TMP@", str(tmp_path))
    environ = {"PATH": os.environ["PATH"], "EMBEDQ_API_KEYS": " first-key:ops-* , second-key"}
    out = subprocess.run(
        ["sh", "-c", line], env=environ, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, line + out.stdout + out.stderr
    assert (tmp_path / "api-key").read_text() == "first-key"
    assert (tmp_path / "prometheus.yml").read_text() == PROMETHEUS_CONFIG.read_text()


@contextmanager
def api_server(key: str) -> Iterator[str]:
    """The HTTP API on a free port, served by uvicorn in a thread of this process."""
    import uvicorn

    from embedq.api import create_app
    from embedq.settings import get_settings

    app = create_app(get_settings().model_copy(update={"api_keys": key}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, 0.05, "uvicorn")
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def prometheus_config(folder: Path, targets: dict[str, str], key: str) -> Path:
    """The shipped config with its jobs pointed at this test's ports (others dropped),
    scraped every second; the API key beside it, as compose puts it."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    jobs = [job for job in config["scrape_configs"] if job["job_name"] in targets]
    for job in jobs:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config["scrape_configs"] = jobs
    (folder / "api-key").write_text(key)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def query(base: str, expr: str) -> dict[str, Any]:
    """Prometheus's answer to an instant query (status, data or error)."""
    code, body = http_get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    answer = json.loads(body)
    assert code in (200, 400, 422), (code, body)
    return answer


def series(base: str, expr: str) -> list[dict[str, Any]]:
    """The result vector of an instant query that must run."""
    answer = query(base, expr)
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def all_up(base: str, jobs: set[str]) -> bool:
    code, body = http_get(f"{base}/api/v1/targets")
    targets = json.loads(body)["data"]["activeTargets"] if code == 200 else []
    return {t["labels"]["job"] for t in targets if t["health"] == "up"} == jobs


@pytest.fixture(scope="module")
def scraped(celery_worker, redis_client, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A real Prometheus scraping the session's worker and an API, both live."""
    from embedq.ops.status import read_workers

    if PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    tmp_path = tmp_path_factory.mktemp("prometheus")

    def own_beat() -> dict[str, Any] | None:
        beats = read_workers(redis_client)["cpu"]
        return next((b for b in beats if b["hostname"] == celery_worker.hostname), None)

    beat = wait_until(own_beat, 30, 0.2, "the test worker's heartbeat")
    assert beat.get("metrics_port"), f"the test worker serves no metrics: {beat}"
    key, port = uuid.uuid4().hex, free_port()
    with api_server(key) as api:
        targets = {"embedq_worker_cpu": f"127.0.0.1:{beat['metrics_port']}", "embedq_api": api}
        config = prometheus_config(tmp_path, targets, key)
        cmd = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
        cmd += [f"--web.listen-address=127.0.0.1:{port}"]
        with process(cmd, dict(os.environ), tmp_path / "prometheus.log"):
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: all_up(base, set(targets)), 20, 0.2, "both targets up", (OSError,))
            yield {"base": base, "api": api, "key": key, "worker": targets["embedq_worker_cpu"]}


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_prometheus_scrapes_a_worker_and_the_api(scraped, celery_worker):
    from embedq.tasks import embed_texts

    embed_texts.delay(unique_texts(3, "prometheus")).get(timeout=60)
    base = scraped["base"]
    info = series(base, 'embedq_worker_info{job="embedq_worker_cpu"}')
    queues = sorted(q.name for q in celery_worker.consumer.task_consumer.queues)
    assert [s["metric"]["queue"] for s in info] == [",".join(queues)]
    assert info[0]["metric"]["worker"] == celery_worker.hostname
    texts = wait_until(
        lambda: series(base, 'embedq_texts_embedded_total{job="embedq_worker_cpu"}'), 10
    )
    assert float(texts[0]["value"][1]) >= 3
    depth = series(base, 'embedq_queue_depth{job="embedq_api"}')
    assert {s["metric"]["queue"] for s in depth} == {"cpu", "gpu"}
    # The API counts the scrapes themselves, which carried its key.
    scrapes = wait_until(
        lambda: series(base, 'embedq_api_requests_total{route="/metrics",status="200"}'), 10
    )
    assert float(scrapes[0]["value"][1]) >= 1
    assert http_get(f"http://{scraped['api']}/metrics")[0] == 401


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_every_dashboard_query_names_exported_metrics_and_runs(scraped):
    exported = exported_names(http_get(f"http://{scraped['worker']}/metrics")[1])
    code, body = http_get(f"http://{scraped['api']}/metrics", key=scraped["key"])
    assert code == 200, body
    exported |= exported_names(body)
    base = scraped["base"]
    for expr in dashboard_queries() + keda_queries():
        missing = metric_names(expr) - exported
        assert not missing, f"{expr} names metrics nobody exports: {missing}"
        # A bad join (many-to-many) or syntax is an error here, not an empty panel.
        series(base, expr.replace("$__rate_interval", "10s"))
    per_queue = next(q for q in dashboard_queries() if "embedq_texts_embedded_total" in q)
    found = wait_until(lambda: series(base, per_queue.replace("$__rate_interval", "10s")), 10)
    assert "cpu" in found[0]["metric"]["queue"].split(",")
