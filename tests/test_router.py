"""Routing by live heartbeats: fallback to cpu, big batches to gpu, explicit queue wins."""

from __future__ import annotations

import time

import pytest

from embedq.broker.client import client_url
from embedq.keys import HEARTBEAT_EXPIRY_KEY, heartbeat_member
from embedq.ops.heartbeat import TTL_S, Heartbeat, read_heartbeats
from embedq.ops.registry import PRIOR_TEXTS_PER_S
from embedq.producer import router
from embedq.producer.router import QueueState, decide, read_states
from embedq.tasks import embed_texts
from tests.helpers import unique_texts, wait_until

FAST, SLOW = QueueState(1, 3000.0, 0), QueueState(1, 100.0, 0)


@pytest.mark.parametrize(
    ("n", "states", "expected"),
    [
        (500, {"cpu": SLOW}, ("cpu", "no_gpu_worker")),
        (1, {"gpu": FAST}, ("gpu", "no_cpu_worker")),
        (500, {"cpu": SLOW, "gpu": FAST}, ("gpu", "large_batch")),
        (1, {"cpu": SLOW, "gpu": FAST}, ("gpu", "gpu_sooner")),
        (1, {"cpu": SLOW, "gpu": SLOW}, ("cpu", "cpu_sooner")),
        (1, {"cpu": SLOW, "gpu": QueueState(1, 3000.0, 500)}, ("cpu", "cpu_sooner")),
        (500, {"cpu": SLOW, "gpu": QueueState(1, 3000.0, 50_000)}, ("cpu", "gpu_backlog")),
    ],
)
def test_decide(n, states, expected):
    assert decide(n, states) == expected


@pytest.fixture
def other_db(side_redis):
    """An empty Redis database of its own, for heartbeats written by hand."""
    from embedq.broker.client import connect

    client = connect(side_redis(12))
    yield client
    client.flushdb()


def test_heartbeats_drive_the_choice(other_db, runtime):
    cpu = Heartbeat(other_db, ["cpu"], "cpu@host", runtime.encoder, lambda: 0)
    cpu.beat()
    expires = other_db.zscore(HEARTBEAT_EXPIRY_KEY, heartbeat_member("cpu", "cpu@host"))
    assert 0 < expires - float(other_db.time()[0]) <= TTL_S + 1
    assert decide(1000, read_states(other_db)) == ("cpu", "no_gpu_worker")

    encoded = iter([0, 6000])
    gpu = Heartbeat(other_db, ["gpu"], "gpu@host", runtime.encoder, lambda: next(encoded))
    time.sleep(0.05)
    gpu.beat()
    states = read_states(other_db)
    assert states["gpu"].texts_per_s > states["cpu"].texts_per_s
    assert decide(1000, states) == ("gpu", "large_batch")
    gpu.stop()
    assert decide(1000, read_states(other_db)) == ("cpu", "no_gpu_worker")


def test_tasks_are_routed_and_counted(celery_worker, redis_client):
    wait_until(lambda: read_heartbeats(redis_client).get("gpu"), 10, 0.1, "a gpu heartbeat")
    time.sleep(router.CACHE_S)  # let the router read the fresh heartbeats
    before = dict(router.decisions)
    router._tally.flusher.flush()
    before_stored = {
        k: int(redis_client.hget("embedq:stats:router", k) or 0)
        for k in ("gpu:large_batch", "cpu:cpu_sooner", "cpu:explicit")
    }
    big = embed_texts.delay(unique_texts(80, "routed")).get(timeout=120)
    small = embed_texts.delay(["one short text"]).get(timeout=120)
    explicit = embed_texts.apply_async((["pinned"],), queue="cpu").get(timeout=120)
    assert big.shape == (80, 384) and small.shape == explicit.shape == (1, 384)
    delta = {k: v - before.get(k, 0) for k, v in router.decisions.items() if v != before.get(k, 0)}
    assert delta == {"gpu:large_batch": 1, "cpu:cpu_sooner": 1, "cpu:explicit": 1}
    # Redis gets the same counts, summed, within the flush interval (no HINCRBY per task).
    stored = lambda: {k: int(redis_client.hget("embedq:stats:router", k) or 0) for k in delta}  # noqa: E731
    wait_until(lambda: all(stored()[k] - before_stored[k] == 1 for k in delta), 5, 0.05, "counts")


def test_client_url_maps_sockets():
    assert client_url("redis+socket:///tmp/r.sock") == "unix:///tmp/r.sock"


# -- policy, lanes and weighting (issue 15) ------------------------------------------------

PRICED_CPU = QueueState(1, 100.0, 0, cost_per_hour=1.0)
PRICED_GPU = QueueState(1, 3000.0, 0, cost_per_hour=60.0)
DEADLINE_S = 1.0


