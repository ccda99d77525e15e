"""Photos travel by reference: a bot puts the bytes here and sends only the key in the task.

Task messages stay small (a broker is not a file store) and never carry platform URLs (a
Telegram file URL contains the bot token; Discord CDN links expire). Every blob has a TTL, so
a photo whose request was abandoned disappears on its own. Keys are random tokens: knowing the
broker's traffic does not let anyone guess another chat's photo key.

Two stores: :class:`RedisBlobStore` (``redis://...``, the default) and
:class:`FolderBlobStore` (``dir:/path``: bot and workers on one machine, no Redis for blobs).
Both also keep small expiring counters, which workers use to count a task's deliveries, and
expiring logs, through which a worker hands a bot the pieces of an answer as it is generated
(:mod:`workers.streams`).

The stores are synchronous; the async client calls them from its worker threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from engine.errors import EngineUnavailableError, PhotoExpiredError

EXPIRED = "The photo expired before the engine got to it; please send it again."
UNAVAILABLE = "The engine is busy or offline, try again in a minute."
_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_COUNTER = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
COUNTER_SWEEP_S = 86400  # counters are tiny; keep them well past any redelivery


def new_key() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits, URL- and file-name-safe


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _COUNTER.match(name):
        raise ValueError(f"bad counter or log name {name!r}")
    return name


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise PhotoExpiredError(EXPIRED)  # never a path: a key is only ever our own token
    return key


@runtime_checkable
class BlobStore(Protocol):
    ttl_s: int

    def put(self, data: bytes) -> str:
        """Store ``data`` for ``ttl_s`` seconds; returns its key."""

    def get(self, key: str) -> bytes:
        """The blob; :class:`PhotoExpiredError` when it is missing or expired."""

    def delete(self, key: str) -> None:
        """Remove the blob (no error when it is already gone)."""

    def take(self, key: str) -> bytes:
        """``get`` and ``delete`` in one step (one round trip for Redis)."""

    def incr(self, name: str, ttl_s: int) -> int:
        """Atomically add one to an expiring counter and return the new value."""

    def append(self, name: str, item: str, ttl_s: int) -> None:
        """Add ``item`` at the end of the expiring log ``name`` (a streamed answer's pieces)."""

    def read(self, name: str, cursor: str, timeout_s: float) -> tuple[list[str], str]:
        """The log's items after ``cursor`` (``""``: from the start) and the cursor after
        them; waits up to ``timeout_s`` for one when there is none yet."""

    def close(self) -> None: ...


class RedisBlobStore:
    """Blobs as Redis strings with a TTL (``SET ... EX``); the default."""

    prefix = "rapbot:blob:"
    counter_prefix = "rapbot:count:"
    log_prefix = "rapbot:log:"  # Redis streams (XADD / XREAD)

    def __init__(self, url: str, ttl_s: int = 900, *, connect_timeout_s: float = 3.0) -> None:
        import redis

        self.ttl_s = int(ttl_s)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        # Bounded socket timeouts: a Redis that vanishes must become an error, not a hang.
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=10.0
        )

    @contextlib.contextmanager
    def _guard(self):
        try:
            yield
        except self._errors:
            raise EngineUnavailableError(UNAVAILABLE) from None

    def put(self, data: bytes) -> str:
        key = new_key()
        with self._guard():
            self._redis.set(self.prefix + key, bytes(data), ex=self.ttl_s)
        return key

    def get(self, key: str) -> bytes:
        with self._guard():
            data = self._redis.get(self.prefix + _check_key(key))
        if data is None:
            raise PhotoExpiredError(EXPIRED)
        return data

    def delete(self, key: str) -> None:
        with contextlib.suppress(PhotoExpiredError), self._guard():
            self._redis.delete(self.prefix + _check_key(key))

    def take(self, key: str) -> bytes:
        with self._guard(), self._redis.pipeline() as pipe:
            pipe.get(self.prefix + _check_key(key))
            pipe.delete(self.prefix + key)
            data, _ = pipe.execute()
        if data is None:
            raise PhotoExpiredError(EXPIRED)
        return data

    def incr(self, name: str, ttl_s: int) -> int:
        _check_name(name)
        with self._guard(), self._redis.pipeline() as pipe:
            pipe.incr(self.counter_prefix + name)
            pipe.expire(self.counter_prefix + name, int(ttl_s))
            value, _ = pipe.execute()
        return int(value)

    def append(self, name: str, item: str, ttl_s: int) -> None:
        key = self.log_prefix + _check_name(name)
        with self._guard(), self._redis.pipeline() as pipe:
            pipe.xadd(key, {"item": item.encode("utf-8")})
            pipe.expire(key, int(ttl_s))
            pipe.execute()

    def read(self, name: str, cursor: str, timeout_s: float) -> tuple[list[str], str]:
        key = self.log_prefix + _check_name(name)
        block = int(timeout_s * 1000) or None  # XREAD BLOCK 0 would wait forever
        with self._guard():
            found = self._redis.xread({key: cursor or "0-0"}, count=1000, block=block)
        items = []
        for _key, entries in found:
            for entry_id, fields in entries:
                items.append(fields[b"item"].decode("utf-8"))
                cursor = entry_id.decode("ascii")
        return items, cursor

    def close(self) -> None:
        self._redis.close()


