"""Backups (issue 7): every chat exported from one store and imported into an empty one — FAISS or
Qdrant, either way — answers `who` exactly as before, and keeps each chat's concepts its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.engine import Engine
from engine.store import open_store
from engine.store.qdrant_store import QdrantConceptStore
from engine.transfer import export_scopes, import_archive
from tests.conftest import group_photo

# Per chat: (folder, name, description); the real COCO detector crops each from a group photo.
CHATS = {
    "tg:-100": (("cat", "Mochi", "my grey cat"), ("dog", "Rex", "our dog")),
    "dc:42": (("cat2", "Tom", "the neighbour's cat"), ("dog2", "Rex", "my dog")),
}


def _store(kind: str, models, root: Path):
    if kind == "faiss":
        return open_store(root / "store", models.embedder.model_id, models.embedder.dim)
    from qdrant_client import QdrantClient

    return QdrantConceptStore(
        QdrantClient(":memory:"), models.embedder.model_id, models.embedder.dim
    )


def _engine(kind: str, tiny_models, root: Path) -> Engine:
    settings, models = tiny_models
    return Engine(
        settings.model_copy(update={"data_dir": root}), models, _store(kind, models, root)
    )


def _answers(engine: Engine, photos: dict[str, bytes]) -> dict[str, tuple]:
    out = {}
    for scope, photo in photos.items():
        answer = engine.recognize(scope, photo, "someone", annotate=False)
        out[scope] = (
            answer.text,
            [
                (r.name, round(r.score, 5), r.box.as_list() if r.box else None)
                for r in answer.concepts
            ],
        )
    return out


@pytest.mark.parametrize(
    "source_kind, target_kind", [("faiss", "qdrant"), ("qdrant", "faiss"), ("faiss", "faiss")]
)
def test_export_all_then_import_into_an_empty_store_gives_the_same_answers(
    source_kind, target_kind, coco_models, dreambooth, tmp_path
):
    source = _engine(source_kind, coco_models, tmp_path / "source")
    photos = {}
    for scope, subjects in CHATS.items():
        photos[scope] = group_photo([dreambooth / folder / "00.jpg" for folder, *_ in subjects])
        for owner, (_, name, description) in zip(("alice", "bob"), subjects, strict=True):
            source.remember(scope, photos[scope], name, description, owner)
    before = _answers(source, photos)
    for scope, (_, found) in before.items():  # a meaningful baseline: both named, nothing else
        assert sorted(name for name, *_ in found) == sorted(name for _, name, _ in CHATS[scope])

    backup = tmp_path / "backup.zip"
    report = export_scopes(source.store, None, backup)
    assert (report.scopes, report.concepts, report.examples) == (2, 4, 4)
    source.close()

    target = _engine(target_kind, coco_models, tmp_path / "target")
    assert target.store.scopes() == []  # empty before the restore
    restored = import_archive(backup, target.store)
    assert (restored.scopes, restored.concepts, restored.examples) == (2, 4, 4)
    assert _answers(target, photos) == before
    for scope, subjects in CHATS.items():  # owners and descriptions come back, chat by chat
        kept = {(c.name, c.description, c.owner) for c in target.list_concepts(scope)}
        assert kept == {(n, d, o) for o, (_, n, d) in zip(("alice", "bob"), subjects, strict=True)}
    target.close()
