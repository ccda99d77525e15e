"""Micro-batching inside one worker process: concurrent requests share model forwards.

A distributed-mode GPU worker runs one engine per process and serves many requests on threads.
Each request asks for a few CLIP embeddings and one detection; run one by one, the GPU sees
batches of 1-5. :class:`MicroBatcher` coalesces what the threads ask for into one call of a
batch function, waiting at most ``max_wait_ms`` for company and never taking more than
``max_batch`` items. :class:`BatchingEmbedder` and :class:`BatchingDetector` put it in front of
the CLIP embedder and the detector with their interfaces unchanged, so the engine does not know.

Callers block on a :class:`concurrent.futures.Future`; one daemon thread per batcher runs the
batches, which also means that thread is the only one running that model's forwards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from engine.detector import Detector, NullDetector, YoloDetector, clean_vocabulary
from engine.types import Detection

if TYPE_CHECKING:
    from PIL import Image


log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosedError(RuntimeError):
    """Raised to a caller that submits to a batcher after :meth:`MicroBatcher.close`."""


@dataclass(frozen=True)
class BatchStats:
    """A snapshot of a batcher's counters (cumulative since it started)."""

    batches: int = 0  # calls of the batch function, retries of single items included
    items: int = 0  # items that went through a batch
    max_size: int = 0  # the largest batch run
    failed_batches: int = 0  # batches whose function raised (then retried one by one)
    failed_items: int = 0  # items whose future got an exception
    wait_seconds: float = 0.0  # sum over items of the time from submit to their batch's start

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class _Pending(Generic[T, R]):
    item: T
    key: Hashable
    future: Future[R]
    submitted: float


class MicroBatcher(Generic[T, R]):
    """Runs ``batch_fn(items) -> results`` (one result per item, same order) on queued items.

    The worker thread takes the oldest pending item and, with it, up to ``max_batch`` pending
    items of the same ``key`` (only same-key items can share a forward, e.g. one YOLO-World
    vocabulary), first waiting until ``max_wait_ms`` after the oldest item's submission or until
    ``max_batch`` such items are there, whichever comes first. Items keep FIFO order.

    When a batch of several items fails, each item is retried alone, so one bad item fails only
    its own caller; an exception reaches exactly the callers of the items it belongs to.
    """

    def __init__(
        self,
        batch_fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        key: Callable[[T], Hashable] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, not {max_wait_ms}")
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self._batch_fn = batch_fn
        self._key = key
        self._closed = False
        self._stats = BatchStats()
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """A fresh queue and locks, no thread yet (started by the first submit): at creation and
        in a forked child, where threads do not survive and the parent's locks may be held."""
        self._pending: list[_Pending[T, R]] = []
        self._counts: dict[Hashable, int] = {}  # pending items per key: O(1) "batch is full?"
        self._cond = threading.Condition()
        self._stats_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ callers

    def submit(self, item: T) -> Future[R]:
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[T]) -> list[Future[R]]:
        """Queue ``items`` together (so they tend to share a batch); one future per item."""
        now = time.monotonic()
        entries = [
            _Pending(item, self._key(item) if self._key else None, Future(), now) for item in items
        ]
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"{self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"rapbot-{self.name}", daemon=True
                )
                self._thread.start()
            for entry in entries:
                self._pending.append(entry)
                self._counts[entry.key] = self._counts.get(entry.key, 0) + 1
            self._cond.notify()
        return [entry.future for entry in entries]

    def run(self, items: Sequence[T]) -> list[R]:
        """Submit ``items`` and wait for their results; raises the first item's exception."""
        return [future.result() for future in self.submit_many(items)]

    def stats(self) -> BatchStats:
        with self._stats_lock:
            return self._stats

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new items, finish the queued ones (their callers still get answers), stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> MicroBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ worker

    def _loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                try:
                    self._run(batch)
                except BaseException as error:  # never leave a caller blocked forever
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_exception(error)
                    if not isinstance(error, Exception):
                        raise
        finally:
            # Normally nothing is left; if this thread dies, no caller may wait on it forever.
            with self._cond:
                self._closed = True
                left, self._pending = self._pending, []
                self._counts.clear()
            for entry in left:
                if entry.future.set_running_or_notify_cancel():
                    entry.future.set_exception(BatcherClosedError(f"{self.name} stopped"))

    def _next_batch(self) -> list[_Pending[T, R]] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()  # no timeout: a submit or close() wakes us
            head = self._pending[0]
            deadline = head.submitted + self.max_wait
            # Wait for company, unless closing (drain now) or the batch is already full.
            while not self._closed and self._counts[head.key] < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rest = [], []
            for entry in self._pending:
                if entry.key == head.key and len(batch) < self.max_batch:
                    batch.append(entry)
                else:
                    rest.append(entry)
            self._pending = rest
            left = self._counts[head.key] - len(batch)
            if left:
                self._counts[head.key] = left
            else:
                del self._counts[head.key]
        # A caller may have cancelled its future; those items are dropped, never run.
        return [entry for entry in batch if entry.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[_Pending[T, R]]) -> None:
        if not batch:
            return
        started = time.monotonic()
        waited = sum(started - entry.submitted for entry in batch)
        try:
            results = self._call([entry.item for entry in batch])
        except Exception as error:
            if len(batch) == 1:
                self._record(1, waited, failed_batch=True, failed_items=1)
                batch[0].future.set_exception(error)
                return
            log.warning(
                "%s: a batch of %d failed (%s); retrying its items one by one",
                self.name,
                len(batch),
                error,
            )
            self._record(len(batch), waited, failed_batch=True, count_items=False)
            for entry in batch:
                try:
                    result = self._call([entry.item])[0]
                except Exception as item_error:
                    self._record(1, 0.0, failed_items=1)
                    entry.future.set_exception(item_error)
                else:
                    self._record(1, 0.0)
                    entry.future.set_result(result)
            return
        self._record(len(batch), waited)
        for entry, result in zip(batch, results, strict=True):
            entry.future.set_result(result)

    def _call(self, items: list[T]) -> Sequence[R]:
        results = self._batch_fn(items)
        if len(results) != len(items):
            raise RuntimeError(
                f"{self.name}: the batch function gave {len(results)} results for {len(items)}"
            )
        return results

    def _record(
        self,
        size: int,
        waited: float,
        *,
        failed_batch: bool = False,
        failed_items: int = 0,
        count_items: bool = True,
    ) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = replace(
                s,
                batches=s.batches + 1,
                items=s.items + (size if count_items else 0),
                max_size=max(s.max_size, size),
                failed_batches=s.failed_batches + int(failed_batch),
                failed_items=s.failed_items + failed_items,
                wait_seconds=s.wait_seconds + waited,
            )


