"""The Telegram adapter, offline, through python-telegram-bot's own processing path.

Updates are JSON as the Bot API sends them, run through ``Application.process_update``; the
bot's HTTP client is a request class that records every Bot API call and answers as Telegram
would, serving file downloads from the real photos in ../shared/data (or the bad-upload
catalogue). The engine behind it is the real one, on tiny models.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from telegram import Update
from telegram.request import BaseRequest, RequestData

from bots.core.gateway import LocalGateway
from bots.core.limits import Limits
from bots.core.messages import Reply
from bots.core.serve import INTERNAL_ERROR, TIMEOUT_TEXT
from bots.telegram_adapter import build_application, rapbot_of
from bots.telegram_adapter.format import split_text, to_html
from bots.telegram_adapter.handlers import TELEGRAM_WORDS
from bots.telegram_adapter.send import Target, send_reply
from engine.images import ImageLimits
from engine.types import ConceptSheet
from tests.badfiles import BAD_IMAGE_REASONS, BAD_IMAGES
from tests.metric_samples import counted_once, metric, request_counts
from tests.test_core import generator_engine

TOKEN = "123456:TEST-token"
BOT = {"id": 999, "is_bot": True, "first_name": "rapbot", "username": "rapbot_test_bot"}
ALICE, BOB, CAROL = 11, 22, 33
GROUP_A, GROUP_B = -1001, -1002
MIB = 1024 * 1024


@dataclass
class Call:
    method: str  # a Bot API method, or "download" for a file fetch
    params: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return str(self.params.get("text") or self.params.get("caption") or "")

    @property
    def reply_to(self) -> int | None:
        return (self.params.get("reply_parameters") or {}).get("message_id")


class RecordingRequest(BaseRequest):
    """Answers Bot API calls like Telegram and records them; downloads come from ``files``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.files: dict[str, bytes] = {}  # file_id -> bytes
        self.members: dict[tuple[int, int], str] = {}  # (chat, user) -> member status
        self.failures: dict[str, tuple[int, str]] = {}  # method -> (HTTP code, description)
        self.stalled: set[str] = set()  # methods ("download" too) that take a minute to answer
        self._message_ids = itertools.count(5000)
        self.updates: list[dict[str, Any]] = []  # what getUpdates hands out (polling tests)
        self.on_idle: Callable[[], None] | None = None  # called by a getUpdates with nothing new

    @property
    def read_timeout(self) -> float:
        return 5.0

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def do_request(
        self, url: str, method: str, request_data: RequestData | None = None, **_: Any
    ) -> tuple[int, bytes]:
        if "/file/bot" in url:  # https://api.telegram.org/file/bot<token>/<file_path>
            file_id = url.rsplit("/", 1)[1]
            self.calls.append(Call("download", {"file_id": file_id}))
            if "download" in self.stalled:
                await asyncio.sleep(60)
            return 200, self.files[file_id]
        name = url.rsplit("/", 1)[1]
        if name in self.stalled:
            await asyncio.sleep(60)
        params = request_data.parameters if request_data else {}
        files = {}
        if request_data is not None and request_data.contains_files:
            files = {key: part[1] for key, part in request_data.multipart_data.items()}
        self.calls.append(Call(name, params, files))
        if name == "getUpdates":
            updates, self.updates = self.updates, []
            if not updates:
                if self.on_idle is not None:
                    on_idle, self.on_idle = self.on_idle, None  # once: it stops the loop
                    on_idle()
                await asyncio.sleep(0.02)  # a long poll that found nothing
            return 200, json.dumps({"ok": True, "result": updates}).encode()
        if name in self.failures:
            code, description = self.failures[name]
            return code, json.dumps(
                {"ok": False, "error_code": code, "description": description}
            ).encode()
        result = self._answer(name, params)
        if result is None:
            return 404, b'{"ok": false, "error_code": 404, "description": "Not Found"}'
        return 200, json.dumps({"ok": True, "result": result}).encode()

    def _answer(self, name: str, params: dict[str, Any]) -> Any:
        if name == "getMe":
            return {**BOT, "can_join_groups": True, "can_read_all_group_messages": False}
        if name in {"sendChatAction", "setMyCommands", "deleteWebhook"}:
            return True
        if name == "sendMessage":
            return self._message(params, text=params["text"])
        if name == "editMessageText":
            return self._message(params, text=params["text"])
        if name == "sendPhoto":
            sent = {"file_id": "sent", "file_unique_id": "sent", "width": 8, "height": 8}
            return self._message(params, photo=[sent], caption=params.get("caption"))
        if name == "sendDocument":
            sent = {"file_id": str(params["document"]), "file_unique_id": "sent-doc"}
            return self._message(params, document=sent, caption=params.get("caption"))
        if name == "sendMediaGroup":
            return [
                self._message(params, photo=[{**_photo_size(item["media"], 1), "width": 8}])
                for item in params["media"]
            ]
        if name == "getFile":
            file_id = params["file_id"]
            if file_id not in self.files:
                return None
            return {
                "file_id": file_id,
                "file_unique_id": f"u-{file_id}",
                "file_size": len(self.files[file_id]),
                "file_path": f"photos/{file_id}",
            }
        if name == "getChatMember":
            user = {"id": params["user_id"], "is_bot": False, "first_name": "U"}
            status = self.members.get((params["chat_id"], params["user_id"]), "member")
            member: dict[str, Any] = {"status": status, "user": user}
            if status == "administrator":
                member |= {flag: False for flag in _ADMIN_FLAGS} | {"can_manage_chat": True}
            if status == "creator":
                member["is_anonymous"] = False
            return member
        return None

    def _message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        return {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": _chat(int(params["chat_id"])),
            "from": BOT,
            **{key: value for key, value in content.items() if value is not None},
        }


