"""Backups (issue 7): every chat exported from one store and imported into an empty one — FAISS or
Qdrant, either way — answers `who` exactly as before, and keeps each chat's concepts its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.backup import export_scopes, import_archive
from engine.engine import Engine
from engine.store import open_store
from engine.store.qdrant_store import QdrantConceptStore
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
        # Sorted: concepts of equal score (1.0 here, the crops are the remembered ones) have no
        # meaningful order, and FAISS and Qdrant break such ties differently.
        out[scope] = (
            answer.text,
            sorted(
                (r.name, round(r.score, 5), r.box.as_list() if r.box else None)
                for r in answer.concepts
            ),
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


# The photo search history: per chat the photos indexed (folder, poster). tg:7 has photos but no
# concepts; dc:42 indexed one photo and then had indexing turned off (its photo stays).
INDEXED = {
    "tg:-100": (("dog", "alice"), ("cat", "bob"), ("backpack", "carol")),
    "tg:7": (("dog2", "carol"), ("teapot", "dave")),
    "dc:42": (("cat2", "erin"),),
}
FLAGS = {"tg:-100": True, "tg:7": True, "dc:42": False}


def source_of(scope: str, index: int, folder: str) -> str:
    """What the chat's adapter indexes a posted photo as: a Telegram file id, a Discord link."""
    if scope.startswith("dc:"):
        return f"https://discord.com/channels/1/{scope[3:]}/{1000 + index}"
    return f"AgACAgIAAxkB-{index}-{folder}"


QUERIES = ("a dog", "Mochi", "Rex in the snow", "a teapot on a table")


def _searches(engine: Engine, dreambooth: Path) -> dict[str, list[list[tuple[str, float]]]]:
    """Every chat's results for text, concept-aware, reference and composed queries."""
    ref = (dreambooth / "dog" / "01.jpg").read_bytes()
    out = {}
    for scope in INDEXED:
        runs = [engine.search(scope, text, k=10) for text in QUERIES]
        runs += [engine.search(scope, "", ref, k=10), engine.search(scope, "on a beach", ref, k=10)]
        out[scope] = [[(h.source, h.score) for h in hits] for hits in runs]
    return out


def _same(found: dict, expected: dict) -> bool:
    """The same photos in the same order, with the same scores (to 1e-5)."""
    return {s: [[src for src, _ in run] for run in runs] for s, runs in found.items()} == {
        s: [[src for src, _ in run] for run in runs] for s, runs in expected.items()
    } and all(
        score == pytest.approx(want, abs=1e-5)
        for scope, runs in found.items()
        for run, want_run in zip(runs, expected[scope], strict=True)
        for (_, score), (_, want) in zip(run, want_run, strict=True)
    )


def test_export_all_keeps_the_photo_search_history(coco_models, dreambooth, tmp_path) -> None:
    from engine.permissions import Actor

    admin = Actor("admin", is_admin=True)
    source = _engine("faiss", coco_models, tmp_path / "source")
    for scope, subjects in CHATS.items():
        photo = group_photo([dreambooth / folder / "00.jpg" for folder, *_ in subjects])
        for owner, (_, name, description) in zip(("alice", "bob"), subjects, strict=True):
            source.remember(scope, photo, name, description, owner)
    posted = {}  # scope -> {source: poster}
    for scope, photos in INDEXED.items():
        source.set_indexing(scope, True, admin)
        for index, (folder, poster) in enumerate(photos):
            name = source_of(scope, index, folder)
            photo = (dreambooth / folder / "00.jpg").read_bytes()
            assert source.index_photo(scope, photo, poster, name, 1.7e9 + index) is not None
            posted.setdefault(scope, {})[name] = poster
        source.set_indexing(scope, FLAGS[scope], admin)
    before = _searches(source, dreambooth)
    for scope, runs in before.items():  # a meaningful baseline: every chat finds its own photos
        assert all(sorted(src for src, _ in run) == sorted(posted[scope]) for run in runs)

    backup = tmp_path / "backup.zip"  # what `rapbot export --all` writes
    report = export_scopes(source.store, None, backup, photos=source.photos)
    assert (report.scopes, report.concepts, report.examples, report.photos) == (3, 4, 4, 6)
    source.close()

    target = _engine("qdrant", coco_models, tmp_path / "target")
    assert target.store.scopes() == [] and target.photos.scopes() == []
    restored = import_archive(backup, target.store, photos=target.photos)
    assert (restored.scopes, restored.concepts, restored.photos) == (3, 4, 6)
    assert not restored.photos_reembedded
    assert _same(_searches(target, dreambooth), before)  # never another chat's photos either
    assert {scope: target.indexing(scope) for scope in INDEXED} == FLAGS
    for scope, sources in posted.items():
        assert {p.source: p.poster for p in target.photos.rows(scope)} == sources

    again = import_archive(backup, target.store, photos=target.photos)
    assert (again.concepts, again.examples, again.photos, again.photos_skipped) == (0, 0, 0, 6)
    assert _same(_searches(target, dreambooth), before)

    # Posters were kept: forgetting one removes their photos from the restored history.
    target.forget_user("carol")
    for scope, sources in posted.items():
        kept = {s for s, poster in sources.items() if poster != "carol"}
        assert {p.source for p in target.photos.rows(scope)} == kept
        assert {h.source for h in target.search(scope, "a dog", k=10)} == kept
    target.close()


def test_a_chat_moved_into_another_takes_neither_its_flag_nor_its_photos(
    tiny_models, dreambooth, tmp_path
) -> None:
    """Chat A's backup imported into chat B: B's /index stays what B's admins chose, and A's
    photos (and who posted them) go into B only when explicitly asked; a restore into A
    itself brings A's flag and photos back."""
    from engine.permissions import Actor

    admin = Actor("admin", is_admin=True)
    source = _engine("faiss", tiny_models, tmp_path / "source")
    source.set_indexing("tg:-100", True, admin)
    for index, (folder, poster) in enumerate(INDEXED["tg:-100"]):
        photo = (dreambooth / folder / "00.jpg").read_bytes()
        name = source_of("tg:-100", index, folder)
        assert source.index_photo("tg:-100", photo, poster, name, 1.7e9 + index) is not None
    backup = tmp_path / "a.zip"
    assert export_scopes(source.store, ["tg:-100"], backup, photos=source.photos).photos == 3
    source.close()

    target = _engine("faiss", tiny_models, tmp_path / "target")
    moved = import_archive(
        backup, target.store, scope_map={"tg:-100": "tg:-200"}, photos=target.photos
    )
    assert not target.indexing("tg:-200")  # not turned on by another chat's admin
    assert target.search("tg:-200", "a dog") == [] and target.photos.scopes() == []
    assert (moved.photos, moved.photos_left_out) == (0, 3)
    dog = (dreambooth / "dog" / "01.jpg").read_bytes()
    assert target.index_photo("tg:-200", dog, "bob", "AgACAgIAAxkB-new") is None  # still off
    asked = import_archive(
        backup,
        target.store,
        scope_map={"tg:-100": "tg:-200"},
        photos=target.photos,
        include_photos=True,
    )
    assert (asked.photos, asked.photos_left_out) == (3, 0)
    assert len(target.search("tg:-200", "a dog")) == 3 and not target.indexing("tg:-200")

    restored = import_archive(backup, target.store, photos=target.photos)  # into A itself
    assert restored.photos == 3 and target.indexing("tg:-100")
    assert {p.poster for p in target.photos.rows("tg:-100")} == {"alice", "bob", "carol"}
    target.close()
