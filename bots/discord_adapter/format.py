"""Turning the core's plain-text replies into Discord message content that cannot ping anyone."""

from __future__ import annotations

import re

import discord

from bots.core.messages import Reply

# Discord's limit on a message's content, in characters.
MAX_CONTENT = 2000

# Nobody is ever pinged by the bot: not @everyone/@here, not roles, not users, not the author
# of the message it replies to. Set on the client and passed again on every send.
NO_MENTIONS = discord.AllowedMentions.none()

ERROR_PREFIX = "⚠️ "
# How the adapter indexes a posted photo (cog.photo_sources): the message's link on one of
# Discord's hosts, "#N" for its Nth attachment after the first. Only sources of exactly this
# form are shown as links (a source may come from an imported archive).
MESSAGE_LINK = re.compile(
    r"https://(?:ptb\.|canary\.)?discord\.com/channels/(?:[0-9]{1,20}|@me)/[0-9]{1,20}/[0-9]{1,20}"
    r"(?:#([0-9]{1,2}))?"
)
NOT_A_DISCORD_PHOTO = "(a photo that was not posted on Discord)"
_RESULT_LINE = re.compile(r"(\d+)\. ")  # "1. score 0.83", a search reply's result line


def escape(text: str) -> str:
    """User text made inert: markdown shows literally and mentions show without pinging."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def reply_content(reply: Reply, note: str = "") -> str:
    """The message content for ``reply`` (plus an adapter note, e.g. why a photo is missing)."""
    text = _with_links(reply.text, reply.photo_refs) if reply.photo_refs else escape(reply.text)
    if reply.error:
        text = ERROR_PREFIX + text
    if note:
        text = f"{text}\n{note}"
    return text


def is_message_link(source: str) -> bool:
    """Whether ``source`` is a search source of this adapter's form (bots.core.platforms)."""
    return MESSAGE_LINK.fullmatch(source) is not None


def photo_link(ref: str) -> str:
    """A search result's source as shown: the link to the message with the photo, plus which
    attachment it is when the source says (``#N``); anything else (a URL elsewhere, markdown,
    a file's path) is never shown, only said to be no Discord photo."""
    match = MESSAGE_LINK.fullmatch(ref)
    if match is None:
        return NOT_A_DISCORD_PHOTO
    url, position = ref.partition("#")[0], match[1]
    return f"{url} (attachment {position})" if position else url


def _with_links(text: str, refs: tuple[str, ...]) -> str:
    """``text`` escaped, each numbered result line ("N. ...") followed by the link of the
    Nth photo; photos without a line of their own get one at the end."""
    lines, linked = [], set()
    for line in text.split("\n"):
        match = _RESULT_LINE.match(line)
        number = int(match[1]) if match else 0
        line = escape(line)
        if 1 <= number <= len(refs) and number not in linked:
            line = f"{line} — {photo_link(refs[number - 1])}"
            linked.add(number)
        lines.append(line)
    lines += [f"{n}. {photo_link(ref)}" for n, ref in enumerate(refs, 1) if n not in linked]
    return "\n".join(lines)


def split_content(text: str, limit: int = MAX_CONTENT) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at line ends where possible."""
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    current = ""
    for line in text.split("\n"):
        while len(line) > limit:  # a single overlong line: cut it between escapes
            cut = _escape_boundary(line, limit)
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:cut])
            line = line[cut:]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > limit:
            pieces.append(current)
            current = line
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def _escape_boundary(line: str, limit: int) -> int:
    """The longest prefix length of ``line``, at most ``limit``, that ends on an escape
    boundary: a backslash and the character it escapes (``\\*``, ``\\\\``) stay together,
    or each piece would show a stray backslash or unescaped markdown."""
    position = 0
    while True:
        step = 2 if line[position] == "\\" and position + 1 < len(line) else 1
        if position + step > limit:
            return max(position, 1)
        position += step
