"""Issue 11, parts 3 (live side), 4, 5 and 11: concept writes that strangers can race or abuse.

The engine runs for real over real stores (FAISS, Qdrant in-process); only the CLIP embedder is
replaced by a fixed function of the pixels, since these tests are about the stores and the
engine's rules, and every /remember here gives its box (so no detector runs).
"""

from __future__ import annotations

import io
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.engine import Engine
from engine.errors import InvalidInputError
from engine.permissions import Actor
from engine.settings import EngineSettings
from engine.store.faiss_store import FaissConceptStore
from engine.types import Box

DIM = 8


class _PixelEmbedder:
    """Unit vectors from an image's mean colour: deterministic and cheap."""

    model_id, dim = "test:pixels", DIM

    def embed_images(self, images):
        rows = []
        for image in images:
            mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
            row = np.concatenate([mean, mean[::-1], [1.0, 2.0]]).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)


class _Models:
    embedder = _PixelEmbedder()
    detector = None
    generator = None


def _photo(seed: int) -> bytes:
    colour = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


BOX = Box(0, 0, 64, 48)


def _engine(root: Path, store=None) -> Engine:
    settings = EngineSettings(data_dir=root, profile="tiny")
    store = store or FaissConceptStore(root / "store", _PixelEmbedder.model_id, DIM)
    return Engine(settings, _Models(), store)


def _qdrant_store():
    from qdrant_client import QdrantClient

    from engine.store.qdrant_store import QdrantConceptStore

    return QdrantConceptStore(QdrantClient(":memory:"), _PixelEmbedder.model_id, DIM)


@pytest.fixture(params=["faiss", "qdrant"])
def engine(request, tmp_path: Path):
    store = _qdrant_store() if request.param == "qdrant" else None
    engine = _engine(tmp_path, store)
    yield engine
    engine.close()


# ----------------------------------------------------------------------------- part 5


