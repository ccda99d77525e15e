"""Prometheus metrics of a bot or worker process, in one private registry (:data:`REGISTRY`).

Recorded as things happen:

* ``rapbot_requests_total{command, outcome}`` and ``rapbot_request_seconds{command}``: every
  chat request the command core serves (``bots.core.serve.CommandCore.serve``: refused by
  the rate limits or the in-flight bound, answered, failed, or cut short by its time limit),
  counted once; ``command`` is the command's declared word (``who``, ``ask``,
  ``forget_me``...; ``unknown`` when the text does not parse), ``outcome`` one of
  :data:`REQUEST_OUTCOMES`.
* ``rapbot_stage_seconds{stage}``: the engine's per-stage timings (decode, detect, embed,
  search, render, prompt, generate) of every answer the core receives, local or over Celery.
* ``rapbot_tasks_total{task, outcome}`` and ``rapbot_task_seconds{task}``: every engine task a
  worker runs (``workers.tasks.EngineTask``); ``outcome`` one of :data:`TASK_OUTCOMES`.

Computed when scraped (custom collectors, nothing runs in between):

* ``rapbot_queue_depth{queue}`` and ``rapbot_broker_up``: messages waiting in each Celery queue
  of a Redis broker (:func:`register_queues`); a broker that is down gives
  ``rapbot_broker_up 0`` and no depths, never a failed scrape.
* over the engines given to :func:`register_engine`: ``rapbot_model_load_seconds{model}`` and
  ``rapbot_model_info{...}`` (``model`` is the profile name: its models load together),
  micro-batching counters per batcher (``model`` = ``clip-images``, ``clip-texts``,
  ``detector``): ``rapbot_batches_total``, ``rapbot_batched_items_total`` (mean batch size =
  items / batches), ``rapbot_batch_max_size``, ``rapbot_batch_failures_total``,
  ``rapbot_batch_wait_seconds_total``; and ``rapbot_store_items{kind}`` for ``concepts``,
  ``examples`` and ``photos``. The store counts are exact counts (a Qdrant count request, a
  FAISS scan), so they are taken at most once per :data:`STORE_COUNTS_TTL_S` per process: a
  scrape in between shows the last ones.

Serving: :func:`start_metrics_server` (``/metrics`` over HTTP), :func:`metrics_text`.

This module imports no engine code at import time (the bot container has no torch): engines
are only looked at, lazily, when a scrape asks. Labels carry ids and fixed names only, never
anything a user wrote (DESIGN.md, "Scopes and privacy"); not even scopes, which would make the
series count grow with the number of chats.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.errors import RapbotError  # plain exception classes: no torch, no numpy
from engine.operations import EngineGateway, Operation  # declarations: no model code
from engine.types import Answer
from rapbot.settings import is_redis_url

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

# timeout: the adapter gave up on the request (its time limit, or a shutdown cancelled it).
REQUEST_OUTCOMES = ("ok", "user_error", "internal_error", "rate_limited", "busy", "timeout")
TASK_OUTCOMES = ("ok", "user_error", "internal_error", "timeout", "gave_up")
STORE_COUNTS_TTL_S = 60.0  # how long a scrape reuses the last store counts

_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "rapbot_requests",
    "Chat commands answered by the command core, by command and outcome.",
    ["command", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "rapbot_request_seconds",
    "Time from a chat command reaching the command core to its reply.",
    ["command"],
    buckets=_REQUEST_BUCKETS,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "rapbot_stage_seconds",
    "Engine time per stage (decode, detect, embed, search, render, prompt, generate) of the"
    " answers the command core received.",
    ["stage"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
TASKS = Counter(
    "rapbot_tasks",
    "Engine tasks run by this worker, by task and outcome.",
    ["task", "outcome"],
    registry=REGISTRY,
)
TASK_SECONDS = Histogram(
    "rapbot_task_seconds",
    "Run time of the engine tasks of this worker.",
    ["task"],
    buckets=_REQUEST_BUCKETS,
    registry=REGISTRY,
)

_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


# ----------------------------------------------------------------------------- recording


def command_name(command: object | None) -> str:
    """The metric label of a parsed command: its declared ``command`` word (``ForgetMe()`` →
    ``forget_me``); ``unknown`` for None (the text did not parse)."""
    return "unknown" if command is None else str(command.command)


def error_outcome(error: BaseException) -> str:
    """The outcome a RapbotError declares (``user_error`` for one the user caused,
    ``internal_error`` for the service's own: see ``RapbotError.outcome``);
    ``internal_error`` for anything that is not a RapbotError."""
    return error.outcome if isinstance(error, RapbotError) else "internal_error"


def observe_request(command: str, outcome: str, seconds: float) -> None:
    REQUESTS.labels(command=command, outcome=outcome).inc()
    REQUEST_SECONDS.labels(command=command).observe(max(0.0, seconds))


def observe_stages(timings: Mapping[str, float] | None) -> None:
    """Feed ``rapbot_stage_seconds`` from an ``Answer.timings`` (stage → seconds). Odd entries
    (a name that is not a short identifier, a value that is not a finite number) are skipped:
    the dict may have crossed the broker."""
    for stage, seconds in (timings or {}).items():
        if not isinstance(stage, str) or not _STAGE_NAME.match(stage):
            continue
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            continue
        if math.isfinite(seconds) and seconds >= 0:
            STAGE_SECONDS.labels(stage=stage).observe(float(seconds))


def observe_answer(answer: Any) -> Any:
    """Record the stage timings of an engine ``Answer`` (anything else passes untouched);
    returns its argument."""
    timings = getattr(answer, "timings", None)
    if isinstance(timings, Mapping):
        observe_stages(timings)
    return answer


def observe_task(task: str, outcome: str, seconds: float) -> None:
    TASKS.labels(task=task, outcome=outcome).inc()
    TASK_SECONDS.labels(task=task).observe(max(0.0, seconds))


def observe_result(declared: Operation, result: Any) -> None:
    """The gateway observer (:meth:`engine.operations.EngineGateway.add_observer`): the stage
    timings of every operation whose declared result is an ``Answer``."""
    if declared.result is Answer:
        observe_answer(result)


def observed_gateway(gateway: Any) -> Any:
    """``gateway`` with its answers' stage timings recorded (:func:`observe_result`); the same
    object, observed once however often this is called. A gateway that is not an
    ``EngineGateway`` (a test's stand-in) is returned as it is."""
    if isinstance(gateway, EngineGateway):
        gateway.add_observer(observe_result)
    return gateway


# ----------------------------------------------------------------------------- queue depth


def _kombu_redis_defaults() -> tuple[str, list[int]]:
    """kombu's Redis transport: priority sub-queue separator and priority steps."""
    try:
        from kombu.transport.redis import PRIORITY_STEPS, Channel

        return Channel.sep, list(PRIORITY_STEPS)
    except Exception:  # kombu missing or changed: its values as of kombu 5
        return "\x06\x16", [0, 3, 6, 9]


def redis_queue_keys(
    queue: str,
    *,
    sep: str = "\x06\x16",
    priority_steps: Iterable[int] = (0, 3, 6, 9),
    prefix: str = "",
) -> list[str]:
    """The Redis lists kombu's Redis transport keeps a queue in: the queue's name (priority 0)
    and ``queue + sep + str(priority)`` for each further priority step (kombu's
    ``Channel._q_for_pri``), each behind the ``global_keyprefix`` when one is set."""
    keys: list[str] = []
    for step in priority_steps:
        key = f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}"
        if key not in keys:
            keys.append(key)
    return keys


def _redis_url(broker_url: str) -> str | None:
    """The first URL of a broker setting (Celery allows a ``;``-separated failover list) when
    it is one redis-py can open directly; None otherwise (amqp, sentinel, memory...)."""
    first = broker_url.split(";", 1)[0].strip()
    return first if is_redis_url(first, sentinel=False) else None


class QueueDepthCollector(Collector):
    """``rapbot_queue_depth{queue}`` (messages waiting, all priorities) and
    ``rapbot_broker_up`` from a Redis broker, asked at scrape time with short timeouts.

    ``transport_options``: Celery's ``broker_transport_options`` (``sep``,
    ``priority_steps`` and ``global_keyprefix`` change the key names). Messages a worker has
    reserved but not yet acknowledged are not waiting and not counted."""

    def __init__(
        self,
        broker_url: str,
        queues: Iterable[str],
        transport_options: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 1.0,
    ) -> None:
        self.url = _redis_url(broker_url)
        self.queues = list(dict.fromkeys(queues))
        options = dict(transport_options or {})
        sep, steps = _kombu_redis_defaults()
        self.sep = str(options.get("sep", sep))
        self.priority_steps = [int(s) for s in options.get("priority_steps", steps)]
        self.prefix = str(options.get("global_keyprefix", "") or "")
        self.timeout_s = timeout_s
        self._client = None
        self._lock = threading.Lock()
        self._was_up: bool | None = None

    def _redis(self):
        with self._lock:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(
                    self.url,
                    socket_connect_timeout=self.timeout_s,
                    socket_timeout=self.timeout_s,
                )
            return self._client

    def depths(self) -> dict[str, int]:
        """Messages waiting per queue; raises when the broker cannot be asked."""
        keys = {q: redis_queue_keys(q, sep=self.sep, priority_steps=self.priority_steps,
                                    prefix=self.prefix) for q in self.queues}  # fmt: skip
        with self._redis().pipeline(transaction=False) as pipe:
            for queue_keys in keys.values():
                for key in queue_keys:
                    pipe.llen(key)
            sizes = iter(pipe.execute())
        return {q: sum(int(next(sizes)) for _ in queue_keys) for q, queue_keys in keys.items()}

    def collect(self) -> Iterator[Metric]:
        if self.url is None:
            return
        up = GaugeMetricFamily("rapbot_broker_up", "1 when the Celery broker answered this scrape.")
        try:
            depths = self.depths()
        except Exception as error:  # down, refused, timed out, auth...: the scrape goes on
            if self._was_up is not False:
                log.warning("queue depth: the broker does not answer: %s", error)
            self._was_up = False
            up.add_metric([], 0)
            yield up
            return
        self._was_up = True
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(
            "rapbot_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"]
        )
        for queue, size in depths.items():
            depth.add_metric([queue], size)
        yield depth


