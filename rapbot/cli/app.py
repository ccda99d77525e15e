"""The parser, built from the command groups, and the dispatch to a command's handler.

A command group is a module with ``register(sub, common)``: it adds its subcommands to ``sub``
(each with ``parents=[common]`` for the global options) and sets ``handler`` on each, a
function ``handler(args) -> int`` (the exit status). Adding a command is a function in its
group's module; adding a group is a module and one line in :data:`COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from engine.errors import RapbotError
from rapbot.cli.common import UsageError, global_options
from rapbot.cli.guide import explain

# In `rapbot --help` order. Modules of rapbot.cli; each imports only argparse-level code at
# the top and its engine or bot libraries inside its handlers.
COMMAND_GROUPS = (
    "concepts",
    "recognition",
    "photos",
    "backup",
    "chat",
    "web",
    "serve",
    "configuration",
    "models",
    "training",
    "evaluation",
)

EXAMPLES = """
examples:
  rapbot remember photos/mochi.jpg Mochi --desc "my grey cat"
  rapbot who party.jpg --out party-named.jpg
  rapbot ask party.jpg "is Mochi here?"
  rapbot concepts
  rapbot index photos/*.jpg                   (the CLI indexes its own files: no /index on)
  rapbot search "Mochi on the sofa" -k 5      (--ref photo.jpg "but at the beach")
  rapbot export --chat tg:-100123 --out chat.zip      (--all: every chat, a backup)
  rapbot import chat.zip --chat tg:-100456
  rapbot chat
  TELEGRAM_BOT_TOKEN=... rapbot serve telegram
  DISCORD_BOT_TOKEN=... rapbot serve discord --sync --guild ID    (once), then without --sync
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapbot",
        description="rapbot remembers the people, pets and things of a chat and recognizes them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        importlib.import_module(f"rapbot.cli.{group}").register(sub, common)
    for command_parser in sub.choices.values():  # a UsageError shows the command's usage
        command_parser.set_defaults(command_parser=command_parser)
    explain(parser)  # what each command prints, with an example (rapbot.cli.guide)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line: the global options' effects, then the command's handler."""
    args.chat_given = args.chat is not None
    if args.chat is None:
        args.chat = "local"
    if args.config:  # worker processes and their children read the same file
        os.environ["RAPBOT_CONFIG_FILE"] = str(Path(args.config).expanduser())
    return args.handler(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except UsageError as error:
        args.command_parser.error(str(error))  # usage and the message on stderr, exit 2
    except RapbotError as error:
        print(f"rapbot: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
