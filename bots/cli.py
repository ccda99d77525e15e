"""The ``rapbot`` command line: the engine on the embedded store, and a local chat.

Contract (scripts and acceptance checks rely on it): global options ``--data-dir``
(``RAPBOT_DATA_DIR``), ``--profile`` (``RAPBOT_PROFILE``), ``--chat`` (the scope, default
``local``), ``--user``, ``--json``; a user error exits 1 with one line on stderr, a usage error
exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from engine.errors import InvalidInputError, RapbotError
from engine.types import Answer, Box, Concept

SUBCOMMANDS_HELP = """
examples:
  rapbot remember photos/mochi.jpg Mochi --desc "my grey cat"
  rapbot who party.jpg --out party-named.jpg
  rapbot ask party.jpg "is Mochi here?"
  rapbot concepts
  rapbot chat
"""


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Global options, accepted before or after the subcommand."""
    keep = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=keep(None), help="data folder (env RAPBOT_DATA_DIR)")
    parser.add_argument(
        "--profile",
        choices=["tiny", "cpu", "gpu"],
        default=keep(None),
        help="model profile (env RAPBOT_PROFILE; default cpu)",
    )
    parser.add_argument("--chat", default=keep("local"), help="the chat (scope); default 'local'")
    parser.add_argument(
        "--user",
        default=keep(os.environ.get("RAPBOT_USER", "local")),
        help="who you are in the chat (env RAPBOT_USER; default 'local')",
    )
    parser.add_argument(
        "--admin",
        action="store_true",
        default=keep(False),
        help="act as a chat admin (may rename/describe/forget anyone's concepts)",
    )
    parser.add_argument("--json", action="store_true", default=keep(False), help="print JSON")
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=keep(False), help="log progress"
    )


