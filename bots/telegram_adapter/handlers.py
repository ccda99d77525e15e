"""Telegram messages → the command core → replies.

Every entry point (a text command, a command in a photo's caption, an album, a mention of the
bot, a private message) comes down to :meth:`TelegramBot.serve`: decide the command text, fetch
the photo the command is about, ask Telegram whether the sender is an admin when it matters,
let the core answer, and send the answer back as a reply to the user's message.

Every photo (or image file) the bot sees in a chat, with a command or without, album items
included, then goes to the chat's search history when the chat's indexing is on
(``/index on``): in the background, after any reply, reusing the bytes a command already
downloaded; indexed as its Telegram file id, which /search sends back. Bots' photos are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

from telegram import Bot, Chat, Message, MessageEntity, Update
from telegram.constants import ChatAction
from telegram.ext import BaseHandler, CommandHandler, ContextTypes, MessageHandler, filters

from bots.core import commands as c
from bots.core.gateway import INDEX_DRAIN_S, Downloaded, PhotoIndexing
from bots.core.handler import INTERNAL_ERROR, CommandCore
from bots.core.messages import IncomingMessage, Reply
from bots.telegram_adapter.admins import AdminCache
from bots.telegram_adapter.albums import AlbumCollector
from bots.telegram_adapter.files import DOWNLOAD_FAILED, attachment_of, download, photo_for
from bots.telegram_adapter.send import (
    CHAT_ACTION_EVERY_S,
    GrowingMessage,
    Target,
    chat_action,
    send_reply,
)
from engine.errors import ImageError, RapbotError
from engine.images import ImageLimits

log = logging.getLogger(__name__)

PLATFORM_NOTES = (
    "On Telegram: put the command in a photo's caption, or send it as a reply to a photo; "
    "images sent as files work too. /remember NAME in the caption of an album adds every "
    "photo of it. Mention me with a photo to ask about it.\n"
    "Groups: bots run in privacy mode by default and then only see commands, mentions and "
    "replies to their own messages — enough for every command here, except that /remember on "
    "an album sees only the photo with the caption, and that with /index on I can index only "
    "the photos sent with a command or a mention, not plain ones. To let me see every photo, "
    "the bot's owner turns privacy mode off in @BotFather (/setprivacy → Disable) and adds me "
    "to the group again."
)
TIMEOUT_TEXT = "That took too long, sorry. Please try again in a minute."

# Telegram command names (a-z, 0-9, _): the core's commands, plus /start which opens every chat.
COMMANDS = (*c.USAGE, "start")
IMAGE_COMMANDS = (c.Remember, c.Who, c.Ask, c.Caption, c.Search)  # take a photo
STREAMED_COMMANDS = (c.Ask, c.Caption)  # answers that grow in place (see send.GrowingMessage)
ADMIN_COMMANDS = (c.Rename, c.Describe, c.Forget, c.Index)  # admins may act on others' data
_MENTIONS = (MessageEntity.MENTION, MessageEntity.TEXT_MENTION)


@dataclass(frozen=True)
class Sender:
    """Who sent a message, as the engine knows users (``tg:<id>``, never clashing with Discord)."""

    user_id: str
    name: str
    telegram_id: int | None  # for getChatMember; None when a chat speaks as itself
    anonymous_admin: bool  # a group admin posting as the group
    is_bot: bool


def scope_of(message: Message) -> str:
    """The scope of the message's chat (``tg:<chat id>``; a private chat's id is the user's)."""
    return f"tg:{message.chat_id}"


def sender_of(message: Message) -> Sender | None:
    chat = message.sender_chat
    if chat is not None:  # anonymous admins post as the group itself; channels as the channel
        return Sender(f"tg:{chat.id}", chat.title or "", None, chat.id == message.chat_id, False)
    user = message.from_user
    if user is None:
        return None
    return Sender(f"tg:{user.id}", user.full_name, user.id, False, user.is_bot)


