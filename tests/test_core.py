"""The command core's own rules: limits, bots ignored, replies for every command."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest

from bots.core.gateway import LocalGateway
from bots.core.handler import CommandCore
from bots.core.limits import InFlightLimiter, Limits, RateLimiter
from bots.core.messages import IncomingMessage


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


def message(text: str, user: str = "alice", scope: str = "tg:1", **kw) -> IncomingMessage:
    return IncomingMessage(scope=scope, user_id=user, text=text, **kw)


def test_core_limits_users_and_ignores_bots(tiny_engine) -> None:
    async def scenario() -> list:
        core = CommandCore(
            LocalGateway(tiny_engine), limits=Limits(user_burst=2, user_per_minute=1)
        )
        replies = [await core.handle(message("/concepts")) for _ in range(3)]
        replies.append(await core.handle(message("/concepts", user="bob")))
        replies.append(await core.handle(message("/concepts", from_bot=True)))
        replies.append(await core.handle(message("/help")))  # help is never limited
        return replies

    first, second, third, bob, from_bot, help_ = asyncio.run(scenario())
    assert not first.error and not second.error
    assert third.error and third.text.startswith("Slow down a little: you are")
    assert not bob.error
    assert from_bot is None
    assert not help_.error and "/remember NAME" in help_.text


def test_core_bounds_work_in_flight_per_chat(tiny_engine, dreambooth) -> None:
    photo = (dreambooth / "cat" / "00.jpg").read_bytes()

    async def scenario() -> list:
        core = CommandCore(LocalGateway(tiny_engine), limits=Limits(in_flight_per_chat=1))
        return await asyncio.gather(
            core.handle(message("/who", image=photo)),
            core.handle(message("/who", image=photo, user="bob")),
            core.handle(message("/who", image=photo, scope="tg:2")),
        )

    first, same_chat, other_chat = asyncio.run(scenario())
    assert not first.error and first.image is not None
    assert same_chat.error and "still working on this chat" in same_chat.text
    assert not other_chat.error


def test_album_remember_adds_every_photo(tiny_engine, dreambooth) -> None:
    photos = [(dreambooth / "dog" / f"0{i}.jpg").read_bytes() for i in range(3)]

    async def scenario():
        core = CommandCore(LocalGateway(tiny_engine))
        reply = await core.handle(
            message(
                "/remember Rex | my dog", image=photos[0], images=tuple(photos[1:]), message_id="m1"
            )
        )
        again = await core.handle(  # a redelivered update changes nothing
            message(
                "/remember Rex | my dog", image=photos[0], images=tuple(photos[1:]), message_id="m1"
            )
        )
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
        partials: list[str] = []

        async def on_partial(text: str) -> None:
            partials.append(text)

        ask = await core.handle(
            message("/ask What is Mochi doing?", image=cat), on_partial=on_partial
        )
        asked = list(partials)
        caption = await core.handle(message("/caption", image=cat), on_partial=on_partial)
        captioned = partials[len(asked) :]
        partials.clear()
        other = await core.handle(message("/concepts"), on_partial=on_partial)  # not streamed
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
        partials: list[str] = []

        async def on_partial(text: str) -> None:
            partials.append(text)

        # No generator: the recognition-only answer comes in one piece, so no partial.
        answer = await core.handle(message("/ask Who is Mochi?"), on_partial=on_partial)
        no_photo = await core.handle(message("/caption"), on_partial=on_partial)
        core.gateway._executor.shutdown(wait=True)
        return answer, no_photo, partials

    answer, no_photo, partials = asyncio.run(scenario())
    assert not answer.error and answer.text and partials == []
    assert no_photo.error and "photo" in no_photo.text.lower()


def test_admit_counts_a_request_once(tiny_engine) -> None:
    async def scenario() -> list:
        core = CommandCore(
            LocalGateway(tiny_engine), limits=Limits(user_burst=1, user_per_minute=1)
        )
        results = [core.admit("tg:1", "alice", "/concepts")]
        results.append(await core.handle(message("/concepts"), admitted=True))
        results.append(core.admit("tg:1", "alice", "/concepts"))  # the one token is spent
        results.append(core.admit("tg:1", "alice", "/help"))  # help is never limited
        results.append(core.admit("tg:1", "alice", "/rename"))  # usage: handle() answers it
        core.gateway._executor.shutdown(wait=True)
        return results

    first, handled, second, help_, usage = asyncio.run(scenario())
    assert first is None and not handled.error
    assert second.error and second.text.startswith("Slow down a little: you are")
    assert help_ is None and usage is None