_ADMIN_FLAGS = [
    "can_be_edited",
    "is_anonymous",
    "can_manage_chat",
    "can_delete_messages",
    "can_manage_video_chats",
    "can_restrict_members",
    "can_promote_members",
    "can_change_info",
    "can_invite_users",
    "can_post_stories",
    "can_edit_stories",
    "can_delete_stories",
]
_update_ids = itertools.count(1)
_message_ids = itertools.count(100)


def _chat(chat_id: int) -> dict[str, Any]:
    if chat_id > 0:
        return {"id": chat_id, "type": "private", "first_name": "Alice"}
    return {"id": chat_id, "type": "supergroup", "title": f"Group {chat_id}"}


def _photo_size(file_id: str, size: int) -> dict[str, Any]:
    return {"file_id": file_id, "file_unique_id": f"u-{file_id}", "height": 480, "file_size": size}


def _entities(text: str) -> list[dict[str, Any]]:
    """The entities Telegram marks: a leading /command, and @mentions."""
    found = []
    command = re.match(r"/\w+(@\w+)?", text)
    if command:
        found.append({"type": "bot_command", "offset": 0, "length": command.end()})
    for mention in re.finditer(r"(?<![\w/])@\w+", text):
        found.append({"type": "mention", "offset": mention.start(), "length": len(mention[0])})
    return found


class Harness:
    """A built and initialized Application over the recording request."""

    def __init__(self, app, request: RecordingRequest) -> None:
        self.app = app
        self.request = request

    def add_file(self, file_id: str, data: bytes) -> None:
        self.request.files[file_id] = data

    def message(
        self,
        chat: int,
        user: int = ALICE,
        *,
        text: str | None = None,
        caption: str | None = None,
        photo: str | None = None,
        document: tuple[str, str] | None = None,  # (file_id, mime type)
        size: int | None = None,  # the file size Telegram declares (default: the real one)
        reply_to: dict[str, Any] | None = None,
        album: str | None = None,
        is_bot: bool = False,
        sender_chat: int | None = None,
    ) -> dict[str, Any]:
        """A message as the Bot API sends it."""
        data: dict[str, Any] = {
            "message_id": next(_message_ids),
            "date": int(time.time()),
            "chat": _chat(chat),
            "from": {"id": user, "is_bot": is_bot, "first_name": f"User{user}"},
        }
        declared = lambda fid: size if size is not None else len(self.request.files.get(fid, b""))  # noqa: E731
        if photo is not None:
            # Telegram lists every size, smallest first; only the largest may be downloaded.
            data["photo"] = [
                {**_photo_size(f"{photo}-thumb", 900), "width": 90},
                {**_photo_size(photo, declared(photo)), "width": 640},
            ]
        if document is not None:
            file_id, mime = document
            data["document"] = {
                "file_id": file_id,
                "file_unique_id": f"u-{file_id}",
                "file_name": f"{file_id}.bin",
                "mime_type": mime,
                "file_size": declared(file_id),
            }
        if text is not None:
            data["text"] = text
            data["entities"] = _entities(text)
        if caption is not None:
            data["caption"] = caption
            data["caption_entities"] = _entities(caption)
        if reply_to is not None:
            data["reply_to_message"] = reply_to
        if album is not None:
            data["media_group_id"] = album
        if sender_chat is not None:
            data["sender_chat"] = _chat(sender_chat)
        return data

    async def send(self, message: dict[str, Any]) -> list[Call]:
        """Process one update; the Bot API calls it caused."""
        before = len(self.request.calls)
        update = Update.de_json({"update_id": next(_update_ids), "message": message}, self.app.bot)
        await self.app.process_update(update)
        return self.request.calls[before:]

    async def say(self, chat: int, user: int = ALICE, **kw: Any) -> list[Call]:
        return await self.send(self.message(chat, user, **kw))


def replies(calls: list[Call]) -> list[Call]:
    sends = {"sendMessage", "sendPhoto", "sendMediaGroup", "sendDocument"}
    return [c for c in calls if c.method in sends]


def fid(name: str) -> str:
    """A file id of Telegram's real form (URL-safe base64, 20+ characters) for ``name``:
    search results are sent back only by ids of that form."""
    return f"AgACAgIAAxkBAAI-{name}".ljust(24, "A")


def downloads(calls: list[Call]) -> list[str]:
    return [c.params["file_id"] for c in calls if c.method == "download"]


def only_reply(calls: list[Call]) -> Call:
    sent = replies(calls)
    assert len(sent) == 1, [(c.method, c.text) for c in calls]
    return sent[0]


def run_bot(
    gateway,
    scenario: Callable[[Harness], Awaitable[None]],
    *,
    limits: Limits | None = None,
    image_limits: ImageLimits = ImageLimits(),
) -> None:
    """Build the application over ``gateway``, run ``scenario``, shut everything down."""

    async def main() -> None:
        request = RecordingRequest()
        app = build_application(
            TOKEN,
            gateway,
            image_limits=image_limits,
            limits=limits or Limits(enabled=False),
            request=request,
            album_window_s=0.05,
        )
        await app.initialize()
        try:
            await scenario(Harness(app, request))
        finally:
            await rapbot_of(app).close()  # albums in their window, photos being indexed
            await app.shutdown()

    asyncio.run(main())


def with_engine(engine, scenario, **kw) -> None:
    gateway = LocalGateway(engine)
    try:
        run_bot(gateway, scenario, **kw)
    finally:
        gateway._executor.shutdown(wait=True)  # the engine itself is closed by its fixture


