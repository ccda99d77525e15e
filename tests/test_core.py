"""The command core's own rules: limits, bots ignored, replies for every command."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest

from bots.core import commands as c
from bots.core.gateway import LocalGateway
from bots.core.limits import InFlightLimiter, Limits, RateLimiter
from bots.core.messages import Reply
from bots.core.photo_indexing import PhotoIndexing
from bots.core.request import ChatRequest, CollectingPort, Sender
from bots.core.serve import CommandCore
from engine.errors import EngineUnavailableError
from engine.permissions import Actor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_bursts_then_refills() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock)
    assert limiter.acquire("u") == 0.0
    assert limiter.acquire("u") == 0.0
    wait = limiter.acquire("u")
    assert 9.9 < wait <= 10.0  # one token per 10 s
    assert limiter.acquire("other") == 0.0  # keys are independent
    clock.now += 10.0
    assert limiter.acquire("u") == 0.0


def test_in_flight_limiter_is_per_key() -> None:
    limiter = InFlightLimiter(limit=1)
    assert limiter.try_enter("a")
    assert not limiter.try_enter("a")
    assert limiter.try_enter("b")
    limiter.leave("a")
    assert limiter.try_enter("a")


def request(
    text: str,
    user: str = "alice",
    scope: str = "tg:1",
    *,
    image: bytes | None = None,
    images: tuple[bytes, ...] = (),
    from_bot: bool = False,
    **kw,
) -> ChatRequest:
    """A request as an adapter makes it; photos are their bytes (the port's references)."""
    photos = tuple(p for p in (image, *images) if p is not None)
    return ChatRequest(scope, Sender(user, is_bot=from_bot), text, photos=photos, **kw)


async def handle(core: CommandCore, text: str, *, port=None, **kw) -> Reply | None:
    """``core.serve`` of a request, through ``port`` (a CollectingPort by default)."""
    port = port if port is not None else CollectingPort()
    reply = await core.serve(request(text, **kw), port)
    assert port.replies == ([] if reply is None else [reply])  # the port got the reply, once
    return reply


def test_core_limits_users_and_ignores_bots(tiny_engine) -> None:
    async def scenario() -> list:
        core = CommandCore(
            LocalGateway(tiny_engine), limits=Limits(user_burst=2, user_per_minute=1)
        )
        replies = [await handle(core, "/concepts") for _ in range(3)]
        replies.append(await handle(core, "/concepts", user="bob"))
        replies.append(await handle(core, "/concepts", from_bot=True))
        replies.append(await handle(core, "/help", user="carol"))
        return replies

    first, second, third, bob, from_bot, help_ = asyncio.run(scenario())
    assert not first.error and not second.error
    assert third.error and third.text.startswith("Slow down a little: you are")
    assert not bob.error
    assert from_bot is None
    assert not help_.error and "/remember NAME" in help_.text


@pytest.mark.parametrize("text", ["/help", "/frobnicate", "/rename", "/remember", "/index maybe"])
def test_help_usage_mistakes_and_unknown_commands_count_against_the_limits(text) -> None:
    """Every request costs a token: a flood of /help or of malformed commands is limited
    like any other (it is answered, and answering costs the platform's send budget)."""

    async def scenario() -> list:
        core = CommandCore(ListingGateway(), limits=Limits(user_burst=2, user_per_minute=1))
        return [await handle(core, text) for _ in range(3)]

    first, second, third = asyncio.run(scenario())
    assert not first.text.startswith("Slow down") and not second.text.startswith("Slow down")
    assert third.error and third.text.startswith("Slow down a little: you are")


def test_core_bounds_work_in_flight_per_chat(tiny_engine, dreambooth) -> None:
    photo = (dreambooth / "cat" / "00.jpg").read_bytes()

    async def scenario() -> list:
        core = CommandCore(LocalGateway(tiny_engine), limits=Limits(in_flight_per_chat=1))
        return await asyncio.gather(
            handle(core, "/who", image=photo),
            handle(core, "/who", image=photo, user="bob"),
            handle(core, "/who", image=photo, scope="tg:2"),
        )

    first, same_chat, other_chat = asyncio.run(scenario())
    assert not first.error and first.image is not None
    assert same_chat.error and "still working on this chat" in same_chat.text
    assert not other_chat.error


def test_album_remember_adds_every_photo(tiny_engine, dreambooth) -> None:
    photos = [(dreambooth / "dog" / f"0{i}.jpg").read_bytes() for i in range(3)]

    async def scenario():
        core = CommandCore(LocalGateway(tiny_engine))
        album = {"image": photos[0], "images": tuple(photos[1:]), "message_id": "m1"}
        reply = await handle(core, "/remember Rex | my dog", **album)
        again = await handle(core, "/remember Rex | my dog", **album)  # redelivered: no change
        return reply, again

    reply, again = asyncio.run(scenario())
    assert reply.text == "Got it: I'll remember Rex (my dog), from 3 photos."
    assert not again.error
    assert [c.examples for c in tiny_engine.list_concepts("tg:1")] == [3]


# --------------------------------------------------------------------------- streaming, admission


def generator_engine(tiny_models, root):
    """An engine on the tiny models with the tiny LLaVA generator (short answers) and no
    detector (the whole photo is the region), as in test_generator."""
    import dataclasses

    from engine.detector import NullDetector
    from engine.engine import Engine
    from engine.generator.hf import Generator
    from engine.generator.tiny import tiny_model_path
    from engine.store import open_store

    settings, models = tiny_models
    llava = Generator.load(tiny_model_path("tiny-llava", root / "generators"), device="cpu")
    generator = Generator(llava.model, llava.processor, max_new_tokens=8)
    models = dataclasses.replace(models, detector=NullDetector(), generator=generator)
    settings = settings.model_copy(update={"data_dir": root})
    store = open_store(root / "store", models.embedder.model_id, models.embedder.dim)
    return Engine(settings, models, store)


@pytest.fixture
def rap_engine(tiny_models, tmp_path):
    engine = generator_engine(tiny_models, tmp_path)
    yield engine
    engine.close()


def test_core_streams_a_growing_answer(rap_engine, dreambooth) -> None:
    cat = (dreambooth / "cat" / "00.jpg").read_bytes()
    rap_engine.remember("tg:1", cat, "Mochi", "my grey cat", "alice")

    async def scenario() -> tuple[list[str], list, list[str]]:
        gateway = LocalGateway(rap_engine)
        core = CommandCore(gateway, stream_interval=0)
        port = CollectingPort(streaming=True)
        partials = port.partials
        ask = await handle(core, "/ask What is Mochi doing?", image=cat, port=port)
        asked = list(partials)
        caption = await handle(core, "/caption", image=cat, port=(port := CollectingPort(True)))
        captioned = port.partials
        port = CollectingPort(streaming=True)
        other = await handle(core, "/concepts", port=port)  # not streamed
        partials = port.partials
        gateway._executor.shutdown(wait=True)
        return asked, [ask, caption, other], captioned, list(partials)

    asked, (ask, caption, other), captioned, after_concepts = asyncio.run(scenario())
    expected = rap_engine.ask("tg:1", cat, "What is Mochi doing?", "alice")
    assert not ask.error and ask.text == expected.text and ask.image is not None
    assert [c.name for c in ask.concepts] == ["Mochi"]
    # The partials grow, each one a prefix of the next, up to the final text.
    shown = [*asked, ask.text]
    assert len(asked) >= 1 and all(b.startswith(a) and a != b for a, b in pairwise(shown))
    assert not caption.error and caption.text
    assert all(caption.text.startswith(p) for p in captioned)
    assert "Mochi" in other.text and after_concepts == []


def test_whole_answers_show_no_partial_and_errors_are_replies(tiny_engine) -> None:
    async def scenario() -> tuple:
        core = CommandCore(LocalGateway(tiny_engine), stream_interval=0)
        port = CollectingPort(streaming=True)
        partials = port.partials
        # No generator: the recognition-only answer comes in one piece, so no partial.
        answer = await handle(core, "/ask Who is Mochi?", port=port)
        port.replies.clear()
        no_photo = await handle(core, "/caption", port=port)
        core.gateway._executor.shutdown(wait=True)
        return answer, no_photo, partials

    answer, no_photo, partials = asyncio.run(scenario())
    assert not answer.error and answer.text and partials == []
    assert no_photo.error and "photo" in no_photo.text.lower()


class DownloadCountingPort(CollectingPort):
    def __init__(self) -> None:
        super().__init__()
        self.downloads = 0

    async def download(self, photo):
        self.downloads += 1
        return await super().download(photo)


def test_refused_requests_download_nothing_and_count_once(tiny_engine, dreambooth) -> None:
    """Admission comes before any download: a refused request costs no download, and an
    admitted one spends its token once (the core is the only place that counts it)."""
    cat = (dreambooth / "cat" / "00.jpg").read_bytes()

    async def scenario() -> list:
        core = CommandCore(
            LocalGateway(tiny_engine), limits=Limits(user_burst=1, user_per_minute=1)
        )
        ports = [DownloadCountingPort() for _ in range(2)]
        results = [await handle(core, "/who", image=cat, port=port) for port in ports]
        core.gateway._executor.shutdown(wait=True)
        return results, [port.downloads for port in ports]

    (who, refused), downloads = asyncio.run(scenario())
    assert not who.error and who.image is not None
    assert refused.error and refused.text.startswith("Slow down a little: you are")
    assert downloads == [1, 0]


def test_slash_options_arrive_parsed_and_are_taken_as_typed(tiny_engine, dreambooth):
    """A platform with typed options (Discord) hands the core a parsed command: no text to
    re-parse, so '|' in a description stays in it and a name is judged by the engine's own
    naming rule, the same words on every platform."""
    cat = (dreambooth / "cat" / "00.jpg").read_bytes()

    async def scenario() -> list:
        core = CommandCore(LocalGateway(tiny_engine))
        remembered = await handle(core, c.Remember("Tom", "cat | mouse"), image=cat)
        described = await handle(core, c.Describe("Tom", "/help | not a command"))
        piped = await handle(core, c.Rename("Tom", "Tom | Jerry"))
        core.gateway._executor.shutdown(wait=True)
        return [remembered, described, piped]

    remembered, described, piped = asyncio.run(scenario())
    assert remembered.text == "Got it: I'll remember Tom (cat | mouse)."
    assert described.text == "Updated: Tom — /help | not a command."
    assert piped.error and piped.text.startswith("Names can use letters, digits")
    assert [c.name for c in tiny_engine.list_concepts("tg:1")] == ["Tom"]


# --------------------------------------------------------------------------- photo search


def test_search_by_a_photo_alone_and_without_anything(tiny_engine, dreambooth) -> None:
    cat = (dreambooth / "cat" / "00.jpg").read_bytes()
    dogs = [(dreambooth / "dog" / f"0{i}.jpg").read_bytes() for i in range(2)]
    assert c.parse_command("/search") == c.Search("")  # the core decides: photo or usage
    tiny_engine.set_indexing("tg:1", True, Actor("admin", is_admin=True))

    async def scenario() -> tuple:
        core = CommandCore(LocalGateway(tiny_engine))
        indexed = [
            await core.index_photo("tg:1", "bob", cat, source="cat-id"),
            *[
                await core.index_photo("tg:1", "bob", d, source=f"dog-{i}")
                for i, d in enumerate(dogs)
            ],
        ]
        port = CollectingPort()
        from_bot = core.index_later("tg:1", Sender("b", is_bot=True), cat, "bot", port.download)
        await core.indexing.drain()
        elsewhere = await core.index_photo("tg:2", "bob", cat, source="cat-2")
        like = await handle(core, "/search", image=cat)
        nothing = await handle(core, "/search")
        blank = await handle(core, "/search   ")
        core.gateway._executor.shutdown(wait=True)
        return indexed, from_bot, elsewhere, like, nothing, blank

    indexed, from_bot, elsewhere, like, nothing, blank = asyncio.run(scenario())
    assert all(isinstance(i, int) for i in indexed) and len(set(indexed)) == 3
    assert from_bot is False and elsewhere is None  # a bot's photo; a chat that does not index
    assert not like.error and like.photo_refs[0] == "cat-id"
    assert set(like.photo_refs) == {"cat-id", "dog-0", "dog-1"}
    assert like.text.startswith("Found 3 photos, best first:\n1. score 1.00")
    for reply in (nothing, blank):
        assert reply.error and reply.text == f"Usage: {c.usage('search')}"


class ListingGateway:
    """Lists no concepts; nothing else (commands that need more fail as they would)."""

    async def list_concepts(self, scope):
        return []

    async def close(self) -> None:
        pass


class FlagGateway:
    """Answers ``indexing`` from a dict, counting the questions; can be made to fail."""

    def __init__(self) -> None:
        self.on: dict[str, bool] = {}
        self.asked: list[str] = []
        self.down = False

    async def indexing(self, scope: str) -> bool:
        self.asked.append(scope)
        await asyncio.sleep(0.01)
        if self.down:
            raise EngineUnavailableError("the engine is not answering")
        return self.on.get(scope, False)


def test_photo_indexing_asks_once_a_minute_per_chat_and_runs_jobs_where_on() -> None:
    clock = FakeClock()

    async def scenario() -> None:
        gateway = FlagGateway()
        gateway.on["tg:1"] = True
        flags = PhotoIndexing(gateway, ttl_s=60, error_ttl_s=10, clock=clock)
        # Many photos at once: one question.
        assert await asyncio.gather(*(flags.enabled("tg:1") for _ in range(5))) == [True] * 5
        assert gateway.asked == ["tg:1"]
        assert await flags.enabled("tg:2") is False
        gateway.on["tg:2"] = True
        assert await flags.enabled("tg:2") is False  # cached for a minute...
        flags.forget("tg:2")  # ...unless /index on|off went through the bot
        assert await flags.enabled("tg:2") is True
        assert gateway.asked == ["tg:1", "tg:2", "tg:2"]
        gateway.on["tg:1"] = False
        clock.now += 61
        assert await flags.enabled("tg:1") is False  # expired: asked again
        # An outage counts as off, for a shorter while.
        gateway.down = True
        flags.forget("tg:1")
        assert await flags.enabled("tg:1") is False
        gateway.down, gateway.on["tg:1"] = False, True
        clock.now += 5
        assert await flags.enabled("tg:1") is False
        clock.now += 6
        assert await flags.enabled("tg:1") is True

        ran: list[str] = []

        async def job(scope: str) -> None:
            ran.append(scope)

        async def broken() -> None:
            raise RuntimeError("a bug in a job")

        for scope in ("tg:1", "tg:2", "tg:3"):
            assert flags.submit(scope, lambda scope=scope: job(scope))
        assert flags.submit("tg:1", broken)  # logged, not raised
        assert ran == []  # in the background
        assert await flags.drain() == 0
        assert sorted(ran) == ["tg:1", "tg:2"]  # not where indexing is off
        assert await PhotoIndexing(object()).enabled("tg:1") is False  # a gateway that can't say

        full = PhotoIndexing(gateway, max_pending=1)
        stuck = asyncio.Event()
        assert full.submit("tg:1", stuck.wait)
        assert not full.submit("tg:1", stuck.wait)  # too much pending: dropped
        assert await full.drain(timeout=0.2) == 1  # shutdown cancels what is left

    asyncio.run(scenario())


def test_photos_a_command_downloaded_are_indexed_without_a_second_download(caplog) -> None:
    """The adapters' shared bookkeeping: a command records what it downloads; indexing reuses
    those bytes, downloads a photo nobody fetched (only where indexing is on), skips one whose
    download failed, and logs a failed download by ids only."""
    from engine.errors import ImageError

    async def scenario() -> None:
        gateway = FlagGateway()
        gateway.on["tg:1"] = True
        flags = PhotoIndexing(gateway)
        downloaded: dict = {}
        fetched: list[str] = []

        async def download(key: str) -> bytes:
            fetched.append(key)
            if key.startswith("bad"):
                raise ImageError(f"I couldn't download {key}-holiday-with-alice.jpg")
            return key.encode()

        # A command's downloads: recorded (None while under way, for good if it failed).
        assert await PhotoIndexing.fetch(downloaded, "a", lambda: download("a")) == b"a"
        with pytest.raises(ImageError):
            await PhotoIndexing.fetch(downloaded, "bad-1", lambda: download("bad-1"))
        assert await PhotoIndexing.fetch(None, "c", lambda: download("c")) == b"c"  # no record
        assert downloaded == {"a": b"a", "bad-1": None}

        indexed: list[tuple[str, bytes]] = []

        def submit(scope: str, key: str) -> bool:
            async def index(data: bytes) -> None:
                indexed.append((scope, data))

            return flags.submit_photo(scope, key, downloaded, lambda: download(key), index)

        fetched.clear()
        assert submit("tg:1", "a")  # the command's bytes: no second download
        assert not submit("tg:1", "bad-1")  # its download failed: not retried
        assert submit("tg:1", "d")  # nobody fetched it: the job does
        assert submit("tg:1", "bad-2")  # the job's download fails: logged, skipped
        assert submit("tg:2", "e")  # indexing is off there: never downloaded
        assert await flags.drain() == 0
        assert sorted(fetched) == ["bad-2", "d"]
        assert sorted(indexed) == [("tg:1", b"a"), ("tg:1", b"d")]

    with caplog.at_level("INFO", logger="bots.core.photo_indexing"):
        asyncio.run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if "not indexed" in r.getMessage()]
    assert line == "photo not indexed scope=tg:1 photo=bad-2: ImageError"
    assert "alice" not in caplog.text and "holiday" not in caplog.text


def test_rate_limiter_memory_stays_bounded_and_keeps_busy_keys_limited() -> None:
    """200,000 distinct users (a big deployment over a day): idle buckets are forgotten,
    the count never exceeds ``max_keys``, and a user who keeps asking keeps their bucket
    (no fresh burst from being forgotten): over 200 s they get the burst plus the refill."""
    clock = FakeClock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock, max_keys=1000)
    allowed, most = 0, 0
    for i in range(200_000):
        clock.now += 0.001
        limiter.acquire(f"user-{i}")
        if i % 50 == 0:
            allowed += limiter.acquire("flooder") == 0.0
        most = max(most, len(limiter))
    assert most <= 1000
    assert allowed <= 2 + 200 * 6 / 60 + 1  # burst + 0.1 token/s; forgotten, it would be ~4,000
    clock.now += 60  # everyone is idle again: the next prune forgets them all
    for i in range(1001):
        limiter.acquire(f"late-{i}")
    assert len(limiter) <= 1000 and "user-199999" not in limiter._buckets
