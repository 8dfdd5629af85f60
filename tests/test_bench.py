"""``embedq bench``: a tiny real run (real worker, Redis, model), and its pure pieces."""

from __future__ import annotations

import json
import subprocess

import pytest

from embedq.errors import ConfigurationError
from embedq.tools.bench import load_texts, table, with_db
from tests.helpers import BIN, ROOT, SHARED_DATA, env


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_bench_measures_raw_and_pipeline_and_writes_json_and_png(tmp_path, side_redis):
    cmd = [str(BIN / "embedq"), "bench", "--data", "sick", "--data", "pydoc", "--device", "cpu"]
    cmd += ["--limit", "40", "--repeats", "1", "--latency-n", "5", "--redis-db", "8"]
    cmd += ["--callers", "4", "--interactive-n", "20", "--mixed-docs", "40", "--fair-docs", "8,40"]
    cmd += ["--out", str(tmp_path), "--data-dir", str(SHARED_DATA)]
    # Database 8 of the side Redis: bench flushes it, and no other worker may take its tasks.
    environ = env(EMBEDQ_REDIS_URL=side_redis(0))
    done = subprocess.run(
        cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["device"], r["data"], r["texts"]) for r in report["rows"]] == [
        ("cpu", "sick", 40),
        ("cpu", "pydoc", 40),
    ]
    for row in report["rows"]:
        assert row["raw_texts_per_s"] > 0 and row["pipeline_texts_per_s"] > 0 and row["ratio"] > 0
        assert row["pipeline_tokens_per_s"] > row["pipeline_texts_per_s"]
        assert row["batch_budget_tokens"] >= 128, "the worker's heartbeat reports its budget"
    (latency,) = report["latency"]
    assert 0 < latency["pipeline"]["p50_ms"] <= latency["pipeline"]["p99_ms"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cpu | sick | 40 |" in done.stdout
    inter = [(r["via"], r["callers"], r["tasks"]) for r in report["interactive"]]
    assert inter == [("tasks", 4, 20), ("tasks", 1, 20), ("http", 4, 20), ("http", 1, 20)]
    for row in report["interactive"]:
        assert row["tasks_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["ratio"] == round(row["tasks_per_s"] / row["raw_texts_per_s"], 3)
    assert "http x4: 20/20" in done.stderr, "a progress line while it runs"
    assert "| cpu | http | 4 | 20 |" in done.stdout
    (mixed,) = report["mixed"]
    assert mixed["ingest_alone"]["stored"] == 40 and mixed["fairness"]["ratio"] > 0
    for n in (1, 4):
        row = mixed[f"callers_{n}"]
        assert row["ingest"]["stored"] == 40 and row["during_ingest"]["requests"] > 0
        assert 0 < row["alone"]["p50_ms"] <= row["alone"]["p99_ms"]
    assert "mixed traffic (cpu):" in done.stdout and "two ingests together" in done.stdout


def test_bench_data_sets_and_errors(tmp_path):
    if SHARED_DATA.is_dir():
        sick, pydoc = load_texts("sick", SHARED_DATA), load_texts("pydoc", SHARED_DATA, 10)
        assert len(sick) == len(set(sick)) > 1000 and len(pydoc) == 10
        assert load_texts("mixed", SHARED_DATA, 4) == [pydoc[0], sick[0], pydoc[1], sick[1]]
    with pytest.raises(ConfigurationError, match="unknown data set 'nope'"):
        load_texts("nope", tmp_path)
    with pytest.raises(ConfigurationError, match="benchmark data not found"):
        load_texts("pydoc", tmp_path)


def test_with_db_points_tcp_and_unix_urls_at_another_database():
    assert with_db("redis://:pw@h:6379/0", 13) == "redis://:pw@h:6379/13"
    assert with_db("redis://h:6379", 13) == "redis://h:6379/13"
    assert with_db("unix:///tmp/r.sock?db=0", 13) == "unix:///tmp/r.sock?db=13"


def test_table_lists_every_row_and_latency():
    report = {
        "rows": [
            {
                "device": "cpu",
                "data": "sick",
                "texts": 4500,
                "raw_texts_per_s": 500.0,
                "pipeline_texts_per_s": 900.0,
                "pipeline_tokens_per_s": 12000,
                "ratio": 1.8,
                "batch_budget_tokens": 4096,
            }
        ],
        "latency": [
            {
                "device": "cpu",
                "raw": {"p50_ms": 10.0, "p99_ms": 14.0},
                "pipeline": {"p50_ms": 11.0, "p99_ms": 20.0},
                "p50_gap_ms": 1.0,
            }
        ],
    }
    text = table(report)
    assert "| cpu | sick | 4,500 | 500.0 | 900.0 | 12,000 | **1.8x** | 4096 |" in text
    assert "| cpu | 10.0 / 14.0 | 11.0 / 20.0 | 1.0 |" in text
