"""Traffic classes (embedq.broker.traffic): how a task gets its class, the order a worker
fetches in, and how its batcher serves interactive texts first, bulk jobs in turn and
deadlines. Scheduling is pure logic: a fake encoder whose batches take time in proportion
to their padded tokens records what it was given and when; the worker tests use the real
model and real Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest

from embedq.broker import traffic
from embedq.broker.traffic import Traffic, choose, redis_list, stamp
from embedq.errors import DeadlineExceededError, InvalidInputError
from embedq.worker.batcher import Batcher
from embedq.worker.pool import Pool, Request, Slot
from tests.helpers import DictCache, FakeEncoder

# Token ids of interactive texts start here (bulk ones stay below).
QUERY = 1_000_000


class SlowEncoder(FakeEncoder):
    """Each batch takes ``per_token_s`` per padded token; every batch is logged with its
    start time, the first token id of each text and its padded cost."""

    max_batch_tokens = 2048
    max_seq_tokens = 64

    def __init__(self, per_token_s: float = 20e-6) -> None:
        super().__init__()
        self.per_token_s = per_token_s
        self.log: list[tuple[float, list[int], int]] = []
        self.lock = threading.Lock()

    def embed_ids(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        padded = max(len(x) for x in ids) * len(ids)
        with self.lock:
            self.log.append((time.monotonic(), [x[0] for x in ids], padded))
        time.sleep(padded * self.per_token_s)
        return super().embed_ids(ids, normalize)

    def seen(self) -> set[int]:
        """The first token id of every text encoded so far."""
        with self.lock:
            return {i for _, ids, _ in self.log for i in ids}


def _bulk(first: int, n: int, words: int = 40) -> list[str]:
    return [f"{first + i} " + "w " * (words - 1) for i in range(n)]


def _query(i: int) -> list[str]:
    return [f"{QUERY + i} a short query"]


@pytest.fixture
def slow() -> SlowEncoder:
    return SlowEncoder()


def _batcher(encoder: SlowEncoder, **options: object) -> Batcher:
    settings = {"wait_s": 0.0, "max_batch_size": 64, "interactive_batch_s": 0.01}
    return Batcher(encoder, DictCache(), **(settings | options))  # type: ignore[arg-type]


# -- how a task gets its class -----------------------------------------------------------


def test_a_class_is_explicit_else_the_tasks_default_else_by_size():
    limit = traffic.get_settings().interactive_max_texts
    assert choose("bulk", Traffic.INTERACTIVE, 1) is Traffic.BULK
    assert choose(None, Traffic.BULK, 1) is Traffic.BULK
    assert choose(None, None, limit) is Traffic.INTERACTIVE
    assert choose(None, None, limit + 1) is Traffic.BULK
    with pytest.raises(InvalidInputError, match="traffic must be one of interactive, bulk"):
        choose("urgent", None, 1)


def test_a_stamp_carries_priority_headers_and_the_deadline():
    options: dict[str, object] = {}
    stamp(options, Traffic.INTERACTIVE, "job-1", None)
    assert options["priority"] == 0 and options["expires"] == pytest.approx(300.0)
    headers = options["headers"]
    assert headers[traffic.CLASS_HEADER] == "interactive"  # type: ignore[index]
    assert headers[traffic.JOB_HEADER] == "job-1"  # type: ignore[index]
    bulk: dict[str, object] = {"expires": 5}
    stamp(bulk, Traffic.BULK, None, 1.0)
    assert bulk["priority"] == 9 and bulk["expires"] == 5, "the caller's expires wins"
    assert traffic.carried(bulk) is Traffic.BULK, "a retry keeps its class"
    assert "expires" not in _stamped(Traffic.BULK), "bulk has no default deadline"
    assert "expires" not in _stamped(Traffic.INTERACTIVE, stores=True), "nor a write"
    assert "expires" not in _stamped(Traffic.INTERACTIVE, deadline_s=0), "0: none"


def _stamped(
    kind: Traffic, stores: bool = False, deadline_s: float | None = None
) -> dict[str, object]:
    options: dict[str, object] = {}
    stamp(options, kind, None, deadline_s, stores)
    return options


def test_each_class_has_the_list_kombu_names_for_its_priority():
    from kombu.transport.redis import Channel

    for kind, priority in traffic.REDIS_PRIORITY.items():
        suffix = f"{Channel.sep}{priority}" if priority else ""
        assert redis_list("cpu", kind) == f"cpu{suffix}"
    assert Channel.sep == traffic.REDIS_SEP


# -- the pool ------------------------------------------------------------------------------


def _slots(pool: Pool, request: Request, lengths: list[int]) -> list[Slot]:
    slots = []
    for i, n in enumerate(lengths):
        slot = Slot(f"{request.job}-{id(request)}-{i}", "t", True, [request], ids=[i] * n)
        request.slots.append(slot)
        pool.put(slot)
        slots.append(slot)
    return slots


def test_bulk_jobs_take_turns_and_a_round_respects_its_budget():
    pool = Pool()
    a, b = Request([], True, Traffic.BULK, "a"), Request([], True, Traffic.BULK, "b")
    _slots(pool, a, [10] * 6)
    _slots(pool, b, [10] * 2)
    taken = pool.take(40, 64, Traffic.BULK, padded=False)
    assert [s.waiters[0].job for s in taken] == ["a", "b", "a", "b"]
    assert [s.waiters[0].job for s in pool.take(1000, 64, Traffic.BULK)] == ["a"] * 4
    assert not pool.has_bulk()


def test_an_interactive_request_pulls_a_shared_bulk_text_into_its_line():
    pool = Pool()
    bulk = Request([], True, Traffic.BULK, "big")
    (shared,) = _slots(pool, bulk, [5])
    query = Request([], True, Traffic.INTERACTIVE)
    shared.waiters.append(query)
    pool.promote(shared)
    assert pool.take(100, 8, Traffic.INTERACTIVE) == [shared]
    assert pool.take(100, 8, Traffic.BULK) == [], "taken once"


def test_an_expired_request_stops_waiting_and_its_lone_texts_are_dropped():
    pool = Pool()
    late = Request([], True, Traffic.INTERACTIVE, deadline=time.monotonic() - 1)
    kept = Request([], True, Traffic.INTERACTIVE)
    _alone, shared = _slots(pool, late, [3, 3])
    shared.waiters.append(kept)
    pool.requests |= {late, kept}
    assert pool.expire() == [late]
    with pytest.raises(DeadlineExceededError):
        late.future.result(timeout=0)
    assert pool.take(100, 8, Traffic.INTERACTIVE) == [shared], "nobody waits for the other"


# -- the batcher -------------------------------------------------------------------------


def test_an_interactive_text_waits_at_most_for_the_bulk_batch_in_progress(slow):
    batcher = _batcher(slow)
    try:
        bulk = batcher.submit(_bulk(0, 800), True, Traffic.BULK, "ingest")
        time.sleep(0.3)  # bulk rounds of full batches (2048 tokens, ~40 ms each) run
        sent = time.monotonic()
        batcher.submit(_query(0), True).result(timeout=10)
        with slow.lock:
            before = [t for t, ids, _ in slow.log if t >= sent and QUERY not in ids]
            mine = next(t for t, ids, _ in slow.log if QUERY in ids)
        assert [t for t in before if t < mine] in ([], before[:1]), "at most one bulk batch"
        assert not bulk.done()
        bulk.result(timeout=60)
    finally:
        batcher.close()


def test_bulk_batches_are_cut_short_while_interactive_traffic_is_present(slow):
    batcher = _batcher(slow)
    try:
        bulk = batcher.submit(_bulk(0, 600), True, Traffic.BULK, "ingest")
        time.sleep(0.2)
        for i in range(10):
            batcher.submit(_query(i), True).result(timeout=10)
            time.sleep(0.01)
        mark = time.monotonic()
        time.sleep(0.2)
        with slow.lock:
            full = [p for t, ids, p in slow.log if ids[0] < QUERY][:2]
            cut = [p for t, ids, p in slow.log if t > mark and ids[0] < QUERY]
        assert min(full) > 1800, f"alone, bulk batches fill the budget: {full}"
        # ~0.01 s at 50,000 tokens/s: about 500 padded tokens, one full-length text at least.
        assert cut and max(cut) <= 1000, cut
        bulk.result(timeout=60)
    finally:
        batcher.close()


def test_two_bulk_jobs_share_the_encoder_in_turn(slow):
    batcher = _batcher(slow)
    try:
        large = [batcher.submit(_bulk(i * 100, 100), True, Traffic.BULK, "large") for i in range(8)]
        small = batcher.submit(_bulk(10_000, 100), True, Traffic.BULK, "small")
        small.result(timeout=60)
        done = sum(f.done() for f in large)
        assert done <= 2, f"the small job waited for {done} of the large job's 8 requests"
        wait(large, timeout=60)
    finally:
        batcher.close()


def test_a_request_past_its_deadline_is_answered_so_and_never_encoded(slow):
    batcher = _batcher(slow)
    try:
        bulk = batcher.submit(_bulk(0, 400), True, Traffic.BULK, "ingest")
        late = batcher.submit(_bulk(50_000, 50), True, Traffic.BULK, "other", time.monotonic())
        with pytest.raises(DeadlineExceededError):
            late.result(timeout=10)
        bulk.result(timeout=60)
        assert not {i for i in slow.seen() if i >= 50_000}, "none of its texts was encoded"
        assert batcher.stats.expired == 1
    finally:
        batcher.close()


def test_bulk_keeps_its_minimum_share_under_sustained_interactive_load(slow):
    batcher = _batcher(slow, bulk_min_share=0.2)
    stop = threading.Event()

    def flood() -> None:
        # Interactive texts wait at every moment: three requests of 32 in flight.
        pending, i = [], 0
        while not stop.is_set():
            pending.append(batcher.submit([_query(i + k)[0] for k in range(32)], True))
            i += 32
            if len(pending) >= 3:
                pending.pop(0).result(timeout=10)

    flooding = threading.Thread(target=flood)
    try:
        flooding.start()
        time.sleep(0.1)
        began = time.monotonic()
        batcher.submit(_bulk(0, 100), True, Traffic.BULK, "ingest").result(timeout=30)
        ended = time.monotonic()
    finally:
        stop.set()
        flooding.join()
        batcher.close()
    with slow.lock:
        tokens = dict.fromkeys(Traffic, 0)
        for at, ids, padded in slow.log:
            if began <= at <= ended:
                tokens[Traffic.INTERACTIVE if ids[0] >= QUERY else Traffic.BULK] += padded
    share = tokens[Traffic.BULK] / sum(tokens.values())
    assert tokens[Traffic.INTERACTIVE] > 0 and share >= 0.1, tokens


# -- a real worker -----------------------------------------------------------------------

CLIENT = """
import json, sys, time
from pathlib import Path
from celery.exceptions import TimeoutError
from embedq.tasks import embed_texts
tag = sys.argv[1]
late = embed_texts.apply_async(([f"{tag} nobody waits for me"],), deadline_s=1)
try:
    late.get(timeout=1)
    gave_up = False
