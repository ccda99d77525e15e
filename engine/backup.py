"""Export and import of chats: concepts and photo search history in one portable file, for
backups and moving chats between stores (FAISS, Qdrant) and embedding models.

An archive is a zip file; nothing in it is ever extracted to disk, members are read by name::

    manifest.json     {"format": "rapbot-concepts", "version": 2, "model_id", "dim",
                       "created_at", "scopes": [{"scope", "concepts", "examples", "photos"}],
                       "counts": {"scopes", "concepts", "examples"},
                       "photos": {"model_id", "dim", "count", "indexing": {scope: bool}}}
    concepts.jsonl    a concept per line: scope, id, name, description, category, owner,
                      created_at
    examples.jsonl    an example per line: scope, concept_id, example_id, box, source,
                      created_at; line i goes with crops/<i:08d>.jpg and row i of the vectors
    crops/NNNNNNNN.jpg
    embeddings.npy    float32 (examples, dim), made by the embedding model ``model_id``
    photos.jsonl      the photo search history (:class:`engine.store.photos.PhotoStore`), a
                      photo per line: scope, photo_id, source, poster, posted_at; line i goes
                      with thumbs/<i:08d>.jpg and row i of the photo vectors
    thumbs/NNNNNNNN.jpg   the photo's 256-pixel thumbnail, as the photo index keeps it
    photo_embeddings.npy  float32 (photos, photos.dim), made by the photo index's own model
                      ``photos.model_id`` (the search encoder: CLIP, or CIR-LVLM)

The photo members and the manifest's ``photos`` object are there when the photo history was
exported (``export_scopes(..., photos=...)``, as ``rapbot export`` does); ``indexing`` holds
every exported chat's /index flag, on or off. Version 1 archives (concepts only) are read too.

Importing validates the whole archive (members, sizes, JSON, names, vectors, every crop and
thumbnail) before writing anything, so a bad file leaves the stores as they were. Embeddings of
the target's own model are used as they are; those of another model are replaced by embedding
the crops (or the thumbnails, for the photo history) again with the given embedder, so a chat can
move to a new CLIP model or search encoder. Every imported example carries a source key derived
from where it came from, and every photo keeps its own (unique within a chat), which makes
importing idempotent: the same archive (or a newer export of the same chat) adds only what is
missing. Photos keep their poster and time, so ``forget_user`` finds them after a restore.

The photo history is people's photos and user ids, and a chat's /index flag is its admins'
decision, so both stay with their chat: an import sets a chat's flag only when it goes back into
that same chat (never when ``scope_map`` renames it), and writes the photos of a renamed chat
only when asked (``include_photos=True``). A photo's source is what the bot sends back from a
search: opaque to the engine, its form known only to the adapter of the platform that made it
(the scope's prefix). The caller passes that rule (``source_fits``, e.g.
``bots.core.platforms.source_fits``); photos whose source does not fit the target chat are
skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.errors import ImageError, InvalidInputError, RapbotError, StoreError
from engine.images import CROP_MAX_SIDE, ImageLimits, bounded_crop_jpeg, decode_image
from engine.progress import Progress, counter
from engine.store.base import ConceptStore, check_scope, name_key
from engine.types import Box
from engine.validation import (
    TextLimits,
    clean_box,
    clean_concept_text,
    clean_scope,
    clean_source,
    clean_user,
    name_skeletons,
    refuse_look_alike,
)

if TYPE_CHECKING:
    from engine.store.photos import PhotoStore

FORMAT = "rapbot-concepts"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: concepts only
MANIFEST, CONCEPTS, EXAMPLES, EMBEDDINGS = (
    "manifest.json",
    "concepts.jsonl",
    "examples.jsonl",
    "embeddings.npy",
)
PHOTOS, PHOTO_EMBEDDINGS = "photos.jsonl", "photo_embeddings.npy"
_CROP = re.compile(r"crops/(\d{8})\.jpg")
_THUMB = re.compile(r"thumbs/(\d{8})\.jpg")
_JPEG_MAGIC = b"\xff\xd8\xff"
_MAX_ID = 2**63 - 1  # example and photo ids: SQLite's INTEGER
_CHUNK = 256 * 1024  # bytes read from a member at a time
_EMBED_BATCH = 32
_PHOTO_WRITE_BATCH = 500  # photos per PhotoStore.add_many transaction


# What zipfile, zlib and numpy raise on a damaged file (bad CRC, truncation, bad header...).
_DAMAGE = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)


class ArchiveError(InvalidInputError):
    """The file is not a usable rapbot export (damaged, unsafe, another version...)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """How much an untrusted archive may hold; beyond it the import is refused up front."""

    max_bytes: int = 8 * 1024**3  # all members, really decompressed (not as declared)
    max_examples: int = 1_000_000
    max_photos: int = 1_000_000  # of the photo search history
    max_crop_bytes: int = 20 * 1024**2  # one JPEG: a crop or a thumbnail
    max_manifest_bytes: int = 1024**2
    max_lines_bytes: int = 512 * 1024**2  # one .jsonl member (1M lines of ~500 bytes)
    max_line_bytes: int = 64 * 1024  # one record of a .jsonl member


@dataclass(frozen=True)
class ExportReport:
    path: str
    scopes: int
    concepts: int
    examples: int
    photos: int = 0  # of the photo search history


@dataclass(frozen=True)
class ImportReport:
    scopes: int  # chats written to
    concepts: int  # new concepts
    merged: int  # archived concepts whose name already existed in the chat
    examples: int  # example photos added
    skipped: int  # example photos already there (imported before)
    reembedded: bool  # crops were embedded again with another model
    photos: int = 0  # photos added to the search history
    photos_skipped: int = 0  # photos of the search history already there
    photos_reembedded: bool = False  # thumbnails were embedded again with another encoder
    photos_left_out: int = 0  # not asked for: a renamed chat's (include_photos), or no store
    photos_skipped_foreign: int = 0  # sources that don't fit the target chat's platform


