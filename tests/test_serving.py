"""A queue (or model) no live worker serves is refused at once, through the HTTP API (503)
and the task API (a named error), and nothing is left queued; an empty request is answered
from the heartbeats, with no task."""

from __future__ import annotations

import json
from typing import Any

import pytest

from embedq.errors import NoWorkerError, UnknownModelError
from embedq.ops.heartbeat import Heartbeat
from embedq.producer.serving import require_serving, served_dim, workers_of
from tests.helpers import isolated_env, run_client

CLIENT = """
import json, time
from fastapi.testclient import TestClient
from embedq.api import create_app
from embedq.broker.client import shared_client
from embedq.producer import embed
from embedq.settings import get_settings
from embedq.tasks import embed_texts

out = {}
client = TestClient(create_app(get_settings().model_copy(update={"api_keys": "k"})))
auth = {"Authorization": "Bearer k"}
began = time.monotonic()
answer = client.post("/embed", json={"texts": ["x"], "queue": "gpu"}, headers=auth)
out["api"] = [answer.status_code, answer.json()["error"], time.monotonic() - began]
answer = client.post("/embed", json={"texts": [], "queue": "cpu"}, headers=auth)
out["api_empty"] = [answer.status_code, answer.json()["dim"], answer.json()["vectors"]]
answer = client.post("/v1/embeddings", json={"input": []}, headers=auth)
out["openai_empty"] = [answer.status_code, answer.json()["data"]]
calls = {
    "delay": lambda: embed_texts.apply_async((["x"],), queue="gpu"),
    "producer": lambda: embed(["x"], queue="gpu", timeout_s=5),
    "model": lambda: embed_texts.apply_async((["x"],), {"model": "nope"}, queue="cpu"),
}
for name, call in calls.items():
    try:
        call()
        out[name] = "sent"
    except Exception as exc:
        out[name] = [type(exc).__name__, str(exc)]
out["delay_empty"] = list(embed_texts.delay([]).get(timeout=1).shape)
out["producer_empty"] = list(embed([]).shape)
out["queued_before"] = {q: shared_client().llen(q) for q in ("cpu", "gpu")}
embed_texts.apply_async((["served"],), queue="cpu")  # the control: a served queue takes it
out["queued"] = {q: shared_client().llen(q) for q in ("cpu", "gpu")}
print(json.dumps(out))
"""


def test_an_unserved_queue_is_refused_at_once_and_nothing_is_queued(tmp_path, side_redis, runtime):
    from embedq.broker.client import connect

    url = side_redis(13)
    beat = Heartbeat(connect(url), ["cpu"], "cpu-only@test", runtime.encoder, lambda: 0)
    beat.start()  # a live cpu worker's heartbeat, as a worker publishes it; no gpu worker
    try:
        out = json.loads(run_client(isolated_env(tmp_path, url), CLIENT))
    finally:
        beat.stop()
    status, error, took = out["api"]
    assert status == 503 and error["type"] == "NoWorkerError" and "'gpu'" in error["message"]
    assert took < 1.0, f"{took:.2f} s"
    assert out["api_empty"] == [200, 384, []] and out["openai_empty"] == [200, []]
    assert out["delay"][0] == out["producer"][0] == "NoWorkerError"
    assert out["model"][0] == "UnknownModelError"
    assert out["delay_empty"] == out["producer_empty"] == [0, 384]
    assert out["queued_before"] == {"cpu": 0, "gpu": 0}, "no task for refused or empty calls"
    assert out["queued"] == {"cpu": 1, "gpu": 0}


class _Beats:
    """A router's heartbeats as read (pure logic: no Redis)."""

    def __init__(self, beats: dict[str, list[dict[str, Any]]]) -> None:
        self.beats = beats

    def heartbeats(self, fresh: bool = False) -> dict[str, list[dict[str, Any]]]:
        return self.beats


def _worker(name: str, *models: tuple[str, int], direct: str | None = None) -> dict[str, Any]:
    listed = [{"name": m, "model_id": f"{m}@1", "dim": d} for m, d in models]
    return {"hostname": name, "dim": listed[0]["dim"], "models": listed, "direct_queue": direct}


CPU = _worker("cpu@a", ("minilm", 384))
GPU = _worker("gpu-0@b", ("minilm", 384), ("e5", 768), direct="gpu.gpu-0@b")


@pytest.mark.parametrize(
    ("beats", "queue", "model", "raised"),
    [
        ({"cpu": [CPU]}, "cpu", None, None),
        ({"cpu": [CPU]}, "gpu", None, NoWorkerError),
        ({"cpu": [CPU], "gpu": [GPU]}, "gpu.gpu-0@b", "e5", None),
        ({"cpu": [CPU], "gpu": [GPU]}, "cpu", "e5", NoWorkerError),
        ({"cpu": [CPU]}, "cpu", "e5", UnknownModelError),
        ({"cpu": [CPU]}, None, "e5", UnknownModelError),
        ({"cpu": [], "gpu": []}, "gpu", "e5", None),  # nothing alive: it waits, as in a restart
    ],
    ids=["served", "unserved", "direct", "model-elsewhere", "model-nowhere", "any", "none-alive"],
)
def test_who_serves_what(beats, queue, model, raised):
    if raised is None:
        require_serving(_Beats(beats), queue, model)
    else:
        with pytest.raises(raised):
            require_serving(_Beats(beats), queue, model)


def test_the_dimension_of_an_empty_answer_is_the_serving_worker_s():
    beats = {"cpu": [CPU], "gpu": [GPU]}
    assert served_dim(beats, None, "e5") == 768 and served_dim(beats, "cpu", None) == 384
    assert served_dim(beats, "cpu", "e5") is None
    assert [w["hostname"] for w in workers_of(beats, "gpu.gpu-0@b")] == ["gpu-0@b"]
