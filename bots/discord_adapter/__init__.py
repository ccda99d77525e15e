"""rapbot on Discord (discord.py 2.x): app commands, a message menu and mentions over the core.

``run_bot`` is what ``rapbot serve discord`` runs: the token comes from ``DISCORD_BOT_TOKEN``;
``sync=True`` registers the slash commands with Discord and exits (an explicit step, never
done on a plain start); otherwise the bot runs until SIGINT/SIGTERM, then lets the requests in
flight finish (bounded), disconnects and closes the engine gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from bots.core.gateway import EngineGateway, make_gateway
from bots.core.handler import CommandCore
from bots.core.limits import Limits
from engine.errors import RapbotError
from engine.images import ImageLimits

log = logging.getLogger(__name__)

TOKEN_ENV = "DISCORD_BOT_TOKEN"
SHUTDOWN_TIMEOUT_S = 60.0

__all__ = ["TOKEN_ENV", "run_bot"]


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
    import discord

    from bots.discord_adapter.client import RapbotBot

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
    import discord

    from bots.discord_adapter.client import RapbotBot
    from bots.discord_adapter.cog import PLATFORM_HELP

    gateway = await _open_gateway(settings, gateway_kind)
    try:
        core = CommandCore(
            gateway,
            platform_help=PLATFORM_HELP,
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
