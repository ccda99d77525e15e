"""Export and import of chats' concepts and photo search history (engine.backup and
`rapbot export` / `rapbot import`)."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from qdrant_client import QdrantClient

from engine.backup import (
    CONCEPTS,
    EMBEDDINGS,
    EXAMPLES,
    MANIFEST,
    PHOTO_EMBEDDINGS,
    PHOTOS,
    ArchiveError,
    ArchiveLimits,
    export_scopes,
    import_archive,
    read_archive,
)
from engine.errors import InvalidInputError
from engine.store import ConceptStore, FaissConceptStore
from engine.store.photos import PhotoStore
from engine.store.qdrant_store import QdrantConceptStore
from engine.types import Box
from rapbot.cli import main

DIM = 16
MODEL = "test:clip"


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def jpeg(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    return out.getvalue()


def faiss(root: Path, model_id: str = MODEL, dim: int = DIM) -> FaissConceptStore:
    return FaissConceptStore(root, model_id, dim)


def qdrant(model_id: str = MODEL, dim: int = DIM) -> QdrantConceptStore:
    return QdrantConceptStore(QdrantClient(":memory:"), model_id, dim)


def fill(store: ConceptStore) -> None:
    """Two chats: Mochi (2 photos) and Bo in tg:1, Luna in tg:2."""
    mochi = store.add_concept(
        "tg:1",
        name="Mochi",
        description="my grey cat",
        category="cat",
        owner="alice",
        embedding=unit(1, store.dim),
        crop_jpeg=jpeg(1),
        box=Box(1, 2, 30, 40),
        source="msg:1",
    )
    store.add_example(
        "tg:1", mochi.id, embedding=unit(2, store.dim), crop_jpeg=jpeg(2), box=Box(5, 5, 20, 20)
    )
    for scope, name, owner, seed in (("tg:1", "Bo", "bob", 3), ("tg:2", "Luna", "carol", 4)):
        store.add_concept(
            scope,
            name=name,
            description=f"about {name}",
            category="dog",
            owner=owner,
            embedding=unit(seed, store.dim),
            crop_jpeg=jpeg(seed),
            box=Box(0, 0, 10, 10),
        )


def snapshot(store: ConceptStore, scope: str) -> list[tuple]:
    """A chat's concepts as the engine sees them, without ids and times."""
    return [
        (c.name, c.description, c.category, c.owner, c.examples, store.example_crops(scope, c.id))
        for c in store.list_concepts(scope)
    ]


def answers(store: ConceptStore, scope: str, seeds=range(1, 9)) -> list[list[tuple[str, float]]]:
    rows = store.search(scope, np.stack([unit(s, store.dim) for s in seeds]), 5)
    return [[(store.get(scope, h.concept_id).name, round(h.score, 5)) for h in row] for row in rows]


@pytest.fixture
def source(tmp_path: Path):
    store = faiss(tmp_path / "source")
    fill(store)
    yield store
    store.close()


@pytest.fixture
def archive(source: FaissConceptStore, tmp_path: Path) -> Path:
    path = tmp_path / "chats.zip"
    report = export_scopes(source, None, path, MODEL)
    assert (report.scopes, report.concepts, report.examples) == (2, 3, 4)
    return path


# ----------------------------------------------------------------------------- round trips


def test_faiss_export_imports_into_qdrant_and_fresh_faiss(source, archive, tmp_path) -> None:
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        assert {MANIFEST, CONCEPTS, EXAMPLES, EMBEDDINGS} <= set(zf.namelist())
    assert (manifest["format"], manifest["version"], manifest["model_id"]) == (
        "rapbot-concepts",
        2,
        MODEL,
    )
    assert "photos" not in manifest  # exported without a photo store: concepts only
    assert manifest["dim"] == DIM
    assert manifest["counts"] == {"scopes": 2, "concepts": 3, "examples": 4}
    assert manifest["scopes"] == [
        {"scope": "tg:1", "concepts": 2, "examples": 3},
        {"scope": "tg:2", "concepts": 1, "examples": 1},
    ]
    for target in (qdrant(), faiss(tmp_path / "target")):
        with target:
            report = import_archive(archive, target)
            assert (report.scopes, report.concepts, report.examples) == (2, 3, 4)
            assert (report.merged, report.skipped, report.reembedded) == (0, 0, False)
            assert target.scopes() == ["tg:1", "tg:2"]
            for scope in ("tg:1", "tg:2"):
                assert snapshot(target, scope) == snapshot(source, scope)
                assert answers(target, scope) == answers(source, scope)


def test_reimport_adds_nothing(source, archive, tmp_path) -> None:
    target = qdrant()
    import_archive(archive, target)
    before = {scope: snapshot(target, scope) for scope in ("tg:1", "tg:2")}
    again = import_archive(archive, target)
    assert (again.concepts, again.examples, again.merged, again.skipped) == (0, 0, 3, 4)
    # A new export of the target, and the way back into the source chat: nothing new either.
    export_scopes(target, None, tmp_path / "back.zip")
    assert import_archive(tmp_path / "back.zip", target).examples == 0
    assert import_archive(tmp_path / "back.zip", source).examples == 0
    assert {scope: snapshot(target, scope) for scope in before} == before
    assert source.count() == 4

    # A later export with one more photo adds just that one, even to a concept renamed since.
    mochi = source.get_by_name("tg:1", "Mochi")
    source.add_example("tg:1", mochi.id, embedding=unit(9), crop_jpeg=jpeg(9), box=Box(0, 0, 5, 5))
    export_scopes(source, ["tg:1"], tmp_path / "later.zip")
    target.rename("tg:1", target.get_by_name("tg:1", "Mochi").id, "Mochi-san")
    later = import_archive(tmp_path / "later.zip", target)
    assert (later.concepts, later.examples) == (0, 1)
    assert target.get_by_name("tg:1", "Mochi-san").examples == 3
    assert target.get_by_name("tg:1", "Mochi") is None


def test_a_name_that_exists_gets_the_missing_photos(archive) -> None:
    target = qdrant()
    mine = target.add_concept(
        "tg:1",
        name="MOCHI",
        description="the target's own",
        category="cat",
        owner="dave",
        embedding=unit(50),
        crop_jpeg=jpeg(50),
        box=Box(0, 0, 5, 5),
    )
    report = import_archive(archive, target)
    assert (report.concepts, report.merged, report.examples) == (2, 1, 4)
    merged = target.get("tg:1", mine.id)
    assert (merged.name, merged.description, merged.owner, merged.examples) == (
        "MOCHI",
        "the target's own",
        "dave",
        3,
    )
    assert [c.name for c in target.list_concepts("tg:1")] == ["Bo", "MOCHI"]


def test_import_into_another_chat_touches_only_that_chat(source, tmp_path) -> None:
    path = tmp_path / "one.zip"
    assert export_scopes(source, ["tg:1"], path).scopes == 1
    target = qdrant()
    target.add_concept(
        "tg:1",
        name="Zed",
        description="",
        category="",
        owner="erin",
        embedding=unit(60),
        crop_jpeg=jpeg(60),
        box=Box(0, 0, 5, 5),
    )
    report = import_archive(path, target, scope_map={"tg:1": "dc:9"})
    assert (report.scopes, report.concepts, report.examples) == (1, 2, 3)
    assert snapshot(target, "dc:9") == snapshot(source, "tg:1")
    assert [c.name for c in target.list_concepts("tg:1")] == ["Zed"]
    assert target.scopes() == ["dc:9", "tg:1"]
    assert answers(target, "dc:9") == answers(source, "tg:1")
    with pytest.raises(InvalidInputError, match="no chat 'tg:2'"):
        import_archive(path, target, scope_map={"tg:2": "x"})


