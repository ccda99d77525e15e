"""Issue 11, parts 2, 3 (import side) and 7: a crafted archive changes nothing.

Every record is validated with the live limits (one validator), every crop and thumbnail is
decoded by the safe decoder, members are streamed and capped by the bytes they really unpack
to, and merge and replace are one transaction on FAISS and on Qdrant.
"""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from engine.backup import (
    CONCEPTS,
    EXAMPLES,
    PHOTOS,
    ArchiveError,
    ArchiveLimits,
    export_scopes,
    import_archive,
)
from engine.errors import InvalidInputError
from engine.store.base import ConceptStore
from tests.test_transfer import faiss, fill, fill_photos, jpeg, lines_with, photo_store, qdrant
from tests.test_transfer import rewrite as _rewrite


def dump(store: ConceptStore) -> list[tuple]:
    """Everything the store holds, byte for byte (crops, vectors), without nothing left out."""
    return [
        (
            ex.scope,
            ex.concept_id,
            ex.name,
            ex.description,
            ex.category,
            ex.owner,
            ex.example_id,
            ex.box,
            ex.crop_jpeg,
            ex.embedding.tobytes(),
            ex.source,
            ex.added_by,
        )
        for scope in store.scopes()
        for ex in store.examples(scope)
    ]


@pytest.fixture(params=["faiss", "qdrant"])
def target(request, tmp_path: Path):
    """Two concepts in tg:1 (and one in tg:2) that a refused or failed import must keep."""
    store = qdrant() if request.param == "qdrant" else faiss(tmp_path / "target")
    fill(store)
    yield store
    store.close()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    store = faiss(tmp_path / "source")
    photos = photo_store(tmp_path / "source-photos")
    fill(store)
    fill_photos(photos)
    path = tmp_path / "chat.zip"
    export_scopes(store, None, path, photos=photos)
    store.close()
    photos.close()
    return path


def rewrite(archive: Path, name: str, **put) -> Path:
    return _rewrite(archive, archive.with_name(f"{name}.zip"), put=put.get("put"))


# ----------------------------------------------------------------------------- part 2


@pytest.mark.parametrize("mode", ["replace", "merge"])
def test_a_box_of_1e20_changes_nothing(archive, target, mode) -> None:
    """Before: the box passed (ints only), replace deleted the chat, then the write failed
    with OverflowError: one of the chat's concepts was gone."""
    before = dump(target)
    bad = rewrite(archive, "box", put=lines_with(archive, EXAMPLES, 3, box=[0, 0, 10**20, 5]))
    with pytest.raises(ArchiveError, match="bad example at line 4"):
        import_archive(bad, target, mode=mode)
    assert dump(target) == before


