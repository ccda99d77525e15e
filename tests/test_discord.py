"""The Discord adapter through discord.py's own processing path, offline.

A real ``RapbotBot`` logs in against a recording HTTP layer (``HTTPClient.request`` for the
REST API, the webhook adapter for interaction callbacks and followups, ``get_from_cdn`` for
attachment downloads), then receives INTERACTION_CREATE and MESSAGE_CREATE payloads shaped as
Discord sends them, through ``ConnectionState.parse_*`` and the real ``CommandTree``. The
engine is the real one on tiny models. Tests assert on the recorded calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import discord
import pytest
from discord.http import Route
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

from bots.core.gateway import LocalGateway
from bots.core.limits import Limits
from bots.core.messages import Reply
from bots.discord_adapter.app import RapbotBot
from bots.discord_adapter.files import fit_upload
from bots.discord_adapter.format import (
    NOT_A_DISCORD_PHOTO,
    escape,
    photo_link,
    reply_content,
    split_content,
)
from bots.discord_adapter.handlers import (
    ABORTED,
    DISCORD_WORDS,
    discord_core,
    interaction_is_admin,
)
from engine.images import ImageLimits
from tests.badfiles import BAD_IMAGE_REASONS, BAD_IMAGES, MIB
from tests.metric_samples import counted_once, metric, request_counts
from tests.test_core import generator_engine

APP_ID = 1100000000000000001
GUILD = 1100000000000000002
# The form `rapbot serve` checks before it starts (rapbot.doctor.DISCORD_TOKEN).
WELL_FORMED_TOKEN = "x" * 24 + "." + "y" * 6 + "." + "z" * 27
CHANNEL_A = 1100000000000000003
CHANNEL_B = 1100000000000000004
DM_CHANNEL = 1100000000000000005
COMMAND_ID = 1100000000000000006
MANAGE_GUILD = str(1 << 5)
NO_PERMISSIONS = "0"


def user(uid: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(uid),
        "username": name,
        "discriminator": "0",
        "global_name": name.title(),
        "avatar": None,
        "bot": bot,
    }


BOT_USER = user(APP_ID, "rapbot", bot=True)
ALICE = user(1200000000000000001, "alice")
BOB = user(1200000000000000002, "bob")
CAROL = user(1200000000000000003, "carol")  # a moderator (manage_guild)
OTHER_BOT = user(1200000000000000004, "otherbot", bot=True)

_ids = itertools.count(1300000000000000000)


def snowflake() -> str:
    return str(next(_ids))


@dataclass
class Call:
    method: str
    path: str
    payload: dict[str, Any] | None
    files: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def content(self) -> str:
        return (self.payload or {}).get("content") or ""


def _payload(payload, multipart) -> dict[str, Any] | None:
    for part in multipart or ():
        if part.get("name") == "payload_json":
            return json.loads(part["value"])
    return payload


def _files(files) -> list[tuple[str, bytes]]:
    return [(f.filename, f.fp.getvalue()) for f in files or ()]


def message_json(channel_id: str, content: str = "", author=BOT_USER) -> dict[str, Any]:
    return {
        "id": snowflake(),
        "channel_id": channel_id,
        "author": author,
        "content": content,
        "timestamp": "2025-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
    }


class Recorder:
    """Answers Discord's API plausibly and remembers every call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.cdn: dict[str, bytes] = {}
        self.cdn_requests: list[str] = []
        self.fail_next_file_upload: int | None = None  # an HTTP status to answer once
        self.cdn_stalled = False  # True: downloads take a minute (cdn_waiting says one began)
        self.cdn_waiting = asyncio.Event()

    def _record(self, route: Route, payload, files) -> Call:
        call = Call(route.method, route.url.removeprefix(Route.BASE), payload, _files(files))
        self.calls.append(call)
        return call

    def _maybe_fail(self, call: Call) -> None:
        if call.files and self.fail_next_file_upload:
            status, self.fail_next_file_upload = self.fail_next_file_upload, None
            response = type("Response", (), {"status": status, "reason": "Payload Too Large"})()
            raise discord.HTTPException(response, {"code": 40005, "message": "Too large"})

    async def http_request(self, route: Route, *, files=None, form=None, **kwargs) -> Any:
        call = self._record(route, _payload(kwargs.get("json"), form), files)
        self._maybe_fail(call)
        path = call.path
        if path == "/users/@me":
            return BOT_USER
        if path == "/oauth2/applications/@me":
            return {
                "id": str(APP_ID),
                "name": "rapbot",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": ALICE,
                "verify_key": "0" * 64,
                "flags": 0,
            }
        if path.endswith("/typing"):
            return None
        if path.endswith("/messages") and call.method == "POST":
            return message_json(path.split("/")[2], call.content)
        if path.endswith("/commands") and call.method == "PUT":
            return [
                {
                    "description": "",
                    **cmd,
                    "id": snowflake(),
                    "application_id": str(APP_ID),
                    "version": "1",
                }
                for cmd in call.payload
            ]
        raise AssertionError(f"unexpected Discord API call {call.method} {path}")

    async def webhook_request(self, route: Route, *, payload=None, multipart=None, files=None):
        call = self._record(route, _payload(payload, multipart), files)
        self._maybe_fail(call)
        if call.path.endswith("/callback"):
            kind = call.payload["type"]
            return {
                "interaction": {
                    "id": str(route.webhook_id),
                    "type": 2,
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(
                        (call.payload.get("data") or {}).get("flags", 0) & 64
                    ),
                },
                "resource": {"type": kind},
            }
        return message_json(str(CHANNEL_A), call.content)

    async def get_from_cdn(self, url: str) -> bytes:
        self.cdn_requests.append(url)
        if self.cdn_stalled:
            self.cdn_waiting.set()
            await asyncio.sleep(60)
        try:
            return self.cdn[url]
        except KeyError:
            response = type("Response", (), {"status": 404, "reason": "Not Found"})()
            raise discord.NotFound(response, "asset not found") from None


