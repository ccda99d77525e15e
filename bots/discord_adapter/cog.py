"""rapbot's Discord surface: slash commands, the "Who is this?" message menu, and mentions.

Every entry point turns a Discord event into the core's ``IncomingMessage`` (the command as
text, so the core's parser and usage lines stay the one source of validation messages) and
posts the core's ``Reply`` back. Slash commands and the menu defer at once (Discord shows
"rapbot is thinking…" and allows 15 minutes for the followup); mentions show "typing…".

The rate limits are applied (``CommandCore.admit``) before a photo is downloaded. /ask and
/caption answers (mentions are /ask) grow in place: the first text is posted as the followup
(or the reply to the mention) and edited as the core hands over more, at most once a second;
the last edit carries the full content and the annotated photo, if any.

Photos posted in a channel (image attachments of ordinary messages, mentions of the bot
included; never bots') go to the channel's search history when its indexing is on
(``/index on``): in the background, after any reply, reusing the bytes a mention already
downloaded. Each image is indexed as the message's link, ``#N`` added for the Nth attachment
after the first; search replies show those links (:func:`format.photo_link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Literal, Protocol

import discord
from discord import app_commands
from discord.ext import commands
from discord.utils import MISSING

from bots.core import commands as c
from bots.core.gateway import Downloaded, PhotoIndexing
from bots.core.handler import CommandCore
from bots.core.messages import IncomingMessage, Reply
from bots.discord_adapter.files import (
    AttachmentDownloadError,
    AttachmentError,
    download,
    fit_upload,
    is_image,
    pick_image,
    upload_limit,
)
from bots.discord_adapter.format import (
    ERROR_PREFIX,
    MAX_CONTENT,
    NO_MENTIONS,
    escape,
    reply_content,
    split_content,
)
from engine.images import ImageLimits

log = logging.getLogger(__name__)

RESTARTING = "I'm restarting right now; please try again in a minute."
ABORTED = "Sorry, I had to restart before I could finish this. Please try again in a minute."
SEND_FAILED = "I worked out an answer but couldn't post it here; please try again."
PHOTO_REFUSED = "(The annotated photo could not be uploaded.)"
NO_IMAGE_IN_MESSAGE = (
    "That message has no image attached. Use “Who is this?” on a message with a photo, "
    "or run /who with a photo."
)
PLATFORM_HELP = (
    "On Discord: the slash commands take the photo as an attachment option "
    "(/remember, /who, /ask, /caption, /search); right-click a message with a photo → "
    "Apps → “Who is this?”; or mention me with a photo and a question. With /index on, "
    "photos attached to messages in this channel become searchable with /search."
)
# What files.download turns into "I couldn't download ...": the platform's failure, not the user's.
# Messages whose attachments are photos posted in the chat (not joins, pins, threads...).
_ORDINARY = (discord.MessageType.default, discord.MessageType.reply)


def scope_of(channel_id: int) -> str:
    """The scope of a Discord channel (a DM has its own channel id, so its own scope)."""
    return f"dc:{channel_id}"


def _is_private_dm(channel: object) -> bool:
    return getattr(channel, "type", None) == discord.ChannelType.private


def interaction_is_admin(interaction: discord.Interaction) -> bool:
    """Chat admins: members who may manage the server or its messages; in a DM, the user."""
    if interaction.guild_id is None:
        return _is_private_dm(interaction.channel)
    perms = interaction.permissions
    return perms.administrator or perms.manage_guild or perms.manage_messages


def message_is_admin(message: discord.Message) -> bool:
    if message.guild is None:
        return _is_private_dm(message.channel)
    author = message.author
    if not isinstance(author, discord.Member) or not hasattr(message.channel, "permissions_for"):
        return False
    perms = message.channel.permissions_for(author)
    return perms.administrator or perms.manage_guild or perms.manage_messages


def incoming(
    channel_id: int, user: discord.abc.User, text: str, *, is_admin: bool, message_id: str
) -> IncomingMessage:
    """The core's view of a request (the photo is added once it is downloaded)."""
    return IncomingMessage(
        scope=scope_of(channel_id),
        user_id=str(user.id),
        text=text,
        is_admin=is_admin,
        user_name=user.display_name,
        message_id=message_id,
        from_bot=user.bot,
    )


