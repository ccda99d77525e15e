"""Indexing the photos posted in chats for /search, on the adapters' side: whether a chat's
indexing is on (asked of the engine, cached per chat), and a bounded background pool that
downloads and indexes each photo without delaying a reply, reusing the bytes a command already
downloaded (:data:`Downloaded`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable

from engine.errors import RapbotError

log = logging.getLogger(__name__)

INDEX_DRAIN_S = 10.0  # an adapter's shutdown: how long photos still being indexed may take
# The photos a command downloaded, by the platform's id of each (Telegram file id, Discord
# attachment id): their bytes, or None for a download that failed or was cut short.
Downloaded = dict[Hashable, bytes | None]


class PhotoIndexing:
    """The adapters' side of indexing the photos posted in chats (``CommandCore.index_photo``).

    * :meth:`enabled`: whether a chat's indexing is on, asked of the engine at most once per
      ``ttl_s`` per chat (concurrent askers share one question), so a photo posted where
      indexing is off costs no download and no engine round-trip. Adapters call
      :meth:`forget` after an ``/index on|off`` so the change shows at once. A gateway that
      cannot tell (no ``indexing``) counts as off; an outage counts as off for ``error_ttl_s``.
    * :meth:`submit`: runs a download-and-index job in the background, so it never delays a
      reply: only where indexing is on, at most ``concurrency`` at a time (the engine answers
      commands too), at most ``max_pending`` queued; beyond that a photo is skipped (logged).
    * :meth:`fetch` and :meth:`submit_photo`: a photo a command downloads is recorded in a
      :data:`Downloaded` dict, so indexing it afterwards reuses those bytes (no second
      download) and skips a photo whose download failed (a failure is not retried).
    """

    def __init__(
        self,
        gateway,
        *,
        ttl_s: float = 60.0,
        error_ttl_s: float = 10.0,
        concurrency: int = 2,
        max_pending: int = 100,
        max_chats: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.ttl_s, self.error_ttl_s = ttl_s, error_ttl_s
        self.max_pending, self.max_chats = max_pending, max_chats
        self._clock = clock
        self._flags: dict[str, tuple[float, bool]] = {}  # scope -> (valid until, on)
        self._asking: dict[str, asyncio.Task[bool]] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)

    async def enabled(self, scope: str) -> bool:
        cached = self._flags.get(scope)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        asking = self._asking.get(scope)
        if asking is None:
            asking = asyncio.get_running_loop().create_task(self._ask(scope))
            self._asking[scope] = asking
        return await asyncio.shield(asking)

    async def _ask(self, scope: str) -> bool:
        ask, ttl = getattr(self.gateway, "indexing", None), self.ttl_s
        try:
            on = bool(await ask(scope)) if ask is not None else False
        except Exception as error:  # an outage: no indexing here for a little while
            log.warning("cannot tell whether scope=%s indexes photos: %s", scope, error)
            on, ttl = False, self.error_ttl_s
        if self._asking.get(scope) is asyncio.current_task():  # not forgotten meanwhile
            del self._asking[scope]
            self._flags.pop(scope, None)
            if len(self._flags) >= self.max_chats:
                self._flags.pop(next(iter(self._flags)))  # the longest-cached chat
            self._flags[scope] = (self._clock() + ttl, on)
        return on

    def forget(self, scope: str) -> None:
        """Ask the engine again next time (after ``/index on|off`` in this chat)."""
        self._flags.pop(scope, None)
        self._asking.pop(scope, None)

    def submit(self, scope: str, job: Callable[[], Awaitable[object]]) -> bool:
        """Run ``job`` (download the photo, ``CommandCore.index_photo``) in the background
        when the scope's indexing is on; False when it was dropped (too much pending)."""
        if len(self._jobs) >= self.max_pending:
            log.warning("photo indexing is behind: a photo of scope=%s is not indexed", scope)
            return False
        task = asyncio.get_running_loop().create_task(self._run(scope, job))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return True

    @staticmethod
    async def fetch(
        downloaded: Downloaded | None, key: Hashable, download: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """``download()``'s bytes, for a command; recorded in ``downloaded`` (when given) under
        ``key``: None until they arrive, so a download that fails or is cut short stays None
        and :meth:`submit_photo` skips the photo."""
        if downloaded is None:
            return await download()
        downloaded[key] = None
        data = await download()
        downloaded[key] = data
        return data

    def submit_photo(
        self,
        scope: str,
        key: Hashable,
        downloaded: Downloaded,
        download: Callable[[], Awaitable[bytes]],
        index: Callable[[bytes], Awaitable[object]],
    ) -> bool:
        """Index one photo posted in ``scope`` in the background (see :meth:`submit`):
        ``index(bytes)`` (``CommandCore.index_photo``) with the bytes a command already
        downloaded (``downloaded[key]``), else with those of ``download()``, called only once
        the scope's indexing is known to be on. False when the photo is skipped: the
        command's download of it failed (None), or too much is pending. A failing
        ``download()`` (a RapbotError, a timeout) is logged with ids only (the error's text
        may name the user's file) and the photo is skipped."""
        if key in downloaded and downloaded[key] is None:
            return False
        data = downloaded.get(key)

        async def job() -> None:
            try:
                photo = data if data is not None else await download()
            except (RapbotError, asyncio.TimeoutError) as error:
                log.info(
                    "photo not indexed scope=%s photo=%s: %s", scope, key, type(error).__name__
                )
                return
            await index(photo)

        return self.submit(scope, job)

    async def _run(self, scope: str, job: Callable[[], Awaitable[object]]) -> None:
        try:
            if await self.enabled(scope):
                async with self._slots:
                    await job()
        except Exception:  # a bug: never let it escape into the event loop's handler
            log.exception("indexing a photo failed scope=%s", scope)

    async def drain(self, timeout: float | None = None) -> int:
        """Wait for the jobs submitted so far (and those they lead to) for at most
        ``timeout`` s, then cancel the rest; returns how many were cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            _, pending = await asyncio.wait(set(self._jobs), timeout=left)
            if pending:
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
                return len(pending)
        return 0