def test_replace_forgets_the_chat_first(archive) -> None:
    target = qdrant()
    fill(target)
    target.add_concept(
        "tg:1",
        name="Zed",
        description="",
        category="",
        owner="erin",
        embedding=unit(60),
        crop_jpeg=jpeg(60),
        box=Box(0, 0, 5, 5),
    )
    report = import_archive(archive, target, mode="replace")
    assert (report.concepts, report.examples) == (3, 4)
    assert [c.name for c in target.list_concepts("tg:1")] == ["Bo", "Mochi"]
    assert target.count() == 4


def test_another_embedding_model_is_embedded_again(tiny_models, tmp_path) -> None:
    from engine.images import decode_image

    embedder = tiny_models[1].embedder
    old = faiss(tmp_path / "old", "open_clip:retired-model", 8)  # random vectors, real crops
    fill(old)
    path = tmp_path / "old.zip"
    export_scopes(old, None, path)
    target = faiss(tmp_path / "new", embedder.model_id, embedder.dim)

    with pytest.raises(InvalidInputError, match="embedded again"):
        import_archive(path, target)  # no embedder: refused, nothing written
    with pytest.raises(InvalidInputError, match="store uses"):
        import_archive(path, target, embedder=_Renamed(embedder, "open_clip:yet-another"))
    assert target.count() == 0

    report = import_archive(path, target, embedder=embedder)
    assert report.reembedded and (report.concepts, report.examples) == (3, 4)
    assert [s[:5] for s in snapshot(target, "tg:1")] == [s[:5] for s in snapshot(old, "tg:1")]
    for scope in ("tg:1", "tg:2"):
        for concept in target.list_concepts(scope):
            for crop in target.example_crops(scope, concept.id):
                query = embedder.embed_images([decode_image(crop)])
                hit = target.search(scope, query, 1)[0][0]
                assert hit.concept_id == concept.id and hit.score == pytest.approx(1, abs=1e-3)
    assert import_archive(path, target, embedder=embedder).examples == 0  # idempotent too


class _Renamed:
    """An embedder that claims another model id (for the mismatch check)."""

    def __init__(self, embedder, model_id: str) -> None:
        self.model_id, self.dim, self._embedder = model_id, embedder.dim, embedder

    def embed_images(self, images):
        return self._embedder.embed_images(images)


# ----------------------------------------------------------------------------- export errors


def test_export_errors_leave_no_file(source, tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="nothing to export in chat 'nobody'"):
        export_scopes(source, ["nobody"], tmp_path / "x.zip")
    with pytest.raises(InvalidInputError, match="folder"):
        export_scopes(source, None, tmp_path)
    with pytest.raises(InvalidInputError, match="Can't write"):
        export_scopes(source, None, tmp_path / "no" / "such" / "x.zip")
    with pytest.raises(InvalidInputError, match="not other:model"):
        export_scopes(source, None, tmp_path / "x.zip", "other:model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_an_empty_backup_is_a_valid_archive(tmp_path) -> None:
    with faiss(tmp_path / "empty") as empty:
        report = export_scopes(empty, None, tmp_path / "empty.zip")
    assert (report.scopes, report.concepts, report.examples) == (0, 0, 0)
    assert import_archive(tmp_path / "empty.zip", qdrant()).examples == 0


# ----------------------------------------------------------------------------- bad archives


def rewrite(src: Path, dst: Path, drop=(), put=None, extra=None) -> Path:
    """A copy of an archive with members dropped, replaced (``put``) or added (``extra``)."""
    put, extra = put or {}, extra or {}
    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w") as zout,
        warnings.catch_warnings(),  # "Duplicate name": wanted here
    ):
        warnings.simplefilter("ignore", UserWarning)
        for info in zin.infolist():
            if info.filename in drop:
                continue
            zout.writestr(info.filename, put.get(info.filename, zin.read(info.filename)))
        for name, data in extra.items():
            zout.writestr(zipfile.ZipInfo(name), data)
    return dst


def manifest_with(src: Path, **changes) -> dict[str, bytes]:
    with zipfile.ZipFile(src) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    manifest.update(changes)
    return {MANIFEST: json.dumps(manifest).encode()}


def lines_with(src: Path, member: str, index: int, **changes) -> dict[str, bytes]:
    with zipfile.ZipFile(src) as zf:
        lines = [json.loads(line) for line in zf.read(member).decode().splitlines()]
    lines[index].update(changes)
    return {member: "".join(json.dumps(line) + "\n" for line in lines).encode()}


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def bad_crc(src: Path, dst: Path) -> Path:
    """Flip one byte inside a stored JPEG: the zip's CRC no longer matches."""
    data = bytearray(src.read_bytes())
    at = data.index(jpeg(2)) + 200
    data[at] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


BAD = {
    "traversal": (lambda a, d: rewrite(a, d, extra={"../../evil.sh": b"rm -rf /"}), "unexpected"),
    "absolute": (lambda a, d: rewrite(a, d, extra={"/etc/cron.d/x": b"x"}), "unexpected"),
    "crop-traversal": (
        lambda a, d: rewrite(a, d, extra={"crops/../../x.jpg": b"\xff\xd8\xff"}),
        "unexpected",
    ),
    "duplicate": (lambda a, d: rewrite(a, d, extra={CONCEPTS: b""}), "twice"),
    "newer-version": (lambda a, d: rewrite(a, d, put=manifest_with(a, version=3)), "version 3"),
    "other-format": (lambda a, d: rewrite(a, d, put=manifest_with(a, format="x")), "not a rapbot"),
    "counts": (
        lambda a, d: rewrite(
            a, d, put=manifest_with(a, counts={"scopes": 2, "concepts": 3, "examples": 5})
        ),
        "manifest says",
    ),
    "no-manifest": (lambda a, d: rewrite(a, d, drop={MANIFEST}), "has no manifest.json"),
    "no-embeddings": (lambda a, d: rewrite(a, d, drop={EMBEDDINGS}), "has no embeddings.npy"),
    "no-crop": (lambda a, d: rewrite(a, d, drop={"crops/00000002.jpg"}), "misses crops/00000002"),
    "not-jpeg": (
        lambda a, d: rewrite(a, d, put={"crops/00000001.jpg": b"GIF89a...."}),
        "not a JPEG",
    ),
    "bad-crc": (lambda a, d: bad_crc(a, d), "damaged"),
    "not-zip": (lambda a, d: d.write_bytes(b"hello, not a zip") and d, "not a rapbot export"),
    "truncated": (lambda a, d: d.write_bytes(a.read_bytes()[:900]) and d, "not a rapbot export"),
    "bad-json": (lambda a, d: rewrite(a, d, put={CONCEPTS: b'{"scope": "tg:1",\n'}), "bad line 1"),
    "markup-name": (
        lambda a, d: rewrite(a, d, put=lines_with(a, CONCEPTS, 0, name="<b>x</b>")),
        "bad concept",
    ),
    "same-name": (
        lambda a, d: rewrite(a, d, put=lines_with(a, CONCEPTS, 1, name="mochi")),
        "twice in chat",
    ),
    "unknown-concept": (
        lambda a, d: rewrite(a, d, put=lines_with(a, EXAMPLES, 0, concept_id="f" * 32)),
        "unknown concept",
    ),
    "bad-box": (
        lambda a, d: rewrite(a, d, put=lines_with(a, EXAMPLES, 0, box=[1, 2])),
        "bad example",
    ),
    "embeddings-shape": (
        lambda a, d: rewrite(a, d, put={EMBEDDINGS: npy(np.zeros((4, DIM + 1), np.float32))}),
        "shape",
    ),
    "embeddings-nan": (
        lambda a, d: rewrite(a, d, put={EMBEDDINGS: npy(np.full((4, DIM), np.nan, np.float32))}),
        "not finite",
    ),
    "embeddings-long": (
        lambda a, d: rewrite(a, d, put={EMBEDDINGS: npy(np.full((4, DIM), 9, np.float32))}),
        "not unit length",
    ),
    "embeddings-pickle": (
        lambda a, d: rewrite(a, d, put={EMBEDDINGS: npy(np.array([{"x": 1}] * 4, dtype=object))}),
        "unreadable embeddings",
    ),
}


