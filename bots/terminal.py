"""A local chat in the terminal, over the same command core as the Telegram and Discord bots.

Type chat messages as in a group chat. A photo is attached with ``< PATH`` at the end of a
message (``/remember Mochi | my grey cat < photos/mochi.jpg``); a line that is only a path
posts a photo, and the very next line uses it if its command needs one, as a reply to it
would; after that line it is no longer pending. The user is the chat's admin (their own
data). Annotated photos are saved to the output folder under new names, never over a file.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from bots.core.commands import PhotoWords, is_command
from bots.core.messages import Reply
from bots.core.request import ChatRequest, CollectingPort, Sender
from bots.core.serve import CommandCore
from engine.errors import RapbotError
from engine.images import ImageLimits, read_image_file

# The terminal's own words for attaching a photo.
TERMINAL_WORDS = PhotoWords(
    attach="with '< PATH' at the end of the line",
    short="'< PATH'",
    reference="with '< PATH'",
    missing=(
        "Attach a photo to this command with '< PATH' at the end of the line"
        " (/who < party.jpg), or post the photo's path on its own line just before the command."
    ),
)
TERMINAL_HELP = (
    "Here a photo is a file: end a line with '< PATH', or post a path on its own line and the"
    " next command uses it. You are this chat's admin (it is your own data)."
)

BANNER = (
    "rapbot local chat — scope '{scope}' as user '{user}'. /help lists the commands; "
    "attach a photo with '< PATH'; /quit or Ctrl-D leaves."
)


def terminal_core(gateway, **options) -> CommandCore:
    """The command core as the terminal chat uses it: one local user (no rate limits), the
    terminal's words for photos."""
    from bots.core.limits import Limits

    return CommandCore(
        gateway,
        TERMINAL_HELP,
        limits=Limits(enabled=False),
        photo_words=TERMINAL_WORDS,
        **options,
    )


def split_attachment(line: str) -> tuple[str, str | None]:
    """``"/who < party.jpg"`` → ``("/who", "party.jpg")``; a bare existing path is a photo post."""
    text, sep, rest = line.rpartition("<")
    path = rest.strip().strip("'\"")
    # "< PATH" (with a space) or any '<' followed by an existing file; "<b>" in text is not one.
    if sep and path and (rest[:1].isspace() or Path(path).expanduser().is_file()):
        return text.strip(), path
    stripped = line.strip().strip("'\"")
    if stripped and Path(stripped).expanduser().is_file():  # absolute paths start with '/' too
        return "", stripped
    return line.strip(), None


class TerminalChat:
    def __init__(
        self,
        core: CommandCore,
        scope: str,
        user: str,
        is_admin: bool = True,
        out_dir: Path = Path("."),
        limits: ImageLimits | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        self.core = core
        self.scope = scope
        self.user = user
        self.is_admin = is_admin
        self.out_dir = Path(out_dir)
        self.limits = limits or ImageLimits()
        # Resolved per call, not at import: the streams can be replaced after this module loads.
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.last_photo: bytes | None = None
        self.message_count = 0

    def say(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def _save(self, reply: Reply) -> Path:
        """Write the annotated photo under a name no earlier run used: never over a file."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem, suffix = Path(reply.image_name).stem, Path(reply.image_name).suffix
        for attempt in range(10_000):
            extra = f"-{attempt}" if attempt else ""
            path = self.out_dir / f"rapbot-{self.message_count:03d}-{stem}{extra}{suffix}"
            try:
                with path.open("xb") as file:  # exclusive: fails if it exists
                    file.write(reply.image)
                return path
            except FileExistsError:
                continue
        raise RapbotError(f"Too many annotated photos in {self.out_dir}; clear it out.")

    async def handle_line(self, line: str) -> bool:
        """Handle one typed line; False when the user wants to leave."""
        text, photo_path = split_attachment(line)
        if text.casefold() in {"/quit", "/exit"}:
            return False
        self.message_count += 1
        photo = None
        if photo_path is not None:
            try:
                photo = read_image_file(Path(photo_path).expanduser(), self.limits)
            except RapbotError as error:
                self.say(f"! {error}")
                return True
        if photo is not None:  # a photo posted in the chat: kept for /search if /index is on
            source = str(Path(photo_path).expanduser().resolve())
            await self.core.index_photo(self.scope, self.user, photo, source=source)
        # A posted photo waits for the next line only: a later command never takes it silently.
        pending, self.last_photo = self.last_photo, None
        if not text:
            self.last_photo = photo
            self.say("(photo posted: the next command uses it, if it needs a photo)")
            return True
        if not is_command(text):
            text = f"/ask {text}"  # plain messages are questions to the bot, as mentions are
        photo = photo if photo is not None else pending
        request = ChatRequest(
            self.scope,
            Sender(self.user),
            text,
            photos=(photo,) if photo is not None else (),
            is_admin=self.is_admin,
        )
        reply = await self.core.serve(request, CollectingPort())
        assert reply is not None  # only bots' requests go unanswered
        self.say(("! " if reply.error else "") + reply.text)
        for ref in reply.photo_refs:  # search results: the posted photos' paths
            self.say(f"  {ref}")
        if reply.image is not None:
            self.say(f"(annotated photo saved to {self._save(reply)})")
        return True

    async def run(self) -> None:
        self.say(BANNER.format(scope=self.scope, user=self.user))
        loop = asyncio.get_running_loop()
        while True:
            if self.stdin.isatty():
                print("> ", end="", file=self.stdout, flush=True)
            line = await loop.run_in_executor(None, self.stdin.readline)
            if not line:
                break
            if line.strip() and not await self.handle_line(line):
                break
        self.say("Bye.")
