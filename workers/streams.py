"""Streamed answers across workers: the pieces of an answer reach the bot as they are generated.

A ``<name>_stream`` task (``ask_stream``, ``caption_stream``) runs the engine's generator and
appends its text to an expiring log named after the task id in the blob store (a Redis stream,
or a file for ``dir:`` stores); the bot reads that log while it waits for the task's result,
which still arrives through the result backend as every result does. A log entry is
``[offset, text]``: where the text starts in the answer. A task run again after its worker died
appends the answer from the start once more; the offsets let the reader skip what it has
already shown (generation is deterministic), so a redelivery shows no repeated text.

Pieces are batched for ``interval_s`` (the LLM yields a token at a time; chat platforms show an
edit a second at most), so a long answer costs a few dozen appends, not one per token.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from engine.errors import RapbotError
from workers.blobs import BlobStore

log = logging.getLogger(__name__)
PUBLISH_INTERVAL_S = 0.1


def log_name(task_id: str) -> str:
    return f"stream:{task_id}"


class PiecePublisher:
    """The worker's side: collects text pieces and appends them every ``interval_s``."""

    def __init__(
        self,
        blobs: BlobStore,
        task_id: str | None,
        *,
        enabled: bool = True,
        interval_s: float = PUBLISH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.blobs, self.interval_s, self._clock = blobs, interval_s, clock
        self.name = log_name(task_id or "eager")
        self.enabled = enabled and task_id is not None
        self.offset = 0  # characters appended so far
        self._pending: list[str] = []
        self._last = clock()

    def add(self, piece: str) -> None:
        self._pending.append(piece)
        if self._clock() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        text = "".join(self._pending)
        self._pending.clear()
        self._last = self._clock()
        if not text or not self.enabled:
            return
        try:
            self.blobs.append(self.name, json.dumps([self.offset, text]), self.blobs.ttl_s)
        except RapbotError as error:  # the answer still arrives whole, with the result
            log.warning("streamed pieces not published (%s): %s", self.name, error)
            self.enabled = False
        self.offset += len(text)


class PieceReader:
    """The bot's side: the new text of the task's log, without what was shown already."""

    def __init__(self, blobs: BlobStore, task_id: str) -> None:
        self.blobs, self.name = blobs, log_name(task_id)
        self.cursor = ""
        self.shown = 0  # characters handed out so far

    def read(self, timeout_s: float) -> str:
        """The text appended since the last read (waits up to ``timeout_s`` for some)."""
        entries, self.cursor = self.blobs.read(self.name, self.cursor, timeout_s)
        new: list[str] = []
        for entry in entries:
            offset, text = json.loads(entry)
            fresh = text[max(0, self.shown - int(offset)) :]
            if int(offset) <= self.shown and fresh:  # contiguous with what was shown
                new.append(fresh)
                self.shown += len(fresh)
        return "".join(new)