@pytest.fixture
def target():
    """A store with its own chat, which a refused import must leave exactly as it was."""
    store = qdrant()
    store.add_concept(
        "tg:1",
        name="Zed",
        description="mine",
        category="",
        owner="erin",
        embedding=unit(60),
        crop_jpeg=jpeg(60),
        box=Box(0, 0, 5, 5),
    )
    yield store
    store.close()


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_archive_is_refused_and_the_store_is_unchanged(case, archive, target, tmp_path):
    make, expected = BAD[case]
    bad = make(archive, tmp_path / f"{case}.zip")
    before = (target.scopes(), snapshot(target, "tg:1"), target.count())
    with pytest.raises(ArchiveError) as caught:
        import_archive(bad, target)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert message.endswith("Nothing was imported.")
    assert (target.scopes(), snapshot(target, "tg:1"), target.count()) == before


@pytest.mark.parametrize(
    "limits, expected",
    [
        (ArchiveLimits(max_bytes=2000), "would unpack to"),
        (ArchiveLimits(max_crop_bytes=100), "bytes (at most 100)"),
        (ArchiveLimits(max_examples=3), "more"),
    ],
    ids=["total", "crop", "examples"],
)
def test_a_huge_archive_is_refused_up_front(archive, target, limits, expected) -> None:
    with pytest.raises(ArchiveError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        import_archive(archive, target, limits=limits)
    assert target.count() == 1


def test_a_missing_file_is_a_user_error(target, tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="No such file"):
        read_archive(tmp_path / "nope.zip")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(tiny_models, tmp_path, monkeypatch, capsys):
    """`rapbot ARGS...` in-process on the tiny profile (as in test_cli.py)."""
    import engine.models

    monkeypatch.setattr(engine.models, "load_models", lambda settings: tiny_models[1])
    monkeypatch.setenv("RAPBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RAPBOT_PROFILE", "tiny")

    def run(*args) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _photo(path: Path, seed: int) -> Path:
    path.write_bytes(jpeg(seed, size=160))
    return path


def _concepts(cli, *args) -> list[dict]:
    code, out, err = cli(*args, "--json", "concepts")
    assert code == 0, err
    return json.loads(out)["concepts"]


def test_cli_export_import_round_trip(cli, tmp_path, monkeypatch) -> None:
    box = ("--box", "10,10,150,150")
    for user, name, seed in (("alice", "Mochi", 1), ("bob", "Bo", 2)):
        photo = _photo(tmp_path / f"{name}.jpg", seed)
        code, _, err = cli("--chat", "tg:1", "--user", user, "remember", photo, name, *box)
        assert code == 0, err
    cli("--chat", "tg:5", "remember", _photo(tmp_path / "l.jpg", 3), "Luna", "--desc", "x", *box)

    one = tmp_path / "one.zip"
    code, out, err = cli("--chat", "tg:1", "--json", "export", "--out", one)
    assert code == 0, err
    assert json.loads(out) == {
        "exported": {
            "scopes": 1,
            "concepts": 2,
            "examples": 2,
            "photos": 0,
            "photos_left_out": 0,
        },
        "path": str(one),
    }
    code, out, err = cli("--json", "import", one, "--chat", "tg:2")
    assert code == 0, err
    assert json.loads(out) == {
        "imported": {
            "scopes": 1,
            "concepts": 2,
            "examples": 2,
            "merged": 0,
            "skipped": 0,
            "photos": 0,
            "photos_skipped": 0,
            "photos_left_out": 0,
            "photos_skipped_foreign": 0,
        },
        "reembedded": False,
        "photos_reembedded": False,
        "path": str(one),
    }
    assert _concepts(cli, "--chat", "tg:2") == _concepts(cli, "--chat", "tg:1")
    assert [c["owner"] for c in _concepts(cli, "--chat", "tg:2")] == ["bob", "alice"]
    code, out, _ = cli("import", one, "--chat", "tg:2")  # again: nothing new, said in words
    assert code == 0 and "0 new concept(s) and 0 photo(s)" in out

    # A backup of every chat, restored into a Qdrant store (embedded, in another data folder).
    scopes = ("tg:1", "tg:2", "tg:5")
    expected = [_concepts(cli, "--chat", scope) for scope in scopes]
    backup = tmp_path / "backup.zip"
    code, out, err = cli("--json", "export", "--all", "--out", backup)
    assert json.loads(out)["exported"] == {
        "scopes": 3,
        "concepts": 5,
        "examples": 5,
        "photos": 0,
        "photos_left_out": 0,
    }
    monkeypatch.setenv("RAPBOT_STORE", "qdrant")
    elsewhere = ("--data-dir", tmp_path / "restored")
    code, out, err = cli(*elsewhere, "--json", "import", backup)
    assert code == 0, err
    assert json.loads(out)["imported"]["concepts"] == 5
    assert [_concepts(cli, *elsewhere, "--chat", scope) for scope in scopes] == expected
    assert (tmp_path / "restored" / "qdrant").is_dir()
    assert not (tmp_path / "restored" / "store").exists()  # not the FAISS folder


def test_cli_export_import_keeps_the_photo_history(cli, tmp_path) -> None:
    # The CLI's own chats: their photos' sources are files' paths (not Telegram's or Discord's).
    photos = [_photo(tmp_path / f"p{seed}.jpg", seed) for seed in (21, 22, 23)]
    for chat, paths in (("home", photos[:2]), ("cli:7", photos[2:])):  # cli:7: photos only
        code, _, err = cli("--chat", chat, "index", *paths)
        assert code == 0, err
    code, _, err = cli("--chat", "home", "remember", photos[0], "Mochi", "--box", "10,10,150,150")
    assert code == 0, err

    def results(*args) -> list[tuple[str, float]]:
        code, out, err = cli(*args, "--json", "search", "--ref", photos[0], "-k", "5")
        assert code == 0, err
        return [(r["source"], r["score"]) for r in json.loads(out)["results"]]

    before = {chat: results("--chat", chat) for chat in ("home", "cli:7")}
    assert len(before["home"]) == 2 and len(before["cli:7"]) == 1
    backup = tmp_path / "backup.zip"
    code, out, err = cli("--json", "export", "--all", "--out", backup)
    assert code == 0, err
    assert json.loads(out)["exported"] == {
        "scopes": 2,
        "concepts": 1,
        "examples": 1,
        "photos": 3,
        "photos_left_out": 0,
    }
    code, out, err = cli("--chat", "cli:7", "export", "--out", tmp_path / "cli7.zip")
    assert code == 0, err
    assert "0 concept(s) with 0 photo(s) and 1 photo(s) of the search history from 1 chat" in out

    elsewhere = ("--data-dir", tmp_path / "restored")
    code, out, err = cli(*elsewhere, "--json", "import", backup)
    assert code == 0, err
    imported = json.loads(out)["imported"]
    assert (imported["scopes"], imported["concepts"], imported["photos"]) == (2, 1, 3)
    assert {chat: results(*elsewhere, "--chat", chat) for chat in before} == before
    code, out, err = cli(*elsewhere, "import", backup)  # again: nothing new
    assert code == 0, err
    assert "Search history: 0 photo(s) added, 3 already there." in out
    # A photo-only chat moved into another chat id, which alone gets its photos: when asked.
    code, out, err = cli(*elsewhere, "import", tmp_path / "cli7.zip", "--chat", "cli:1")
    assert code == 0, err
    assert "1 photo(s) of the search history were left out" in out and "--with-photos" in out
    assert "The /index setting of cli:1 was left as it was." in out
    assert results(*elsewhere, "--chat", "cli:1") == []
    code, out, err = cli(
        *elsewhere, "--json", "import", tmp_path / "cli7.zip", "--chat", "cli:1", "--with-photos"
    )
    assert code == 0, err
    assert json.loads(out)["imported"]["photos"] == 1
    assert json.loads(out)["imported"]["photos_left_out"] == 0
    assert results(*elsewhere, "--chat", "cli:1") == before["cli:7"]
    assert results(*elsewhere, "--chat", "home") == before["home"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (("import", "{tmp}/backup.zip", "--chat", "tg:9"), "holds 2 chats"),
        (("import", "{tmp}/garbage.zip"), "not a rapbot export"),
        (("import", "{tmp}/missing.zip"), "No such file"),
        (("export", "--chat", "nobody", "--out", "{tmp}/x.zip"), "nothing to export"),
        (("export", "--all", "--chat", "tg:1", "--out", "{tmp}/x.zip"), "either --chat"),
    ],
    ids=["multi-chat-into-one", "garbage", "missing", "empty-chat", "all-and-chat"],
)
def test_cli_transfer_user_errors_exit_1_with_one_line(cli, tmp_path, args, expected) -> None:
    with faiss(tmp_path / "two") as store:
        fill(store)
        export_scopes(store, None, tmp_path / "backup.zip")
    (tmp_path / "garbage.zip").write_bytes(b"PK\x03\x04 not really")
    code, out, err = cli(*(a.format(tmp=tmp_path) for a in args))
    assert code == 1 and out == ""
    assert err.startswith("rapbot: ") and err.count("\n") == 1 and expected in err, err


