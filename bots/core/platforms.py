"""The chat platforms rapbot runs on, by scope prefix, and each one's photo-source rule.

A photo indexed for /search keeps a *source*: what its platform's adapter needs to show it
again (a Telegram file id, a Discord message link, a file path for the terminal chat). The
engine stores sources as opaque text; the platform that made a source is the prefix of the
chat's scope (``tg``, ``dc``, ``web``...), and only that platform's adapter knows the form.
Each adapter checks a source before it sends one (the security boundary: an archive can put
anything there); an import uses the same rule, through :func:`source_fits`, to leave out
photos that the target chat's adapter could never send.

A new adapter whose sources have a form adds one line to :data:`SOURCE_RULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# platform (scope prefix) -> "module:function" taking a source, True when it has the form the
# platform's adapter makes (imported only when asked: the CLI needs no chat library otherwise).
SOURCE_RULES: dict[str, str] = {
    "tg": "bots.telegram_adapter.files:is_telegram_source",
    "dc": "bots.discord_adapter.format:is_message_link",
}


def platform_of(scope: str) -> str:
    """The platform of chat ``scope``: its prefix (``tg:-100123`` → ``tg``); "" for none."""
    prefix, colon, _ = scope.partition(":")
    return prefix if colon else ""


def _rule(platform: str) -> Callable[[str], bool] | None:
    where = SOURCE_RULES.get(platform)
    if where is None:
        return None
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def source_fits(scope: str, source: str) -> bool:
    """Whether ``source`` has the form the adapter of chat ``scope`` makes (so it may send it
    back from a search); for a platform without a rule (the terminal's ``local`` chat, files'
    paths) any non-empty text."""
    rule = _rule(platform_of(scope))
    return rule(source) if rule is not None else bool(source.strip())