_live: weakref.WeakSet[MicroBatcher] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # A prefork pool that forks after the models were loaded: each child gets its own threads.
    for batcher in list(_live):
        batcher._reset()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reset_after_fork)


# ---------------------------------------------------------------------------------- models


class BatchingEmbedder:
    """A :class:`engine.embedder.ClipEmbedder` whose ``embed_images``/``embed_texts`` calls from
    concurrent threads are coalesced; every other attribute is the wrapped embedder's."""

    def __init__(self, embedder: Any, *, max_batch: int = 16, max_wait_ms: float = 5.0) -> None:
        self.inner = embedder
        self.images = MicroBatcher[Any, np.ndarray](
            self._embed_images, max_batch=max_batch, max_wait_ms=max_wait_ms, name="clip-images"
        )
        self.texts = MicroBatcher[str, np.ndarray](
            self._embed_texts, max_batch=max_batch, max_wait_ms=max_wait_ms, name="clip-texts"
        )

    def __repr__(self) -> str:
        return f"BatchingEmbedder({self.inner!r}, max_batch={self.images.max_batch})"

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found here: model, device, batch_size, has_vision ...
        if name == "inner":  # not set yet (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._stack(self.images.run(list(images)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._stack(self.texts.run(list(texts)))

    def stats(self) -> dict[str, BatchStats]:
        return {"images": self.images.stats(), "texts": self.texts.stats()}

    def close(self) -> None:
        self.images.close()
        self.texts.close()

    def _embed_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        return list(self.inner.embed_images(images))

    def _embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.inner.embed_texts(texts))

    def _stack(self, rows: list[np.ndarray]) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


_DetectItem = tuple["Image.Image", tuple[str, ...]]


class BatchingDetector:
    """A :class:`engine.detector.Detector` whose concurrent ``detect`` calls share forwards.

    Only requests with the same (cleaned) vocabulary share a forward: YOLO-World's class
    embeddings are installed per vocabulary. Detectors with fixed classes ignore the vocabulary,
    so for them every request can share.
    """

    def __init__(
        self, detector: Detector, *, max_batch: int = 16, max_wait_ms: float = 5.0
    ) -> None:
        self.inner = detector
        self.name = detector.name
        self.uses_vocabulary = not isinstance(detector, (YoloDetector, NullDetector))
        self.batcher = MicroBatcher[_DetectItem, list[Detection]](
            self._detect,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            key=lambda item: item[1],
            name="detector",
        )

    def __repr__(self) -> str:
        return f"BatchingDetector({self.name!r}, max_batch={self.batcher.max_batch})"

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def detect(
        self, images: Sequence[Image.Image], vocabulary: Sequence[str]
    ) -> list[list[Detection]]:
        words = clean_vocabulary(vocabulary) if self.uses_vocabulary else ()
        return self.batcher.run([(image, words) for image in images])

    def stats(self) -> BatchStats:
        return self.batcher.stats()

    def close(self) -> None:
        self.batcher.close()

    def _detect(self, items: list[_DetectItem]) -> list[list[Detection]]:
        return self.inner.detect([image for image, _ in items], items[0][1])


def detector_batch_limit(detector: Detector, max_batch: int) -> int:
    """The detector's own batch size caps ours: exports such as the COCO ``.tflite`` take 1."""
    if isinstance(detector, NullDetector):
        return 1  # nothing to compute: batching would only add the wait
    own = getattr(detector, "batch_size", None)
    return min(max_batch, own) if isinstance(own, int) and own > 0 else max_batch
