"""One worker process's state: its engine (loaded once, before it consumes), its blob store,
its readiness marker, and the time-limit watchdog that Celery's thread pool lacks.

Start-up, by Celery signal:

* ``worker_init`` (main process, before any task is consumed). Threads and solo pools never
  fork, so the engine — CUDA included — is loaded right here and stays warm. A worker that
  serves the gpu queue loads the models; a cpu-only worker opens a store-only engine that
  needs no weights. The prefork pool must not touch CUDA before it forks: its children load
  the engine in ``worker_process_init`` instead.
* ``worker_ready`` (the consumer is up): writes ``RAPBOT_WORKER_READY_FILE`` and logs
  ``rapbot worker ready``. So "ready" means models loaded *and* consuming (prefork: once a
  pool process has loaded them; each leaves a ``<ready file>.child-<pid>`` marker).
* ``worker_shutdown``: removes the marker and closes the store.

Time limits: Celery enforces soft and hard limits only in the prefork pool (through signals to
the child). For the thread pool a :class:`Watchdog` thread does the same job: at the soft limit
it raises ``SoftTimeLimitExceeded`` in the task's thread (delivered at its next Python step, as
Celery's own soft limit is), at the hard limit it exits the process — a stuck CUDA call cannot
be cancelled from Python — so that the supervisor restarts it and the broker redelivers.

Also here: :func:`patch_lost_connection_errors`, a workaround that keeps a worker alive when
its Redis broker connection drops with tasks in flight (kombu/celery 5.7).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from engine.errors import RapbotError
from rapbot import logs, metrics
from rapbot.settings import WorkerSettings, load_settings
from workers.blobs import BlobStore, open_blob_store

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger("rapbot.worker")
HARD_LIMIT_EXIT_CODE = 75  # EX_TEMPFAIL: restart me


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: WorkerSettings | None = None
        self.engine: Engine | None = None
        self.blobs: BlobStore | None = None
        self.with_models = True  # what this process's engine should be
        self.watchdog: Watchdog | None = None
        self.load_seconds = 0.0
        self.prefork = False  # the engine lives in the pool's child processes


_state = _State()


def settings() -> WorkerSettings:
    if _state.settings is None:
        from workers.app import app

        _state.settings = getattr(app, "rapbot_settings", None) or load_settings()
    return _state.settings


def load_engine(with_models: bool) -> Engine:
    """Build this process's engine (idempotent). Store-only engines load no weights. With
    models, a CIR-LVLM search encoder (``RAPBOT_SEARCH_ENCODER=cir-lvlm``) is loaded here too,
    before the worker says it is ready: loaded by its first task instead, a large VLM would run
    into the task time limits (and the hard limit restarts the worker, to load it again)."""
    from engine.engine import Engine

    with _state.lock:
        if _state.engine is None:
            started = time.perf_counter()
            built = Engine.open(load_settings(), load_models=with_models)
            if with_models and built.settings.search_encoder == "cir-lvlm":
                try:
                    built.search_encoder  # noqa: B018 - loads it (once per process)
                except BaseException:
                    built.close()
                    raise
            _state.engine = built
            _state.with_models = with_models
            _state.load_seconds = time.perf_counter() - started
            metrics.register_engine(_state.engine)  # models, batching, store counts
        return _state.engine


def engine() -> Engine:
    """The process's engine; loads it on first use when no start-up signal did (eager tests)."""
    return _state.engine or load_engine(_state.with_models)


def blobs() -> BlobStore:
    if _state.blobs is None:
        with _state.lock:
            if _state.blobs is None:
                s = settings()
                _state.blobs = open_blob_store(s.blob_url, s.blob_ttl_s)
    return _state.blobs


def use(
    *, engine: Engine | None = None, blobs: BlobStore | None = None, s: WorkerSettings | None = None
) -> None:
    """Tests and embedders: put a ready engine, blob store or settings in place."""
    if engine is not None:
        _state.engine = engine
    if blobs is not None:
        _state.blobs = blobs
    if s is not None:
        _state.settings = s


