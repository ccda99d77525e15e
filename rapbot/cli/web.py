"""`web`: the chat in a browser (bots.web_adapter), served on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio

from rapbot.cli.common import gateway_option, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "web",
        parents=[common],
        help="the chat in your browser, on http://127.0.0.1:PORT/ (scope web:<--user>)",
        description=(
            "Serve a local web chat: drop or paste a photo, type /remember NAME | description"
            " or a question, see the answer with the annotated photo and a gallery of the"
            " chat's concepts. Listens on 127.0.0.1 only; you are the chat's admin.\n\n"
            "example: rapbot web --user ada --port 8765"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=run_web)
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    p.add_argument("--no-browser", action="store_true", help="don't open a browser tab")
    gateway_option(p)


def run_web(args: argparse.Namespace) -> int:
    from bots.core.gateway import make_gateway
    from bots.core.limits import Limits
    from bots.web_adapter import WebChat, web_core
    from bots.web_adapter import run_web as serve
    from bots.web_adapter.files import photos_dir
    from engine.images import ImageLimits

    settings = settings_for(args)
    chat = WebChat(  # checks the name before any model loads
        name=args.user,
        photos_dir=photos_dir(settings.data_dir, args.user),
        limits=ImageLimits.from_settings(settings),
    )
    gateway = make_gateway(args.gateway or settings.gateway, settings, worker_settings=settings)
    core = web_core(
        gateway, limits=Limits.from_settings(settings), stream_interval=settings.stream_interval_s
    )
    try:
        serve(core, chat, args.port, open_browser=not args.no_browser)
    finally:
        asyncio.run(gateway.close())
    return 0