@pytest.mark.parametrize("mode", ["replace", "merge"])
def test_a_failure_half_way_through_the_writes_is_rolled_back(
    archive, target, mode, monkeypatch
) -> None:
    """Merge and replace are one transaction: the disk filling up at the third write (after
    replace deleted the chat and wrote two photos) leaves the store as it was."""
    before = dump(target)
    renamed = _rewrite(archive, archive.with_name("renamed.zip"))  # same content
    calls = {"n": 0}
    real_add_example, real_add_concept = target.add_example, target.add_concept

    def failing(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(target, "add_example", failing(real_add_example))
    monkeypatch.setattr(target, "add_concept", failing(real_add_concept))
    # A merge into other chats, so that every photo is written (none is there already).
    scope_map = {"tg:1": "tg:7", "tg:2": "tg:9"} if mode == "merge" else None
    with pytest.raises(OSError, match="No space"):
        import_archive(renamed, target, mode=mode, scope_map=scope_map)
    monkeypatch.undo()
    assert dump(target) == before
    # And the store still works: the same import now goes through.
    import_archive(renamed, target, mode=mode, scope_map=scope_map)
    assert len(target.list_concepts("tg:7" if mode == "merge" else "tg:1")) == 2


# ----------------------------------------------------------------------------- part 3


def _concept_lines(archive: Path, **changes) -> dict[str, bytes]:
    return lines_with(archive, CONCEPTS, 0, **changes)


CRAFTED = {
    # The live limits (64 characters, 300 for a description), not the archive's own.
    "200-char name": lambda a: _concept_lines(a, name="M" * 200),
    "4000-char description": lambda a: _concept_lines(a, description="d" * 4000),
    "control chars in scope": lambda a: _concept_lines(a, scope="tg:1\x1b[2J"),
    "escape in owner": lambda a: _concept_lines(a, owner="alice\x1b]0;pwned\x07"),
    "look-alike names": lambda a: lines_with(a, CONCEPTS, 1, name="Моchi"),  # Cyrillic М, о
    "escape in example source": lambda a: lines_with(a, EXAMPLES, 0, source="m\x1b[31m1"),
    "negative box": lambda a: lines_with(a, EXAMPLES, 0, box=[-5, 0, 10, 10]),
    "escape in photo source": lambda a: lines_with(a, PHOTOS, 0, source="AgAC\x1b]52;c;x\x07"),
    "newline in photo source": lambda a: lines_with(a, PHOTOS, 0, source="AgACAgIAAx\nkBAAI"),
    "NaN time": lambda a: lines_with(a, PHOTOS, 0, posted_at=float("nan")),
    "JPEG magic + junk crop": lambda a: {"crops/00000001.jpg": b"\xff\xd8\xff" + b"junk" * 50},
    "JPEG magic + junk thumbnail": lambda a: {
        "thumbs/00000000.jpg": b"\xff\xd8\xff\xe0" + b"x" * 99
    },
    "crop declaring 65500x65500": lambda a: {"crops/00000000.jpg": _jpeg_declaring(65500, 65500)},
    "strip crop": lambda a: {"crops/00000000.jpg": _strip_jpeg()},
}


def _jpeg_declaring(width: int, height: int) -> bytes:
    from tests.badfiles import _jpeg_with_size, sample_jpeg

    return _jpeg_with_size(sample_jpeg(), width, height)


def _strip_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2100, 100)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_import_applies_the_live_checks(case, archive, target) -> None:
    before = dump(target)
    bad = _rewrite(archive, archive.with_name("bad.zip"), put=CRAFTED[case](archive))
    with pytest.raises(ArchiveError) as caught:
        import_archive(bad, target, mode="replace")
    message = str(caught.value)
    assert "\n" not in message and message.endswith("Nothing was imported.")
    assert "\x1b" not in message
    assert dump(target) == before


def test_a_merge_refuses_a_look_alike_of_a_name_in_the_target(archive, target) -> None:
    target.rename("tg:2", target.list_concepts("tg:2")[0].id, "Luna")
    bad = _rewrite(
        archive, archive.with_name("b.zip"), put=lines_with(archive, CONCEPTS, 2, name="Lunа")
    )
    before = dump(target)
    with pytest.raises(Exception, match="looks like 'Luna'"):
        import_archive(bad, target)
    assert dump(target) == before


# ----------------------------------------------------------------------------- part 7