def incoming(
    message: Message,
    sender: Sender,
    text: str = "",
    photos: Sequence[bytes] = (),
    *,
    is_admin: bool = False,
) -> IncomingMessage:
    """The core's view of ``message`` from ``sender``: the command ``text`` (empty for a photo
    to index) and ``photos`` (the first is the one the command is about; an album adds more)."""
    scope = scope_of(message)
    return IncomingMessage(
        scope=scope,
        user_id=sender.user_id,
        text=text,
        image=photos[0] if photos else None,
        images=tuple(photos[1:]),
        is_admin=is_admin,
        user_name=sender.name,
        message_id=f"{scope}:{message.message_id}",
        from_bot=sender.is_bot,
    )


def _addressee(text: str) -> str | None:
    """The ``name`` of ``/command@name ...``, or None for a bare ``/command``."""
    head = text[1:].split(maxsplit=1)[0] if text[1:].strip() else ""
    _, at, name = head.partition("@")
    return name if at else None


def _is_our_command(text: str) -> bool:
    """Whether ``/word`` is one of ours (usage mistakes included) rather than another bot's."""
    try:
        c.parse_command(text)
    except c.CommandError:
        word = (text[1:].split(maxsplit=1) or [""])[0].split("@", 1)[0].casefold()
        return word in COMMANDS
    return True


def _mention_question(message: Message, bot: Bot) -> str | None:
    """The message's text without the mention of this bot, or None when the bot isn't mentioned."""
    text = message.text if message.text is not None else message.caption
    if text is None:
        return None
    entities = (
        message.parse_entities(list(_MENTIONS))
        if message.text is not None
        else message.parse_caption_entities(list(_MENTIONS))
    )
    for entity, value in entities.items():
        ours = (
            entity.type == MessageEntity.MENTION
            and value[1:].casefold() == (bot.username or "").casefold()
        ) or (
            entity.type == MessageEntity.TEXT_MENTION
            and entity.user is not None
            and entity.user.id == bot.id
        )
        if ours:
            return " ".join(text.replace(value, " ", 1).split())
    return None


def command_text(message: Message, bot: Bot) -> str | None:
    """The command this message gives the bot, or None when the message is not for the bot.

    ``/cmd`` in a text or a caption (unless addressed to another bot with ``@name``, or an
    unknown bare command in a group, which is likely another bot's); a mention of the bot
    (``@bot is Mochi here?`` → ``/ask``; just ``@bot`` → ``/who``); any text in a private chat
    (a question, as in the terminal chat).
    """
    text = (message.text if message.text is not None else message.caption or "").strip()
    private = message.chat.type == Chat.PRIVATE
    if text.startswith("/"):
        addressee = _addressee(text)
        if addressee is not None:
            return text if addressee.casefold() == (bot.username or "").casefold() else None
        return text if private or _is_our_command(text) else None
    question = _mention_question(message, bot)
    if question is not None:
        if question.startswith("/"):
            return question
        return f"/ask {question}" if question else "/who"
    if private and text:
        return f"/ask {text}"
    return None


