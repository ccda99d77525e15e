"""Reply texts of the command core (plain text; adapters escape it for their parse mode)."""

from __future__ import annotations

from bots.core.commands import USAGE
from engine.types import Concept, RememberResult

NO_PHOTO = "Send a photo with this command as its caption, or reply to a photo with the command."


def help_text(platform_notes: str = "") -> str:
    lines = [
        "I remember the people, pets and things of this chat and recognize them in photos.",
        "",
    ]
    lines += [f"• {usage}" for usage in USAGE.values()]
    if platform_notes:
        lines += ["", platform_notes]
    return "\n".join(lines)


def remembered(result: RememberResult, created: bool | None = None) -> str:
    """``created`` is whether the first photo of an album created the concept."""
    concept = result.concept
    photos = f"{concept.examples} photo{'s' if concept.examples != 1 else ''}"
    if result.created if created is None else created:
        about = f" ({concept.description})" if concept.description else ""
        extra = f", from {photos}" if concept.examples > 1 else ""
        return f"Got it: I'll remember {concept.name}{about}{extra}."
    return f"Added another photo of {concept.name} (now {photos})."


def concept_list(concepts: list[Concept]) -> str:
    if not concepts:
        return "I don't remember anyone in this chat yet. Teach me with " + USAGE["remember"]
    lines = [f"I remember {len(concepts)} in this chat:"]
    for concept in concepts:
        photos = f"{concept.examples} photo{'s' if concept.examples != 1 else ''}"
        about = f" — {concept.description}" if concept.description else ""
        lines.append(f"• {concept.name}{about} ({photos})")
    return "\n".join(lines)
