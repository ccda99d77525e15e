"""One Celery task per engine operation, registered from :data:`engine.operations.OPERATIONS`;
plain JSON in, plain JSON out.

Arguments and results are the JSON of :mod:`workers.wire`, by declared type: photos as blob
keys (never bytes, never platform URLs), a box as ``[x1, y1, x2, y2]``, an actor as
``{"user", "is_admin"}``; an annotated photo comes back as a blob key too. A user-facing
``RapbotError`` is returned as ``{"error": {...}}``. A streaming operation also has a
``<name>_stream`` task, which publishes the answer's text as it is generated
(:mod:`workers.streams`) and returns the same result.

Every task runs through :class:`EngineTask`, which

* counts deliveries per task id: acks are late, so a message whose worker died is delivered
  again; Celery has no cap for deliveries lost with the whole worker, so beyond
  ``RAPBOT_MAX_REDELIVERIES`` the task answers "this photo made the engine crash N times"
  instead of killing worker after worker;
* is idempotent where it matters: ``remember`` is keyed by ``source`` (the platform message
  id) and the store keeps one example per source, so a redelivered remember stores nothing
  new; rename and forget, run again after a crash, answer as if the first run had;
* enforces the time limits on thread pools (:func:`workers.runtime.time_limits`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from engine.errors import (
    EngineUnavailableError,
    RapbotError,
    RepeatedCrashError,
    UnknownConceptError,
)
from engine.operations import OPERATIONS, Operation
from engine.types import Concept
from rapbot import metrics
from rapbot.logs import log_context
from workers import faults, runtime, streams, wire
from workers.app import PING, app, task_name

log = logging.getLogger("rapbot.worker")
TOO_SLOW = "The engine took too long on this request; try again in a minute."
_current = threading.local()  # per running task: deliveries, digests of its photos (faults)


class EngineTask(Task):
    """Base of every engine task: the delivery cap, errors as results, the time limits."""

    operation: Operation  # what the task runs (set per task by engine_task)
    photo_task = False  # True: a crash message says "this photo"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the task in a log context (task id, scope), counted in
        ``rapbot_tasks_total{task, outcome}`` and timed in ``rapbot_task_seconds{task}``."""
        task_id = self.request.id or "eager"
        started, outcome = time.perf_counter(), "internal_error"  # unless it returns
        with log_context(task_id=task_id, scope=self._scope(args, kwargs)):
            try:
                result, outcome = self._guarded(task_id, args, kwargs)
                return result
            finally:
                task = self.name.removeprefix("rapbot.")
                metrics.observe_task(task, outcome, time.perf_counter() - started)

    def _guarded(self, task_id: str, args: tuple, kwargs: dict) -> tuple[Any, str]:
        """The task body under the delivery cap and the time limits, errors as results: the
        result and its outcome (ok, user_error, internal_error, timeout, gave_up)."""
        _current.digests, _current.deliveries = [], 1
        try:
            gave_up = self._give_up_after_crashes(task_id)
            if gave_up is not None:
                return gave_up, "gave_up"
            with runtime.time_limits(task_id, self.name):
                result = self.run(*args, **kwargs)
                if _current.digests:
                    faults.after_engine(task_id, _current.digests)
                return result, "ok"
        except SoftTimeLimitExceeded:
            log.warning("task %s[%s] stopped at the soft time limit", self.name, task_id)
            return wire.error_result(EngineUnavailableError(TOO_SLOW)), "timeout"
        except RapbotError as error:
            return wire.error_result(error), metrics.error_outcome(error)

    def _scope(self, args: tuple, kwargs: dict) -> str | None:
        """The task's ``scope`` argument (None for forget_user), for the log context."""
        try:
            scope = wire.task_kwargs(self.operation, args, kwargs).get("scope")
        except TypeError:  # reported by the task itself
            return None
        return scope if isinstance(scope, str) else None

    def _give_up_after_crashes(self, task_id: str) -> dict | None:
        s = runtime.settings()
        try:
            deliveries = runtime.blobs().incr(f"deliveries:{task_id}", s.delivery_counter_ttl_s)
        except RapbotError:  # the counter's Redis is down: run uncapped rather than refuse
            log.warning("task %s[%s]: cannot count deliveries", self.name, task_id)
            return None
        _current.deliveries = deliveries
        if deliveries > 1:
            log.warning("task %s[%s] delivered %d times", self.name, task_id, deliveries)
        if deliveries <= 1 + s.max_redeliveries:
            return None
        crashes = deliveries - 1
        what = "This photo" if self.photo_task else "This request"
        log.error("task %s[%s] gave up after %d crashed deliveries", self.name, task_id, crashes)
        return wire.error_result(
            RepeatedCrashError(f"{what} made the engine crash {crashes} times; giving up.")
        )

    @property
    def redelivered(self) -> bool:
        """This run follows a delivery that did not finish (its worker died)."""
        return getattr(_current, "deliveries", 1) > 1

    def photo(self, key: str | None) -> bytes | None:
        """The photo behind a blob key (fault hooks see it before the engine does)."""
        if key is None:
            return None
        data = runtime.blobs().get(key)
        if faults.enabled():
            digest = faults.digest(data)
            _current.digests.append(digest)
            faults.before_engine(self.request.id or "eager", [digest])
        return data