except TimeoutError:
    gave_up = True
bulk = [embed_texts.apply_async(([f"{tag} bulk {i} {j}" for j in range(64)],), traffic="bulk")
        for i in range(12)]
query = embed_texts.delay([f"{tag} a query"])
Path(sys.argv[2]).write_text("sent")
assert query.get(timeout=300).shape == (1, 384)
ahead = sum(r.ready() for r in bulk)
for r in bulk:
    r.get(timeout=300)
print(json.dumps({"gave_up": gave_up, "bulk_ahead": ahead, "late": late.state, "id": late.id}))
"""


def test_a_worker_takes_interactive_first_and_drops_what_expired(tmp_path, side_redis):
    import json
    import subprocess
    import sys
    import uuid

    from embedq.broker.client import connect
    from embedq.keys import vector_key
    from embedq.ops.backlog import read_counts
    from embedq.ops.status import build_report, render
    from embedq.settings import Settings
    from tests.helpers import ROOT, isolated_env, wait_until, workers

    url = side_redis(9)
    environ = isolated_env(tmp_path, url, EMBEDQ_BULK_MAX_TASKS="2")
    tag, sent = uuid.uuid4().hex[:8], tmp_path / "sent"
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, tag, str(sent)],
        env=environ,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Everything is queued before any worker runs; the worker comes 3 s after the send.
    wait_until(sent.exists, 120, 0.1, "the client's tasks")
    time.sleep(2.0)
    with workers(environ, [tmp_path / "worker.log"], ready=False):
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, err[-3000:]
        found = json.loads(out.strip().splitlines()[-1])
        redis = connect(url)
        # Workers write their counts a few times a second.
        wait_until(lambda: read_counts(redis).get("done:cpu:bulk") == 12, 10, 0.1, "counts")
        counts = wait_until(lambda: read_counts(redis).get("expired:cpu:interactive"), 10, 0.1)
        model_id = json.loads(redis.hvals("embedq:hb:payloads")[0])["model_id"]
        report = build_report(redis, None, Settings(redis_url=url))
    rows = {(r["queue"], r["traffic"]): r for r in report.traffic}
    assert rows["cpu", "bulk"]["done"] == 12 and rows["cpu", "interactive"]["done"] == 1
    assert rows["cpu", "interactive"]["expired"] == 1
    assert rows["cpu", "bulk"]["started"] == 12 and rows["cpu", "bulk"]["wait_p99_s"] > 0
    assert "cpu interactive: 0 waiting, backlog 0 s" in render(report)
    # Its caller got its timeout; the worker dropped it, counted, never encoded.
    assert found["gave_up"] and found["late"] == "REVOKED" and counts == 1
    assert not redis.exists(vector_key(model_id, True, f"{tag} nobody waits for me"))
    assert redis.exists(vector_key(model_id, True, f"{tag} a query")), "what ran is cached"
    # Taken as a slot freed: after at most EMBEDQ_BULK_MIN_TASKS (2) bulk tasks began.
    assert found["bulk_ahead"] <= 4, found


def _waits(kind: str) -> float:
    """How many tasks of ``kind`` this process's (in-process) worker has started."""
    from embedq.ops.metrics import TASK_WAIT

    return sum(
        s.value
        for m in TASK_WAIT.collect()
        for s in m.samples
        if s.name.endswith("_count") and s.labels.get("class") == kind
    )


