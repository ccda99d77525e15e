"""A local chat in the terminal, over the same command core as the Telegram and Discord bots.

Type chat messages as in a group chat. A photo is attached with ``< PATH`` at the end of a
message (``/remember Mochi | my grey cat < photos/mochi.jpg``); a line that is only a path
posts a photo, and the next command that needs one uses it, as a reply to it would.
Annotated photos are saved to the output folder and their path is printed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from bots.core.commands import is_command
from bots.core.messages import Reply
from bots.core.request import ChatRequest, CollectingPort, Sender
from bots.core.serve import CommandCore
from engine.errors import RapbotError
from engine.images import ImageLimits, read_image_file

BANNER = (
    "rapbot local chat — scope '{scope}' as user '{user}'. /help lists the commands; "
    "attach a photo with '< PATH'; /quit or Ctrl-D leaves."
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
        is_admin: bool = False,
        out_dir: Path = Path("."),
        limits: ImageLimits | None = None,
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
    ) -> None:
        self.core = core
        self.scope = scope
        self.user = user
        self.is_admin = is_admin
        self.out_dir = Path(out_dir)
        self.limits = limits or ImageLimits()
        self.stdin = stdin
        self.stdout = stdout
        self.last_photo: bytes | None = None
        self.message_count = 0

    def say(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def _save(self, reply: Reply) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rapbot-{self.message_count:03d}-{reply.image_name}"
        path.write_bytes(reply.image)
        return path

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
        if not text:
            self.last_photo = photo
            self.say("(photo posted: the next command that needs a photo uses it)")
            return True
        if not is_command(text):
            text = f"/ask {text}"  # plain messages are questions to the bot, as mentions are
        photo = photo if photo is not None else self.last_photo
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
