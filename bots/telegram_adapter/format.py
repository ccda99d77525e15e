"""Reply text in Telegram's HTML parse mode: everything escaped, known names in bold.

Every text that reaches Telegram came from a user or from the engine (which repeats names and
descriptions users typed), so all of it is escaped; the only markup is what we add ourselves.
Telegram counts limits in UTF-16 code units after entity parsing, so lengths are measured on the
plain text that way.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

CAPTION_LIMIT = 1024  # a photo's caption
MESSAGE_LIMIT = 4096  # one text message


def visible_length(text: str) -> int:
    """The length Telegram counts: UTF-16 code units (an emoji may count 2)."""
    return len(text.encode("utf-16-le")) // 2


def to_html(text: str, bold: Iterable[str] = ()) -> str:
    """``text`` escaped for ``ParseMode.HTML``, with whole-word occurrences of ``bold`` in bold.

    Names are matched in the plain text and every piece is escaped on its own, so a name can
    never land inside an escape sequence (a concept called "amp" next to "&").
    """
    names = sorted({name for name in bold if name.strip()}, key=len, reverse=True)
    if not names:
        return html.escape(text, quote=False)
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(n) for n in names) + r")(?!\w)")
    parts: list[str] = []
    last = 0
    for match in pattern.finditer(text):
        parts.append(html.escape(text[last : match.start()], quote=False))
        parts.append(f"<b>{html.escape(match.group(1), quote=False)}</b>")
        last = match.end()
    parts.append(html.escape(text[last:], quote=False))
    return "".join(parts)


def split_text(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """``text`` in pieces of at most ``limit`` visible characters, cut at line ends if possible."""
    if visible_length(text) <= limit:
        return [text]
    pieces: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while visible_length(line) > limit:  # one very long line: cut it hard
            cut = _fit(line, limit)
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:cut])
            line = line[cut:]
        if visible_length(current + line) > limit:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return [piece.strip("\n") for piece in pieces if piece.strip()]


def _fit(text: str, limit: int) -> int:
    """The longest prefix length of ``text`` whose visible length is at most ``limit``."""
    cut = min(len(text), limit)
    while visible_length(text[:cut]) > limit:
        cut -= 1
    return max(cut, 1)