def test_callers_choose_a_class_and_a_wrong_one_is_refused_before_sending(celery_worker):
    from fastapi.testclient import TestClient

    from embedq.api import create_app
    from embedq.producer import embed
    from embedq.settings import get_settings
    from embedq.tasks import embed_texts
    from tests.helpers import unique_texts

    with pytest.raises(InvalidInputError, match="traffic must be one of"):
        embed_texts.apply_async((["x"],), traffic="urgent")
    before = _waits("bulk"), _waits("interactive")
    assert embed(unique_texts(3, "explicit bulk"), traffic="bulk").shape == (3, 384)
    api = TestClient(create_app(get_settings().model_copy(update={"api_keys": "k"})))
    auth = {"Authorization": "Bearer k"}
    bulk = api.post("/embed", json={"texts": ["x y"]}, headers=auth | {"X-Embedq-Traffic": "bulk"})
    assert bulk.status_code == 200, bulk.text
    query = api.post("/v1/embeddings", json={"input": "a query"}, headers=auth)
    assert query.status_code == 200, query.text
    wrong = api.post("/embed", json={"texts": ["x"], "traffic": "urgent"}, headers=auth)
    assert wrong.status_code == 422
    assert (_waits("bulk") - before[0], _waits("interactive") - before[1]) == (2, 1)