class FolderBlobStore:
    """Blobs as files in one folder (local mode); the TTL is checked against the file's mtime.

    Writes go to a temporary name and are renamed into place, so a reader never sees half a
    photo. Expired files are swept at most once per ``sweep_every_s`` during ``put``.
    """

    def __init__(self, root: str | Path, ttl_s: int = 900, *, sweep_every_s: float = 60.0) -> None:
        self.root = Path(root).expanduser()
        self.ttl_s = int(ttl_s)
        self.sweep_every_s = sweep_every_s
        self._blobs = self.root / "blobs"
        self._counters = self.root / "counters"
        self._logs = self.root / "logs"
        for folder in (self._blobs, self._counters, self._logs):
            folder.mkdir(parents=True, exist_ok=True)
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self._blobs / _check_key(key)

    def _expired(self, path: Path, ttl_s: float, now: float | None = None) -> bool:
        try:
            return (now or time.time()) - path.stat().st_mtime > ttl_s
        except FileNotFoundError:
            return True

    def put(self, data: bytes) -> str:
        key = new_key()
        path = self._path(key)
        tmp = path.with_name(f".{key}.tmp")
        with open(tmp, "wb") as f:
            f.write(bytes(data))
        os.replace(tmp, path)
        self._maybe_sweep()
        return key

    def get(self, key: str) -> bytes:
        path = self._path(key)
        if self._expired(path, self.ttl_s):
            raise PhotoExpiredError(EXPIRED)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise PhotoExpiredError(EXPIRED) from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(PhotoExpiredError, FileNotFoundError):
            self._path(key).unlink()

    def take(self, key: str) -> bytes:
        data = self.get(key)
        self.delete(key)
        return data

    def incr(self, name: str, ttl_s: int) -> int:
        _check_name(name)
        path = self._counters / name.replace(":", "_")
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released on close; works across processes
            f.seek(0)
            text = f.read().strip()
            stale = text == "" or self._expired(path, ttl_s)
            value = 1 if stale else int(text) + 1
            f.seek(0)
            f.truncate()
            f.write(str(value))
            f.flush()
        return value

    def append(self, name: str, item: str, ttl_s: int) -> None:
        # One JSON line per item; the lock keeps concurrent writers' lines whole.
        line = json.dumps(item) + "\n"
        with open(self._logs / _check_name(name).replace(":", "_"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)

    def read(self, name: str, cursor: str, timeout_s: float) -> tuple[list[str], str]:
        path = self._logs / _check_name(name).replace(":", "_")
        offset = int(cursor or 0)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                f.seek(offset)
                text = f.read()
                whole = text[: text.rfind(b"\n") + 1]  # a line still being written waits
                if whole:
                    items = [json.loads(line) for line in whole.decode("utf-8").splitlines()]
                    return items, str(offset + len(whole))
            if time.monotonic() >= deadline:
                return [], str(offset)
            time.sleep(0.02)

    def sweep(self, now: float | None = None) -> int:
        """Remove expired blobs, counters and leftover temporary files; returns how many."""
        now = now or time.time()
        removed = 0
        swept = (
            (self._blobs, self.ttl_s),
            (self._counters, COUNTER_SWEEP_S),
            (self._logs, self.ttl_s),
        )
        for folder, ttl in swept:
            for path in folder.iterdir():
                if self._expired(path, ttl, now):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
        return removed

    def _maybe_sweep(self) -> None:
        now = time.time()
        if now - self._last_sweep < self.sweep_every_s or not self._sweep_lock.acquire(False):
            return
        try:
            self._last_sweep = now
            self.sweep(now)
        finally:
            self._sweep_lock.release()

    def close(self) -> None:
        pass


def open_blob_store(url: str, ttl_s: int) -> BlobStore:
    """``redis://``/``rediss://``/``unix://`` → :class:`RedisBlobStore`; ``dir:PATH`` → folder."""
    if url.startswith("dir:"):
        return FolderBlobStore(url[len("dir:") :], ttl_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBlobStore(url, ttl_s)
    raise ValueError(f"RAPBOT_BLOB_URL must be redis://... or dir:/path, not {url!r}")
