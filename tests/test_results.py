"""Waiting for a result across Redis trouble (pure logic: the result object is scripted)."""

from __future__ import annotations

import time

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeout

from embedq.broker import results as broker
from embedq.broker.results import get_result


class ScriptedResult:
    """Stands in for ``AsyncResult``: ``get`` raises the scripted errors in turn; once the
    stored state has been read (``ready``) and the task is done, ``get`` returns at once."""

    def __init__(self, errors: list[Exception], done: bool = True) -> None:
        self.errors, self.done, self.cached, self.gets = errors, done, False, 0
        self.id = "scripted"

    def get(self, timeout: float) -> str:
        self.gets += 1
        if self.cached:
            return {"stored": 3}
        if self.errors:
            raise self.errors.pop(0)
        time.sleep(min(timeout, 0.05))
        raise CeleryTimeout("no message")

    def ready(self) -> bool:
        self.cached = self.done
        return self.done


@pytest.fixture(autouse=True)
def short_polls(monkeypatch):
    monkeypatch.setattr(broker, "RESULT_POLL_S", 0.05)
    monkeypatch.setattr(broker, "RECONNECT_PAUSE_S", 0.01)


def test_a_missed_result_message_is_found_by_reading_the_stored_state():
    # The pub/sub message never comes (celery#4857); the stored result is there.
    result = ScriptedResult([CeleryTimeout("missed")])
    assert get_result(result, timeout_s=5) == {"stored": 3}
    assert result.gets == 2


def test_a_redis_outage_is_waited_out():
    result = ScriptedResult([redis.ConnectionError("down"), redis.ConnectionError("down")])
    assert get_result(result, timeout_s=5) == {"stored": 3}


def test_a_task_that_never_finishes_times_out_at_its_limit():
    result = ScriptedResult([], done=False)
    started = time.monotonic()
    with pytest.raises(CeleryTimeout):
        get_result(result, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert result.gets >= 3, "polled in slices, not one long wait"


def test_an_outage_longer_than_the_timeout_raises_the_connection_error():
    result = ScriptedResult([redis.ConnectionError("down")] * 1000, done=False)
    with pytest.raises(redis.ConnectionError):
        get_result(result, timeout_s=0.2)


def test_ingest_sends_an_unanswered_task_once_more_then_reports_it(monkeypatch):
    from embedq.producer import bulk

    answers = [ScriptedResult([], done=False), ScriptedResult([CeleryTimeout("lost")])]
    published: list[tuple] = []

    def publish(sent):
        published.append(sent.args)
        return answers.pop(0)

    monkeypatch.setattr(bulk, "_publish", publish)
    summary = bulk.IngestSummary()
    inflight = bulk.InFlight(summary, timeout_s=0.2, on_progress=None)
    inflight.send(bulk.Sent(("c", ["batch"], None), {}, docs=3, texts=3))
    inflight.drain(None)
    assert published == [("c", ["batch"], None)] * 2, "sent twice, same arguments"
    assert (summary.resent, summary.failed, summary.stored) == (1, 0, 3)

    never = [ScriptedResult([], done=False), ScriptedResult([], done=False)]
    monkeypatch.setattr(bulk, "_publish", lambda sent: never.pop(0))
    summary = bulk.IngestSummary()
    inflight = bulk.InFlight(summary, timeout_s=0.2, on_progress=None)
    inflight.send(bulk.Sent(("c", ["batch"], None), {}, docs=3, texts=3))
    inflight.drain(None)
    assert (summary.resent, summary.failed) == (1, 3)
    assert "TimeoutError" in summary.failures[0]["reason"]


def test_a_tiny_timeout_is_kept():
    result = ScriptedResult([], done=False)
    started = time.monotonic()
    with pytest.raises(CeleryTimeout):
        get_result(result, timeout_s=0.0001)
    assert time.monotonic() - started < 0.05, "no floor longer than the caller asked for"