def jump_url(message: discord.Message) -> str:
    """``message.jump_url``, also for a guild channel discord.py has not cached (whose
    message has no ``guild``): the link opens the message in any Discord client."""
    guild_id = getattr(message.channel, "guild_id", None)
    if message.guild is None and guild_id is not None:
        return f"https://discord.com/channels/{guild_id}/{message.channel.id}/{message.id}"
    return message.jump_url


def photo_sources(message: discord.Message) -> list[tuple[discord.Attachment, str]]:
    """The message's image attachments and their search sources: the message's link, with
    ``#N`` for the Nth attachment when N > 1 (each image is its own search result)."""
    url = jump_url(message)
    return [
        (attachment, url if position == 1 else f"{url}#{position}")
        for position, attachment in enumerate(message.attachments, 1)
        if is_image(attachment)
    ]


def _is_index_command(text: str) -> bool:
    try:
        return isinstance(c.parse_command(text), c.Index)
    except c.CommandError:
        return False


def _command(word: str, *fields: str) -> str:
    """Command text for the core: ``/rename Old | New``; empty trailing fields are left out."""
    while fields and not fields[-1].strip():
        fields = fields[:-1]
    return f"/{word} " + " | ".join(fields) if fields else f"/{word}"


def _download_outcome(error: AttachmentError) -> str:
    """The metrics outcome of a photo that could not be had: ``internal_error`` when Discord's
    download failed, ``user_error`` when the user's file is the problem (too large, not an
    image)."""
    return "internal_error" if isinstance(error, AttachmentDownloadError) else "user_error"


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
    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.upload_limit = upload_limit(interaction)

    async def send(self, content: str, file: discord.File | None) -> None:
        extra = {"file": file} if file is not None else {}
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