def reset() -> None:
    """Forget the process state (tests). Does not close what ``use`` put in place."""
    if _state.watchdog is not None:
        _state.watchdog.stop()
    _state.__init__()


def status() -> dict:
    return {
        "ok": True,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "engine": None
        if _state.engine is None
        else ("store-only" if _state.engine.loaded_parts().models is None else "full"),
        "load_seconds": round(_state.load_seconds, 3),
    }


@contextlib.contextmanager
def time_limits(task_id: str, name: str) -> Iterator[None]:
    """Enforce the soft/hard limits around a task body when the pool cannot (threads, solo)."""
    if _state.watchdog is None:
        yield
        return
    with _state.watchdog.track(task_id, name):
        yield


# ----------------------------------------------------------------------------- watchdog


def _set_async_exc(ident: int, exc: type[BaseException] | None) -> None:
    target = ctypes.py_object(exc) if exc is not None else ctypes.c_void_p(None)  # NULL clears
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), target)


def _exit_process(task_id: str, name: str, elapsed: float) -> None:
    log.critical(
        "task %s[%s] passed the hard time limit (%.0f s): exiting so the worker is restarted "
        "and the message redelivered",
        name,
        task_id,
        elapsed,
    )
    logging.shutdown()
    os._exit(HARD_LIMIT_EXIT_CODE)


@dataclass
class _Running:
    task_id: str
    name: str
    started: float
    soft_sent: bool = False


