"""`index`, `search`: the chat's photo search history (composed image search)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bots.core import replies
from engine.errors import InvalidInputError, RapbotError
from rapbot.cli.common import UsageError, emit, open_engine, progress, read_image, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("index", parents=[common], help="add photos to the chat's search history")
    p.set_defaults(handler=run_index)
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
    p.set_defaults(handler=run_search)
    p.add_argument("text", nargs="*", metavar="TEXT", help="what to look for (or the change)")
    p.add_argument("--ref", default=None, help="a reference photo: like this (but TEXT)")
    p.add_argument("-k", type=int, default=10, help="how many results (default 10)")


def run_index(args: argparse.Namespace) -> int:
    if args.rebuild:
        return _rebuild(args)
    if not args.images:
        raise UsageError("give the photos to index (or --rebuild)")
    settings = settings_for(args)
    # Every file is checked before any model loads; the bad ones are named, the good indexed.
    good, bad = [], []
    for path in args.images:
        try:
            read_image(path, settings)  # the bytes are read again one at a time below
        except RapbotError as error:
            bad.append({"source": path, "error": str(error)})
        else:
            good.append(path)
    added = []
    if good:
        with open_engine(settings) as engine, progress(args, len(good), "Indexing") as advance:
            # The CLI indexes the files it is given whatever the chat's /index setting: they
            # are the user's own. Idempotent: the source is the file's absolute path.
            for path in good:
                source = str(Path(path).expanduser().resolve())
                data = read_image(path, settings)
                photo_id = engine.index_photo(args.chat, data, args.user, source, force=True)
                added.append({"photo_id": photo_id, "source": source})
                advance()
    for failure in bad:
        print(f"rapbot: not indexed: {failure['error']}", file=sys.stderr)
    payload = {"indexed": added, "failed": bad} if bad else {"indexed": added}
    emit(args, payload, replies.indexed(len(added)))
    return 1 if bad else 0


def _rebuild(args: argparse.Namespace) -> int:
    if args.images:
        raise InvalidInputError("Give either photos or --rebuild, not both.")
    with open_engine(settings_for(args)) as engine:
        stale = engine.photos.mismatch is not None  # made by another encoder
        report = engine.reindex_report(force=args.force)
    count = report.photos
    text = replies.reindexed(count, already_current=count == 0 and not (stale or args.force))
    for chat, ids in sorted(report.skipped.items()):  # one bad thumbnail stops no other photo
        shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        text += f"\nChat {chat}: left out {len(ids)} unreadable photo(s) (ids {shown})."
    payload = {"reindexed": count} | ({"skipped": report.skipped} if report.skipped else {})
    emit(args, payload, text)
    return 0


def run_search(args: argparse.Namespace) -> int:
    if not args.text and not args.ref:
        raise UsageError('give what to look for: search "TEXT", or --ref PHOTO ["CHANGE"]')
    settings = settings_for(args)
    ref = read_image(args.ref, settings) if args.ref else None
    with open_engine(settings) as engine:
        hits = engine.search(args.chat, " ".join(args.text), ref, k=args.k)
    results = [
        {"photo_id": h.photo_id, "score": round(h.score, 4), "source": h.source} for h in hits
    ]
    text = "\n".join(f"{r['score']:.3f}  {r['source']}" for r in results)
    emit(
        args,
        {"results": results},
        text or replies.no_photos_found("Index photos with `rapbot index`."),
    )
    return 0
