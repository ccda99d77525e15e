"""Validation of the short texts users give: concept names, descriptions, scopes and user ids.

Names appear inside the RAP prompt (``Name: <Mochi>``) and in chat messages rendered with a
parse mode, so they are restricted to letters, digits, spaces and a few harmless marks.
Descriptions are free text, only cleaned of control characters and bounded in length.
"""

from __future__ import annotations

import re
import unicodedata

from engine.errors import InvalidInputError

_NAME_EXTRA_CHARS = frozenset(" -'.’")
_WHITESPACE = re.compile(r"\s+")
MAX_SCOPE_LENGTH = 128
MAX_USER_LENGTH = 128


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _without_control_chars(text: str) -> str:
    return "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)


def clean_name(name: str, max_length: int = 64) -> str:
    """The name as stored, or InvalidInputError saying what is wrong with it."""
    cleaned = _collapse(unicodedata.normalize("NFC", name or ""))
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
    cleaned = _collapse(_without_control_chars(unicodedata.normalize("NFC", text or "")))
    if len(cleaned) > max_length:
        raise InvalidInputError(
            f"Descriptions can be at most {max_length} characters (this one has {len(cleaned)})."
        )
    return cleaned


def clean_scope(scope: str) -> str:
    """A scope is a chat id such as ``tg:-100123``; it must be non-empty printable text."""
    cleaned = (scope or "").strip()
    if not cleaned or len(cleaned) > MAX_SCOPE_LENGTH or not cleaned.isprintable():
        raise InvalidInputError(
            f"A chat id must be 1 to {MAX_SCOPE_LENGTH} printable characters, like 'tg:12345'."
        )
    return cleaned


def clean_user(user: str) -> str:
    cleaned = (user or "").strip()
    if not cleaned or len(cleaned) > MAX_USER_LENGTH or not cleaned.isprintable():
        raise InvalidInputError(f"A user id must be 1 to {MAX_USER_LENGTH} printable characters.")
    return cleaned


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
