"""The chat platforms rapbot runs on, by scope prefix, and each one's photo-source rule.

A photo indexed for /search keeps a *source*: what its platform's adapter needs to show it
again (a Telegram file id, a Discord message link, a file path for the terminal chat). The
engine stores sources as opaque text; the platform that made a source is the prefix of the
chat's scope (``tg``, ``dc``, ``web``...), and only that platform's adapter knows the form.
Each adapter checks a source before it sends one (the security boundary: an archive can put
anything there); an import uses the same rule, through :func:`source_fits`, to leave out
photos that the target chat's adapter could never send.

A new adapter whose sources have a form adds one line to :data:`SOURCE_RULES`; one that keeps
files of its own for a user on disk adds one to :data:`USER_FOLDERS`, so that
``rapbot forget-user`` deletes them with the user's data in the stores.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from pathlib import Path

from engine.errors import InvalidInputError

# platform (scope prefix) -> "module:function" taking a source, True when it has the form the
# platform's adapter makes (imported only when asked: the CLI needs no chat library otherwise).
SOURCE_RULES: dict[str, str] = {
    "tg": "bots.telegram_adapter.files:is_telegram_source",
    "dc": "bots.discord_adapter.format:is_message_link",
}

# platform (user id prefix) -> "module:function" taking (data folder, user id): the folders that
# platform's adapter keeps for that user under the data folder. The web chat keeps the photos
# it indexed; the terminal chat's annotated photos are not a user's data but files its one
# local user asked for (written where they chose, like `rapbot who --out`), so it has none.
USER_FOLDERS: dict[str, str] = {
    "web": "bots.web_adapter.files:user_folders",
}


def platform_of(scope: str) -> str:
    """The platform of chat ``scope``: its prefix (``tg:-100123`` → ``tg``); "" for none."""
    prefix, colon, _ = scope.partition(":")
    return prefix if colon else ""


def _load(where: str | None) -> Callable | None:
    if where is None:
        return None
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def _rule(platform: str) -> Callable[[str], bool] | None:
    return _load(SOURCE_RULES.get(platform))


def forget_user_files(data_dir: Path, user: str) -> int:
    """Delete the folders the adapter of ``user``'s platform keeps for them (see
    :data:`USER_FOLDERS`); how many files went."""
    folders = _load(USER_FOLDERS.get(platform_of(user)))
    removed = 0
    for folder in folders(Path(data_dir), user) if folders is not None else ():
        if folder.is_dir():
            removed += sum(1 for f in folder.rglob("*") if f.is_file())
            try:
                shutil.rmtree(folder)
            except OSError as error:  # the stores are already cleared: say what is left
                raise InvalidInputError(
                    f"Could not delete {folder} ({error.strerror or error}); delete it by hand."
                ) from None
    return removed


def source_fits(scope: str, source: str) -> bool:
    """Whether ``source`` has the form the adapter of chat ``scope`` makes (so it may send it
    back from a search); for a platform without a rule (the terminal's ``local`` chat, files'
    paths) any non-empty text."""
    rule = _rule(platform_of(scope))
    return rule(source) if rule is not None else bool(source.strip())
