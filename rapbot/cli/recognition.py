"""`who`, `ask`, `caption`: recognize the chat's concepts in a photo and talk about them."""

from __future__ import annotations

import argparse

from rapbot.cli.common import (
    UsageError,
    answer_json,
    check_output,
    emit,
    open_engine,
    read_image,
    settings_for,
    write_image,
)


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("who", parents=[common], help="who and what I know is in a photo")
    p.set_defaults(handler=run_who)
    p.add_argument("image", help="photo file")
    p.add_argument("--out", default=None, help="write the photo with named boxes here")

    p = sub.add_parser("ask", parents=[common], help="ask about a photo or a remembered name")
    p.set_defaults(handler=run_ask)
    p.add_argument("args", nargs="+", metavar="[IMAGE] QUESTION")
    p.add_argument("--out", default=None, help="write the photo with named boxes here")

    p = sub.add_parser("caption", parents=[common], help="a caption that uses known names")
    p.set_defaults(handler=run_caption)
    p.add_argument("image", help="photo file")


def _with_saved(text: str, saved: str | None) -> str:
    return text + (f"\n(saved {saved})" if saved else "")


def run_who(args: argparse.Namespace) -> int:
    check_output(args.out)
    settings = settings_for(args)
    image = read_image(args.image, settings)  # before loading models: a bad path fails at once
    with open_engine(settings) as engine:
        answer = engine.recognize(args.chat, image, args.user, annotate=bool(args.out))
        saved = write_image(answer.image, args.out)
    emit(args, answer_json(answer), _with_saved(answer.text, saved))
    return 0


def run_ask(args: argparse.Namespace) -> int:
    check_output(args.out)
    *maybe_image, question = args.args
    if len(maybe_image) > 1:
        raise UsageError(
            'give at most one photo, then the question in quotes: ask [IMAGE] "QUESTION"'
        )
    settings = settings_for(args)
    photo = read_image(maybe_image[0], settings) if maybe_image else None
    with open_engine(settings) as engine:
        answer = engine.ask(args.chat, photo, question, args.user)
        saved = write_image(answer.image, args.out)
    emit(args, answer_json(answer), _with_saved(answer.text, saved))
    return 0


def run_caption(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    image = read_image(args.image, settings)
    with open_engine(settings) as engine:
        answer = engine.caption(args.chat, image, args.user)
    emit(args, answer_json(answer), answer.text)
    return 0
