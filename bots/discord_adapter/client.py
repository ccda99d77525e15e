"""The Discord client: a ``commands.Bot`` that loads rapbot's cog and never syncs by itself."""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bots.core.gateway import INDEX_DRAIN_S
from bots.core.handler import INTERNAL_ERROR, CommandCore
from bots.discord_adapter.cog import RapbotCog
from bots.discord_adapter.format import ERROR_PREFIX, NO_MENTIONS
from engine.images import ImageLimits

log = logging.getLogger(__name__)

STALE_COMMAND = (
    "That command is out of date. The bot's operator needs to run `rapbot serve discord --sync`."
)


class RapbotTree(app_commands.CommandTree):
    """The command tree, answering every failure in the chat instead of only logging it."""

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, (app_commands.CommandNotFound, app_commands.CommandSignatureMismatch)):
            text = STALE_COMMAND
            # Ids only: the interaction's data holds what the user typed in the options.
            log.warning("stale app command interaction=%s: %s", interaction.id, error)
        else:
            text = INTERNAL_ERROR
            log.error("app command failed", exc_info=error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(
                    ERROR_PREFIX + text, allowed_mentions=NO_MENTIONS, ephemeral=True
                )
            else:
                await interaction.response.send_message(ERROR_PREFIX + text, ephemeral=True)
        except discord.HTTPException as http_error:
            log.warning("could not report an app command error: %s", http_error)


class RapbotBot(commands.Bot):
    """rapbot on Discord. ``core`` may be None for a sync-only run that handles no events."""

    def __init__(
        self,
        core: CommandCore | None,
        image_limits: ImageLimits | None = None,
        *,
        message_content: bool = True,
    ) -> None:
        # rapbot has no voice: don't warn operators about missing voice libraries.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.default()
        # Privileged: lets a mention that replies to a photo see that photo (see the README).
        intents.message_content = message_content
        super().__init__(
            command_prefix=commands.when_mentioned,  # required by Bot; no prefix commands exist
            intents=intents,
            allowed_mentions=NO_MENTIONS,
            help_command=None,
            tree_cls=RapbotTree,
        )
        self.core = core
        self.image_limits = image_limits or ImageLimits()

    async def setup_hook(self) -> None:
        # Commands are not synced here: syncing on every start hits Discord's rate limits and
        # is an explicit step (`rapbot serve discord --sync`).
        await self.add_cog(RapbotCog(self, self.core, self.image_limits))  # type: ignore[arg-type]

    @property
    def rapbot(self) -> RapbotCog:
        cog = self.get_cog("rapbot")
        assert isinstance(cog, RapbotCog)
        return cog

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: the cog's listener answers mentions."""

    async def sync_commands(self, guild_id: int | None = None) -> list[app_commands.AppCommand]:
        """Register the commands with Discord: for one guild (instant) or globally."""
        if guild_id is None:
            return await self.tree.sync()
        guild = discord.Object(id=guild_id)
        self.tree.copy_global_to(guild=guild)
        return await self.tree.sync(guild=guild)

    async def shutdown(self, timeout: float = 60.0) -> int:
        """Let running requests finish (at most ``timeout`` s), then disconnect.

        Returns how many requests had to be cut short (their users got an apology).
        """
        cog = self.get_cog("rapbot")
        left = await cog.jobs.drain(timeout) if isinstance(cog, RapbotCog) else 0
        if isinstance(cog, RapbotCog):  # photos being indexed get a moment, not more
            await cog.indexing.drain(min(timeout, INDEX_DRAIN_S))
        await self.close()
        return left
