"""The Discord side of a request (:class:`DiscordPort`): replies, "typing…", downloads.

A reply goes where the request came from (:class:`Target`): an interaction's followup, or a
reply to the mentioning message. Text is split into pieces Discord accepts, the photo goes
with the first; /ask and /caption answers grow in place (:class:`GrowingReply`): the first
text is posted and then edited as the core hands over more, at most once a second; the last
edit carries the full content and the annotated photo, if any.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import discord
from discord.utils import MISSING

from bots.core.commands import BaseCommand
from bots.core.messages import Reply
from bots.core.request import BasePort
from bots.discord_adapter.files import Photo, download, fit_upload, upload_limit
from bots.discord_adapter.format import (
    ERROR_PREFIX,
    MAX_CONTENT,
    NO_MENTIONS,
    reply_content,
    split_content,
)
from engine.images import ImageLimits

log = logging.getLogger(__name__)

SEND_FAILED = "I worked out an answer but couldn't post it here; please try again."
PHOTO_REFUSED = "(The annotated photo could not be uploaded.)"


@contextlib.asynccontextmanager
async def _typing(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show "rapbot is typing…" while the engine works; carry on without it if refused."""
    typing = channel.typing()
    try:
        await typing.__aenter__()
    except discord.HTTPException as error:
        log.info("typing indicator refused: %s", error)
        yield
        return
    try:
        yield
    finally:
        await typing.__aexit__(None, None, None)


class Target(Protocol):
    """Where a reply goes: an interaction's followup or a reply to a message."""

    upload_limit: int

    async def send(self, content: str, file: discord.File | None) -> None: ...

    async def start(self, content: str) -> discord.Message:
        """Post ``content`` and return the message, to be edited as the answer grows."""
        ...


class FollowupTarget:
    """An interaction's answer: its followup once deferred; before that (a request the core
    refused before any work) the interaction's own response, only to the user."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.upload_limit = upload_limit(interaction)

    async def send(self, content: str, file: discord.File | None) -> None:
        extra = {"file": file} if file is not None else {}
        if not self.interaction.response.is_done():
            await self.interaction.response.send_message(
                content, allowed_mentions=NO_MENTIONS, ephemeral=True, **extra
            )
            return
        await self.interaction.followup.send(content, allowed_mentions=NO_MENTIONS, **extra)

    async def start(self, content: str) -> discord.Message:
        return await self.interaction.followup.send(
            content, allowed_mentions=NO_MENTIONS, wait=True
        )


class MessageReplyTarget:
    def __init__(self, message: discord.Message) -> None:
        self.message = message
        self.upload_limit = upload_limit(guild=message.guild)

    async def send(self, content: str, file: discord.File | None) -> None:
        await self.message.channel.send(
            content,
            file=file if file is not None else MISSING,
            allowed_mentions=NO_MENTIONS,
            # Still post the answer when the question was deleted meanwhile.
            reference=self.message.to_reference(fail_if_not_exists=False),
            mention_author=False,
        )

    async def start(self, content: str) -> discord.Message:
        return await self.message.channel.send(
            content,
            allowed_mentions=NO_MENTIONS,
            reference=self.message.to_reference(fail_if_not_exists=False),
            mention_author=False,
        )


async def deliver(target: Target, reply: Reply) -> None:
    """Post ``reply`` (text in pieces Discord accepts, the photo with the first piece)."""
    image, note = await fit_upload(reply.image, target.upload_limit)
    pieces = split_content(reply_content(reply, note))
    for index, piece in enumerate(pieces):
        file = discord.File(io.BytesIO(image), reply.image_name) if image and index == 0 else None
        try:
            await target.send(piece, file)
        except discord.HTTPException as error:
            log.warning("posting a reply failed: status=%s %s", error.status, error.text)
            if file is None:
                await best_effort(target, ERROR_PREFIX + SEND_FAILED)
                return
            # Often only the file was refused (too large for this channel): the text still goes.
            await best_effort(target, f"{piece}\n{PHOTO_REFUSED}"[:MAX_CONTENT])


async def best_effort(target: Target, content: str) -> None:
    """Send ``content``; a failure is logged, never raised (there is nobody left to tell)."""
    try:
        await target.send(content, None)
    except discord.HTTPException as error:
        log.warning("best-effort reply failed too: status=%s %s", error.status, error.text)


class GrowingReply:
    """One answer that is edited as it grows; ``show`` is the core's ``on_partial``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.message: discord.Message | None = None
        self._shown = ""

    async def show(self, text: str) -> None:
        content = split_content(reply_content(Reply(text)))[0]
        if content == self._shown:
            return
        try:
            if self.message is None:
                self.message = await self.target.start(content)
            else:
                await self.message.edit(content=content, allowed_mentions=NO_MENTIONS)
            self._shown = content
        except discord.HTTPException as error:  # only the preview is lost
            log.info("a partial answer was refused: status=%s %s", error.status, error.text)

    async def finish(self, reply: Reply) -> None:
        """The last edit, with the full content and the photo; or an ordinary reply when
        nothing was posted yet or the request ended in an error."""
        if self.message is None or reply.error:
            await deliver(self.target, reply)
            return
        image, note = await fit_upload(reply.image, self.target.upload_limit)
        first, *rest = split_content(reply_content(reply, note))
        files = [discord.File(io.BytesIO(image), reply.image_name)] if image else []
        extra = {"attachments": files} if files else {}
        try:
            await self.message.edit(content=first, allowed_mentions=NO_MENTIONS, **extra)
        except discord.HTTPException as error:
            log.warning("editing the answer failed: status=%s %s", error.status, error.text)
            try:  # often only the file was refused: the text still goes
                note = f"\n{PHOTO_REFUSED}" if image else ""
                await self.message.edit(content=f"{first}{note}"[:MAX_CONTENT])
            except discord.HTTPException:
                await best_effort(self.target, ERROR_PREFIX + SEND_FAILED)
                return
        for piece in rest:
            try:
                await self.target.send(piece, None)
            except discord.HTTPException:
                await best_effort(self.target, ERROR_PREFIX + SEND_FAILED)
                return


class DiscordPort(BasePort):
    """The core's port for one Discord request (see :mod:`bots.core.request`); admin rights
    come with the request (Discord sends the member's permissions along)."""

    def __init__(
        self,
        target: Target,
        limits: ImageLimits,
        typing_in: discord.abc.Messageable | None = None,
    ) -> None:
        self.target, self.limits, self.typing_in = target, limits, typing_in
        self.growing = GrowingReply(target)
        self.show_partial = self.growing.show

    async def download(self, photo: Photo) -> bytes:
        return await download(photo.attachment, self.limits)

    async def send(self, reply: Reply) -> None:
        await self.growing.finish(reply)  # an ordinary reply when nothing was posted yet

    def working(self, command: BaseCommand) -> AbstractAsyncContextManager[None]:
        # Interactions show "rapbot is thinking…" from their deferral; mentions show typing.
        if self.typing_in is None:
            return contextlib.nullcontext()
        return _typing(self.typing_in)