class TelegramBot:
    def __init__(
        self,
        core: CommandCore,
        image_limits: ImageLimits = ImageLimits(),
        album_window_s: float = 1.5,
        timeout_s: float = 120.0,
        chat_action_every_s: float = CHAT_ACTION_EVERY_S,
        admins: AdminCache | None = None,
        indexing: PhotoIndexing | None = None,
    ) -> None:
        self.core = core
        self.indexing = indexing or PhotoIndexing(core.gateway)
        self.image_limits = image_limits
        self.timeout_s = timeout_s  # bounds every request, and so a graceful shutdown
        self.chat_action_every_s = chat_action_every_s
        self.admins = admins or AdminCache()
        self.albums = AlbumCollector(self._on_album, album_window_s)
        self._bot: Bot | None = None  # set by the first update; albums are answered later

    def handlers(self) -> list[BaseHandler]:
        """The handlers, in the order PTB tries them (the first match in a group wins)."""
        new = filters.UpdateType.MESSAGE  # edits are ignored: no second answer to one message
        mentions = filters.Entity(MessageEntity.MENTION) | filters.CaptionEntity(
            MessageEntity.MENTION
        )
        text_mentions = filters.Entity(MessageEntity.TEXT_MENTION) | filters.CaptionEntity(
            MessageEntity.TEXT_MENTION
        )
        return [
            # Album items first: every photo of an album is collected, with a caption or not.
            MessageHandler(new & _IN_ALBUM, self.on_album_item),
            CommandHandler(COMMANDS, self.on_message, filters=new),
            # CommandHandler never looks at captions: commands typed as a photo's caption.
            MessageHandler(new & filters.CaptionRegex(r"^/"), self.on_message),
            MessageHandler(new & filters.COMMAND, self.on_message),  # aliases, unknown commands
            MessageHandler(new & (mentions | text_mentions), self.on_message),
            MessageHandler(
                new & filters.ChatType.PRIVATE & (filters.TEXT | filters.CAPTION), self.on_message
            ),
            # Last: any other photo, for the chat's search history (see _index_later).
            MessageHandler(new & (filters.PHOTO | filters.Document.IMAGE), self.on_message),
        ]

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None:
            return
        text = command_text(message, context.bot)
        downloaded: Downloaded = {}
        if text is not None:
            await self.serve(context.bot, message, text, downloaded=downloaded)
        self._index_later(context.bot, message, downloaded)

    async def on_album_item(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.effective_message is not None:
            self._bot = context.bot
            self.albums.add(update.effective_message)

    async def _on_album(self, items: list[Message]) -> None:
        bot = self._bot
        if bot is None:
            return
        downloaded: Downloaded = {}
        for item in items:
            text = command_text(item, bot)
            if text is not None:
                await self.serve(bot, item, text, album=items, downloaded=downloaded)
                break
        for item in items:
            self._index_later(bot, item, downloaded)

    async def close(self) -> None:
        """Shutdown: answer the albums still being collected, then give the photos being
        indexed a little time to finish."""
        await self.albums.close()
        await self.indexing.drain(INDEX_DRAIN_S)

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A bug or an outage in a handler: log it and still answer the user."""
        log.error("handling an update failed", exc_info=context.error)
        if isinstance(update, Update) and update.effective_message is not None:
            await send_reply(
                context.bot, Target.of(update.effective_message), Reply(INTERNAL_ERROR, error=True)
            )

    async def serve(
        self,
        bot: Bot,
        message: Message,
        text: str,
        album: Sequence[Message] = (),
        downloaded: Downloaded | None = None,
    ) -> None:
        """Answer the command ``text`` given by ``message`` (one item of ``album``, if any).

        ``downloaded`` receives the photos fetched for the command (file id → bytes, None for
        a failed download), so indexing them afterwards downloads nothing again."""
        sender = sender_of(message)
        if sender is None or sender.is_bot or message.is_automatic_forward:
            return  # other bots are never answered: two bots must not talk in a loop
        try:
            command: c.Command | None = c.parse_command(text)
        except c.CommandError:
            command = None  # the core answers with the usage
        target = Target.of(message)
        # Rate limits before any download; the core then doesn't count this request again.
        refusal = self.core.admit(scope_of(message), sender.user_id, text)
        if refusal is not None:
            await send_reply(bot, target, refusal)
            return
        growing = GrowingMessage(bot, target) if isinstance(command, STREAMED_COMMANDS) else None
        action = ChatAction.UPLOAD_PHOTO if isinstance(command, c.Who) else ChatAction.TYPING
        showing = (
            chat_action(bot, target, action, self.chat_action_every_s)
            if isinstance(command, IMAGE_COMMANDS)
            else contextlib.nullcontext()
        )
        async with showing:
            try:
                reply = await asyncio.wait_for(
                    self._answer(bot, message, sender, text, command, album, growing, downloaded),
                    self.timeout_s,
                )
            except asyncio.TimeoutError:
                log.warning("request timed out scope=%s", scope_of(message))
                reply = Reply(TIMEOUT_TEXT, error=True)
        if isinstance(command, c.Index):
            self.indexing.forget(scope_of(message))  # on or off, it shows at once
        if reply is not None and growing is not None:
            await growing.finish(reply)
        elif reply is not None:
            await send_reply(bot, target, reply)

    async def _answer(
        self,
        bot: Bot,
        message: Message,
        sender: Sender,
        text: str,
        command: c.Command | None,
        album: Sequence[Message],
        growing: GrowingMessage | None = None,
        downloaded: Downloaded | None = None,
    ) -> Reply | None:
        # Until core.handle() takes over, this request's metrics are ours (counted once).
        started = time.perf_counter()
        try:
            photos = await self._photos(bot, message, command, album, downloaded)
            is_admin = sender.anonymous_admin
            if (
                isinstance(command, ADMIN_COMMANDS)
                and not is_admin
                and sender.telegram_id is not None
            ):
                is_admin = await self.admins.is_admin(bot, message.chat, sender.telegram_id)
        except RapbotError as error:  # too large, not an image, download failed...
            outcome = _download_outcome(error)
            self.core.observe_unhandled(text, outcome, time.perf_counter() - started)
            return Reply(str(error), error=True)
        except asyncio.CancelledError:  # serve's time limit (or a shutdown) during the download
            self.core.observe_unhandled(text, "timeout", time.perf_counter() - started)
            raise
        except Exception:  # a bug: on_error answers the user
            self.core.observe_unhandled(text, "internal_error", time.perf_counter() - started)
            raise
        return await self.core.handle(
            incoming(message, sender, text, photos, is_admin=is_admin),
            admitted=True,
            on_partial=growing.show if growing is not None else None,
        )

    async def _photos(
        self,
        bot: Bot,
        message: Message,
        command: c.Command | None,
        album: Sequence[Message],
        downloaded: Downloaded | None = None,
    ) -> list[bytes]:
        """The photos the command needs: none, the one it is about, or a whole album
        (each also recorded in ``downloaded``)."""
        if not isinstance(command, IMAGE_COMMANDS):
            return []  # no download for commands that don't look at photos
        attachments = []
        if album and isinstance(command, c.Remember):
            for item in album:
                with contextlib.suppress(ImageError):  # a video in a mixed album: not an example
                    attachment = attachment_of(item)
                    if attachment is not None:
                        attachments.append(attachment)
        if not attachments:
            attachment = photo_for(message)
            attachments = [attachment] if attachment is not None else []
        fetches = (
            PhotoIndexing.fetch(
                downloaded, a.file_id, functools.partial(download, bot, a, self.image_limits)
            )
            for a in attachments
        )
        return list(await asyncio.gather(*fetches))

    # ------------------------------------------------------------------ search history

    def _index_later(self, bot: Bot, message: Message, downloaded: Downloaded) -> None:
        """Index the message's own photo in the background when the chat's indexing is on,
        with the bytes a command downloaded if any (a failed download is not retried)."""
        sender = sender_of(message)
        if sender is None or sender.is_bot:
            return  # bots' photos are not part of a chat's history
        try:
            attachment = attachment_of(message)
        except ImageError:
            return  # a video, a sticker, a PDF: nothing to index
        if attachment is None:
            return

        def fetch() -> Awaitable[bytes]:  # the size limits of every download apply
            return asyncio.wait_for(download(bot, attachment, self.image_limits), self.timeout_s)

        index = functools.partial(self._index, message, sender, attachment.search_source)
        self.indexing.submit_photo(scope_of(message), attachment.file_id, downloaded, fetch, index)

    async def _index(self, message: Message, sender: Sender, source: str, data: bytes) -> None:
        await self.core.index_photo(incoming(message, sender, photos=(data,)), source)


def _download_outcome(error: RapbotError) -> str:
    """The metrics outcome of a photo that could not be had: ``internal_error`` when
    Telegram's download failed, ``user_error`` when the user's file is refused (too large,
    not an image)."""
    return "internal_error" if str(error) == DOWNLOAD_FAILED else "user_error"


class _InAlbum(filters.MessageFilter):
    """Messages that are one item of an album (a media group)."""

    def filter(self, message: Message) -> bool:
        return message.media_group_id is not None


_IN_ALBUM = _InAlbum(name="InAlbum")
