"""Albums: the photos of one ``media_group_id`` arrive as separate updates; collect them.

Items are gathered per chat and album until no new one has arrived for ``window_s`` seconds,
then handed over together, in the order the user sent them. The command is in one item's
caption (Telegram puts a typed caption on the first item, but any item may carry it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from telegram import Message

log = logging.getLogger(__name__)

MAX_ALBUM_ITEMS = 10  # Telegram's own limit for one media group


@dataclass
class _Pending:
    last_seen: float
    items: list[Message] = field(default_factory=list)


class AlbumCollector:
    def __init__(
        self,
        on_album: Callable[[list[Message]], Awaitable[None]],
        window_s: float = 1.5,
        max_pending: int = 256,
    ) -> None:
        self.on_album = on_album
        self.window_s = window_s
        self.max_pending = max_pending  # albums being collected at once, over all chats
        self._pending: dict[tuple[int, str], _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    def add(self, message: Message) -> None:
        """Collect one album item; the album is handled ``window_s`` after its last item."""
        if message.media_group_id is None:
            raise ValueError("not an album item")
        loop = asyncio.get_running_loop()
        key = (message.chat_id, message.media_group_id)
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                log.warning("too many albums in progress; dropping an item of %s", key)
                return
            pending = self._pending[key] = _Pending(loop.time())
            task = loop.create_task(self._flush_later(key), name=f"album-{key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(pending.items) < MAX_ALBUM_ITEMS:
            pending.items.append(message)
        pending.last_seen = loop.time()

    async def _flush_later(self, key: tuple[int, str]) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending[key]
        while not self._closing.is_set():
            delay = pending.last_seen + self.window_s - loop.time()
            if delay <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        del self._pending[key]
        items = sorted(pending.items, key=lambda m: m.message_id)
        try:
            await self.on_album(items)
        except Exception:  # one album's failure must not stop the others
            log.exception("album handling failed chat=%s", key[0])

    async def drain(self) -> None:
        """Wait until every album collected so far has been handled."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Handle the albums in progress now (shutdown), without waiting for their windows."""
        self._closing.set()
        await self.drain()
