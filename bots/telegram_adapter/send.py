"""The Telegram side of a request (:class:`TelegramPort`): replies, "typing…", downloads.

The port is the core's :class:`bots.core.request.ChatPort` for one message: it downloads the
photos the command looks at (files.py), asks Telegram whether the sender is a chat admin when
a command needs to know (admins.py), shows "typing…" and sends the core's reply.

A reply answers the user's message (``reply_parameters``), in HTML parse mode with every piece
of text escaped. An annotated photo carries the text as its caption when it fits; longer text
follows as messages of its own. Search results (``Reply.photo_refs``, Telegram file ids) go back
as one media group (a single photo as a photo: a media group needs two); images that were
posted as files (``document:<file id>``) as documents, in a group of their own since Telegram
does not mix the two. Only refs of that form are sent, and as media objects, never as strings:
Telegram would fetch a URL, and python-telegram-bot uploads a string that names a local file
(a source from a crafted archive such as ``document:credentials``). When
Telegram refuses a rich reply, a plain-text one is tried, so the user never meets silence.

/ask and /caption answers grow in place (:class:`GrowingMessage`): the first text is sent as a
reply, then edited as the core hands over more (the core paces partials, one a second by
default; unchanged text is never re-sent). The finished answer is a last edit with the full
HTML text (text beyond one message follows as messages of its own); when the answer carries an
annotated photo, the photo follows as its own reply, without a caption. An error after the
answer started (a timeout, an engine failure) is sent as a new message below the partial one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from telegram import (
    Bot,
    Document,
    InputFile,
    InputMediaDocument,
    InputMediaPhoto,
    LinkPreviewOptions,
    Message,
    PhotoSize,
    ReplyParameters,
)
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, Forbidden, TelegramError

from bots.core.commands import BaseCommand, Who
from bots.core.messages import Reply
from bots.telegram_adapter.admins import AdminCache
from bots.telegram_adapter.files import Attachment, SentFile, download, sendable_source
from bots.telegram_adapter.format import (
    CAPTION_LIMIT,
    MESSAGE_LIMIT,
    split_text,
    to_html,
    visible_length,
)
from engine.images import ImageLimits

log = logging.getLogger(__name__)

CHAT_ACTION_EVERY_S = 4.0  # Telegram shows an action for about 5 s
MAX_MEDIA_GROUP = 10  # Telegram's limit for one media group
_NO_PREVIEW = LinkPreviewOptions(is_disabled=True)


@dataclass(frozen=True)
class Target:
    """Where a reply goes: the chat, the forum topic if any, and the message it answers."""

    chat_id: int
    reply_to: int
    thread_id: int | None = None

    @classmethod
    def of(cls, message: Message) -> Target:
        thread = message.message_thread_id if message.is_topic_message else None
        return cls(message.chat_id, message.message_id, thread)


async def send_reply(bot: Bot, target: Target, reply: Reply) -> None:
    """Send ``reply``; a refused rich reply falls back to plain text, errors are logged."""
    try:
        await _send_rich(bot, target, reply)
    except Forbidden as error:  # blocked or removed from the chat: nobody to tell
        log.warning("cannot reply in chat=%s: %s", target.chat_id, error)
    except TelegramError as error:
        log.warning(
            "reply refused in chat=%s (%s); falling back to plain text", target.chat_id, error
        )
        await _send_plain_fallback(bot, target, reply)


async def _send_rich(bot: Bot, target: Target, reply: Reply) -> None:
    bold = [] if reply.error else [concept.name for concept in reply.concepts]
    refs = _sendable(target, reply.photo_refs)[:MAX_MEDIA_GROUP]
    text_fits_caption = visible_length(reply.text) <= CAPTION_LIMIT
    caption = to_html(reply.text, bold) if text_fits_caption and reply.text else None
    if refs:
        await _send_refs(bot, target, refs, caption)
    elif reply.image is not None:
        await bot.send_photo(
            target.chat_id,
            InputFile(reply.image, filename=reply.image_name),
            caption=caption,
            parse_mode=ParseMode.HTML,
            reply_parameters=_reply_parameters(target),
            message_thread_id=target.thread_id,
        )
    else:
        caption = None  # no photo: the text goes as messages below
    if caption is None and reply.text:
        await _send_text(bot, target, reply.text, bold)


def _sendable(target: Target, refs: tuple[str, ...]) -> list[SentFile]:
    """The refs that are Telegram file ids of this adapter's form (see
    :func:`files.sendable_source`); anything else (a URL Telegram would fetch, a name of a
    local file python-telegram-bot would upload, from a crafted archive) is left out, logged by
    count (the ref itself could be anything, so it is not logged)."""
    kept = [sent for sent in map(sendable_source, refs) if sent is not None]
    if len(kept) != len(refs):
        log.warning(
            "skipped %d search result(s) that are not Telegram file ids in chat=%s",
            len(refs) - len(kept),
            target.chat_id,
        )
    return kept


def _by_file_id(sent: SentFile) -> PhotoSize | Document:
    """The file id as a Telegram media object: python-telegram-bot sends such an object by its
    id, whereas a plain string that names an existing local file is read and uploaded."""
    if sent.kind == "photo":
        return PhotoSize(sent.file_id, sent.file_id, 0, 0)
    return Document(sent.file_id, sent.file_id)


async def _send_refs(bot: Bot, target: Target, refs: list[SentFile], caption: str | None) -> None:
    """Photos of the chat by file id, best first: the photos, then the image files; the
    caption goes with the first message."""
    where = {
        "reply_parameters": _reply_parameters(target),
        "message_thread_id": target.thread_id,
    }
    for kind, media_type in (("photo", InputMediaPhoto), ("document", InputMediaDocument)):
        group = [_by_file_id(sent) for sent in refs if sent.kind == kind]
        if not group:
            continue
        styled = {"caption": caption, "parse_mode": ParseMode.HTML} if caption else {}
        if len(group) == 1 and kind == "photo":
            await bot.send_photo(target.chat_id, group[0], **styled, **where)
        elif len(group) == 1:
            await bot.send_document(target.chat_id, group[0], **styled, **where)
        else:
            media = [media_type(ref) for ref in group]
            media[0] = media_type(group[0], **styled)
            await bot.send_media_group(target.chat_id, media, **where)
        caption = None


async def _send_message(bot: Bot, target: Target, text: str, **markup) -> None:
    """One text message in reply to the request (in its thread, no link previews)."""
    await bot.send_message(
        target.chat_id,
        text,
        reply_parameters=_reply_parameters(target),
        message_thread_id=target.thread_id,
        link_preview_options=_NO_PREVIEW,
        **markup,
    )


async def _send_text(bot: Bot, target: Target, text: str, bold: list[str]) -> None:
    for piece in split_text(text, MESSAGE_LIMIT):
        try:
            await _send_message(bot, target, to_html(piece, bold), parse_mode=ParseMode.HTML)
        except BadRequest as error:
            if "entities" not in str(error).lower():
                raise
            # Our markup was refused (should not happen): the same words without any markup.
            await _send_message(bot, target, piece)


async def _send_plain_fallback(bot: Bot, target: Target, reply: Reply) -> None:
    text = reply.text or "Sorry, I couldn't send my answer here."
    if reply.image is not None or reply.photo_refs:
        text += "\n(Telegram refused the photo, so here is my answer without it.)"
    try:
        for piece in split_text(text, MESSAGE_LIMIT):
            await _send_message(bot, target, piece)
    except TelegramError as error:
        log.error("could not reply in chat=%s at all: %s", target.chat_id, error)


def _reply_parameters(target: Target) -> ReplyParameters:
    # The user may delete their message while we work: answer anyway.
    return ReplyParameters(target.reply_to, allow_sending_without_reply=True)


@contextlib.asynccontextmanager
async def chat_action(
    bot: Bot, target: Target, action: str = ChatAction.TYPING, every_s: float = CHAT_ACTION_EVERY_S
) -> AsyncIterator[None]:
    """Show ``action`` ("typing…", "sending a photo…") until the block ends.

    The first action is sent before the work starts; a background task repeats it, since
    Telegram clears it after about five seconds. Failures only cost the indicator.
    """

    async def send_once() -> None:
        try:
            await bot.send_chat_action(target.chat_id, action, message_thread_id=target.thread_id)
        except TelegramError as error:
            log.debug("chat action failed chat=%s: %s", target.chat_id, error)

    async def repeat() -> None:
        while True:
            await asyncio.sleep(every_s)
            await send_once()

    await send_once()
    task = asyncio.get_running_loop().create_task(repeat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class GrowingMessage:
    """One reply that is edited as the answer grows; ``show`` is the core's ``on_partial``."""

    def __init__(self, bot: Bot, target: Target) -> None:
        self.bot = bot
        self.target = target
        self.message_id: int | None = None
        self._shown = ""  # the HTML of the message as Telegram has it now

    @property
    def started(self) -> bool:
        return self.message_id is not None

    async def show(self, text: str) -> None:
        """The core's ``on_partial``: a refused edit only costs the preview, the final
        answer is still delivered."""
        try:
            await self._put(text, [])
        except TelegramError as error:
            log.info("a partial answer was refused in chat=%s: %s", self.target.chat_id, error)

    async def _put(self, text: str, bold: list[str]) -> None:
        """Send or edit the message to ``text`` (its first message-sized piece)."""
        html = to_html(split_text(text, MESSAGE_LIMIT)[0], bold)
        if html == self._shown:
            return  # Telegram refuses edits that change nothing
        target = self.target
        if self.message_id is None:
            sent = await self.bot.send_message(
                target.chat_id,
                html,
                parse_mode=ParseMode.HTML,
                reply_parameters=_reply_parameters(target),
                message_thread_id=target.thread_id,
                link_preview_options=_NO_PREVIEW,
            )
            self.message_id = sent.message_id
        else:
            await self.bot.edit_message_text(
                html,
                chat_id=target.chat_id,
                message_id=self.message_id,
                parse_mode=ParseMode.HTML,
                link_preview_options=_NO_PREVIEW,
            )
        self._shown = html

    async def finish(self, reply: Reply) -> None:
        """The final answer: a last edit (and the photo after it), or an ordinary reply when
        nothing was shown yet or the request ended in an error."""
        if self.message_id is None or reply.error or not reply.text:
            await send_reply(self.bot, self.target, reply)
            return
        target = self.target
        bold = [concept.name for concept in reply.concepts]
        _, *rest = split_text(reply.text, MESSAGE_LIMIT)
        try:
            await self._put(reply.text, bold)
            for piece in rest:
                await _send_text(self.bot, target, piece, bold)
            if reply.image is not None:
                await self.bot.send_photo(
                    target.chat_id,
                    InputFile(reply.image, filename=reply.image_name),
                    reply_parameters=_reply_parameters(target),
                    message_thread_id=target.thread_id,
                )
        except Forbidden as error:
            log.warning("cannot reply in chat=%s: %s", target.chat_id, error)
        except TelegramError as error:
            log.warning("final answer refused in chat=%s (%s)", target.chat_id, error)
            await _send_plain_fallback(self.bot, target, reply)