@pytest.mark.parametrize(
    ("policy", "n", "states", "expected"),
    [
        # cpu costs 1/h for 100 texts/s (2.8e-6 per text), gpu 60/h for 3000 (5.6e-6).
        ("cheapest", 50, {"cpu": PRICED_CPU, "gpu": PRICED_GPU}, ("cpu", "cheapest")),
        # 500 texts take cpu 5 s > 1 s deadline: the next cheapest that meets it.
        ("cheapest", 500, {"cpu": PRICED_CPU, "gpu": PRICED_GPU}, ("gpu", "cheapest")),
        # cpu's backlog (10 tasks x 64 texts) breaks the deadline even for one text.
        (
            "cheapest",
            1,
            {"cpu": QueueState(1, 100.0, 10, 1.0), "gpu": PRICED_GPU},
            ("gpu", "cheapest"),
        ),
        # Nothing meets the deadline: the fastest rules decide.
        (
            "cheapest",
            50_000,
            {"cpu": PRICED_CPU, "gpu": PRICED_GPU},
            ("gpu", "large_batch"),
        ),
        # A queue with an unpriced worker is never "cheapest"; gpu priced and fast enough.
        ("cheapest", 50, {"cpu": SLOW, "gpu": PRICED_GPU}, ("gpu", "cheapest")),
        # No prices anywhere: fastest.
        ("cheapest", 50, {"cpu": SLOW, "gpu": FAST}, ("gpu", "gpu_sooner")),
        # A priced queue without live workers is not a candidate.
        (
            "cheapest",
            50,
            {"cpu": QueueState(0, 0.0, 0, 0.0), "gpu": FAST},
            ("gpu", "no_cpu_worker"),
        ),
        # fastest ignores prices.
        ("fastest", 50, {"cpu": PRICED_CPU, "gpu": PRICED_GPU}, ("gpu", "gpu_sooner")),
    ],
)
def test_decide_policy(policy, n, states, expected):
    assert router.decide_policy(policy, n, states, DEADLINE_S) == expected


A, B, SHARED = "gpu.gpu-0@h", "gpu.gpu-1@h", "gpu"


@pytest.mark.parametrize(
    ("lanes", "n", "expected"),
    [
        # No backlog: weights follow texts/s (1/eta = speed / n).
        ([router.Lane(A, 300.0, 0), router.Lane(B, 100.0, 0)], 10, {A: 30.0, B: 10.0}),
        # Backlog: 2 tasks x 64 texts waiting on A lower its weight below B's.
        ([router.Lane(A, 300.0, 2), router.Lane(B, 100.0, 0)], 10, {A: 300 / 138, B: 10.0}),
        # A direct queue at the cap is left out; the shared queue never is.
        (
            [router.Lane(A, 300.0, router.DIRECT_MAX_DEPTH), router.Lane(SHARED, 50.0, 99)],
            64,
            {SHARED: 50 / (99 * 64 + 64)},
        ),
        ([], 10, {}),
    ],
)
def test_lane_weights(lanes, n, expected):
    assert router.lane_weights(SHARED, lanes, n) == pytest.approx(expected)


def test_smooth_pick_follows_weights_interleaved():
    scores: dict[str, float] = {}
    picks = [router.smooth_pick({"fast": 3.0, "slow": 1.0}, scores) for _ in range(8)]
    assert picks == ["fast", "fast", "slow", "fast"] * 2
    # A lane that disappears (its worker stopped beating) loses its score at once.
    assert router.smooth_pick({"slow": 1.0}, scores) == "slow" and set(scores) == {"slow"}


def test_spread_sends_a_slower_gpu_less_work():
    state = QueueState(2, 400.0, 0, lanes=(router.Lane(A, 300.0, 0), router.Lane(B, 100.0, 0)))
    chooser = router.Router()
    picks = [chooser._spread("gpu", state, 64) for _ in range(40)]
    assert picks.count(A) == 30 and picks.count(B) == 10
    assert chooser._spread("gpu", QueueState(1, 100.0, 0), 64) == "gpu"  # no lanes
    assert chooser._spread("cpu", None, 64) == "cpu"


