"""Fairness limits of the command core: per-user and per-chat rates, and work in flight per chat.

A busy group must not starve other chats of the engine, and one user must not flood a chat:
both get a friendly reply that says when to try again, instead of silence or a queue that
grows without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per key: ``burst`` requests at once, refilled at ``per_minute``.

    Memory stays bounded however many keys are seen (every user of every chat is one): the
    buckets are kept in last-use order, and once there are more than ``max_keys`` the idle
    ones (full again, so forgetting them changes nothing) are dropped; if most are still busy,
    the least recently used are dropped too, down to half of ``max_keys`` (a flood of that
    many distinct users within one refill time; a dropped user gets a fresh burst)."""

    per_minute: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 10_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def acquire(self, key: str) -> float:
        """0.0 when the request may go ahead (and is counted), else seconds until it may."""
        now = self.clock()
        rate = self.per_minute / 60.0
        bucket = self._buckets.pop(key, None)  # re-inserted last: the dict is in last-use order
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        self._buckets[key] = bucket
        if len(self._buckets) > self.max_keys:
            self._prune(now, rate)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate if rate > 0 else float("inf")

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float, rate: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * rate >= self.burst:
                del self._buckets[key]  # idle: as good as new
        if len(self._buckets) > self.max_keys * 3 // 4:  # amortised: half the room is free
            for key in list(self._buckets)[: len(self._buckets) - self.max_keys // 2]:
                del self._buckets[key]


@dataclass
class InFlightLimiter:
    """At most ``limit`` requests of one chat are with the engine at a time."""

    limit: int
    _counts: dict[str, int] = field(default_factory=dict)

    def try_enter(self, key: str) -> bool:
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def leave(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)


@dataclass(frozen=True)
class Limits:
    """The core's limits; defaults suit a group chat (generous for people, firm for floods)."""

    user_per_minute: float = 12.0
    user_burst: int = 5
    chat_per_minute: float = 40.0
    chat_burst: int = 15
    in_flight_per_chat: int = 4
    enabled: bool = True  # off for the single-user terminal chat

    @classmethod
    def from_settings(cls, settings) -> Limits:
        """The limits of a :class:`rapbot.settings.Settings` (``RAPBOT_USER_PER_MINUTE`` ...)."""
        return cls(
            user_per_minute=settings.user_per_minute,
            user_burst=settings.user_burst,
            chat_per_minute=settings.chat_per_minute,
            chat_burst=settings.chat_burst,
            in_flight_per_chat=settings.in_flight_per_chat,
        )
