"""rapbot's Discord surface: slash commands, the "Who is this?" message menu, and mentions.

Every entry point turns a Discord event into the core's :class:`ChatRequest` and lets
``CommandCore.serve`` answer it through a :class:`send.DiscordPort`. Slash commands arrive as
typed options and become a parsed command directly (no text to re-parse); a mention is text,
parsed by the core. Slash commands defer at once (Discord shows "rapbot is thinking…" and
allows 15 minutes for the followup); mentions show "typing…"; the "Who is this?" menu on a
message without a photo is answered at once, only to the user.

Photos posted in a channel (image attachments of ordinary messages, mentions of the bot
included; never bots') go to the channel's search history when its indexing is on
(``/index on``): in the background, after any reply, reusing the bytes a mention already
downloaded. Each image is indexed as the message's link, ``#N`` added for the Nth attachment
after the first; search replies show those links (:func:`format.photo_link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bots.core import commands as c
from bots.core.photo_indexing import Downloaded
from bots.core.request import ChatRequest, Sender, user_id
from bots.core.serve import CommandCore
from bots.discord_adapter.files import (
    AttachmentError,
    Photo,
    download,
    is_image,
    pick_image,
)
from bots.discord_adapter.format import ERROR_PREFIX, escape
from bots.discord_adapter.send import (
    DiscordPort,
    FollowupTarget,
    MessageReplyTarget,
    Target,
    best_effort,
)
from engine.errors import RapbotError
from engine.images import ImageLimits

log = logging.getLogger(__name__)

RESTARTING = "I'm restarting right now; please try again in a minute."
ABORTED = "Sorry, I had to restart before I could finish this. Please try again in a minute."
NO_IMAGE_IN_MESSAGE = (
    "That message has no image attached. Use “Who is this?” on a message with a photo, "
    "or run /who with a photo."
)
DISCORD_WORDS = c.PhotoWords(
    attach="with a photo attached (its photo option), or in a mention of me with one",
    short="attached",
    reference="with a photo attached",
    missing=(
        "This command needs a photo: attach one (the command's photo option), or mention me"
        " in a message that has a photo or answers one."
    ),
)
PLATFORM_HELP = (
    "On Discord: the slash commands take the photo as an attachment option "
    "(/remember, /who, /ask, /caption, /search); right-click a message with a photo → "
    "Apps → “Who is this?”; or mention me with a photo and a question. With /index on, "
    "photos attached to messages in this channel become searchable with /search."
)


def discord_core(gateway, **options) -> CommandCore:
    """The command core as the Discord bot uses it: its help and its words for photos."""
    return CommandCore(gateway, platform_help=PLATFORM_HELP, photo_words=DISCORD_WORDS, **options)


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


def sender_of(user: discord.abc.User) -> Sender:
    return Sender(user_id("dc", user.id), user.display_name, user.bot)


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
        self.indexing = core.indexing if core is not None else None
        # Context menus cannot be declared with a decorator inside a class (discord.py rule).
        self.who_is_this_menu = app_commands.ContextMenu(
            name="Who is this?", callback=self.who_is_this
        )

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.who_is_this_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.who_is_this_menu.name, type=self.who_is_this_menu.type)

    # ------------------------------------------------------------------ the shared path

    async def _run(
        self,
        interaction: discord.Interaction,
        command: c.BaseCommand,
        attachment: discord.Attachment | None = None,
        *,
        ephemeral: bool = False,
        photo_error: RapbotError | None = None,
    ) -> None:
        """Answer an app command: defer (unless a photo problem is answered at once), then
        let the core serve it."""
        if self.jobs.closing:
            await interaction.response.send_message(RESTARTING, ephemeral=True)
            return
        if photo_error is None:
            try:
                await interaction.response.defer(thinking=True, ephemeral=ephemeral)
            except discord.HTTPException as error:  # expired (over 3 s) or already answered
                log.warning("could not defer interaction %s: %s", interaction.id, error)
                return
        target = FollowupTarget(interaction)
        channel_id = interaction.channel_id
        if channel_id is None:  # Discord always sends it for commands; be safe anyway
            await best_effort(target, ERROR_PREFIX + "I can't tell which chat this is.")
            return
        request = ChatRequest(
            scope=scope_of(channel_id),
            sender=sender_of(interaction.user),
            command=command,
            photos=(Photo.of(attachment),) if attachment is not None else (),
            photo_error=photo_error,
            is_admin=interaction_is_admin(interaction),
            message_id=f"dc:{interaction.id}",
        )
        async with self.jobs.track(target):
            await self.core.serve(request, DiscordPort(target, self.limits))

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
        await self._run(interaction, c.Remember(name, description), photo)

    @app_commands.command(name="who", description="Who do I know in this photo?")
    @app_commands.describe(photo="The photo")
    async def who(self, interaction: discord.Interaction, photo: discord.Attachment) -> None:
        await self._run(interaction, c.Who(), photo)

    @app_commands.command(name="ask", description="Ask about a photo or about someone I know")
    @app_commands.describe(question="Your question", photo="A photo to ask about")
    async def ask(
        self,
        interaction: discord.Interaction,
        question: str,
        photo: discord.Attachment | None = None,
    ) -> None:
        await self._run(interaction, c.Ask(question), photo)

    @app_commands.command(name="caption", description="A caption that uses the names I know")
    @app_commands.describe(photo="The photo")
    async def caption(self, interaction: discord.Interaction, photo: discord.Attachment) -> None:
        await self._run(interaction, c.Caption(), photo)

    @app_commands.command(name="concepts", description="Everyone and everything I remember here")
    @app_commands.describe(page="Which page of the picture (24 a page)")
    async def concepts(
        self, interaction: discord.Interaction, page: app_commands.Range[int, 1, 10_000] = 1
    ) -> None:
        await self._run(interaction, c.Concepts(page))

    @app_commands.command(name="rename", description="Rename someone I remember")
    @app_commands.describe(name="Their name now", new_name="Their new name")
    async def rename(self, interaction: discord.Interaction, name: str, new_name: str) -> None:
        await self._run(interaction, c.Rename(name, new_name))

    @app_commands.command(name="describe", description="Change the description of someone")
    @app_commands.describe(name="Their name", description="The new description")
    async def describe(self, interaction: discord.Interaction, name: str, description: str) -> None:
        await self._run(interaction, c.Describe(name, description))

    @app_commands.command(name="forget", description="Forget someone and all their photos")
    @app_commands.describe(name="Their name")
    async def forget(self, interaction: discord.Interaction, name: str) -> None:
        await self._run(interaction, c.Forget(name))

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
        await self._run(interaction, c.Search(text), photo)

    @app_commands.command(name="index", description="Admins: keep this chat's photos searchable")
    @app_commands.describe(mode="on: index new photos for /search; off: stop")
    async def index(self, interaction: discord.Interaction, mode: Literal["on", "off"]) -> None:
        await self._run(interaction, c.Index(mode == "on"))

    @app_commands.command(name="forget_me", description="Forget everything you taught me")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, c.ForgetMe(), ephemeral=True)

    @app_commands.command(name="help", description="What I can do")
    async def help(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, c.Help(), ephemeral=True)

    # ------------------------------------------------------------------ message menu

    async def who_is_this(self, interaction: discord.Interaction, message: discord.Message) -> None:
        try:
            photo = pick_image(message.attachments)
            refused = None if photo is not None else AttachmentError(NO_IMAGE_IN_MESSAGE)
        except AttachmentError as error:
            photo, refused = None, error
        await self._run(interaction, c.Who(), photo, photo_error=refused)

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
        request = ChatRequest(
            scope=scope_of(message.channel.id),
            sender=sender_of(message.author),
            command=command,
            photos=(Photo.of(photo),) if photo is not None else (),
            photo_error=refused,
            is_admin=message_is_admin(message),
            message_id=f"dc:{message.id}",
        )
        downloaded: Downloaded = {}
        async with self.jobs.track(target):
            port = DiscordPort(target, self.limits, typing_in=message.channel)
            await self.core.serve(request, port, downloaded)
        self._index_later(message, downloaded)

    # ------------------------------------------------------------------ search history

    def _index_later(self, message: discord.Message, downloaded: Downloaded) -> None:
        """Index the message's image attachments in the background when the channel's
        indexing is on, with the bytes a mention downloaded if any (a failed one is skipped).
        Without the message content intent Discord sends no attachments of messages that do
        not mention the bot, and then there is nothing to index."""
        if message.type not in _ORDINARY or self.core is None:
            return
        for attachment, source in photo_sources(message):
            # The size and type checks of every download apply; a failure is logged by id only.
            self.core.index_later(
                scope_of(message.channel.id),
                sender_of(message.author),
                Photo.of(attachment),
                source,
                self._download,
                downloaded,
            )

    async def _download(self, photo: Photo) -> bytes:
        return await download(photo.attachment, self.limits)

    @staticmethod
    def _replied_photo(message: discord.Message) -> discord.Attachment | None:
        """The photo of the message this one replies to (when Discord sent it along)."""
        replied = message.reference.resolved if message.reference else None
        if isinstance(replied, discord.Message):
            with contextlib.suppress(AttachmentError):
                return pick_image(replied.attachments)
        return None


__all__ = ["DISCORD_WORDS", "PLATFORM_HELP", "RapbotCog", "discord_core", "escape", "scope_of"]