def test_cli_export_needs_an_output_file(cli) -> None:
    code, _, err = cli("export", "--chat", "tg:1")
    assert code == 2 and "--out" in err


# ----------------------------------------------------------------------------- photo history


def photo_store(root: Path, model_id: str = MODEL, dim: int = DIM, **options) -> PhotoStore:
    return PhotoStore(root, model_id, dim, **options)


# (scope, seed, poster): tg:1 has concepts too, tg:3 only photos; tg:2 (concepts) has indexing off.
PHOTO_ROWS = (("tg:1", 11, "alice"), ("tg:1", 12, "bob"), ("tg:3", 13, "carol"))


def file_id(seed: int) -> str:
    """A Telegram file id (what the Telegram adapter indexes a photo as) for the seed's photo."""
    return f"AgACAgIAAxkBAAI{seed:06d}"


def fill_photos(photos: PhotoStore) -> None:
    for scope in ("tg:1", "tg:3"):
        photos.set_indexing(scope, True)
    for scope, seed, poster in PHOTO_ROWS:
        photos.add(scope, unit(seed, photos.dim), jpeg(seed), poster, 1000.5 + seed, file_id(seed))


def photo_rows(photos: PhotoStore, scope: str) -> list[tuple]:
    """A chat's photos as stored, without ids."""
    return [
        (p.source, p.poster, p.posted_at, p.thumbnail, p.embedding.tolist())
        for p in photos.rows(scope)
    ]


def photo_state(photos: PhotoStore) -> dict:
    scopes = ["tg:1", "tg:2", "tg:3", "dc:9"]
    return {
        "scopes": photos.scopes(),
        "flags": {scope: photos.indexing(scope) for scope in scopes},
        "rows": {scope: photo_rows(photos, scope) for scope in scopes},
    }


def photo_answers(photos: PhotoStore, scope: str, seeds=range(11, 15)) -> list:
    return [
        [(h.source, round(h.score, 5)) for h in photos.search(scope, unit(seed, photos.dim), 5)]
        for seed in seeds
    ]


@pytest.fixture
def source_photos(tmp_path: Path):
    photos = photo_store(tmp_path / "source-photos")
    fill_photos(photos)
    yield photos
    photos.close()


@pytest.fixture
def full(source, source_photos, tmp_path) -> Path:
    """Every chat of both stores: tg:1 (concepts, photos), tg:2 (concepts), tg:3 (photos)."""
    path = tmp_path / "full.zip"
    report = export_scopes(source, None, path, photos=source_photos)
    assert (report.scopes, report.concepts, report.examples, report.photos) == (3, 3, 4, 3)
    return path


@pytest.fixture
def target_photos(tmp_path: Path):
    """A photo store with a chat of its own, which a refused import must leave as it was."""
    photos = photo_store(tmp_path / "target-photos")
    photos.set_indexing("dc:9", True)
    photos.add("dc:9", unit(70), jpeg(70), "erin", 5.0, "dc-file")
    yield photos
    photos.close()


def test_photo_history_round_trip(source, source_photos, full, target_photos) -> None:
    with zipfile.ZipFile(full) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        names = set(zf.namelist())
    assert {PHOTOS, PHOTO_EMBEDDINGS, "thumbs/00000000.jpg", "thumbs/00000002.jpg"} <= names
    assert "thumbs/00000003.jpg" not in names
    assert manifest["version"] == 2
    assert manifest["photos"] == {
        "model_id": MODEL,
        "dim": DIM,
        "count": 3,
        "indexing": {"tg:1": True, "tg:2": False, "tg:3": True},
    }
    assert manifest["counts"] == {"scopes": 3, "concepts": 3, "examples": 4}
    assert [(s["scope"], s["concepts"], s["photos"]) for s in manifest["scopes"]] == [
        ("tg:1", 2, 2),
        ("tg:2", 1, 0),
        ("tg:3", 0, 1),
    ]

    target = qdrant()
    report = import_archive(full, target, photos=target_photos)
    assert (report.scopes, report.concepts, report.examples) == (3, 3, 4)
    assert (report.photos, report.photos_skipped, report.photos_reembedded) == (3, 0, False)
    assert target.scopes() == ["tg:1", "tg:2"]
    assert target_photos.scopes() == ["dc:9", "tg:1", "tg:3"]
    for scope in ("tg:1", "tg:2", "tg:3"):
        assert photo_rows(target_photos, scope) == photo_rows(source_photos, scope)
        assert target_photos.indexing(scope) == source_photos.indexing(scope)
        assert photo_answers(target_photos, scope) == photo_answers(source_photos, scope)
    assert [h.source for h in target_photos.search("dc:9", unit(11), 10)] == ["dc-file"]

    again = import_archive(full, target, photos=target_photos)  # idempotent
    assert (again.concepts, again.examples, again.photos, again.photos_skipped) == (0, 0, 0, 3)
    assert target_photos.total() == 4
    # Posters are kept: forgetting one finds their photos in the restored store.
    assert target_photos.delete_user("carol") == 1
    assert photo_rows(target_photos, "tg:3") == []
    # Without a photo store the photo history is left out (concepts only).
    assert import_archive(full, qdrant()).photos == 0


