"""One Celery task per engine operation; plain JSON in, plain JSON out.

Arguments: the scope, the user, photos as blob keys (never bytes, never platform URLs), a box
as ``[x1, y1, x2, y2]``, an actor as ``{"user", "is_admin"}``. Results: the JSON shapes of
:mod:`workers.wire`; an annotated photo comes back as a blob key too. A user-facing
``RapbotError`` is returned as ``{"error": {...}}`` (see :mod:`workers.wire`).

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

import inspect
import logging
import threading
import time
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from engine.errors import (
    EngineUnavailableError,
    RapbotError,
    RepeatedCrashError,
    UnknownConceptError,
)
from engine.types import Answer, Concept
from rapbot import metrics
from rapbot.logs import log_context
from workers import faults, runtime, wire
from workers.app import PING, app, task_name

log = logging.getLogger("rapbot.worker")
TOO_SLOW = "The engine took too long on this request; try again in a minute."
_current = threading.local()  # per running task: deliveries, digests of its photos (faults)


class EngineTask(Task):
    """Base of every engine task: the delivery cap, errors as results, the time limits."""

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
        scope = kwargs.get("scope")
        if scope is None and args:
            try:
                bound = inspect.signature(self.run).bind_partial(*args, **kwargs)
            except (TypeError, ValueError):
                return None
            scope = bound.arguments.get("scope")
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


def engine_task(operation: str, *, photo: bool = False):
    """The decorator for one engine operation's task, with its reliability options."""
    return app.task(
        name=task_name(operation),
        base=EngineTask,
        bind=True,
        acks_late=True,  # also app-wide; restated where a reader of a task looks
        reject_on_worker_lost=True,
        photo_task=photo,
    )


def _answer(answer: Answer) -> dict:
    key = runtime.blobs().put(answer.image) if answer.image else None
    return wire.answer_to_json(answer, key)


@engine_task("remember", photo=True)
def remember(
    self: EngineTask,
    scope: str,
    photo: str,
    name: str,
    description: str = "",
    user: str = "local",
    box: list[int] | None = None,
    source: str | None = None,
) -> dict:
    image = self.photo(photo)
    result = runtime.engine().remember(
        scope, image, name, description, user, box=wire.box_from_json(box), source=source
    )
    return wire.remember_to_json(result)


@engine_task("recognize", photo=True)
def recognize(self: EngineTask, scope: str, photo: str, user: str | None = None) -> dict:
    return _answer(runtime.engine().recognize(scope, self.photo(photo), user))


@engine_task("ask", photo=True)
def ask(
    self: EngineTask, scope: str, photo: str | None, question: str, user: str | None = None
) -> dict:
    return _answer(runtime.engine().ask(scope, self.photo(photo), question, user))


@engine_task("caption", photo=True)
def caption(self: EngineTask, scope: str, photo: str, user: str | None = None) -> dict:
    return _answer(runtime.engine().caption(scope, self.photo(photo), user))


@engine_task("list_concepts")
def list_concepts(self: EngineTask, scope: str) -> dict:
    return {"concepts": [wire.concept_to_json(c) for c in runtime.engine().list_concepts(scope)]}


@engine_task("concept_sheet")
def concept_sheet(self: EngineTask, scope: str, page: int = 1) -> dict:
    sheet = runtime.engine().concept_sheet(scope, page)
    key = runtime.blobs().put(sheet.image) if sheet.image else None
    return wire.concept_sheet_to_json(sheet, key)


@engine_task("example_crops")
def example_crops(self: EngineTask, scope: str, name: str, limit: int | None = None) -> dict:
    return wire.crops_to_json(runtime.engine().example_crops(scope, name, limit))


@engine_task("rename")
def rename(self: EngineTask, scope: str, name: str, new_name: str, actor: dict) -> dict:
    engine = runtime.engine()
    try:
        concept = engine.rename(scope, name, new_name, wire.actor_from_json(actor))
    except UnknownConceptError:
        # A run that died after renaming: the rename happened, say so (converge, not fail).
        done = engine.store.get_by_name(scope, new_name) if self.redelivered else None
        if done is None:
            raise
        concept = done
    return {"concept": wire.concept_to_json(concept)}


@engine_task("describe")
def describe(self: EngineTask, scope: str, name: str, description: str, actor: dict) -> dict:
    concept = runtime.engine().describe(scope, name, description, wire.actor_from_json(actor))
    return {"concept": wire.concept_to_json(concept)}


@engine_task("forget")
def forget(self: EngineTask, scope: str, name: str, actor: dict) -> dict:
    who = wire.actor_from_json(actor)
    try:
        concept = runtime.engine().forget(scope, name, who)
    except UnknownConceptError:
        if not self.redelivered:
            raise
        # A run that died after forgetting: the concept is gone, which is what was asked.
        concept = Concept("", scope, name.strip(), "", "", who.user, 0.0, 0)
    return {"concept": wire.concept_to_json(concept)}


@engine_task("forget_user")
def forget_user(self: EngineTask, user: str) -> dict:
    return {"removed": runtime.engine().forget_user(user)}


@engine_task("set_indexing")
def set_indexing(
    self: EngineTask, scope: str, enabled: bool, actor: dict, delete: bool = False
) -> dict:
    who = wire.actor_from_json(actor)
    return {"removed": runtime.engine().set_indexing(scope, enabled, who, delete=delete)}


@engine_task("indexing")
def indexing(self: EngineTask, scope: str) -> dict:
    # Asked by bots before they download a posted photo (cached there for a minute).
    return {"enabled": runtime.engine().indexing(scope)}


@engine_task("index_photo", photo=True)
def index_photo(self: EngineTask, scope: str, photo: str, user: str, source: str) -> dict:
    # Idempotent by source: a redelivered task finds the photo already indexed.
    return {"photo_id": runtime.engine().index_photo(scope, self.photo(photo), user, source)}


@engine_task("search", photo=True)
def search(self: EngineTask, scope: str, text: str, photo: str | None, k: int) -> dict:
    hits = runtime.engine().search(scope, text, self.photo(photo), k)
    return wire.photo_hits_to_json(hits)


@app.task(name=PING, bind=True, acks_late=False, ignore_result=False)
def ping(self: Task) -> dict:
    """Health: which worker answered, whether its engine is loaded (and how)."""
    return {**runtime.status(), "worker": self.request.hostname}
