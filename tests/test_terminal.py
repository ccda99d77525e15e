"""The local chat: the command core and the terminal adapter over a real in-process engine."""

from __future__ import annotations

import asyncio
import io

from bots.core.gateway import LocalGateway
from bots.terminal import TerminalChat, split_attachment, terminal_core


def chat(engine, lines: list[str], out_dir, user: str = "alice", admin: bool = True) -> list[str]:
    """Type ``lines`` into a terminal chat and return what it printed, line by line."""
    stdout = io.StringIO()

    async def session() -> None:
        gateway = LocalGateway(engine)
        terminal = TerminalChat(
            terminal_core(gateway),
            "local",
            user,
            admin,
            out_dir,
            stdin=io.StringIO("\n".join(lines) + "\n"),
            stdout=stdout,
        )
        await terminal.run()
        gateway._executor.shutdown(wait=True)  # the engine is closed by its fixture

    asyncio.run(session())
    return stdout.getvalue().splitlines()


def test_split_attachment(tmp_path) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"x")
    assert split_attachment("/who < party.jpg") == ("/who", "party.jpg")
    assert split_attachment(f"  {photo}  ") == ("", str(photo))
    assert split_attachment("/ask is Mochi here?") == ("/ask is Mochi here?", None)
    assert split_attachment("a <b> tag") == ("a <b> tag", None)


def test_remember_who_forget_in_the_local_chat(tiny_engine, dreambooth, tmp_path) -> None:
    cat = dreambooth / "cat" / "00.jpg"
    out = chat(
        tiny_engine,
        [
            f"/remember Mochi | my grey cat < {cat}",
            str(cat),
            "/who",
            f"is Mochi here? < {cat}",
            "/concepts",
            "/forget Mochi",
            "/concepts",
        ],
        tmp_path,
    )
    assert out[0].startswith("rapbot local chat")
    assert out[1] == "Got it: I'll remember Mochi (my grey cat)."
    assert out[2].startswith("(photo posted")
    assert out[3].startswith("Mochi (your grey cat) is")
    assert out[4].startswith("(annotated photo saved to ")
    saved = out[4].removeprefix("(annotated photo saved to ").removesuffix(")")
    assert (tmp_path / saved.split("/")[-1]).read_bytes()[:2] == b"\xff\xd8"
    assert out[5].startswith("Yes, Mochi (your grey cat) is")
    assert "• Mochi — my grey cat (1 photo)" in out
    assert "I've forgotten Mochi and all photos of them." in out
    assert out[-2].startswith("I don't remember anyone in this chat yet")
    assert out[-1] == "Bye."


def test_errors_are_replies_not_tracebacks(tiny_engine, dreambooth, tmp_path) -> None:
    cat = dreambooth / "cat" / "00.jpg"
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("just some text")
    out = chat(
        tiny_engine,
        [
            "/who",
            f"/who < {text_file}",
            "/who < /no/such.jpg",
            f"/remember <script> < {cat}",
            "/rename Mochi",
            "/frobnicate",
            "/forget Ghost",
            f"/remember Mochi < {cat}",
        ],
        tmp_path,
    )
    replies = out[1:-1]
    # The terminal's own words for attaching a photo, not Telegram's.
    assert replies[0].startswith("! Attach a photo to this command with '< PATH'")
    assert replies[1].startswith("! ") and "not an image" in replies[1]
    assert replies[2].startswith("! ") and "does not exist" in replies[2]
    assert replies[3].startswith("! Names can use letters")
    assert replies[4] == "! Usage: /rename OLD NAME | NEW NAME"
    assert replies[5].startswith("! I don't know the command /frobnicate")
    assert replies[6].startswith("! I don't know anyone called 'Ghost' here.")
    assert replies[7].startswith("Got it")
    assert not any("Traceback" in line for line in out)