def test_photo_history_into_another_chat_and_replace(
    source, source_photos, target_photos, tmp_path
) -> None:
    one = tmp_path / "tg3.zip"
    with pytest.raises(InvalidInputError, match="nothing to export in chat 'tg:3'"):
        export_scopes(source, ["tg:3"], one)  # without the photos, tg:3 holds nothing
    report = export_scopes(source, ["tg:3"], one, photos=source_photos)
    assert (report.scopes, report.concepts, report.photos) == (1, 0, 1)

    target = qdrant()
    fill(target)
    target_photos.add("tg:9", unit(72), jpeg(72), "erin", 7.0, file_id(72))  # /index is off
    moved = import_archive(
        one, target, scope_map={"tg:3": "tg:9"}, photos=target_photos, include_photos=True
    )
    assert (moved.scopes, moved.concepts, moved.photos) == (1, 0, 1)
    assert [p[0] for p in photo_rows(target_photos, "tg:9")] == [file_id(72), file_id(13)]
    assert not target_photos.indexing("tg:9")  # tg:3's /index on is not copied onto tg:9
    assert photo_rows(target_photos, "tg:3") == [] and not target_photos.indexing("tg:3")
    assert target.scopes() == ["tg:1", "tg:2"]  # concepts untouched

    # A restore (replace) makes the chat what the archive holds: its own photo is forgotten,
    # its concepts too (the archive says the chat had none), other chats are not touched.
    target.add_concept(
        "tg:9",
        name="Zed",
        description="",
        category="",
        owner="erin",
        embedding=unit(60),
        crop_jpeg=jpeg(60),
        box=Box(0, 0, 5, 5),
    )
    target_photos.add("tg:1", unit(71), jpeg(71), "erin", 6.0, "tg1-file")
    replaced = import_archive(
        one,
        target,
        scope_map={"tg:3": "tg:9"},
        mode="replace",
        photos=target_photos,
        include_photos=True,
    )
    assert (replaced.photos, replaced.photos_skipped) == (1, 0)
    assert [p[0] for p in photo_rows(target_photos, "tg:9")] == [file_id(13)]
    assert target.list_concepts("tg:9") == []
    assert not target_photos.indexing("tg:9")  # replace of a renamed chat: its flag stays too
    assert [p[0] for p in photo_rows(target_photos, "tg:1")] == ["tg1-file"]
    assert target.scopes() == ["tg:1", "tg:2"]


def _fake_encoder(dim: int):
    """Thumbnail JPEGs -> unit rows derived from their bytes (a stand-in search encoder)."""
    calls: list[int] = []

    def embed(thumbnails: list[bytes]) -> np.ndarray:
        calls.append(len(thumbnails))
        return np.stack([unit(int.from_bytes(t[-8:], "little"), dim) for t in thumbnails])

    return embed, calls


def test_photos_of_another_encoder_are_embedded_again(source, full, tmp_path) -> None:
    target = qdrant()
    photos = photo_store(tmp_path / "cir", "cir-lvlm:test", 8)
    with pytest.raises(InvalidInputError, match="embedded again from their thumbnails"):
        import_archive(full, target, photos=photos)  # no embedder: refused, nothing written
    embed, calls = _fake_encoder(9)
    with pytest.raises(InvalidInputError, match=r"shape \(3, 9\)"):
        import_archive(full, target, photos=photos, photo_embedder=embed)
    assert (target.count(), photos.total(), photos.scopes()) == (0, 0, [])

    embed, calls = _fake_encoder(8)
    report = import_archive(full, target, photos=photos, photo_embedder=embed)
    assert (report.photos, report.photos_reembedded, report.reembedded) == (3, True, False)
    assert calls == [3]
    for scope, seed, _ in PHOTO_ROWS:
        hit = photos.search(scope, embed([jpeg(seed)])[0], 1)[0]
        assert hit.source == file_id(seed) and hit.score == pytest.approx(1, abs=1e-5)
    assert photos.indexing("tg:1") and photos.indexing("tg:3") and not photos.indexing("tg:2")
    again = import_archive(full, target, photos=photos, photo_embedder=embed)
    assert (again.photos, again.photos_skipped) == (0, 3)


def test_the_engine_embeds_the_thumbnails_again(tiny_engine, full) -> None:
    """`rapbot import`'s photo embedder: Engine.embed_thumbnails (the configured encoder)."""
    photos = tiny_engine.photos
    assert photos.model_id != MODEL
    report = import_archive(
        full,
        tiny_engine.store,
        embedder=tiny_engine.models.embedder,
        photos=photos,
        photo_embedder=tiny_engine.embed_thumbnails,
    )
    assert (report.photos, report.photos_reembedded, report.reembedded) == (3, True, True)
    for scope, seed, _ in PHOTO_ROWS:
        hit = tiny_engine.search(scope, "", jpeg(seed), k=1)[0]
        assert hit.source == file_id(seed) and hit.score == pytest.approx(1, abs=1e-4)


def test_a_photo_index_of_another_encoder_is_not_written_to(source, full, tmp_path) -> None:
    """A photo store that holds another encoder's vectors (opened as the engine does, not
    strict) takes no photos: the import is refused before anything is written."""
    photo_store(tmp_path / "old", "open_clip:retired", 8).close()
    stale = photo_store(tmp_path / "old", MODEL, DIM, strict=False)
    target = qdrant()
    with pytest.raises(InvalidInputError, match="index --rebuild") as caught:
        import_archive(full, target, photos=stale)
    assert str(caught.value).endswith("Nothing was imported.")
    assert (target.count(), stale.total(), stale.scopes()) == (0, 0, [])
    stale.close()


def test_a_version_1_archive_still_imports(archive, target, target_photos, tmp_path) -> None:
    """An export made before the photo history was in it: concepts only; the photo store's
    chats and flags stay as they are, even with --replace."""
    v1 = rewrite(archive, tmp_path / "v1.zip", put=manifest_with(archive, version=1))
    before = photo_state(target_photos)
    report = import_archive(v1, target, photos=target_photos, mode="replace")
    assert (report.scopes, report.concepts, report.examples, report.photos) == (2, 3, 4, 0)
    assert photo_state(target_photos) == before
    assert [c.name for c in target.list_concepts("tg:1")] == ["Bo", "Mochi"]


def _photo_lines_with(src: Path, index: int, **changes) -> dict[str, bytes]:
    return lines_with(src, PHOTOS, index, **changes)


def _photo_lines_dropped(src: Path, index: int) -> dict[str, bytes]:
    with zipfile.ZipFile(src) as zf:
        lines = zf.read(PHOTOS).splitlines(keepends=True)
    return {PHOTOS: b"".join(lines[:index] + lines[index + 1 :])}


