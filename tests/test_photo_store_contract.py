"""One contract for the photo stores (issue 13.5): FAISS + SQLite (local mode) and Qdrant
(distributed mode; tested in qdrant-client's in-process mode, the same code talks to a server).
Every test runs over both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from qdrant_client import QdrantClient

from engine.composition import normalize
from engine.errors import InvalidInputError, MissingWeightError, StoreError
from engine.store.photos import PhotoStore
from engine.store.qdrant_photos import QdrantPhotoStore

DIM = 8


def _unit(seed: int, dim: int = DIM) -> np.ndarray:
    return normalize(np.random.default_rng(seed).standard_normal(dim))


@pytest.fixture(params=["faiss", "qdrant"])
def opener(request, tmp_path) -> Callable[..., object]:
    """``opener(model_id, dim, strict=True)``: a store over the same backing each call (a new
    process for FAISS's folder; a new worker on the same Qdrant)."""
    opened: list = []
    if request.param == "faiss":

        def open_store(model_id="test-model", dim=DIM, strict=True):
            store = PhotoStore(tmp_path, model_id, dim, strict=strict)
            opened.append(store)
            return store

        def unresolved(error):
            return PhotoStore.unresolved(tmp_path, error)
    else:
        client = QdrantClient(":memory:")

        def open_store(model_id="test-model", dim=DIM, strict=True):
            store = QdrantPhotoStore(client, model_id, dim, strict=strict)
            opened.append(store)
            return store

        def unresolved(error):
            return QdrantPhotoStore.unresolved(client, error)

    open_store.unresolved = unresolved
    yield open_store
    for store in opened:
        store.close()


def test_scopes_idempotence_search_and_deletion(opener) -> None:
    v = [_unit(i) for i in range(4)]
    store = opener()
    a0 = store.add("A", v[0], b"jpg0", "alice", 1.0, "a0")
    assert store.add("A", v[0], b"jpg0", "alice", 1.0, "a0") == a0  # idempotent by source
    a1 = store.add("A", v[1], b"jpg1", "bob", 2.0, "a1")
    store.add("B", v[0], b"jpgb", "alice", 3.0, "b0")  # the same vector in another chat
    assert (store.count("A"), store.count("B"), store.count("C")) == (2, 1, 0)
    assert store.total() == 3 and store.total("A") == 2
    hits = store.search("A", v[0], 10)
    assert [h.source for h in hits] == ["a0", "a1"] and hits[0].score == pytest.approx(1.0)
    assert hits[0].photo_id == a0 and hits[1].photo_id == a1
    assert [h.source for h in store.search("B", v[1], 10)] == ["b0"]
    assert store.search("C", v[0], 3) == []
    assert store.thumbnail("A", a1) == b"jpg1"
    assert store.thumbnail("B", a1) is None  # an id alone never crosses chats
    assert store.scopes() == ["A", "B"]
    assert store.delete_user("alice") == 2
    assert [h.source for h in store.search("A", v[0], 10)] == ["a1"]
    assert store.count("B") == 0 and store.scopes() == ["A"]
    assert store.delete_scope("A") == 1 and store.count("A") == 0
    store.add("A", v[2], b"jpg2", "carol", None, "a2")
    again = opener()  # another process / worker sees it
    assert [h.source for h in again.search("A", v[2], 1)] == ["a2"]


def test_candidates_are_the_union_of_each_query_top_with_vectors(opener) -> None:
    v = [_unit(i) for i in range(6)]
    store = opener()
    ids = [store.add("A", v[i], b"j", "alice", None, f"s{i}") for i in range(6)]
    store.add("B", v[0], b"j", "alice", None, "other")
    found = store.candidates("A", np.stack([v[0], v[3]]), 1)
    assert sorted(found.ids.tolist()) == sorted([ids[0], ids[3]])
    for photo_id, vector in zip(found.ids.tolist(), found.vectors, strict=True):
        source = found.sources[photo_id]
        assert np.allclose(vector, v[int(source[1:])], atol=1e-6)
    everything = store.candidates("A", np.stack([v[0], v[1]]), 100)
    assert len(everything.ids) == 6  # the scope only
    assert len(store.candidates("C", v[0], 5).ids) == 0


def test_adds_that_require_indexing_check_the_flag(opener) -> None:
    v = [_unit(i) for i in range(3)]
    store = opener()
    assert store.add("A", v[0], b"j", "alice", 1.0, "a0", require_indexing=True) is None
    rows = [(x, b"j", "alice", 1.0, f"m{i}") for i, x in enumerate(v)]
    assert store.add_many("A", rows, require_indexing=True) == 0
    assert store.count("A") == 0 and not store.indexing("A")
    store.set_indexing("A", True)
    assert store.indexing("A") and not store.indexing("B")
    assert opener().indexing("A")  # shared with every process / worker
    kept = store.add("A", v[0], b"j", "alice", 1.0, "a0", require_indexing=True)
    assert kept is not None and store.count("A") == 1
    store.set_indexing("A", False)
    assert store.add("A", v[1], b"j", "alice", 1.0, "a1", require_indexing=True) is None
    assert store.add("A", v[0], b"j", "alice", 1.0, "a0", require_indexing=True) is None
    assert store.add("A", v[1], b"j", "alice", 1.0, "a1") is not None  # forced
    assert store.add_many("A", rows) == 3 and store.count("A") == 5
    store.set_indexing("C", True)
    assert store.scopes() == ["A", "C"]  # indexing on, no photos yet: a backup keeps the flag


def test_rows_replace_scope_and_recorded_model(opener) -> None:
    v = [_unit(i) for i in range(4)]
    store = opener()
    assert store.recorded_model() in {("", 0), ("test-model", DIM)}
    store.add("A", v[0], b"t0", "alice", 5.0, "a0")
    store.add("A", v[1], b"t1", "bob", 6.0, "a1")
    assert store.recorded_model() == ("test-model", DIM)
    rows = sorted(store.rows("A", batch_size=1), key=lambda r: r.source)
    assert [(r.source, r.poster, r.posted_at, r.thumbnail) for r in rows] == [
        ("a0", "alice", 5.0, b"t0"),
        ("a1", "bob", 6.0, b"t1"),
    ]
    assert np.allclose(rows[1].embedding, v[1], atol=1e-6)
    held = store.replace_scope("A", [(v[2], b"t2", "carol", 7.0, "a2")], indexing=True)
    assert held == 1 and [r.source for r in store.rows("A")] == ["a2"] and store.indexing("A")
    with pytest.raises(InvalidInputError):  # a bad row: nothing changes
        store.replace_scope("A", [(v[3], b"t3", "dan", 8.0, "a3"), (np.ones(3), b"", "x", 0, "b")])
    assert [r.source for r in store.rows("A")] == ["a2"]
    assert store.replace_scope("A", []) == 0 and store.count("A") == 0


def test_another_encoder_is_refused_until_reembedded(opener) -> None:
    v = [_unit(i) for i in range(3)]
    store = opener()
    store.add("A", v[0], b"t0", "alice", 1.0, "a0")
    store.add("A", v[1], b"t1", "bob", 1.0, "a1")
    store.set_indexing("A", True)
    with pytest.raises(StoreError):
        opener("other-model", 4)
    other = opener("other-model", 4, strict=False)
    assert other.mismatch and "rapbot index --rebuild" in other.mismatch
    with pytest.raises(StoreError):
        other.search("A", _unit(0, 4), 1)
    with pytest.raises(StoreError):
        other.add("A", _unit(0, 4), b"t", "carol", None, "new")
    assert other.indexing("A") and other.count("A") == 2  # flags and counts still work
    assert other.recorded_model() == ("test-model", DIM)  # exports say what made the vectors
    assert other.delete_user("bob") == 1  # deletions always work
    embedded: list[bytes] = []

    def embed(thumbs: list[bytes]) -> np.ndarray:
        embedded.extend(thumbs)
        return np.stack([_unit(len(t), 4) for t in thumbs])

    assert other.reembed(embed, batch_size=1) == 1 and embedded == [b"t0"]
    assert other.mismatch is None and other.recorded_model() == ("other-model", 4)
    assert [h.source for h in other.search("A", _unit(2, 4), 5)] == ["a0"]
    assert other.indexing("A")


def test_an_unresolved_encoder_still_forgets(opener) -> None:
    store = opener()
    store.add("A", _unit(0), b"t0", "alice", 1.0, "a0")
    store.set_indexing("A", True)
    error = MissingWeightError("RAPBOT_SEARCH_MODEL is not a trained folder")
    blind = opener.unresolved(error)
    assert blind.indexing("A") and blind.count("A") == 1
    with pytest.raises(MissingWeightError):
        blind.search("A", _unit(0), 1)
    with pytest.raises(MissingWeightError):
        blind.reembed(lambda thumbs: np.zeros((len(thumbs), DIM)))
    assert blind.delete_user("alice") == 1 and store.count("A") == 0


def test_two_engines_over_one_qdrant_share_the_photo_history(tiny_models, tmp_path, dreambooth):
    """Done-when of issue 13.5: two workers with separate data folders over one Qdrant (here one
    in-process client) give the same /search results; a photo indexed through one is found
    and forgotten through the other."""
    from engine.engine import Engine
    from engine.permissions import Actor
    from engine.store.qdrant_store import QdrantConceptStore

    settings, models = tiny_models
    client = QdrantClient(":memory:")
    engines = []
    for name in ("worker-a", "worker-b"):
        folder = tmp_path / name
        worker = settings.model_copy(update={"data_dir": folder, "store": "qdrant"})
        store = QdrantConceptStore(
            client, models.embedder.model_id, models.embedder.dim, owns_client=False
        )
        engines.append(Engine(worker, models, store))
    a, b = engines

    async def core_search(engine, text):
        from bots.core.gateway import LocalGateway
        from bots.core.request import ChatRequest, CollectingPort, Sender
        from bots.core.serve import CommandCore

        request = ChatRequest("tg:1", Sender("bob"), f"/search {text}")
        return await CommandCore(LocalGateway(engine)).serve(request, CollectingPort())

    try:
        a.set_indexing("chat", True, Actor("admin", is_admin=True))
        assert b.indexing("chat")
        paths = [dreambooth / s / "00.jpg" for s in ("dog", "cat", "teapot", "backpack")]
        for path in paths[:3]:
            a.index_photo("chat", path.read_bytes(), "alice", str(path))
        new = b.index_photo("chat", paths[3].read_bytes(), "bob", str(paths[3]))
        for text, ref in (("a dog on the grass", None), ("", paths[1].read_bytes())):
            found_a = a.search("chat", text, ref, k=4)
            found_b = b.search("chat", text, ref, k=4)
            assert [(h.photo_id, h.source) for h in found_a] == [
                (h.photo_id, h.source) for h in found_b
            ]
            assert [h.score for h in found_a] == pytest.approx([h.score for h in found_b])
            assert len(found_a) == 4
        top = a.search("chat", "", paths[3].read_bytes(), k=1)[0]
        assert (top.photo_id, top.source) == (new, str(paths[3]))  # indexed through b
        assert a.photos.thumbnail("chat", new) == b.photos.thumbnail("chat", new)
        a.forget_user("bob")  # forgotten through a
        assert str(paths[3]) not in {
            h.source for h in b.search("chat", "", paths[3].read_bytes(), k=4)
        }
        assert b.photos.count("chat") == 3
        # Through the chat core's /search, as a Telegram chat sees it.
        b.set_indexing("tg:1", True, Actor("admin", is_admin=True))
        for i, path in enumerate(paths):
            (a if i % 2 else b).index_photo("tg:1", path.read_bytes(), "alice", f"file-id-{i}")
        reply_a = asyncio.run(core_search(a, "a dog on the grass"))
        reply_b = asyncio.run(core_search(b, "a dog on the grass"))
        assert not reply_a.error and len(reply_a.photo_refs) == 4
        assert (reply_a.text, reply_a.photo_refs) == (reply_b.text, reply_b.photo_refs)
        assert not (tmp_path / "worker-a" / "photos").exists()  # nothing in the data folders
    finally:
        for engine in engines:
            engine.close()
        client.close()
