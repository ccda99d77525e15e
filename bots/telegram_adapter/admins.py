"""Who is a chat admin, asked of Telegram and remembered for a minute.

Admin rights decide who may rename, re-describe or forget other people's concepts and who may
turn photo indexing on; asking ``getChatMember`` for every such command would spend the bot's
request budget, so answers are cached per chat and user for a short while.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from telegram import Bot, Chat
from telegram.constants import ChatMemberStatus
from telegram.error import TelegramError

log = logging.getLogger(__name__)

_ADMIN_STATUSES = frozenset({ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER})


class AdminCache:
    def __init__(
        self,
        ttl_s: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._cache: dict[tuple[int, int], tuple[float, bool]] = {}

    async def is_admin(self, bot: Bot, chat: Chat, user_id: int) -> bool:
        """Whether ``user_id`` administers ``chat``; in a private chat the user is its admin."""
        if chat.type == Chat.PRIVATE:
            return True
        key = (chat.id, user_id)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        try:
            member = await bot.get_chat_member(chat.id, user_id)
        except TelegramError as error:  # not cached: the next command asks again
            log.warning("getChatMember failed chat=%s user=%s: %s", chat.id, user_id, error)
            return False
        admin = member.status in _ADMIN_STATUSES
        if len(self._cache) >= self.max_entries:  # keep memory bounded in busy deployments
            self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.ttl_s}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[key] = (now, admin)
        return admin
