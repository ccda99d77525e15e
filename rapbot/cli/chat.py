"""`chat`: a local chat with the bot in the terminal, over the same command core."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rapbot.cli.common import settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", parents=[common], help="a local chat with the bot")
    p.set_defaults(handler=run_chat)
    p.add_argument("--out-dir", default=".", help="where annotated photos are saved")


def run_chat(args: argparse.Namespace) -> int:
    from bots.core.gateway import LocalGateway
    from bots.core.limits import Limits
    from bots.core.serve import CommandCore
    from bots.terminal import TerminalChat
    from engine.engine import Engine
    from engine.images import ImageLimits

    settings = settings_for(args)

    async def chat() -> None:
        gateway = LocalGateway(Engine.open(settings))
        try:
            terminal = TerminalChat(
                CommandCore(gateway, limits=Limits(enabled=False)),  # one local user
                args.chat,
                args.user,
                args.admin,
                Path(args.out_dir),
                ImageLimits.from_settings(settings),
            )
            await terminal.run()
        finally:
            await gateway.close()

    asyncio.run(chat())
    return 0
