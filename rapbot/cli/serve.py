"""`serve`, `worker`: the long-running processes (a chat bot, a distributed-mode worker)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine.errors import RapbotError
from rapbot.cli.common import gateway_option, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the chat bot on a platform")
    p.set_defaults(handler=run_serve)
    p.add_argument("platform", choices=["telegram", "discord"], help="the chat platform")
    gateway_option(p)
    p.add_argument(
        "--sync",
        action="store_true",
        help="discord: register the slash commands with Discord, then exit (once per release)",
    )
    p.add_argument(
        "--guild", type=int, default=None, metavar="ID", help="discord: --sync to one server only"
    )
    p.add_argument(
        "--no-message-content",
        action="store_true",
        help="discord: run without the privileged message content intent",
    )

    p = sub.add_parser("worker", parents=[common], help="run a distributed-mode engine worker")
    p.set_defaults(handler=run_worker)
    p.add_argument("--queues", default="gpu,cpu", help="gpu (model work), cpu (store only)")
    p.add_argument("--device", default=None, help="cuda:N (one worker per GPU) or cpu")
    p.add_argument("--concurrency", type=int, default=None, help="threads (GPU 16, CPU cores)")
    p.add_argument("--pool", choices=["threads", "solo", "prefork"], default="threads")
    p.add_argument("--loglevel", default="info", help="Celery log level")


def _observability(settings, port: int) -> None:
    """Long-running processes: structured logs and metrics."""
    from rapbot.observability import setup

    try:
        setup(settings.log_level, settings.log_format, port, settings.metrics_addr)
    except OSError as error:
        raise RapbotError(f"RAPBOT_METRICS_PORT={port}: can't serve ({error})") from None


def check_token_form(platform: str, settings) -> None:
    """A malformed token fails here in one line, before any model loads (the doctor's check;
    an empty one is the adapter's "not set" message)."""
    from rapbot.doctor import DISCORD_TOKEN, TELEGRAM_TOKEN, check_token

    secret, pattern = (
        (settings.telegram_bot_token, TELEGRAM_TOKEN)
        if platform == "telegram"
        else (settings.discord_bot_token, DISCORD_TOKEN)
    )
    variable = f"{platform.upper()}_BOT_TOKEN"
    token = secret.get_secret_value().strip()
    check = check_token(f"{platform} token", variable, token, pattern)
    if check.ok is False:
        raise RapbotError(f"{check.detail}: {check.fix}.")


def run_serve(args: argparse.Namespace) -> int:
    """`rapbot serve telegram|discord`: tokens and limits come from the settings."""
    settings = settings_for(args)
    check_token_form(args.platform, settings)
    _observability(settings, settings.metrics_port)
    args.gateway = args.gateway or settings.gateway
    if args.platform == "telegram":
        from bots.telegram_adapter import run_bot

        return run_bot(settings, args.gateway)
    from bots.discord_adapter import run_bot

    return run_bot(
        settings,
        args.gateway,
        sync=args.sync,
        guild_id=args.guild,
        message_content=not args.no_message_content,
    )


def run_worker(args: argparse.Namespace) -> int:
    """`rapbot worker`: the engine settings reach the worker through the environment."""
    from workers.main import run_worker as start_worker

    settings = settings_for(args)
    # A worker serves its metrics itself, once it knows whether it spawns one per GPU.
    _observability(settings, 0)
    if args.data_dir:
        os.environ["RAPBOT_DATA_DIR"] = str(Path(args.data_dir).expanduser())
    if args.profile:
        os.environ["RAPBOT_PROFILE"] = args.profile
    return start_worker(
        queues=args.queues,
        device=args.device,
        concurrency=args.concurrency,
        pool=args.pool,
        loglevel=args.loglevel,
    )
