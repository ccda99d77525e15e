"""rapbot on Discord (discord.py 2.x): the client, and ``run_bot`` (``rapbot serve discord``).

``RapbotBot`` is a ``commands.Bot`` that loads rapbot's cog (handlers.py) and never syncs by
itself. ``run_bot``: the token comes from ``DISCORD_BOT_TOKEN``; ``sync=True`` registers the
slash commands with Discord and exits (an explicit step, never done on a plain start);
otherwise the bot runs until SIGINT/SIGTERM, then lets the requests in flight finish
(bounded), disconnects and closes the engine gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import discord
from discord import app_commands
from discord.ext import commands

from bots.core.gateway import EngineGateway, make_gateway
from bots.core.limits import Limits
from bots.core.photo_indexing import INDEX_DRAIN_S
from bots.core.serve import INTERNAL_ERROR, CommandCore
from bots.discord_adapter.format import ERROR_PREFIX, NO_MENTIONS
from bots.discord_adapter.handlers import RapbotCog, discord_core
from engine.errors import RapbotError
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


TOKEN_ENV = "DISCORD_BOT_TOKEN"
SHUTDOWN_TIMEOUT_S = 60.0


def _token(settings) -> str:
    token = settings.discord_bot_token.get_secret_value().strip()
    if not token:
        raise RapbotError(
            f"{TOKEN_ENV} is not set: create a bot at https://discord.com/developers/applications "
            "(Bot → Reset Token) and export its token."
        )
    return token


async def _open_gateway(settings, kind: str) -> EngineGateway:
    """The engine gateway of ``--gateway``: in-process (loads the models) or Celery."""
    # Loading models takes a while; the event loop stays free meanwhile.
    return await asyncio.to_thread(make_gateway, kind, settings, worker_settings=settings)


async def _sync(token: str, guild_id: int | None) -> None:
    async with RapbotBot(core=None, message_content=False) as bot:
        try:
            await bot.login(token)  # HTTP only: runs setup_hook, which loads the commands
        except discord.LoginFailure:
            raise RapbotError(f"Discord refused the token in {TOKEN_ENV}.") from None
        try:
            synced = await bot.sync_commands(guild_id)
        except discord.HTTPException as error:
            raise RapbotError(
                f"Discord refused the command sync ({error.status}: {error.text or 'no reason'}). "
                "Is the bot in that server, invited with the applications.commands scope?"
            ) from None
    where = f"to guild {guild_id}" if guild_id else "globally"
    names = ", ".join(sorted(command.name for command in synced))
    print(f"Synced {len(synced)} commands {where}: {names}")


async def _serve(settings, gateway_kind: str, token: str, message_content: bool) -> None:
    gateway = await _open_gateway(settings, gateway_kind)
    try:
        core = discord_core(
            gateway,
            limits=Limits.from_settings(settings),
            stream_interval=settings.stream_interval_s,
        )
        bot = RapbotBot(core, ImageLimits.from_settings(settings), message_content=message_content)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
                loop.add_signal_handler(sig, stop.set)
        async with bot:
            runner = asyncio.create_task(bot.start(token))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not runner.done():
                log.info("stopping: letting requests in flight finish")
                cut = await bot.shutdown(SHUTDOWN_TIMEOUT_S)
                if cut:
                    log.warning("%d request(s) were cut short by the shutdown", cut)
            stopper.cancel()
            try:
                await runner
            except discord.LoginFailure:
                raise RapbotError(f"Discord refused the token in {TOKEN_ENV}.") from None
            except discord.PrivilegedIntentsRequired:
                raise RapbotError(
                    "Discord refused the message content intent: enable it in the developer "
                    "portal (Bot → Privileged Gateway Intents → Message Content Intent) or "
                    "run with --no-message-content."
                ) from None
    finally:
        await gateway.close()


def run_bot(
    settings,
    gateway_kind: str = "local",
    *,
    sync: bool = False,
    guild_id: int | None = None,
    message_content: bool = True,
) -> int:
    """Run the Discord bot (or, with ``sync``, register its commands and exit); exit code."""
    token = _token(settings)
    library = logging.getLogger("discord")
    if library.getEffectiveLevel() < logging.INFO:  # privacy: its DEBUG lines quote every
        library.setLevel(logging.INFO)  # gateway event and request: users' texts, file names
    if sync:
        asyncio.run(_sync(token, guild_id))
    else:
        asyncio.run(_serve(settings, gateway_kind, token, message_content))
    return 0
