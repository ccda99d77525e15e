"""`export`, `import`: a chat's concepts and photo search history to and from one archive.

The stores alone; models load only to re-embed an archive made with another model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bots.core import replies
from engine.errors import InvalidInputError
from rapbot.cli.common import emit, open_engine, progress_of, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", parents=[common], help="save a chat's concepts and photo history to one file"
    )
    p.set_defaults(handler=run_export)
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
    p.set_defaults(handler=run_import)
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


def run_export(args: argparse.Namespace) -> int:
    from engine.backup import export_scopes

    if args.all and args.chat_given:
        raise InvalidInputError("Give either --chat CHAT or --all, not both.")
    with (
        open_engine(settings_for(args), store_only=True) as engine,
        progress_of(args, "Exporting") as report_progress,
    ):
        report = export_scopes(
            engine.store,
            None if args.all else [args.chat],
            args.out,
            photos=None if args.no_photos else engine.photos,
            progress=report_progress,
        )
        left_out = 0
        if args.no_photos:  # what was not written, to say so
            left_out = engine.photos.total(None if args.all else args.chat)
    counts = {
        "scopes": report.scopes,
        "concepts": report.concepts,
        "examples": report.examples,
        "photos": report.photos,
        "photos_left_out": left_out,
    }
    text = replies.exported(report, left_out if args.no_photos else None)
    emit(args, {"exported": counts, "path": report.path}, text)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from bots.core.platforms import source_fits
    from engine.backup import import_archive, read_archive
    from engine.validation import TextLimits

    settings = settings_for(args)
    # Check the file before opening the store or loading any model: a bad file fails at once;
    # names and descriptions get the very limits of a chat command.
    with read_archive(args.file, text=TextLimits.from_settings(settings)) as archive:
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
        with (
            open_engine(settings, store_only=True) as engine,
            progress_of(args, "Importing") as report_progress,
        ):
            embedder = None
            if archive.model_id != engine.store.model_id:  # another CLIP: embed crops again
                embedder = engine.models.embedder  # the store's model, or a one-line error
            report = import_archive(
                archive,
                engine.store,
                embedder=embedder,
                scope_map=scope_map,
                mode="replace" if args.replace else "merge",
                photos=engine.photos,
                # Called only for photos of another search encoder (it loads that encoder).
                photo_embedder=engine.embed_thumbnails,
                include_photos=True if args.with_photos else None,
                source_fits=source_fits,  # only sources the target chat's adapter can send
                progress=report_progress,
            )
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
    index_setting_kept = renamed and archive.photo_index is not None
    text = replies.imported(report, args.chat, index_setting_kept)
    payload = {
        "imported": counts,
        "reembedded": report.reembedded,
        "photos_reembedded": report.photos_reembedded,
        "path": str(args.file),
    }
    emit(args, payload, text)
    return 0
