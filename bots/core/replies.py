"""Every reply text rapbot says, in the chats and at the command line (plain text; adapters
escape it for their parse mode). One wording per event: the CLI and the chat core both call
these, so "forgotten" reads the same in Telegram, Discord, the terminal chat and `rapbot`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bots.core.commands import PLAIN_WORDS, USAGE, PhotoWords, usage
from engine.types import Box, Concept, ConceptSheet, RememberResult

if TYPE_CHECKING:
    from engine.backup import ExportReport, ImportReport


def plural(count: int, noun: str) -> str:
    """``plural(1, "photo")`` → ``"1 photo"``; ``plural(3, "photo")`` → ``"3 photos"``."""
    return f"{count} {noun}{'s' if count != 1 else ''}"


def help_text(platform_notes: str = "", words: PhotoWords = PLAIN_WORDS) -> str:
    """/help: every command's usage in the surface's ``words``, then its own notes."""
    lines = [
        "I remember the people, pets and things of this chat and recognize them in photos.",
        "",
    ]
    lines += [f"• {usage(command, words)}" for command in USAGE]
    if platform_notes:
        lines += ["", platform_notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- concepts


def remembered(result: RememberResult, created: bool | None = None, crop: Box | None = None) -> str:
    """``created`` is whether the first photo of an album created the concept; ``crop`` adds
    the remembered region (the CLI shows it, a chat shows the photo)."""
    concept = result.concept
    photos = plural(concept.examples, "photo")
    if result.created if created is None else created:
        about = f" ({concept.description})" if concept.description else ""
        extra = f", from {photos}" if concept.examples > 1 else ""
        text = f"Got it: I'll remember {concept.name}{about}{extra}."
    else:
        text = f"Added another photo of {concept.name} (now {photos})."
    if crop is not None:
        text += f" Crop: {','.join(map(str, crop.as_list()))}."
    return text


def concept_list(concepts: list[Concept]) -> str:
    return concept_page(ConceptSheet(concepts, 1, 1, len(concepts)))


def concept_page(sheet: ConceptSheet, words: PhotoWords = PLAIN_WORDS) -> str:
    """The text of a /concepts page: the contact sheet's caption, or the list without it;
    ``words``: the surface's own way to give /remember its photo."""
    if not sheet.total:
        return "I don't remember anyone in this chat yet. Teach me with " + usage("remember", words)
    head = f"I remember {sheet.total} in this chat"
    if sheet.pages > 1:
        following = sheet.page + 1 if sheet.page < sheet.pages else 1
        head += f" (page {sheet.page}/{sheet.pages}; /concepts {following} for more)"
    lines = [head + ":"]
    for concept in sheet.concepts:
        about = f" — {concept.description}" if concept.description else ""
        lines.append(f"• {concept.name}{about} ({plural(concept.examples, 'photo')})")
    return "\n".join(lines)


def renamed(old_name: str, concept: Concept) -> str:
    return f"Renamed {old_name} to {concept.name}."


def described(concept: Concept) -> str:
    return f"Updated: {concept.name} — {concept.description or 'no description'}."


def forgotten(concept: Concept) -> str:
    return f"I've forgotten {concept.name} and all photos of them."


def forgot_user(removed: int, user: str | None = None, files: int = 0) -> str:
    """``user`` None: the person asking (/forget_me); else who an operator named. ``files``:
    the files an adapter kept for them on disk, deleted too (`rapbot forget-user`)."""
    who = "you" if user is None else user
    text = f"Done: I've forgotten the {plural(removed, 'concept')} {who} taught me, in every chat."
    if files:
        text += f" Deleted the {plural(files, 'photo file')} kept for them on disk."
    return text


# ----------------------------------------------------------------------------- photo search

INDEXING_ON = (
    "Photo indexing is on: photos posted here from now on can be found"
    " with /search. /index off stops it and forgets them."
)


def indexing_off(removed: int) -> str:
    return (
        "Photo indexing is off, and I've forgotten the "
        f"{plural(removed, 'photo')} of this chat I had indexed."
    )


def no_photos_found(hint: str = "Only photos posted while /index is on can be found.") -> str:
    return f"I found no photos. {hint}".strip()


def found_photos(scores: list[float]) -> str:
    lines = [f"{i}. score {score:.2f}" for i, score in enumerate(scores, 1)]
    return f"Found {plural(len(scores), 'photo')}, best first:\n" + "\n".join(lines)


def indexed(count: int) -> str:
    return f"Indexed {plural(count, 'photo')}."


def reindexed(count: int, already_current: bool) -> str:
    if already_current:
        return (
            "The photo index already matches the search encoder; nothing to do"
            " (--force re-embeds anyway)."
        )
    return f"Re-embedded {plural(count, 'photo')}."


# ----------------------------------------------------------------------------- backups


def exported(report: ExportReport, photos_left_out: int | None) -> str:
    """``photos_left_out`` None: the photo history was exported too."""
    chats = plural(report.scopes, "chat")
    what = f"{report.concepts} concept(s) with {report.examples} photo(s)"
    if photos_left_out is not None:
        return (
            f"Exported {what} from {chats} to {report.path}; the photo search history"
            f" ({photos_left_out} photo(s)) and the /index settings were left out (--no-photos)."
        )
    return (
        f"Exported {what} and {report.photos} photo(s) of the search history from {chats} to"
        f" {report.path}."
    )


def imported(report: ImportReport, chat: str, index_setting_kept: bool) -> str:
    parts = [
        f"Imported {report.concepts} new concept(s) and {report.examples} photo(s) into"
        f" {report.scopes} chat(s); {report.merged} name(s) already existed, {report.skipped}"
        f" photo(s) were already there. Search history: {report.photos} photo(s) added,"
        f" {report.photos_skipped} already there."
    ]
    if report.photos_left_out:
        parts.append(
            f"{report.photos_left_out} photo(s) of the search history were left out: they are"
            f" other people's photos from another chat, imported into {chat} only with"
            " --with-photos."
        )
    if report.photos_skipped_foreign:
        parts.append(
            f"{report.photos_skipped_foreign} photo(s) were skipped: their sources are not"
            " photos of this chat's platform, so its bot could not send them back."
        )
    if index_setting_kept:
        parts.append(f"The /index setting of {chat} was left as it was.")
    if report.reembedded:
        parts.append("Photos were embedded again for this model.")
    if report.photos_reembedded:
        parts.append("The search history was embedded again for this search encoder.")
    return " ".join(parts)
