"""The Celery application: ``celery -A embedq.app worker -Q cpu``.

Broker and result backend are the same Redis (see :mod:`embedq.broker`); the wire format is
msgpack with raw float32 vectors (see :mod:`embedq.codec`). Nothing here touches a model
or CUDA: that happens in the worker process, after it starts.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from embedq import codec
from embedq.broker.results import register_backend
from embedq.broker.tls import connection_tls
from embedq.broker.traffic import REDIS_PRIORITY_STEPS
from embedq.broker.transport import register_transport
from embedq.broker.url import redis_url
from embedq.settings import QUEUES, get_settings

PUBLISH_RETRY = {"max_retries": 15, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}

codec.register_serializer()
register_transport()
register_backend()

app = Celery("embedq", include=["embedq.tasks", "embedq.worker.signals"])


def broker_transport_options(restore_s: int) -> dict[str, Any]:
    """kombu's Redis options: a dead worker's tasks back on their queue within ~1.25 x
    ``restore_s`` (EMBEDQ_DEAD_WORKER_RESTORE_S).

    The visibility timeout can be this short only because every live worker renews the
    delivery time of the tasks it holds every few seconds (:mod:`embedq.worker.leases`):
    kombu then restores only the tasks of workers that stopped renewing.
    """
    return {
        "visibility_timeout": restore_s,
        # kombu's sweep for expired deliveries: every quarter timeout, at most every 10 s
        # (its default looks only every 100 s: 10 s interval x throttle 10).
        "unacked_restore_interval": max(1.0, min(10.0, restore_s / 4)),
        "unacked_restore_throttle": 1,
        # A worker killed inside a sweep leaves the sweep's lock behind: kombu's 300 s
        # default would hold every restore back that long.
        "unacked_mutex_expire": max(5, restore_s // 2),
        # Two Redis lists per queue, one per traffic class (embedq.broker.traffic); workers
        # take from them interactive first (embedq.broker.fetch).
        "priority_steps": REDIS_PRIORITY_STEPS,
    }


def _config() -> dict[str, Any]:
    settings = get_settings()
    url = redis_url()
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": broker_transport_options(settings.dead_worker_restore_s),
        # Results are not consumed through kombu's QoS: no visibility timeout applies there.
        "result_backend_transport_options": {},
        # rediss:// URLs: TLS options for both (certificates and host names checked).
        "broker_use_ssl": connection_tls(url) or False,
        "redis_backend_use_ssl": connection_tls(url) or False,
        "broker_connection_retry_on_startup": True,
        # Keep retrying through a Redis restart or failover instead of giving up after 100.
        "broker_connection_max_retries": None,
        # Publishing waits out a short Redis outage (~30 s) before it raises.
        "task_publish_retry_policy": PUBLISH_RETRY,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        # TCP only: the embedded Redis listens on a Unix socket, which has no keepalive.
        "redis_socket_keepalive": not url.startswith("redis+socket://"),
        "redis_backend_health_check_interval": 10,
        # With late acks, a running task whose broker connection dropped is cancelled and
        # redelivered (its writes are idempotent) rather than acked on a dead channel.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_serializer": codec.SERIALIZER,
        "result_serializer": codec.SERIALIZER,
        "accept_content": [codec.SERIALIZER, "json"],
        "result_accept_content": [codec.SERIALIZER, "json"],
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": settings.default_queue,
        "task_routes": ("embedq.producer.router.route_task",),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        # A STARTED write per task costs latency; sub-second tasks gain nothing from it.
        "task_track_started": False,
        "result_expires": settings.result_expires_s,
        "result_extended": False,
        # One thread pool feeds one batcher, which is where cross-task batching happens.
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_prefetch_multiplier": 1,
        # Events cost a publish per task; Flower switches them on while it runs.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "embedq-rebuild-index": {
                "task": "embedq.rebuild_index",
                "schedule": float(settings.index_rebuild_s),
            }
        },
    }


# A promise: evaluated on first use of the config, so importing embedq never probes Redis.
app.add_defaults(_config)
