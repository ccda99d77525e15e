"""The Celery app of distributed mode: queues, routing and the reliability settings.

``celery -A workers.app worker`` (or ``rapbot worker``) runs a worker on the module-level
:data:`app`; bots build their own with :func:`create_app` and send tasks by name, so they never
import the engine. Queues: ``gpu`` for model work, ``cpu`` for store-only work.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from engine.operations import CPU, GPU, OPERATIONS
from rapbot.settings import WorkerSettings, is_redis_url, load_settings


def task_name(operation: str) -> str:
    return f"rapbot.{operation}"


def _tasks_on(queue: str) -> tuple[str, ...]:
    """The operations (and streaming variants) of :data:`engine.operations.OPERATIONS` that
    run on ``queue``."""
    names: list[str] = []
    for declared in OPERATIONS.values():
        if declared.queue == queue:
            names += [declared.name, declared.stream_name] if declared.streams else [declared.name]
    return tuple(names)


# Task names are part of the wire protocol between bots and workers.
MODEL_TASKS = _tasks_on(GPU)
STORE_TASKS = _tasks_on(CPU)
PING = "rapbot.ping"


def task_routes(settings: WorkerSettings) -> dict[str, dict[str, str]]:
    """Model work → the gpu queue; work that only touches the store → the cpu queue."""
    routes = {task_name(op): {"queue": settings.gpu_queue} for op in MODEL_TASKS}
    routes.update({task_name(op): {"queue": settings.cpu_queue} for op in STORE_TASKS})
    return routes


def publish_retry_policy(total_s: float) -> dict[str, float | int]:
    """kombu's retry policy (0 s, 0.5 s, then 1 s apart) bounded to about ``total_s``."""
    step, cap = 0.5, 1.0
    waited, retries = 0.0, 0
    while waited < total_s:
        waited += min(retries * step, cap)
        retries += 1
    return {"max_retries": retries, "interval_start": 0, "interval_step": step, "interval_max": cap}


def create_app(
    settings: WorkerSettings | None = None, *, main: str = "rapbot", client: bool = False
) -> Celery:
    """The Celery app; ``client=True`` for a bot's (it fails fast where a worker persists)."""
    if settings is None:
        settings = load_settings()
    queues = (settings.gpu_queue, settings.cpu_queue)
    app = Celery(main, include=["workers.tasks"])
    broker_options: dict[str, object] = {}
    if is_redis_url(settings.broker_url):
        broker_options = {
            # Redis has no consumer acks: an unacked message of a worker that died is handed
            # out again this long after delivery (see WorkerSettings.visibility_timeout_s).
            "visibility_timeout": settings.visibility_timeout_s,
            # ...and workers look for such messages this often. kombu's default (a scan every
            # 10th tick of 10 s) would add up to 100 s to every recovery; one ZRANGE per tick
            # is cheap.
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            # The scan holds a Redis lock; a worker killed while holding it would stop every
            # scan for kombu's default 5 minutes.
            "unacked_mutex_expire": 30,
            # A broker that vanishes without closing TCP must become an error, not a hang.
            "socket_connect_timeout": 3.0,
            "socket_timeout": 10.0,
        }
    elif settings.broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        # RabbitMQ: publisher confirms, so a publish the broker refused is an error, not lost.
        broker_options = {"confirm_publish": True}

    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        # JSON only: a worker must never unpickle what arrives from the broker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Own exchange and key per queue: a Queue without them is bound to the default
        # exchange and key, and then every message would land in both queues.
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in queues],
        task_default_queue=settings.cpu_queue,  # ping and anything unrouted: no GPU needed
        task_routes=task_routes(settings),
        # Ack after the task ran, not when it was received: a worker that dies mid-task leaves
        # its message to be delivered again (tasks are idempotent; the delivery count caps it).
        task_acks_late=True,
        # A prefork child killed mid-task (OOM, segfault) requeues its message instead of
        # recording a failure; whole-process deaths rely on the broker (visibility timeout /
        # closed connection). Either way the delivery counter in workers.tasks ends loops.
        task_reject_on_worker_lost=True,
        # Reserve one message per execution slot: a busy worker does not sit on work an idle
        # one could do, and a crash puts back at most what was running.
        worker_prefetch_multiplier=1,
        # Soft: the task gets an exception and answers with a clear error. Hard: the task is
        # killed (threads pool: the whole worker exits, workers.runtime.Watchdog) and its
        # message is redelivered, counted against the retry cap.
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        # A lost broker connection leaves running tasks unackable; Celery can cancel them, but
        # a thread pool cannot stop a thread, so they finish, their ack fails, and the broker
        # redelivers them after the visibility timeout (tasks are idempotent).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Workers started before the broker (compose, reboot) wait for it instead of exiting.
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3.0,
        broker_transport_options=broker_options,
        # A bot gives up after client_timeout_s: results nobody reads must not pile up.
        result_expires=settings.result_expires_s,
        # Bots wait only for the final state; STARTED would cost one more backend write and
        # one more pub/sub message per task and nobody reads it.
        task_track_started=False,
        # Results are tiny dicts; a blip of the backend must not lose an answer, but a backend
        # that is gone must not hang a worker thread forever either.
        result_backend_always_retry=True,
        result_backend_max_retries=5,
        # Reconnects to the result backend: a worker keeps trying (Celery's default, ~20 s);
        # a bot tries for about publish_retry_s and then tells the user (its own deadline).
        result_backend_transport_options=(
            {"retry_policy": publish_retry_policy(settings.publish_retry_s)} if client else {}
        ),
        redis_socket_connect_timeout=3.0,
        redis_socket_timeout=10.0,
        # Celery's Redis result consumer is thread-safe: one shared backend (and one pub/sub
        # connection) for all the threads a bot waits on, instead of one per thread.
        result_backend_thread_safe=True,
        task_publish_retry=True,
        task_publish_retry_policy=publish_retry_policy(settings.publish_retry_s),
    )
    app.rapbot_settings = settings  # read by workers.runtime and workers.client
    return app


app = create_app()
