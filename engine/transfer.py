"""Export and import of scopes' concepts: one portable file for backups and moving chats.

An archive is a zip file; nothing in it is ever extracted to disk, members are read by name::

    manifest.json     {"format": "rapbot-concepts", "version": 1, "model_id", "dim",
                       "created_at", "scopes": [{"scope", "concepts", "examples"}], "counts"}
    concepts.jsonl    a concept per line: scope, id, name, description, category, owner,
                      created_at
    examples.jsonl    an example per line: scope, concept_id, example_id, box, source,
                      created_at; line i goes with crops/<i:08d>.jpg and row i of the vectors
    crops/NNNNNNNN.jpg
    embeddings.npy    float32 (examples, dim), made by the embedding model ``model_id``

Importing validates the whole archive (members, sizes, JSON, names, vectors, every crop)
before writing anything, so a bad file leaves the store as it was. Embeddings of the store's
own model are used as they are; those of another model are replaced by embedding the crops
again with the given embedder, so a chat can move to a new CLIP model. Every imported example
carries a source key derived from where it came from, which makes importing idempotent: the
same archive (or a newer export of the same chat) adds only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.errors import ImageError, InvalidInputError, RapbotError
from engine.naming import clean_description, clean_name, clean_scope, clean_user
from engine.store.base import ConceptStore, check_scope, name_key
from engine.types import Box

FORMAT = "rapbot-concepts"
FORMAT_VERSION = 1
MANIFEST, CONCEPTS, EXAMPLES, EMBEDDINGS = (
    "manifest.json",
    "concepts.jsonl",
    "examples.jsonl",
    "embeddings.npy",
)
_CROP = re.compile(r"crops/(\d{8})\.jpg")
_JPEG_MAGIC = b"\xff\xd8\xff"
# Generous bounds for text read from an archive (the engine's own limits are stricter).
_MAX_NAME, _MAX_DESCRIPTION, _MAX_CATEGORY, _MAX_SOURCE = 256, 4000, 64, 512
_EMBED_BATCH = 32


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

    max_bytes: int = 8 * 1024**3  # all members, uncompressed
    max_examples: int = 1_000_000
    max_crop_bytes: int = 20 * 1024**2
    max_manifest_bytes: int = 1024**2


@dataclass(frozen=True)
class ExportReport:
    path: str
    scopes: int
    concepts: int
    examples: int


@dataclass(frozen=True)
class ImportReport:
    scopes: int  # chats written to
    concepts: int  # new concepts
    merged: int  # archived concepts whose name already existed in the chat
    examples: int  # example photos added
    skipped: int  # example photos already there (imported before)
    reembedded: bool  # crops were embedded again with another model


# ----------------------------------------------------------------------------- export


def export_scopes(
    store: ConceptStore,
    scopes: Sequence[str] | None,
    path: str | os.PathLike[str],
    model_id: str | None = None,
) -> ExportReport:
    """Write the concepts of ``scopes`` (None: every scope) to one archive at ``path``.

    ``model_id`` (default: the store's) is recorded with the embeddings; it must be the
    store's. The file appears atomically: a failed export leaves no partial archive.
    """
    if model_id is not None and model_id != store.model_id:
        raise InvalidInputError(
            f"The store's embeddings are made by {store.model_id}, not {model_id}."
        )
    if scopes is None:
        chosen = store.scopes()
    else:
        chosen = list(dict.fromkeys(check_scope(s) for s in scopes))
        for scope in chosen:
            if store.count(scope) == 0:
                raise InvalidInputError(f"There is nothing to export in chat '{scope}'.")
    path = Path(path).expanduser()
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder; give a file name for the export.")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with (
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive,
            tempfile.TemporaryFile() as vectors,
        ):
            report = _write_archive(store, chosen, archive, vectors, path)
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
    vectors: Any,
    path: Path,
) -> ExportReport:
    concepts: list[str] = []
    examples: list[str] = []
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
            vectors.write(np.asarray(ex.embedding, dtype="<f4").tobytes())
            examples.append(
                _jsonl(
                    scope=scope,
                    concept_id=ex.concept_id,
                    example_id=ex.example_id,
                    box=ex.box.as_list(),
                    source=ex.source,
                    created_at=ex.created_at,
                )
            )
        per_scope.append({"scope": scope, "concepts": len(seen), "examples": len(examples) - first})
    archive.writestr(CONCEPTS, "".join(concepts))
    archive.writestr(EXAMPLES, "".join(examples))
    with archive.open(EMBEDDINGS, "w", force_zip64=True) as out:
        header = {"descr": "<f4", "fortran_order": False, "shape": (len(examples), store.dim)}
        np.lib.format.write_array_header_1_0(out, header)
        vectors.seek(0)
        shutil.copyfileobj(vectors, out)
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
    archive.writestr(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
    return ExportReport(str(path), **counts)


def _jsonl(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False) + "\n"


def _crop_name(row: int) -> str:
    return f"crops/{row:08d}.jpg"


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


class Archive:
    """A validated archive, open for reading crops; use :func:`read_archive`."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self.path = path
        self.limits = limits
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

    def _read(self, name: str, limit: int) -> bytes:
        info = self._members.get(name)
        if info is None:
            raise self._error(f"has no {name}")
        if info.file_size > limit:
            raise self._error(f"has a {name} of {info.file_size} bytes (at most {limit})")
        with self._zip.open(info) as member:
            data = member.read(limit + 1)
        if len(data) > limit:
            raise self._error(f"has a {name} larger than it declares")
        return data

    # ------------------------------------------------------------------------- validation

    def _validate(self) -> None:
        limits = self.limits
        infos = self._zip.infolist()
        if len(infos) > limits.max_examples + 4:
            raise self._error(f"has {len(infos)} files, more than this import allows")
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if name not in (MANIFEST, CONCEPTS, EXAMPLES, EMBEDDINGS) and not _CROP.fullmatch(name):
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
        self.concepts, self.examples = self._check_records()
        self._check_embeddings()
        self._check_crops()

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
        if version != FORMAT_VERSION:
            raise self._error(
                f"has format version {version!r}; this rapbot reads version {FORMAT_VERSION}"
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

    def _lines(self, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
        data = self._read(name, self.limits.max_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise self._error(f"has an unreadable {name} ({_reason(error)})") from None
        for number, line in enumerate(text.splitlines(), 1):
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
        for number, raw in self._lines(CONCEPTS):
            where = f"line {number} of {CONCEPTS}"
            try:
                scope = clean_scope(_text(raw, "scope"))
                concept_id = _text(raw, "id")
                record = {
                    "name": clean_name(_text(raw, "name"), _MAX_NAME),
                    "description": clean_description(_text(raw, "description"), _MAX_DESCRIPTION),
                    "category": clean_description(_text(raw, "category"), _MAX_CATEGORY),
                    "owner": clean_user(_text(raw, "owner")),
                }
            except (InvalidInputError, KeyError, TypeError) as error:
                raise self._error(f"has a bad concept at {where} ({_reason(error)})") from None
            if not 1 <= len(concept_id) <= 64 or (scope, concept_id) in fields:
                raise self._error(f"has a bad or repeated concept id at {where}")
            if (scope, name_key(record["name"])) in names:
                raise self._error(f"names '{record['name']}' twice in chat '{scope}'")
            names.add((scope, name_key(record["name"])))
            fields[(scope, concept_id)] = record
        rows: dict[tuple[str, str], list[int]] = {key: [] for key in fields}
        examples: list[ArchivedExample] = []
        for number, raw in self._lines(EXAMPLES):
            where = f"line {number} of {EXAMPLES}"
            try:
                scope, concept_id = clean_scope(_text(raw, "scope")), _text(raw, "concept_id")
                example_id, box, source = raw["example_id"], raw["box"], raw.get("source")
                if not _is_int(example_id) or not (
                    isinstance(box, list) and len(box) == 4 and all(map(_is_int, box))
                ):
                    raise TypeError("bad example id or box")
                if source is not None and not (
                    isinstance(source, str) and 0 < len(source) <= _MAX_SOURCE
                ):
                    raise TypeError("bad source")
            except (InvalidInputError, KeyError, TypeError) as error:
                raise self._error(f"has a bad example at {where} ({_reason(error)})") from None
            key = (scope, concept_id)
            if key not in rows:
                raise self._error(f"has an example of an unknown concept at {where}")
            rows[key].append(len(examples))
            examples.append(ArchivedExample(key[0], concept_id, example_id, Box(*box), source))
        if len(examples) > self.limits.max_examples:
            raise self._error("holds more photos than this import allows")
        if any(not r for r in rows.values()):
            raise self._error("has a concept without any photo")
        found = {
            "scopes": len({scope for scope, _ in fields}),
            "concepts": len(fields),
            "examples": len(examples),
        }
        if found != {k: self.counts[k] for k in found}:
            raise self._error(f"does not hold what its manifest says ({found})")
        concepts = [
            ArchivedConcept(scope, cid, **record, rows=tuple(rows[(scope, cid)]))
            for (scope, cid), record in fields.items()
        ]
        return concepts, examples

    def _check_embeddings(self) -> None:
        n = len(self.examples)
        data = self._read(EMBEDDINGS, n * self.dim * 4 + 4096)
        try:
            vectors = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise self._error(f"has unreadable embeddings ({_reason(error)})") from None
        if vectors.dtype != np.dtype("<f4") or vectors.shape != (n, self.dim):
            raise self._error(
                f"has embeddings of shape {vectors.shape} ({vectors.dtype}),"
                f" expected ({n}, {self.dim}) float32"
            )
        if not np.isfinite(vectors).all():
            raise self._error("has embeddings that are not finite")
        # CLIP embeddings are unit length; a long vector would out-score every honest one.
        if n and np.abs(np.linalg.norm(vectors, axis=1) - 1.0).max() > 1e-3:
            raise self._error("has embeddings that are not unit length")
        self.embeddings = np.ascontiguousarray(vectors, dtype=np.float32)

    def _check_crops(self) -> None:
        expected = {_crop_name(row) for row in range(len(self.examples))}
        present = {name for name in self._members if _CROP.fullmatch(name)}
        if present != expected:
            missing = sorted(expected - present)
            what = f"misses {missing[0]}" if missing else "has photos no example refers to"
            raise self._error(what)
        for row in range(len(self.examples)):
            self.crop(row)  # reads it whole: size, CRC and JPEG signature are checked

    def crop(self, row: int) -> bytes:
        with self._reading():
            data = self._read(_crop_name(row), self.limits.max_crop_bytes)
        if not data.startswith(_JPEG_MAGIC):
            raise self._error(f"has a photo {_crop_name(row)} that is not a JPEG")
        return data


def read_archive(path: str | os.PathLike[str], limits: ArchiveLimits | None = None) -> Archive:
    """Open and validate an export; raises :class:`ArchiveError` with a clear message."""
    return Archive(Path(path).expanduser(), limits or ArchiveLimits())


# ----------------------------------------------------------------------------- import


def import_archive(
    path: str | os.PathLike[str] | Archive,
    store: ConceptStore,
    embedder: Any = None,
    scope_map: Mapping[str, str] | None = None,
    mode: Literal["merge", "replace"] = "merge",
    limits: ArchiveLimits | None = None,
) -> ImportReport:
    """Import an archive into ``store``; see the module doc.

    ``scope_map`` renames chats (archive scope -> target scope); others keep their names.
    ``mode="merge"`` adds to what the chats hold: a name that exists gets the photos it lacks.
    ``mode="replace"`` first forgets every concept of the target chats (a restore).
    ``embedder`` (with ``model_id``, ``dim`` and ``embed_images``) is needed only when the
    archive was made with another embedding model than the store's.
    """
    if mode not in ("merge", "replace"):
        raise InvalidInputError(f"Unknown import mode {mode!r}: use 'merge' or 'replace'.")
    archive = path if isinstance(path, Archive) else read_archive(path, limits)
    with nullcontext(archive) if isinstance(path, Archive) else archive:
        targets = _targets(archive, scope_map or {})
        vectors, reembedded = _vectors_for(archive, store, embedder)
        # Everything is checked: only now is the store touched.
        if mode == "replace":
            for target in dict.fromkeys(targets.values()):
                for concept in store.list_concepts(target):
                    store.delete(target, concept.id)
        deferred = getattr(store, "deferred_saves", None)  # FAISS: one index write at the end
        with deferred() if deferred else nullcontext():
            counts = _write(archive, store, vectors, targets)
    return ImportReport(scopes=len(set(targets.values())), reembedded=reembedded, **counts)


def _targets(archive: Archive, scope_map: Mapping[str, str]) -> dict[str, str]:
    scopes = {c.scope for c in archive.concepts}
    unknown = sorted(set(scope_map) - scopes)
    if unknown:
        raise InvalidInputError(f"The archive has no chat '{unknown[0]}'.")
    return {scope: clean_scope(scope_map.get(scope, scope)) for scope in sorted(scopes)}


def _vectors_for(archive: Archive, store: ConceptStore, embedder: Any) -> tuple[np.ndarray, bool]:
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
    from engine.images import decode_image

    rows: list[np.ndarray] = []
    n = len(archive.examples)
    for start in range(0, n, _EMBED_BATCH):
        images = []
        for row in range(start, min(start + _EMBED_BATCH, n)):
            try:
                images.append(decode_image(archive.crop(row)))
            except ImageError as error:
                raise archive._error(
                    f"has a photo {_crop_name(row)} that can't be read ({error})"
                ) from None
        rows.append(np.asarray(embedder.embed_images(images), dtype=np.float32))
    vectors = np.concatenate(rows) if rows else np.zeros((0, store.dim), np.float32)
    return np.ascontiguousarray(vectors), True


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
    archive: Archive, store: ConceptStore, vectors: np.ndarray, targets: dict[str, str]
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
            example = archive.examples[row]
            source = import_source(archived.scope, target, example)
            crop = archive.crop(row)
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