def test_direct_queues_in_simulated_heartbeats(other_db, runtime):
    """Heartbeats of two device workers and a plain one: lanes, depths and price."""
    beats = []
    for name, price in (("gpu-0@h", 2.0), ("gpu-1@h", 2.0), ("plain@h", 1.0)):
        own = [f"gpu.{name}"] if name.startswith("gpu-") else []
        beat = Heartbeat(other_db, ["gpu", *own], name, runtime.encoder, lambda: 0)
        beat.about["cost_per_hour"] = price
        beat.beat()
        beats.append(beat)
    assert "direct_queue" not in beats[2].about
    assert beats[0].about["direct_queue"] == A and beats[0].queues == ["gpu"]
    other_db.rpush(A, "task-1", "task-2")
    other_db.rpush("gpu", "task-3")
    state = read_states(other_db)["gpu"]
    assert state.workers == 3 and state.depth == 3 and state.cost_per_hour == 5.0
    cpu_speed = PRIOR_TEXTS_PER_S["cpu"]
    assert set(state.lanes) == {
        router.Lane(A, cpu_speed, 2),
        router.Lane(B, cpu_speed, 0),
        router.Lane("gpu", cpu_speed, 1),
    }
    assert read_heartbeats(other_db).keys() == {"gpu"}  # no queue named after a direct one
    from embedq.ops.status import build_report, render
    from embedq.settings import get_settings

    report = build_report(other_db, None, get_settings())
    assert report.queue_depths == {"cpu": 0, "gpu": 3}  # own queues counted in their queue
    assert "gpu-0@h (cpu, " in render(report) and "2 waiting on its own queue" in render(report)
    beats[2].about["cost_per_hour"] = None
    beats[2].beat()
    assert read_states(other_db)["gpu"].cost_per_hour is None
    for beat in beats:
        beat.stop()


def test_status_names_tasks_stranded_on_a_stopped_workers_queue(other_db, runtime):
    from embedq.ops.status import build_report, read_stranded, read_workers
    from embedq.settings import get_settings

    beat = Heartbeat(other_db, ["gpu", A], "gpu-0@h", runtime.encoder, lambda: 0)
    beat.beat()
    other_db.rpush(A, "task-1", "task-2")
    assert read_stranded(other_db, read_workers(other_db)) == {}  # its worker is alive
    # Its heartbeat expires (as when the worker dies): score it in the past.
    now = float(other_db.time()[0])
    other_db.zadd(HEARTBEAT_EXPIRY_KEY, {heartbeat_member("gpu", "gpu-0@h"): now - 5})
    assert read_stranded(other_db, read_workers(other_db)) == {A: 2}
    said = "\n".join(build_report(other_db, None, get_settings()).alerts)
    assert f"2 tasks wait on '{A}', the own queue of a worker that stopped beating" in said
    beat.beat()  # the supervisor restarted it: same name, same queue
    assert read_stranded(other_db, read_workers(other_db)) == {}
    beat.stop()


def test_an_explicit_queue_is_kept_and_its_lane_weighed(monkeypatch):
    chooser = router.Router()
    lanes = (router.Lane(A, 100.0, 0), router.Lane(B, 100.0, 0))
    chooser._states = {"gpu": QueueState(2, 200.0, 0, lanes=lanes), "cpu": SLOW}
    # The heartbeats these states were read from: a live worker on each queue.
    chooser._beats = {q: [{"hostname": f"{q}@h", "dim": 384}] for q in ("cpu", "gpu")}
    chooser._read_at = time.monotonic() + 3600  # this state stays current
    monkeypatch.setattr(router, "router", chooser)
    routed = [
        router.route_task("embedq.embed_texts", (["a text"],), {}, {"queue": "gpu"})
        for _ in range(2)
    ]
    assert routed == [{"queue": A}, {"queue": B}]
    # Through Celery's own router, whose merge puts the caller's options over the route.
    from embedq.app import app

    options = app.amqp.router.route({"queue": "gpu"}, "embedq.embed_texts", (["a"],), {})
    assert options["queue"].name == A
    # A queue without lanes keeps Celery's own routing of the explicit queue.
    assert router.route_task("embedq.embed_texts", (["a"],), {}, {"queue": "cpu"}) is None


def test_a_retry_from_a_workers_own_queue_goes_to_the_shared_queue():
    from celery.app.task import Context

    from embedq.tasks import embed_texts

    def retried_from(routing_key: str) -> str:
        request = Context(
            args=(["a"],), kwargs={}, delivery_info={"exchange": "", "routing_key": routing_key}
        )
        return embed_texts.signature_from_request(request).options["queue"]

    # That worker may be the one whose device failed: another one must get the retry.
    assert retried_from("gpu.gpu-0@host.example.com") == "gpu"
    assert retried_from("cpu") == "cpu"


def test_a_model_s_tasks_are_spread_only_over_lanes_whose_worker_serves_it():
    l3 = ({"name": "l3", "model_id": "minilm-l3@abc"},)
    default = ({"name": "all-MiniLM-L6-v2", "model_id": "all-MiniLM-L6-v2@def"},)
    chooser = router.Router()
    lanes = (router.Lane(A, 100.0, 0, default), router.Lane(B, 100.0, 0, l3))
    chooser._states = {"gpu": QueueState(2, 200.0, 0, lanes=lanes)}
    chooser._read_at = time.monotonic() + 3600  # this state stays current
    assert {chooser.lane("gpu", 1, "l3") for _ in range(6)} == {B}
    assert {chooser.lane("gpu", 1, "minilm-l3@abc") for _ in range(4)} == {B}
    assert {chooser.lane("gpu", 1) for _ in range(6)} == {A, B}
    assert chooser.lane("gpu", 1, "e5-small") == "gpu", "no lane serves it: the shared queue"
