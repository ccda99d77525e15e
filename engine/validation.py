"""Validation of the short texts that come from outside: concept names, descriptions,
categories, scopes, user ids and photo sources. The one validator of the live path (chat
commands, the CLI) and of the import path (archives): both call these functions with the same
:class:`TextLimits`.

Names appear inside the RAP prompt (``Name: <Mochi>``) and in chat messages rendered with a
parse mode, so they are restricted to letters, digits, spaces and a few harmless marks, and
normalised with NFKC (fullwidth and mathematical letters become plain ones). Two names that
look alike (``Mochi`` and Cyrillic ``Моchi``) share a :func:`name_skeleton` (Unicode TR39) and
cannot both live in one chat. Descriptions are free text, only cleaned of control characters
and bounded in length. Sources (platform photo ids, file paths) are opaque to the engine but
must be printable: they are printed by ``rapbot search`` and sent back to the platforms.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import InvalidInputError
from engine.types import Box

if TYPE_CHECKING:
    from engine.settings import EngineSettings

_NAME_EXTRA_CHARS = frozenset(" -'.’")
_WHITESPACE = re.compile(r"\s+")
MAX_SCOPE_LENGTH = 128
MAX_USER_LENGTH = 128
MAX_CATEGORY_LENGTH = 64
MAX_SOURCE_LENGTH = 4096  # a source can be a file's absolute path (`rapbot index`): PATH_MAX
MAX_BOX_COORDINATE = 65_535  # no decodable image is wider or taller (JPEG's own limit)


@dataclass(frozen=True)
class TextLimits:
    """How long concept texts may be: the same for a chat command and for an archive."""

    max_name_length: int = 64
    max_description_length: int = 300
    max_category_length: int = MAX_CATEGORY_LENGTH

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> TextLimits:
        return cls(settings.max_name_length, settings.max_description_length)


@dataclass(frozen=True)
class ConceptText:
    """A concept's texts, each cleaned by this module."""

    name: str
    description: str
    category: str
    owner: str


def clean_concept_text(
    name: str, description: str, category: str, owner: str, limits: TextLimits
) -> ConceptText:
    """Every text of a new concept, checked as a chat command checks it."""
    return ConceptText(
        clean_name(name, limits.max_name_length),
        clean_description(description, limits.max_description_length),
        clean_category(category, limits.max_category_length),
        clean_user(owner),
    )


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _without_control_chars(text: str) -> str:
    return "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)


def normalise_name(name: str) -> str:
    """NFKC with spaces collapsed: ``Ｍｏｃｈｉ`` and ``𝐌𝐨𝐜𝐡𝐢`` are ``Mochi``."""
    return _collapse(unicodedata.normalize("NFKC", name or ""))


def clean_name(name: str, max_length: int = 64) -> str:
    """The name as stored, or InvalidInputError saying what is wrong with it."""
    if not isinstance(name, str):
        raise InvalidInputError("A name must be text.")
    cleaned = normalise_name(name)
    if not cleaned:
        raise InvalidInputError("A name can't be empty.")
    if len(cleaned) > max_length:
        raise InvalidInputError(
            f"Names can be at most {max_length} characters (this one has {len(cleaned)})."
        )
    bad = sorted({ch for ch in cleaned if not (ch.isalnum() or ch in _NAME_EXTRA_CHARS)})
    if bad:
        shown = " ".join(repr(ch) for ch in bad[:5])
        raise InvalidInputError(
            f"Names can use letters, digits, spaces and - ' . only (not {shown})."
        )
    if not any(ch.isalnum() for ch in cleaned):
        raise InvalidInputError("A name needs at least one letter or digit.")
    return cleaned


def clean_description(text: str | None, max_length: int = 300) -> str:
    if text is not None and not isinstance(text, str):
        raise InvalidInputError("A description must be text.")
    cleaned = _collapse(_without_control_chars(unicodedata.normalize("NFC", text or "")))
    if len(cleaned) > max_length:
        raise InvalidInputError(
            f"Descriptions can be at most {max_length} characters (this one has {len(cleaned)})."
        )
    return cleaned


def clean_category(text: str | None, max_length: int = MAX_CATEGORY_LENGTH) -> str:
    """A detector category (``cat``); free text like a description, but short."""
    return clean_description(text, max_length)


def clean_source(source: str) -> str:
    """A photo's source as the engine keeps it: opaque (each platform's adapter checks its own
    forms), but one line of printable text, so that no terminal escape or control character
    reaches a terminal (``rapbot search``) or a platform's send call."""
    if (
        not isinstance(source, str)
        or not source.strip()
        or len(source) > MAX_SOURCE_LENGTH
        or not source.isprintable()
    ):
        raise InvalidInputError(
            f"A photo source must be 1 to {MAX_SOURCE_LENGTH} printable characters"
            " (no control characters or escapes)."
        )
    return source