class Watchdog:
    """Soft and hard time limits for tasks that run on threads (see the module docstring)."""

    def __init__(
        self,
        soft_s: float,
        hard_s: float,
        *,
        interval_s: float = 0.25,
        on_hard: Callable[[str, str, float], None] = _exit_process,
    ) -> None:
        self.soft_s, self.hard_s, self.interval_s = soft_s, hard_s, interval_s
        self._on_hard = on_hard
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def track(self, task_id: str, name: str) -> Iterator[None]:
        ident = threading.get_ident()
        with self._lock:
            self._running[ident] = _Running(task_id, name, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(ident, None)
                _set_async_exc(ident, None)  # a soft-limit exception that came too late

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        overdue: list[tuple[_Running, float]] = []
        with self._lock:
            for ident, running in self._running.items():
                elapsed = now - running.started
                if elapsed >= self.hard_s:
                    overdue.append((running, elapsed))
                elif elapsed >= self.soft_s and not running.soft_sent:
                    running.soft_sent = True
                    log.warning(
                        "task %s[%s] passed the soft time limit (%.0f s)",
                        running.name,
                        running.task_id,
                        elapsed,
                    )
                    _set_async_exc(ident, SoftTimeLimitExceeded)
        for running, elapsed in overdue:
            self._on_hard(running.task_id, running.name, elapsed)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._loop, name="rapbot-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------- kombu workaround


def patch_lost_connection_errors() -> None:
    """Keep a worker alive when its Redis broker connection drops with tasks in flight.

    kombu/celery 5.7: on a lost connection the consumer detaches the connection, then closes
    its channel, whose "restore unacked messages" step — and later the ack of each task still
    running — asks that detached connection for a Redis client: ``AttributeError: 'NoneType'
    object has no attribute 'hostname'``, "Unrecoverable error", and the worker exits. Raising
    a connection error there instead lets kombu and Celery handle it as the outage it is
    (logged; the messages stay in Redis's unacked index, which the visibility timeout
    redelivers from), and the worker reconnects.
    """
    import redis
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._create_client
    if getattr(original, "rapbot_patched", False):
        return

    def _create_client(self, *args, **kwargs):
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("the broker connection of this channel was lost")
        return original(self, *args, **kwargs)

    _create_client.rapbot_patched = True
    kombu_redis.Channel._create_client = _create_client


# ----------------------------------------------------------------------------- signals


def _serves_models(app) -> bool:
    queues = app.amqp.queues.consume_from or app.amqp.queues
    return settings().gpu_queue in set(queues)


def _load_or_exit(with_models: bool) -> None:
    try:
        load_engine(with_models)
    except RapbotError as error:  # a missing weight, a store made for another model...
        raise SystemExit(f"rapbot worker: {error}") from None
    log.info(
        "engine loaded in %.1f s (%s)",
        _state.load_seconds,
        "models" if with_models else "store only",
    )


def _write_json(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _child_markers(path: Path) -> list[Path]:
    found = path.parent.glob(f"{path.name}.child-*")
    return sorted(p for p in found if not p.name.endswith(".tmp"))


def _announce_ready(path: Path | None, info: dict) -> None:
    if path is not None:
        _write_json(Path(path), info)
    log.info("rapbot worker ready: %s", json.dumps(info))


@setup_logging.connect
def _on_setup_logging(loglevel=None, **_) -> None:
    """Worker logs go through rapbot's handler (task id and scope on every line, JSON when
    ``rapbot.observability.setup`` chose it) instead of the root handler Celery would put in
    its place; a worker started without that setup gets the text format at ``--loglevel``.

    Celery's "Task ... succeeded" line would also print every result: concept names and
    descriptions are what users wrote, and logs hold ids only (DESIGN.md, privacy)."""
    from celery.app import trace

    trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
    if logs.configured() is None:
        level = loglevel if isinstance(loglevel, int) else logging.INFO
        logs.configure_logging(logging.getLevelName(level), "text")


@worker_init.connect
def _on_worker_init(sender, **_) -> None:
    from celery.concurrency import get_implementation

    _state.with_models = _serves_models(sender.app)
    s = settings()
    queues = (s.gpu_queue, s.cpu_queue)  # rapbot_queue_depth{queue} on this worker's /metrics
    metrics.register_queues(s.broker_url, queues, sender.app.conf.broker_transport_options)
    patch_lost_connection_errors()
    pool = get_implementation(sender.pool_cls)
    _state.prefork = pool.__module__.endswith("prefork")
    if _state.prefork:
        path = settings().worker_ready_file
        for stale in _child_markers(Path(path)) if path is not None else []:
            stale.unlink(missing_ok=True)
        return  # children load in worker_process_init; Celery enforces the time limits
    _load_or_exit(_state.with_models)
    s = settings()
    _state.watchdog = Watchdog(s.task_soft_time_limit_s, s.task_time_limit_s).start()


@worker_process_init.connect
def _on_worker_process_init(**_) -> None:
    _load_or_exit(_state.with_models)
    path = settings().worker_ready_file
    if path is not None:  # tells the main process that a pool process can serve
        _write_json(Path(f"{path}.child-{os.getpid()}"), status())


@worker_ready.connect
def _on_worker_ready(sender=None, **_) -> None:
    path = settings().worker_ready_file
    queues = sorted(sender.app.amqp.queues.consume_from or []) if sender is not None else []
    info = {**status(), "queues": queues}
    if not _state.prefork:
        _announce_ready(path, {**info, "ready_at": time.time()})
        return

    # Prefork: consuming now, but the engine loads in the pool processes. Announce readiness
    # once one of them has loaded it (tasks wait for a loaded process meanwhile anyway).
    def wait_for_a_pool_process() -> None:
        while path is not None and not _child_markers(Path(path)):
            time.sleep(0.2)
        child = json.loads(_child_markers(Path(path))[0].read_text()) if path else {}
        _announce_ready(path, {**info, **child, "pid": os.getpid(), "ready_at": time.time()})

    threading.Thread(target=wait_for_a_pool_process, name="rapbot-ready", daemon=True).start()


@worker_shutdown.connect
def _on_worker_shutdown(**_) -> None:
    path = settings().worker_ready_file
    if path is not None:
        for marker in [Path(path), *_child_markers(Path(path))]:
            marker.unlink(missing_ok=True)
    if _state.watchdog is not None:
        _state.watchdog.stop()
    if _state.engine is not None:
        with contextlib.suppress(Exception):
            _state.engine.close()
