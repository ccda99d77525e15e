"""How the command core reaches the engine: in-process (local mode) or remotely (Celery).

Adapters run an asyncio event loop; engine calls are slow (model forwards), so the local
gateway runs them on one worker thread: the loop never blocks, and the models see one request
at a time, which keeps memory flat on small machines.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from engine.permissions import Actor
from engine.types import Answer, Box, Concept, PhotoHit, RememberResult

T = TypeVar("T")


class EngineGateway(Protocol):
    """The engine's operations as coroutines (same names and arguments as ``engine.Engine``)."""

    async def remember(
        self,
        scope: str,
        image: bytes,
        name: str,
        description: str,
        user: str,
        box: Box | None = None,
        source: str | None = None,
    ) -> RememberResult: ...

    async def recognize(self, scope: str, image: bytes, user: str | None = None) -> Answer: ...

    async def ask(
        self, scope: str, image: bytes | None, question: str, user: str | None = None
    ) -> Answer: ...

    async def caption(self, scope: str, image: bytes, user: str | None = None) -> Answer: ...

    def ask_stream(
        self, scope: str, image: bytes | None, question: str, user: str | None = None
    ) -> AsyncIterator[str | Answer]:
        """``ask`` as it is generated: text pieces, then the final Answer (its text is the
        pieces joined). Adapters edit their message as the pieces arrive."""
        ...

    def caption_stream(
        self, scope: str, image: bytes, user: str | None = None
    ) -> AsyncIterator[str | Answer]: ...

    async def list_concepts(self, scope: str) -> list[Concept]: ...

    async def rename(self, scope: str, name: str, new_name: str, actor: Actor) -> Concept: ...

    async def describe(self, scope: str, name: str, description: str, actor: Actor) -> Concept: ...

    async def forget(self, scope: str, name: str, actor: Actor) -> Concept: ...

    async def forget_user(self, user: str) -> int: ...

    async def set_indexing(
        self, scope: str, enabled: bool, actor: Actor, delete: bool = False
    ) -> int: ...

    async def index_photo(self, scope: str, image: bytes, user: str, source: str) -> int | None: ...

    async def search(
        self, scope: str, text: str = "", ref_image: bytes | None = None, k: int = 10
    ) -> list[PhotoHit]: ...

    async def close(self) -> None: ...


class LocalGateway:
    """Runs an in-process ``engine.Engine`` on a single worker thread."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapbot-engine")

    async def _run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def remember(self, scope, image, name, description, user, box=None, source=None):
        return await self._run(
            self.engine.remember, scope, image, name, description, user, box=box, source=source
        )

    async def recognize(self, scope, image, user=None):
        return await self._run(self.engine.recognize, scope, image, user)

    async def ask(self, scope, image, question, user=None):
        return await self._run(self.engine.ask, scope, image, question, user)

    async def caption(self, scope, image, user=None):
        return await self._run(self.engine.caption, scope, image, user)

    def ask_stream(self, scope, image, question, user=None) -> AsyncIterator[str | Answer]:
        return self._stream(self.engine.ask_stream, scope, image, question, user)

    def caption_stream(self, scope, image, user=None) -> AsyncIterator[str | Answer]:
        return self._stream(self.engine.caption_stream, scope, image, user)

    async def _stream(self, fn: Callable[..., Iterator[T]], *args) -> AsyncIterator[T]:
        """Runs a blocking generator on the engine thread and hands its items to the event
        loop as they come; leaving the loop early stops the generator (and the generation)."""
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
            iterator = fn(*args)
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

        loop.run_in_executor(self._executor, produce)
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

    async def list_concepts(self, scope):
        return await self._run(self.engine.list_concepts, scope)

    async def rename(self, scope, name, new_name, actor):
        return await self._run(self.engine.rename, scope, name, new_name, actor)

    async def describe(self, scope, name, description, actor):
        return await self._run(self.engine.describe, scope, name, description, actor)

    async def forget(self, scope, name, actor):
        return await self._run(self.engine.forget, scope, name, actor)

    async def forget_user(self, user):
        return await self._run(self.engine.forget_user, user)

    async def set_indexing(self, scope, enabled, actor, delete=False):
        return await self._run(self.engine.set_indexing, scope, enabled, actor, delete=delete)

    async def index_photo(self, scope, image, user, source):
        return await self._run(self.engine.index_photo, scope, image, user, source)

    async def search(self, scope, text="", ref_image=None, k=10):
        return await self._run(self.engine.search, scope, text, ref_image, k)

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
    ``workers.config.WorkerSettings`` of the Celery client (both default to the environment).
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