def engine_task(declared: Operation, *, name: str, run: Callable[..., Any]) -> Task:
    """Register ``run`` as the Celery task ``name`` of one engine operation, with the
    reliability options every engine task has."""
    run.__name__ = run.__qualname__ = name.removeprefix("rapbot.")
    run.__doc__ = declared.doc
    return app.task(
        name=name,
        base=EngineTask,
        bind=True,
        acks_late=True,  # also app-wide; restated where a reader of a task looks
        reject_on_worker_lost=True,
        operation=declared,
        photo_task=wire.photo_parameter(declared) is not None,
        typing=False,  # arguments are checked against the declaration (workers.wire)
    )(run)


def _converged(declared: Operation, arguments: dict[str, Any]) -> Any | None:
    """What a redelivered rename or forget answers when its first run (which died before
    its ack) already did the work: the engine now says the name is unknown."""
    scope, name = arguments.get("scope"), arguments.get("name")
    if declared.name == "rename":
        return runtime.engine().store.get_by_name(scope, arguments["new_name"])
    if declared.name == "forget":
        return Concept("", scope, name.strip(), "", "", arguments["actor"].user, 0.0, 0)
    return None


def _engine_call(task: EngineTask, method: str, args: tuple, kwargs: dict) -> Any:
    declared = task.operation
    arguments = wire.arguments_from_json(
        declared, wire.task_kwargs(declared, args, kwargs), task.photo
    )
    try:
        return getattr(runtime.engine(), method)(*arguments.values())
    except UnknownConceptError:
        done = _converged(declared, arguments) if task.redelivered else None
        if done is None:
            raise
        return done


def _task(declared: Operation) -> Task:
    def run(self: EngineTask, *args: Any, **kwargs: Any) -> dict:
        result = _engine_call(self, declared.name, args, kwargs)
        return wire.result_to_json(declared, result, runtime.blobs().put)

    return engine_task(declared, name=task_name(declared.name), run=run)


def _stream_task(declared: Operation) -> Task:
    """``<name>_stream``: the answer's text is published as it is generated (see
    :class:`workers.streams.PiecePublisher`), the result returned as ``<name>``'s is."""

    def run(self: EngineTask, *args: Any, **kwargs: Any) -> dict:
        publisher = streams.PiecePublisher(
            runtime.blobs(), self.request.id, enabled=not self.request.is_eager
        )
        result = None
        for item in _engine_call(self, declared.stream_name, args, kwargs):
            if isinstance(item, str):
                publisher.add(item)
            else:
                result = item
        publisher.flush()
        return wire.result_to_json(declared, result, runtime.blobs().put)

    return engine_task(declared, name=task_name(declared.stream_name), run=run)


# One task per operation (and per streaming variant), by the names in workers.app; the module
# attributes (``workers.tasks.remember``...) are the tasks.
TASKS: dict[str, Task] = {}
for _declared in OPERATIONS.values():
    TASKS[_declared.name] = _task(_declared)
    if _declared.streams:
        TASKS[_declared.stream_name] = _stream_task(_declared)
globals().update(TASKS)


@app.task(name=PING, bind=True, acks_late=False, ignore_result=False)
def ping(self: Task) -> dict:
    """Health: which worker answered, whether its engine is loaded (and how)."""
    return {**runtime.status(), "worker": self.request.hostname}
