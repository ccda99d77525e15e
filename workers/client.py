"""The bots' side of distributed mode: :class:`CeleryGateway`, an async engine gateway.

Its operations are those every gateway has (:class:`engine.operations.EngineGateway`, derived
from the declarations), so the command core does not know which gateway it talks to. Per call:
photos go into the blob store, the task is sent by name (routing comes from
:func:`workers.app.task_routes`), arguments and result cross as the JSON of
:mod:`workers.wire`, and a returned error becomes the same ``RapbotError`` again. A streaming
call (``ask_stream``, ``caption_stream``) runs the ``<name>_stream`` task and yields the text
the worker publishes while it generates (:mod:`workers.streams`), then the result. Only this
module and the settings are needed: no engine, no torch.

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
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from celery import exceptions as celery_errors
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from engine.errors import EngineUnavailableError, RapbotError
from engine.operations import EngineGateway, Operation
from rapbot.settings import WorkerSettings, load_settings
from workers import wire
from workers.app import PING, create_app, task_name
from workers.blobs import UNAVAILABLE, BlobStore, open_blob_store
from workers.streams import PieceReader

log = logging.getLogger(__name__)
TOO_SLOW = "The engine took too long on this request; try again in a minute."
STREAM_POLL_S = 0.25  # a streamed answer: longest wait for new text before checking the result


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


class CeleryGateway(EngineGateway):
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

    # ------------------------------------------------------------------------- operations

    async def _call(self, declared: Operation, arguments: dict[str, Any]) -> Any:
        return await self._send_and_wait(task_name(declared.name), declared, arguments)

    async def _stream(self, declared: Operation, arguments: dict[str, Any]) -> AsyncIterator:
        """The ``<name>_stream`` task: its text as the worker publishes it (see
        :mod:`workers.streams`), then its result. Leaving early stops the reading; the worker
        finishes the answer (bounded by the generator's length and the task time limits)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        leave = threading.Event()

        def on_piece(text: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(pieces.put_nowait, text)

        name = task_name(declared.stream_name)
        result = asyncio.ensure_future(
            self._send_and_wait(name, declared, arguments, on_piece=on_piece, leave=leave)
        )
        try:
            while not result.done() or not pieces.empty():
                waiting = asyncio.ensure_future(pieces.get())
                await asyncio.wait({waiting, result}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield waiting.result()
                else:
                    waiting.cancel()
            yield result.result()
        finally:
            leave.set()
            if not result.done():
                result.cancel()

    async def ping(self, queue: str | None = None) -> dict:
        """A worker's health (see ``workers.tasks.ping``); ``queue`` picks gpu or cpu."""
        return await self._send_and_wait(PING, None, {}, queue=queue or self.settings.gpu_queue)

    # ------------------------------------------------------------------------- plumbing

    async def _send_and_wait(
        self,
        name: str,
        declared: Operation | None,
        arguments: dict[str, Any],
        *,
        queue: str | None = None,
        on_piece: Callable[[str], None] | None = None,
        leave: threading.Event | None = None,
    ) -> Any:
        """Run one task and return its (error-checked, decoded) result."""
        deadline = time.monotonic() + self.timeout_s
        loop = asyncio.get_running_loop()
        job = functools.partial(
            self._send_and_wait_blocking, name, declared, arguments, deadline, queue, on_piece,
            leave,
        )  # fmt: skip
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, job), self.timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s: no answer within %.1f s", name, self.timeout_s)
            raise EngineUnavailableError(UNAVAILABLE) from None

    def _send_and_wait_blocking(
        self,
        name: str,
        declared: Operation | None,
        arguments: dict[str, Any],
        deadline: float,
        queue: str | None,
        on_piece: Callable[[str], None] | None,
        leave: threading.Event | None,
    ) -> Any:
        keys: list[str] = []

        def put(data: bytes) -> str:
            keys.append(self.blobs.put(data))
            return keys[-1]

        try:
            kwargs = (
                arguments if declared is None else wire.arguments_to_json(declared, arguments, put)
            )
            options: dict[str, Any] = {"expires": self.timeout_s}
            if queue is not None:
                options["queue"] = queue
            async_result = self.app.send_task(name, kwargs=kwargs, **options)
            if on_piece is not None:
                self._relay_pieces(async_result, deadline, on_piece, leave or threading.Event())
                if leave is not None and leave.is_set():
                    return None  # the caller left the stream: nobody waits for the result
            # Results are pushed (Redis pub/sub), not polled: get() returns as one arrives.
            remaining = max(0.05, deadline - time.monotonic())
            value = async_result.get(timeout=remaining, propagate=False)
            state = async_result.state
        except self._unavailable as error:
            log.warning("%s: engine unavailable: %s", name, error)
            raise EngineUnavailableError(UNAVAILABLE) from None
        except RuntimeError as error:
            # Celery's result consumer gives up reconnecting with a bare RuntimeError ("must
            # be restarted"); it reconnects on the next call, so this is an outage too.
            if not isinstance(error.__cause__, self._unavailable):
                raise
            log.warning("%s: result backend unavailable: %s", name, error.__cause__)
            raise EngineUnavailableError(UNAVAILABLE) from None
        if state != "SUCCESS":
            raise self._failure(name, state, value)
        for key in keys:  # only after an answer: a redelivered task still needs its photo
            with contextlib.suppress(Exception):
                self.blobs.delete(key)
        wire.raise_for_error(value)
        return (
            value if declared is None else wire.result_from_json(declared, value, self._take_image)
        )

    def _relay_pieces(
        self,
        async_result: AsyncResult,
        deadline: float,
        on_piece: Callable[[str], None],
        leave: threading.Event,
    ) -> None:
        """Hand ``on_piece`` the text the task publishes until it has a result (or the caller
        left, or the deadline passed); the text published before the result is all read."""
        reader = PieceReader(self.blobs, async_result.id)
        try:
            while not leave.is_set() and time.monotonic() < deadline:
                finished = async_result.ready()  # one GET; the pieces came before the result
                text = reader.read(0 if finished else STREAM_POLL_S)
                if text:
                    on_piece(text)
                if finished:
                    return
        except RapbotError as error:  # the blob store is down: the answer still comes whole
            log.warning("streamed pieces unavailable: %s", error)

    def _failure(self, name: str, state: str, value: Any) -> Exception:
        if state == "REVOKED":  # expired in the queue: nobody was serving it in time
            return EngineUnavailableError(UNAVAILABLE)
        if isinstance(value, (celery_errors.TimeLimitExceeded, celery_errors.WorkerLostError)):
            return EngineUnavailableError(TOO_SLOW)
        # A bug in a task: the command core logs it and shows its generic apology.
        return RuntimeError(f"engine task {name} ended {state}: {value!r}")

    def _take_image(self, key: str) -> bytes | None:
        try:
            return self.blobs.take(key)
        except Exception:  # an expired or unreachable annotated photo: answer without it
            return None

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
