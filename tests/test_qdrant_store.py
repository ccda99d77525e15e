"""What is particular to the Qdrant store (the shared contract is in test_store_contract.py).

Qdrant runs in-process (``:memory:``); calls to the client are recorded where the test is
about what would be sent to a server (collection shape, indexes, scope filters).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException

from engine.errors import InvalidInputError, StoreError
from engine.settings import EngineSettings
from engine.store import FaissConceptStore, open_concept_store
from engine.store.qdrant_store import (
    PAYLOAD_INDEXES,
    QdrantConceptStore,
    collection_name,
    example_id_of,
)
from engine.types import Box

DIM = 8
BOX = Box(0, 0, 4, 4)


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def add(store: QdrantConceptStore, scope: str, name: str, seed: int, **kw):
    return store.add_concept(
        scope,
        name=name,
        description=kw.pop("description", ""),
        category=kw.pop("category", "cat"),
        owner=kw.pop("owner", "alice"),
        embedding=unit(seed),
        crop_jpeg=b"\xff\xd8\xff" + name.encode(),
        box=BOX,
        **kw,
    )


@pytest.fixture
def client():
    qdrant = QdrantClient(":memory:")
    yield qdrant
    qdrant.close()


class Recorder:
    """Wraps client methods and keeps (method, kwargs) of every call."""

    def __init__(self, client: QdrantClient, monkeypatch: pytest.MonkeyPatch, names: list[str]):
        self.calls: list[tuple[str, dict]] = []
        for name in names:
            original = getattr(client, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                self.calls.append((_name, kwargs))
                return _original(*args, **kwargs)

            monkeypatch.setattr(client, name, spy)


def test_one_collection_per_kind_model_and_prefix(client) -> None:
    clip = "open_clip:ViT-B-32:openai"
    name = collection_name("rapbot", "concepts", clip)
    assert name.startswith("rapbot_concepts__open_clip_vit_b_32_openai_")
    assert collection_name("rapbot", "photos", clip).startswith("rapbot_photos__")
    # Ids that slug alike still get their own collections (a hash of the exact id).
    assert name != collection_name("rapbot", "concepts", "open_clip/ViT-B-32/openai")
    with pytest.raises(StoreError, match="prefix"):
        collection_name("bad prefix/..", "concepts", clip)

    a = QdrantConceptStore(client, clip, DIM, owns_client=False)
    b = QdrantConceptStore(client, "open_clip:ViT-L-14:openai", DIM, owns_client=False)
    c = QdrantConceptStore(client, clip, DIM, prefix="staging", owns_client=False)
    assert a.collection == name and len({a.collection, b.collection, c.collection}) == 3
    assert {col.name for col in client.get_collections().collections} == {
        a.collection,
        b.collection,
        c.collection,
    }
    add(a, "tg:1", "Mochi", 1)
    assert (a.count(), b.count(), c.count()) == (1, 0, 0)


def test_collection_shape_and_the_tenant_index(client, monkeypatch) -> None:
    spy = Recorder(client, monkeypatch, ["create_collection", "create_payload_index"])
    QdrantConceptStore(client, "m", DIM, owns_client=False)
    (create,) = [kw for name, kw in spy.calls if name == "create_collection"]
    assert create["vectors_config"] == models.VectorParams(size=DIM, distance=models.Distance.DOT)
    # Qdrant's multitenancy setup: per-tenant graphs, no global graph, crops on disk.
    assert (create["hnsw_config"].m, create["hnsw_config"].payload_m) == (0, 16)
    assert create["on_disk_payload"] is True
    indexes = {kw["field_name"]: kw["field_schema"] for name, kw in spy.calls if "index" in name}
    assert set(indexes) == {"scope", "concept_id", "name_folded", "owner", "source", "added_by"}
    assert indexes == PAYLOAD_INDEXES
    assert indexes["scope"].type == models.KeywordIndexType.KEYWORD
    assert indexes["scope"].is_tenant is True
    assert not any(index.is_tenant for field, index in indexes.items() if field != "scope")


@pytest.mark.parametrize(
    "params",
    [
        models.VectorParams(size=DIM * 2, distance=models.Distance.DOT),
        models.VectorParams(size=DIM, distance=models.Distance.COSINE),
        {"image": models.VectorParams(size=DIM, distance=models.Distance.DOT)},
    ],
    ids=["size", "distance", "named"],
)
def test_an_existing_collection_of_another_shape_is_a_startup_error(client, params) -> None:
    name = collection_name("rapbot", "concepts", "m")
    client.create_collection(name, vectors_config=params)
    with pytest.raises(StoreError) as caught:
        QdrantConceptStore(client, "m", DIM, where="http://qdrant:6333", owns_client=False)
    message = str(caught.value)
    assert name in message and "http://qdrant:6333" in message
    assert f"size {DIM}" in message and "RAPBOT_QDRANT_PREFIX" in message
    assert "\n" not in message
    # Nothing was changed: the collection is still the one that was there.
    assert client.get_collection(name).config.params.vectors == params


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_an_unreachable_server_is_one_quick_line(tmp_path: Path) -> None:
    settings = EngineSettings(
        data_dir=tmp_path,
        store="qdrant",
        qdrant_url="http://127.0.0.1:1",
        qdrant_api_key="sekrit-key",
        qdrant_timeout=3,
    )
    start = time.monotonic()
    with pytest.raises(StoreError) as caught:
        open_concept_store(settings, "m", DIM)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert message.startswith("The concept database at http://127.0.0.1:1 is not reachable: ")
    assert "\n" not in message and "sekrit" not in message


def test_a_server_lost_mid_run_is_a_store_error(client, monkeypatch) -> None:
    store = QdrantConceptStore(client, "m", DIM, where="http://qdrant:6333", owns_client=False)
    add(store, "tg:1", "Mochi", 1)

    def down(*args, **kwargs):
        raise ResponseHandlingException(ConnectionRefusedError(111, "Connection refused"))

    for method in ("scroll", "query_batch_points", "count", "upsert"):
        monkeypatch.setattr(client, method, down)
    for call in (
        lambda: store.list_concepts("tg:1"),
        lambda: store.search("tg:1", unit(1), 3),
        lambda: store.count("tg:1"),
        lambda: add(store, "tg:1", "Bo", 2),
    ):
        with pytest.raises(StoreError, match="^The concept database at http://qdrant:6333 is not"):
            call()


def test_every_request_is_filtered_by_scope(client, monkeypatch) -> None:
    store = QdrantConceptStore(client, "m", DIM, owns_client=False)
    methods = ["scroll", "count", "query_batch_points", "set_payload", "delete", "upsert"]
    spy = Recorder(client, monkeypatch, methods)
    mochi = add(store, "tg:1", "Mochi", 1, source="m1")
    add(store, "tg:1", "Mochi", 1, source="m1")
    store.add_example("tg:1", mochi.id, embedding=unit(2), crop_jpeg=b"x", box=BOX)
    store.get("tg:1", mochi.id)
    store.get_by_name("tg:1", "mochi")
    store.find_by_source("tg:1", "m1")
    store.list_concepts("tg:1")
    store.categories("tg:1")
    store.example_crops("tg:1", mochi.id)
    store.count("tg:1")
    store.search("tg:1", np.stack([unit(1), unit(2)]), 3)
    store.rename("tg:1", mochi.id, "Mochi-san")
    store.describe("tg:1", mochi.id, "grey")
    list(store.examples("tg:1"))
    add(store, "tg:2", "Bo", 3, owner="bob")
    store.delete("tg:1", mochi.id)
    assert store.delete_user("bob") == 1

    def filters(name: str, kwargs: dict) -> list[models.Filter]:
        if name == "query_batch_points":
            return [r.filter for r in kwargs["requests"]]
        if name == "delete":
            return [kwargs["points_selector"].filter]
        key = {"scroll": "scroll_filter", "count": "count_filter", "set_payload": "points"}
        return [kwargs[key[name]]]

    checked = 0
    for name, kwargs in spy.calls:
        if name == "upsert":  # a new point always carries its scope
            assert all(p.payload["scope"] in ("tg:1", "tg:2") for p in kwargs["points"])
            continue
        for flt in filters(name, kwargs):
            if name == "scroll" and flt.must[0].key in ("owner", "added_by"):
                continue  # delete_user's lookups: the reads across scopes, by design
            scope = flt.must[0]
            assert scope.key == "scope" and scope.match.value in ("tg:1", "tg:2"), (name, flt)
            checked += 1
    assert checked > 20


def test_ids(client) -> None:
    store = QdrantConceptStore(client, "m", DIM, owns_client=False)
    mochi = add(store, "tg:1", "Mochi", 1)
    bo = add(store, "tg:1", "Bo", 2, source="msg:7")
    assert all(len(c.id) == 32 and int(c.id, 16) >= 0 for c in (mochi, bo))
    hits = store.search("tg:1", unit(1), 5)[0]
    assert all(isinstance(h.example_id, int) and 0 <= h.example_id < 2**63 for h in hits)
    points, _ = client.scroll(store.collection, with_payload=["example_id"])
    assert {example_id_of(p.id) for p in points} == {h.example_id for h in hits}
    assert all(p.payload["example_id"] == example_id_of(p.id) for p in points)
    # A sourced add derives its ids from (scope, source): a concurrent re-run writes the same
    # point again; the same source in another chat is another point.
    other = add(store, "tg:2", "Bo", 2, source="msg:7")
    assert other.id != bo.id and store.count() == 3


def test_a_name_taken_meanwhile_by_another_process_backs_out(client) -> None:
    first = QdrantConceptStore(client, "m", DIM, owns_client=False)
    second = QdrantConceptStore(client, "m", DIM, owns_client=False)  # "another process"
    mochi = add(first, "tg:1", "Mochi", 1)
    # The second process checked the name before the first wrote it (simulated).
    real = second._by_name
    calls = iter([None])
    second._by_name = lambda scope, key: next(calls, None) or real(scope, key)
    with pytest.raises(InvalidInputError, match="already remembered"):
        add(second, "tg:1", "MOCHI", 2)
    assert [c.id for c in first.list_concepts("tg:1")] == [mochi.id]
    assert first.count("tg:1") == 1


def test_a_closed_store_refuses_work_and_closes_its_own_client() -> None:
    client = QdrantClient(":memory:")
    store = QdrantConceptStore(client, "m", DIM)
    add(store, "tg:1", "Mochi", 1)
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        store.count("tg:1")


def test_open_concept_store_follows_the_settings(tmp_path: Path) -> None:
    faiss = open_concept_store(EngineSettings(data_dir=tmp_path), "m", DIM)
    assert isinstance(faiss, FaissConceptStore) and faiss.root == tmp_path / "store"
    faiss.close()

    memory = EngineSettings(data_dir=tmp_path, store="qdrant", qdrant_url=":memory:")
    with open_concept_store(memory, "m", DIM) as store:
        assert isinstance(store, QdrantConceptStore) and store.where == ":memory:"

    # No URL: an on-disk Qdrant in the data folder (one process), which persists.
    embedded = EngineSettings(data_dir=tmp_path, store="qdrant", qdrant_prefix="dev")
    with open_concept_store(embedded, "m", DIM) as store:
        add(store, "tg:1", "Mochi", 1)
        assert store.collection.startswith("dev_concepts__")
    with open_concept_store(embedded, "m", DIM) as store:
        assert [c.name for c in store.list_concepts("tg:1")] == ["Mochi"]
    assert (tmp_path / "qdrant").is_dir()

    with pytest.raises(StoreError, match="http:// or https://"):
        open_concept_store(
            EngineSettings(data_dir=tmp_path, store="qdrant", qdrant_url="qdrant:6333"), "m", DIM
        )


def test_engine_open_uses_the_configured_store(tmp_path: Path) -> None:
    from engine.engine import Engine

    settings = EngineSettings(
        data_dir=tmp_path, profile="tiny", store="qdrant", qdrant_url=":memory:"
    )
    engine = Engine.open(settings, load_models=False)
    try:
        assert isinstance(engine.store, QdrantConceptStore)
        assert engine.store.collection.startswith("rapbot_concepts__open_clip_")
    finally:
        engine.close()


def test_a_cluster_collection_gets_the_configured_shards(monkeypatch, tmp_path) -> None:
    """RAPBOT_QDRANT_SHARDS / _REPLICATION_FACTOR reach Qdrant when rapbot creates the
    collection (the in-process Qdrant ignores them, so the request itself is checked)."""
    from engine.settings import EngineSettings
    from engine.store import open_concept_store

    created = []
    original = QdrantClient.create_collection

    def recording(self, *args, **kwargs):
        created.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QdrantClient, "create_collection", recording)
    settings = EngineSettings(
        data_dir=tmp_path,
        store="qdrant",
        qdrant_url=":memory:",
        qdrant_shards=6,
        qdrant_replication_factor=2,
    )
    open_concept_store(settings, "m", DIM).close()
    assert (created[-1]["shard_number"], created[-1]["replication_factor"]) == (6, 2)
    open_concept_store(settings.model_copy(update={"qdrant_shards": 0}), "m", DIM).close()
    assert (created[-1]["shard_number"], created[-1]["replication_factor"]) == (None, 2)