class Jobs:
    """Requests being worked on, so shutdown can let them finish (bounded) or answer them."""

    def __init__(self) -> None:
        self.closing = False
        self._running: dict[asyncio.Task, Target] = {}

    @contextlib.asynccontextmanager
    async def track(self, target: Target) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._running[task] = target
        try:
            yield
        finally:
            self._running.pop(task, None)

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for running requests; answer and cancel the rest."""
        self.closing = True
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout)
        left = dict(self._running)
        for task, target in left.items():
            await best_effort(target, ERROR_PREFIX + ABORTED)
            task.cancel()
        if left:
            await asyncio.wait(list(left), timeout=5)
        return len(left)


class RapbotCog(commands.Cog, name="rapbot"):
    """The slash commands, the message menu and mentions, all handed to the command core."""

    def __init__(self, bot: commands.Bot, core: CommandCore, limits: ImageLimits) -> None:
        self.bot = bot
        self.core = core
        self.limits = limits
        self.jobs = Jobs()
        self.indexing = PhotoIndexing(core.gateway if core is not None else None)
        # Context menus cannot be declared with a decorator inside a class (discord.py rule).
        self.who_is_this_menu = app_commands.ContextMenu(
            name="Who is this?", callback=self.who_is_this
        )

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.who_is_this_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.who_is_this_menu.name, type=self.who_is_this_menu.type)

    # ------------------------------------------------------------------ the shared path

    async def _answer(
        self,
        target: Target,
        message: IncomingMessage,
        photo: discord.Attachment | None,
        downloaded: Downloaded | None = None,
    ) -> None:
        """Download ``photo`` (if any), ask the core, post its reply: every error is a reply.

        The rate limits come first, so a refused request downloads nothing. ``downloaded``
        receives the photo (attachment id → bytes, None when refused) for indexing."""
        refusal = self.core.admit(message.scope, message.user_id, message.text)
        if refusal is not None:
            await deliver(target, refusal)
            return
        # Until core.handle() takes over, this request's metrics are ours (counted once).
        started = time.perf_counter()
        try:
            image = (
                await PhotoIndexing.fetch(
                    downloaded, photo.id, functools.partial(download, photo, self.limits)
                )
                if photo is not None
                else None
            )
        except AttachmentError as error:
            outcome = _download_outcome(error)
            self.core.observe_unhandled(message.text, outcome, time.perf_counter() - started)
            await deliver(target, Reply(str(error), error=True))
            return
        except asyncio.CancelledError:  # a shutdown cut the download short (Jobs.drain)
            self.core.observe_unhandled(message.text, "timeout", time.perf_counter() - started)
            raise
        except Exception:  # a bug: the tree's on_error answers the user
            elapsed = time.perf_counter() - started
            self.core.observe_unhandled(message.text, "internal_error", elapsed)
            raise
        growing = GrowingReply(target)  # the core streams /ask and /caption only
        reply = await self.core.handle(
            dataclasses.replace(message, image=image), admitted=True, on_partial=growing.show
        )
        if _is_index_command(message.text):
            self.indexing.forget(message.scope)  # on or off, it shows at once
        if reply is not None:
            await growing.finish(reply)

    async def _run(
        self,
        interaction: discord.Interaction,
        text: str,
        photo: discord.Attachment | None = None,
        *,
        ephemeral: bool = False,
    ) -> None:
        if self.jobs.closing:
            await interaction.response.send_message(RESTARTING, ephemeral=True)
            return
        try:
            await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        except discord.HTTPException as error:  # expired (over 3 s) or already answered
            log.warning("could not defer interaction %s: %s", interaction.id, error)
            return
        target = FollowupTarget(interaction)
        channel_id = interaction.channel_id
        if channel_id is None:  # Discord always sends it for commands; be safe anyway
            await deliver(target, Reply("I can't tell which chat this is.", error=True))
            return
        async with self.jobs.track(target):
            message = incoming(
                channel_id,
                interaction.user,
                text,
                is_admin=interaction_is_admin(interaction),
                message_id=f"dc:{interaction.id}",
            )
            await self._answer(target, message, photo)

    async def _refuse_pipe(self, interaction: discord.Interaction, *names: str) -> bool:
        """Names can't contain '|' (it separates fields in the core's command text)."""
        if not any("|" in name for name in names):
            return False
        await interaction.response.send_message(
            ERROR_PREFIX + "Names can't contain '|'.", ephemeral=True
        )
        return True

    # ------------------------------------------------------------------ slash commands

    @app_commands.command(name="remember", description="Remember a person, pet or thing")
    @app_commands.describe(
        name="What to call them, e.g. Mochi",
        photo="A photo of them",
        description="A few words, e.g. my grey cat",
    )
    async def remember(
        self,
        interaction: discord.Interaction,
        name: str,
        photo: discord.Attachment,
        description: str = "",
    ) -> None:
        if not await self._refuse_pipe(interaction, name):
            await self._run(interaction, _command("remember", name, description), photo)

    @app_commands.command(name="who", description="Who do I know in this photo?")
    @app_commands.describe(photo="The photo")
    async def who(self, interaction: discord.Interaction, photo: discord.Attachment) -> None:
        await self._run(interaction, "/who", photo)

    @app_commands.command(name="ask", description="Ask about a photo or about someone I know")
    @app_commands.describe(question="Your question", photo="A photo to ask about")
    async def ask(
        self,
        interaction: discord.Interaction,
        question: str,
        photo: discord.Attachment | None = None,
    ) -> None:
        await self._run(interaction, _command("ask", question), photo)

    @app_commands.command(name="caption", description="A caption that uses the names I know")
    @app_commands.describe(photo="The photo")
    async def caption(self, interaction: discord.Interaction, photo: discord.Attachment) -> None:
        await self._run(interaction, "/caption", photo)

    @app_commands.command(name="concepts", description="Everyone and everything I remember here")
    async def concepts(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "/concepts")

    @app_commands.command(name="rename", description="Rename someone I remember")
    @app_commands.describe(name="Their name now", new_name="Their new name")
    async def rename(self, interaction: discord.Interaction, name: str, new_name: str) -> None:
        if not await self._refuse_pipe(interaction, name, new_name):
            await self._run(interaction, f"/rename {name} | {new_name}")

    @app_commands.command(name="describe", description="Change the description of someone")
    @app_commands.describe(name="Their name", description="The new description")
    async def describe(self, interaction: discord.Interaction, name: str, description: str) -> None:
        if not await self._refuse_pipe(interaction, name):
            await self._run(interaction, f"/describe {name} | {description}")

    @app_commands.command(name="forget", description="Forget someone and all their photos")
    @app_commands.describe(name="Their name")
    async def forget(self, interaction: discord.Interaction, name: str) -> None:
        await self._run(interaction, _command("forget", name))

    @app_commands.command(name="search", description="Find photos of this chat")
    @app_commands.describe(
        text="What to look for", photo="More like this photo (changed by text, if any)"
    )
    async def search(
        self,
        interaction: discord.Interaction,
        text: str = "",
        photo: discord.Attachment | None = None,
    ) -> None:
        await self._run(interaction, _command("search", text), photo)

    @app_commands.command(name="index", description="Admins: keep this chat's photos searchable")
    @app_commands.describe(mode="on: index new photos for /search; off: stop")
    async def index(self, interaction: discord.Interaction, mode: Literal["on", "off"]) -> None:
        await self._run(interaction, f"/index {mode}")

    @app_commands.command(name="forget_me", description="Forget everything you taught me")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "/forget_me", ephemeral=True)

    @app_commands.command(name="help", description="What I can do")
    async def help(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "/help", ephemeral=True)

    # ------------------------------------------------------------------ message menu

    async def who_is_this(self, interaction: discord.Interaction, message: discord.Message) -> None:
        try:
            photo = pick_image(message.attachments)
        except AttachmentError as error:
            self.core.observe_unhandled("/who", "user_error", 0.0)
            await interaction.response.send_message(ERROR_PREFIX + str(error), ephemeral=True)
            return
        if photo is None:
            self.core.observe_unhandled("/who", "user_error", 0.0)
            await interaction.response.send_message(NO_IMAGE_IN_MESSAGE, ephemeral=True)
            return
        await self._run(interaction, "/who", photo)

    # ------------------------------------------------------------------ mentions

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if message.author.bot or me is None or self.jobs.closing:
            return  # other bots (and ourselves) are never answered: no loops between bots
        if not any(user.id == me.id for user in message.mentions):
            self._index_later(message, {})  # @everyone / role pings are not for the bot
            return
        text = re.sub(rf"<@!?{me.id}>", " ", message.content).strip()
        target = MessageReplyTarget(message)
        refused: AttachmentError | None = None
        try:
            photo = pick_image(message.attachments) or self._replied_photo(message)
        except AttachmentError as error:  # only files that are not images
            photo, refused = None, error
        if text.startswith("/"):
            command = text  # "@rapbot /remember Mochi | my cat" with a photo
        elif text:
            command = f"/ask {text}"
        else:
            command = "/who" if photo is not None or refused is not None else "/help"
        if refused is not None:  # answered here, never admitted: counted here
            self.core.observe_unhandled(command, "user_error", 0.0)
            await deliver(target, Reply(str(refused), error=True))
            return
        downloaded: Downloaded = {}
        async with self.jobs.track(target), _typing(message.channel):
            incoming_message = incoming(
                message.channel.id,
                message.author,
                command,
                is_admin=message_is_admin(message),
                message_id=f"dc:{message.id}",
            )
            await self._answer(target, incoming_message, photo, downloaded)
        self._index_later(message, downloaded)

    # ------------------------------------------------------------------ search history

    def _index_later(self, message: discord.Message, downloaded: Downloaded) -> None:
        """Index the message's image attachments in the background when the channel's
        indexing is on, with the bytes a mention downloaded if any (a failed one is skipped).
        Without the message content intent Discord sends no attachments of messages that do
        not mention the bot, and then there is nothing to index."""
        if message.author.bot or message.type not in _ORDINARY or self.core is None:
            return
        scope = scope_of(message.channel.id)
        for attachment, source in photo_sources(message):
            # The size and type checks of every download apply; a failure is logged by id only.
            fetch = functools.partial(download, attachment, self.limits)
            index = functools.partial(self._index, message, source)
            self.indexing.submit_photo(scope, attachment.id, downloaded, fetch, index)

    async def _index(self, message: discord.Message, source: str, data: bytes) -> None:
        posted = incoming(
            message.channel.id, message.author, "", is_admin=False, message_id=f"dc:{message.id}"
        )
        await self.core.index_photo(dataclasses.replace(posted, image=data), source)

    @staticmethod
    def _replied_photo(message: discord.Message) -> discord.Attachment | None:
        """The photo of the message this one replies to (when Discord sent it along)."""
        replied = message.reference.resolved if message.reference else None
        if isinstance(replied, discord.Message):
            with contextlib.suppress(AttachmentError):
                return pick_image(replied.attachments)
        return None


__all__ = ["PLATFORM_HELP", "RapbotCog", "escape", "scope_of"]
