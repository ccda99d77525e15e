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
  rapbot index photos/*.jpg                   (the CLI indexes its own files: no /index on)
  rapbot search "Mochi on the sofa" -k 5      (--ref photo.jpg "but at the beach")
  rapbot export --chat tg:-100123 --out chat.zip      (--all: every chat, a backup)
  rapbot import chat.zip --chat tg:-100456
  rapbot chat
  TELEGRAM_BOT_TOKEN=... rapbot serve telegram
  DISCORD_BOT_TOKEN=... rapbot serve discord --sync --guild ID    (once), then without --sync
"""


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
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

    p = sub.add_parser("index", parents=[common], help="add photos to the chat's search history")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="photo files (source = the path)")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="re-embed every chat's indexed photos with the configured search encoder"
        " (after changing RAPBOT_SEARCH_ENCODER or the profile)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --rebuild: re-embed even when the index already matches the encoder"
        " (from the stored 256-pixel thumbnails, which is worse than the photos were)",
    )

    p = sub.add_parser("search", parents=[common], help="search the chat's indexed photos")
    p.add_argument("text", nargs="*", metavar="TEXT", help="what to look for (or the change)")
    p.add_argument("--ref", default=None, help="a reference photo: like this (but TEXT)")
    p.add_argument("-k", type=int, default=10, help="how many results (default 10)")

    p = sub.add_parser(
        "export", parents=[common], help="save a chat's concepts and photo history to one file"
    )
    p.add_argument("--out", required=True, help="the archive to write (e.g. mochi-chat.zip)")
    p.add_argument("--all", action="store_true", help="every chat (a backup of the store)")
    p.add_argument(
        "--no-photos",
        action="store_true",
        help="concepts only, without the photo search history (e.g. to share a chat's concepts)",
    )

    p = sub.add_parser(
        "import", parents=[common], help="add the concepts and photos of an exported file"
    )
    p.add_argument("file", help="an archive written by `rapbot export`")
    p.add_argument(
        "--replace",
        action="store_true",
        help="forget the chat's concepts, and the indexed photos the archive replaces, first"
        " (restore)",
    )
    p.add_argument(
        "--with-photos",
        action="store_true",
        help="with --chat: import the archived chat's photo search history too (other people's"
        " photos; left out by default)",
    )

    p = sub.add_parser("chat", parents=[common], help="a local chat with the bot")
    p.add_argument("--out-dir", default=".", help="where annotated photos are saved")

    p = sub.add_parser("serve", parents=[common], help="run the chat bot on a platform")
    p.add_argument("platform", choices=["telegram", "discord"], help="the chat platform")
    p.add_argument(
        "--gateway",
        choices=["local", "celery"],
        default=None,
        help="run the engine in-process (local) or on Celery workers (celery); env RAPBOT_GATEWAY",
    )
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
    p.add_argument("--queues", default="gpu,cpu", help="gpu (model work), cpu (store only)")
    p.add_argument("--device", default=None, help="cuda:N (one worker per GPU) or cpu")
    p.add_argument("--concurrency", type=int, default=None, help="threads (GPU 16, CPU cores)")
    p.add_argument("--pool", choices=["threads", "solo", "prefork"], default="threads")
    p.add_argument("--loglevel", default="info", help="Celery log level")

    p = sub.add_parser(
        "doctor", parents=[common], help="check the configuration, store, broker, models, tokens"
    )
    p.add_argument(
        "--role",
        choices=["auto", "local", "bot", "worker"],
        default="auto",
        help="what this process is (auto: bot with RAPBOT_GATEWAY=celery, else local)",
    )
    p.add_argument("--skip-models", action="store_true", help="do not load the models")
    p.add_argument(
        "--online", action="store_true", help="ask Telegram / Discord whether the tokens work"
    )

    p = sub.add_parser("config", parents=[common], help="show the settings in effect")
    p.add_argument(
        "--table", action="store_true", help="every setting as Markdown tables (the README's)"
    )

    p = sub.add_parser("models", parents=[common], help="model files (convert RAP checkpoints)")
    actions = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    c = actions.add_parser(
        "convert",
        parents=[common],
        help="an original LLaVA-format checkpoint (RAP-LLaVA, RAP-Phi3) -> transformers format",
    )
    c.add_argument("src", help="the original checkpoint's folder (config, weights, tokenizer)")
    c.add_argument("dst", help="folder to write the transformers checkpoint to")
    c.add_argument(
        "--template",
        choices=["llava_v1", "phi3"],
        default=None,
        help="conversation template (default: phi3 for Phi-3 models, else llava_v1)",
    )
    c.add_argument(
        "--vision-tower", default=None, help="local CLIP folder when the checkpoint has none"
    )
    _add_train_eval(sub, common)
    return parser


def _add_train_eval(sub, common: argparse.ArgumentParser) -> None:
    """`rapbot train KIND ...` and `rapbot eval KIND ...`: one KIND per method (rap; cir next).

    A KIND's parser sets ``handler`` (called as ``handler(args, settings)``), so adding one is
    a parser plus a function, with nothing to change in :func:`run`.
    """
    train = sub.add_parser("train", parents=[common], help="fine-tune models (rap, cir)")
    train_kinds = train.add_subparsers(dest="train_command", required=True, metavar="KIND")
    evaluate = sub.add_parser("eval", parents=[common], help="evaluate models (rap, cir)")
    eval_kinds = evaluate.add_subparsers(dest="eval_command", required=True, metavar="KIND")

    t = train_kinds.add_parser(
        "rap", parents=[common], help="LoRA fine-tuning on RAP-format data (accelerate-ready)"
    )
    t.set_defaults(handler=_run_train_rap)
    t.add_argument("--data", required=True, help="RAP records: a JSON list or JSON lines")
    t.add_argument("--images", default=None, help="image root (default: the data's folder)")
    t.add_argument(
        "--base", required=True, help="base model: folder, hub name, tiny-llava, rap-llava..."
    )
    t.add_argument("--out", required=True, help="output folder: adapter and checkpoints")
    t.add_argument("--lora-r", type=int, default=8)
    t.add_argument("--lora-alpha", type=int, default=16)
    t.add_argument("--lora-dropout", type=float, default=0.05)
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine decay)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: the epochs')")
    t.add_argument("--batch-size", type=int, default=1, help="per device")
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--max-concepts", type=int, default=2, help="concepts per prompt (RAP's K)")
    t.add_argument("--noise-concepts", type=int, default=1, help="random extra concepts")
    t.add_argument("--max-length", type=int, default=None, help="longest sequence in tokens")
    t.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--train-projector", action="store_true", help="also train the projector")
    t.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --out (or the one given)",
    )
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--keep-checkpoints", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help="data loader processes")
    t.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = train_kinds.add_parser(
        "cir", parents=[common], help="CIR-LVLM composed image search encoder (InfoNCE, LoRA)"
    )
    c.set_defaults(handler=_run_train_cir)
    c.add_argument("--data", required=True, help="triplets: CIRR, FashionIQ or CIRCO JSON")
    c.add_argument("--images", default=None, help="image folder (default: the data's folder)")
    c.add_argument("--base", required=True, help="base VLM: folder, hub name, tiny-llava...")
    c.add_argument("--out", required=True, help="output folder: encoder and checkpoints")
    c.add_argument("--steps", type=int, default=1000)
    c.add_argument("--batch-size", type=int, default=16, help="in-batch negatives per step")
    c.add_argument("--lr", type=float, default=1e-4)
    c.add_argument("--temperature", type=float, default=0.05)
    c.add_argument("--pool-size", type=int, default=8, help="prompts in the prompt pool")
    c.add_argument("--prompt-len", type=int, default=4, help="tokens per soft prompt")
    c.add_argument("--lora-r", type=int, default=8)
    c.add_argument("--save-every", type=int, default=500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --out (or the one given)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = eval_kinds.add_parser(
        "rap", parents=[common], help="RAP's captioning, QA and recognition metrics"
    )
    e.set_defaults(handler=_run_eval_rap)
    e.add_argument("set", nargs="?", help="evaluation set (JSON; see the README)")
    e.add_argument("--images", default=None, help="image root (default: the set's folder)")
    who = e.add_mutually_exclusive_group()
    who.add_argument("--generator", default=None, help="a generator model (as for --base)")
    who.add_argument(
        "--engine", action="store_true", help="the whole engine (--profile, RAPBOT_GENERATOR)"
    )
    e.add_argument("--adapter", default=None, help="a LoRA adapter for --generator")
    e.add_argument("--name", default=None, help="the method's name in the tables")
    e.add_argument("--tasks", default="caption,visual_qa,text_qa,recognition")
    e.add_argument("--limit", type=int, default=None, help="at most N items per task")
    e.add_argument("--k", type=int, default=2, help="concepts in a caption prompt")
    e.add_argument("--no-distractors", action="store_true", help="captions: true concepts only")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--device", default="auto", help="--generator's device")
    e.add_argument("--out", default=None, help="save the answers (predictions JSON) here")
    e.add_argument(
        "--score", nargs="+", default=None, metavar="PRED", help="only table saved predictions"
    )

    ec = eval_kinds.add_parser(
        "cir", parents=[common], help="composed image search: Recall@K, Recall_subset@K, mAP@K"
    )
    ec.set_defaults(handler=_run_eval_cir)
    ec.add_argument("set", help="triplets: CIRR, FashionIQ or CIRCO JSON")
    ec.add_argument("--images", default=None, help="image folder (default: the set's folder)")
    ec.add_argument("--encoder", required=True, help="a `rapbot train cir` output folder")
    ec.add_argument("--device", default="cpu")


def _settings(args: argparse.Namespace):
    """The one validated configuration (rapbot.settings); CLI flags win over everything."""
    from rapbot.settings import load_settings

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir).expanduser()
    if args.profile:
        overrides["profile"] = args.profile
    return load_settings(args.config, **overrides)


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
        from engine.images import save_image

        save_image(jpeg, path)
    return str(path)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from engine.engine import Engine
    from engine.permissions import Actor

    args.chat_given = args.chat is not None
    if args.chat is None:
        args.chat = "local"
    if args.config:  # worker processes and their children read the same file
        os.environ["RAPBOT_CONFIG_FILE"] = str(Path(args.config).expanduser())
    if args.command == "doctor":
        return _run_doctor(args)
    settings = _settings(args)
    if args.command == "config":
        return _run_config(args, settings)
    if args.command in ("export", "import"):
        return _run_transfer(args, settings)
    if args.command == "chat":
        return _run_chat(args, settings)
    if args.command in ("serve", "worker"):  # long-running: structured logs and metrics
        from rapbot.observability import setup

        # A worker serves its metrics itself, once it knows whether it spawns one per GPU.
        port = settings.metrics_port if args.command == "serve" else 0
        try:
            setup(settings.log_level, settings.log_format, port, settings.metrics_addr)
        except OSError as error:
            raise RapbotError(f"RAPBOT_METRICS_PORT={port}: can't serve ({error})") from None
    if args.command == "serve":
        return _run_serve(args, settings)
    if args.command == "worker":
        return _run_worker(args)
    if args.command == "models":
        return _run_models(args, settings)
    if args.command in ("train", "eval"):
        return args.handler(args, settings)
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
            case "index" if args.rebuild:
                if args.images:
                    raise InvalidInputError("Give either photos or --rebuild, not both.")
                stale = engine.composition.mismatch is not None  # made by another encoder
                count = engine.reindex_photos(force=args.force)
                text = f"Re-embedded {count} photo(s)."
                if count == 0 and not (stale or args.force):
                    text = (
                        "The photo index already matches the search encoder; nothing to do"
                        " (--force re-embeds anyway)."
                    )
                _emit(args, {"reindexed": count}, text)
            case "index":
                if not args.images:
                    raise InvalidInputError("Give the photos to index (or --rebuild).")
                # The CLI indexes the files it is given whatever the chat's /index setting: they
                # are the user's own. Idempotent: the source is the file's absolute path.
                added = []
                for path in args.images:
                    data = _read_image(path, settings)
                    source = str(Path(path).expanduser().resolve())
                    photo_id = engine.index_photo(args.chat, data, args.user, source, force=True)
                    added.append({"photo_id": photo_id, "source": source})
                _emit(args, {"indexed": added}, f"Indexed {len(added)} photo(s).")
            case "search":
                ref = _read_image(args.ref, settings) if args.ref else None
                hits = engine.search(args.chat, " ".join(args.text), ref, k=args.k)
                results = [
                    {"photo_id": h.photo_id, "score": round(h.score, 4), "source": h.source}
                    for h in hits
                ]
                text = "\n".join(f"{r['score']:.3f}  {r['source']}" for r in results)
                _emit(args, {"results": results}, text or "No photos found in this chat.")
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


def _run_transfer(args: argparse.Namespace, settings) -> int:
    """`export` / `import`: the stores alone (concepts and the photo search history); models
    only to re-embed another model's archive."""
    from engine.backup import export_scopes, import_archive, read_archive
    from engine.engine import Engine

    if args.command == "export":
        if args.all and args.chat_given:
            raise InvalidInputError("Give either --chat CHAT or --all, not both.")
        engine = Engine.open(settings, load_models=False)
        try:
            report = export_scopes(
                engine.store,
                None if args.all else [args.chat],
                args.out,
                photos=None if args.no_photos else engine.composition,
            )
            left_out = 0
            if args.no_photos:  # what was not written, to say so
                left_out = engine.composition.total(None if args.all else args.chat)
        finally:
            engine.close()
        chats = f"{report.scopes} chat{'s' if report.scopes != 1 else ''}"
        counts = {
            "scopes": report.scopes,
            "concepts": report.concepts,
            "examples": report.examples,
            "photos": report.photos,
            "photos_left_out": left_out,
        }
        if args.no_photos:
            text = (
                f"Exported {report.concepts} concept(s) with {report.examples} photo(s) from"
                f" {chats} to {report.path}; the photo search history ({left_out} photo(s)) and"
                " the /index settings were left out (--no-photos)."
            )
        else:
            text = (
                f"Exported {report.concepts} concept(s) with {report.examples} photo(s) and"
                f" {report.photos} photo(s) of the search history from {chats} to"
                f" {report.path}."
            )
        _emit(args, {"exported": counts, "path": report.path}, text)
        return 0

    # Check the file before opening the store or loading any model: a bad file fails at once.
    with read_archive(args.file) as archive:
        scopes = archive.scopes
        scope_map = None
        if args.chat_given:
            if len(scopes) != 1:
                raise InvalidInputError(
                    f"{Path(args.file).name} holds {len(scopes)} chats; --chat needs a one-chat"
                    " export (import it without --chat to keep each chat's own id)."
                )
            scope_map = {scopes[0]: args.chat}
        # Into another chat, the photo history (other people's photos) only when asked.
        renamed = scope_map is not None and args.chat.strip() != scopes[0]
        engine = Engine.open(settings, load_models=False)
        try:
            embedder = None
            if archive.model_id != engine.store.model_id:  # another CLIP: embed crops again
                from engine.models import load_models

                embedder = load_models(settings).embedder
            report = import_archive(
                archive,
                engine.store,
                embedder=embedder,
                scope_map=scope_map,
                mode="replace" if args.replace else "merge",
                photos=engine.composition,
                # Called only for photos of another search encoder (it loads that encoder).
                photo_embedder=engine.embed_thumbnails,
                include_photos=True if args.with_photos else None,
            )
        finally:
            engine.close()
    counts = {
        "scopes": report.scopes,
        "concepts": report.concepts,
        "examples": report.examples,
        "merged": report.merged,
        "skipped": report.skipped,
        "photos": report.photos,
        "photos_skipped": report.photos_skipped,
        "photos_left_out": report.photos_left_out,
        "photos_skipped_foreign": report.photos_skipped_foreign,
    }
    text = (
        f"Imported {report.concepts} new concept(s) and {report.examples} photo(s)"
        f" into {report.scopes} chat(s); {report.merged} name(s) already existed,"
        f" {report.skipped} photo(s) were already there. Search history: {report.photos}"
        f" photo(s) added, {report.photos_skipped} already there."
        + (
            f" {report.photos_left_out} photo(s) of the search history were left out: they are"
            f" other people's photos from another chat, imported into {args.chat} only with"
            " --with-photos."
            if report.photos_left_out
            else ""
        )
        + (
            f" {report.photos_skipped_foreign} photo(s) were skipped: their sources are not"
            " photos of this chat's platform, so its bot could not send them back."
            if report.photos_skipped_foreign
            else ""
        )
        + (
            f" The /index setting of {args.chat} was left as it was."
            if renamed and archive.photo_index is not None
            else ""
        )
        + (" Photos were embedded again for this model." if report.reembedded else "")
        + (
            " The search history was embedded again for this search encoder."
            if report.photos_reembedded
            else ""
        )
    )
    payload = {
        "imported": counts,
        "reembedded": report.reembedded,
        "photos_reembedded": report.photos_reembedded,
        "path": str(args.file),
    }
    _emit(args, payload, text)
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    """`rapbot doctor`: every check, what is wrong and how to fix it; exit 1 on a problem."""
    from rapbot.doctor import Check, as_json, diagnose, exit_code, report
    from rapbot.settings import ConfigError

    try:
        settings = _settings(args)
    except ConfigError as error:
        settings = None
        checks = [Check("configuration", False, str(error).replace("\n", "; "))]
    if settings is not None:
        checks = diagnose(settings, role=args.role, models=not args.skip_models, online=args.online)
    _emit(args, as_json(checks), report(checks))
    return exit_code(checks)


def _run_config(args: argparse.Namespace, settings) -> int:
    """`rapbot config`: the settings in effect (secrets hidden), or the README's tables."""
    from rapbot.settings import field_names, redact_url, settings_table, variable_of

    if args.table:
        print(settings_table(), end="")
        return 0
    values = settings.model_dump(mode="json")  # SecretStr fields dump as "**********"
    values = {k: redact_url(v) if isinstance(v, str) else v for k, v in values.items()}
    if args.json:
        print(json.dumps(values, ensure_ascii=False, indent=2))
    else:
        for name in field_names():
            value = values[name]
            print(f"{variable_of(name)}={'' if value is None else value}")
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    """`rapbot worker`: the engine settings reach the worker through the environment."""
    from workers.main import run_worker

    if args.data_dir:
        os.environ["RAPBOT_DATA_DIR"] = str(Path(args.data_dir).expanduser())
    if args.profile:
        os.environ["RAPBOT_PROFILE"] = args.profile
    return run_worker(
        queues=args.queues,
        device=args.device,
        concurrency=args.concurrency,
        pool=args.pool,
        loglevel=args.loglevel,
    )


def _run_serve(args: argparse.Namespace, settings) -> int:
    """`rapbot serve telegram|discord`: tokens and limits come from the settings."""
    args.gateway = args.gateway or settings.gateway
    if args.platform == "telegram":
        from bots.telegram_adapter import run_bot
    else:
        from bots.discord_adapter import run_bot

        return run_bot(
            settings,
            args.gateway,
            sync=args.sync,
            guild_id=args.guild,
            message_content=not args.no_message_content,
        )
    return run_bot(settings, args.gateway)


def _run_train_rap(args: argparse.Namespace, settings) -> int:
    from engine.generator.load import generator_location
    from engine.train.rap_train import TrainConfig, train
    from engine.weights import is_offline, models_dir

    data = Path(args.data).expanduser()
    result = train(
        TrainConfig(
            data=data,
            images=Path(args.images).expanduser() if args.images else data.parent,
            base=generator_location(args.base, settings) or args.base,
            out=Path(args.out).expanduser(),
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            lr=args.lr,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_concepts=args.max_concepts,
            noise_concepts=args.noise_concepts,
            max_length=args.max_length,
            bf16=args.bf16,
            gradient_checkpointing=args.gradient_checkpointing,
            train_projector=args.train_projector,
            resume=args.resume,
            save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints,
            seed=args.seed,
            num_workers=args.workers,
            cpu=args.cpu,
            progress=not args.no_progress,
            cache_dir=models_dir(settings) / "hf",
            local_files_only=is_offline(settings),
        )
    )
    if not result.main_process:  # `accelerate launch`: one summary, not one per GPU
        return 0
    last = result.losses[-1] if result.losses else None
    payload = {"step": result.step, "adapter": str(result.adapter), "loss": last}
    text = f"Trained to step {result.step}; adapter saved in {result.adapter}"
    _emit(args, payload, text + (f" (last loss {last:.4f})" if last is not None else ""))
    return 0


def _run_train_cir(args: argparse.Namespace, settings) -> int:
    from engine.cir.train import CirTrainConfig, train
    from engine.generator.load import generator_location

    data = Path(args.data).expanduser()
    result = train(
        CirTrainConfig(
            data=data,
            images=Path(args.images).expanduser() if args.images else data.parent,
            base=generator_location(args.base, settings) or args.base,
            out=Path(args.out).expanduser(),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            temperature=args.temperature,
            pool_size=args.pool_size,
            prompt_len=args.prompt_len,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            save_every=args.save_every,
            seed=args.seed,
            device=args.device,
            resume=args.resume,
            progress=not args.no_progress,
        )
    )
    last = result.losses[-1] if result.losses else None
    payload = {"step": result.step, "out": str(result.out), "loss": last}
    text = f"Trained to step {result.step}; encoder saved in {result.out}"
    _emit(args, payload, text + (f" (last loss {last:.4f})" if last is not None else ""))
    return 0


def _run_eval_cir(args: argparse.Namespace, settings) -> int:
    from engine.cir.train import ImageCache, evaluate, load_encoder, load_triplets

    data = Path(args.set).expanduser()
    images = ImageCache(Path(args.images).expanduser() if args.images else data.parent)
    scores = evaluate(load_encoder(args.encoder, device=args.device), load_triplets(data), images)
    _emit(args, scores, "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return 0


def _run_eval_rap(args: argparse.Namespace, settings) -> int:
    from engine.eval.rap_eval import (
        GeneratorAnswerer,
        evaluate_engine,
        load_eval_set,
        read_predictions,
        report,
        run_eval,
        score_json,
    )

    if args.score:
        runs = [read_predictions(path) for path in args.score]
    else:
        if not args.set or not (args.generator or args.engine):
            raise InvalidInputError(
                "Give an evaluation set and --generator MODEL or --engine (or --score FILES)."
            )
        eval_set = load_eval_set(args.set, args.images)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        progress = not args.json
        if args.engine:
            from engine.engine import Engine

            engine = Engine.open(settings)
            try:
                name = args.name or f"engine ({settings.profile})"
                run = evaluate_engine(
                    engine, eval_set, method=name, tasks=tasks, limit=args.limit, progress=progress
                )
            finally:
                engine.close()
        else:
            from engine.generator.hf import Generator
            from engine.generator.load import generator_location
            from engine.weights import is_offline, models_dir

            generator = Generator.load(
                generator_location(args.generator, settings) or args.generator,
                device=args.device,
                adapter=args.adapter,
                cache_dir=models_dir(settings) / "hf",
                local_files_only=is_offline(settings),
                max_new_tokens=args.max_new_tokens,
            )
            answerer = GeneratorAnswerer(
                generator, eval_set, k=args.k, distractors=not args.no_distractors
            )
            name = args.name or args.generator + (" + adapter" if args.adapter else "")
            run = run_eval(
                eval_set, answerer, method=name, tasks=tasks, limit=args.limit, progress=progress
            )
        if args.out:
            Path(args.out).expanduser().write_text(json.dumps(run, indent=1, ensure_ascii=False))
        runs = [run]
    _emit(args, {"results": [score_json(run) for run in runs]}, report(runs))
    return 0


def _run_models(args: argparse.Namespace, settings) -> int:
    from engine.generator.convert import convert_checkpoint
    from engine.weights import is_offline

    dst = convert_checkpoint(
        args.src,
        args.dst,
        template=args.template,
        vision_tower=args.vision_tower,
        local_files_only=is_offline(settings),
    )
    _emit(args, {"converted": str(dst)}, f"Converted {args.src} -> {dst} (RAPBOT_GENERATOR={dst})")
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
