"""Micro-batching inside a worker: the generic batcher, then CLIP, the detector and the engine."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.batching import (
    BatcherClosedError,
    BatchingDetector,
    BatchingEmbedder,
    MicroBatcher,
)
from engine.models import close_batchers, with_micro_batching
from engine.types import Box, Detection

GENEROUS_S = 5.0  # "no multi-second stall" bound: loose on purpose, this is a shared 2-core box


def run_together(n: int, task):
    """``task(i)`` on ``n`` threads released at the same moment; results in index order."""
    barrier = threading.Barrier(n)

    def go(i: int):
        barrier.wait()
        return task(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


class Recorder:
    """A batch function that records the batches it was given."""

    def __init__(self, fn=lambda x: x * 10, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.fn = fn
        self.delay = delay

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [self.fn(item) for item in items]


# --- MicroBatcher -------------------------------------------------------------------------


def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    recorder = Recorder()
    with MicroBatcher(recorder, max_batch=8, max_wait_ms=300) as batcher:
        results = run_together(8, lambda i: batcher.run([i, 100 + i]))
    assert results == [[10 * i, 10 * (100 + i)] for i in range(8)]
    assert max(len(b) for b in recorder.batches) > 2, "callers were coalesced"
    assert all(len(b) <= 8 for b in recorder.batches)
    stats = batcher.stats()
    assert stats.items == 16 and stats.batches == len(recorder.batches)
    assert stats.max_size == max(len(b) for b in recorder.batches) and stats.mean_size > 2


def test_max_batch_is_respected_and_order_kept() -> None:
    recorder = Recorder()
    with MicroBatcher(recorder, max_batch=4, max_wait_ms=300) as batcher:
        started = time.monotonic()
        assert batcher.run(list(range(10))) == [10 * i for i in range(10)]
        # Full batches go at once; only the last partial one waits out max_wait.
        assert time.monotonic() - started < GENEROUS_S
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lone_caller_waits_at_most_about_max_wait() -> None:
    for wait_ms in (0.0, 20.0):
        with MicroBatcher(Recorder(), max_batch=16, max_wait_ms=wait_ms) as batcher:
            started = time.monotonic()
            assert batcher.run([1]) == [10]
            assert time.monotonic() - started < GENEROUS_S
            assert batcher.stats().max_size == 1


def test_only_same_key_items_share_a_batch() -> None:
    recorder = Recorder(fn=lambda item: item[0])
    with MicroBatcher(recorder, max_batch=16, max_wait_ms=200, key=lambda item: item[1]) as b:
        results = run_together(6, lambda i: b.run([(i, "ab"[i % 2])]))
    assert results == [[i] for i in range(6)]
    for batch in recorder.batches:
        assert len({key for _, key in batch}) == 1
    assert max(len(batch) for batch in recorder.batches) > 1


def test_a_bad_item_fails_only_its_own_caller() -> None:
    def fn(item: int) -> int:
        if item == 3:
            raise ValueError("bad item 3")
        return item * 10

    recorder = Recorder(fn=fn)
    with MicroBatcher(recorder, max_batch=8, max_wait_ms=300) as batcher:

        def call(i: int):
            try:
                return batcher.run([i])
            except ValueError as error:
                return str(error)

        results = run_together(6, call)
    assert results == [[0], [10], [20], "bad item 3", [40], [50]]
    stats = batcher.stats()
    assert stats.failed_items == 1 and stats.failed_batches >= 1


def test_a_failing_batch_reaches_exactly_its_callers() -> None:
    calls = []

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("device lost")  # the first batch only; retries and later succeed
        return items

    with MicroBatcher(fn, max_batch=2, max_wait_ms=1000) as batcher:
        first = batcher.submit_many([1, 2])
        second = batcher.submit_many([3, 4])
        assert [f.result(GENEROUS_S) for f in first + second] == [1, 2, 3, 4]
    assert calls == [[1, 2], [1], [2], [3, 4]], "retried one by one, other batch untouched"

    with (
        MicroBatcher(lambda items: [], max_batch=4, max_wait_ms=0) as batcher,
        pytest.raises(RuntimeError, match="gave 0 results for 1"),
    ):
        batcher.run([1])


def test_close_drains_then_refuses() -> None:
    recorder = Recorder(delay=0.05)
    batcher = MicroBatcher(recorder, max_batch=2, max_wait_ms=10_000)
    futures = batcher.submit_many([1, 2, 3])
    batcher.close()
    assert [f.result(0) for f in futures] == [10, 20, 30], "queued callers still get answers"
    assert not batcher._thread.is_alive() and batcher._thread.daemon
    with pytest.raises(BatcherClosedError):
        batcher.submit(4)
    batcher.close()  # twice is fine


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork only")
def test_a_forked_child_gets_its_own_batcher_thread() -> None:
    # A prefork pool forking after the models were loaded must not hang on the parent's thread.
    with MicroBatcher(Recorder(), max_batch=4, max_wait_ms=0) as batcher:
        assert batcher.run([1]) == [10]
        pid = os.fork()
        if pid == 0:  # the child: pure Python only, then leave without pytest's cleanup
            code = 1
            try:
                future = batcher.submit(2)
                code = 0 if future.result(GENEROUS_S) == 20 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert batcher.run([3]) == [30], "the parent's batcher still works"


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_wait_ms=-1)


# --- models ---------------------------------------------------------------------------------


def _photos(dreambooth: Path, n: int) -> list[Image.Image]:
    paths = sorted(dreambooth.glob("*/00.jpg"))[:n]
    return [Image.open(p).convert("RGB").resize((160, 120)) for p in paths]


@pytest.fixture
def batched_tiny(tiny_models):
    """The session's tiny models behind batchers (same weights) with a wait long enough that
    concurrent test threads reliably meet."""
    _, models = tiny_models
    wrapped = with_micro_batching(models, max_batch=8, max_wait_ms=300)
    yield models, wrapped
    close_batchers(wrapped)


def test_embedder_gives_the_same_vectors_in_each_callers_order(batched_tiny, dreambooth) -> None:
    plain, wrapped = batched_tiny
    embedder = wrapped.embedder
    assert isinstance(embedder, BatchingEmbedder)
    assert (embedder.model_id, embedder.dim) == (plain.embedder.model_id, plain.embedder.dim)
    assert embedder.has_vision and embedder.batch_size == plain.embedder.batch_size  # delegated

    photos = _photos(dreambooth, 8)
    asks = [[photos[i], photos[(i + 3) % 8]] for i in range(6)]  # each caller: its own order
    expected = [plain.embedder.embed_images(images) for images in asks]
    got = run_together(6, lambda i: embedder.embed_images(asks[i]))
    for mine, reference in zip(got, expected, strict=True):
        assert mine.shape == (2, 512) and mine.dtype == np.float32
        np.testing.assert_allclose(mine, reference, atol=1e-5)
    stats = embedder.stats()["images"]
    assert stats.max_size > 2 and stats.max_size <= 8

    texts = [["a grey cat"], ["Mochi", "a red backpack"], ["teapot"]]
    got_texts = run_together(3, lambda i: embedder.embed_texts(texts[i]))
    for mine, words in zip(got_texts, texts, strict=True):
        np.testing.assert_allclose(mine, plain.embedder.embed_texts(words), atol=1e-5)
    assert embedder.embed_images([]).shape == (0, 512)


class FakeDetector:
    """Records (vocabulary, batch size) per call; detects one box per image."""

    name = "fake"
    batch_size = 16

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], int]] = []

    def detect(self, images, vocabulary):
        self.calls.append((tuple(vocabulary), len(images)))
        return [[Detection(Box(0, 0, im.width, im.height), vocabulary[0], 0.9)] for im in images]


def test_detector_requests_are_grouped_by_vocabulary() -> None:
    fake = FakeDetector()
    detector = BatchingDetector(fake, max_batch=16, max_wait_ms=300)
    vocabularies = [["cat", "dog"], [" cat", "dog", "cat"], ["teapot"]]  # first two clean alike
    try:
        results = run_together(
            9, lambda i: detector.detect([Image.new("RGB", (10 + i, 10))], vocabularies[i % 3])
        )
    finally:
        detector.close()
    assert [r[0][0].box.x2 for r in results] == [10 + i for i in range(9)], "own result back"
    assert [r[0][0].label for r in results] == ["cat", "cat", "teapot"] * 3
    assert {vocabulary for vocabulary, _ in fake.calls} == {("cat", "dog"), ("teapot",)}
    assert max(size for _, size in fake.calls) > 1


def test_real_yolo_world_batched_equals_unbatched(batched_tiny, dreambooth) -> None:
    plain, wrapped = batched_tiny
    assert isinstance(wrapped.detector, BatchingDetector)
    assert wrapped.detector.batcher.max_batch == min(8, plain.detector.batch_size)
    photos = _photos(dreambooth, 3)
    vocabularies = [["cat", "dog", "person"], ["teapot", "vase"], ["cat", "dog", "person"]]
    asks = list(zip(photos, vocabularies, strict=True))
    expected = [plain.detector.detect([im], words)[0] for im, words in asks]
    got = run_together(3, lambda i: wrapped.detector.detect([asks[i][0]], asks[i][1])[0])
    for mine, reference in zip(got, expected, strict=True):
        assert [d.label for d in mine] == [d.label for d in reference]
        for a, b in zip(mine, reference, strict=True):
            np.testing.assert_allclose(a.box.as_list(), b.box.as_list(), atol=1.0)
            assert a.score == pytest.approx(b.score, abs=1e-3)


def test_a_detector_that_cannot_batch_is_left_alone(tmp_path) -> None:
    from engine.models import load_models
    from engine.settings import EngineSettings

    settings = EngineSettings(
        data_dir=tmp_path, profile="tiny", detector="none", micro_batching=True
    )
    models = load_models(settings, reuse=False)
    try:
        assert isinstance(models.embedder, BatchingEmbedder), "load_models wraps when enabled"
        assert not isinstance(models.detector, BatchingDetector), "batch 1: nothing to gain"
        assert models.embedder.stats()["images"].batches == 0
    finally:
        close_batchers(models)
    fixed = FakeDetector()
    fixed.batch_size = 1  # like the COCO .tflite export
    assert with_micro_batching(models, max_batch=16).detector is models.detector
    assert with_micro_batching(replace(models, detector=fixed)).detector is fixed


def test_engine_answers_are_the_same_with_micro_batching(tiny_models, dreambooth, tmp_path) -> None:
    from engine.engine import Engine
    from engine.store import open_store

    settings, plain = tiny_models
    wrapped = with_micro_batching(plain, max_batch=8, max_wait_ms=200)
    engines = []
    for name, models in (("off", plain), ("on", wrapped)):
        root = tmp_path / name
        store = open_store(root / "store", models.embedder.model_id, models.embedder.dim)
        engines.append(Engine(settings.model_copy(update={"data_dir": root}), models, store))
    off, on = engines
    subjects = ["cat", "dog", "backpack"]
    photos = [(dreambooth / s / "00.jpg").read_bytes() for s in subjects]
    try:
        for engine in engines:
            for subject, data in zip(subjects[:2], photos, strict=False):
                engine.remember("chat", data, subject.title(), user="alice")

        def summary(answer):
            return answer.text, [(r.name, r.box.as_list()) for r in answer.concepts]

        expected = [summary(off.recognize("chat", p, annotate=False)) for p in photos]
        got = run_together(3, lambda i: summary(on.recognize("chat", photos[i], annotate=False)))
        assert got == expected
        for (_, found), subject in zip(got[:2], subjects, strict=False):
            assert subject.title() in [name for name, _ in found], "a remembered photo is known"
        assert wrapped.embedder.stats()["images"].max_size > 1
    finally:
        for engine in engines:
            engine.close()
        close_batchers(wrapped)
