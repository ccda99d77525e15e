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
    """A token bucket per key: ``burst`` requests at once, refilled at ``per_minute``."""

    per_minute: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def acquire(self, key: str) -> float:
        """0.0 when the request may go ahead (and is counted), else seconds until it may."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        rate = self.per_minute / 60.0
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        if len(self._buckets) > 10_000:  # forget idle keys so memory stays bounded
            self._forget_full(now, rate)
        return (1.0 - bucket.tokens) / rate if rate > 0 else float("inf")

    def _forget_full(self, now: float, rate: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * rate >= self.burst:
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

    def is_full(self, key: str) -> bool:
        """Whether ``try_enter`` would refuse now (a check that enters nothing)."""
        return self._counts.get(key, 0) >= self.limit

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
