"""Upkeep of the local photo index (issue 13.6): another process's change is caught up by id
and the deletion log instead of rebuilding the chat's index; trained IVF indexes are kept on
disk; cached chats are evicted least recently used first."""

from __future__ import annotations

import numpy as np
import pytest

import engine.store.photos as photos_module
from engine.store.photos import PhotoStore

DIM = 16


def _rows(seed: int, n: int, prefix: str):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        (v, b"jpg", "alice" if i % 2 else "bob", float(i), f"{prefix}{i}")
        for i, v in enumerate(vectors)
    ]


@pytest.fixture
def builds(monkeypatch):
    """Counts full index builds (the k-means of an IVF index, or a flat scan of every row)."""
    calls = []
    real = photos_module.build_index

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(photos_module, "build_index", counting)
    return calls


def _sources(store, scope, vector, k=500):
    return sorted(h.source for h in store.search(scope, vector, k))


def test_a_foreign_change_is_caught_up_by_id_not_rebuilt(tmp_path, builds) -> None:
    rows = _rows(0, 300, "p")
    here, there = PhotoStore(tmp_path, "m", DIM), PhotoStore(tmp_path, "m", DIM)
    try:
        here.add_many("A", rows)
        query = rows[0][0]
        assert len(_sources(here, "A", query)) == 300 and builds == [300]
        there.add_many("A", _rows(1, 5, "new"))  # another process: adds, deletes, replaces
        there.delete_user("bob")
        there.add("A", rows[1][0], b"jpg", "carol", None, "late")
        expected = sorted([r[4] for r in rows if r[2] == "alice"] + ["new1", "new3", "late"])
        assert _sources(here, "A", query) == expected
        assert builds == [300]  # caught up, no rebuild
        there.delete_scope("A")
        assert _sources(here, "A", query) == [] and builds == [300]
        there.replace_scope("A", rows[:3])
        assert _sources(here, "A", query) == ["p0", "p1", "p2"] and builds == [300]
        assert _sources(there, "A", query) == ["p0", "p1", "p2"]
    finally:
        here.close()
        there.close()


def test_a_pruned_deletion_log_or_a_reembed_rebuilds(tmp_path, builds, monkeypatch) -> None:
    monkeypatch.setattr(photos_module, "DELETION_LOG_KEEP", 4)
    rows = _rows(2, 40, "p")
    here, there = PhotoStore(tmp_path, "m", DIM), PhotoStore(tmp_path, "m", DIM)
    try:
        here.add_many("A", rows)
        query = rows[0][0]
        _sources(here, "A", query)
        for source in ("p1", "p3", "p5", "p7", "p9", "p11"):  # more deletions than the log keeps
            there.replace_scope("A", [r for r in rows if r[4] != source][:30])
        assert _sources(here, "A", query) == _sources(there, "A", query)
        assert len(builds) >= 2  # its version fell below the floor: rebuilt, still right
        count = len(builds)
        there.reembed(lambda thumbs: np.stack([rows[0][0]] * len(thumbs)))
        hits = here.search("A", rows[0][0], 3)
        assert len(builds) > count and hits[0].score == pytest.approx(1.0)  # the new vectors
    finally:
        here.close()
        there.close()


def test_trained_ivf_indexes_are_kept_on_disk(tmp_path, builds) -> None:
    rows = _rows(3, 400, "p")
    first = PhotoStore(tmp_path, "m", DIM, ivf_threshold=100)
    try:
        first.add_many("A", rows)
        assert first.index_kind("A") == "ivf" and builds == [400]
        before = [h.source for h in first.search("A", rows[5][0], 10)]
    finally:
        first.close()
    writer = PhotoStore(tmp_path, "m", DIM, ivf_threshold=100)
    writer.add("A", rows[7][0], b"jpg", "dan", None, "after-save")  # a change since the file
    writer.close()
    second = PhotoStore(tmp_path, "m", DIM, ivf_threshold=100)  # a new process
    try:
        assert second.index_kind("A") == "ivf"
        assert builds == [400]  # loaded, no k-means; the later photo caught up by id
        assert [h.source for h in second.search("A", rows[5][0], 10)] == before
        assert "after-save" in {h.source for h in second.search("A", rows[7][0], 3)}
    finally:
        second.close()


def test_cached_chats_are_evicted_least_recently_used(tmp_path) -> None:
    store = PhotoStore(tmp_path, "m", DIM, max_cached_scopes=2)
    try:
        for scope in ("A", "B", "C"):
            store.add_many(scope, _rows(4, 10, scope))
            store.search(scope, _rows(4, 1, "q")[0][0], 1)
        assert list(store._cache) == ["B", "C"]
        store.search("B", _rows(4, 1, "q")[0][0], 1)
        store.search("A", _rows(4, 1, "q")[0][0], 1)
        assert list(store._cache) == ["B", "A"]
        assert [h.source for h in store.search("C", _rows(4, 1, "q")[0][0], 1)] == ["C0"]
    finally:
        store.close()


def test_a_build_does_not_hold_up_other_chats(tmp_path, monkeypatch) -> None:
    """While one chat's index is being built, another chat's search is answered."""
    import threading

    store = PhotoStore(tmp_path, "m", DIM)
    try:
        store.add_many("A", _rows(5, 50, "a"))
        store.add_many("B", _rows(6, 5, "b"))
        query = _rows(6, 1, "q")[0][0]
        store.search("B", query, 1)  # B cached; A not yet
        started, release = threading.Event(), threading.Event()
        real = photos_module.build_index

        def slow_build(*args, **kwargs):
            started.set()
            assert release.wait(10)
            return real(*args, **kwargs)

        monkeypatch.setattr(photos_module, "build_index", slow_build)
        result = {}
        building = threading.Thread(target=lambda: result.update(a=store.search("A", query, 3)))
        building.start()
        assert started.wait(10)
        assert [h.source for h in store.search("B", query, 5)]  # answered mid-build
        store.add("B", query, b"jpg", "carol", None, "b-new")  # writes too
        release.set()
        building.join(10)
        assert len(result["a"]) == 3
    finally:
        store.close()