def test_others_cannot_forget_my_concepts(tiny_engine, dreambooth, tmp_path) -> None:
    cat = dreambooth / "cat" / "00.jpg"
    chat(tiny_engine, [f"/remember Mochi < {cat}"], tmp_path, user="alice")
    bob = chat(tiny_engine, ["/forget Mochi"], tmp_path, user="bob", admin=False)
    assert bob[1].startswith("! Only the person who remembered Mochi or a chat admin")
    assert [c.name for c in tiny_engine.list_concepts("local")] == ["Mochi"]
    admin = chat(tiny_engine, ["/forget Mochi"], tmp_path, user="bob", admin=True)
    assert admin[1].startswith("I've forgotten Mochi")


def test_a_posted_photo_is_used_once_by_the_next_line(tiny_engine, dreambooth, tmp_path) -> None:
    dog = dreambooth / "dog" / "00.jpg"
    out = chat(
        tiny_engine,
        [str(dog), "/remember Rex", "/remember Tom", str(dog), "/concepts", "/remember Kit"],
        tmp_path,
    )
    replies = out[1:-1]
    assert replies[1].startswith("Got it: I'll remember Rex")
    assert replies[2].startswith("! Attach a photo")  # the dog was Rex's, not Tom's too
    assert replies[-1].startswith("! Attach a photo")  # a line in between: no longer pending
    assert [c.name for c in tiny_engine.list_concepts("local")] == ["Rex"]


def test_the_local_user_administers_the_chat(tiny_engine, tmp_path) -> None:
    out = chat(tiny_engine, ["/index on", "/help"], tmp_path)
    assert out[1].startswith("Photo indexing is on")
    assert any("'< PATH'" in line for line in out[2:])  # /help explains the terminal's way


TELEGRAM_GESTURES = ("caption of a photo", "in reply to", "(caption or reply)")


def test_help_and_usage_speak_the_terminal_not_telegram(tiny_engine, tmp_path) -> None:
    """/help's usage lines, a usage error and the missing-photo reply say '< PATH', never
    Telegram's caption or reply."""
    out = chat(tiny_engine, ["/help", "/remember", "/ask", "/search", "/concepts"], tmp_path)
    text = "\n".join(out[1:-1])
    assert "• /remember NAME | description — with '< PATH' at the end of the line" in text
    assert "• /who — with '< PATH' at the end of the line: who do I know in it?" in text
    assert "• /ask QUESTION — about a photo ('< PATH') or about a name I know" in text
    assert "• /search TEXT — find photos of this chat; with '< PATH': more like it" in text
    assert "! Usage: /remember NAME | description — with '< PATH' at the end of the line" in out
    assert "! Usage: /ask QUESTION — about a photo ('< PATH') or about a name I know" in out
    assert any(
        line.startswith("! Usage: /search TEXT — find photos of this chat; with '< PATH'")
        for line in out
    )
    assert (  # an empty chat's /concepts tells how to teach it, in the same words
        "I don't remember anyone in this chat yet. Teach me with /remember NAME | description"
        " — with '< PATH' at the end of the line" in out
    )
    assert not any(gesture in text for gesture in TELEGRAM_GESTURES), text


def test_annotated_photos_never_overwrite_a_file(tiny_engine, dreambooth, tmp_path) -> None:
    cat = dreambooth / "cat" / "00.jpg"
    chat(tiny_engine, [f"/remember Mochi < {cat}"], tmp_path)
    (tmp_path / "rapbot-001-who.jpg").write_bytes(b"mine")  # what the next run would write
    first = chat(tiny_engine, [f"/who < {cat}"], tmp_path)
    second = chat(tiny_engine, [f"/who < {cat}"], tmp_path)
    saved = [line for line in first + second if line.startswith("(annotated photo saved to ")]
    paths = {line.removeprefix("(annotated photo saved to ").removesuffix(")") for line in saved}
    assert len(saved) == 2 and len(paths) == 2
    assert (tmp_path / "rapbot-001-who.jpg").read_bytes() == b"mine"