class TelegramPort:
    """The core's port for one Telegram message (see :mod:`bots.core.request`)."""

    def __init__(
        self,
        bot: Bot,
        message: Message,
        telegram_id: int | None,
        image_limits: ImageLimits,
        admins: AdminCache,
        chat_action_every_s: float = CHAT_ACTION_EVERY_S,
    ) -> None:
        self.bot, self.message, self.telegram_id = bot, message, telegram_id
        self.image_limits, self.admins = image_limits, admins
        self.chat_action_every_s = chat_action_every_s
        self.target = Target.of(message)
        self.growing = GrowingMessage(bot, self.target)
        self.show_partial = self.growing.show

    async def download(self, photo: Attachment) -> bytes:
        return await download(self.bot, photo, self.image_limits)

    async def send(self, reply: Reply) -> None:
        await self.growing.finish(reply)  # an ordinary reply when nothing was shown yet

    def working(self, command: BaseCommand) -> AbstractAsyncContextManager[None]:
        if not command.takes_photo:
            return contextlib.nullcontext()  # quick answers: no indicator
        action = ChatAction.UPLOAD_PHOTO if isinstance(command, Who) else ChatAction.TYPING
        return chat_action(self.bot, self.target, action, self.chat_action_every_s)

    async def is_admin(self) -> bool:
        if self.telegram_id is None:
            return False
        return await self.admins.is_admin(self.bot, self.message.chat, self.telegram_id)
