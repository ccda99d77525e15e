"""Parsing chat text into commands: ``/remember Mochi | my grey cat`` → ``Remember(...)``."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidInputError


class CommandError(InvalidInputError):
    """A malformed command; the message says how to write it."""


@dataclass(frozen=True)
class Remember:
    name: str
    description: str = ""


@dataclass(frozen=True)
class Who:
    pass


@dataclass(frozen=True)
class Ask:
    question: str


@dataclass(frozen=True)
class Caption:
    pass


@dataclass(frozen=True)
class Concepts:
    pass


@dataclass(frozen=True)
class Rename:
    name: str
    new_name: str


@dataclass(frozen=True)
class Describe:
    name: str
    description: str


@dataclass(frozen=True)
class Forget:
    name: str


@dataclass(frozen=True)
class ForgetMe:
    pass


@dataclass(frozen=True)
class Search:
    text: str


@dataclass(frozen=True)
class Index:
    enabled: bool


@dataclass(frozen=True)
class Help:
    pass


Command = (
    Remember
    | Who
    | Ask
    | Caption
    | Concepts
    | Rename
    | Describe
    | Forget
    | ForgetMe
    | Search
    | Index
    | Help
)

USAGE: dict[str, str] = {
    "remember": "/remember NAME | description — as the caption of a photo, or in reply to one",
    "who": "/who — on a photo, or in reply to one: who do I know in it?",
    "ask": "/ask QUESTION — about a photo (caption or reply) or about a name I know",
    "caption": "/caption — a caption for a photo that uses the names I know",
    "concepts": "/concepts — everyone and everything I remember in this chat",
    "rename": "/rename OLD NAME | NEW NAME",
    "describe": "/describe NAME | new description",
    "forget": "/forget NAME",
    "forget_me": "/forget_me — forget everything you taught me, in every chat",
    "search": (
        "/search TEXT — find photos of this chat; in reply to a photo: more like it"
        " (with TEXT: like it, but TEXT)"
    ),
    "index": "/index on|off — admins: keep this chat's photos searchable (off forgets them)",
    "help": "/help — this list",
}
_ALIASES = {
    "forget-me": "forget_me",
    "forgetme": "forget_me",
    "start": "help",
    "whoisthis": "who",
    "who_is_this": "who",
    "list": "concepts",
}


def is_command(text: str) -> bool:
    return text.lstrip().startswith("/")


def _split_pipe(args: str, command: str) -> tuple[str, str]:
    if "|" not in args:
        raise CommandError(f"Usage: {USAGE[command]}")
    left, right = args.split("|", 1)
    return left.strip(), right.strip()


def parse_command(text: str) -> Command:
    """The command in ``text`` (which starts with '/'), or CommandError with its usage."""
    stripped = (text or "").strip()
    if not stripped.startswith("/"):
        raise CommandError("Commands start with '/'. Try /help.")
    head, _, args = stripped[1:].partition(" ")
    if "\n" in head:
        head, _, rest = head.partition("\n")
        args = f"{rest} {args}".strip()
    word = head.split("@", 1)[0].casefold()  # Telegram appends @botname in groups
    word = _ALIASES.get(word, word)
    args = args.strip()
    if word == "remember":
        name, _, description = args.partition("|")
        if not name.strip():
            raise CommandError(f"Usage: {USAGE['remember']}")
        return Remember(name.strip(), description.strip())
    if word == "who":
        return Who()
    if word == "ask":
        if not args:
            raise CommandError(f"Usage: {USAGE['ask']}")
        return Ask(args)
    if word == "caption":
        return Caption()
    if word == "concepts":
        return Concepts()
    if word == "rename":
        old, new = _split_pipe(args, "rename")
        if not old or not new:
            raise CommandError(f"Usage: {USAGE['rename']}")
        return Rename(old, new)
    if word == "describe":
        name, description = _split_pipe(args, "describe")
        if not name:
            raise CommandError(f"Usage: {USAGE['describe']}")
        return Describe(name, description)
    if word == "forget":
        if not args:
            raise CommandError(f"Usage: {USAGE['forget']}")
        return Forget(args)
    if word == "forget_me":
        return ForgetMe()
    if word == "search":
        # No text is a search by the replied/attached photo alone ("more like this"); the
        # core, which knows whether there is a photo, answers the usage when there is none.
        return Search(args)
    if word == "index":
        if args.casefold() not in {"on", "off"}:
            raise CommandError(f"Usage: {USAGE['index']}")
        return Index(args.casefold() == "on")
    if word == "help":
        return Help()
    raise CommandError(f"I don't know the command /{word[:32]}. Try /help.")
