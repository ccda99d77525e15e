"""What an adapter hands the core: one :class:`ChatRequest` and a :class:`ChatPort`.

A new chat surface (Telegram, Discord, the terminal, a web chat) is one folder that does two
things and nothing else:

1. translate a platform event into a :class:`ChatRequest`: the chat's ``scope``
   (``<platform>:<chat id>``, e.g. ``web:alice``), the sender (:class:`Sender`, its id made
   by :func:`user_id`), the command (already parsed, or the text for the core to parse) and
   the platform's references to the photos the command may look at;
2. implement :class:`ChatPort` for that request: download a photo, send the reply, show the
   answer as it grows, show "typing…", tell whether the sender administers the chat.

Then ``await core.serve(request, port)`` does the rest, in this order and nowhere else: parse
the command once, apply the rate limits and the in-flight bound (before any download), fetch
the photos through the port, ask the engine, count the request in the metrics once, and hand
the reply to ``port.send`` (see :mod:`bots.core.serve`). Every error a user can cause becomes a
reply; the port never sees an exception from the core.

:class:`BasePort` gives the optional parts a plain default, so a minimal port is a class with
``download`` and ``send``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from bots.core.commands import BaseCommand
from bots.core.messages import Reply
from engine.errors import RapbotError

# A platform's reference to a photo (a Telegram attachment, a discord.Attachment, bytes...):
# opaque to the core, which only hands it back to ``ChatPort.download`` and uses it as a key
# (a photo a command downloaded is not downloaded again to index it).
PhotoRef = Hashable


def user_id(platform: str, platform_user_id: object) -> str:
    """How the engine knows a chat user: ``<platform>:<the platform's id>`` (``tg:42``,
    ``dc:42``), the same rule on every platform, so ids never clash between platforms and
    /forget_me on one platform never touches another's users."""
    return f"{platform}:{platform_user_id}"


@dataclass(frozen=True)
class Sender:
    """Who sent the request. ``id`` is namespaced (:func:`user_id`); bots are never answered
    (two bots must not talk to each other in a loop) and their photos never indexed."""

    id: str
    name: str = ""
    is_bot: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """One chat message (or slash command) addressed to the bot.

    ``command`` is a parsed command (typed slash options become one directly: nothing is
    re-parsed, so a ``|`` in a description or question stays as typed) or the text the user
    typed (``/remember Mochi | my cat``), parsed once by the core. Either way a name follows
    the engine's one naming rule (``engine.validation.clean_name``). ``photos``: the photo
    the command is about first (the message's own or the one it replies to), an album's other
    photos after it. ``photo_error``: the message carried a file that is no photo (a PDF, a
    video); the user hears it when the command wanted a photo. ``is_admin``: known up front,
    or None to ask ``port.is_admin()`` only for commands where it matters (it may cost a
    platform request). ``message_id`` makes /remember idempotent when a platform delivers a
    message twice.
    """

    scope: str
    sender: Sender
    command: BaseCommand | str
    photos: tuple[PhotoRef, ...] = ()
    photo_error: RapbotError | None = None
    is_admin: bool | None = None
    message_id: str | None = None

    @property
    def platform(self) -> str:
        """The platform that made the request: the scope's prefix (``tg``, ``dc``, ``web``)."""
        return self.scope.partition(":")[0]


class ChatPort(Protocol):
    """What the core needs of a platform for one request: five methods, no more.

    ``show_partial`` may be None: the answer is then sent once, whole."""

    async def download(self, photo: PhotoRef) -> bytes:
        """The photo's bytes, within the platform's size limits; a RapbotError whose message
        the user should read otherwise (its ``outcome`` says whose failure it was)."""
        ...

    async def send(self, reply: Reply) -> None:
        """Deliver the reply: text, an annotated photo, search results by ``photo_refs``
        (sources this platform made; anything else must be left out). After partial answers
        were shown, this is the last edit of that growing message. Never raises: a refused
        delivery is logged, or retried as plain text."""
        ...

    show_partial: Callable[[str], Awaitable[None]] | None
    """Show the answer so far (a growing message: posted once, then edited), or None."""

    def working(self, command: BaseCommand) -> AbstractAsyncContextManager[None]:
        """Held while the core works on ``command``: "typing…", "sending a photo…"."""
        ...

    async def is_admin(self) -> bool:
        """Whether the sender administers the chat (asked only when ``is_admin`` is None
        and the command's ``admin_matters``)."""
        ...


class BasePort:
    """Defaults for a :class:`ChatPort`: no streaming, no indicator, not an admin."""

    show_partial: Callable[[str], Awaitable[None]] | None = None

    async def download(self, photo: PhotoRef) -> bytes:
        if isinstance(photo, bytes):
            return photo
        raise TypeError(f"{type(self).__name__} cannot download {type(photo).__name__}")

    async def send(self, reply: Reply) -> None:
        raise NotImplementedError

    def working(self, command: BaseCommand) -> AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def is_admin(self) -> bool:
        return False


class CollectingPort(BasePort):
    """A port that keeps what is sent (the terminal chat, tests, a request/response API):
    photos are given as bytes."""

    def __init__(self, is_admin: bool = False, *, streaming: bool = False) -> None:
        self.replies: list[Reply] = []
        self.partials: list[str] = []  # the answer so far, each time it grew (``streaming``)
        self._is_admin = is_admin
        if streaming:
            self.show_partial = self._keep_partial

    async def _keep_partial(self, text: str) -> None:
        self.partials.append(text)

    async def send(self, reply: Reply) -> None:
        self.replies.append(reply)

    async def is_admin(self) -> bool:
        return self._is_admin
