"""The command core: one incoming chat message in, one reply out, for every adapter.

It parses the command, picks the photo, passes the user's identity and admin rights to the
engine (which enforces owner-or-admin permissions), and turns every error a user can cause
into a helpful reply: never silence, never a traceback.
"""

from __future__ import annotations

import logging

from bots.core import commands as c
from bots.core import replies
from bots.core.gateway import EngineGateway
from bots.core.limits import InFlightLimiter, Limits, RateLimiter
from bots.core.messages import IncomingMessage, Reply
from engine.errors import RapbotError
from engine.permissions import Actor

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Sorry, something went wrong on my side. Please try again in a minute."


class CommandCore:
    def __init__(
        self, gateway: EngineGateway, platform_help: str = "", limits: Limits | None = None
    ) -> None:
        self.gateway = gateway
        self.platform_help = platform_help
        self.limits = limits or Limits()
        self._user_rate = RateLimiter(self.limits.user_per_minute, self.limits.user_burst)
        self._chat_rate = RateLimiter(self.limits.chat_per_minute, self.limits.chat_burst)
        self._in_flight = InFlightLimiter(self.limits.in_flight_per_chat)

    async def handle(self, message: IncomingMessage) -> Reply | None:
        """The reply to one message, or None when the message is not for the bot to answer."""
        if message.from_bot:
            return None
        try:
            command = c.parse_command(message.text)
            if not self.limits.enabled:
                return await self.dispatch(command, message)
            if not isinstance(command, c.Help):
                limited = self._rate_limited(message)
                if limited is not None:
                    return limited
            if not self._in_flight.try_enter(message.scope):
                return Reply(
                    "I'm still working on this chat's earlier requests; "
                    "please try again in a moment.",
                    error=True,
                )
            try:
                return await self.dispatch(command, message)
            finally:
                self._in_flight.leave(message.scope)
        except RapbotError as error:
            return Reply(str(error), error=True)
        except Exception:  # a bug or an outage: log it, tell the user something useful
            log.exception("command failed scope=%s", message.scope)
            return Reply(INTERNAL_ERROR, error=True)

    def _rate_limited(self, message: IncomingMessage) -> Reply | None:
        wait = self._user_rate.acquire(f"{message.scope}/{message.user_id}")
        if wait == 0.0:
            wait = self._chat_rate.acquire(message.scope)
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

    async def dispatch(self, command: c.Command, message: IncomingMessage) -> Reply:
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
                    answer = await gateway.caption(scope, message.image, user)
                    return Reply(answer.text, concepts=answer.concepts)
                answer = await gateway.recognize(scope, message.image, user)
                return Reply(answer.text, answer.image, "who.jpg", answer.concepts)
            case c.Ask(question):
                answer = await gateway.ask(scope, message.image, question, user)
                image = answer.image if answer.concepts else None
                return Reply(answer.text, image, "answer.jpg", answer.concepts)
            case c.Concepts():
                return Reply(replies.concept_list(await gateway.list_concepts(scope)))
            case c.Rename(name, new_name):
                concept = await gateway.rename(scope, name, new_name, actor)
                return Reply(f"Renamed {name} to {concept.name}.")
            case c.Describe(name, description):
                concept = await gateway.describe(scope, name, description, actor)
                return Reply(
                    f"Updated: {concept.name} — {concept.description or 'no description'}."
                )
            case c.Forget(name):
                concept = await gateway.forget(scope, name, actor)
                return Reply(f"I've forgotten {concept.name} and all photos of them.")
            case c.ForgetMe():
                removed = await gateway.forget_user(user)
                return Reply(
                    f"Done: I've forgotten the {removed} concept{'s' if removed != 1 else ''} "
                    "you taught me, in every chat."
                )
            case c.Search() | c.Index():
                return Reply("Photo search is not available on this engine yet.", error=True)
        raise AssertionError(f"unhandled command {command!r}")
