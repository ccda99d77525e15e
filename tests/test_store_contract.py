"""The ConceptStore contract, run against every implementation: FAISS and Qdrant.

Each implementation is one entry of ``IMPLEMENTATIONS``: a function that opens a store in a
folder for a model id and dimension. Reopening the same folder must give the same store. For
Qdrant the "folder" names one in-process Qdrant (``:memory:``) that stands in for a server:
each open is a new connection to it, as another worker process would make.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)
from qdrant_client import QdrantClient

from engine.errors import InvalidInputError, StoreError, UnknownConceptError
from engine.store import ConceptStore, open_store
from engine.store.faiss_store import FaissConceptStore
from engine.store.qdrant_store import QdrantConceptStore
from engine.types import Box, Concept

DIM = 16
MODEL = "test:model"
BOX = Box(1, 2, 30, 40)

Opener = Callable[..., ConceptStore]
_QDRANT_SERVERS: dict[str, QdrantClient] = {}  # folder -> its stand-in Qdrant "server"


def open_qdrant(root: Path, model_id: str = MODEL, dim: int = DIM) -> QdrantConceptStore:
    if str(root) not in _QDRANT_SERVERS:
        _QDRANT_SERVERS[str(root)] = QdrantClient(":memory:")
    return QdrantConceptStore(_QDRANT_SERVERS[str(root)], model_id, dim, owns_client=False)


IMPLEMENTATIONS: dict[str, Opener] = {
    "faiss": lambda root, model_id=MODEL, dim=DIM: FaissConceptStore(Path(root), model_id, dim),
    "qdrant": open_qdrant,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def opener(request: pytest.FixtureRequest) -> Opener:
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def store(opener: Opener, tmp_path: Path):
    opened = opener(tmp_path / "store")
    yield opened
    opened.close()


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    """A deterministic random unit vector (float32)."""
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def add(
    store: ConceptStore,
    scope: str,
    name: str,
    seed: int,
    *,
    owner: str = "alice",
    category: str = "cat",
    description: str = "",
    source: str | None = None,
    crop: bytes | None = None,
) -> Concept:
    return store.add_concept(
        scope,
        name=name,
        description=description or f"about {name}",
        category=category,
        owner=owner,
        embedding=unit(seed),
        crop_jpeg=crop if crop is not None else f"jpeg:{name}".encode(),
        box=BOX,
        source=source,
    )


def add_example(store: ConceptStore, scope: str, concept: Concept, seed: int, **kw) -> Concept:
    crop = kw.pop("crop", f"jpeg:{concept.name}:{seed}".encode())
    return store.add_example(scope, concept.id, embedding=unit(seed), crop_jpeg=crop, box=BOX, **kw)


def top(store: ConceptStore, scope: str, seed: int, k: int = 5):
    return store.search(scope, unit(seed)[None, :], k)[0]


# ----------------------------------------------------------------------------- basics


def test_open_store_satisfies_the_protocol(tmp_path: Path) -> None:
    opened = open_store(tmp_path / "s", MODEL, DIM)
    try:
        assert isinstance(opened, ConceptStore)
        assert (opened.model_id, opened.dim) == (MODEL, DIM)
    finally:
        opened.close()


def test_add_and_get(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1, description="my grey cat")
    assert len(mochi.id) == 32 and int(mochi.id, 16) >= 0  # uuid4 hex
    assert (mochi.scope, mochi.name, mochi.description) == ("tg:1", "Mochi", "my grey cat")
    assert (mochi.category, mochi.owner, mochi.examples) == ("cat", "alice", 1)
    assert mochi.created_at > 0
    assert store.get("tg:1", mochi.id) == mochi
    assert store.get("tg:1", "0" * 32) is None
    assert store.get("tg:2", mochi.id) is None  # another scope never sees it
    assert store.count() == 1 and store.count("tg:1") == 1 and store.count("tg:2") == 0


def test_get_by_name_is_case_insensitive(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1)
    strasse = add(store, "tg:1", "Straße", 2)
    assert store.get_by_name("tg:1", "mOCHI") == mochi
    assert store.get_by_name("tg:1", "STRASSE") == strasse  # casefold, not lower
    assert store.get_by_name("tg:1", "Bo") is None
    assert store.get_by_name("tg:2", "Mochi") is None


def test_duplicate_name_is_rejected(store: ConceptStore) -> None:
    add(store, "tg:1", "Mochi", 1)
    with pytest.raises(InvalidInputError):
        add(store, "tg:1", "MOCHI", 2)
    add(store, "tg:2", "Mochi", 3)  # the same name in another scope is fine
    assert store.count("tg:1") == 1 and store.count("tg:2") == 1


def test_list_is_sorted_by_name_and_categories_are_distinct(store: ConceptStore) -> None:
    for i, (name, category) in enumerate(
        [("bo", "dog"), ("Mochi", "cat"), ("alice", "person"), ("Zed", ""), ("Cleo", "cat")]
    ):
        add(store, "dc:9", name, i, category=category)
    add(store, "dc:10", "Other", 99, category="car")
    assert [c.name for c in store.list_concepts("dc:9")] == ["alice", "bo", "Cleo", "Mochi", "Zed"]
    assert sorted(store.categories("dc:9")) == ["cat", "dog", "person"]
    assert store.categories("dc:10") == ["car"]
    assert store.list_concepts("nowhere") == [] and store.categories("nowhere") == []


def test_rename(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1)
    bo = add(store, "tg:1", "Bo", 2)
    add(store, "tg:2", "Luna", 3)
    renamed = store.rename("tg:1", mochi.id, "Luna")  # Luna exists only in another scope
    assert renamed.name == "Luna" and renamed.id == mochi.id
    assert store.get_by_name("tg:1", "luna") == renamed
    assert store.get_by_name("tg:1", "Mochi") is None
    assert store.rename("tg:1", mochi.id, "LUNA").name == "LUNA"  # own name, other case
    with pytest.raises(InvalidInputError):
        store.rename("tg:1", bo.id, "luna")
    with pytest.raises(UnknownConceptError):
        store.rename("tg:1", "f" * 32, "Nobody")
    with pytest.raises(UnknownConceptError):
        store.rename("tg:2", mochi.id, "Stolen")  # the id belongs to another scope
    assert store.get("tg:1", bo.id).name == "Bo"


def test_describe(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1)
    assert store.describe("tg:1", mochi.id, "sleeps all day").description == "sleeps all day"
    assert store.get("tg:1", mochi.id).description == "sleeps all day"
    with pytest.raises(UnknownConceptError):
        store.describe("tg:2", mochi.id, "not yours")
    assert store.get("tg:1", mochi.id).description == "sleeps all day"


def test_delete_removes_concept_examples_vectors_and_crops(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1)
    add_example(store, "tg:1", mochi, 2)
    bo = add(store, "tg:1", "Bo", 3)
    assert store.count("tg:1") == 3
    with pytest.raises(UnknownConceptError):
        store.delete("tg:2", mochi.id)
    store.delete("tg:1", mochi.id)
    assert store.get("tg:1", mochi.id) is None
    assert store.count("tg:1") == 1
    assert {h.concept_id for h in top(store, "tg:1", 1)} == {bo.id}
    with pytest.raises(UnknownConceptError):
        store.example_crops("tg:1", mochi.id)
    with pytest.raises(UnknownConceptError):
        store.delete("tg:1", mochi.id)
    add(store, "tg:1", "Mochi", 4)  # the name is free again


def test_delete_user_across_scopes(store: ConceptStore) -> None:
    a1 = add(store, "tg:1", "Mochi", 1, owner="alice")
    add_example(store, "tg:1", a1, 2)
    add(store, "dc:5", "Car", 3, owner="alice")
    b1 = add(store, "tg:1", "Bo", 4, owner="bob")
    b2 = add(store, "dc:5", "Bike", 5, owner="bob")
    assert store.delete_user("alice") == 2
    assert store.delete_user("alice") == 0
    assert store.list_concepts("tg:1") == [store.get("tg:1", b1.id)]
    assert store.list_concepts("dc:5") == [store.get("dc:5", b2.id)]
    assert store.count() == 2
    assert {h.concept_id for h in top(store, "tg:1", 1)} == {b1.id}


def test_search_best_first_and_scoped(store: ConceptStore) -> None:
    concepts = [add(store, "tg:1", f"c{i}", i) for i in range(20)]
    other = add(store, "tg:2", "outsider", 5)  # the same vector as c5, in another scope
    for i, concept in enumerate(concepts):
        hits = top(store, "tg:1", i, k=5)
        assert hits[0].concept_id == concept.id
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len(hits) == 5
        assert other.id not in {h.concept_id for h in hits}
    assert [h.concept_id for h in top(store, "tg:2", 5, k=10)] == [other.id]
    assert store.search("empty", unit(1)[None, :], 3) == [[]]


def test_search_several_rows_and_k_larger_than_scope(store: ConceptStore) -> None:
    a = add(store, "tg:1", "A", 1)
    b = add(store, "tg:1", "B", 2)
    rows = store.search("tg:1", np.stack([unit(1), unit(2), unit(3)]), k=10)
    assert len(rows) == 3 and all(len(r) == 2 for r in rows)
    assert rows[0][0].concept_id == a.id and rows[1][0].concept_id == b.id
    assert len({h.example_id for h in rows[2]}) == 2
    assert store.search("tg:1", unit(1), 1)[0][0].concept_id == a.id  # one vector = one row
    assert store.search("tg:1", np.zeros((0, DIM), np.float32), 1) == []


def test_several_examples_per_concept(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1, crop=b"first")
    second = add_example(store, "tg:1", mochi, 2, crop=b"second")
    third = add_example(store, "tg:1", mochi, 3, crop=b"third")
    assert (second.examples, third.examples) == (2, 3)
    assert store.get("tg:1", mochi.id).examples == 3
    assert store.list_concepts("tg:1")[0].examples == 3
    assert store.example_crops("tg:1", mochi.id) == [b"first", b"second", b"third"]
    hits = top(store, "tg:1", 2, k=10)
    assert len(hits) == 3 and len({h.example_id for h in hits}) == 3
    assert {h.concept_id for h in hits} == {mochi.id}
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    for seed in (1, 2, 3):  # each example is found by its own vector
        assert top(store, "tg:1", seed, k=1)[0].score == pytest.approx(1.0, abs=1e-4)
    assert store.count("tg:1") == 3
    with pytest.raises(UnknownConceptError):
        add_example(store, "tg:2", mochi, 4)  # the concept is not in that scope
    with pytest.raises(UnknownConceptError):
        store.example_crops("tg:2", mochi.id)


def test_source_makes_adds_idempotent(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1, source="msg:1")
    assert add(store, "tg:1", "Mochi", 1, source="msg:1") == mochi  # a task ran twice
    assert add(store, "tg:1", "Other", 9, source="msg:1") == mochi  # the source decides
    again = add_example(store, "tg:1", mochi, 2, source="msg:2")
    assert add_example(store, "tg:1", mochi, 2, source="msg:2") == again
    assert add_example(store, "tg:1", mochi, 3, source="msg:1") == again
    assert store.count("tg:1") == 2 and again.examples == 2
    assert store.find_by_source("tg:1", "msg:2") == again
    assert store.find_by_source("tg:1", "msg:3") is None
    assert store.find_by_source("tg:2", "msg:1") is None
    other = add(store, "tg:2", "Mochi", 4, source="msg:1")  # sources are per scope
    assert other.id != mochi.id and store.count("tg:2") == 1


@pytest.mark.parametrize(
    "embedding",
    [
        np.zeros(DIM + 1, np.float32),
        np.zeros((1, DIM), np.float32),
        np.zeros(DIM, np.float64),
        np.full(DIM, np.nan, np.float32),
        np.full(DIM, np.inf, np.float32),
        [0.0] * DIM,
    ],
    ids=["dim", "2d", "float64", "nan", "inf", "list"],
)
def test_bad_embedding_is_rejected(store: ConceptStore, embedding) -> None:
    with pytest.raises(InvalidInputError):
        store.add_concept(
            "tg:1",
            name="X",
            description="",
            category="",
            owner="u",
            embedding=embedding,
            crop_jpeg=b"",
            box=BOX,
        )
    mochi = add(store, "tg:1", "Mochi", 1)
    with pytest.raises(InvalidInputError):
        store.add_example("tg:1", mochi.id, embedding=embedding, crop_jpeg=b"", box=BOX)
    assert store.count() == 1


def test_bad_queries_and_names_are_rejected(store: ConceptStore) -> None:
    mochi = add(store, "tg:1", "Mochi", 1)
    for queries in (np.zeros((1, DIM + 1), np.float32), np.full((1, DIM), np.nan, np.float32)):
        with pytest.raises(InvalidInputError):
            store.search("tg:1", queries, 3)
    with pytest.raises(InvalidInputError):
        store.search("tg:1", unit(1)[None, :], 0)
    with pytest.raises(InvalidInputError):
        add(store, "tg:1", "   ", 2)
    with pytest.raises(InvalidInputError):
        store.rename("tg:1", mochi.id, "")
    with pytest.raises(InvalidInputError):
        add(store, "", "Bo", 3)
    with pytest.raises(InvalidInputError):
        store.delete_user("")


def test_categories_limit_keeps_those_most_concepts_have(store: ConceptStore) -> None:
    """The detector's vocabulary cap: with ``limit`` the most used categories (ties by name),
    sorted; without it, or under it, all of them (RAP's parity: the database's categories)."""
    for i, category in enumerate(["cat", "dog", "cat", "teapot", "person", "dog", "cat", ""]):
        add(store, "dc:9", f"n{i}", i, category=category)
    add(store, "dc:10", "Other", 99, category="car")
    assert store.categories("dc:9", limit=2) == ["cat", "dog"]
    assert store.categories("dc:9", limit=3) == ["cat", "dog", "person"]  # person < teapot
    everything = ["cat", "dog", "person", "teapot"]
    assert store.categories("dc:9", limit=4) == store.categories("dc:9", limit=50) == everything
    assert store.categories("dc:9") == everything and store.categories("dc:10", limit=1) == ["car"]
    with pytest.raises(InvalidInputError):
        store.categories("dc:9", limit=0)


@contextmanager
def crop_reads(store: ConceptStore) -> Iterator[list[str]]:
    """What the store asks its database for that includes crops (SQL for FAISS, the payload
    of Qdrant scrolls), while the block runs."""
    seen: list[str] = []
    if isinstance(store, FaissConceptStore):
        store._db.set_trace_callback(lambda sql: seen.append(sql) if "crop" in sql else None)
        try:
            yield seen
        finally:
            store._db.set_trace_callback(None)
        return
    scroll = store.client.scroll

    def watched(*args, **kwargs):
        payload = kwargs.get("with_payload")
        if payload is True or (isinstance(payload, list) and "crop" in payload):
            seen.append(f"scroll with_payload={payload}")
        return scroll(*args, **kwargs)

    store.client.scroll = watched
    try:
        yield seen
    finally:
        del store.client.scroll


def test_example_embeddings_read_only_the_named_concepts_vectors(store: ConceptStore) -> None:
    """Photo search brings a named concept in through its examples' vectors: only the named
    concepts', and no crop bytes (3,000 examples read with their crops made /search 30x
    slower)."""
    mochi = add(store, "tg:1", "Mochi", 1, crop=b"c" * 10_000)
    add_example(store, "tg:1", mochi, 3)
    add_example(store, "tg:1", mochi, 4)
    bo = add(store, "tg:1", "Bo", 2, category="dog")
    other = add(store, "dc:2", "Other", 5)
    with crop_reads(store) as reads:
        found = store.example_embeddings("tg:1", [bo.id, mochi.id, other.id, "0" * 32, bo.id])
        assert store.example_embeddings("tg:1", []) == {}
    assert reads == []
    assert list(found) == [bo.id, mochi.id]  # the asked order; other scopes' ids left out
    assert found[mochi.id].dtype == np.float32 and found[mochi.id].shape == (3, DIM)
    np.testing.assert_allclose(found[mochi.id], np.stack([unit(1), unit(3), unit(4)]), atol=1e-6)
    np.testing.assert_allclose(found[bo.id], unit(2)[None, :], atol=1e-6)
    with crop_reads(store) as reads:  # the check sees crop reads where there are some
        store.example_crops("tg:1", mochi.id, 1)
    assert reads
    with pytest.raises(InvalidInputError):
        store.example_embeddings("tg:1", mochi.id)  # one id, not a list of them


def test_scopes_and_examples_export_everything_of_a_scope(store: ConceptStore) -> None:
    assert store.scopes() == [] and list(store.examples("tg:1")) == []
    mochi = add(store, "tg:1", "Mochi", 1, description="grey", source="m1", crop=b"c1")
    bo = add(store, "tg:1", "Bo", 2, owner="bob", category="dog", crop=b"c2")
    add_example(store, "tg:1", mochi, 3, crop=b"c3", source="m3")
    add(store, "dc:2", "Other", 4)
    gone = add(store, "local", "Gone", 5)
    store.delete("local", gone.id)
    store.rename("tg:1", mochi.id, "Mochi-san")
    assert store.scopes() == ["dc:2", "tg:1"]  # sorted; scopes emptied by deletes are gone
    examples = list(store.examples("tg:1"))
    assert [(e.concept_id, e.crop_jpeg) for e in examples] == [
        (mochi.id, b"c1"),
        (mochi.id, b"c3"),
        (bo.id, b"c2"),
    ]
    first, second, third = examples
    assert (first.scope, first.name, first.description, first.owner) == (
        "tg:1",
        "Mochi-san",
        "grey",
        "alice",
    )
    assert (third.name, third.category, third.owner) == ("Bo", "dog", "bob")
    assert first.concept_created_at == mochi.created_at == second.concept_created_at
    assert (first.source, second.source, third.source) == ("m1", "m3", None)
    assert first.box == BOX and first.created_at > 0
    assert first.embedding.dtype == np.float32
    np.testing.assert_array_equal(first.embedding, unit(1))
    np.testing.assert_array_equal(second.embedding, unit(3))
    ids = {e.example_id for e in examples}
    assert len(ids) == 3 and all(isinstance(i, int) for i in ids)
    assert ids == {h.example_id for h in top(store, "tg:1", 1, k=10)}  # the ids search reports
    assert [e.name for e in store.examples("dc:2")] == ["Other"]
    assert list(store.examples("local")) == []


def test_scope_names_are_arbitrary_text(store: ConceptStore) -> None:
    scopes = ["tg:-100123", "dc:987", "local", "чат/../ü 🐱", "a" * 300, "x\x00y"]
    made = {scope: add(store, scope, "Mochi", i) for i, scope in enumerate(scopes)}
    for i, scope in enumerate(scopes):
        assert [h.concept_id for h in top(store, scope, i, k=10)] == [made[scope].id]
        assert store.list_concepts(scope) == [store.get(scope, made[scope].id)]


def test_reopen_gives_the_same_answers(opener: Opener, tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = opener(root)
    mochi = add(first, "tg:1", "Mochi", 1, source="m1")
    add_example(first, "tg:1", mochi, 2)
    bo = add(first, "dc:2", "Bo", 3, category="dog")
    gone = add(first, "dc:2", "Gone", 4)
    first.delete("dc:2", gone.id)
    first.rename("dc:2", bo.id, "Bobo")
    before = {
        scope: (first.list_concepts(scope), first.categories(scope), top(first, scope, s, 10))
        for scope, s in (("tg:1", 1), ("dc:2", 3))
    }
    crops = first.example_crops("tg:1", mochi.id)
    first.close()
    with pytest.raises(StoreError):
        first.list_concepts("tg:1")  # a closed store says so

    second = opener(root)
    try:
        for scope, s in (("tg:1", 1), ("dc:2", 3)):
            assert (
                second.list_concepts(scope),
                second.categories(scope),
                top(second, scope, s, 10),
            ) == before[scope]
        assert second.example_crops("tg:1", mochi.id) == crops
        assert second.find_by_source("tg:1", "m1").id == mochi.id
        assert second.count() == 3
    finally:
        second.close()


def test_other_dim_on_reopen_is_a_store_error(opener: Opener, tmp_path: Path) -> None:
    root = tmp_path / "store"
    opener(root).close()
    with pytest.raises(StoreError, match="embedding model"):
        opener(root, dim=DIM * 2)
    opener(root).close()  # the right model still opens it


def test_another_model_never_sees_these_memories(opener: Opener, tmp_path: Path) -> None:
    """A folder refuses another model (FAISS); a server keeps one collection per model (Qdrant)."""
    root = tmp_path / "store"
    with opener(root) as first:
        add(first, "tg:1", "Mochi", 1)
    try:
        other = opener(root, model_id="open_clip:other")
    except StoreError as error:
        assert "embedding model" in str(error)
    else:
        with other:
            assert other.count() == 0 and other.list_concepts("tg:1") == []
            add(other, "tg:1", "Mochi", 2)  # its own, separate memories
    with opener(root) as first:
        assert [c.name for c in first.list_concepts("tg:1")] == ["Mochi"]
        assert first.count() == 1


def test_faiss_folder_refuses_another_model(tmp_path: Path) -> None:
    FaissConceptStore(tmp_path, MODEL, DIM).close()
    with pytest.raises(StoreError, match="embedding model"):
        FaissConceptStore(tmp_path, "open_clip:other", DIM)


def test_concurrent_threads(store: ConceptStore) -> None:
    """Worker threads add, search and delete at once; every result stays within its scope."""
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            scope = f"tg:{worker % 2}"
            for i in range(15):
                seed = 1000 * worker + i
                concept = add(store, scope, f"w{worker}-{i}", seed)
                hits = top(store, scope, seed, k=3)
                assert hits[0].concept_id == concept.id
                if i % 5 == 4:
                    store.delete(scope, concept.id)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for scope, workers in (("tg:0", (0, 2, 4)), ("tg:1", (1, 3, 5))):
        names = {c.name for c in store.list_concepts(scope)}
        assert names == {f"w{w}-{i}" for w in workers for i in range(15) if i % 5 != 4}
        assert store.count(scope) == len(names)
        for w in workers:
            hit = top(store, scope, 1000 * w, k=1)[0]
            assert store.get(scope, hit.concept_id).name == f"w{w}-0"


# ----------------------------------------------------------------------------- property


class ScopeIsolation(RuleBasedStateMachine):
    """Random operations over a few scopes against a plain model of the expected state.

    Two handles are open on the same folder (as two processes would be) and each operation
    goes through either. Only the handle just used is checked after a step, so the other one
    falls behind by several changes and must catch up when it is used next.
    """

    scopes = ("tg:1", "tg:2", "dc:3", "local")
    owners = ("alice", "bob", "carol")
    concepts = Bundle("concepts")

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="rapbot-store-prop-"))
        self.stores = [self.open(self.root / "store") for _ in range(2)]
        self.store = self.stores[0]  # the handle the last step used
        # concept id -> {scope, name, owner, seeds (one per example, in order)}
        self.model: dict[str, dict] = {}
        self.seed = 0

    open: Opener  # set by the test for each implementation

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def in_scope(self, scope: str) -> dict[str, dict]:
        return {cid: c for cid, c in self.model.items() if c["scope"] == scope}

    @rule(
        target=concepts,
        scope=st.sampled_from(scopes),
        name=st.sampled_from(["Mochi", "mochi", "Bo", "Luna", "Zed", "Ёж"]),
        owner=st.sampled_from(owners),
        via=st.integers(0, 1),
    )
    def add_concept(self, scope: str, name: str, owner: str, via: int) -> str:
        self.store = self.stores[via]
        taken = {c["name"].casefold() for c in self.in_scope(scope).values()}
        seed = self.next_seed()
        if name.casefold() in taken:
            with pytest.raises(InvalidInputError):
                add(self.store, scope, name, seed, owner=owner)
            return "missing"
        concept = add(self.store, scope, name, seed, owner=owner)
        self.model[concept.id] = {"scope": scope, "name": name, "owner": owner, "seeds": [seed]}
        return concept.id

    @rule(concept_id=concepts, scope=st.sampled_from(scopes), via=st.integers(0, 1))
    def add_example(self, concept_id: str, scope: str, via: int) -> None:
        self.store = self.stores[via]
        seed = self.next_seed()
        expected = self.model.get(concept_id)
        kwargs = dict(embedding=unit(seed), crop_jpeg=b"x", box=BOX)
        if expected is None or expected["scope"] != scope:
            with pytest.raises(UnknownConceptError):
                self.store.add_example(scope, concept_id, **kwargs)
            return
        concept = self.store.add_example(scope, concept_id, **kwargs)
        expected["seeds"].append(seed)
        assert concept.examples == len(expected["seeds"])

    @rule(concept_id=concepts, name=st.sampled_from(["Mochi", "BO", "Nemo"]), via=st.integers(0, 1))
    def rename(self, concept_id: str, name: str, via: int) -> None:
        self.store = self.stores[via]
        expected = self.model.get(concept_id)
        if expected is None:
            with pytest.raises(UnknownConceptError):
                self.store.rename(self.scopes[0], concept_id, name)
            return
        others = {
            c["name"].casefold()
            for cid, c in self.in_scope(expected["scope"]).items()
            if cid != concept_id
        }
        if name.casefold() in others:
            with pytest.raises(InvalidInputError):
                self.store.rename(expected["scope"], concept_id, name)
        else:
            assert self.store.rename(expected["scope"], concept_id, name).name == name
            expected["name"] = name

    @rule(concept_id=consumes(concepts), scope=st.sampled_from(scopes), via=st.integers(0, 1))
    def delete(self, concept_id: str, scope: str, via: int) -> None:
        self.store = self.stores[via]
        expected = self.model.get(concept_id)
        if expected is None or expected["scope"] != scope:
            with pytest.raises(UnknownConceptError):
                self.store.delete(scope, concept_id)
            return
        self.store.delete(scope, concept_id)
        del self.model[concept_id]

    @rule(owner=st.sampled_from(owners), via=st.integers(0, 1))
    def delete_user(self, owner: str, via: int) -> None:
        self.store = self.stores[via]
        gone = [cid for cid, c in self.model.items() if c["owner"] == owner]
        assert self.store.delete_user(owner) == len(gone)
        for cid in gone:
            del self.model[cid]

    @rule(via=st.integers(0, 1))
    def reopen(self, via: int) -> None:
        self.stores[via].close()
        self.stores[via] = self.open(self.root / "store")
        self.store = self.stores[via]

    @invariant()
    def every_scope_matches_the_model(self) -> None:
        for scope in self.scopes:
            expected = self.in_scope(scope)
            listed = self.store.list_concepts(scope)
            assert [c.id for c in listed] == [
                cid for cid, _ in sorted(expected.items(), key=lambda kv: kv[1]["name"].casefold())
            ]
            for concept in listed:
                assert concept.scope == scope
                assert concept.name == expected[concept.id]["name"]
                assert concept.examples == len(expected[concept.id]["seeds"])
            examples = sum(len(c["seeds"]) for c in expected.values())
            assert self.store.count(scope) == examples
            # Every stored vector finds its own concept at ~1 and nothing outside the scope.
            seeds = [(cid, s) for cid, c in expected.items() for s in c["seeds"]]
            if not seeds:
                assert self.store.search(scope, unit(0)[None, :], 5) == [[]]
                continue
            # A query unlike any stored vector still only reaches this scope's examples.
            (hits,) = self.store.search(scope, unit(10**9 + self.seed)[None, :], 50)
            assert len(hits) == min(50, examples)
            assert {h.concept_id for h in hits} <= set(expected)
            queries = np.stack([unit(s) for _, s in seeds])
            for (cid, _), hits in zip(seeds, self.store.search(scope, queries, 4), strict=True):
                assert len(hits) == min(4, examples)
                assert {h.concept_id for h in hits} <= set(expected)
                assert hits[0].concept_id == cid
                assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert self.store.count() == sum(len(c["seeds"]) for c in self.model.values())
        assert self.store.scopes() == sorted({c["scope"] for c in self.model.values()})

    def teardown(self) -> None:
        for store in self.stores:
            store.close()
        shutil.rmtree(self.root, ignore_errors=True)


def test_scope_isolation_property(opener: Opener) -> None:
    machine = type("Machine", (ScopeIsolation,), {"open": staticmethod(opener)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