_queue_collectors: dict[tuple[str, tuple[str, ...]], QueueDepthCollector] = {}
_register_lock = threading.Lock()


def register_queues(
    broker_url: str,
    queues: Iterable[str],
    transport_options: Mapping[str, Any] | None = None,
) -> QueueDepthCollector | None:
    """Export the depth of ``queues`` on the broker (once per broker and queues); None when
    the broker is not Redis (nothing to export)."""
    queues = tuple(dict.fromkeys(queues))
    if _redis_url(broker_url) is None:
        log.info("queue depth: only Redis brokers are supported; not exported")
        return None
    with _register_lock:
        key = (broker_url, queues)
        if key not in _queue_collectors:
            try:
                collector = QueueDepthCollector(broker_url, queues, transport_options)
            except (TypeError, ValueError) as error:  # odd transport options: no metric
                log.warning("queue depth: not exported: %s", error)
                return None
            REGISTRY.register(collector)
            _queue_collectors[key] = collector
        return _queue_collectors[key]


def unregister(collector: Collector) -> None:
    """Take a collector out of :data:`REGISTRY` (tests, embedders)."""
    with _register_lock:
        for key, registered in list(_queue_collectors.items()):
            if registered is collector:
                del _queue_collectors[key]
        with contextlib.suppress(KeyError):  # not registered (any more)
            REGISTRY.unregister(collector)


