"""The command core: ``serve(request, port)`` answers one chat request, for every adapter.

One place owns a request from start to end (adapters only translate; see
:mod:`bots.core.request` for the :class:`ChatRequest` and the :class:`ChatPort`):

1. parse the command (once; a typed command arrives parsed);
2. admission: the per-user and per-chat rate limits (every request counts, usage mistakes and
   /help included) and the in-flight bound per chat, before anything costly;
3. "typing…" (``port.working``) while the photos the command looks at are downloaded
   (``port.download``; bytes recorded in a :data:`Downloaded` map so indexing them afterwards
   fetches nothing again), the admin question asked when it matters, and the engine answers:
   /ask and /caption stream their growing answer to ``port.show_partial``, paced by
   ``stream_interval`` (platforms rate-limit edits); an answer that comes in one piece shows
   no partial at all;
4. after /index on|off, the chat's cached indexing flag is dropped so the change shows at once;
5. the reply goes to ``port.send``.

It passes the user's identity and admin rights to the engine (which enforces owner-or-admin
permissions), and turns every error a user can cause into a helpful reply: never silence,
never a traceback.

Metrics: every request is counted once in ``rapbot_requests_total{command, outcome}`` and timed
in ``rapbot_request_seconds{command}``, under its command's ``command`` word (``unknown`` when
the text did not parse); outcomes are ``ok``, ``user_error`` / ``internal_error`` (the error's
declared ``outcome``), ``rate_limited``, ``busy`` and ``timeout`` (the request's time limit, or
the adapter cancelling it at shutdown).

Photos posted in a chat without a command go to its search history when the chat's indexing
is on: :meth:`CommandCore.index_later` (in the background, reusing a command's download).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from bots.core import commands as c
from bots.core import replies
from bots.core.gateway import EngineGateway, answer_stream, growing_text
from bots.core.limits import InFlightLimiter, Limits, RateLimiter
from bots.core.messages import Reply
from bots.core.photo_indexing import Downloaded, PhotoIndexing
from bots.core.request import ChatPort, ChatRequest, PhotoRef, Sender
from engine.errors import RapbotError
from engine.permissions import Actor
from engine.types import Answer
from rapbot import metrics
from rapbot.logs import log_context

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Sorry, something went wrong on my side. Please try again in a minute."
TIMEOUT_TEXT = "That took too long, sorry. Please try again in a minute."
SEARCH_K = 10  # photos per /search reply (a Telegram album holds 10)
BUSY = "I'm still working on this chat's earlier requests; please try again in a moment."

OnPartial = Callable[[str], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class _Work:
    """A request once admitted: its command, the photos' bytes and the sender's rights."""

    request: ChatRequest
    images: tuple[bytes, ...]
    is_admin: bool

    @property
    def image(self) -> bytes | None:
        return self.images[0] if self.images else None


class CommandCore:
    def __init__(
        self,
        gateway: EngineGateway,
        platform_help: str = "",
        limits: Limits | None = None,
        stream_interval: float = 1.0,
        time_limit_s: float | None = None,
        photo_words: c.PhotoWords = c.PLAIN_WORDS,
    ) -> None:
        """``photo_words``: the surface's own words for how to give a command its photo (in
        /help, usage errors and the missing-photo reply)."""
        # Every Answer that comes back feeds rapbot_stage_seconds (its engine stage timings).
        self.gateway = metrics.observed_gateway(gateway)
        self.stream_interval = stream_interval  # seconds between partial answers
        self.platform_help = platform_help
        self.photo_words = photo_words
        self.time_limit_s = time_limit_s  # bounds each request (and so a graceful shutdown)
        self.limits = limits or Limits()
        self._user_rate = RateLimiter(self.limits.user_per_minute, self.limits.user_burst)
        self._chat_rate = RateLimiter(self.limits.chat_per_minute, self.limits.chat_burst)
        self._in_flight = InFlightLimiter(self.limits.in_flight_per_chat)
        self.indexing = PhotoIndexing(gateway)

    async def serve(
        self, request: ChatRequest, port: ChatPort, downloaded: Downloaded | None = None
    ) -> Reply | None:
        """Answer ``request`` through ``port`` (see the module notes); the reply sent, or None
        when the request is not for the bot to answer (a bot's). ``downloaded`` receives the
        photos fetched for the command (see :meth:`index_later`)."""
        if request.sender.is_bot:
            return None
        started = time.perf_counter()
        try:
            command: c.BaseCommand | None = (
                c.parse_command(request.command)
                if isinstance(request.command, str)
                else c.checked(request.command)
            )
            refused: RapbotError | None = None
        except c.CommandError as error:
            command, refused = None, error
        name = metrics.command_name(command)
        with log_context(scope=request.scope, command=name):
            try:
                reply, outcome = await asyncio.wait_for(
                    self._admit_and_run(command, refused, request, port, downloaded),
                    self.time_limit_s,
                )
            except asyncio.TimeoutError:
                log.warning("request timed out scope=%s", request.scope)
                reply, outcome = Reply(TIMEOUT_TEXT, error=True), "timeout"
            except asyncio.CancelledError:  # the adapter gave up on it (a shutdown)
                metrics.observe_request(name, "timeout", time.perf_counter() - started)
                raise
            metrics.observe_request(name, outcome, time.perf_counter() - started)
            if isinstance(command, c.Index):
                self.indexing.forget(request.scope)  # on or off, it shows at once
            await port.send(reply)
        return reply

    async def _admit_and_run(
        self,
        command: c.BaseCommand | None,
        refused: RapbotError | None,
        request: ChatRequest,
        port: ChatPort,
        downloaded: Downloaded | None,
    ) -> tuple[Reply, str]:
        """The reply and its metrics outcome."""
        scope = request.scope
        if self.limits.enabled:
            limited = self._rate_limited(scope, request.sender.id)
            if limited is not None:
                return limited, "rate_limited"
        if command is None:
            return Reply(self._said(refused), error=True), "user_error"
        if self.limits.enabled and not self._in_flight.try_enter(scope):
            return Reply(BUSY, error=True), "busy"
        try:
            if command.takes_photo and request.photo_error is not None:
                raise request.photo_error  # a PDF, a video...: said before any work
            async with port.working(command):
                work = await self._prepare(command, request, port, downloaded)
                reply = await self.dispatch(command, work, port.show_partial)
        except RapbotError as error:
            return Reply(self._said(error), error=True), metrics.error_outcome(error)
        except Exception:  # a bug or an outage: log it, tell the user something useful
            log.exception("command failed scope=%s", scope)
            return Reply(INTERNAL_ERROR, error=True), "internal_error"
        finally:
            if self.limits.enabled:
                self._in_flight.leave(scope)
        # An error reply from dispatch is the user's (no photo, nothing to search for...).
        return reply, "user_error" if reply.error else "ok"

    def _said(self, error: RapbotError) -> str:
        """An error as the user reads it; a usage in this surface's words for photos."""
        if isinstance(error, c.CommandError) and error.usage:
            return f"Usage: {c.usage(error.usage, self.photo_words)}"
        return str(error)

    async def _prepare(
        self,
        command: c.BaseCommand,
        request: ChatRequest,
        port: ChatPort,
        downloaded: Downloaded | None,
    ) -> _Work:
        """The photos the command looks at (an album only for /remember) and the sender's
        admin rights (asked of the platform only where they matter)."""
        images: tuple[bytes, ...] = ()
        if command.takes_photo:
            wanted = request.photos if isinstance(command, c.Remember) else request.photos[:1]
            images = tuple(
                await asyncio.gather(
                    *(
                        PhotoIndexing.fetch(
                            downloaded, photo, functools.partial(port.download, photo)
                        )
                        for photo in wanted
                    )
                )
            )
        is_admin = request.is_admin
        if is_admin is None:
            is_admin = await port.is_admin() if command.admin_matters else False
        return _Work(request, images, is_admin)

    # ------------------------------------------------------------------ posted photos

    def index_later(
        self,
        scope: str,
        sender: Sender,
        photo: PhotoRef,
        source: str,
        download: Callable[[PhotoRef], Awaitable[bytes]],
        downloaded: Downloaded | None = None,
    ) -> bool:
        """Add a photo posted in chat ``scope`` to its search history, in the background, when
        the chat's indexing is on (nothing is downloaded otherwise): with the bytes a command
        already fetched (``downloaded``), else ``download(photo)``. ``source`` is what the
        adapter needs to send the photo again from a search (its own form; see the port's
        ``send``). Bots' photos are never indexed. False when the photo is skipped."""
        if sender.is_bot:
            return False
        index = functools.partial(self.index_photo, scope, sender.id, source=source)
        return self.indexing.submit_photo(
            scope,
            photo,
            downloaded if downloaded is not None else {},
            functools.partial(download, photo),
            index,
        )

    async def index_photo(self, scope: str, user: str, image: bytes, *, source: str) -> int | None:
        """Index one posted photo now (when the chat's indexing is on: silently nothing
        otherwise). Never raises: a photo that cannot be indexed is logged by scope only."""
        try:
            return await self.gateway.index_photo(scope, image, user, source)
        except RapbotError as error:
            log.info("not indexed scope=%s: %s", scope, error)
        except Exception:
            log.exception("indexing failed scope=%s", scope)
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
        self, command: c.BaseCommand, work: _Work, on_partial: OnPartial | None = None
    ) -> Reply:
        request = work.request
        gateway, scope, user = self.gateway, request.scope, request.sender.id
        actor = Actor(user, work.is_admin)
        match command:
            case c.Help():
                return Reply(replies.help_text(self.platform_help, self.photo_words))
            case c.Remember(name, description):
                if not work.images:
                    return Reply(self.photo_words.missing, error=True)
                results = []
                for index, photo in enumerate(work.images):  # an album: every photo is an example
                    source = f"{request.message_id}#{index}" if request.message_id else None
                    results.append(
                        await gateway.remember(scope, photo, name, description, user, source=source)
                    )
                return Reply(replies.remembered(results[-1], created=results[0].created))
            case c.Who() | c.Caption():
                if work.image is None:
                    return Reply(self.photo_words.missing, error=True)
                if isinstance(command, c.Caption):
                    answer = await self._answer("caption", on_partial, scope, work.image, user)
                    return Reply(answer.text, concepts=answer.concepts)
                answer = await gateway.recognize(scope, work.image, user)
                return Reply(answer.text, answer.image, "who.jpg", answer.concepts)
            case c.Ask(question):
                answer = await self._answer("ask", on_partial, scope, work.image, question, user)
                image = answer.image if answer.concepts else None
                return Reply(answer.text, image, "answer.jpg", answer.concepts)
            case c.Concepts(page):
                sheet = await gateway.concept_sheet(scope, page)
                return Reply(
                    replies.concept_page(sheet, self.photo_words), sheet.image, "concepts.jpg"
                )
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
                if not text and work.image is None:
                    raise c.usage_error("search")
                hits = await gateway.search(scope, text, work.image, k=SEARCH_K)
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