class RecordingWebhookAdapter(AsyncWebhookAdapter):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    async def request(self, route, session=None, *, payload=None, multipart=None, files=None, **_):
        return await self.recorder.webhook_request(
            route, payload=payload, multipart=multipart, files=files
        )


@dataclass
class Photo:
    """An attachment as Discord describes it; its bytes are served by the fake CDN."""

    data: bytes
    filename: str = "photo.jpg"
    content_type: str | None = "image/jpeg"
    size: int | None = None  # what Discord announces; the real length by default
    served: bool = True  # False: the CDN answers 404 (an expired link)


class DiscordHarness:
    def __init__(self, bot: RapbotBot, recorder: Recorder) -> None:
        self.bot = bot
        self.recorder = recorder
        self.last_message: dict[str, Any] = {}  # the last MESSAGE_CREATE payload sent

    def attachment(self, photo: Photo, channel: int) -> dict[str, Any]:
        aid = snowflake()
        url = f"https://cdn.discordapp.com/attachments/{channel}/{aid}/{photo.filename}"
        if photo.served:
            self.recorder.cdn[url] = photo.data
        data = {
            "id": aid,
            "filename": photo.filename,
            "size": len(photo.data) if photo.size is None else photo.size,
            "url": url,
            "proxy_url": url.replace("cdn.discordapp.com", "media.discordapp.net"),
        }
        if photo.content_type is not None:
            data["content_type"] = photo.content_type
        return data

    def _interaction(
        self,
        data: dict[str, Any],
        *,
        author: dict[str, Any],
        channel: int,
        permissions: str,
        dm: bool,
        attachment_size_limit: int,
    ) -> dict[str, Any]:
        iid = snowflake()
        payload: dict[str, Any] = {
            "id": iid,
            "application_id": str(APP_ID),
            "type": 2,
            "token": f"interaction-token-{iid}",
            "version": 1,
            "data": data,
            "channel_id": str(channel),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": attachment_size_limit,
            "app_permissions": "2248473465835073",
        }
        if dm:
            payload["channel"] = {"id": str(channel), "type": 1, "recipients": [author]}
            payload["user"] = author
            payload["context"] = 1
        else:
            payload["guild_id"] = str(GUILD)
            payload["guild_locale"] = "en-US"
            payload["channel"] = {
                "id": str(channel),
                "type": 0,
                "guild_id": str(GUILD),
                "name": f"channel-{channel % 100}",
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
            }
            payload["member"] = {
                "user": author,
                "roles": [],
                "joined_at": "2024-01-01T00:00:00+00:00",
                "deaf": False,
                "mute": False,
                "flags": 0,
                "permissions": permissions,
            }
            payload["context"] = 0
        return payload

    def command_payload(
        self,
        command_name: str,
        /,
        *,
        author: dict[str, Any] = ALICE,
        channel: int = CHANNEL_A,
        permissions: str = NO_PERMISSIONS,
        dm: bool = False,
        attachment_size_limit: int = 10 * MIB,
        **options: str | Photo,
    ) -> dict[str, Any]:
        """A slash command's INTERACTION_CREATE payload, as Discord sends it."""
        resolved: dict[str, Any] = {}
        opts = []
        for key, value in options.items():
            if isinstance(value, Photo):
                att = self.attachment(value, channel)
                resolved[att["id"]] = att
                opts.append({"name": key, "type": 11, "value": att["id"]})
            else:
                opts.append({"name": key, "type": 3, "value": value})
        data: dict[str, Any] = {
            "id": str(COMMAND_ID),
            "name": command_name,
            "type": 1,
            "options": opts,
        }
        if resolved:
            data["resolved"] = {"attachments": resolved}
        return self._interaction(
            data,
            author=author,
            channel=channel,
            permissions=permissions,
            dm=dm,
            attachment_size_limit=attachment_size_limit,
        )

    async def command(self, command_name: str, /, **kwargs: Any) -> list[Call]:
        """Dispatch a slash command; the calls the bot made in answer."""
        return await self.dispatch(
            "INTERACTION_CREATE", self.command_payload(command_name, **kwargs)
        )

    async def who_is_this(
        self, photos: list[Photo], *, author=ALICE, channel: int = CHANNEL_A
    ) -> list[Call]:
        """The "Who is this?" message menu on a message with ``photos`` attached."""
        target = message_json(str(channel), "look at this", author=BOB)
        target["attachments"] = [self.attachment(p, channel) for p in photos]
        data = {
            "id": str(COMMAND_ID),
            "name": "Who is this?",
            "type": 3,
            "target_id": target["id"],
            "resolved": {"messages": {target["id"]: target}},
        }
        payload = self._interaction(
            data,
            author=author,
            channel=channel,
            permissions=NO_PERMISSIONS,
            dm=False,
            attachment_size_limit=10 * MIB,
        )
        return await self.dispatch("INTERACTION_CREATE", payload)

    async def message(
        self,
        content: str,
        photos: list[Photo] = (),
        *,
        author=ALICE,
        channel: int = CHANNEL_A,
        mentions: list[dict[str, Any]] = (BOT_USER,),
    ) -> list[Call]:
        """A MESSAGE_CREATE in a guild channel."""
        payload = message_json(str(channel), content, author=author)
        payload["guild_id"] = str(GUILD)
        payload["member"] = {"roles": [], "joined_at": "2024-01-01T00:00:00+00:00", "flags": 0}
        payload["mentions"] = list(mentions)
        payload["mention_everyone"] = "@everyone" in content
        payload["attachments"] = [self.attachment(p, channel) for p in photos]
        self.last_message = payload
        return await self.dispatch("MESSAGE_CREATE", payload)

    async def dispatch(self, event: str, payload: dict[str, Any]) -> list[Call]:
        start = len(self.recorder.calls)
        self.bot._connection.parsers[event](payload)
        await settle()
        return self.recorder.calls[start:]


