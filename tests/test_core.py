"""The command core's own rules: limits, bots ignored, replies for every command."""

from __future__ import annotations

import asyncio

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
