"""How the command core reaches the engine: in-process (local mode) or remotely (Celery).

Adapters run an asyncio event loop; engine calls are slow (model forwards), so the local
gateway runs them on one worker thread: the loop never blocks, and the models see one request
at a time, which keeps memory flat on small machines.

Both gateways derive their operations from the one declaration in :mod:`engine.operations`
(``EngineGateway``): the local one runs them on the in-process engine, the Celery one
(``workers.client.CeleryGateway``) on workers.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from engine.operations import EngineGateway, Operation
from engine.types import Answer
from rapbot.metrics import register_engine

T = TypeVar("T")


class LocalGateway(EngineGateway):
    """Runs an in-process ``engine.Engine`` on a single worker thread; its operations are
    those of :data:`engine.operations.OPERATIONS` (see :class:`EngineGateway`)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapbot-engine")
        register_engine(engine)  # its models, batching and store counts on /metrics

    async def _run(self, fn: Callable[..., T], *args) -> T:
        loop = asyncio.get_running_loop()
        # In the caller's context: the engine's log lines carry the request's scope and command.
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(self._executor, call)

    async def _call(self, declared: Operation, arguments: dict[str, Any]) -> Any:
        # Positional, in the declared order: the engine's method takes these first.
        return await self._run(getattr(self.engine, declared.name), *arguments.values())

    async def _stream(self, declared: Operation, arguments: dict[str, Any]) -> AsyncIterator:
        """Runs the engine's blocking generator on the engine thread and hands its items to
        the event loop as they come; leaving the loop early stops the generator (and the
        generation)."""
        fn: Callable[..., Iterator] = getattr(self.engine, declared.stream_name)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        leave = threading.Event()
        end = object()

        def send(item, error=None) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (item, error))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                leave.set()

        def produce() -> None:
            iterator = fn(*arguments.values())
            try:
                for item in iterator:
                    send(item)
                    if leave.is_set():
                        break
            except BaseException as error:  # noqa: BLE001 - raised again in the consumer
                send(end, error)
                return
            finally:
                iterator.close()
            send(end)

        loop.run_in_executor(self._executor, contextvars.copy_context().run, produce)
        try:
            while True:
                item, error = await items.get()
                if item is end:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            leave.set()

    async def close(self) -> None:
        await self._run(self.engine.close)
        self._executor.shutdown(wait=True)


async def answer_stream(
    gateway, kind: str, scope: str, image: bytes | None, *args
) -> AsyncIterator[str | Answer]:
    """``gateway.ask_stream`` / ``caption_stream`` (``kind`` "ask" or "caption"), or, for a
    gateway that cannot stream, the whole answer as one piece followed by the Answer."""
    streaming = getattr(gateway, f"{kind}_stream", None)
    if streaming is not None:
        async for item in streaming(scope, image, *args):
            yield item
        return
    answer = await getattr(gateway, kind)(scope, image, *args)
    yield answer.text
    yield answer


async def growing_text(
    stream: AsyncIterator[str | Answer],
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[tuple[str, Answer | None]]:
    """The answer so far for a message that is edited as it grows: ``(text, None)`` at most
    once per ``interval`` seconds (chat platforms rate-limit edits: about one a second per
    chat on Telegram), then ``(full text, Answer)`` once at the end."""
    text = ""
    shown = ""
    last = float("-inf")
    async for item in stream:
        if isinstance(item, Answer):
            yield item.text, item
            return
        text += item
        now = clock()
        if text.strip() and text != shown and now - last >= interval:
            shown, last = text, now
            yield text, None


GATEWAY_KINDS = ("local", "celery")


def make_gateway(kind: str | None = None, settings=None, *, worker_settings=None) -> EngineGateway:
    """The gateway the configuration asks for: ``RAPBOT_GATEWAY=local`` (default) runs the
    engine in-process; ``celery`` talks to workers (distributed mode, see ``workers.client``).

    ``settings``: the ``EngineSettings`` of the local engine; ``worker_settings``: the
    ``rapbot.settings.WorkerSettings`` of the Celery client (both default to the environment).
    The Celery client is imported only here, so a bot in distributed mode never imports torch.
    """
    import os

    from engine.errors import InvalidInputError

    kind = (kind or os.environ.get("RAPBOT_GATEWAY") or "local").strip().lower()
    if kind == "local":
        from engine.engine import Engine

        return LocalGateway(Engine.open(settings))
    if kind == "celery":
        from workers.client import CeleryGateway

        return CeleryGateway(worker_settings)
    raise InvalidInputError(
        f"RAPBOT_GATEWAY must be one of {', '.join(GATEWAY_KINDS)}, not '{kind}'."
    )