async def settle() -> None:
    """Wait until every task the bot started (command invocations, listeners) is done."""
    for _ in range(50):
        await asyncio.sleep(0)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not pending:
            return
        await asyncio.wait(pending, timeout=60)
    raise AssertionError("the bot's tasks did not finish")


@contextlib.asynccontextmanager
async def discord_bot(engine, limits: Limits | None = None, gateway=None):
    gateway = gateway or LocalGateway(engine)
    core = discord_core(gateway, limits=limits or Limits())  # as the bot builds it
    bot = RapbotBot(core, ImageLimits())
    recorder = Recorder()
    bot.http.request = recorder.http_request  # type: ignore[method-assign]
    bot.http.get_from_cdn = recorder.get_from_cdn  # type: ignore[method-assign]
    adapter = async_context.set(RecordingWebhookAdapter(recorder))
    try:
        async with bot:
            await bot.login("test-token")  # the real login: application id, then setup_hook
            recorder.calls.clear()
            yield DiscordHarness(bot, recorder)
    finally:
        async_context.reset(adapter)
        gateway._executor.shutdown(wait=True)  # the engine itself is closed by its fixture


def run(engine, scenario, **kw):
    async def main():
        async with discord_bot(engine, **kw) as harness:
            return await scenario(harness)

    return asyncio.run(main())


def photo_of(dreambooth, subject: str, index: int = 0) -> Photo:
    return Photo((dreambooth / subject / f"{index:02d}.jpg").read_bytes(), f"{subject}.jpg")


def assert_deferred_then_followup(calls: list[Call], ephemeral: bool = False) -> Call:
    """The deferral (callback type 5) comes first, then one followup: return the followup."""
    assert len(calls) == 2, calls
    defer, followup = calls
    assert defer.method == "POST" and defer.path.endswith("/callback")
    assert defer.payload["type"] == 5
    assert bool((defer.payload.get("data") or {}).get("flags", 0) & 64) == ephemeral
    assert followup.method == "POST"
    assert followup.path.startswith(f"/webhooks/{APP_ID}/interaction-token-")
    assert followup.payload["allowed_mentions"] == {"parse": []}
    return followup


# --------------------------------------------------------------------------- tests


def test_login_loads_the_commands_and_never_syncs(tiny_engine) -> None:
    async def scenario(h: DiscordHarness):
        tree = h.bot.tree
        names = sorted(c.name for c in tree.get_commands(type=discord.AppCommandType.chat_input))
        menus = [c.name for c in tree.get_commands(type=discord.AppCommandType.message)]
        synced = await h.bot.sync_commands(GUILD)
        return names, menus, h.recorder.calls, synced

    names, menus, calls, synced = run(tiny_engine, scenario)
    assert names == sorted(
        [
            "remember",
            "who",
            "ask",
            "caption",
            "concepts",
            "rename",
            "describe",
            "forget",
            "search",
            "index",
            "forget_me",
            "help",
        ]
    )
    assert menus == ["Who is this?"]
    # Only the explicit sync talked to the commands endpoint, for the one guild.
    assert [(c.method, c.path) for c in calls] == [
        ("PUT", f"/applications/{APP_ID}/guilds/{GUILD}/commands")
    ]
    sent = {c["name"]: c for c in calls[0].payload}
    assert sent["Who is this?"]["type"] == 3
    remember_options = {o["name"]: o for o in sent["remember"]["options"]}
    assert remember_options["photo"]["type"] == 11 and remember_options["photo"]["required"]
    assert not remember_options["description"].get("required", False)
    search_options = {o["name"]: o for o in sent["search"]["options"]}
    assert not search_options["text"].get("required", False)  # a photo alone is a search
    index_choices = [c["value"] for c in sent["index"]["options"][0]["choices"]]
    assert index_choices == ["on", "off"]
    assert len(synced) == len(calls[0].payload)


