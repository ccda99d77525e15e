"""The command core: one incoming chat message in, one reply out, for every adapter.

It parses the command, picks the photo, passes the user's identity and admin rights to the
engine (which enforces owner-or-admin permissions), and turns every error a user can cause
into a helpful reply: never silence, never a traceback.

Streaming: adapters pass ``on_partial`` to :meth:`CommandCore.handle`; for /ask and /caption
(mentions are /ask) it is awaited with the answer so far as it grows, paced by
``stream_interval`` (chat platforms rate-limit message edits), and ``handle`` still returns the
final Reply. An answer that arrives in one piece (no generator, or a gateway that cannot stream)
produces no partial at all, so adapters send it as an ordinary reply.

Admission: :meth:`CommandCore.admit` applies the rate limits and the in-flight bound before an
adapter downloads a photo; the adapter then calls ``handle(..., admitted=True)`` so the same
request is not counted twice.

Metrics: every request is counted once in ``rapbot_requests_total{command, outcome}`` and timed
in ``rapbot_request_seconds{command}``: by :meth:`CommandCore.admit` when it refuses the request
(``rate_limited``, ``busy``), else by :meth:`CommandCore.handle`, with ``timeout`` when the
adapter cancels it (a time limit, a shutdown); an admitted request that the adapter ends itself
before ``handle`` (its photo's download failed or was cut short) is counted by the adapter
through :meth:`CommandCore.observe_unhandled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from bots.core import commands as c
from bots.core import replies
from bots.core.gateway import EngineGateway, answer_stream, growing_text
from bots.core.limits import InFlightLimiter, Limits, RateLimiter
from bots.core.messages import IncomingMessage, Reply
from engine.errors import RapbotError
from engine.permissions import Actor
from engine.types import Answer
from rapbot import metrics
from rapbot.logs import log_context

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Sorry, something went wrong on my side. Please try again in a minute."
SEARCH_K = 10  # photos per /search reply (a Telegram album holds 10)
BUSY = "I'm still working on this chat's earlier requests; please try again in a moment."

OnPartial = Callable[[str], Awaitable[None]]


class CommandCore:
    def __init__(
        self,
        gateway: EngineGateway,
        platform_help: str = "",
        limits: Limits | None = None,
        stream_interval: float = 1.0,
    ) -> None:
        # Every Answer that comes back feeds rapbot_stage_seconds (its engine stage timings).
        self.gateway = metrics.observed_gateway(gateway)
        self.stream_interval = stream_interval  # seconds between partial answers
        self.platform_help = platform_help
        self.limits = limits or Limits()
        self._user_rate = RateLimiter(self.limits.user_per_minute, self.limits.user_burst)
        self._chat_rate = RateLimiter(self.limits.chat_per_minute, self.limits.chat_burst)
        self._in_flight = InFlightLimiter(self.limits.in_flight_per_chat)

    def admit(self, scope: str, user_id: str, text: str) -> Reply | None:
        """Apply the rate limits (counting the request) and the in-flight bound before the
        adapter does costly work such as downloading a photo: a refusal Reply, or None when
        the request may go ahead; then call ``handle(..., admitted=True)``.

        A refusal is the request's outcome (``rate_limited`` or ``busy`` in the metrics, under
        the command's name): the adapter sends it and never calls ``handle``."""
        if not self.limits.enabled:
            return None
        started = time.perf_counter()
        try:
            command = c.parse_command(text)
        except RapbotError:
            return None  # handle() answers with the usage, as it always has (never limited)
        if isinstance(command, c.Help):
            return None
        refusal, outcome = self._rate_limited(scope, user_id), "rate_limited"
        if refusal is None and self._in_flight.is_full(scope):
            refusal, outcome = Reply(BUSY, error=True), "busy"
        if refusal is not None:
            seconds = time.perf_counter() - started
            metrics.observe_request(metrics.command_name(command), outcome, seconds)
        return refusal

    def observe_unhandled(self, text: str, outcome: str, seconds: float) -> None:
        """Count an admitted request that never reaches :meth:`handle`: the adapter answered
        it itself (its photo's download failed: ``user_error`` for the user's file,
        ``internal_error`` for the platform's failure) or it was cut short before (``timeout``).
        ``text`` is the command text, named as ``handle`` names it; ``seconds`` the time the
        adapter spent on it. A request that reached ``handle`` is counted there, never here."""
        if outcome not in metrics.REQUEST_OUTCOMES:
            raise ValueError(f"unknown request outcome {outcome!r}")
        try:
            command: c.Command | None = c.parse_command(text)
        except RapbotError:
            command = None
        metrics.observe_request(metrics.command_name(command), outcome, seconds)

    async def handle(
        self,
        message: IncomingMessage,
        *,
        admitted: bool = False,
        on_partial: OnPartial | None = None,
    ) -> Reply | None:
        """The reply to one message, or None when the message is not for the bot to answer.

        ``admitted``: :meth:`admit` already counted this request. ``on_partial``: awaited with
        the growing answer of /ask and /caption (see the module notes).

        Counted in ``rapbot_requests_total{command, outcome}`` and timed in
        ``rapbot_request_seconds{command}``, also when the adapter cancels it (its time limit:
        outcome ``timeout``); logs within carry the scope and command name."""
        if message.from_bot:
            return None
        started = time.perf_counter()
        try:
            command: c.Command | None = c.parse_command(message.text)
        except RapbotError as error:
            command, reply, outcome = None, Reply(str(error), error=True), "user_error"
        name = metrics.command_name(command)
        try:
            with log_context(scope=message.scope, command=name):
                if command is not None:
                    reply, outcome = await self._handle_command(
                        command, message, admitted, on_partial
                    )
        except asyncio.CancelledError:  # asyncio.wait_for's time limit, a shutdown
            metrics.observe_request(name, "timeout", time.perf_counter() - started)
            raise
        metrics.observe_request(name, outcome, time.perf_counter() - started)
        return reply

    async def _handle_command(
        self,
        command: c.Command,
        message: IncomingMessage,
        admitted: bool,
        on_partial: OnPartial | None,
    ) -> tuple[Reply, str]:
        """:meth:`handle` for a parsed command: the reply and its metrics outcome."""
        try:
            if not self.limits.enabled:
                reply = await self.dispatch(command, message, on_partial)
            else:
                if not admitted and not isinstance(command, c.Help):
                    limited = self._rate_limited(message.scope, message.user_id)
                    if limited is not None:
                        return limited, "rate_limited"
                if not self._in_flight.try_enter(message.scope):
                    return Reply(BUSY, error=True), "busy"
                try:
                    reply = await self.dispatch(command, message, on_partial)
                finally:
                    self._in_flight.leave(message.scope)
        except RapbotError as error:
            return Reply(str(error), error=True), metrics.error_outcome(error)
        except Exception:  # a bug or an outage: log it, tell the user something useful
            log.exception("command failed scope=%s", message.scope)
            return Reply(INTERNAL_ERROR, error=True), "internal_error"
        # An error reply from dispatch is the user's (no photo, nothing to search for...).
        return reply, "user_error" if reply.error else "ok"

    async def index_photo(self, message: IncomingMessage, source: str) -> int | None:
        """For adapters: add a photo posted in the chat to its search history when the chat's
        indexing is on (silently nothing otherwise). ``source`` is what the adapter needs to
        send the photo again (Telegram file id, Discord message link). Never raises."""
        if message.from_bot or message.image is None:
            return None
        try:
            return await self.gateway.index_photo(
                message.scope, message.image, message.user_id, source
            )
        except RapbotError as error:
            log.info("not indexed scope=%s: %s", message.scope, error)
        except Exception:
            log.exception("indexing failed scope=%s", message.scope)
        return None

    def _rate_limited(self, scope: str, user_id: str) -> Reply | None:
        wait = self._user_rate.acquire(f"{scope}/{user_id}")
        if wait == 0.0:
            wait = self._chat_rate.acquire(scope)
            who = "this chat is"
        else:
            who = "you are"
        if wait == 0.0:
            return None
        return Reply(
            f"Slow down a little: {who} sending requests faster than I can answer. "
            f"Try again in {max(1, round(wait))} s.",
            error=True,
        )

    async def _answer(
        self,
        kind: str,
        on_partial: OnPartial | None,
        scope: str,
        image: bytes | None,
        *args,
    ) -> Answer:
        """``gateway.ask`` / ``caption``, or, with ``on_partial``, the same answer streamed."""
        if on_partial is None:
            return await getattr(self.gateway, kind)(scope, image, *args)
        pieces = _all_but_last_piece(answer_stream(self.gateway, kind, scope, image, *args))
        async with contextlib.aclosing(growing_text(pieces, self.stream_interval)) as growing:
            async for text, answer in growing:
                if answer is not None:
                    return answer
                await on_partial(text)
        raise RuntimeError(f"the {kind} stream ended without an answer")

    async def dispatch(
        self, command: c.Command, message: IncomingMessage, on_partial: OnPartial | None = None
    ) -> Reply:
        gateway, scope, user = self.gateway, message.scope, message.user_id
        actor = Actor(user, message.is_admin)
        match command:
            case c.Help():
                return Reply(replies.help_text(self.platform_help))
            case c.Remember(name, description):
                photos = [p for p in (message.image, *message.images) if p is not None]
                if not photos:
                    return Reply(replies.NO_PHOTO, error=True)
                results = []
                for index, photo in enumerate(photos):  # an album: every photo is an example
                    source = f"{message.message_id}#{index}" if message.message_id else None
                    results.append(
                        await gateway.remember(scope, photo, name, description, user, source=source)
                    )
                return Reply(replies.remembered(results[-1], created=results[0].created))
            case c.Who() | c.Caption():
                if message.image is None:
                    return Reply(replies.NO_PHOTO, error=True)
                if isinstance(command, c.Caption):
                    answer = await self._answer("caption", on_partial, scope, message.image, user)
                    return Reply(answer.text, concepts=answer.concepts)
                answer = await gateway.recognize(scope, message.image, user)
                return Reply(answer.text, answer.image, "who.jpg", answer.concepts)
            case c.Ask(question):
                answer = await self._answer("ask", on_partial, scope, message.image, question, user)
                image = answer.image if answer.concepts else None
                return Reply(answer.text, image, "answer.jpg", answer.concepts)
            case c.Concepts():
                return Reply(replies.concept_list(await gateway.list_concepts(scope)))
            case c.Rename(name, new_name):
                concept = await gateway.rename(scope, name, new_name, actor)
                return Reply(replies.renamed(name, concept))
            case c.Describe(name, description):
                concept = await gateway.describe(scope, name, description, actor)
                return Reply(replies.described(concept))
            case c.Forget(name):
                concept = await gateway.forget(scope, name, actor)
                return Reply(replies.forgotten(concept))
            case c.ForgetMe():
                removed = await gateway.forget_user(user)
                return Reply(replies.forgot_user(removed))
            case c.Index(enabled):
                removed = await gateway.set_indexing(scope, enabled, actor, delete=not enabled)
                if enabled:
                    return Reply(replies.INDEXING_ON)
                return Reply(replies.indexing_off(removed))
            case c.Search(text):
                if not text and message.image is None:
                    raise c.CommandError(f"Usage: {c.USAGE['search']}")
                hits = await gateway.search(scope, text, message.image, k=SEARCH_K)
                if not hits:
                    return Reply(replies.no_photos_found())
                return Reply(
                    replies.found_photos([h.score for h in hits]),
                    photo_refs=tuple(h.source for h in hits),
                )
        raise AssertionError(f"unhandled command {command!r}")


async def _all_but_last_piece(stream: AsyncIterator[str | Answer]) -> AsyncIterator[str | Answer]:
    """The stream with its last text piece held back (the final Answer carries it): an answer
    that comes in one piece then shows no partial at all and is sent as an ordinary reply."""
    held: str | None = None
    async for item in stream:
        if isinstance(item, Answer):
            yield item
            return
        if held is not None:
            yield held
        held = item
