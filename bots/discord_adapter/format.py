"""Turning the core's plain-text replies into Discord message content that cannot ping anyone."""

from __future__ import annotations

import discord

from bots.core.messages import Reply

# Discord's limit on a message's content, in characters.
MAX_CONTENT = 2000

# Nobody is ever pinged by the bot: not @everyone/@here, not roles, not users, not the author
# of the message it replies to. Set on the client and passed again on every send.
NO_MENTIONS = discord.AllowedMentions.none()

ERROR_PREFIX = "⚠️ "


def escape(text: str) -> str:
    """User text made inert: markdown shows literally and mentions show without pinging."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def reply_content(reply: Reply, note: str = "") -> str:
    """The message content for ``reply`` (plus an adapter note, e.g. why a photo is missing)."""
    text = escape(reply.text)
    if reply.error:
        text = ERROR_PREFIX + text
    if note:
        text = f"{text}\n{note}"
    return text


def split_content(text: str, limit: int = MAX_CONTENT) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at line ends where possible."""
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    current = ""
    for line in text.split("\n"):
        while len(line) > limit:  # a single overlong line: cut it, but never after a backslash
            cut = limit - 1 if line[limit - 1] == "\\" else limit
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
