"""Telegram messages → :class:`ChatRequest` for the core (which answers through a
:class:`send.TelegramPort`).

Every entry point (a text command, a command in a photo's caption, an album, a mention of the
bot, a private message) comes down to :meth:`TelegramBot.serve`: decide the command text and
the photos it may be about, and hand them to ``CommandCore.serve``; the port downloads, asks
Telegram whether the sender is an admin when it matters, and replies to the user's message.

Every photo (or image file) the bot sees in a chat, with a command or without, album items
included, then goes to the chat's search history when the chat's indexing is on
(``/index on``): in the background, after any reply, reusing the bytes a command already
downloaded; indexed as its Telegram file id, which /search sends back. Bots' photos are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from telegram import Bot, Chat, Message, MessageEntity, Update
from telegram.ext import BaseHandler, CommandHandler, ContextTypes, MessageHandler, filters

from bots.core import commands as c
from bots.core.messages import Reply
from bots.core.photo_indexing import INDEX_DRAIN_S, Downloaded
from bots.core.request import ChatRequest, Sender, user_id
from bots.core.serve import INTERNAL_ERROR, CommandCore
from bots.telegram_adapter.admins import AdminCache
from bots.telegram_adapter.albums import AlbumCollector
from bots.telegram_adapter.files import Attachment, attachment_of, download, photo_for
from bots.telegram_adapter.send import (
    CHAT_ACTION_EVERY_S,
    Target,
    TelegramPort,
    send_reply,
)
from engine.errors import ImageError
from engine.images import ImageLimits

log = logging.getLogger(__name__)

TELEGRAM_WORDS = c.PhotoWords(
    attach="as the caption of a photo, or in reply to one",
    short="caption or reply",
    reference="in reply to a photo",
    missing="Send a photo with this command as its caption, or reply to a photo with the command.",
)
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
# Telegram command names (a-z, 0-9, _): the core's commands, plus /start which opens every chat.
COMMANDS = (*c.USAGE, "start")
_MENTIONS = (MessageEntity.MENTION, MessageEntity.TEXT_MENTION)


@dataclass(frozen=True)
class TelegramSender:
    """Who sent a message: the core's :class:`Sender` and what Telegram adds to it."""

    sender: Sender
    telegram_id: int | None  # for getChatMember; None when a chat speaks as itself
    anonymous_admin: bool  # a group admin posting as the group

    @property
    def is_admin(self) -> bool | None:
        """Known up front (an anonymous admin, a chat speaking as itself), or None: ask."""
        if self.anonymous_admin or self.telegram_id is None:
            return self.anonymous_admin
        return None


def scope_of(message: Message) -> str:
    """The scope of the message's chat (``tg:<chat id>``; a private chat's id is the user's)."""
    return f"tg:{message.chat_id}"


def sender_of(message: Message) -> TelegramSender | None:
    chat = message.sender_chat
    if chat is not None:  # anonymous admins post as the group itself; channels as the channel
        posted_as = Sender(user_id("tg", chat.id), chat.title or "")
        return TelegramSender(posted_as, None, chat.id == message.chat_id)
    user = message.from_user
    if user is None:
        return None
    return TelegramSender(
        Sender(user_id("tg", user.id), user.full_name, user.is_bot), user.id, False
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
        chat_action_every_s: float = CHAT_ACTION_EVERY_S,
        admins: AdminCache | None = None,
    ) -> None:
        self.core = core
        self.indexing = core.indexing
        self.image_limits = image_limits
        self.chat_action_every_s = chat_action_every_s
        self.admins = admins or AdminCache()
        self.albums = AlbumCollector(self._on_album, album_window_s)
        self._bot: Bot | None = None  # set by the first update; albums are answered later

    @property
    def timeout_s(self) -> float | None:
        """The time limit of every request (the core's), and so of a graceful shutdown."""
        return self.core.time_limit_s

    @timeout_s.setter
    def timeout_s(self, seconds: float | None) -> None:
        self.core.time_limit_s = seconds

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

        ``downloaded`` receives the photos fetched for the command (see
        ``CommandCore.index_later``), so indexing them afterwards downloads nothing again."""
        sender = sender_of(message)
        if sender is None or sender.sender.is_bot or message.is_automatic_forward:
            return  # other bots are never answered: two bots must not talk in a loop
        photos: tuple[Attachment, ...] = ()
        photo_error: ImageError | None = None
        try:
            own = photo_for(message)
        except ImageError as error:  # a video, a sticker, a PDF: said if a photo is wanted
            own, photo_error = None, error
        photos = (own,) if own is not None else ()
        for item in album:  # /remember on an album: every photo of it is an example
            with contextlib.suppress(ImageError):  # a video in a mixed album: not an example
                attachment = attachment_of(item)
                if attachment is not None and attachment not in photos:
                    photos += (attachment,)
        request = ChatRequest(
            scope=scope_of(message),
            sender=sender.sender,
            command=text,
            photos=photos,
            photo_error=photo_error,
            is_admin=sender.is_admin,
            message_id=f"{scope_of(message)}:{message.message_id}",
        )
        port = TelegramPort(
            bot,
            message,
            sender.telegram_id,
            self.image_limits,
            self.admins,
            self.chat_action_every_s,
        )
        await self.core.serve(request, port, downloaded)

    # ------------------------------------------------------------------ search history

    def _index_later(self, bot: Bot, message: Message, downloaded: Downloaded) -> None:
        """Index the message's own photo in the background when the chat's indexing is on,
        with the bytes a command downloaded if any (a failed download is not retried)."""
        sender = sender_of(message)
        if sender is None:
            return
        try:
            attachment = attachment_of(message)
        except ImageError:
            return  # a video, a sticker, a PDF: nothing to index
        if attachment is None:
            return

        async def fetch(photo: Attachment) -> bytes:  # the size limits of every download apply
            return await asyncio.wait_for(download(bot, photo, self.image_limits), self.timeout_s)

        self.core.index_later(
            scope_of(message),
            sender.sender,
            attachment,
            attachment.search_source,
            fetch,
            downloaded,
        )


class _InAlbum(filters.MessageFilter):
    """Messages that are one item of an album (a media group)."""

    def filter(self, message: Message) -> bool:
        return message.media_group_id is not None


_IN_ALBUM = _InAlbum(name="InAlbum")