@pytest.mark.parametrize("kind", ["faiss", "qdrant"])
def test_concurrent_remember_of_one_new_name_adds_every_photo(kind: str, tmp_path: Path) -> None:
    """Two threads remember the same new name at once, 20 times: every call succeeds and
    each concept ends with both photos (before: about half failed 'already remembered')."""
    engine = _engine(tmp_path, _qdrant_store() if kind == "qdrant" else None)
    rounds, threads = 20, 2
    barrier = threading.Barrier(threads)
    failures: list[str] = []

    def worker(index: int) -> None:
        for round_ in range(rounds):
            barrier.wait()
            try:
                engine.remember("tg:1", _photo(round_ * 7 + index), f"Pet {round_}", box=BOX)
            except Exception as error:  # noqa: BLE001 - every failure is the finding
                failures.append(f"{type(error).__name__}: {error}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    try:
        assert failures == []
        concepts = engine.list_concepts("tg:1")
        assert len(concepts) == rounds
        assert all(c.examples == threads for c in concepts)
    finally:
        engine.close()


def _remember_in_process(root: str, index: int, rounds: int, barrier, errors) -> None:
    engine = _engine(Path(root))
    try:
        for round_ in range(rounds):
            barrier.wait(timeout=60)
            try:
                engine.remember("tg:1", _photo(round_ * 5 + index), f"Pet {round_}", box=BOX)
            except Exception as error:  # noqa: BLE001
                errors.put(f"{type(error).__name__}: {error}")
    finally:
        engine.close()


def test_concurrent_remember_across_processes(tmp_path: Path) -> None:
    """Four processes on one FAISS folder remember the same new names at once."""
    context = multiprocessing.get_context("fork")
    processes, rounds = 4, 8
    barrier, errors = context.Barrier(processes), context.Queue()
    _engine(tmp_path).close()  # create the store once
    pool = [
        context.Process(
            target=_remember_in_process, args=(str(tmp_path), i, rounds, barrier, errors)
        )
        for i in range(processes)
    ]
    for process in pool:
        process.start()
    for process in pool:
        process.join(timeout=120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    assert all(p.exitcode == 0 for p in pool)
    engine = _engine(tmp_path)
    try:
        concepts = engine.list_concepts("tg:1")
        assert len(concepts) == rounds
        assert all(c.examples == processes for c in concepts)
    finally:
        engine.close()


# ----------------------------------------------------------------------------- part 4


def test_forget_me_removes_photos_added_to_other_peoples_concepts(engine: Engine) -> None:
    engine.remember("tg:1", _photo(1), "Mochi", user="alice", box=BOX)
    engine.remember("tg:1", _photo(2), "Mochi", user="bob", box=BOX)
    engine.remember("tg:2", _photo(3), "Bean", user="carol", box=BOX)
    engine.remember("tg:2", _photo(4), "Bean", user="bob", box=BOX)
    engine.remember("tg:2", _photo(5), "Bob's dog", user="bob", box=BOX)
    assert engine.forget_user("bob") == 1
    assert [(c.name, c.examples) for c in engine.list_concepts("tg:1")] == [("Mochi", 1)]
    assert [(c.name, c.examples) for c in engine.list_concepts("tg:2")] == [("Bean", 1)]
    # Only alice's and carol's crops are left, in every chat.
    left = [ex.added_by for scope in ("tg:1", "tg:2") for ex in engine.store.examples(scope)]
    assert left == ["alice", "carol"]
    assert engine.store.count("tg:1") == 1 and engine.store.count("tg:2") == 1


def test_schema_1_store_is_migrated_with_owners_as_adders(tmp_path: Path) -> None:
    """A FAISS folder of schema 1 (no added_by column) opens, and its photos are credited to
    their concept's owner."""
    root = tmp_path / "store"
    with FaissConceptStore(root, _PixelEmbedder.model_id, DIM) as store:
        vector = np.eye(DIM, dtype=np.float32)[0]
        mochi = store.add_concept(
            "tg:1",
            name="Mochi",
            description="",
            category="cat",
            owner="alice",
            embedding=vector,
            crop_jpeg=_photo(1),
            box=BOX,
        )
    db = sqlite3.connect(root / "concepts.sqlite3")
    with db:  # back to schema 1: the table as it was, without added_by
        db.execute("DROP INDEX examples_added_by")
        db.execute("ALTER TABLE examples DROP COLUMN added_by")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.close()
    with FaissConceptStore(root, _PixelEmbedder.model_id, DIM) as store:
        assert [ex.added_by for ex in store.examples("tg:1")] == ["alice"]
        store.add_example(
            "tg:1", mochi.id, embedding=vector, crop_jpeg=b"x", box=BOX, added_by="bob"
        )
        assert store.delete_user("bob") == 0
        assert store.get("tg:1", mochi.id).examples == 1
        assert store.delete_user("alice") == 1
        assert store.count("tg:1") == 0


def test_qdrant_points_without_added_by_are_credited_to_the_owner() -> None:
    from qdrant_client import QdrantClient, models

    from engine.store.qdrant_store import QdrantConceptStore

    client = QdrantClient(":memory:")
    store = QdrantConceptStore(client, _PixelEmbedder.model_id, DIM, owns_client=False)
    vector = np.eye(DIM, dtype=np.float32)[0]
    mochi = store.add_concept(
        "tg:1",
        name="Mochi",
        description="",
        category="cat",
        owner="alice",
        embedding=vector,
        crop_jpeg=b"x",
        box=BOX,
    )
    # As written before added_by existed.
    client.delete_payload(store.collection, keys=["added_by"], points=models.Filter())
    reopened = QdrantConceptStore(client, _PixelEmbedder.model_id, DIM, owns_client=False)
    assert [ex.added_by for ex in reopened.examples("tg:1")] == ["alice"]
    reopened.add_example(
        "tg:1", mochi.id, embedding=vector, crop_jpeg=b"y", box=BOX, added_by="bob"
    )
    reopened.delete_user("bob")
    assert reopened.get("tg:1", mochi.id).examples == 1


# ----------------------------------------------------------------------------- part 11


@pytest.mark.parametrize(
    "look_alike",
    ["Моchi", "МОCHI", "Mοchi", "rnochi"],  # Cyrillic М о, Cyrillic caps, Greek omicron, r+n
)
def test_look_alike_names_are_refused(engine: Engine, look_alike: str) -> None:
    engine.remember("tg:1", _photo(1), "Mochi", user="alice", box=BOX)
    with pytest.raises(InvalidInputError, match="looks like 'Mochi'"):
        engine.remember("tg:1", _photo(2), look_alike, user="mallory", box=BOX)
    engine.remember("tg:1", _photo(3), "Bean", user="mallory", box=BOX)
    with pytest.raises(InvalidInputError, match="looks like 'Mochi'"):
        engine.rename("tg:1", "Bean", look_alike, Actor("mallory"))
    # Another chat is not concerned.
    engine.remember("tg:2", _photo(4), look_alike, user="mallory", box=BOX)
    assert [c.examples for c in engine.list_concepts("tg:1")] == [1, 1]


@pytest.mark.parametrize("variant", ["Ｍｏｃｈｉ", "𝐌𝐨𝐜𝐡𝐢", "𝑀𝑜𝑐ℎ𝑖"])  # fullwidth, bold, italic
def test_nfkc_variants_are_the_same_name(engine: Engine, variant: str) -> None:
    engine.remember("tg:1", _photo(1), "Mochi", user="alice", box=BOX)
    result = engine.remember("tg:1", _photo(2), variant, user="bob", box=BOX)
    assert not result.created and result.concept.name == "Mochi"
    assert engine.concept("tg:1", variant).examples == 2


def test_different_names_still_coexist(engine: Engine) -> None:
    for i, name in enumerate(["Mochi", "Mocha", "Józef", "Jozef2", "Ναξος"]):
        engine.remember("tg:1", _photo(i), name, box=BOX)
    assert len(engine.list_concepts("tg:1")) == 5


# ----------------------------------------------------------------------------- part 3, live


@pytest.mark.parametrize("source", ["\x1b]52;c;AAAA\x07", "a\nb", "x" * 5000, "", "\u202etxt"])
def test_sources_with_escapes_or_too_long_are_refused(engine: Engine, source: str) -> None:
    with pytest.raises(InvalidInputError, match="photo source"):
        engine.remember("tg:1", _photo(1), "Mochi", box=BOX, source=source)
    with pytest.raises(InvalidInputError, match="photo source"):
        engine.index_photo("tg:1", _photo(1), "alice", source, force=True)
    assert engine.list_concepts("tg:1") == []