def test_an_abandoned_api_request_stops_costing_encodes_and_others_are_served(
    celery_worker, runtime
):
    """Issue 24's row: one /embed of 2,048 long texts used to keep the worker busy for a
    minute after its 504, while every other caller timed out too (here 1,000, the tests'
    EMBEDQ_MAX_TEXTS_PER_TASK, of ~250 tokens: ~30 s of fp32 encoding), through a real
    ``embedq api`` process answered by the session's worker."""
    import os

    import httpx

    from embedq.tools.interactive import api_server
    from tests.helpers import unique_texts, wait_until

    long_texts = [f"{t} " + "word " * 240 for t in unique_texts(1000, "abandoned")]
    answers: list[int] = []
    with api_server(dict(os.environ) | {"EMBEDQ_API_TIMEOUT_S": "3"}) as url:
        api = httpx.Client(base_url=url, timeout=60)
        # The first answers (the worker's first batch, the API's tokenizer) may take 3 s.
        warm = lambda: api.post("/v1/embeddings", json={"input": "warm"}).status_code == 200  # noqa: E731
        wait_until(warm, 60, 0.1, "a first answer")
        encoded_before = runtime.batcher.stats.texts_encoded

        def big() -> None:
            answers.append(api.post("/embed", json={"texts": long_texts}).status_code)

        sender = threading.Thread(target=big)
        sender.start()
        others = []
        for text in unique_texts(10, "meanwhile"):
            began = time.monotonic()
            reply = api.post("/v1/embeddings", json={"input": text})
            others.append((reply.status_code, round(time.monotonic() - began, 3)))
            time.sleep(0.2)
        sender.join()
    time.sleep(2.0)  # a round in flight at the deadline finishes
    settled = runtime.batcher.stats.texts_encoded
    time.sleep(3.0)
    print(f"abandoned: {settled - encoded_before} of 1000 encoded; others {others}")
    assert answers == [504]
    assert all(status == 200 for status, _ in others), others
    assert runtime.batcher.stats.texts_encoded == settled, "nothing more encoded for it"
    assert settled - encoded_before < 500, "most abandoned texts were never encoded"