def _photos_manifest(src: Path, **changes) -> dict[str, bytes]:
    with zipfile.ZipFile(src) as zf:
        photos = json.loads(zf.read(MANIFEST))["photos"]
    return manifest_with(src, photos={**photos, **changes})


BAD_PHOTOS = {
    "thumb-not-jpeg": (
        lambda a, d: rewrite(a, d, put={"thumbs/00000001.jpg": b"GIF89a...."}),
        "thumbs/00000001.jpg that is not a JPEG",
    ),
    "thumb-missing": (
        lambda a, d: rewrite(a, d, drop={"thumbs/00000002.jpg"}),
        "misses thumbs/00000002.jpg",
    ),
    "thumb-extra": (
        lambda a, d: rewrite(a, d, extra={"thumbs/00000003.jpg": jpeg(1)}),
        "thumbnails no photo refers to",
    ),
    "photo-embeddings-missing": (
        lambda a, d: rewrite(a, d, drop={PHOTO_EMBEDDINGS}),
        "has no photo_embeddings.npy",
    ),
    "photo-embeddings-shape": (
        lambda a, d: rewrite(a, d, put={PHOTO_EMBEDDINGS: npy(np.zeros((3, DIM + 1), "<f4"))}),
        "shape (3, 17)",
    ),
    "photo-embeddings-rows": (
        lambda a, d: rewrite(a, d, put={PHOTO_EMBEDDINGS: npy(np.stack([unit(1)] * 2))}),
        "shape (2, 16)",
    ),
    "photo-embeddings-long": (
        lambda a, d: rewrite(a, d, put={PHOTO_EMBEDDINGS: npy(np.full((3, DIM), 9, "<f4"))}),
        "not unit length",
    ),
    "photo-embeddings-nan": (
        lambda a, d: rewrite(a, d, put={PHOTO_EMBEDDINGS: npy(np.full((3, DIM), np.nan, "<f4"))}),
        "not finite",
    ),
    "photo-embeddings-float64": (
        lambda a, d: rewrite(
            a, d, put={PHOTO_EMBEDDINGS: npy(np.stack([unit(s) for s in (1, 2, 3)]).astype("<f8"))}
        ),
        "float64",
    ),
    "photo-scope-type": (
        lambda a, d: rewrite(a, d, put=_photo_lines_with(a, 0, scope=5)),
        "bad photo at line 1 of photos.jsonl",
    ),
    "photo-scope-unlisted": (
        lambda a, d: rewrite(a, d, put=_photo_lines_with(a, 2, scope="tg:99")),
        "chat its manifest does not list at line 3",
    ),
    "photo-poster": (
        lambda a, d: rewrite(a, d, put=_photo_lines_with(a, 1, poster="bob\x00")),
        "bad photo at line 2",
    ),
    "photo-time": (
        lambda a, d: rewrite(a, d, put=_photo_lines_with(a, 0, posted_at="yesterday")),
        "bad photo at line 1",
    ),
    "photo-source": (
        lambda a, d: rewrite(a, d, put=_photo_lines_with(a, 0, source="")),
        "bad photo at line 1",
    ),
    "photo-repeated": (
        lambda a, d: rewrite(a, d, put=_photo_lines_with(a, 1, source=file_id(11))),
        "repeated photo at line 2",
    ),
    "photo-count": (
        lambda a, d: rewrite(a, d, put=_photos_manifest(a, count=4)),
        "(3 indexed photos, not 4)",
    ),
    "photo-line-missing": (
        lambda a, d: rewrite(a, d, put=_photo_lines_dropped(a, 2)),
        "(2 indexed photos, not 3)",
    ),
    "scopes-count": (
        lambda a, d: rewrite(
            a, d, put=manifest_with(a, counts={"scopes": 2, "concepts": 3, "examples": 4})
        ),
        "manifest says",
    ),
    "photo-flag": (
        lambda a, d: rewrite(a, d, put=_photos_manifest(a, indexing={"tg:1": "yes", "tg:3": True})),
        "invalid photos entry",
    ),
    "photo-model": (
        lambda a, d: rewrite(a, d, put=_photos_manifest(a, model_id="")),
        "which model embedded its indexed photos",
    ),
    "no-photos-entry": (
        lambda a, d: rewrite(a, d, put=manifest_with(a, photos=None)),
        "unexpected file",
    ),
    "v1-with-photos": (
        lambda a, d: rewrite(a, d, put=manifest_with(a, version=1)),
        "unexpected file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PHOTOS))
def test_a_bad_photo_history_is_refused_and_nothing_changes(
    case, full, target, target_photos, tmp_path
) -> None:
    make, expected = BAD_PHOTOS[case]
    bad = make(full, tmp_path / f"{case}.zip")
    before = (target.scopes(), snapshot(target, "tg:1"), target.count(), photo_state(target_photos))
    with pytest.raises(ArchiveError) as caught:
        import_archive(bad, target, photos=target_photos)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert message.endswith("Nothing was imported.")
    after = (target.scopes(), snapshot(target, "tg:1"), target.count(), photo_state(target_photos))
    assert after == before


def test_too_many_photos_are_refused_up_front(full, target, target_photos) -> None:
    with pytest.raises(ArchiveError, match="holds 3 indexed photos, more than"):
        import_archive(full, target, photos=target_photos, limits=ArchiveLimits(max_photos=2))
    assert target_photos.total() == 1


# ----------------------------------------------------------------------------- consent


def test_a_renamed_chat_takes_neither_the_flag_nor_the_photos_unless_asked(
    source, source_photos, target_photos, tmp_path
) -> None:
    """`rapbot import x.zip --chat B`: chat A's /index on (an admin's decision, A's) is never
    copied onto B, and A's photo history (other people's photos and user ids) goes into B
    only when asked (include_photos=True)."""
    one = tmp_path / "tg1.zip"
    export_scopes(source, ["tg:1"], one, photos=source_photos)  # /index on, 2 photos
    target = qdrant()
    before = photo_state(target_photos)
    moved = import_archive(one, target, scope_map={"tg:1": "tg:9"}, photos=target_photos)
    assert photo_state(target_photos) == before and not target_photos.indexing("tg:9")
    assert photo_rows(target_photos, "tg:9") == []
    assert (moved.scopes, moved.concepts, moved.photos, moved.photos_left_out) == (1, 2, 0, 2)
    assert [c.name for c in target.list_concepts("tg:9")] == ["Bo", "Mochi"]  # concepts go in

    asked = import_archive(
        one, target, scope_map={"tg:1": "tg:9"}, photos=target_photos, include_photos=True
    )
    assert (asked.photos, asked.photos_left_out) == (2, 0)
    assert [p[0] for p in photo_rows(target_photos, "tg:9")] == [file_id(11), file_id(12)]
    assert not target_photos.indexing("tg:9")  # still B's own decision

    # B had /index on and the archive says off (tg:2): a renamed import leaves B's flag alone,
    # in replace mode too.
    two = tmp_path / "tg2.zip"
    export_scopes(source, ["tg:2"], two, photos=source_photos)
    target_photos.set_indexing("tg:8", True)
    for mode in ("merge", "replace"):
        import_archive(
            two,
            target,
            scope_map={"tg:2": "tg:8"},
            mode=mode,
            photos=target_photos,
            include_photos=True,
        )
        assert target_photos.indexing("tg:8")
    # Into its own chat the archive's flag is applied (a restore), in either mode.
    for mode, flag in (("merge", False), ("replace", True)):
        target_photos.set_indexing("tg:1", flag)
        import_archive(one, target, mode=mode, photos=target_photos)
        assert target_photos.indexing("tg:1")
    # include_photos=False: concepts only, the photo store is not touched at all.
    target_photos.set_indexing("tg:1", False)
    state = photo_state(target_photos)
    none = import_archive(one, target, photos=target_photos, include_photos=False)
    assert (none.photos, none.photos_left_out) == (0, 2)
    assert photo_state(target_photos) == state


def test_cli_import_into_another_chat_and_export_without_photos(cli, tmp_path) -> None:
    photos = [_photo(tmp_path / f"p{seed}.jpg", seed) for seed in (31, 32)]
    code, _, err = cli("--chat", "cli:1", "index", *photos)
    assert code == 0, err
    code, _, err = cli("--chat", "cli:1", "remember", photos[0], "Mochi", "--box", "10,10,150,150")
    assert code == 0, err

    # --no-photos: the concepts alone, e.g. to share them; says what was left out.
    shared = tmp_path / "shared.zip"
    code, out, err = cli("--chat", "cli:1", "export", "--no-photos", "--out", shared)
    assert code == 0, err
    assert "Exported 1 concept(s) with 1 photo(s) from 1 chat" in out
    assert "the photo search history (2 photo(s)) and the /index settings were left out" in out
    with zipfile.ZipFile(shared) as zf:
        assert "photos" not in json.loads(zf.read(MANIFEST))
        assert not [n for n in zf.namelist() if n == PHOTOS or n.startswith("thumbs/")]
    code, out, err = cli("--json", "export", "--all", "--no-photos", "--out", shared)
    assert code == 0, err
    assert json.loads(out)["exported"]["photos_left_out"] == 2
    code, out, err = cli("--json", "--chat", "cli:2", "import", shared)
    assert code == 0, err
    assert json.loads(out)["imported"]["photos_left_out"] == 0  # nothing of it in the file

    # Into another chat: the photos only with --with-photos, and the count is said.
    full = tmp_path / "full.zip"
    code, _, err = cli("--chat", "cli:1", "export", "--out", full)
    assert code == 0, err
    code, out, err = cli("--json", "--chat", "cli:3", "import", full, "--replace")
    assert code == 0, err
    imported = json.loads(out)["imported"]
    assert (imported["concepts"], imported["photos"], imported["photos_left_out"]) == (1, 0, 2)
    code, out, err = cli("--chat", "cli:4", "import", full)
    assert "2 photo(s) of the search history were left out" in out
    assert "imported into cli:4 only with --with-photos" in out

    code, out, _ = cli("import", "--help")
    help_text = " ".join(out.split())
    assert "forget the chat's concepts, and the indexed photos the archive replaces, first" in (
        help_text
    )
    assert "--with-photos" in help_text
    code, out, _ = cli("export", "--help")
    assert "--no-photos" in out


# ----------------------------------------------------------------------------- restores


def test_a_failed_replace_leaves_each_chats_photos(source, full, monkeypatch, tmp_path) -> None:
    """--replace writes the concepts first, then replaces each chat's photos in one
    transaction: a failure in either leaves the chat's old photos where they were."""
    from engine.backup import Archive

    target = qdrant()
    photos = photo_store(tmp_path / "restored")
    import_archive(full, target, photos=photos)
    photos.add("tg:3", unit(80), jpeg(80), "dave", 8.0, file_id(80))  # since the backup
    photos.add("tg:1", unit(81), jpeg(81), "dave", 8.0, file_id(81))
    before = photo_state(photos)
    versions = {scope: _scope_version(photos, scope) for scope in ("tg:1", "tg:3")}

    def refuse(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:  # the concept write fails
        patch.setattr(target, "add_concept", refuse)
        with pytest.raises(RuntimeError, match="disk full"):
            import_archive(full, target, mode="replace", photos=photos)
    assert photo_state(photos) == before

    thumbnail = Archive.thumbnail
    with monkeypatch.context() as patch:  # a photo write fails: tg:3's photo (row 2)
        patch.setattr(
            Archive, "thumbnail", lambda self, row: refuse() if row == 2 else thumbnail(self, row)
        )
        with pytest.raises(RuntimeError, match="disk full"):
            import_archive(full, target, mode="replace", photos=photos)
    assert photo_rows(photos, "tg:3") == before["rows"]["tg:3"]  # its old photos, all there
    assert [p[0] for p in photo_rows(photos, "tg:1")] == [file_id(11), file_id(12)]  # replaced
    assert _scope_version(photos, "tg:1") > versions["tg:1"]
    assert photo_answers(photos, "tg:3", seeds=(13, 80))[1][0][0] == file_id(80)

    report = import_archive(full, target, mode="replace", photos=photos)  # now it works
    assert (report.photos, report.photos_skipped) == (3, 0)
    assert [p[0] for p in photo_rows(photos, "tg:3")] == [file_id(13)]
    assert _scope_version(photos, "tg:3") > versions["tg:3"]


def _scope_version(photos: PhotoStore, scope: str) -> int:
    from engine.store.faiss_store import scope_version

    return scope_version(photos._db, scope)


def test_replace_scope_is_one_transaction(tmp_path) -> None:
    photos = photo_store(tmp_path / "p")
    photos.add("tg:1", unit(1), jpeg(1), "alice", 1.0, file_id(1))
    assert [h.source for h in photos.search("tg:1", unit(1), 5)] == [file_id(1)]  # cached index
    rows = [(unit(s), jpeg(s), "bob", 2.0, file_id(s)) for s in (2, 3)]
    assert photos.replace_scope("tg:1", iter(rows), indexing=True) == 2
    assert [h.source for h in photos.search("tg:1", unit(2), 5)][0] == file_id(2)  # not stale
    assert photos.indexing("tg:1") and photos.count("tg:1") == 2
    bad = [(unit(4), jpeg(4), "bob", 2.0, file_id(4)), (np.zeros(3), jpeg(5), "bob", 2.0, "x")]
    with pytest.raises(InvalidInputError):
        photos.replace_scope("tg:1", bad, indexing=False)
    assert [p[0] for p in photo_rows(photos, "tg:1")] == [file_id(2), file_id(3)]
    assert photos.indexing("tg:1")
    assert photos.replace_scope("tg:1", [], None) == 0 and photos.indexing("tg:1")
    photos.close()


# ----------------------------------------------------------------------------- re-embedding


def _failing_encoder(dim: int, fail_at: int):
    """The fake search encoder, raising on its ``fail_at``-th call (an interruption)."""
    embed, calls = _fake_encoder(dim)

    def interrupted(thumbnails: list[bytes]) -> np.ndarray:
        if len(calls) + 1 == fail_at:
            calls.append(-1)
            raise KeyboardInterrupt
        return embed(thumbnails)

    return interrupted


HALF = "The photo index is half re-embedded (an interrupted `rapbot index --rebuild`): run it again"


def test_an_interrupted_reembed_is_refused_until_it_is_run_again(
    source, source_photos, tmp_path
) -> None:
    """reembed() updates the vectors batch by batch and the meta at the end: in between, the
    vectors are part old, part new, and nothing may use or export them as either model's."""
    from engine.errors import StoreError

    other = photo_store(source_photos.root)  # another process, opened before the re-embed
    with pytest.raises(KeyboardInterrupt):
        source_photos.reembed(_failing_encoder(DIM, fail_at=2), batch_size=1)
    out = tmp_path / "half.zip"
    for photos in (source_photos, other, photo_store(source_photos.root)):  # and a new one
        with pytest.raises(StoreError) as caught:
            photos.recorded_model()
        assert str(caught.value) == f"{HALF} before exporting."
        with pytest.raises(StoreError, match="before exporting"):
            export_scopes(source, None, out, photos=photos)
        assert not out.exists() and not list(tmp_path.glob(".half.zip.*"))
        with pytest.raises(StoreError, match=r"half re-embedded .*: run it again"):
            photos.search("tg:1", unit(11), 3)
        with pytest.raises(StoreError, match=r"half re-embedded .*: run it again"):
            photos.add("tg:1", unit(90), jpeg(90), "erin", 9.0, file_id(90))
        with pytest.raises(StoreError, match=r"half re-embedded .*: run it again"):
            photos.add_many("tg:1", [(unit(90), jpeg(90), "erin", 9.0, file_id(90))])
    assert export_scopes(source, None, out).photos == 0  # concepts alone: nothing to mislabel
    # Flags, counts and deletions still work (/index off, /forget_me).
    assert other.indexing("tg:1") and other.count("tg:1") == 2

    again = photo_store(source_photos.root)  # `rapbot index --rebuild` again: completes it
    assert again.mismatch is not None and again.mismatch.startswith(HALF)
    embed, calls = _fake_encoder(DIM)
    assert again.reembed(embed, batch_size=1) == 3 and calls == [1, 1, 1]
    assert again.recorded_model() == (MODEL, DIM) and again.mismatch is None
    for scope, seed, _ in PHOTO_ROWS:  # every vector is the new encoder's
        hit = again.search(scope, embed([jpeg(seed)])[0], 1)[0]
        assert hit.source == file_id(seed) and hit.score == pytest.approx(1, abs=1e-5)
    assert other.search("tg:3", embed([jpeg(13)])[0], 1)[0].source == file_id(13)
    assert export_scopes(source, None, out, photos=again).photos == 3
    other.close()
    again.close()


def test_the_engine_rebuild_completes_an_interrupted_one(tiny_engine, tmp_path) -> None:
    """`rapbot index --rebuild` (Engine.reindex_photos) runs again on a half re-embedded index
    even though its recorded model is the configured one, and searches work again after."""
    from engine.errors import StoreError

    for seed in (41, 42, 43):
        tiny_engine.index_photo("cli:1", jpeg(seed, 160), "me", f"/photos/{seed}.jpg", force=True)
    failing = _failing_encoder(tiny_engine.photos.dim, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        tiny_engine.photos.reembed(failing, batch_size=1)
    with pytest.raises(StoreError, match="half re-embedded"):
        tiny_engine.search("cli:1", "", jpeg(41, 160))
    with pytest.raises(StoreError, match="half re-embedded"):
        tiny_engine.index_photo("cli:1", jpeg(44, 160), "me", "/photos/44.jpg", force=True)
    assert tiny_engine.reindex_photos() == 3  # not "already matches"
    assert tiny_engine.photos.mismatch is None
    assert tiny_engine.search("cli:1", "", jpeg(41, 160), k=1)[0].source == "/photos/41.jpg"


# ----------------------------------------------------------------------------- foreign sources


@pytest.mark.parametrize(
    "scope, source, fits",
    [
        ("tg:-100123", "AgACAgIAAxkBAAIBZ2XyAAE", True),
        ("tg:-100123", "document:BQACAgIAAxkBAAIBZ2XyAAE", True),
        ("tg:1", "document:credentials", False),  # a file of the bot's folder, not an id
        ("tg:1", "AgACAgIAAxkBAAIBZ2X", False),  # too short for a real file id
        ("tg:1", "short", False),
        ("tg:1", "https://evil.example/a.jpg", False),
        ("tg:1", "document:https://evil.example/a.jpg", False),
        ("tg:1", "http://10.0.0.1/x", False),
        ("tg:1", "/home/me/photo.jpg", False),
        ("tg:1", "AgACAgIAAxkBAAI\n", False),
        ("dc:42", "https://discord.com/channels/1/42/1000", True),
        ("dc:42", "https://discord.com/channels/1/42/1000#2", True),
        ("dc:42", "https://discord.com/channels/@me/42/1000", True),
        ("dc:42", "https://ptb.discord.com/channels/1/42/1000", True),
        ("dc:42", "https://canary.discord.com/channels/1/42/1000#3", True),
        ("dc:42", "https://discord.com/channels/1/42/1000/evil", False),
        ("dc:42", "https://discord.com.evil.example/channels/1/42/1000", False),
        ("dc:42", "http://discord.com/channels/1/42/1000", False),
        ("dc:42", "https://discord.com/channels/١/42/1000", False),  # Arabic-Indic digit
        ("dc:42", "AgACAgIAAxkBAAIBZ2X", False),
        ("local", "/home/me/photo.jpg", True),
        ("cli:1", "https://example.com/x.jpg", True),
    ],
)
def test_source_fits_the_platform(scope, source, fits) -> None:
    """Each platform's adapter owns its source form (bots.core.platforms); the engine none."""
    from bots.core.platforms import source_fits

    assert source_fits(scope, source) is fits


def test_photos_whose_sources_dont_fit_the_chat_are_skipped(
    source, full, target, target_photos, tmp_path
) -> None:
    """Telegram sends search results by source and fetches a URL: an archive's source must be
    what the target chat's platform indexes, else that photo (only) is skipped and counted.
    The rule is the platforms' (bots.core.platforms), handed to the engine as the CLI does."""
    from bots.core.platforms import source_fits

    url = "https://evil.example/track.jpg"
    step = rewrite(full, tmp_path / "step.zip", put=_photo_lines_with(full, 0, source=url))
    link = "https://discord.com/channels/1/5/77"
    foreign = rewrite(step, tmp_path / "foreign.zip", put=_photo_lines_with(step, 2, source=link))
    report = import_archive(foreign, target, photos=target_photos, source_fits=source_fits)
    assert [p[0] for p in photo_rows(target_photos, "tg:1")] == [file_id(12)]
    assert photo_rows(target_photos, "tg:3") == []
    assert url not in str(photo_state(target_photos))
    assert (report.photos, report.photos_skipped_foreign, report.photos_left_out) == (1, 2, 0)
    # The same photos fit other chats: a Discord link into a Discord chat, anything locally.
    moved = import_archive(
        foreign,
        qdrant(),
        scope_map={"tg:3": "dc:5", "tg:1": "local"},
        photos=target_photos,
        include_photos=True,
        source_fits=source_fits,
    )
    assert (moved.photos, moved.photos_skipped_foreign) == (3, 0)
    assert [p[0] for p in photo_rows(target_photos, "dc:5")] == [link]
    assert [p[0] for p in photo_rows(target_photos, "local")] == [url, file_id(12)]
    # Replace mode checks them too.
    replaced = import_archive(
        foreign, target, mode="replace", photos=target_photos, source_fits=source_fits
    )
    assert (replaced.photos, replaced.photos_skipped_foreign) == (1, 2)
    assert [p[0] for p in photo_rows(target_photos, "tg:1")] == [file_id(12)]
