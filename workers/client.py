"""The bots' side of distributed mode: :class:`CeleryGateway`, an async engine gateway.

It has the coroutines of :class:`bots.core.gateway.LocalGateway` (same names, same arguments,
same return types), so the command core does not know which one it talks to. Per call:
photos go into the blob store, the task is sent by name (routing comes from
:func:`workers.app.task_routes`), and the result is awaited; a returned error becomes the
same ``RapbotError`` again. Only this module and the config are needed: no engine, no torch.

Awaiting never blocks the event loop: the blocking Celery calls (publish, ``AsyncResult.get``)
run on a thread pool, and ``asyncio.wait_for`` bounds the whole call. Celery's Redis result
consumer is thread-safe (one pub/sub connection shared by the waiting threads), and results are
pushed, not polled. A timeout, a broker that refuses the publish after a few seconds of
retries, or a result backend that is down all become :class:`EngineUnavailableError` with a
message the bot can show; the task carries ``expires`` equal to the client timeout, so work
nobody waits for any more is dropped by the workers instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from celery import exceptions as celery_errors
from kombu.exceptions import OperationalError

from engine.errors import EngineUnavailableError
from engine.permissions import Actor
from engine.types import Answer, Box, Concept, ConceptSheet, PhotoHit, RememberResult
from rapbot.settings import WorkerSettings, load_settings
from workers import wire
from workers.app import PING, create_app, task_name
from workers.blobs import UNAVAILABLE, BlobStore, open_blob_store

log = logging.getLogger(__name__)
TOO_SLOW = "The engine took too long on this request; try again in a minute."


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        celery_errors.TimeoutError,
        celery_errors.BackendError,
        OperationalError,  # kombu: the publish failed after its retries
        OSError,  # refused / reset sockets (ConnectionError, TimeoutError are OSErrors)
    ]
    with contextlib.suppress(ImportError):
        import redis

        errors.append(redis.RedisError)  # includes "LOADING" right after a restart
    return tuple(errors)


class CeleryGateway:
    """``EngineGateway`` over Celery; see the module docstring."""

    def __init__(
        self,
        settings: WorkerSettings | None = None,
        *,
        app: Celery | None = None,
        blobs: BlobStore | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if settings is None:
            settings = load_settings()
        self.settings = settings
        self.app = app or create_app(self.settings, client=True)
        self.blobs = blobs or open_blob_store(self.settings.blob_url, self.settings.blob_ttl_s)
        self.timeout_s = float(timeout_s or self.settings.client_timeout_s)
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.client_max_waiting, thread_name_prefix="rapbot-celery"
        )
        self._unavailable = _unavailable_errors()

    # ------------------------------------------------------------------------- plumbing

    async def _call(
        self,
        operation: str,
        kwargs: dict[str, Any],
        photos: dict[str, bytes | None] | None = None,
        queue: str | None = None,
    ) -> Any:
        """Run one task and return its (error-checked) JSON result."""
        deadline = time.monotonic() + self.timeout_s
        loop = asyncio.get_running_loop()
        job = functools.partial(
            self._call_blocking, operation, kwargs, photos or {}, deadline, queue
        )
        try:
            result = await asyncio.wait_for(loop.run_in_executor(self._pool, job), self.timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s: no answer within %.1f s", operation, self.timeout_s)
            raise EngineUnavailableError(UNAVAILABLE) from None
        return wire.raise_for_error(result)

    def _call_blocking(
        self,
        operation: str,
        kwargs: dict[str, Any],
        photos: dict[str, bytes | None],
        deadline: float,
        queue: str | None,
    ) -> Any:
        keys: list[str] = []
        try:
            for arg, data in photos.items():
                kwargs[arg] = None if data is None else self.blobs.put(data)
                if kwargs[arg] is not None:
                    keys.append(kwargs[arg])
            options: dict[str, Any] = {"expires": self.timeout_s}
            if queue is not None:
                options["queue"] = queue
            name = PING if operation == "ping" else task_name(operation)
            async_result = self.app.send_task(name, kwargs=kwargs, **options)
            # Results are pushed (Redis pub/sub), not polled: get() returns as one arrives.
            remaining = max(0.05, deadline - time.monotonic())
            value = async_result.get(timeout=remaining, propagate=False)
            state = async_result.state
        except self._unavailable as error:
            log.warning("%s: engine unavailable: %s", operation, error)
            raise EngineUnavailableError(UNAVAILABLE) from None
        except RuntimeError as error:
            # Celery's result consumer gives up reconnecting with a bare RuntimeError ("must
            # be restarted"); it reconnects on the next call, so this is an outage too.
            if not isinstance(error.__cause__, self._unavailable):
                raise
            log.warning("%s: result backend unavailable: %s", operation, error.__cause__)
            raise EngineUnavailableError(UNAVAILABLE) from None
        if state != "SUCCESS":
            raise self._failure(operation, state, value)
        for key in keys:  # only after an answer: a redelivered task still needs its photo
            with contextlib.suppress(Exception):
                self.blobs.delete(key)
        if isinstance(value, dict) and isinstance(value.get("image"), str):
            value = {**value, "image": self._take_image(value["image"])}
        return value

    def _failure(self, operation: str, state: str, value: Any) -> Exception:
        if state == "REVOKED":  # expired in the queue: nobody was serving it in time
            return EngineUnavailableError(UNAVAILABLE)
        if isinstance(value, (celery_errors.TimeLimitExceeded, celery_errors.WorkerLostError)):
            return EngineUnavailableError(TOO_SLOW)
        # A bug in a task: the command core logs it and shows its generic apology.
        return RuntimeError(f"engine task {operation} ended {state}: {value!r}")

    def _take_image(self, key: str) -> bytes | None:
        try:
            return self.blobs.take(key)
        except Exception:  # an expired or unreachable annotated photo: answer without it
            return None

    # ------------------------------------------------------------------------- the engine's API

    async def remember(
        self,
        scope: str,
        image: bytes,
        name: str,
        description: str,
        user: str,
        box: Box | None = None,
        source: str | None = None,
    ) -> RememberResult:
        args = {
            "scope": scope,
            "name": name,
            "description": description,
            "user": user,
            "box": wire.box_to_json(box),
            "source": source,
        }
        return wire.remember_from_json(await self._call("remember", args, {"photo": image}))

    async def _answer(self, operation: str, args: dict, image: bytes | None) -> Answer:
        value = await self._call(operation, args, {"photo": image})
        return wire.answer_from_json(value, value.get("image"))

    async def recognize(self, scope: str, image: bytes, user: str | None = None) -> Answer:
        return await self._answer("recognize", {"scope": scope, "user": user}, image)

    async def ask(
        self, scope: str, image: bytes | None, question: str, user: str | None = None
    ) -> Answer:
        args = {"scope": scope, "question": question, "user": user}
        return await self._answer("ask", args, image)

    async def caption(self, scope: str, image: bytes, user: str | None = None) -> Answer:
        return await self._answer("caption", {"scope": scope, "user": user}, image)

    async def list_concepts(self, scope: str) -> list[Concept]:
        value = await self._call("list_concepts", {"scope": scope})
        return [wire.concept_from_json(c) for c in value["concepts"]]

    async def concept_sheet(self, scope: str, page: int = 1) -> ConceptSheet:
        value = await self._call("concept_sheet", {"scope": scope, "page": page})
        return wire.concept_sheet_from_json(value, value.get("image"))

    async def example_crops(self, scope: str, name: str, limit: int | None = None) -> list[bytes]:
        args = {"scope": scope, "name": name, "limit": limit}
        return wire.crops_from_json(await self._call("example_crops", args))

    async def _concept(self, operation: str, args: dict) -> Concept:
        return wire.concept_from_json((await self._call(operation, args))["concept"])

    async def rename(self, scope: str, name: str, new_name: str, actor: Actor) -> Concept:
        args = {"scope": scope, "name": name, "new_name": new_name}
        return await self._concept("rename", {**args, "actor": wire.actor_to_json(actor)})

    async def describe(self, scope: str, name: str, description: str, actor: Actor) -> Concept:
        args = {"scope": scope, "name": name, "description": description}
        return await self._concept("describe", {**args, "actor": wire.actor_to_json(actor)})

    async def forget(self, scope: str, name: str, actor: Actor) -> Concept:
        args = {"scope": scope, "name": name, "actor": wire.actor_to_json(actor)}
        return await self._concept("forget", args)

    async def forget_user(self, user: str) -> int:
        return int((await self._call("forget_user", {"user": user}))["removed"])

    async def set_indexing(
        self, scope: str, enabled: bool, actor: Actor, delete: bool = False
    ) -> int:
        args = {"scope": scope, "enabled": enabled, "actor": wire.actor_to_json(actor)}
        return int((await self._call("set_indexing", {**args, "delete": delete}))["removed"])

    async def indexing(self, scope: str) -> bool:
        return bool((await self._call("indexing", {"scope": scope}))["enabled"])

    async def index_photo(self, scope: str, image: bytes, user: str, source: str) -> int | None:
        args = {"scope": scope, "user": user, "source": source}
        return (await self._call("index_photo", args, {"photo": image}))["photo_id"]

    async def search(
        self, scope: str, text: str = "", ref_image: bytes | None = None, k: int = 10
    ) -> list[PhotoHit]:
        value = await self._call(
            "search", {"scope": scope, "text": text, "k": k}, {"photo": ref_image}
        )
        return wire.photo_hits_from_json(value)

    async def ping(self, queue: str | None = None) -> dict:
        """A worker's health (see ``workers.tasks.ping``); ``queue`` picks gpu or cpu."""
        return await self._call("ping", {}, queue=queue or self.settings.gpu_queue)

    def _stop_result_consumer(self) -> None:
        # Results nobody waits for any more (timed out) are still subscribed to; dropping the
        # list first stops their garbage collection from sending UNSUBSCRIBEs at exit.
        consumer = getattr(self.app.backend, "result_consumer", None)
        if consumer is not None and hasattr(consumer, "subscribed_to"):
            consumer.subscribed_to.clear()
            consumer.stop()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        closers: list[Callable[[], None]] = [
            self._stop_result_consumer,
            self.blobs.close,
            self.app.close,
        ]
        for close in closers:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, close)
