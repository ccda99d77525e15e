"""How the command core reaches the engine: in-process (local mode) or remotely (Celery).

Adapters run an asyncio event loop; engine calls are slow (model forwards), so the local
gateway runs them on one worker thread: the loop never blocks, and the models see one request
at a time, which keeps memory flat on small machines.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from engine.permissions import Actor
from engine.types import Answer, Box, Concept, RememberResult

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

    async def list_concepts(self, scope: str) -> list[Concept]: ...

    async def rename(self, scope: str, name: str, new_name: str, actor: Actor) -> Concept: ...

    async def describe(self, scope: str, name: str, description: str, actor: Actor) -> Concept: ...

    async def forget(self, scope: str, name: str, actor: Actor) -> Concept: ...

    async def forget_user(self, user: str) -> int: ...

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

    async def close(self) -> None:
        await self._run(self.engine.close)
        self._executor.shutdown(wait=True)
