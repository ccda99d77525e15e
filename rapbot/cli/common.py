"""What every command group shares: the global options, settings, engine, files and output.

Kept free of model libraries: importing a command module must cost nothing until its command
runs (``rapbot --help`` and the store-only commands never import torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidInputError
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


def gateway_option(parser: argparse.ArgumentParser) -> None:
    """``--gateway`` of the commands that run a chat (``serve``, ``web``)."""
    parser.add_argument(
        "--gateway",
        choices=["local", "celery"],  # bots.core.gateway.GATEWAY_KINDS, not imported: start-up
        default=None,
        help="run the engine in-process (local) or on Celery workers (celery); env RAPBOT_GATEWAY",
    )


class UsageError(InvalidInputError):
    """The command line itself is wrong: reported with the command's usage, exit status 2."""


BOX_FORM = "a box is x1,y1,x2,y2 in pixels, with x1 < x2 and y1 < y2 (e.g. 10,20,200,240)"


def parse_box(text: str) -> Box:
    """``--box``: four finite pixel coordinates of a non-empty region (checked at parse time,
    before any model loads; whether it fits the photo is the engine's check)."""
    try:
        numbers = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(BOX_FORM) from None
    if len(numbers) != 4 or not all(math.isfinite(v) and 0 <= v < 2**31 for v in numbers):
        raise argparse.ArgumentTypeError(BOX_FORM)
    box = Box(*(int(round(v)) for v in numbers))
    if box.x1 >= box.x2 or box.y1 >= box.y2:
        raise argparse.ArgumentTypeError(BOX_FORM)
    return box


def check_output(out: str | None) -> None:
    """An ``--out`` file that can be written, checked before the work: its folder exists, it
    is not a folder, and its extension is an image format."""
    if not out:
        return
    path = Path(out).expanduser()
    if path.is_dir():
        raise InvalidInputError(f"--out {out} is a folder; give a file name such as photo.jpg")
    if not path.parent.is_dir():
        raise InvalidInputError(f"--out {out}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise InvalidInputError(f"--out {out}: the folder {path.parent} is not writable")
    if path.suffix.lower() not in {".jpg", ".jpeg"}:
        from PIL import Image

        if path.suffix.lower() not in Image.registered_extensions():
            raise InvalidInputError(f"--out {out}: give an image file name (.jpg, .png, .webp)")


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_of(args: argparse.Namespace, what: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar with counts and ETA on stderr for work that reports itself:
    ``report(stage, done, total)`` (an engine callback; a new stage starts the bar again under
    its name). Shown only on a terminal and for two or more items, so --json output and logs
    stay clean."""
    if args.json or not stderr_is_terminal():
        yield lambda stage, done, total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    # force_terminal: stderr is one (checked above), whatever TERM says.
    console = Console(stderr=True, force_terminal=True)
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=None, visible=False)
        current = [what]

        def report(stage: str, done: int, total: int) -> None:
            if stage != current[0]:  # a new stage: its own count and speed
                current[0] = stage
                bar.reset(task, total=total, completed=done, description=stage)
            bar.update(task, completed=done, total=total, visible=total >= 2)

        yield report


@contextlib.contextmanager
def progress(args: argparse.Namespace, total: int, what: str) -> Iterator[Callable[[], None]]:
    """:func:`progress_of` for a loop of the CLI's own: ``advance()`` once per item, ``total``
    items."""
    from engine.progress import counter

    with progress_of(args, what) as report:
        yield counter(report, what, total)


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
def open_engine(settings: Settings, *, store_only: bool = False) -> Iterator[Engine]:
    """The engine on the configured store, closed on the way out. ``store_only``: no model is
    loaded or imported (:meth:`engine.engine.Engine.open_store`), for the commands that only
    read or change the store; they work without the models' weights."""
    from engine.engine import Engine

    engine = Engine.open_store(settings) if store_only else Engine.open(settings)
    try:
        yield engine
    finally:
        engine.close()


def read_image(path: str, settings: Settings) -> bytes:
    """A photo file's bytes, decoded once to check them: a bad file fails here, before any
    model loads, with its name in the one-line message."""
    from engine.errors import ImageError
    from engine.images import ImageLimits, decode_image, read_image_file

    limits = ImageLimits.from_settings(settings)
    data = read_image_file(Path(path).expanduser(), limits)
    try:
        decode_image(data, limits)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None
    return data


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
