"""What an adapter hands the core and what it gets back: plain, platform-neutral data."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.types import Recognition


@dataclass(frozen=True)
class IncomingMessage:
    """One chat message addressed to the bot.

    ``scope`` is the chat (``tg:<chat_id>``, ``dc:<channel_id>``, ``local``); ``image`` is the
    photo attached to the message or to the message it replies to; ``is_admin`` is decided by
    the adapter from the platform's own notion of chat administrators.
    """

    scope: str
    user_id: str
    text: str
    image: bytes | None = None
    images: tuple[bytes, ...] = ()  # further photos of an album, after ``image``
    is_admin: bool = False
    user_name: str = ""
    message_id: str | None = None  # makes /remember idempotent when delivered twice
    from_bot: bool = False  # other bots' messages are ignored (no loops between bots)


@dataclass(frozen=True)
class Reply:
    """Plain text (adapters escape it for their parse mode) and an optional JPEG."""

    text: str
    image: bytes | None = None
    image_name: str = "rapbot.jpg"
    concepts: list[Recognition] = field(default_factory=list)
    error: bool = False
    # Photos of the chat to send back by platform reference (search results: Telegram file
    # ids, Discord attachment ids); adapters send them as one album.
    photo_refs: tuple[str, ...] = ()