def clean_box(values: object) -> Box:
    """A box as four whole pixel coordinates ``[x1, y1, x2, y2]`` within any image we can
    decode: ``1e20`` or ``-5`` is refused here, not by the database half-way through a write."""
    if not (
        isinstance(values, (list, tuple))
        and len(values) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise InvalidInputError("A box must be four whole numbers: x1, y1, x2, y2.")
    x1, y1, x2, y2 = values
    if not (0 <= x1 <= x2 <= MAX_BOX_COORDINATE and 0 <= y1 <= y2 <= MAX_BOX_COORDINATE):
        raise InvalidInputError(
            f"A box must satisfy 0 <= x1 <= x2 <= {MAX_BOX_COORDINATE} and the same for y"
            f" (got {x1}, {y1}, {x2}, {y2})."
        )
    return Box(x1, y1, x2, y2)


def clean_scope(scope: str) -> str:
    """A scope is a chat id such as ``tg:-100123``; it must be non-empty printable text."""
    cleaned = (scope if isinstance(scope, str) else "").strip()
    if not cleaned or len(cleaned) > MAX_SCOPE_LENGTH or not cleaned.isprintable():
        raise InvalidInputError(
            f"A chat id must be 1 to {MAX_SCOPE_LENGTH} printable characters, like 'tg:12345'."
        )
    return cleaned


def clean_user(user: str) -> str:
    cleaned = (user if isinstance(user, str) else "").strip()
    if not cleaned or len(cleaned) > MAX_USER_LENGTH or not cleaned.isprintable():
        raise InvalidInputError(f"A user id must be 1 to {MAX_USER_LENGTH} printable characters.")
    return cleaned


# ----------------------------------------------------------------------------- look-alikes


@functools.lru_cache(maxsize=1)
def _prototypes() -> dict[str, str]:
    """Character -> its TR39 prototype, from confusable_homoglyphs' copy of the Unicode
    confusables data. That file lists each source character with its one prototype and each
    prototype with all its sources; a pair listed both ways gets its smaller character as the
    prototype, so that both map to one key."""
    import confusable_homoglyphs

    path = Path(confusable_homoglyphs.__file__).with_name("confusables.json")
    raw = json.loads(path.read_text("utf-8"))

    def target(entry: dict) -> str:
        return entry["c"].replace("\u200e", "")  # the file wraps RTL characters in LRMs

    mapping: dict[str, str] = {}
    for char, entries in raw.items():
        if len(char) != 1 or len(entries) != 1:
            continue
        proto = target(entries[0])
        back = raw.get(proto) or []
        if len(back) == 1 and target(back[0]) == char:  # listed both ways
            proto = min(char, proto)
        if proto != char:
            mapping[char] = proto
    return mapping


def name_skeletons(name: str) -> frozenset[str]:
    """The keys look-alike names share (TR39 skeletons, caseless): ``Mochi``, ``МОCHI``
    (Cyrillic М, О), ``Моchi`` and ``𝐌𝐨𝐜𝐡𝐢`` share one, ``Mochi`` and ``Mocha`` none. Two keys,
    because names compare caselessly and case changes what a letter looks like: the skeleton
    of the upper case (``МОCHI`` like ``Mochi``) and of the folded skeleton (``lvan`` like
    ``Ivan``)."""
    table = _prototypes()

    def skeleton(text: str) -> str:
        text = unicodedata.normalize("NFD", text)
        return unicodedata.normalize("NFD", "".join(table.get(ch, ch) for ch in text))

    name = normalise_name(name)
    return frozenset({skeleton(name.upper()), skeleton(skeleton(name).casefold())})


def refuse_look_alike(name: str, existing: list[str]) -> None:
    """InvalidInputError when ``name`` looks like one of ``existing`` (the chat's concept
    names) without being it (case aside): ``Моchi`` (Cyrillic) next to ``Mochi``."""
    keys, folded = name_skeletons(name), name.casefold()
    for other in existing:
        if other.casefold() != folded and keys & name_skeletons(other):
            raise InvalidInputError(
                f"'{name}' looks like '{other}', which is already remembered in this chat."
                f" Use '{other}' to add a photo to it, or choose a name that looks different."
            )


def names_in_text(text: str, names: list[str]) -> list[str]:
    """The names that appear in ``text`` as whole words (case-insensitive), in text order."""
    folded = text.casefold()
    found: list[tuple[int, str]] = []
    # Longest names first so that "Mochi Jr" is not also reported as "Mochi".
    taken: list[tuple[int, int]] = []
    for name in sorted(set(names), key=len, reverse=True):
        pattern = r"(?<!\w)" + re.escape(name.casefold()) + r"(?!\w)"
        for match in re.finditer(pattern, folded):
            span = match.span()
            if any(span[0] < end and start < span[1] for start, end in taken):
                continue
            taken.append(span)
            found.append((span[0], name))
            break
    return [name for _, name in sorted(found)]