@pytest.fixture
def photos(dreambooth) -> dict[str, bytes]:
    return {
        "cat": (dreambooth / "cat" / "00.jpg").read_bytes(),
        **{f"dog{i}": (dreambooth / "dog" / f"0{i}.jpg").read_bytes() for i in range(3)},
    }


# --------------------------------------------------------------------------- commands


def test_remember_in_a_caption_then_who_sends_a_named_photo(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        message = tg.message(GROUP_A, photo="cat", caption="/remember Mochi | my grey cat")
        calls = await tg.send(message)
        assert [c.method for c in calls] == ["sendChatAction", "getFile", "download", "sendMessage"]
        assert calls[0].params == {"chat_id": GROUP_A, "action": "typing"}
        assert calls[2].params["file_id"] == "cat"  # the largest size, not the thumbnail
        reply = calls[-1]
        assert reply.params["chat_id"] == GROUP_A
        assert reply.reply_to == message["message_id"]
        assert reply.params["parse_mode"] == "HTML"
        assert reply.text == "Got it: I'll remember Mochi (my grey cat)."

        calls = await tg.say(GROUP_A, BOB, photo="cat", caption="/who")
        assert calls[0].method == "sendChatAction" and calls[0].params["action"] == "upload_photo"
        who = only_reply(calls)
        assert who.method == "sendPhoto" and who.files["photo"][:2] == b"\xff\xd8"
        assert "<b>Mochi</b>" in who.text and "grey cat" in who.text

    with_engine(tiny_engine, scenario)
    assert [(c.name, c.owner, c.examples) for c in tiny_engine.list_concepts("tg:-1001")] == [
        ("Mochi", f"tg:{ALICE}", 1)
    ]


def test_remember_as_a_reply_to_a_photo_and_as_a_document(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("dog0", photos["dog0"])
        tg.add_file("dog1", photos["dog1"])
        posted = tg.message(GROUP_A, BOB, photo="dog0")
        assert await tg.send(posted) == []  # a plain photo in a group is not for the bot
        calls = await tg.say(GROUP_A, text="/remember Rex | the corgi", reply_to=posted)
        assert [c.params.get("file_id") for c in calls if c.method == "download"] == ["dog0"]
        assert only_reply(calls).text == "Got it: I'll remember Rex (the corgi)."

        calls = await tg.say(
            GROUP_A, document=("dog1", "image/jpeg"), caption="/remember@rapbot_test_bot Rex"
        )
        assert only_reply(calls).text == "Added another photo of Rex (now 2 photos)."

    with_engine(tiny_engine, scenario)
    assert [c.examples for c in tiny_engine.list_concepts("tg:-1001")] == [2]


def test_album_remember_adds_every_photo(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        for i in range(3):
            tg.add_file(f"dog{i}", photos[f"dog{i}"])
        items = [
            tg.message(GROUP_A, photo="dog0", album="alb1", caption="/remember Rex | my dog"),
            tg.message(GROUP_A, photo="dog1", album="alb1"),
            tg.message(GROUP_A, photo="dog2", album="alb1"),
        ]
        for item in reversed(items):  # arrival order does not matter
            assert await tg.send(item) == []
        before = len(tg.request.calls)
        await rapbot_of(tg.app).albums.drain()
        calls = tg.request.calls[before:]
        assert sorted(c.params["file_id"] for c in calls if c.method == "download") == [
            "dog0",
            "dog1",
            "dog2",
        ]
        reply = only_reply(calls)
        assert reply.text == "Got it: I'll remember Rex (my dog), from 3 photos."
        assert reply.reply_to == items[0]["message_id"]

    with_engine(tiny_engine, scenario)
    assert [(c.name, c.examples) for c in tiny_engine.list_concepts("tg:-1001")] == [("Rex", 3)]


def test_ask_mention_private_text_and_concepts(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        await tg.say(GROUP_A, photo="cat", caption="/remember Mochi | <b>grey</b> & fluffy")

        ask = only_reply(await tg.say(GROUP_A, photo="cat", caption="/ask is Mochi here?"))
        assert "Mochi" in ask.text

        calls = await tg.say(GROUP_A, BOB, photo="cat", caption="@rapbot_test_bot is Mochi here?")
        assert calls[0].method == "sendChatAction"
        assert "Mochi" in only_reply(calls).text

        # A mention of someone else is not for the bot; text questions in private chats are.
        assert await tg.say(GROUP_A, text="@somebody_else look at this") == []
        assert replies(await tg.say(ALICE, text="what is Mochi?"))

        listed = only_reply(await tg.say(GROUP_A, text="/concepts"))
        assert listed.method == "sendPhoto"  # the contact sheet, the list as its caption
        assert "Mochi — &lt;b&gt;grey&lt;/b&gt; &amp; fluffy (1 photo)" in listed.text
        assert "<b>grey</b>" not in listed.text
        # Aliases of the core work without a CommandHandler of their own.
        assert only_reply(await tg.say(GROUP_A, text="/list")).text == listed.text

    with_engine(tiny_engine, scenario)


def test_scopes_are_chats(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        await tg.say(GROUP_A, photo="cat", caption="/remember Mochi")
        in_a = only_reply(await tg.say(GROUP_A, BOB, photo="cat", caption="/who"))
        assert "<b>Mochi</b>" in in_a.text
        in_b = only_reply(await tg.say(GROUP_B, photo="cat", caption="/who"))
        assert "Mochi" not in in_b.text and "don't know anyone" in in_b.text
        assert "Mochi" not in only_reply(await tg.say(GROUP_B, text="/concepts")).text

    with_engine(tiny_engine, scenario)


def test_owner_or_admin_may_forget(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        tg.request.members[(GROUP_A, CAROL)] = "administrator"
        await tg.say(GROUP_A, ALICE, photo="cat", caption="/remember Mochi")
        await tg.say(GROUP_A, ALICE, photo="cat", caption="/remember Tom")
        await tg.say(GROUP_A, ALICE, photo="cat", caption="/remember Kit")

        calls = await tg.say(GROUP_A, BOB, text="/forget Mochi")
        assert [c.params for c in calls if c.method == "getChatMember"] == [
            {"chat_id": GROUP_A, "user_id": BOB}
        ]
        assert only_reply(calls).text.startswith("Only the person who remembered Mochi")
        calls = await tg.say(GROUP_A, BOB, text="/rename Mochi | Bob's cat")
        assert only_reply(calls).text.startswith("Only the person")
        assert not [c for c in calls if c.method == "getChatMember"]  # cached for a minute

        assert only_reply(await tg.say(GROUP_A, ALICE, text="/forget Mochi")).text.startswith(
            "I've forgotten Mochi"
        )
        calls = await tg.say(GROUP_A, CAROL, text="/forget Tom")
        assert only_reply(calls).text.startswith("I've forgotten Tom")
        # An anonymous admin posts as the group itself (from the GroupAnonymousBot account).
        calls = await tg.say(
            GROUP_A, 1087968824, is_bot=True, sender_chat=GROUP_A, text="/forget Kit"
        )
        assert only_reply(calls).text.startswith("I've forgotten Kit")
        assert not [c for c in calls if c.method == "getChatMember"]

        index = only_reply(await tg.say(GROUP_A, BOB, text="/index on"))
        assert "not available" in index.text or "admin" in index.text

    with_engine(tiny_engine, scenario)
    assert tiny_engine.list_concepts("tg:-1001") == []


def test_other_bots_are_ignored_and_users_are_rate_limited(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        assert await tg.say(GROUP_A, 777, is_bot=True, text="/concepts") == []
        assert await tg.say(GROUP_A, 777, is_bot=True, photo="cat", caption="/who") == []
        assert not replies(await tg.say(GROUP_A, text="/concepts@some_other_bot"))
        assert not replies(await tg.say(GROUP_A, photo="cat", caption="/who@some_other_bot"))
        assert not replies(await tg.say(GROUP_A, text="/roll 2d6"))  # another bot's command

        first = only_reply(await tg.say(GROUP_A, text="/concepts"))
        second = only_reply(await tg.say(GROUP_A, text="/concepts"))
        assert not first.text.startswith("Slow down")
        assert second.text.startswith("Slow down a little: you are")
        assert not only_reply(await tg.say(GROUP_A, BOB, text="/concepts")).text.startswith("Slow")

    with_engine(tiny_engine, scenario, limits=Limits(user_burst=1, user_per_minute=1))


def test_help_explains_privacy_mode(tiny_engine) -> None:
    async def scenario(tg: Harness) -> None:
        for text in ("/help", "/start"):
            reply = only_reply(await tg.say(GROUP_A, text=text))
            assert "/remember NAME" in reply.text
            assert "privacy mode" in reply.text and "/setprivacy" in reply.text
            assert "/index on I can index only the photos sent with a command" in reply.text
            # Telegram's own words for giving a command its photo.
            assert (
                "/remember NAME | description — as the caption of a photo, or in reply to one"
                in reply.text
            )
            assert "/search TEXT — find photos of this chat; in reply to a photo" in reply.text
        usage = only_reply(await tg.say(GROUP_A, text="/remember"))
        assert usage.text == f"Usage: /remember NAME | description — {TELEGRAM_WORDS.attach}"
        no_photo = only_reply(await tg.say(GROUP_A, text="/who"))
        assert no_photo.text == TELEGRAM_WORDS.missing
        assert "caption" in no_photo.text and "reply to a photo" in no_photo.text

    with_engine(tiny_engine, scenario)


# --------------------------------------------------------------------------- bad input


def test_bad_uploads_get_a_helpful_reply(tiny_engine, photos) -> None:
    """Every bad upload of the catalogue, as a photo and as a file, for every photo command."""

    async def scenario(tg: Harness) -> None:
        for case, make in sorted(BAD_IMAGES.items()):
            data = make()
            tg.add_file(case, data)
            for attach, captions in (
                ({"photo": case}, ("/remember Mochi", "/ask is Mochi here?")),
                ({"document": (case, "image/jpeg")}, ("/remember Tom", "/who")),
            ):
                for caption in captions:
                    calls = await tg.say(ALICE, caption=caption, **attach)
                    reply = only_reply(calls)
                    where = (case, attach, caption, reply.text)
                    assert BAD_IMAGE_REASONS[case] in reply.text, where
                    assert reply.method == "sendMessage" and reply.reply_to is not None
                    if len(data) > 20 * MIB:  # refused from the declared size alone
                        assert not [c for c in calls if c.method in {"getFile", "download"}]
            del tg.request.files[case]

    tiny_engine.remember("tg:11", photos["cat"], "Mochi", "", "tg:11")
    before = tiny_engine.list_concepts("tg:11"), tiny_engine.store.count()
    with_engine(tiny_engine, scenario)
    assert (tiny_engine.list_concepts("tg:11"), tiny_engine.store.count()) == before


def test_oversized_and_non_image_files_are_refused_before_downloading(tiny_engine) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("big", b"\xff\xd8\xff" + bytes(100))
        calls = await tg.say(ALICE, photo="big", size=25 * MIB, caption="/who")
        assert "too large (25.0 MB)" in only_reply(calls).text
        assert not [c for c in calls if c.method in {"getFile", "download"}]

        tg.add_file("doc", b"%PDF-1.7")
        calls = await tg.say(ALICE, document=("doc", "application/pdf"), caption="/who")
        assert "is not an image (application/pdf)" in only_reply(calls).text
        assert not [c for c in calls if c.method in {"getFile", "download"}]

    with_engine(tiny_engine, scenario, image_limits=ImageLimits(max_bytes=10 * MIB))


def test_malformed_commands_and_unknown_names(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        expected = {
            "/rename Mochi": "Usage: /rename OLD NAME | NEW NAME",
            "/describe Mochi": "Usage: /describe NAME | new description",
            "/index maybe": "Usage: /index on|off",
            "/forget Ghost": "I don't know anyone called 'Ghost' here.",
            "/who": "Send a photo with this command",
            "/remember Mochi": "Send a photo with this command",
        }
        for text, start in expected.items():
            calls = await tg.say(GROUP_A, text=text)
            assert only_reply(calls).text.startswith(start), text
            assert not [c for c in calls if c.method == "download"]
        bad_name = only_reply(await tg.say(GROUP_A, photo="cat", caption="/remember <script>"))
        assert bad_name.text.startswith("Names can use letters")
        assert "&lt;" in bad_name.text and "<script" not in bad_name.text
        unknown = only_reply(await tg.say(ALICE, text="/frobnicate"))  # private: answered
        assert unknown.text.startswith("I don't know the command /frobnicate")
        addressed = only_reply(await tg.say(GROUP_A, text="/frobnicate@rapbot_test_bot"))
        assert addressed.text.startswith("I don't know the command")
        video = tg.message(GROUP_A, caption="/who")
        video["video"] = {
            "file_id": "v",
            "file_unique_id": "v",
            "width": 1,
            "height": 1,
            "duration": 1,
        }
        assert "not videos" in only_reply(await tg.send(video)).text

    with_engine(tiny_engine, scenario)
    assert tiny_engine.list_concepts("tg:-1001") == []


# --------------------------------------------------------------------------- Telegram trouble


def test_telegram_errors_still_get_a_reply(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        tg.request.failures["getFile"] = (400, "Bad Request: wrong file_id")
        calls = await tg.say(ALICE, photo="cat", caption="/who")
        assert only_reply(calls).text.startswith("I couldn't download that photo")
        tg.request.failures["getFile"] = (400, "Bad Request: file is too big")
        assert "too large" in only_reply(await tg.say(ALICE, photo="cat", caption="/who")).text
        del tg.request.failures["getFile"]

        tg.request.failures["sendPhoto"] = (400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
        calls = await tg.say(ALICE, photo="cat", caption="/who")
        sent = replies(calls)
        assert [c.method for c in sent] == ["sendPhoto", "sendMessage"]
        assert "refused the photo" in sent[1].text and "parse_mode" not in sent[1].params

        async def bug(*args: Any) -> None:
            raise RuntimeError("a bug in the adapter")

        rapbot_of(tg.app).serve = bug  # PTB's error handler still answers the user
        assert only_reply(await tg.say(ALICE, text="/concepts")).text == INTERNAL_ERROR

    with_engine(tiny_engine, scenario)


class SlowGateway:
    """A gateway whose recognition never finishes in time."""

    async def recognize(self, scope, image, user=None):
        await asyncio.sleep(5)

    async def close(self) -> None:
        pass


def test_slow_work_shows_progress_and_times_out(photos) -> None:
    timeouts = metric("rapbot_requests_total", command="who", outcome="timeout")
    timed = metric("rapbot_request_seconds_count", command="who")

    async def scenario(tg: Harness) -> None:
        bot = rapbot_of(tg.app)
        bot.timeout_s, bot.chat_action_every_s = 0.35, 0.1
        tg.add_file("cat", photos["cat"])
        calls = await tg.say(ALICE, photo="cat", caption="/who")
        actions = [c for c in calls if c.method == "sendChatAction"]
        assert len(actions) >= 3  # repeated while the work goes on
        assert only_reply(calls).text == TIMEOUT_TEXT

    run_bot(SlowGateway(), scenario)
    # The request cut short is still counted and timed (not lost with the cancelled handle).
    assert metric("rapbot_requests_total", command="who", outcome="timeout") == timeouts + 1
    assert metric("rapbot_request_seconds_count", command="who") == timed + 1


def test_requests_ended_by_their_download_are_counted_once(tiny_engine, photos) -> None:
    """An admitted request whose photo never reaches the core (refused, failed, cut short) is
    counted by the adapter, once, with the outcome of what happened."""

    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        before = request_counts("who")  # the user's file is refused: user_error
        calls = await tg.say(ALICE, photo="cat", size=25 * MIB, caption="/who")
        assert "too large" in only_reply(calls).text
        assert counted_once(before, "who", "user_error")

        before = request_counts("who")  # Telegram's own limit says so only at getFile
        tg.request.failures["getFile"] = (400, "Bad Request: file is too big")
        assert "too large" in only_reply(await tg.say(ALICE, photo="cat", caption="/who")).text
        assert counted_once(before, "who", "user_error")

        before = request_counts("who")  # Telegram's download failed: internal_error
        tg.request.failures["getFile"] = (400, "Bad Request: wrong file_id")
        calls = await tg.say(ALICE, photo="cat", caption="/who")
        assert only_reply(calls).text.startswith("I couldn't download that photo")
        assert counted_once(before, "who", "internal_error")
        del tg.request.failures["getFile"]

        before = request_counts("remember")  # the time limit strikes during the download
        rapbot_of(tg.app).timeout_s = 0.2
        tg.request.stalled.add("download")
        calls = await tg.say(ALICE, photo="cat", caption="/remember Mochi")
        assert only_reply(calls).text == TIMEOUT_TEXT and downloads(calls) == ["cat"]
        assert counted_once(before, "remember", "timeout")
        tg.request.stalled.clear()

        before = request_counts("who")  # reaching the core: counted there, not again
        rapbot_of(tg.app).timeout_s = 120.0
        assert only_reply(await tg.say(ALICE, photo="cat", caption="/who")).method == "sendPhoto"
        assert counted_once(before, "who", "ok")

    with_engine(tiny_engine, scenario, image_limits=ImageLimits(max_bytes=10 * MIB))
    assert tiny_engine.list_concepts("tg:11") == []


class ListingGateway:
    """A gateway whose listing takes a while, and that remembers being closed."""

    closed = False

    async def list_concepts(self, scope):
        await asyncio.sleep(0.3)
        return []

    async def concept_sheet(self, scope, page=1):  # what /concepts asks for
        return ConceptSheet(await self.list_concepts(scope), 1, 1, 0)

    async def close(self) -> None:
        self.closed = True


def test_polling_finishes_work_in_flight_then_closes_the_gateway() -> None:
    """`rapbot serve telegram`'s loop: stopping answers what is in flight, then closes."""
    request, gateway = RecordingRequest(), ListingGateway()
    app = build_application(
        TOKEN, gateway, request=request, limits=Limits(enabled=False), album_window_s=60
    )
    harness = Harness(app, request)
    asked = harness.message(GROUP_A, text="/concepts")
    album_item = harness.message(GROUP_B, text=None, caption="/help", photo="x", album="a1")
    request.updates = [
        {"update_id": 1, "message": asked},
        {"update_id": 2, "message": album_item},
    ]
    request.on_idle = app.stop_running  # stop while /concepts is still being answered
    app.run_polling(stop_signals=None, close_loop=False)

    methods = [c.method for c in request.calls]
    assert methods[:3] == ["getMe", "setMyCommands", "deleteWebhook"]
    menu = request.calls[1].params["commands"]
    menu = {
        c["command"]: c["description"]
        for c in (json.loads(menu) if isinstance(menu, str) else menu)
    }
    assert menu["remember"] == "as the caption of a photo, or in reply to one"  # Telegram's words
    sent = {c.params["chat_id"]: c for c in replies(request.calls)}
    assert sent[GROUP_A].text.startswith("I don't remember anyone in this chat yet")
    assert sent[GROUP_A].reply_to == asked["message_id"]
    assert "privacy mode" in sent[GROUP_B].text  # the album did not wait out its 60 s window
    assert gateway.closed


def test_long_captions_and_media_groups(tiny_engine, photos) -> None:
    async def scenario(tg: Harness) -> None:
        target = Target(ALICE, 42)
        await send_reply(tg.app.bot, target, Reply("x " * 700, image=photos["cat"]))
        photo, text = tg.request.calls[-2:]
        assert photo.method == "sendPhoto" and "caption" not in photo.params
        assert text.method == "sendMessage" and text.text == "x " * 700

        before = len(tg.request.calls)
        await send_reply(
            tg.app.bot, target, Reply("2 photos <found>", photo_refs=(fid("f1"), fid("f2")))
        )
        (group,) = tg.request.calls[before:]
        assert group.method == "sendMediaGroup" and group.reply_to == 42
        assert [m["media"] for m in group.params["media"]] == [fid("f1"), fid("f2")]
        assert group.params["media"][0]["caption"] == "2 photos &lt;found&gt;"

    with_engine(tiny_engine, scenario)


def test_html_formatting_helpers() -> None:
    assert to_html("Mochi & amp <3", ["amp", "Mochi"]) == "<b>Mochi</b> &amp; <b>amp</b> &lt;3"
    assert to_html("Mochi Jr and Mochi", ["Mochi", "Mochi Jr"]) == (
        "<b>Mochi Jr</b> and <b>Mochi</b>"
    )
    pieces = split_text("line\n" * 3000, 4096)
    assert len(pieces) == 4 and all(len(p) <= 4096 for p in pieces)
    assert split_text("y" * 5000, 4096) == ["y" * 4096, "y" * 904]


def test_serve_needs_a_token(monkeypatch, capsys) -> None:
    from rapbot.cli import main

    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    assert main(["serve", "telegram"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rapbot: TELEGRAM_BOT_TOKEN is not set") and "\n" not in err


# --------------------------------------------------------------------------- streaming, admission


@pytest.fixture
def rap_engine(tiny_models, tmp_path):
    engine = generator_engine(tiny_models, tmp_path)
    yield engine
    engine.close()


def test_ask_answer_grows_by_editing_one_message(rap_engine, photos) -> None:
    question = "What breed is Mochi?"

    async def scenario(tg: Harness) -> None:
        rapbot_of(tg.app).core.stream_interval = 0  # no real waits between edits
        tg.add_file("cat", photos["cat"])
        await tg.say(GROUP_A, photo="cat", caption="/remember Mochi | my grey cat")
        calls = [
            c
            for c in await tg.say(GROUP_A, text=f"/ask {question}")
            if c.method != "sendChatAction"
        ]
        expected = rap_engine.ask(f"tg:{GROUP_A}", None, question, f"tg:{ALICE}")
        first, *edits = calls
        assert first.method == "sendMessage" and first.reply_to is not None
        assert len(edits) >= 1 and {c.method for c in edits} == {"editMessageText"}
        assert len({c.params["message_id"] for c in edits}) == 1  # one message edited
        assert edits[-1].text == to_html(expected.text, [c.name for c in expected.concepts])
        assert edits[-1].params["parse_mode"] == "HTML"

    with_engine(rap_engine, scenario)


def test_refused_requests_download_nothing(tiny_engine, photos) -> None:
    limited = metric("rapbot_requests_total", command="who", outcome="rate_limited")
    timed = metric("rapbot_request_seconds_count", command="who")

    async def scenario(tg: Harness) -> None:
        tg.add_file("cat", photos["cat"])
        calls = []
        for _ in range(4):
            calls += await tg.say(GROUP_A, photo="cat", caption="/who")
        assert [c.method for c in calls].count("getFile") == 2
        assert [c.method for c in calls].count("download") == 2
        slow = [c for c in replies(calls) if c.text.startswith("Slow down a little")]
        assert len(slow) == 2

    with_engine(tiny_engine, scenario, limits=Limits(user_burst=2, user_per_minute=1))
    # Refused before the download (CommandCore.admit): counted there, once each.
    assert metric("rapbot_requests_total", command="who", outcome="rate_limited") == limited + 2
    assert metric("rapbot_request_seconds_count", command="who") == timed + 4


# --------------------------------------------------------------------------- search history


def test_posted_photos_are_indexed_and_found_again_by_file_id(tiny_engine, photos) -> None:
    scope = f"tg:{GROUP_A}"

    async def scenario(tg: Harness) -> None:
        bot = rapbot_of(tg.app)
        for name, data in photos.items():
            tg.add_file(fid(name), data)
        tg.request.members[(GROUP_A, CAROL)] = "administrator"

        # Indexing is off until an admin turns it on: a plain photo costs no download.
        assert await tg.say(GROUP_A, BOB, photo=fid("dog2")) == []
        await bot.indexing.drain()
        assert downloads(tg.request.calls) == []

        on = only_reply(await tg.say(GROUP_A, CAROL, text="/index on"))
        assert on.text.startswith("Photo indexing is on")
        start = len(tg.request.calls)
        # A plain photo, an album without a command, a bot's photo: no reply to any of them.
        cat = tg.message(GROUP_A, BOB, photo=fid("cat"))
        assert not replies(await tg.send(cat))
        for i in (0, 1):
            assert await tg.send(tg.message(GROUP_A, ALICE, photo=fid(f"dog{i}"), album="a2")) == []
        assert await tg.say(GROUP_A, 777, is_bot=True, photo=fid("dog2")) == []
        await bot.albums.drain()
        await bot.indexing.drain()
        assert sorted(downloads(tg.request.calls[start:])) == [fid("cat"), fid("dog0"), fid("dog1")]
        assert not replies(tg.request.calls[start:])

        # A command's photo: downloaded once, answered first, then indexed with those bytes.
        start = len(tg.request.calls)
        who = await tg.say(GROUP_A, CAROL, photo=fid("dog2"), caption="/who")
        assert only_reply(who).method == "sendPhoto"
        await bot.indexing.drain()
        assert downloads(tg.request.calls[start:]) == [fid("dog2")]

        # /search in reply to a photo, no text: more like it, that photo first, re-sent by
        # the file id it was indexed with.
        start = len(tg.request.calls)
        found = only_reply(await tg.say(GROUP_A, ALICE, text="/search", reply_to=cat))
        assert downloads(tg.request.calls[start:]) == [fid("cat")]  # the reference photo
        assert found.method == "sendMediaGroup" and found.reply_to is not None
        media = [m["media"] for m in found.params["media"]]
        assert media[0] == fid("cat") and sorted(media) == [
            fid("cat"),
            fid("dog0"),
            fid("dog1"),
            fid("dog2"),
        ]
        assert found.params["media"][0]["caption"].startswith("Found 4 photos, best first:")

        usage = only_reply(await tg.say(GROUP_A, ALICE, text="/search"))
        assert usage.text.startswith("Usage: /search TEXT") and "more like it" in usage.text

        # /index off forgets them and takes effect at once: the next photo is not fetched.
        off = only_reply(await tg.say(GROUP_A, CAROL, text="/index off"))
        assert off.text.endswith("the 4 photos of this chat I had indexed.")
        start = len(tg.request.calls)
        assert await tg.say(GROUP_A, BOB, photo=fid("cat")) == []
        await bot.indexing.drain()
        assert downloads(tg.request.calls[start:]) == []

    with_engine(tiny_engine, scenario)
    assert tiny_engine.search(scope, "", photos["cat"]) == []


def test_one_search_result_and_image_files_are_sent_back(tiny_engine, photos) -> None:
    """A media group needs two photos, and a file's id is not a photo's: both go back as
    what they are."""

    async def scenario(tg: Harness) -> None:
        bot = rapbot_of(tg.app)
        tg.add_file(fid("cat"), photos["cat"])
        tg.add_file(fid("dogfile"), photos["dog0"])
        assert only_reply(await tg.say(ALICE, text="/index on")).text.startswith("Photo indexing")
        await tg.say(ALICE, photo=fid("cat"))  # a private chat: every photo is seen
        await bot.indexing.drain()

        single = only_reply(await tg.say(ALICE, photo=fid("cat"), caption="/search"))
        assert single.method == "sendPhoto" and single.params["photo"] == fid("cat")
        assert single.text.startswith("Found 1 photo, best first:")

        await tg.say(ALICE, document=(fid("dogfile"), "image/png"))
        await bot.indexing.drain()
        start = len(tg.request.calls)
        await tg.say(ALICE, document=(fid("dogfile"), "image/png"), caption="/search")
        photo, document = replies(tg.request.calls[start:])
        assert (photo.method, photo.params["photo"]) == ("sendPhoto", fid("cat"))
        assert (document.method, document.params["document"]) == ("sendDocument", fid("dogfile"))
        assert document.text == "" and photo.text.startswith("Found 2 photos")
        assert downloads(tg.request.calls[start:]) == [fid("dogfile")]  # once, for search and index

    with_engine(tiny_engine, scenario)
    hits = tiny_engine.search(f"tg:{ALICE}", "", photos["dog0"])
    assert [h.source for h in hits] == ["document:" + fid("dogfile"), fid("cat")]


def test_logs_name_no_files_and_quote_no_captions(tiny_engine, photos, caplog) -> None:
    """Privacy: log lines carry ids (chat, file), never a file's name, a caption or a text."""
    secret = "alice-at-the-clinic"

    async def scenario(tg: Harness) -> None:
        bot = rapbot_of(tg.app)
        tg.add_file("cat", photos["cat"])
        tg.request.members[(GROUP_A, CAROL)] = "administrator"
        await tg.say(GROUP_A, CAROL, text="/index on")
        tg.request.failures["getFile"] = (400, "Bad Request: wrong file_id")
        posted = tg.message(GROUP_A, BOB, document=("cat", "image/jpeg"), caption=secret)
        posted["document"]["file_name"] = f"{secret}.jpg"
        assert not replies(await tg.send(posted))  # not for the bot: indexed, and that fails
        await bot.indexing.drain()
        refused = tg.message(GROUP_A, BOB, document=("cat", "application/pdf"))
        refused["document"]["file_name"] = f"{secret}.pdf"
        refused["caption"], refused["caption_entities"] = f"/who {secret}", _entities("/who")
        assert secret in only_reply(await tg.send(refused)).text  # the user is told, not the log
        del tg.request.failures["getFile"]
        bot.timeout_s = 0.0  # the next download cannot finish
        await tg.say(GROUP_A, BOB, photo="cat", caption=secret)
        await bot.indexing.drain()

    with caplog.at_level("DEBUG"):
        with_engine(tiny_engine, scenario)
    ours = [  # python-telegram-bot's own DEBUG lines quote every call (capped at INFO in serve)
        r.getMessage() for r in caplog.records if r.name.startswith(("bots.", "engine.", "rapbot."))
    ]
    assert [line for line in ours if "not indexed" in line] == [
        f"photo not indexed scope=tg:{GROUP_A} photo=cat: TelegramDownloadError",
        f"photo not indexed scope=tg:{GROUP_A} photo=cat: TimeoutError",
    ]
    assert not [line for line in ours if secret in line]


def test_search_results_that_are_urls_are_never_sent(tiny_engine, caplog) -> None:
    """Defence in depth: Telegram fetches a URL given as a photo, so a ref with "://" (e.g. a
    source from a foreign archive) is left out of the reply, and logged by count only."""
    url = "https://evil.example/tracker.jpg"

    async def scenario(tg: Harness) -> None:
        target = Target(ALICE, 42)
        refs = (fid("1"), url, "document:" + fid("2"), "document:http://x/y.jpg")
        before = len(tg.request.calls)
        await send_reply(tg.app.bot, target, Reply("Found 4 photos", photo_refs=refs))
        photo, document = replies(tg.request.calls[before:])
        assert (photo.method, photo.params["photo"]) == ("sendPhoto", fid("1"))
        assert (document.method, document.params["document"]) == ("sendDocument", fid("2"))
        assert url not in json.dumps([c.params for c in tg.request.calls[before:]], default=str)

        before = len(tg.request.calls)  # only URLs: the text alone
        await send_reply(tg.app.bot, target, Reply("Found 1 photo", photo_refs=(url,)))
        (text,) = replies(tg.request.calls[before:])
        assert text.method == "sendMessage" and text.text == "Found 1 photo"

    with caplog.at_level("WARNING"):
        with_engine(tiny_engine, scenario)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("bots.")]
    assert f"skipped 2 search result(s) that are not Telegram file ids in chat={ALICE}" in lines
    assert not [line for line in lines if "evil" in line or "://" in line]


@pytest.mark.parametrize("single", [True, False], ids=["one-photo", "media-group"])
def test_search_results_never_name_a_local_file(tiny_engine, tmp_path, monkeypatch, single) -> None:
    """Security: python-telegram-bot reads and uploads a string that names an existing file.
    A crafted archive's source (``document:credentials``, or a file id whose text is also a
    file's name in the bot's folder) must never make the bot upload a file of the host: only
    ids of Telegram's form are sent, and by id."""
    secret = b"api_key=SECRET-of-the-host"
    lookalike = fid("lookalike")  # a valid id that happens to be a file's name here too
    for name in ("credentials", "photo.jpg", lookalike):
        (tmp_path / name).write_bytes(secret)
    monkeypatch.chdir(tmp_path)
    crafted = (
        "document:credentials",
        "credentials",
        "document:photo.jpg",
        str(tmp_path / "photo.jpg"),
    )
    refs = (
        (lookalike, *crafted)
        if single
        else (lookalike, fid("2"), *crafted, "document:" + lookalike)
    )

    async def scenario(tg: Harness) -> None:
        await send_reply(tg.app.bot, Target(ALICE, 42), Reply("Found", photo_refs=refs))

    calls: list[Call] = []

    async def record(tg: Harness) -> None:
        await scenario(tg)
        calls.extend(tg.request.calls)

    with_engine(tiny_engine, record)
    sent = replies(calls)
    assert sent, "the reply was sent"
    assert not [c for c in calls if c.files], "nothing was uploaded"
    assert secret.decode() not in json.dumps([c.params for c in calls], default=str)
    media = [item["media"] for c in sent for item in c.params.get("media", [])]
    media += [c.params[k] for c in sent for k in ("photo", "document") if k in c.params]
    assert lookalike in media and not set(media) & {"credentials", "photo.jpg"}