def _bomb(archive: Path, member: str, size: int, line: bool) -> Path:
    """The archive with ``member`` replaced by ``size`` bytes that compress ~1000:1 (one line,
    or many short lines), written in chunks so the test itself never holds them."""
    out = archive.with_name(f"bomb-{member}.zip")
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info.filename, zin.read(info.filename))
                continue
            with zout.open(member, "w", force_zip64=True) as sink:
                block = (b"x" if line else b"{}\n") * (1024 * 1024 // (1 if line else 3))
                for _ in range(size // len(block)):
                    sink.write(block)
    return out


@pytest.mark.parametrize(
    "member, line, limits",
    [
        (CONCEPTS, True, ArchiveLimits()),  # one endless line
        (EXAMPLES, False, ArchiveLimits()),  # endless short lines
        (PHOTOS, False, ArchiveLimits(max_lines_bytes=4 * 1024**2)),  # the member's own cap
    ],
)
def test_a_zip_bomb_is_refused_with_bounded_memory(archive, tmp_path, member, line, limits):
    """A jsonl member that unpacks to 64 MB from under 1 MB: the import is refused after
    reading a bounded prefix, holding a few MB, never the member (before: read whole)."""
    bomb = _bomb(archive, member, 64 * 1024 * 1024, line)
    assert bomb.stat().st_size < 1024 * 1024
    target = faiss(tmp_path / "bombed")
    fill(target)
    before = dump(target)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError) as caught:
            import_archive(bomb, target, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * 1024 * 1024, peak
    assert "Nothing was imported" in str(caught.value)
    assert dump(target) == before
    target.close()


def test_members_are_capped_by_the_bytes_they_really_unpack_to(archive, target) -> None:
    """The whole archive's budget counts real bytes: declared sizes within it do not help."""
    with zipfile.ZipFile(archive) as zf:
        real = sum(info.file_size for info in zf.infolist())
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["counts"]["examples"] == 4
    before = dump(target)
    with pytest.raises(ArchiveError, match="unpacks to more than|would unpack to"):
        import_archive(archive, target, limits=ArchiveLimits(max_bytes=real - 1))
    assert dump(target) == before
    assert jpeg(1)  # the fixture's photos are real JPEGs (the import below decodes them)
    import_archive(archive, target, limits=ArchiveLimits(max_bytes=real))


# ----------------------------------------------------------------------------- found by fuzzing
# (tests/test_trust_fuzz.py): each failed before its fix.


def _npy_with_header(header: bytes) -> bytes:
    """An .npy file (format 1.0) whose header dict is ``header``, padded as numpy pads it."""
    body = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


@pytest.mark.parametrize(
    "header",
    [
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (4, 16), (",  # tokenize.TokenError
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (4, 16)",  # SyntaxError
    ],
)
def test_a_vectors_member_with_a_broken_header_is_an_archive_error(archive, target, header):
    """Before: numpy's header parser let tokenize.TokenError out of np.load: a traceback."""
    before = dump(target)
    bad = rewrite(archive, "npy", put={"embeddings.npy": _npy_with_header(header)})
    with pytest.raises(ArchiveError, match="unreadable embeddings.npy"):
        import_archive(bad, target)
    assert dump(target) == before


@pytest.mark.parametrize("mode", ["merge", "replace"])
def test_two_chats_imported_into_one_cannot_bring_look_alike_names(archive, target, mode):
    """Before: the look-alike check compared the archive's names with the target's only, so
    tg:1's 'Mochi' and tg:2's Cyrillic 'Моchi', both mapped onto tg:7, ended up side by side."""
    bad = _rewrite(
        archive, archive.with_name("twins.zip"), put=lines_with(archive, CONCEPTS, 2, name="Моchi")
    )
    before = dump(target)
    with pytest.raises(InvalidInputError, match="'Моchi' looks like 'Mochi'.*chat 'tg:7'"):
        import_archive(bad, target, mode=mode, scope_map={"tg:1": "tg:7", "tg:2": "tg:7"})
    assert dump(target) == before
    # The same name from two chats is one concept, as before: its photos are merged.
    same = _rewrite(
        archive, archive.with_name("same.zip"), put=lines_with(archive, CONCEPTS, 2, name="Mochi")
    )
    report = import_archive(same, target, mode=mode, scope_map={"tg:1": "tg:7", "tg:2": "tg:7"})
    assert sorted(c.name for c in target.list_concepts("tg:7")) == ["Bo", "Mochi"]
    assert report.examples == 4


def test_an_archives_huge_crop_is_stored_as_the_live_path_stores_crops(archive, tmp_path) -> None:
    """The worst request: 20 concepts whose crops are 49 MP JPEGs (allowed: under 20 MB and
    50 MP) made every /concepts sheet and /ask that showed them decode 49 MP photos. Crops
    come in at most CROP_MAX_SIDE on their shorter side, as /remember makes them; ordinary
    crops byte for byte; importing again still finds them already there."""
    import io

    from PIL import Image

    from engine.images import CROP_MAX_SIDE, decode_image

    huge = io.BytesIO()
    Image.radial_gradient("L").resize((3000, 2000)).convert("RGB").save(huge, format="JPEG")
    with zipfile.ZipFile(archive) as zf:
        crops = sorted(n for n in zf.namelist() if n.startswith("crops/"))
        kept = zf.read(crops[1])
    crafted = _rewrite(archive, archive.with_name("huge.zip"), put={crops[0]: huge.getvalue()})
    store = faiss(tmp_path / "fresh")
    try:
        import_archive(crafted, store)
        stored = {ex.crop_jpeg for ex in store.examples("tg:1")}
        sizes = sorted(decode_image(c).size for c in stored)
        assert (CROP_MAX_SIDE * 3 // 2, CROP_MAX_SIDE) in sizes
        assert all(min(size) <= CROP_MAX_SIDE for size in sizes) and kept in stored
        again = import_archive(crafted, store)
        assert (again.examples, again.skipped) == (0, store.count())
    finally:
        store.close()
