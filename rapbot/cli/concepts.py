"""`remember`, `concepts`, `rename`, `describe`, `forget`, `forget-user`: a chat's concepts."""

from __future__ import annotations

import argparse

from bots.core import replies
from rapbot.cli.common import (
    concept_json,
    emit,
    open_engine,
    parse_box,
    read_image,
    settings_for,
)


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("remember", parents=[common], help="remember a concept from a photo")
    p.set_defaults(handler=run_remember)
    p.add_argument("image", help="photo file")
    p.add_argument("name", help="the concept's name, e.g. Mochi")
    p.add_argument("--desc", default="", help="a short description, e.g. 'my grey cat'")
    p.add_argument("--category", default=None, help="what it is (cat, dog, person...)")
    p.add_argument("--box", type=parse_box, default=None, help="x1,y1,x2,y2 of the concept")

    p = sub.add_parser("concepts", parents=[common], help="list the chat's concepts")
    p.set_defaults(handler=run_concepts)

    p = sub.add_parser("rename", parents=[common], help="rename a concept")
    p.set_defaults(handler=run_rename)
    p.add_argument("name")
    p.add_argument("new_name")

    p = sub.add_parser("describe", parents=[common], help="change a concept's description")
    p.set_defaults(handler=run_describe)
    p.add_argument("name")
    p.add_argument("description")

    p = sub.add_parser("forget", parents=[common], help="forget a concept and its photos")
    p.set_defaults(handler=run_forget)
    p.add_argument("name")

    p = sub.add_parser("forget-user", parents=[common], help="forget a user's data in every chat")
    p.set_defaults(handler=run_forget_user)
    p.add_argument("target_user", metavar="USER")


def _actor(args: argparse.Namespace):
    from engine.permissions import Actor

    return Actor(args.user, args.admin)


def run_remember(args: argparse.Namespace) -> int:
    from engine.validation import clean_description, clean_name

    settings = settings_for(args)
    # Everything that can be checked is checked before the models load (seconds).
    clean_name(args.name, settings.max_name_length)
    clean_description(args.desc, settings.max_description_length)
    image = read_image(args.image, settings)
    with open_engine(settings) as engine:
        result = engine.remember(
            args.chat, image, args.name, args.desc, args.user, box=args.box, category=args.category
        )
    text = replies.remembered(result, crop=result.box)
    emit(args, {"concept": concept_json(result.concept, result.box)}, text)
    return 0


def run_concepts(args: argparse.Namespace) -> int:
    with open_engine(settings_for(args), store_only=True) as engine:
        concepts = engine.list_concepts(args.chat)
    payload = {
        "concepts": [
            {"name": c.name, "description": c.description, "examples": c.examples, "owner": c.owner}
            for c in concepts
        ]
    }
    emit(args, payload, replies.concept_list(concepts))
    return 0


def run_rename(args: argparse.Namespace) -> int:
    with open_engine(settings_for(args), store_only=True) as engine:
        c = engine.rename(args.chat, args.name, args.new_name, _actor(args))
    emit(args, {"concept": concept_json(c)}, replies.renamed(args.name, c))
    return 0


def run_describe(args: argparse.Namespace) -> int:
    with open_engine(settings_for(args), store_only=True) as engine:
        c = engine.describe(args.chat, args.name, args.description, _actor(args))
    emit(args, {"concept": concept_json(c)}, replies.described(c))
    return 0


def run_forget(args: argparse.Namespace) -> int:
    with open_engine(settings_for(args), store_only=True) as engine:
        c = engine.forget(args.chat, args.name, _actor(args))
    emit(args, {"forgotten": c.name}, replies.forgotten(c))
    return 0


def run_forget_user(args: argparse.Namespace) -> int:
    from bots.core.platforms import forget_user_files

    settings = settings_for(args)
    with open_engine(settings, store_only=True) as engine:
        removed = engine.forget_user(args.target_user)
    # And what an adapter keeps on disk for them (the web chat's indexed photos).
    files = forget_user_files(settings.data_dir, args.target_user)
    text = replies.forgot_user(removed, args.target_user, files)
    emit(args, {"forgotten": removed, "files_deleted": files}, text)
    return 0
