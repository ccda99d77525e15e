"""Issue 11, "also required": fuzzing of the two doors that take whole files from strangers.

``engine.images.decode_image`` (every photo a chat user sends, every crop and thumbnail an
archive holds) and archive import (``rapbot import``: :func:`engine.backup.read_archive` and
:func:`engine.backup.import_archive`) get thousands of crafted inputs, made from valid seeds by
the strategies of :mod:`tests.fuzzing`. The properties:

- the only exceptions are the documented user errors (:class:`~engine.errors.ImageError`,
  :class:`~engine.errors.InvalidInputError` and its :class:`~engine.backup.ArchiveError`), each
  with a message of one printable line;
- what the decoder returns is a loaded 8-bit RGB image within the limits;
- after a refused import every file of the data folder is byte for byte what it was (FAISS
  store and photo index; Qdrant in local mode), and what a successful import wrote passed the
  live checks, with no two look-alike names in one chat.

Runs are derandomized (no example database), so CI sees the same inputs every time.
``pytest --hypothesis-show-statistics`` prints how many examples ran and what they did.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from bots.core.platforms import source_fits
from engine.backup import export_scopes, import_archive, read_archive
from engine.engine import Engine
from engine.errors import ImageError, InvalidInputError, RapbotError
from engine.images import ImageLimits, decode_image
from engine.store import open_concept_store
from engine.store.base import name_key
from engine.validation import clean_name, clean_source, clean_user, refuse_look_alike
from tests.fuzzing import hostile_archives, hostile_bytes
from tests.test_transfer import faiss, fill, fill_photos, photo_store


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def assert_one_line(error: RapbotError) -> None:
    """What the user reads: a sentence on one printable line (no escape, no surrogate)."""
    message = str(error)
    assert message.strip() and message.isprintable(), repr(message)


# ----------------------------------------------------------------------------- decode_image

# Small enough that a header declaring the limit decodes in milliseconds; the checks are the
# same as with the default limits.
IMAGE_LIMITS = ImageLimits(max_bytes=256 * 1024, max_pixels=1_000_000)


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


def _image_seeds() -> list[bytes]:
    """One small valid file of every format and of the unusual modes the decoder converts."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (9, 7, 4), dtype=np.uint8))
    # A long side that 2, 4 and 8 do not divide: JPEG draft mode rounds it up on its own.
    odd = Image.fromarray(rng.integers(0, 255, (16, 21, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16))
    floats = Image.fromarray(rng.standard_normal((6, 5)).astype(np.float32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decoder turns it upright
    seeds = [
        _encoded(rgb, "JPEG", quality=80),
        _encoded(odd, "JPEG"),
        _encoded(rgb, "JPEG", progressive=True),
        _encoded(rgb, "JPEG", exif=exif.tobytes()),
        _encoded(rgb.convert("L"), "JPEG"),
        _encoded(rgb.convert("CMYK"), "JPEG"),
        _encoded(rgb, "PNG"),
        _encoded(rgba, "PNG"),
        _encoded(rgb.convert("P"), "PNG", transparency=3),
        _encoded(rgb.convert("1"), "PNG"),
        _encoded(grey16, "PNG"),
        _encoded(rgb, "GIF", save_all=True, append_images=[rgb.rotate(90)]),
        _encoded(rgb, "BMP"),
        _encoded(rgb, "TIFF"),
        _encoded(rgb, "TIFF", compression="tiff_lzw"),
        _encoded(floats, "TIFF"),
    ]
    if "WEBP" in Image.SAVE:
        seeds += [_encoded(rgb, "WEBP"), _encoded(rgba, "WEBP", lossless=True)]
    return seeds


IMAGE_SEEDS = _image_seeds()
SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
)


def test_every_image_seed_decodes() -> None:
    """The mutations start from files the decoder accepts (else the fuzz would only test
    refusals)."""
    for seed in IMAGE_SEEDS:
        assert decode_image(seed, IMAGE_LIMITS).mode == "RGB"
        for min_side in range(1, 17):  # and on the scaled path, at every size the fuzz asks
            assert min(decode_image(seed, IMAGE_LIMITS, min_side=min_side).size) <= min_side


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on corrupt EXIF
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused below
@fuzz(2500)
@given(
    data=hostile_bytes(IMAGE_SEEDS, SIGNATURES),
    # The seeds are 5 to 20 pixels: small min_sides take the scaled (JPEG draft) path that
    # archive validation and contact sheets use.
    min_side=st.one_of(st.none(), st.integers(1, 16)),
)
def test_decode_image_returns_rgb_or_one_clear_error(data: bytes, min_side: int | None) -> None:
    try:
        image = decode_image(data, IMAGE_LIMITS, min_side=min_side)
    except ImageError as error:
        assert_one_line(error)
        event(f"refused: {str(error).split(' (')[0][:48]}")
        if min_side is not None:  # asking for a smaller picture never refuses a good file
            with pytest.raises(ImageError):
                decode_image(data, IMAGE_LIMITS)
        return
    event("decoded" if min_side is None else "decoded, scaled")
    width, height = image.size
    assert image.mode == "RGB"
    assert 0 < width * height <= IMAGE_LIMITS.max_pixels
    assert max(width, height) <= IMAGE_LIMITS.max_aspect * min(width, height)
    assert min_side is None or min(width, height) <= min_side
    assert len(image.tobytes()) == 3 * width * height  # loaded: the pixels are all there


# ----------------------------------------------------------------------------- archive import


class Target:
    """A data folder as `rapbot import` sees it (concept store and photo history of the
    configured kind, the tiny profile's models), filled once and restored from a pristine copy
    whenever an import changed it."""

    def __init__(self, root: Path, kind: str, loaded) -> None:
        settings, self.models = loaded
        self.data = root / "data"
        self.pristine = root / "pristine"
        self.settings = settings.model_copy(update={"data_dir": self.data, "store": kind})
        self.engine = self._open()
        fill(self.engine.store)
        fill_photos(self.engine.photos)
        self.engine.close()
        shutil.copytree(self.data, self.pristine)
        self.engine = self._open()

    def _open(self) -> Engine:
        embedder = self.models.embedder
        store = open_concept_store(self.settings, embedder.model_id, embedder.dim)
        engine = Engine(self.settings, self.models, store)
        # Opened now, not by the first import: opening makes SQLite's -wal and -shm files,
        # which are no change of what the store holds.
        engine.photos  # noqa: B018
        return engine

    def files(self) -> dict[str, str]:
        """Every file of the data folder and the hash of its bytes."""
        return {
            str(path.relative_to(self.data)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(self.data.rglob("*"))
            if path.is_file()
        }

    def restore(self) -> None:
        self.engine.close()
        shutil.rmtree(self.data)
        shutil.copytree(self.pristine, self.data)
        self.engine = self._open()

    def import_like_the_cli(self, path: Path, mode: str, renames: list, with_photos: bool):
        """What `rapbot import FILE [--replace] [--with-photos]` does (rapbot.cli.backup.
        run_import), on the engine opened once. ``renames``: (the archive's i-th chat, new
        id) pairs, more freely than ``--chat`` (two chats may go into one)."""
        engine = self.engine
        with read_archive(path, text=engine.text_limits) as archive:
            scopes = archive.scopes
            scope_map = {scopes[i % len(scopes)]: into for i, into in renames if scopes}
            embedder = engine.models.embedder if archive.model_id != engine.store.model_id else None
            return import_archive(
                archive,
                engine.store,
                embedder=embedder,
                scope_map=scope_map,
                mode=mode,
                photos=engine.photos,
                photo_embedder=engine.embed_thumbnails,
                include_photos=True if with_photos else None,
                source_fits=source_fits,
            )

    def assert_clean(self) -> None:
        """What a successful import wrote passed the live checks."""
        store, photos = self.engine.store, self.engine.photos
        for scope in store.scopes():
            names = [c.name for c in store.list_concepts(scope)]
            for name in names:  # no look-alikes side by side (nor the same name twice)
                refuse_look_alike(name, [other for other in names if other != name])
            assert len({name_key(n) for n in names}) == len(names)
            for example in store.examples(scope):
                assert clean_name(example.name) == example.name
                assert decode_image(example.crop_jpeg).mode == "RGB"
                assert np.isfinite(example.embedding).all()
        for scope in photos.scopes():
            for photo in photos.rows(scope):
                assert clean_source(photo.source) == photo.source
                assert clean_user(photo.poster) == photo.poster
                assert decode_image(photo.thumbnail).mode == "RGB"


def _archive_seeds(root: Path, model_id: str, dim: int) -> list[bytes]:
    """Valid exports: of the target's own model (imported as they are) and of another model
    (their crops and thumbnails embedded again), with and without the photo history."""
    seeds = []
    for name, model, size, with_photos in (
        ("same", model_id, dim, True),
        ("same-concepts", model_id, dim, False),
        ("other", "test:other", 16, True),
    ):
        store = faiss(root / name / "store", model, size)
        photos = photo_store(root / name / "photos", model, size)
        fill(store)
        fill_photos(photos)
        path = root / f"{name}.zip"
        export_scopes(store, None, path, photos=photos if with_photos else None)
        store.close()
        photos.close()
        seeds.append(path.read_bytes())
    return seeds


def _target(kind: str, tiny_models, tmp_path_factory) -> Target:
    root = tmp_path_factory.mktemp(f"fuzz-{kind}")
    target = Target(root, kind, tiny_models)
    store = target.engine.store
    target.seeds = _archive_seeds(root / "seeds", store.model_id, store.dim)
    return target


@pytest.fixture(scope="module")
def faiss_target(tiny_models, tmp_path_factory):
    target = _target("faiss", tiny_models, tmp_path_factory)
    yield target
    target.engine.close()


@pytest.fixture(scope="module")
def qdrant_target(tiny_models, tmp_path_factory):
    target = _target("qdrant", tiny_models, tmp_path_factory)
    yield target
    target.engine.close()


_CHAT = st.sampled_from(("tg:1", "tg:2", "tg:7"))
# (archive chat index, new id) pairs: none, one chat renamed, or two chats sent into one.
RENAMES = st.one_of(
    st.just([]),
    st.tuples(st.integers(0, 3), _CHAT).map(lambda rename: [rename]),
    st.tuples(st.integers(0, 3), st.integers(0, 3), _CHAT).map(
        lambda r: [(r[0], r[2]), (r[1], r[2])]
    ),
)
IMPORT_OPTIONS = st.tuples(
    st.sampled_from(("merge", "replace")),
    RENAMES,
    st.booleans(),  # --with-photos
)


def check_crafted_import(target: Target, archive: bytes, options: tuple) -> None:
    """Refused with one clear line and not a byte changed, or imported only what is clean."""
    crafted = target.data.parent / "crafted.zip"
    crafted.write_bytes(archive)
    before = target.files()
    try:
        target.import_like_the_cli(crafted, *options)
    except InvalidInputError as error:
        assert_one_line(error)
        event(f"refused: {str(error).removeprefix(crafted.name).split(' (')[0][:48]}")
        assert target.files() == before, "a refused import changed the data folder"
        return
    event("imported")
    try:
        target.assert_clean()
    finally:  # the next example (or hypothesis's replay of this one) starts from the same store
        if target.files() != before:
            target.restore()


@pytest.mark.parametrize("kind", ["faiss", "qdrant"])
def test_every_archive_seed_imports(kind, request) -> None:
    target = request.getfixturevalue(f"{kind}_target")
    for seed in target.seeds:
        path = target.data.parent / "seed.zip"
        path.write_bytes(seed)
        target.import_like_the_cli(path, "merge", [(0, "tg:7")], True)
        target.assert_clean()
        target.restore()


@fuzz(500)
@given(data=st.data(), options=IMPORT_OPTIONS)
def test_a_crafted_archive_changes_no_byte_of_a_faiss_store(faiss_target, data, options) -> None:
    archive = data.draw(hostile_archives(faiss_target.seeds), label="archive")
    check_crafted_import(faiss_target, archive, options)


@fuzz(200)
@given(data=st.data(), options=IMPORT_OPTIONS)
def test_a_crafted_archive_changes_no_byte_of_a_qdrant_store(qdrant_target, data, options) -> None:
    archive = data.draw(hostile_archives(qdrant_target.seeds), label="archive")
    check_crafted_import(qdrant_target, archive, options)
