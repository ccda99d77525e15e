"""Parsing chat text into commands: ``/remember Mochi | my grey cat`` → ``Remember(...)``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from engine.errors import InvalidInputError


class CommandError(InvalidInputError):
    """A malformed command; the message says how to write it. ``usage``: the USAGE key when
    the message is that command's usage (the core says it again in its surface's words)."""

    usage: str | None = None


@dataclass(frozen=True)
class PhotoWords:
    """How a chat surface gives a command its photo, in its own words: each adapter passes
    its own to the core, and /help, usage errors and the missing-photo reply use them."""

    attach: str  # a command on a photo: "as the caption of a photo, or in reply to one"
    short: str  # the same in a few words, in parentheses: "caption or reply"
    reference: str  # /search by example: "in reply to a photo"
    missing: str  # the reply when a command needs a photo and has none


# Where no surface says otherwise (tests, the CLI's texts): no platform's gestures.
PLAIN_WORDS = PhotoWords(
    attach="with a photo",
    short="with one",
    reference="with a photo",
    missing="This command needs a photo: send one with it.",
)


class BaseCommand:
    """What the core, the adapters and the metrics need to know about a kind of command,
    declared on it: its ``command`` word (also its metrics label), whether it looks at a photo,
    whether its answer grows as it is generated, and whether a chat admin may act on other
    people's data with it (adapters may ask the platform for admin rights only then)."""

    command: ClassVar[str]
    takes_photo: ClassVar[bool] = False
    streamed: ClassVar[bool] = False
    admin_matters: ClassVar[bool] = False


@dataclass(frozen=True)
class Remember(BaseCommand):
    command = "remember"
    takes_photo = True

    name: str
    description: str = ""


@dataclass(frozen=True)
class Who(BaseCommand):
    command = "who"
    takes_photo = True


@dataclass(frozen=True)
class Ask(BaseCommand):
    command = "ask"
    takes_photo = True
    streamed = True

    question: str


@dataclass(frozen=True)
class Caption(BaseCommand):
    command = "caption"
    takes_photo = True
    streamed = True


@dataclass(frozen=True)
class Concepts(BaseCommand):
    command = "concepts"

    page: int = 1  # pages of PAGE_SIZE concepts, from 1


@dataclass(frozen=True)
class Rename(BaseCommand):
    command = "rename"
    admin_matters = True

    name: str
    new_name: str


@dataclass(frozen=True)
class Describe(BaseCommand):
    command = "describe"
    admin_matters = True

    name: str
    description: str = ""


@dataclass(frozen=True)
class Forget(BaseCommand):
    command = "forget"
    admin_matters = True

    name: str


@dataclass(frozen=True)
class ForgetMe(BaseCommand):
    command = "forget_me"


@dataclass(frozen=True)
class Search(BaseCommand):
    command = "search"
    takes_photo = True

    text: str = ""


@dataclass(frozen=True)
class Index(BaseCommand):
    command = "index"
    admin_matters = True

    enabled: bool


@dataclass(frozen=True)
class Help(BaseCommand):
    command = "help"


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

# Each command's usage; {attach}, {short} and {reference} are a surface's PhotoWords.
USAGE: dict[str, str] = {
    "remember": "/remember NAME | description — {attach}",
    "who": "/who — {attach}: who do I know in it?",
    "ask": "/ask QUESTION — about a photo ({short}) or about a name I know",
    "caption": "/caption — {attach}: a caption that uses the names I know",
    "concepts": "/concepts [PAGE] — a picture of everyone and everything I remember here",
    "rename": "/rename OLD NAME | NEW NAME",
    "describe": "/describe NAME | new description",
    "forget": "/forget NAME",
    "forget_me": "/forget_me — forget everything you taught me, in every chat",
    "search": (
        "/search TEXT — find photos of this chat; {reference}: more like it"
        " (with TEXT: like it, but TEXT)"
    ),
    "index": "/index on|off — admins: keep this chat's photos searchable (off forgets them)",
    "help": "/help — this list",
}


def usage(command: str, words: PhotoWords = PLAIN_WORDS) -> str:
    """The USAGE line of ``command`` in a surface's words."""
    return USAGE[command].format(attach=words.attach, short=words.short, reference=words.reference)


def usage_error(command: str) -> CommandError:
    """``Usage: ...`` of ``command`` (plain words; the core words it for its surface)."""
    error = CommandError(f"Usage: {usage(command)}")
    error.usage = command
    return error


_ALIASES = {
    "forget-me": "forget_me",
    "forgetme": "forget_me",
    "start": "help",
    "whoisthis": "who",
    "who_is_this": "who",
    "list": "concepts",
}


def checked(command: BaseCommand) -> BaseCommand:
    """A command built from a platform's typed options rather than parsed, held to the
    parser's rules: text fields stripped, and those without a default not blank (else
    CommandError with the usage, as a typed command would get)."""
    values = {}
    for field in dataclasses.fields(command):  # type: ignore[arg-type]
        value = getattr(command, field.name)
        if isinstance(value, str):
            value = value.strip()
            if not value and field.default is dataclasses.MISSING:
                raise usage_error(command.command)
        values[field.name] = value
    return dataclasses.replace(command, **values)  # type: ignore[type-var]


def is_command(text: str) -> bool:
    return text.lstrip().startswith("/")


def _split_pipe(args: str, command: str) -> tuple[str, str]:
    if "|" not in args:
        raise usage_error(command)
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
            raise usage_error("remember")
        return Remember(name.strip(), description.strip())
    if word == "who":
        return Who()
    if word == "ask":
        if not args:
            raise usage_error("ask")
        return Ask(args)
    if word == "caption":
        return Caption()
    if word == "concepts":
        if not args:
            return Concepts()
        if not args.isdigit() or not 1 <= int(args) <= 10_000:
            raise usage_error("concepts")
        return Concepts(int(args))
    if word == "rename":
        old, new = _split_pipe(args, "rename")
        if not old or not new:
            raise usage_error("rename")
        return Rename(old, new)
    if word == "describe":
        name, description = _split_pipe(args, "describe")
        if not name:
            raise usage_error("describe")
        return Describe(name, description)
    if word == "forget":
        if not args:
            raise usage_error("forget")
        return Forget(args)
    if word == "forget_me":
        return ForgetMe()
    if word == "search":
        # No text is a search by the replied/attached photo alone ("more like this"); the
        # core, which knows whether there is a photo, answers the usage when there is none.
        return Search(args)
    if word == "index":
        if args.casefold() not in {"on", "off"}:
            raise usage_error("index")
        return Index(args.casefold() == "on")
    if word == "help":
        return Help()
    raise CommandError(f"I don't know the command /{word[:32]}. Try /help.")