# ----------------------------------------------------------------------------- engines


def _batch_stats(models: Any) -> Iterator[tuple[str, Any, Any]]:
    """``(label, batcher identity, BatchStats)`` of the micro-batchers in front of the models."""
    from engine.batching import BatchingDetector, BatchingEmbedder  # engine present: lazy

    embedder, detector = getattr(models, "embedder", None), getattr(models, "detector", None)
    if isinstance(embedder, BatchingEmbedder):
        yield "clip-images", embedder.images, embedder.images.stats()
        yield "clip-texts", embedder.texts, embedder.texts.stats()
    if isinstance(detector, BatchingDetector):
        yield "detector", detector.batcher, detector.stats()


class EngineCollector(Collector):
    """Scrape-time metrics over the registered engines (held weakly: a dropped engine drops
    out). Several engines in one process (tests) are summed per distinct store and batcher.

    The models and batching metrics are read at every scrape (attributes in memory); the store
    counts query the stores, so they are counted at most once per ``store_ttl_s`` (by
    ``clock``) and reused by the scrapes in between; registering another engine, or
    :meth:`expire_store_counts`, has the next scrape count again."""

    def __init__(
        self,
        *,
        store_ttl_s: float = STORE_COUNTS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.store_ttl_s = store_ttl_s
        self._clock = clock
        self._count_lock = threading.Lock()  # concurrent scrapes: one counts, the rest reuse
        self._store_counts: tuple[float, dict[str, int]] | None = None  # (taken at, counts)

    def add(self, engine: Any) -> None:
        with self._lock:
            if engine not in self._engines:
                self._engines.add(engine)
                self._store_counts = None  # its stores count from the next scrape

    def expire_store_counts(self) -> None:
        """Count the stores again at the next scrape."""
        with self._lock:
            self._store_counts = None

    def store_counts(self, engines: Iterable[Any]) -> dict[str, int]:
        """``kind → items`` over the distinct stores of ``engines``: the last counts while they
        are younger than ``store_ttl_s``, else counted now."""
        with self._count_lock:
            with self._lock:
                cached = self._store_counts
            now = self._clock()
            if cached is not None and now - cached[0] < self.store_ttl_s:
                return dict(cached[1])
            counts: dict[str, int] = {}
            seen: set[int] = set()
            for engine in engines:
                parts = engine.loaded_parts()  # opens nothing: a scrape never loads
                if id(parts.store) not in seen:
                    seen.add(id(parts.store))
                    self._count(counts, "examples", parts.store, "count")
                    self._count(counts, "concepts", parts.store, "count_concepts")
                photos = parts.photos
                if photos is not None and id(photos) not in seen:
                    seen.add(id(photos))
                    self._count(counts, "photos", photos, "total")
            with self._lock:
                self._store_counts = (now, counts)
            return dict(counts)

    def engines(self) -> list[Any]:
        with self._lock:
            return list(self._engines)

    def collect(self) -> Iterator[Metric]:
        engines = self.engines()
        load = GaugeMetricFamily(
            "rapbot_model_load_seconds",
            "Seconds it took to load a profile's models (embedder, detector, generator).",
            labels=["model"],
        )
        info = GaugeMetricFamily(
            "rapbot_model_info",
            "The loaded models (value 1).",
            labels=["model", "embedder", "detector", "generator", "device"],
        )
        batches = CounterMetricFamily(
            "rapbot_batches", "Micro-batches run (forwards).", labels=["model"]
        )
        items = CounterMetricFamily(
            "rapbot_batched_items", "Items that went through micro-batches.", labels=["model"]
        )
        largest = GaugeMetricFamily(
            "rapbot_batch_max_size", "The largest micro-batch run so far.", labels=["model"]
        )
        failures = CounterMetricFamily(
            "rapbot_batch_failures", "Micro-batches whose forward raised.", labels=["model"]
        )
        waits = CounterMetricFamily(
            "rapbot_batch_wait_seconds",
            "Summed time items waited for their micro-batch to start.",
            labels=["model"],
        )
        store = GaugeMetricFamily(
            "rapbot_store_items",
            "What the stores hold: concepts, example photos of concepts, indexed chat photos.",
            labels=["kind"],
        )
        loaded: dict[str, tuple[float, tuple[str, ...]]] = {}
        batch_totals: dict[str, list[float]] = {}
        seen: set[int] = set()

        for engine in engines:
            models = engine.loaded_parts().models  # never load models for a scrape
            if models is not None and id(models) not in seen:
                seen.add(id(models))
                self._models(models, loaded, batch_totals, seen)
        counts = self.store_counts(engines)

        for model, (seconds, labels) in loaded.items():
            load.add_metric([model], seconds)
            info.add_metric(list(labels), 1)
        for model, (n_batches, n_items, biggest, failed, waited) in batch_totals.items():
            batches.add_metric([model], n_batches)
            items.add_metric([model], n_items)
            largest.add_metric([model], biggest)
            failures.add_metric([model], failed)
            waits.add_metric([model], waited)
        for kind, count in counts.items():
            store.add_metric([kind], count)
        yield from (load, info, batches, items, largest, failures, waits, store)

    @staticmethod
    def _models(
        models: Any,
        loaded: dict[str, tuple[float, tuple[str, ...]]],
        batch_totals: dict[str, list[float]],
        seen: set[int],
    ) -> None:
        try:
            profile = getattr(getattr(models, "profile", None), "name", None) or "unknown"
            embedder, detector = (
                getattr(models, "embedder", None),
                getattr(models, "detector", None),
            )
            generator = getattr(models, "generator", None)
            labels = (
                str(profile),
                str(getattr(embedder, "model_id", "") or ""),
                str(getattr(detector, "name", "") or ""),
                str(getattr(generator, "name", "") or "none") if generator is not None else "none",
                str(getattr(embedder, "device", "") or ""),
            )
            loaded[str(profile)] = (float(getattr(models, "load_seconds", 0.0) or 0.0), labels)
        except Exception as error:
            log.debug("metrics: cannot describe the models: %s", error)
        try:
            for name, batcher, stats in _batch_stats(models):
                if id(batcher) in seen:
                    continue
                seen.add(id(batcher))
                total = batch_totals.setdefault(name, [0, 0, 0, 0, 0.0])
                total[0] += stats.batches
                total[1] += stats.items
                total[2] = max(total[2], stats.max_size)
                total[3] += stats.failed_batches
                total[4] += stats.wait_seconds
        except Exception as error:
            log.debug("metrics: cannot read the batch stats: %s", error)

    @staticmethod
    def _count(counts: dict[str, int], kind: str, store: Any, method: str) -> None:
        count = getattr(store, method, None)
        if count is None:
            return
        try:
            counts[kind] = counts.get(kind, 0) + int(count())
        except Exception as error:  # a closed store, a database that is down: skip this one
            log.debug("metrics: cannot count %s: %s", kind, error)


_engine_collector: EngineCollector | None = None


def register_engine(engine: Any) -> None:
    """Export the engine collector's metrics over ``engine`` (an ``engine.engine.Engine``,
    read through its :meth:`~engine.engine.Engine.loaded_parts`); registering the same engine
    again changes nothing, and a stand-in without that hook (tests) exports nothing."""
    global _engine_collector
    if not callable(getattr(engine, "loaded_parts", None)):
        return
    with _register_lock:
        if _engine_collector is None:
            _engine_collector = EngineCollector()
            REGISTRY.register(_engine_collector)
        collector = _engine_collector
    collector.add(engine)


def expire_store_counts() -> None:
    """Have the next scrape count the stores again instead of reusing the counts of the last
    :data:`STORE_COUNTS_TTL_S` (tests; an operator tool after a bulk change)."""
    collector = _engine_collector
    if collector is not None:
        collector.expire_store_counts()


# ----------------------------------------------------------------------------- serving

_servers: dict[tuple[str, int], tuple[Any, threading.Thread]] = {}


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> tuple[Any, threading.Thread]:
    """Serve :data:`REGISTRY` at ``http://addr:port/metrics`` from a daemon thread (once per
    address: a second call returns the running server). Returns ``(server, thread)``; a port
    of 0 picks a free one (``server.server_port``)."""
    from prometheus_client import start_http_server

    with _register_lock:
        key = (addr, port)
        if port and key in _servers:
            return _servers[key]
        server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
        _servers[(addr, server.server_port)] = (server, thread)
        log.info("metrics served on http://%s:%d/metrics", addr, server.server_port)
        return server, thread


def stop_metrics_server(server: Any) -> None:
    """Stop a server :func:`start_metrics_server` started (tests)."""
    with _register_lock:
        for key, (running, _thread) in list(_servers.items()):
            if running is server:
                del _servers[key]
    server.shutdown()
    server.server_close()


def metrics_text() -> str:
    """The Prometheus text exposition of :data:`REGISTRY`."""
    return generate_latest(REGISTRY).decode("utf-8")
