"""What the core hands an adapter's port to deliver: plain, platform-neutral data."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.types import Recognition


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
