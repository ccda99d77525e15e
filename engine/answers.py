"""Recognition-only answers: natural sentences from recognized concepts, without an LLM.

This is the answerer for CPU-only installs and the fallback when no generator is configured:
"Mochi (your grey cat) is on the left; I don't recognize the person on the right."
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from engine.types import Box, Concept, Recognition, UnknownObject

# A box that fills the photo: said where the sentence needs a place ("Mochi is in the photo"),
# left out where the photo is already the subject ("A photo of Mochi.").
WHOLE_PHOTO = "in the photo"
# How many unrecognized objects a sentence mentions before summarising the rest.
MAX_UNKNOWN_MENTIONED = 3
_FIRST_PERSON = {
    "my": "your",
    "mine": "yours",
    "me": "you",
    "i": "you",
    "i'm": "you're",
    "myself": "yourself",
    "our": "your",
    "ours": "yours",
    "we": "you",
    "us": "you",
}


def rough_position(box: Box | None, width: int, height: int) -> str:
    """Where a box is in the photo in words: "on the left", "at the top right", "in the middle"."""
    if box is None or width <= 0 or height <= 0:
        return ""
    if box.area >= 0.8 * width * height:
        return WHOLE_PHOTO
    cx, cy = box.center
    horizontal = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else ""
    vertical = "top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else ""
    if horizontal and vertical:
        return f"at the {vertical} {horizontal}"
    if horizontal:
        return f"on the {horizontal}"
    if vertical:
        return f"at the {vertical}"
    return "in the middle"


def description_for(description: str, owner: str, asker: str | None) -> str:
    """The owner's words seen from the asker: "my grey cat" is "your grey cat" to its owner
    and "grey cat" to everyone else."""
    if not description:
        return ""
    if asker is not None and asker == owner:
        return re.sub(
            r"\b(my|mine|me|i'm|i|myself|our|ours|we|us)\b",
            lambda m: _match_case(m.group(0), _FIRST_PERSON[m.group(0).casefold()]),
            description,
            flags=re.IGNORECASE,
        )
    return re.sub(r"^(my|our)\s+", "", description, flags=re.IGNORECASE)


def _match_case(original: str, replacement: str) -> str:
    return replacement.capitalize() if original[:1].isupper() else replacement


def _with_article(label: str) -> str:
    return ("an " if label[:1].casefold() in "aeiou" else "a ") + label


def _join(parts: Sequence[str], conjunction: str = "and") -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + f" {conjunction} " + parts[-1]


def _named(rec: Recognition, owners: dict[str, str], asker: str | None) -> str:
    desc = description_for(rec.description, owners.get(rec.concept_id, ""), asker)
    return f"{rec.name} ({desc})" if desc else rec.name


def _placed(text: str, position: str) -> str:
    """``text`` and where it is, unless that is the whole photo."""
    return f"{text} {position}" if position and position != WHOLE_PHOTO else text


def _unknown_phrase(unknown: Sequence[UnknownObject], definite: bool) -> str:
    shown = [
        _placed("the " + u.label if definite else _with_article(u.label), u.position)
        for u in unknown[:MAX_UNKNOWN_MENTIONED]
    ]
    extra = len(unknown) - len(shown)
    if extra > 0:
        shown.append(f"{extra} other thing{'s' if extra > 1 else ''}")
    return _join(shown, "or" if definite else "and")


def who_sentence(
    known: Sequence[Recognition],
    unknown: Sequence[UnknownObject],
    owners: dict[str, str],
    asker: str | None,
) -> str:
    """The answer to "who is here?"."""
    if known:
        parts = [
            f"{_named(r, owners, asker)} is {r.position or WHOLE_PHOTO}"
            for r in sorted(known, key=lambda r: r.box.center[0] if r.box else 0.0)
        ]
        sentence = _join(parts)
        if unknown:
            sentence += f"; I don't recognize {_unknown_phrase(unknown, definite=True)}"
        return sentence[0].upper() + sentence[1:] + "."
    if unknown:
        return (
            "I don't recognize anyone I know in this photo "
            f"(I see {_unknown_phrase(unknown, definite=False)})."
        )
    return "I don't recognize anyone or anything I know in this photo."


def ask_sentence(
    named: Sequence[Concept],
    known: Sequence[Recognition],
    unknown: Sequence[UnknownObject],
    owners: dict[str, str],
    asker: str | None,
    has_image: bool,
) -> str:
    """A recognition-only answer to a question: about the concepts it names, else who is here."""
    if not has_image:
        if not named:
            return (
                "I can only tell you who is in a photo, or what I know about a name I remember; "
                "send a photo or mention a name."
            )
        facts = []
        for concept in named:
            desc = description_for(concept.description, concept.owner, asker)
            photos = f"{concept.examples} photo{'s' if concept.examples != 1 else ''}"
            facts.append(
                f"{concept.name} is {desc} ({photos} remembered)."
                if desc
                else f"I know {concept.name} from {photos}, without a description."
            )
        return " ".join(facts)
    if not named:
        return who_sentence(known, unknown, owners, asker)
    seen = {r.concept_id: r for r in known}
    sentences = []
    for concept in named:
        rec = seen.get(concept.id)
        if rec is not None:
            sentences.append(f"Yes, {_named(rec, owners, asker)} is {rec.position or WHOLE_PHOTO}.")
        else:
            sentences.append(f"I don't see {concept.name} in this photo.")
    others = [r for r in known if r.concept_id not in {c.id for c in named}]
    if others:
        also = _join([f"{_named(r, owners, asker)} {r.position}".rstrip() for r in others])
        sentences.append(f"I also see {also}.")
    return " ".join(sentences)


def caption_sentence(
    known: Sequence[Recognition],
    unknown: Sequence[UnknownObject],
    owners: dict[str, str],
    asker: str | None,
) -> str:
    """A personalized caption made of the recognized names and the other things seen."""
    parts = [
        _placed(_named(r, owners, asker), r.position)
        for r in sorted(known, key=lambda r: r.box.center[0] if r.box else 0.0)
    ]
    if unknown:
        parts.append(_unknown_phrase(unknown, definite=False))
    return f"A photo of {_join(parts)}." if parts else "A photo."
