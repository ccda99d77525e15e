"""What every command group shares: the global options, settings, engine, files and output.

Kept free of model libraries: importing a command module must cost nothing until its command
runs (``rapbot --help`` and the store-only commands never import torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.types import Answer, Box, Concept

if TYPE_CHECKING:
    from engine.engine import Engine
    from rapbot.settings import Settings


def global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Global options, accepted before or after the subcommand."""
    keep = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--config",
        default=keep(None),
        metavar="FILE",
        help="a KEY=value settings file (env RAPBOT_CONFIG_FILE); the environment wins over it",
    )
    parser.add_argument("--data-dir", default=keep(None), help="data folder (env RAPBOT_DATA_DIR)")
    parser.add_argument(
        "--profile",
        choices=["tiny", "cpu", "gpu"],
        default=keep(None),
        help="model profile (env RAPBOT_PROFILE; default cpu)",
    )
    # None = not given: `import` tells "keep the archive's chats" from "into this chat".
    parser.add_argument("--chat", default=keep(None), help="the chat (scope); default 'local'")
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


def parse_box(text: str) -> Box:
    try:
        values = [int(round(float(v))) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("a box is x1,y1,x2,y2 in pixels") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError("a box is x1,y1,x2,y2 in pixels")
    return Box(*values)


def settings_for(args: argparse.Namespace) -> Settings:
    """The one validated configuration (rapbot.settings); CLI flags win over everything."""
    from rapbot.settings import load_settings

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir).expanduser()
    if args.profile:
        overrides["profile"] = args.profile
    return load_settings(args.config, **overrides)


@contextlib.contextmanager
def open_engine(settings: Settings, *, load_models: bool = True) -> Iterator[Engine]:
    """The engine on the configured store, closed on the way out."""
    from engine.engine import Engine

    engine = Engine.open(settings, load_models=load_models)
    try:
        yield engine
    finally:
        engine.close()


def read_image(path: str, settings: Settings) -> bytes:
    from engine.images import ImageLimits, read_image_file

    return read_image_file(Path(path).expanduser(), ImageLimits.from_settings(settings))


def concept_json(concept: Concept, box: Box | None = None) -> dict[str, Any]:
    return {
        "id": concept.id,
        "name": concept.name,
        "description": concept.description,
        "category": concept.category,
        "box": box.as_list() if box else None,
        "examples": concept.examples,
    }


def answer_json(answer: Answer) -> dict[str, Any]:
    return {
        "answer": answer.text,
        "concepts": [
            {"name": r.name, "score": r.score, "box": r.box.as_list() if r.box else None}
            for r in answer.concepts
        ],
    }


def write_image(jpeg: bytes | None, out: str | None) -> str | None:
    if not out or jpeg is None:
        return None
    path = Path(out).expanduser()
    if path.suffix.lower() in {".jpg", ".jpeg"}:
        path.write_bytes(jpeg)
    else:  # any other extension Pillow knows (.png, .webp ...)
        from engine.images import save_image

        save_image(jpeg, path)
    return str(path)


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False) if args.json else text)