def _parse_box(text: str) -> Box:
    try:
        values = [int(round(float(v))) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("a box is x1,y1,x2,y2 in pixels") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError("a box is x1,y1,x2,y2 in pixels")
    return Box(*values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapbot",
        description="rapbot remembers the people, pets and things of a chat and recognizes them.",
        epilog=SUBCOMMANDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("remember", parents=[common], help="remember a concept from a photo")
    p.add_argument("image", help="photo file")
    p.add_argument("name", help="the concept's name, e.g. Mochi")
    p.add_argument("--desc", default="", help="a short description, e.g. 'my grey cat'")
    p.add_argument("--category", default=None, help="what it is (cat, dog, person...)")
    p.add_argument("--box", type=_parse_box, default=None, help="x1,y1,x2,y2 of the concept")

    p = sub.add_parser("who", parents=[common], help="who and what I know is in a photo")
    p.add_argument("image", help="photo file")
    p.add_argument("--out", default=None, help="write the photo with named boxes here")

    p = sub.add_parser("ask", parents=[common], help="ask about a photo or a remembered name")
    p.add_argument("args", nargs="+", metavar="[IMAGE] QUESTION")
    p.add_argument("--out", default=None, help="write the photo with named boxes here")

    p = sub.add_parser("caption", parents=[common], help="a caption that uses known names")
    p.add_argument("image", help="photo file")

    sub.add_parser("concepts", parents=[common], help="list the chat's concepts")

    p = sub.add_parser("rename", parents=[common], help="rename a concept")
    p.add_argument("name")
    p.add_argument("new_name")

    p = sub.add_parser("describe", parents=[common], help="change a concept's description")
    p.add_argument("name")
    p.add_argument("description")

    p = sub.add_parser("forget", parents=[common], help="forget a concept and its photos")
    p.add_argument("name")

    p = sub.add_parser("forget-user", parents=[common], help="forget a user's data in every chat")
    p.add_argument("target_user", metavar="USER")

    p = sub.add_parser("chat", parents=[common], help="a local chat with the bot")
    p.add_argument("--out-dir", default=".", help="where annotated photos are saved")
    return parser


def _settings(args: argparse.Namespace):
    from engine.settings import EngineSettings

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir).expanduser()
    if args.profile:
        overrides["profile"] = args.profile
    return EngineSettings(**overrides)


def _read_image(path: str, settings) -> bytes:
    from engine.images import ImageLimits, read_image_file

    return read_image_file(Path(path).expanduser(), ImageLimits.from_settings(settings))


def _concept_json(concept: Concept, box: Box | None = None) -> dict[str, Any]:
    return {
        "id": concept.id,
        "name": concept.name,
        "description": concept.description,
        "category": concept.category,
        "box": box.as_list() if box else None,
        "examples": concept.examples,
    }


def _answer_json(answer: Answer) -> dict[str, Any]:
    return {
        "answer": answer.text,
        "concepts": [
            {"name": r.name, "score": r.score, "box": r.box.as_list() if r.box else None}
            for r in answer.concepts
        ],
    }


def _write_image(jpeg: bytes | None, out: str | None) -> str | None:
    if not out or jpeg is None:
        return None
    path = Path(out).expanduser()
    if path.suffix.lower() in {".jpg", ".jpeg"}:
        path.write_bytes(jpeg)
    else:  # any other extension Pillow knows (.png, .webp ...)
        import io

        from PIL import Image

        try:
            Image.open(io.BytesIO(jpeg)).save(path)
        except (ValueError, OSError) as error:
            raise InvalidInputError(f"Can't write {out}: {error}") from None
    return str(path)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from engine.engine import Engine
    from engine.permissions import Actor

    settings = _settings(args)
    if args.command == "chat":
        return _run_chat(args, settings)
    # Read the photo before loading models: a bad path fails at once.
    image = _read_image(args.image, settings) if hasattr(args, "image") else None
    engine = Engine.open(settings)
    actor = Actor(args.user, args.admin)
    try:
        match args.command:
            case "remember":
                result = engine.remember(
                    args.chat,
                    image,
                    args.name,
                    args.desc,
                    args.user,
                    box=args.box,
                    category=args.category,
                )
                c = result.concept
                verb = "Remembered" if result.created else "Added a photo to"
                photos = f"{c.examples} photo{'s' if c.examples != 1 else ''}"
                text = f"{verb} {c.name} ({photos}); crop {result.box.as_list()}"
                _emit(args, {"concept": _concept_json(c, result.box)}, text)
            case "who":
                answer = engine.recognize(args.chat, image, args.user, annotate=bool(args.out))
                saved = _write_image(answer.image, args.out)
                _emit(
                    args,
                    _answer_json(answer),
                    answer.text + (f"\n(saved {saved})" if saved else ""),
                )
            case "ask":
                *maybe_image, question = args.args
                if len(maybe_image) > 1:
                    raise InvalidInputError("Give at most one photo, then the question in quotes.")
                photo = _read_image(maybe_image[0], settings) if maybe_image else None
                answer = engine.ask(args.chat, photo, question, args.user)
                saved = _write_image(answer.image, args.out)
                _emit(
                    args,
                    _answer_json(answer),
                    answer.text + (f"\n(saved {saved})" if saved else ""),
                )
            case "caption":
                answer = engine.caption(args.chat, image, args.user)
                _emit(args, _answer_json(answer), answer.text)
            case "concepts":
                concepts = engine.list_concepts(args.chat)
                from bots.core.replies import concept_list

                payload = {
                    "concepts": [
                        {
                            "name": c.name,
                            "description": c.description,
                            "examples": c.examples,
                            "owner": c.owner,
                        }
                        for c in concepts
                    ]
                }
                _emit(args, payload, concept_list(concepts))
            case "rename":
                c = engine.rename(args.chat, args.name, args.new_name, actor)
                _emit(args, {"concept": _concept_json(c)}, f"Renamed {args.name} to {c.name}.")
            case "describe":
                c = engine.describe(args.chat, args.name, args.description, actor)
                _emit(args, {"concept": _concept_json(c)}, f"{c.name}: {c.description}")
            case "forget":
                c = engine.forget(args.chat, args.name, actor)
                _emit(args, {"forgotten": c.name}, f"Forgot {c.name}.")
            case "forget-user":
                removed = engine.forget_user(args.target_user)
                _emit(
                    args,
                    {"forgotten": removed},
                    f"Forgot {removed} concept(s) of {args.target_user}.",
                )
    finally:
        engine.close()
    return 0


def _run_chat(args: argparse.Namespace, settings) -> int:
    from bots.core.gateway import LocalGateway
    from bots.core.handler import CommandCore
    from bots.core.limits import Limits
    from bots.terminal import TerminalChat
    from engine.engine import Engine
    from engine.images import ImageLimits

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
    except RapbotError as error:
        print(f"rapbot: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