# ----------------------------------------------------------------------------- export


def export_scopes(
    store: ConceptStore,
    scopes: Sequence[str] | None,
    path: str | os.PathLike[str],
    model_id: str | None = None,
    photos: PhotoStore | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Write the concepts of ``scopes`` (None: every scope) to one archive at ``path``.

    ``model_id`` (default: the store's) is recorded with the embeddings; it must be the
    store's. ``photos``: the photo search history, written too: every chosen chat's photos and
    indexing flag (with ``scopes=None`` the chats of either store). The file appears
    atomically: a failed export leaves no partial archive. ``progress("Exporting", done,
    total)`` is called as the examples and photos are written.
    """
    if model_id is not None and model_id != store.model_id:
        raise InvalidInputError(
            f"The store's embeddings are made by {store.model_id}, not {model_id}."
        )
    photo_scopes = set(photos.scopes()) if photos is not None else set()
    if photos is not None:
        photos.recorded_model()  # refuses a half re-embedded index before any file is made
    if scopes is None:
        chosen = sorted(set(store.scopes()) | photo_scopes)
    else:
        chosen = list(dict.fromkeys(check_scope(s) for s in scopes))
        for scope in chosen:
            if store.count(scope) == 0 and scope not in photo_scopes:
                raise InvalidInputError(f"There is nothing to export in chat '{scope}'.")
    path = Path(path).expanduser()
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder; give a file name for the export.")
    tick = counter(progress, "Exporting", _export_size(store, scopes, chosen, photos))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with (
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive,
            tempfile.TemporaryFile() as vectors,
            tempfile.TemporaryFile() as photo_vectors,
        ):
            report = _write_archive(
                store, chosen, archive, (vectors, photo_vectors), path, photos, tick
            )
        os.replace(tmp, path)
    except OSError as error:
        raise InvalidInputError(f"Can't write {path}: {error.strerror or error}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _write_archive(
    store: ConceptStore,
    scopes: list[str],
    archive: zipfile.ZipFile,
    vectors: tuple[Any, Any],  # temporary files: the examples' and the photos' rows
    path: Path,
    photos: PhotoStore | None,
    tick: Callable[[], None],
) -> ExportReport:
    concepts: list[str] = []
    examples: list[str] = []
    photo_lines: list[str] = []
    indexing: dict[str, bool] = {}
    photo_model, photo_dim = photos.recorded_model() if photos is not None else ("", 0)
    per_scope: list[dict[str, Any]] = []
    for scope in scopes:
        seen: set[str] = set()
        first = len(examples)
        for ex in store.examples(scope):
            if ex.concept_id not in seen:
                seen.add(ex.concept_id)
                concepts.append(
                    _jsonl(
                        scope=scope,
                        id=ex.concept_id,
                        name=ex.name,
                        description=ex.description,
                        category=ex.category,
                        owner=ex.owner,
                        created_at=ex.concept_created_at,
                    )
                )
            # JPEGs are already compressed: store them as they are.
            archive.writestr(
                _crop_name(len(examples)), ex.crop_jpeg, compress_type=zipfile.ZIP_STORED
            )
            vectors[0].write(np.asarray(ex.embedding, dtype="<f4").tobytes())
            examples.append(
                _jsonl(
                    scope=scope,
                    concept_id=ex.concept_id,
                    example_id=ex.example_id,
                    box=ex.box.as_list(),
                    source=ex.source,
                    created_at=ex.created_at,
                    added_by=ex.added_by or ex.owner,
                )
            )
            tick()
        entry = {"scope": scope, "concepts": len(seen), "examples": len(examples) - first}
        if photos is not None:
            entry["photos"] = _write_photos(
                photos, scope, archive, vectors[1], photo_lines, photo_dim, tick
            )
            indexing[scope] = photos.indexing(scope)
        per_scope.append(entry)
    archive.writestr(CONCEPTS, "".join(concepts))
    archive.writestr(EXAMPLES, "".join(examples))
    _write_npy(archive, EMBEDDINGS, vectors[0], len(examples), store.dim)
    counts = {"scopes": len(per_scope), "concepts": len(concepts), "examples": len(examples)}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_id": store.model_id,
        "dim": store.dim,
        "created_at": time.time(),
        "scopes": per_scope,
        "counts": counts,
    }
    if photos is not None:
        archive.writestr(PHOTOS, "".join(photo_lines))
        _write_npy(archive, PHOTO_EMBEDDINGS, vectors[1], len(photo_lines), photo_dim)
        manifest["photos"] = {
            "model_id": photo_model,
            "dim": photo_dim,
            "count": len(photo_lines),
            "indexing": indexing,
        }
    archive.writestr(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
    return ExportReport(str(path), **counts, photos=len(photo_lines))


def _write_photos(
    photos: PhotoStore,
    scope: str,
    archive: zipfile.ZipFile,
    vectors: Any,
    lines: list[str],
    dim: int,
    tick: Callable[[], None],
) -> int:
    """Write the scope's photos (thumbnail, vector, line); returns how many."""
    first = len(lines)
    for photo in photos.rows(scope):
        if photo.embedding.shape != (dim,):
            raise StoreError(
                f"Photo {photo.photo_id} of chat '{scope}' has a vector of size"
                f" {photo.embedding.size}, not {dim}: the photo index is damaged."
            )
        archive.writestr(_thumb_name(len(lines)), photo.thumbnail, compress_type=zipfile.ZIP_STORED)
        vectors.write(photo.embedding.astype("<f4").tobytes())
        lines.append(
            _jsonl(
                scope=scope,
                photo_id=photo.photo_id,
                source=photo.source,
                poster=photo.poster,
                posted_at=photo.posted_at,
            )
        )
        tick()
    return len(lines) - first


def _export_size(
    store: ConceptStore,
    scopes: Sequence[str] | None,
    chosen: list[str],
    photos: PhotoStore | None,
) -> int:
    """The examples and photos an export writes (its progress total)."""
    if scopes is None:  # every chat of either store: all rows
        return store.count() + (photos.total() if photos is not None else 0)
    return sum(
        store.count(scope) + (photos.total(scope) if photos is not None else 0) for scope in chosen
    )


def _write_npy(archive: zipfile.ZipFile, name: str, rows: Any, n: int, dim: int) -> None:
    """The float32 ``(n, dim)`` rows written to the temporary file ``rows``, as ``name``."""
    with archive.open(name, "w", force_zip64=True) as out:
        header = {"descr": "<f4", "fortran_order": False, "shape": (n, dim)}
        np.lib.format.write_array_header_1_0(out, header)
        rows.seek(0)
        shutil.copyfileobj(rows, out)


def _jsonl(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False) + "\n"


def _crop_name(row: int) -> str:
    return f"crops/{row:08d}.jpg"


def _thumb_name(row: int) -> str:
    return f"thumbs/{row:08d}.jpg"


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ArchivedConcept:
    scope: str
    id: str
    name: str
    description: str
    category: str
    owner: str
    rows: tuple[int, ...]  # its examples' rows, in order


@dataclass(frozen=True)
class ArchivedExample:
    scope: str
    concept_id: str
    example_id: int
    box: Box
    source: str | None
    added_by: str  # who added the photo (archives before it was recorded: the owner)


@dataclass(frozen=True)
class ArchivedPhotoIndex:
    """The manifest's ``photos``: the photo history's model and every exported chat's flag."""

    model_id: str  # "" only when it holds no photos
    dim: int
    count: int
    indexing: dict[str, bool]  # chat -> /index on or off


@dataclass(frozen=True)
class ArchivedPhoto:
    scope: str
    photo_id: int
    source: str
    poster: str
    posted_at: float


class Archive:
    """A validated archive, open for reading crops and thumbnails; use :func:`read_archive`.

    ``scopes``: every chat it holds (sorted); ``concepts``, ``examples`` and ``embeddings``;
    ``photo_index`` (None for an archive without the photo history, e.g. version 1),
    ``photos`` and ``photo_embeddings``.
    """

    def __init__(self, path: Path, limits: ArchiveLimits, text: TextLimits) -> None:
        self.path = path
        self.limits = limits
        self.text = text  # the live limits of concept names and descriptions
        if not path.is_file():
            raise InvalidInputError(f"No such file: {path}")
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise self._error(f"is not a rapbot export ({_reason(error)})") from None
        try:
            with self._reading():
                self._validate()
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _error(self, what: str) -> ArchiveError:
        return ArchiveError(f"{self.path.name} {what}. Nothing was imported.")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Damage found while reading members becomes one clear ArchiveError."""
        try:
            yield
        except RapbotError:
            raise
        except _DAMAGE as error:
            raise self._error(f"is damaged ({_reason(error)})") from None

    def _chunks(self, name: str, limit: int) -> Iterator[bytes]:
        """The member's bytes as they are decompressed, a chunk at a time: what a member
        really unpacks to is counted (against ``limit`` and the whole archive's
        ``max_bytes``), never what its header declares, so a zip bomb is refused after at
        most ``limit`` bytes and never held in memory."""
        info = self._members.get(name)
        if info is None:
            raise self._error(f"has no {name}")
        if info.file_size > limit:
            raise self._error(f"has a {name} of {info.file_size} bytes (at most {limit})")
        seen = 0
        counted = name not in self._counted  # crops are read again when written: once
        self._counted.add(name)
        with self._zip.open(info) as member:
            while chunk := member.read(min(_CHUNK, limit + 1 - seen)):
                seen += len(chunk)
                self._unpacked += len(chunk) if counted else 0
                if seen > limit:
                    raise self._error(f"has a {name} larger than it declares (over {limit} bytes)")
                if self._unpacked > self.limits.max_bytes:
                    raise self._error(
                        f"unpacks to more than the {self.limits.max_bytes} bytes allowed"
                    )
                yield chunk
                if seen == limit:  # one more byte would be too many: check for it
                    if member.read(1):
                        raise self._error(
                            f"has a {name} larger than it declares (over {limit} bytes)"
                        )
                    return

    def _read(self, name: str, limit: int) -> bytes:
        return b"".join(self._chunks(name, limit))

    # ------------------------------------------------------------------------- validation

    def _validate(self) -> None:
        limits = self.limits
        infos = self._zip.infolist()
        if len(infos) > limits.max_examples + limits.max_photos + 6:
            raise self._error(f"has {len(infos)} files, more than this import allows")
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._unpacked = 0  # bytes really decompressed so far, all members
        self._counted: set[str] = set()
        for info in infos:
            name = info.filename
            if not (name in _MEMBERS or _CROP.fullmatch(name) or _THUMB.fullmatch(name)):
                raise self._error(f"contains an unexpected file {name[:80]!r}")
            if name in self._members:
                raise self._error(f"contains {name!r} twice")
            if info.flag_bits & 0x1:
                raise self._error("is encrypted")
            self._members[name] = info
        total = sum(info.file_size for info in infos)
        if total > limits.max_bytes:
            raise self._error(
                f"would unpack to {total} bytes, more than the {limits.max_bytes} allowed"
            )
        self._check_manifest()
        if self.photo_index is None:  # a version 1 archive, or one made without the photos
            extra = sorted(n for n in self._members if n in _PHOTO_MEMBERS or _THUMB.fullmatch(n))
            if extra:
                raise self._error(f"contains an unexpected file {extra[0][:80]!r}")
        self.concepts, self.examples = self._check_records()
        self.photos = self._check_photos()
        flags = self.photo_index.indexing if self.photo_index is not None else {}
        self.scopes = sorted({c.scope for c in self.concepts} | set(flags))
        found = {
            "scopes": len(self.scopes),
            "concepts": len(self.concepts),
            "examples": len(self.examples),
        }
        if found != {k: self.counts[k] for k in found}:
            raise self._error(f"does not hold what its manifest says ({found})")
        if self.photo_index is not None and len(self.photos) != self.photo_index.count:
            raise self._error(
                f"does not hold what its manifest says ({len(self.photos)} indexed photos,"
                f" not {self.photo_index.count})"
            )
        self.embeddings = self._vectors(EMBEDDINGS, len(self.examples), self.dim)
        self._check_jpegs(_CROP, _crop_name, len(self.examples), "photos no example")
        self.photo_embeddings = np.zeros((0, 0), np.float32)
        if self.photo_index is not None:
            self.photo_embeddings = self._vectors(
                PHOTO_EMBEDDINGS, len(self.photos), self.photo_index.dim
            )
            self._check_jpegs(_THUMB, _thumb_name, len(self.photos), "thumbnails no photo")

    def _json(self, name: str, limit: int) -> Any:
        try:
            return json.loads(self._read(name, limit).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._error(f"has an unreadable {name} ({_reason(error)})") from None

    def _check_manifest(self) -> None:
        manifest = self._json(MANIFEST, self.limits.max_manifest_bytes)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise self._error("is not a rapbot concepts export")
        version = manifest.get("version")
        if not _is_int(version) or version not in READABLE_VERSIONS:
            raise self._error(
                f"has format version {version!r}; this rapbot reads versions"
                f" {READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]}"
                " (use the rapbot that wrote it, or a newer one)"
            )
        model_id, dim = manifest.get("model_id"), manifest.get("dim")
        if not isinstance(model_id, str) or not model_id:
            raise self._error("does not say which embedding model made it")
        if not _is_int(dim) or not 1 <= dim <= 65536:
            raise self._error("has an invalid embedding size")
        counts = manifest.get("counts")
        if not isinstance(counts, dict) or not all(
            _is_int(counts.get(k)) for k in ("scopes", "concepts", "examples")
        ):
            raise self._error("has no valid counts")
        if counts["examples"] > self.limits.max_examples:
            raise self._error(f"holds {counts['examples']} photos, more than this import allows")
        self.manifest, self.model_id, self.dim, self.counts = manifest, model_id, dim, counts
        self.photo_index = self._check_photo_index(manifest.get("photos") if version >= 2 else None)

    def _check_photo_index(self, raw: Any) -> ArchivedPhotoIndex | None:
        if raw is None:
            return None
        bad = self._error("has an invalid photos entry in its manifest")
        if not isinstance(raw, dict):
            raise bad
        model_id, dim, count, indexing = (
            raw.get(k) for k in ("model_id", "dim", "count", "indexing")
        )
        if not (
            isinstance(model_id, str)
            and _is_int(dim)
            and 0 <= dim <= 65536
            and _is_int(count)
            and count >= 0
            and isinstance(indexing, dict)
        ):
            raise bad
        if count > self.limits.max_photos:
            raise self._error(f"holds {count} indexed photos, more than this import allows")
        if count and not (model_id and dim):
            raise self._error("does not say which model embedded its indexed photos")
        flags: dict[str, bool] = {}
        for scope, enabled in indexing.items():
            try:
                cleaned = clean_scope(scope)
            except InvalidInputError as error:
                raise self._error(f"has a bad chat in its manifest ({_reason(error)})") from None
            if not isinstance(enabled, bool) or cleaned in flags:
                raise bad
            flags[cleaned] = enabled
        return ArchivedPhotoIndex(model_id, dim, count, flags)

    def _raw_lines(self, name: str) -> Iterator[bytes]:
        """The member's lines, streamed; none longer than ``max_line_bytes``."""
        longest = self.limits.max_line_bytes
        rest = b""
        for chunk in self._chunks(name, self.limits.max_lines_bytes):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if len(line) > longest:
                    raise self._error(f"has a line longer than {longest} bytes in {name}")
                yield line
            if len(rest) > longest:
                raise self._error(f"has a line longer than {longest} bytes in {name}")
        if rest:
            yield rest

    def _lines(self, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for number, raw in enumerate(self._raw_lines(name), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise self._error(f"has an unreadable {name} ({_reason(error)})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise self._error(f"has a bad line {number} in {name} ({_reason(error)})") from None
            if not isinstance(record, dict):
                raise self._error(f"has a bad line {number} in {name}")
            yield number, record

    def _check_records(self) -> tuple[list[ArchivedConcept], list[ArchivedExample]]:
        fields: dict[tuple[str, str], dict[str, str]] = {}
        names: set[tuple[str, str]] = set()
        looks: dict[tuple[str, str], str] = {}  # (chat, skeleton) -> name
        for number, raw in self._lines(CONCEPTS):
            where = f"line {number} of {CONCEPTS}"
            try:
                scope = clean_scope(_text(raw, "scope"))
                concept_id = _text(raw, "id")
                # The very checks of a chat command, with the same limits.
                text = clean_concept_text(
                    _text(raw, "name"),
                    _text(raw, "description"),
                    _text(raw, "category"),
                    _text(raw, "owner"),
                    self.text,
                )
                _number(raw.get("created_at", 0.0))
            except (InvalidInputError, KeyError, TypeError) as error:
                raise self._error(f"has a bad concept at {where} ({_reason(error)})") from None
            if (
                not (1 <= len(concept_id) <= 64 and concept_id.isprintable())
                or (
                    scope,
                    concept_id,
                )
                in fields
            ):
                raise self._error(f"has a bad or repeated concept id at {where}")
            if (scope, name_key(text.name)) in names:
                raise self._error(f"names '{text.name}' twice in chat '{scope}'")
            names.add((scope, name_key(text.name)))
            for key in name_skeletons(text.name):
                other = looks.setdefault((scope, key), text.name)
                if other != text.name:
                    raise self._error(
                        f"has '{text.name}', which looks like '{other}', in chat '{scope}'"
                    )
            fields[(scope, concept_id)] = {
                "name": text.name,
                "description": text.description,
                "category": text.category,
                "owner": text.owner,
            }
        rows: dict[tuple[str, str], list[int]] = {key: [] for key in fields}
        examples: list[ArchivedExample] = []
        for number, raw in self._lines(EXAMPLES):
            where = f"line {number} of {EXAMPLES}"
            try:
                scope, concept_id = clean_scope(_text(raw, "scope")), _text(raw, "concept_id")
                example_id = raw["example_id"]
                if not _is_int(example_id) or not 0 <= example_id <= _MAX_ID:
                    raise TypeError("bad example id")
                box = clean_box(raw["box"])
                source = None if raw.get("source") is None else clean_source(raw["source"])
                added_by = None if raw.get("added_by") is None else clean_user(raw["added_by"])
                _number(raw.get("created_at", 0.0))
            except (InvalidInputError, KeyError, TypeError) as error:
                raise self._error(f"has a bad example at {where} ({_reason(error)})") from None
            key = (scope, concept_id)
            if key not in rows:
                raise self._error(f"has an example of an unknown concept at {where}")
            rows[key].append(len(examples))
            examples.append(
                ArchivedExample(
                    key[0], concept_id, example_id, box, source, added_by or fields[key]["owner"]
                )
            )
        if len(examples) > self.limits.max_examples:
            raise self._error("holds more photos than this import allows")
        if any(not r for r in rows.values()):
            raise self._error("has a concept without any photo")
        concepts = [
            ArchivedConcept(scope, cid, **record, rows=tuple(rows[(scope, cid)]))
            for (scope, cid), record in fields.items()
        ]
        return concepts, examples

    def _check_photos(self) -> list[ArchivedPhoto]:
        """The photo history's lines: each of a chat the manifest lists, each source once."""
        if self.photo_index is None:
            return []
        photos: list[ArchivedPhoto] = []
        seen: set[tuple[str, str]] = set()
        for number, raw in self._lines(PHOTOS):
            where = f"line {number} of {PHOTOS}"
            try:
                scope = clean_scope(_text(raw, "scope"))
                poster = clean_user(_text(raw, "poster"))
                source = clean_source(raw["source"])
                photo_id, posted_at = raw["photo_id"], _number(raw["posted_at"])
                if not _is_int(photo_id) or not 0 <= photo_id <= _MAX_ID:
                    raise TypeError("bad photo id")
            except (InvalidInputError, KeyError, TypeError, OverflowError) as error:
                raise self._error(f"has a bad photo at {where} ({_reason(error)})") from None
            if scope not in self.photo_index.indexing:
                raise self._error(f"has a photo of a chat its manifest does not list at {where}")
            if (scope, source) in seen:
                raise self._error(f"has a repeated photo at {where}")
            seen.add((scope, source))
            if len(photos) >= self.limits.max_photos:
                raise self._error("holds more indexed photos than this import allows")
            photos.append(ArchivedPhoto(scope, photo_id, source, poster, float(posted_at)))
        return photos

    def _vectors(self, name: str, n: int, dim: int) -> np.ndarray:
        """The float32 ``(n, dim)`` unit rows of the .npy member ``name``."""
        data = self._read(name, n * dim * 4 + 4096)
        try:
            vectors = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as error:
            # numpy parses the header with Python's own tokenizer and literal_eval: a crafted
            # one raises tokenize.TokenError, SyntaxError, TypeError... not only ValueError.
            raise self._error(f"has an unreadable {name} ({_reason(error)})") from None
        if vectors.dtype != np.dtype("<f4") or vectors.shape != (n, dim):
            raise self._error(
                f"has {name} of shape {vectors.shape} ({vectors.dtype}),"
                f" expected ({n}, {dim}) float32"
            )
        if not np.isfinite(vectors).all():
            raise self._error(f"has {name} with vectors that are not finite")
        # CLIP embeddings are unit length; a long vector would out-score every honest one.
        with np.errstate(over="ignore"):  # 1e38 squared: inf, refused below
            norms = np.linalg.norm(vectors, axis=1)
        if n and np.abs(norms - 1.0).max() > 1e-3:
            raise self._error(f"has {name} with vectors that are not unit length")
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _check_jpegs(self, pattern: re.Pattern, name_of: Callable[[int], str], n: int, what: str):
        """Exactly the JPEGs ``name_of(0..n-1)``, each read whole (size, CRC, signature)."""
        expected = {name_of(row) for row in range(n)}
        present = {name for name in self._members if pattern.fullmatch(name)}
        if present != expected:
            missing = sorted(expected - present)
            raise self._error(f"misses {missing[0]}" if missing else f"has {what} refers to")
        # Decoded like any upload (engine.images): JPEG magic followed by junk, a bomb or a
        # strip is refused here, before anything is written, not when a chat later uses it.
        image_limits = self.image_limits
        for row in range(n):
            name = name_of(row)
            try:
                # At the smallest scale: every byte is still decoded (junk and truncation are
                # found), but a 49 MP crop costs no 147 MB of pixels (and 1/10 of the time).
                decode_image(self._jpeg(name), image_limits, min_side=1).close()
            except ImageError as error:
                raise self._error(f"has a photo {name} that can't be read ({error})") from None

    @property
    def image_limits(self) -> ImageLimits:
        """How the archive's crops and thumbnails are decoded: when checked, and when stored."""
        return ImageLimits(max_bytes=self.limits.max_crop_bytes)

    def _jpeg(self, name: str) -> bytes:
        with self._reading():
            data = self._read(name, self.limits.max_crop_bytes)
        if not data.startswith(_JPEG_MAGIC):
            raise self._error(f"has a photo {name} that is not a JPEG")
        return data

    def crop(self, row: int) -> bytes:
        """Example ``row``'s crop (JPEG bytes)."""
        return self._jpeg(_crop_name(row))

    def thumbnail(self, row: int) -> bytes:
        """Photo ``row``'s thumbnail (JPEG bytes)."""
        return self._jpeg(_thumb_name(row))


_MEMBERS = frozenset({MANIFEST, CONCEPTS, EXAMPLES, EMBEDDINGS, PHOTOS, PHOTO_EMBEDDINGS})
_PHOTO_MEMBERS = frozenset({PHOTOS, PHOTO_EMBEDDINGS})


def read_archive(
    path: str | os.PathLike[str],
    limits: ArchiveLimits | None = None,
    text: TextLimits | None = None,
) -> Archive:
    """Open and validate an export; raises :class:`ArchiveError` with a clear message.

    ``text``: the limits of names and descriptions, those of the live path
    (:meth:`TextLimits.from_settings`; the default is the default settings').
    """
    return Archive(Path(path).expanduser(), limits or ArchiveLimits(), text or TextLimits())


# ----------------------------------------------------------------------------- import


def import_archive(
    path: str | os.PathLike[str] | Archive,
    store: ConceptStore,
    embedder: Any = None,
    scope_map: Mapping[str, str] | None = None,
    mode: Literal["merge", "replace"] = "merge",
    limits: ArchiveLimits | None = None,
    photos: PhotoStore | None = None,
    photo_embedder: Callable[[list[bytes]], np.ndarray] | None = None,
    include_photos: bool | None = None,
    source_fits: Callable[[str, str], bool] | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Import an archive into ``store`` (and its photo history into ``photos``); see the
    module doc.

    ``scope_map`` renames chats (archive scope -> target scope); others keep their names.
    ``mode="merge"`` adds to what the chats hold: a name that exists gets the photos it lacks.
    ``mode="replace"`` forgets every concept of the target chats before writing the archive's,
    and then, with ``photos``, replaces each target chat's photos by the archive's, one
    transaction per chat (:meth:`PhotoStore.replace_scope`), so a failure leaves a chat's old
    photos as they were (a restore).
    ``embedder`` (with ``model_id``, ``dim`` and ``embed_images``) is needed only when the
    archive was made with another embedding model than the store's.
    ``photos``: the target photo store; without it the archive's photo history is left out.
    ``include_photos``: whose photo history goes in. None (the default): the chats that keep
    their own id (a restore); a chat that ``scope_map`` renames gets none, since it would put
    other people's photos and user ids into another chat. True: every chat's, renamed ones too.
    False: nobody's (concepts only; the photo store is not touched).
    A chat's /index flag is set to the archive's only when the chat keeps its own id (merge or
    replace); a renamed chat keeps its own flag, which only its admins decide.
    ``source_fits(target scope, source)``: whether a photo's source has the form the target
    chat's platform sends (see the module doc); photos whose source does not fit are skipped
    and counted, not an error. None: any non-empty source fits (sources are opaque here).
    ``photo_embedder`` (thumbnail JPEGs -> unit rows of the photo store's size, e.g.
    :meth:`engine.engine.Engine.embed_thumbnails`) is needed only when the photos were
    embedded by another model than the photo store's.
    ``progress(stage, done, total)`` hears each stage: "Embedding crops again" and "Embedding
    photos again" (only when needed), then "Importing" (examples and photos written).
    """
    if mode not in ("merge", "replace"):
        raise InvalidInputError(f"Unknown import mode {mode!r}: use 'merge' or 'replace'.")
    archive = path if isinstance(path, Archive) else read_archive(path, limits)
    with nullcontext(archive) if isinstance(path, Archive) else archive:
        targets = _targets(archive, scope_map or {})
        vectors, reembedded = _vectors_for(archive, store, embedder, progress)
        # The photo history only goes into a photo store; left out, its chats are not touched.
        history = archive.photo_index if photos is not None else None
        flags_of = history.indexing if history is not None and include_photos is not False else {}
        # Whose history goes in: a chat that keeps its id; a renamed one only when asked.
        wanted = {s for s in flags_of if include_photos or targets[s] == s}
        # A chat's /index flag only ever into that same chat: never onto another one.
        flags = {s: on for s, on in flags_of.items() if s in wanted and targets[s] == s}
        asked = [(r, p) for r, p in enumerate(archive.photos) if p.scope in wanted]
        fits = source_fits or _any_source
        rows = [r for r, p in asked if fits(targets[p.scope], p.source)]
        left_out, foreign = len(archive.photos) - len(asked), len(asked) - len(rows)
        photo_vectors, photos_reembedded = (
            _photo_vectors_for(archive, photos, photo_embedder, rows, progress)
            if photos is not None
            else (None, False)
        )
        photo_targets = {targets[s] for s in wanted}
        chats = sorted({targets[c.scope] for c in archive.concepts} | photo_targets)
        _refuse_look_alikes(archive, store, targets, merge=mode == "merge")
        written = sum(len(a.rows) for a in archive.concepts) + (len(rows) if photo_targets else 0)
        tick = counter(progress, "Importing", written)
        # Everything is checked: only now are the stores touched, in one transaction (FAISS:
        # one SQLite transaction; Qdrant: undone on failure), so a failure at any point,
        # the photo history's included, leaves the concepts as they were.
        atomic = getattr(store, "atomic", None)
        with atomic() if atomic else nullcontext():
            if mode == "replace":
                for target in chats:
                    for concept in store.list_concepts(target):
                        store.delete(target, concept.id)
            counts = _write(archive, store, vectors, targets, tick)
            # The photos after the concepts, one transaction per chat.
            if photo_targets:
                by_target: dict[str, list[tuple[int, np.ndarray]]] = {t: [] for t in photo_targets}
                for row, vector in zip(rows, photo_vectors, strict=True):
                    by_target[targets[archive.photos[row].scope]].append((row, vector))
                write = _replace_photos_of if mode == "replace" else _add_photos_to
                added = sum(  # flags are keyed by archive chat, which is the target for these
                    write(archive, photos, target, picked, flags.get(target), tick)
                    for target, picked in sorted(by_target.items())
                )
                counts |= {"photos": added, "photos_skipped": len(rows) - added}
    return ImportReport(
        scopes=len(chats),
        reembedded=reembedded,
        photos_reembedded=photos_reembedded,
        photos_left_out=left_out,
        photos_skipped_foreign=foreign,
        **counts,
    )


def _refuse_look_alikes(
    archive: Archive, store: ConceptStore, targets: dict[str, str], merge: bool
) -> None:
    """No import brings ``Моchi`` (Cyrillic) into a chat that has ``Mochi``: the same rule as
    ``/remember`` (:func:`engine.validation.refuse_look_alike`), checked up front among the
    names that go into one chat (``scope_map`` can send two archived chats there) and, in a
    merge, the names it already has."""
    names: dict[str, list[str]] = {}
    for archived in archive.concepts:
        target = targets[archived.scope]
        if target not in names:
            names[target] = [c.name for c in store.list_concepts(target)] if merge else []
        try:
            refuse_look_alike(archived.name, names[target])
        except InvalidInputError as error:
            raise InvalidInputError(f"{error} (chat '{target}'). Nothing was imported.") from None
        names[target].append(archived.name)


def _any_source(scope: str, source: str) -> bool:
    return bool(source.strip())


def _targets(archive: Archive, scope_map: Mapping[str, str]) -> dict[str, str]:
    unknown = sorted(set(scope_map) - set(archive.scopes))
    if unknown:
        raise InvalidInputError(f"The archive has no chat '{unknown[0]}'.")
    return {scope: clean_scope(scope_map.get(scope, scope)) for scope in archive.scopes}


def _vectors_for(
    archive: Archive, store: ConceptStore, embedder: Any, progress: Progress | None = None
) -> tuple[np.ndarray, bool]:
    if archive.model_id == store.model_id:
        if archive.dim != store.dim:
            raise archive._error(
                f"says {archive.model_id} makes vectors of size {archive.dim}, not {store.dim}"
            )
        return archive.embeddings, False
    if embedder is None:
        raise InvalidInputError(
            f"{archive.path.name} was made with the embedding model {archive.model_id}, but"
            f" this store uses {store.model_id}: its photos must be embedded again, which needs"
            " the store's model loaded (rapbot import does this). Nothing was imported."
        )
    if embedder.model_id != store.model_id or embedder.dim != store.dim:
        raise InvalidInputError(
            f"The embedder is {embedder.model_id} (dim {embedder.dim}), but the store uses"
            f" {store.model_id} (dim {store.dim})."
        )
    rows: list[np.ndarray] = []
    n = len(archive.examples)
    tick = counter(progress, "Embedding crops again", n)
    for start in range(0, n, _EMBED_BATCH):
        images = []
        for row in range(start, min(start + _EMBED_BATCH, n)):
            try:
                images.append(
                    decode_image(archive.crop(row), archive.image_limits, min_side=CROP_MAX_SIDE)
                )
            except ImageError as error:
                raise archive._error(
                    f"has a photo {_crop_name(row)} that can't be read ({error})"
                ) from None
        rows.append(np.asarray(embedder.embed_images(images), dtype=np.float32))
        tick(len(images))
    vectors = np.concatenate(rows) if rows else np.zeros((0, store.dim), np.float32)
    return np.ascontiguousarray(vectors), True


def _photo_vectors_for(
    archive: Archive,
    photos: PhotoStore,
    embed: Callable[[list[bytes]], np.ndarray] | None,
    rows: list[int],
    progress: Progress | None = None,
) -> tuple[np.ndarray, bool]:
    """The vectors to store with the archive's photos ``rows`` (one per row, in order): its
    own, or its thumbnails embedded again when the photo store uses another model. Raises
    before anything is written."""
    index, n = archive.photo_index, len(rows)
    if n == 0:
        return np.zeros((0, photos.dim), np.float32), False
    if photos.mismatch is not None:  # the target index can take no photos now
        raise InvalidInputError(
            f"The photo search history of {archive.path.name} can't be imported:"
            f" {photos.mismatch.rstrip('.')}. Nothing was imported."
        )
    if index.model_id == photos.model_id:
        if index.dim != photos.dim:
            raise archive._error(
                f"says {index.model_id} makes photo vectors of size {index.dim}, not {photos.dim}"
            )
        return np.ascontiguousarray(archive.photo_embeddings[rows]), False
    if embed is None:
        raise InvalidInputError(
            f"The indexed photos of {archive.path.name} were embedded by {index.model_id}, but"
            f" this photo index uses {photos.model_id}: they must be embedded again from their"
            " thumbnails, which needs the search encoder (rapbot import does this)."
            " Nothing was imported."
        )
    batches: list[np.ndarray] = []
    tick = counter(progress, "Embedding photos again", n)
    for start in range(0, n, _EMBED_BATCH):
        chunk = rows[start : start + _EMBED_BATCH]
        try:
            batch = np.asarray(embed([archive.thumbnail(r) for r in chunk]))
        except ImageError as error:
            raise archive._error(
                f"has a thumbnail among {_thumb_name(chunk[0])} to {_thumb_name(chunk[-1])} that"
                f" can't be read ({error})"
            ) from None
        if batch.shape != (len(chunk), photos.dim) or not np.isfinite(batch).all():
            raise InvalidInputError(
                f"The photo embedder gave vectors of shape {batch.shape}, not"
                f" ({len(chunk)}, {photos.dim}) finite ones. Nothing was imported."
            )
        batches.append(batch.astype(np.float32))
        tick(len(chunk))
    return np.ascontiguousarray(np.concatenate(batches)), True


def _photo_row(
    archive: Archive, row: int, vector: np.ndarray
) -> tuple[np.ndarray, bytes, str, float, str]:
    """The :meth:`PhotoStore.add_many` row of the archive's photo ``row``."""
    photo = archive.photos[row]
    return vector, archive.thumbnail(row), photo.poster, photo.posted_at, photo.source


def _add_photos_to(
    archive: Archive,
    photos: PhotoStore,
    target: str,
    picked: list[tuple[int, np.ndarray]],  # (archive row, vector to store)
    flag: bool | None,
    tick: Callable[..., None],
) -> int:
    """Merge: add the photos to the chat in batches (a photo with the same source there is
    kept as it is: PhotoStore ignores a repeated source), then set its flag unless None;
    returns how many were new."""
    added = 0
    for start in range(0, len(picked), _PHOTO_WRITE_BATCH):
        batch = picked[start : start + _PHOTO_WRITE_BATCH]
        added += photos.add_many(target, [_photo_row(archive, r, v) for r, v in batch])
        tick(len(batch))
    if flag is not None:
        photos.set_indexing(target, flag)
    return added


def _replace_photos_of(
    archive: Archive,
    photos: PhotoStore,
    target: str,
    picked: list[tuple[int, np.ndarray]],
    flag: bool | None,
    tick: Callable[..., None],
) -> int:
    """Replace: the chat's photos become these (and its flag, unless None) in one
    transaction, the thumbnails read as they are written; returns how many it holds."""

    def rows() -> Iterator[tuple[np.ndarray, bytes, str, float, str]]:
        for r, v in picked:
            yield _photo_row(archive, r, v)
            tick()

    return photos.replace_scope(target, rows(), flag)


def import_source(origin: str, target: str, example: ArchivedExample) -> str:
    """The source key an imported example is stored under (what makes imports idempotent).

    A restore into the same chat keeps the original key (a re-run of the original task stays
    idempotent); anything else gets a key of its origin, so keys of two chats never collide.
    """
    if example.source and origin == target:
        return example.source
    tail = example.source or f"{example.concept_id}:{example.example_id}"
    digest = hashlib.sha256(f"{origin}\0{tail}".encode()).hexdigest()[:32]
    return f"import:{digest}"


def _write(
    archive: Archive,
    store: ConceptStore,
    vectors: np.ndarray,
    targets: dict[str, str],
    tick: Callable[..., None],
) -> dict[str, int]:
    counts = {"concepts": 0, "merged": 0, "examples": 0, "skipped": 0}
    for archived in archive.concepts:
        target = targets[archived.scope]
        concept = store.get_by_name(target, archived.name)
        # Photos the chat's concept already has, by content (e.g. an export of this very chat).
        known = (
            {_digest(crop) for crop in store.example_crops(target, concept.id)}
            if concept
            else set()
        )
        counts["merged"] += concept is not None
        for row in archived.rows:
            tick()  # counted as it is taken up: written or skipped below
            example = archive.examples[row]
            source = import_source(archived.scope, target, example)
            # As the live path stores crops; decoded under the limits it was checked with.
            crop = bounded_crop_jpeg(archive.crop(row), archive.image_limits)
            holder = store.find_by_source(target, source)
            if holder is not None or _digest(crop) in known:
                # Imported before; if since renamed, the rest of its photos still go to it.
                concept = concept or holder
                counts["skipped"] += 1
                continue
            if concept is None:
                concept = store.add_concept(
                    target,
                    name=archived.name,
                    description=archived.description,
                    category=archived.category,
                    owner=archived.owner,
                    embedding=vectors[row],
                    crop_jpeg=crop,
                    box=example.box,
                    source=source,
                )
                counts["concepts"] += 1
            else:
                concept = store.add_example(
                    target,
                    concept.id,
                    embedding=vectors[row],
                    crop_jpeg=crop,
                    box=example.box,
                    source=source,
                    added_by=example.added_by,
                )
            counts["examples"] += 1
    return counts


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text(record: dict[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be text")
    return value


def _number(value: Any) -> float:
    """A finite time (seconds) read from an archive."""
    if not _is_number(value) or not math.isfinite(value) or abs(value) > 1e12:
        raise TypeError("bad time")
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
