"""`chat`: a local chat with the bot in the terminal, over the same command core."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rapbot.cli.common import settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", parents=[common], help="a local chat with the bot")
    p.set_defaults(handler=run_chat)
    p.add_argument(
        "--out-dir",
        default=None,
        help="where annotated photos are saved (default: the data folder's chat-photos/)",
    )


def run_chat(args: argparse.Namespace) -> int:
    from bots.core.gateway import LocalGateway
    from bots.terminal import TerminalChat, terminal_core
    from engine.engine import Engine
    from engine.images import ImageLimits

    settings = settings_for(args)
    out_dir = Path(args.out_dir or Path(settings.data_dir) / "chat-photos").expanduser()

    async def chat() -> None:
        gateway = LocalGateway(Engine.open(settings))
        try:
            terminal = TerminalChat(
                terminal_core(gateway),
                args.chat,
                args.user,
                True,  # the local chat is the user's own data: they administer it
                out_dir,
                ImageLimits.from_settings(settings),
            )
            await terminal.run()
        finally:
            await gateway.close()

    asyncio.run(chat())
    return 0