def test_remember_then_who_returns_the_annotated_photo(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")

    async def scenario(h: DiscordHarness):
        remembered = await h.command("remember", name="Mochi", description="my grey cat", photo=cat)
        who = await h.command("who", photo=cat)
        concepts = await h.command("concepts")
        return remembered, who, concepts, h.recorder.cdn_requests

    remembered, who, concepts, cdn = run(tiny_engine, scenario)
    followup = assert_deferred_then_followup(remembered)
    assert followup.content == "Got it: I'll remember Mochi (my grey cat)."
    assert not followup.files
    followup = assert_deferred_then_followup(who)
    assert followup.content.startswith("Mochi (your grey cat) is")
    [(filename, jpeg)] = followup.files
    assert filename == "who.jpg" and jpeg[:2] == b"\xff\xd8"
    assert followup.payload["attachments"][0]["filename"] == "who.jpg"
    followup = assert_deferred_then_followup(concepts)
    assert "• Mochi — my grey cat (1 photo)" in followup.content
    [(filename, jpeg)] = followup.files  # /concepts as a picture: the contact sheet
    assert filename == "concepts.jpg" and jpeg[:2] == b"\xff\xd8"
    assert len(cdn) == 2  # each photo fetched once, through Attachment.read()
    [concept] = tiny_engine.list_concepts(f"dc:{CHANNEL_A}")
    assert concept.owner == f"dc:{ALICE['id']}"  # namespaced as on Telegram


def test_who_is_this_context_menu(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")
    text_file = Photo(b"notes", "notes.txt", "text/plain")

    async def scenario(h: DiscordHarness):
        await h.command("remember", name="Mochi", photo=cat)
        with_photo = await h.who_is_this([text_file, cat])
        without = await h.who_is_this([])
        only_text = await h.who_is_this([text_file])
        return with_photo, without, only_text

    with_photo, without, only_text = run(tiny_engine, scenario)
    followup = assert_deferred_then_followup(with_photo)
    assert followup.content.startswith("Mochi is") and followup.files[0][0] == "who.jpg"
    for calls, expected in ((without, "has no image attached"), (only_text, "is not an image")):
        [reply] = calls  # answered at once, only to the user: no deferral, no followup
        assert reply.path.endswith("/callback") and reply.payload["type"] == 4
        assert reply.payload["data"]["flags"] == 64
        assert expected in reply.payload["data"]["content"]


def test_mention_with_a_photo_is_a_question(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")

    async def scenario(h: DiscordHarness):
        await h.command("remember", name="Mochi", description="my grey cat", photo=cat)
        asked = await h.message(f"<@{APP_ID}> is Mochi here?", [cat])
        bare = await h.message(f"<@{APP_ID}>", [cat])
        not_for_me = await h.message("@everyone is Mochi here?", [cat], mentions=[])
        from_bot = await h.message(f"<@{APP_ID}> is Mochi here?", [cat], author=OTHER_BOT)
        return asked, bare, not_for_me, from_bot, len(h.recorder.cdn_requests)

    asked, bare, not_for_me, from_bot, downloads = run(tiny_engine, scenario)
    typing, answer = asked
    assert typing.path == f"/channels/{CHANNEL_A}/typing"
    assert answer.path == f"/channels/{CHANNEL_A}/messages"
    assert answer.content.startswith("Yes, Mochi (your grey cat) is")
    assert answer.files and answer.files[0][1][:2] == b"\xff\xd8"
    assert answer.payload["allowed_mentions"] == {"parse": [], "replied_user": False}
    assert answer.payload["message_reference"]["fail_if_not_exists"] is False
    assert bare[-1].content.startswith("Mochi (your grey cat) is")  # a bare mention is /who
    assert not_for_me == [] and from_bot == []  # no typing, no download, no answer
    assert downloads == 3  # /remember, the question and the bare mention


def test_scopes_are_per_channel(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")

    async def scenario(h: DiscordHarness):
        await h.command("remember", name="Mochi", photo=cat, channel=CHANNEL_A)
        in_a = await h.command("who", photo=cat, channel=CHANNEL_A)
        in_b = await h.command("who", photo=cat, channel=CHANNEL_B)
        list_b = await h.command("concepts", channel=CHANNEL_B)
        in_dm = await h.command("concepts", channel=DM_CHANNEL, dm=True)
        return in_a, in_b, list_b, in_dm

    in_a, in_b, list_b, in_dm = run(tiny_engine, scenario)
    assert assert_deferred_then_followup(in_a).content.startswith("Mochi is")
    assert "Mochi" not in assert_deferred_then_followup(in_b).content
    assert "don't remember anyone" in assert_deferred_then_followup(list_b).content
    assert "don't remember anyone" in assert_deferred_then_followup(in_dm).content
    assert [c.name for c in tiny_engine.list_concepts(f"dc:{CHANNEL_A}")] == ["Mochi"]
    assert tiny_engine.list_concepts(f"dc:{CHANNEL_B}") == []


def test_forget_needs_the_owner_or_a_moderator(tiny_engine, dreambooth) -> None:
    cat, dog = photo_of(dreambooth, "cat"), photo_of(dreambooth, "dog")

    async def scenario(h: DiscordHarness):
        await h.command("remember", name="Mochi", photo=cat, author=ALICE)
        await h.command("remember", name="Rex", photo=dog, author=ALICE)
        refused = await h.command("forget", name="Mochi", author=BOB)
        rename_refused = await h.command("rename", name="Mochi", new_name="Bo", author=BOB)
        by_owner = await h.command("forget", name="Mochi", author=ALICE)
        by_mod = await h.command("forget", name="Rex", author=CAROL, permissions=MANAGE_GUILD)
        return refused, rename_refused, by_owner, by_mod

    refused, rename_refused, by_owner, by_mod = run(tiny_engine, scenario)
    text = assert_deferred_then_followup(refused).content
    assert text.startswith("⚠️ Only the person who remembered Mochi or a chat admin")
    assert "Only the person" in assert_deferred_then_followup(rename_refused).content
    assert assert_deferred_then_followup(by_owner).content.startswith("I've forgotten Mochi")
    assert assert_deferred_then_followup(by_mod).content.startswith("I've forgotten Rex")
    assert tiny_engine.list_concepts(f"dc:{CHANNEL_A}") == []


def test_who_counts_as_a_chat_admin(tiny_engine) -> None:
    async def scenario(h: DiscordHarness):
        def admin(**kw) -> bool:
            payload = h.command_payload("concepts", **kw)
            return interaction_is_admin(discord.Interaction(data=payload, state=h.bot._connection))

        return {
            "member": admin(permissions=NO_PERMISSIONS),
            "manage_guild": admin(permissions=MANAGE_GUILD),
            "manage_messages": admin(permissions=str(1 << 13)),
            "administrator": admin(permissions=str(1 << 3)),
            "dm": admin(channel=DM_CHANNEL, dm=True),
        }

    assert run(tiny_engine, scenario) == {
        "member": False,
        "manage_guild": True,
        "manage_messages": True,
        "administrator": True,
        "dm": True,
    }


def test_unknown_commands_get_an_answer(tiny_engine) -> None:
    async def scenario(h: DiscordHarness):
        return await h.command("frobnicate")  # e.g. a command left over from an older sync

    [reply] = run(tiny_engine, scenario)
    assert reply.path.endswith("/callback") and reply.payload["type"] == 4
    assert reply.payload["data"]["flags"] == 64
    assert "rapbot serve discord --sync" in reply.payload["data"]["content"]


def test_user_text_cannot_ping_or_format(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")

    async def scenario(h: DiscordHarness):
        remembered = await h.command(
            "remember",
            name="Mochi",
            description="@everyone **look** <@&1234567890123456789>",
            photo=cat,
        )
        listed = await h.command("concepts")
        return remembered, listed

    remembered, listed = run(tiny_engine, scenario)
    for calls in (remembered, listed):
        followup = assert_deferred_then_followup(calls)
        assert "@\u200beveryone" in followup.content
        assert "@everyone" not in followup.content
        assert "\\*\\*look\\*\\*" in followup.content
        assert "<@&1234567890123456789>" not in followup.content
        assert followup.payload["allowed_mentions"] == {"parse": []}


def test_attachments_are_checked_before_download(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")
    too_big = Photo(cat.data, size=25 * MIB)
    text = Photo(b"just some text", "notes.txt", "text/plain")
    no_type_text = Photo(b"just some text", "notes.txt", content_type=None)

    async def scenario(h: DiscordHarness):
        big = await h.command("who", photo=too_big)
        plain = await h.command("remember", name="Mochi", photo=text)
        untyped = await h.command("who", photo=no_type_text)
        return big, plain, untyped, h.recorder.cdn_requests

    big, plain, untyped, cdn = run(tiny_engine, scenario)
    assert assert_deferred_then_followup(big).content == (
        "⚠️ The image is too large (25.0 MB); the limit is 20 MB."
    )
    assert "notes.txt (text/plain) is not an image" in assert_deferred_then_followup(plain).content
    assert "notes.txt is not an image" in assert_deferred_then_followup(untyped).content
    assert cdn == []  # nothing was downloaded
    assert tiny_engine.list_concepts(f"dc:{CHANNEL_A}") == []


def test_bad_images_get_helpful_replies(tiny_engine) -> None:
    async def scenario(h: DiscordHarness):
        replies = {}
        for name, build in BAD_IMAGES.items():
            kind = "image/png" if "png" in name else "image/jpeg"
            calls = await h.command(
                "remember", name="Mochi", photo=Photo(build(), f"{name}.jpg", kind)
            )
            replies[name] = assert_deferred_then_followup(calls).content
        return replies, h.recorder.cdn_requests

    replies, cdn = run(tiny_engine, scenario, limits=Limits(enabled=False))
    for name, content in replies.items():
        assert content.startswith("⚠️ "), (name, content)
        assert BAD_IMAGE_REASONS[name] in content, (name, content)
        assert "Traceback" not in content
    assert not any("huge_upload_60mb" in url for url in cdn)  # refused from its announced size
    assert tiny_engine.list_concepts(f"dc:{CHANNEL_A}") == []


def test_download_failure_and_upload_failure_are_answered(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")

    async def scenario(h: DiscordHarness):
        await h.command("remember", name="Mochi", photo=cat)
        lost = await h.command("who", photo=Photo(cat.data, "cat.jpg", served=False))
        h.recorder.fail_next_file_upload = 413  # the followup with the photo is refused once
        upload = await h.command("who", photo=cat)
        return lost, upload

    lost, upload = run(tiny_engine, scenario)
    assert "couldn't download cat.jpg from Discord" in assert_deferred_then_followup(lost).content
    defer, refused, retried = upload
    assert defer.payload["type"] == 5 and refused.files
    assert not retried.files
    assert retried.content.startswith("Mochi is")
    assert retried.content.endswith("(The annotated photo could not be uploaded.)")


def test_reply_photo_is_fitted_to_the_upload_limit(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")

    async def scenario(h: DiscordHarness):
        return await h.command("who", photo=cat, attachment_size_limit=20_000)

    followup = assert_deferred_then_followup(run(tiny_engine, scenario))
    [(_, jpeg)] = followup.files
    assert len(jpeg) <= 20_000 and jpeg[:2] == b"\xff\xd8"
    assert "made smaller" in followup.content

    big = (dreambooth / "cat" / "00.jpg").read_bytes()
    assert asyncio.run(fit_upload(big, 10)) == (
        None,
        "(The annotated photo is too large to upload here.)",
    )


def test_rate_limited_users_get_a_friendly_reply(tiny_engine) -> None:
    async def scenario(h: DiscordHarness):
        first = await h.command("concepts")
        second = await h.command("concepts")
        other = await h.command("concepts", author=BOB)
        helped = await h.command("help", author=CAROL)
        flooded = await h.command("help")  # /help costs a token like any request
        return first, second, other, helped, flooded

    first, second, other, helped, flooded = run(
        tiny_engine, scenario, limits=Limits(user_burst=1, user_per_minute=1)
    )
    assert not assert_deferred_then_followup(first).content.startswith("⚠️")
    assert assert_deferred_then_followup(second).content.startswith("⚠️ Slow down a little: you are")
    assert not assert_deferred_then_followup(other).content.startswith("⚠️")
    help_text = assert_deferred_then_followup(helped, ephemeral=True).content
    assert "Who is this?" in help_text and "/remember NAME" in help_text
    limited = assert_deferred_then_followup(flooded, ephemeral=True).content
    assert limited.startswith("⚠️ Slow down a little: you are")


def test_long_replies_are_split() -> None:
    text = "\n".join(f"• concept number {i} — a description" for i in range(200))
    pieces = split_content(text)
    assert len(pieces) > 1 and all(len(p) <= 2000 for p in pieces)
    assert "\n".join(pieces) == text
    assert all(len(p) <= 2000 for p in split_content("\\*" * 3000))


class GatedGateway(LocalGateway):
    """A gateway whose recognize waits until the test opens the gate."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def recognize(self, scope, image, user=None):
        self.entered.set()
        await self.gate.wait()
        return await super().recognize(scope, image, user)


def test_shutdown_waits_then_answers_what_is_left(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")

    async def main():
        gateway = GatedGateway(tiny_engine)
        async with discord_bot(tiny_engine, gateway=gateway) as h:
            h.bot._connection.parsers["INTERACTION_CREATE"](h.command_payload("who", photo=cat))
            await asyncio.wait_for(gateway.entered.wait(), 30)
            cut = await h.bot.shutdown(timeout=0.05)
            await settle()
            return cut, h.recorder.calls, h.bot.is_closed()

    cut, calls, closed = asyncio.run(main())
    assert cut == 1 and closed
    defer, apology = calls
    assert defer.payload["type"] == 5
    assert apology.content == "⚠️ " + ABORTED


# --------------------------------------------------------------------------- rapbot serve discord


def test_serve_discord_needs_a_token(monkeypatch, capsys) -> None:
    from rapbot.cli import main

    monkeypatch.delenv("DISCORD_BOT_TOKEN", raising=False)
    assert main(["serve", "discord"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rapbot: DISCORD_BOT_TOKEN is not set")


def _patch_rest_api(monkeypatch, recorder: Recorder) -> None:
    async def request(self, route, **kwargs):
        return await recorder.http_request(route, **kwargs)

    monkeypatch.setattr(discord.http.HTTPClient, "request", request)


def test_serve_discord_sync_registers_the_commands_and_exits(monkeypatch, capsys) -> None:
    from rapbot.cli import main

    recorder = Recorder()
    _patch_rest_api(monkeypatch, recorder)
    monkeypatch.setenv("DISCORD_BOT_TOKEN", WELL_FORMED_TOKEN)
    assert main(["serve", "discord", "--sync", "--guild", str(GUILD)]) == 0
    assert f"Synced 13 commands to guild {GUILD}" in capsys.readouterr().out
    assert [(c.method, c.path) for c in recorder.calls] == [
        ("GET", "/users/@me"),
        ("GET", "/oauth2/applications/@me"),
        ("PUT", f"/applications/{APP_ID}/guilds/{GUILD}/commands"),
    ]


def test_serve_discord_with_a_refused_token_is_one_line(monkeypatch, capsys) -> None:
    from rapbot.cli import main

    async def request(self, route, **kwargs):
        response = type("Response", (), {"status": 401, "reason": "Unauthorized"})()
        raise discord.HTTPException(response, {"code": 0, "message": "401: Unauthorized"})

    monkeypatch.setattr(discord.http.HTTPClient, "request", request)
    monkeypatch.setenv("DISCORD_BOT_TOKEN", WELL_FORMED_TOKEN)  # refused below
    monkeypatch.setenv("RAPBOT_LOG_LEVEL", "WARNING")  # serve logs at INFO by default
    assert main(["serve", "discord", "--sync"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == "rapbot: Discord refused the token in DISCORD_BOT_TOKEN."


# --------------------------------------------------------------------------- streaming, admission


@pytest.fixture
def rap_engine(tiny_models, tmp_path):
    engine = generator_engine(tiny_models, tmp_path)
    yield engine
    engine.close()


def test_ask_followup_is_edited_as_the_answer_grows(rap_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")
    question = "What breed is Mochi?"

    async def scenario(h: DiscordHarness):
        h.bot.core.stream_interval = 0  # no real waits between edits
        await h.command("remember", name="Mochi", description="my grey cat", photo=cat)
        return await h.command("ask", question=question)

    calls = run(rap_engine, scenario)
    expected = rap_engine.ask(f"dc:{CHANNEL_A}", None, question, f"dc:{ALICE['id']}")
    defer, followup, *edits = calls
    assert defer.payload["type"] == 5
    assert followup.method == "POST" and followup.path.startswith(f"/webhooks/{APP_ID}/")
    assert followup.payload["allowed_mentions"] == {"parse": []}
    assert len(edits) >= 1 and all(c.method == "PATCH" and "/messages/" in c.path for c in edits)
    assert edits[-1].content == escape(expected.text)
    assert followup.content and followup.content != edits[-1].content  # it grew


def test_refused_requests_download_nothing(tiny_engine, dreambooth) -> None:
    cat = photo_of(dreambooth, "cat")
    limited = metric("rapbot_requests_total", command="who", outcome="rate_limited")
    timed = metric("rapbot_request_seconds_count", command="who")

    async def scenario(h: DiscordHarness):
        answers = [await h.command("who", photo=cat) for _ in range(4)]
        return answers, list(h.recorder.cdn_requests)

    answers, cdn = run(tiny_engine, scenario, limits=Limits(user_burst=2, user_per_minute=1))
    contents = [assert_deferred_then_followup(calls).content for calls in answers]
    assert [c.startswith("⚠️ Slow down a little") for c in contents] == [False, False, True, True]
    assert len(cdn) == 2  # the refused ones fetched nothing
    # Refused before the download (CommandCore.admit): counted there, once each.
    assert metric("rapbot_requests_total", command="who", outcome="rate_limited") == limited + 2
    assert metric("rapbot_request_seconds_count", command="who") == timed + 4


def test_requests_ended_by_their_attachment_are_counted_once(tiny_engine, dreambooth) -> None:
    """A request whose photo never reaches the core (refused, failed, cut short by a shutdown)
    is counted by the adapter, once, with the outcome of what happened."""
    cat = photo_of(dreambooth, "cat")
    pdf = Photo(b"%PDF-1.7", "notes.pdf", "application/pdf")

    async def main() -> None:
        async with discord_bot(tiny_engine) as h:
            before = request_counts("who")  # the user's file is refused: user_error
            big = await h.command("who", photo=Photo(cat.data, size=25 * MIB))
            assert "too large" in assert_deferred_then_followup(big).content
            assert counted_once(before, "who", "user_error")

            before = request_counts("who")  # a mention with no image at all: user_error
            [reply] = await h.message(f"<@{APP_ID}>", [pdf])
            assert "notes.pdf (application/pdf) is not an image" in reply.content
            assert counted_once(before, "who", "user_error")

            before = request_counts("who")  # the same from the message menu
            [menu] = await h.who_is_this([pdf])
            assert "is not an image" in menu.payload["data"]["content"]
            assert counted_once(before, "who", "user_error")

            before = request_counts("who")  # Discord's download failed: internal_error
            lost = await h.command("who", photo=Photo(cat.data, "cat.jpg", served=False))
            assert "couldn't download" in assert_deferred_then_followup(lost).content
            assert counted_once(before, "who", "internal_error")

            before = request_counts("who")  # reaching the core: counted there, not again
            assert_deferred_then_followup(await h.command("who", photo=cat))
            assert counted_once(before, "who", "ok")

            before = request_counts("who")  # a shutdown cuts a download short: timeout
            h.recorder.cdn_stalled = True  # (Bob: Alice has spent her burst of 5 requests)
            payload = h.command_payload("who", photo=cat, author=BOB)
            h.bot._connection.parsers["INTERACTION_CREATE"](payload)
            await asyncio.wait_for(h.recorder.cdn_waiting.wait(), 30)
            assert await h.bot.shutdown(timeout=0.05) == 1
            await settle()
            assert counted_once(before, "who", "timeout")

    asyncio.run(main())


# --------------------------------------------------------------------------- search history


def test_posted_photos_are_indexed_as_message_links(tiny_engine, dreambooth) -> None:
    cat, dog, other = (
        photo_of(dreambooth, "cat"),
        photo_of(dreambooth, "dog"),
        photo_of(dreambooth, "dog", 1),
    )
    notes = Photo(b"just some text", "notes.txt", "text/plain")

    async def scenario(h: DiscordHarness):
        cdn = h.recorder.cdn_requests
        # Off until a moderator turns it on: a photo costs no download.
        assert await h.message("our cat", [cat], mentions=[]) == []
        assert cdn == []
        on = await h.command("index", mode="on", author=CAROL, permissions=MANAGE_GUILD)
        assert assert_deferred_then_followup(on).content.startswith("Photo indexing is on")
        # An ordinary message: one entry per image attachment, no reply.
        assert await h.message("cat, notes and dog", [cat, notes, dog], mentions=[]) == []
        posted = h.last_message
        assert len(cdn) == 2 and not any("notes.txt" in url for url in cdn)
        assert await h.message("spam", [other], author=OTHER_BOT, mentions=[]) == []
        assert await h.message("elsewhere", [other], channel=CHANNEL_B, mentions=[]) == []
        assert len(cdn) == 2  # neither a bot's photo nor one where indexing is off
        # A mention with a photo: fetched once, answered, then indexed too.
        asked = await h.message(f"<@{APP_ID}> is Mochi here?", [other])
        assert asked[-1].content and len(cdn) == 3
        mention = h.last_message

        like = await h.command("search", photo=cat)  # no text: more like this photo
        nothing = await h.command("search")
        off = await h.command("index", mode="off", author=CAROL, permissions=MANAGE_GUILD)
        after = await h.message("another cat", [cat], mentions=[])
        return posted, mention, like, nothing, off, after, len(cdn)

    posted, mention, like, nothing, off, after, downloads = run(tiny_engine, scenario)
    link = f"https://discord.com/channels/{GUILD}/{CHANNEL_A}/{posted['id']}"
    lines = assert_deferred_then_followup(like).content.split("\n")
    assert lines[0] == "Found 3 photos, best first:"
    assert lines[1].startswith("1. score ") and lines[1].endswith(f" — {link}")
    assert f"— {link} (attachment 3)" in "\n".join(lines[2:])
    assert f"{CHANNEL_A}/{mention['id']}" in "\n".join(lines[2:])
    usage = assert_deferred_then_followup(nothing).content
    assert usage.startswith("⚠️ Usage: /search TEXT") and "more like it" in usage
    assert assert_deferred_then_followup(off).content.endswith(
        "3 photos of this chat I had indexed."
    )
    assert after == [] and downloads == 3 + 1  # + the /search reference; /index off shows at once
    assert tiny_engine.search(f"dc:{CHANNEL_A}", "", cat.data) == []


def test_search_replies_link_the_photos() -> None:
    link = "https://discord.com/channels/1/2/3"
    reply = Reply(
        "Found 2 photos, best first:\n1. score 0.90\n2. score 0.50", photo_refs=(link, f"{link}#2")
    )
    assert reply_content(reply) == (
        f"Found 2 photos, best first:\n1. score 0.90 — {link}\n"
        f"2. score 0.50 — {link} (attachment 2)"
    )
    assert reply_content(Reply("Found:", photo_refs=(link,))) == f"Found:\n1. {link}"


@pytest.mark.parametrize(
    "ref",
    [
        "/photos/**cat**.jpg",
        "https://evil.example/channels/1/2/3",
        "https://discord.com.evil.example/channels/1/2/3",
        "https://discord.com@evil.example/channels/1/2/3",
        "http://discord.com/channels/1/2/3",
        "https://discord.com/channels/1/2/3/evil",
        "https://discord.com/channels/1/2/3) [free nitro](https://evil.example",
        "https://discord.com/channels/1/2/3\n@everyone",
        "https://discord.com/channels/١/2/3",  # Arabic-Indic digit
        "https://discord.com/channels/1/2/3#x",
        "document:AgACAgIAAxkBAAIBZ2XAAAAA",
    ],
)
def test_only_discord_message_links_are_shown(ref) -> None:
    """Security: a search source can come from an imported archive; only a message link on
    one of Discord's hosts is shown, anything else is never put in the reply."""
    content = reply_content(Reply("Found 1 photo:\n1. score 0.90", photo_refs=(ref,)))
    assert content == f"Found 1 photo:\n1. score 0.90 — {NOT_A_DISCORD_PHOTO}"


@pytest.mark.parametrize("host", ["discord.com", "ptb.discord.com", "canary.discord.com"])
def test_message_links_of_every_discord_host_are_shown(host) -> None:
    link = f"https://{host}/channels/@me/42/1000"
    assert photo_link(link) == link
    assert photo_link(f"{link}#3") == f"{link} (attachment 3)"


def test_logs_name_no_files(tiny_engine, dreambooth, caplog) -> None:
    """Privacy: a photo that cannot be fetched is logged by attachment id and scope, never by
    the name the user gave the file (the user's reply may name it)."""
    secret = "alice-at-the-clinic"
    expired = Photo(photo_of(dreambooth, "cat").data, f"{secret}.jpg", served=False)

    async def scenario(h: DiscordHarness):
        await h.command("index", mode="on", author=CAROL, permissions=MANAGE_GUILD)
        assert await h.message("look", [expired], mentions=[]) == []  # indexed: download fails
        posted = h.last_message["attachments"][0]["id"]
        await h.bot.rapbot.indexing.drain()
        asked = await h.message(f"<@{APP_ID}> who?", [expired])  # answered: download fails
        asked_id = h.last_message["attachments"][0]["id"]
        await h.bot.rapbot.indexing.drain()
        return posted, asked, asked_id

    with caplog.at_level("DEBUG"):
        posted, asked, asked_id = run(tiny_engine, scenario)
    assert secret in asked[-1].content  # the user hears which file
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("bots.", "engine."))]
    assert [line for line in ours if "not indexed" in line] == [
        f"photo not indexed scope=dc:{CHANNEL_A} photo={posted}: AttachmentDownloadError"
    ]  # the mention's own failed download is not tried again for indexing
    assert f"attachment download failed id={asked_id}: NotFound (status 404)" in ours
    assert not [line for line in ours if secret in line]


def test_splitting_never_cuts_an_escape_at_any_position() -> None:
    """Every cut position of an escaped line: each piece shows, on its own, exactly its part
    of the text (no piece ends in half an escape, so no stray backslash and no markdown
    that comes alive in the next message)."""

    def shown(content: str) -> str:  # what Discord displays of escaped markdown
        return re.sub(r"\\(.)", r"\1", content, flags=re.S)

    text = escape("Mochi*the_cat \\ ~~sofa~~ `code` |spoiler| > quote \\\\ @everyone " * 3)
    assert len(text) > 200
    for limit in range(2, len(text) + 1):
        pieces = split_content(text, limit)
        assert all(len(piece) <= limit for piece in pieces)
        assert "".join(pieces) == text
        assert "".join(shown(piece) for piece in pieces) == shown(text), limit


TELEGRAM_GESTURES = ("caption of a photo", "in reply to one", "(caption or reply)")


def test_help_and_usage_say_how_to_attach_a_photo_on_discord(tiny_engine) -> None:
    """Discord's own words for giving a command its photo, in /help, a usage error and the
    missing-photo reply; none of Telegram's."""

    async def scenario(h: DiscordHarness):
        helped = await h.command("help")
        usage = (await h.message(f"<@{APP_ID}> /remember"))[-1]  # after "typing..."
        no_photo = (await h.message(f"<@{APP_ID}> /who"))[-1]
        return helped, usage, no_photo

    helped, usage, no_photo = run(tiny_engine, scenario)
    # Discord's markdown escapes ("\\|") taken out, to compare with the words themselves.
    help_text = assert_deferred_then_followup(helped, ephemeral=True).content.replace("\\", "")
    assert f"/remember NAME | description — {DISCORD_WORDS.attach}" in help_text
    assert f"/search TEXT — find photos of this chat; {DISCORD_WORDS.reference}" in help_text
    assert "Usage: /remember NAME \\| description — with a photo attached" in usage.content
    assert "attach one (the command's photo option)" in no_photo.content
    for text in (help_text, usage.content, no_photo.content):
        assert not any(gesture in text for gesture in TELEGRAM_GESTURES), text
