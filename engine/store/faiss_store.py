"""The local-mode concept store: SQLite holds the truth, one FAISS index per scope is a cache.

Layout of a store folder::

    concepts.sqlite3           concepts, examples (crop, box, embedding), meta, scope versions
    indexes/<sha256>.faiss     one file per scope: a small JSON header + a serialised FAISS index

Consistency. Every change to a scope bumps that scope's version in the same SQLite transaction.
An index (in memory or on disk) records the version it reflects. An index file is written to a
temporary file, fsynced and renamed over the old one, so a file is always some complete,
committed state. When the versions differ (a crash between commit and save, another process
changed the scope, a missing or unreadable file) the index is reconciled with SQLite by example
id: ids are never reused (AUTOINCREMENT) and an example's vector never changes, so adding the
missing ids and removing the extra ones gives exactly the committed state. Before each search one
cheap query compares the cached version with SQLite's, so changes by other processes are seen.

Index kinds. A scope's index is exact (``IndexIDMap2`` over ``IndexFlatIP``) below
``ivf_threshold`` examples (default 10,000: a flat scan of 10k x 512 takes ~1 ms on one core)
and an ``IndexIVFFlat`` (inner product, ``nprobe`` lists probed) above it, retrained when the
scope has doubled since training and turned back into a flat index below half the threshold.

Files of large scopes (over ``eager_save_max`` vectors) are not rewritten after every change but
on :meth:`FaissConceptStore.flush`, on eviction and on close; a crash only costs a reconcile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from engine.errors import InvalidInputError, NameTakenError, StoreError, UnknownConceptError
from engine.store.base import (
    NewConcept,
    StoredExample,
    check_box,
    check_crop,
    check_embedding,
    check_ids,
    check_k,
    check_model,
    check_name,
    check_queries,
    check_scope,
    check_source,
    check_text,
    name_key,
)
from engine.types import Box, Concept, ExampleHit

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: examples.added_by (who added each photo), filled from the owner
DB_NAME = "concepts.sqlite3"
INDEX_DIR = "indexes"
INDEX_MAGIC = b"RAPBOT-FAISS-INDEX\n"
_STALE_TMP_SECONDS = 600
_SQL_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit
_SMALL_SEARCH_WORK = 2_000_000  # dot products below which OpenMP threads cost more than they give

_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS scopes (scope TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS concepts (
        id TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        name TEXT NOT NULL,
        name_key TEXT NOT NULL,
        description TEXT NOT NULL,
        category TEXT NOT NULL,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (scope, name_key)
    )""",
    "CREATE INDEX IF NOT EXISTS concepts_owner ON concepts (owner)",
    # AUTOINCREMENT: an example id is never reused, so an id names one immutable vector and
    # an index can be reconciled with SQLite by ids alone. The crop is the last column so that
    # reading ids and embeddings need not walk its overflow pages.
    """CREATE TABLE IF NOT EXISTS examples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        concept_id TEXT NOT NULL,
        scope TEXT NOT NULL,
        x1 INTEGER NOT NULL, y1 INTEGER NOT NULL, x2 INTEGER NOT NULL, y2 INTEGER NOT NULL,
        source TEXT,
        created_at REAL NOT NULL,
        added_by TEXT NOT NULL,
        embedding BLOB NOT NULL,
        crop BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS examples_scope ON examples (scope, id)",
    "CREATE INDEX IF NOT EXISTS examples_concept ON examples (concept_id, id)",
    """CREATE UNIQUE INDEX IF NOT EXISTS examples_source ON examples (scope, source)
        WHERE source IS NOT NULL""",
)
# After any migration (the column is new in schema 2): forget_user finds a user's photos.
_LATE_DDL = ("CREATE INDEX IF NOT EXISTS examples_added_by ON examples (added_by)",)


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: who added each example, taken to be its concept's owner (the only
    person schema 1 knew of). In the caller's transaction."""
    db.execute("ALTER TABLE examples ADD COLUMN added_by TEXT NOT NULL DEFAULT ''")
    db.execute(
        "UPDATE examples SET added_by ="
        " (SELECT owner FROM concepts WHERE concepts.id = examples.concept_id)"
    )
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")


_CONCEPT_SQL = """SELECT c.id, c.scope, c.name, c.description, c.category, c.owner, c.created_at,
    (SELECT COUNT(*) FROM examples e WHERE e.concept_id = c.id) FROM concepts c"""


def _concept(row: Sequence) -> Concept:
    return Concept(*row[:7], examples=int(row[7]))


# ----------------------------------------------------------------------------- index files


def index_path(root: Path, scope: str) -> Path:
    """Where a scope's index lives: scope names are arbitrary text, file names a hash of it."""
    return Path(root) / INDEX_DIR / (hashlib.sha256(scope.encode("utf-8")).hexdigest() + ".faiss")


def write_index_file(path: Path, header: dict, index: faiss.Index) -> None:
    """Atomically replace ``path`` with ``header`` + ``index`` (temp file, fsync, rename)."""
    data = faiss.serialize_index(index)
    raw = json.dumps({**header, "crc32": zlib.crc32(data)}, sort_keys=True).encode("utf-8")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(INDEX_MAGIC + struct.pack("<I", len(raw)) + raw)
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # No fsync of the folder: a rename lost to a power cut leaves the older file, whose
    # version is behind SQLite's, so it is reconciled on load like any stale file.


def _split_index_file(data: bytes) -> tuple[dict, int]:
    """The header of an index file's bytes and where the FAISS bytes start."""
    if not data.startswith(INDEX_MAGIC):
        raise ValueError("not a rapbot index file")
    start = len(INDEX_MAGIC) + 4
    (length,) = struct.unpack("<I", data[len(INDEX_MAGIC) : start])
    header = json.loads(data[start : start + length].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("bad index header")
    return header, start + length


def read_index_header(path: Path) -> dict | None:
    """The JSON header of an index file (version, count ...), or None if absent or unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(INDEX_MAGIC) + 4)
            if len(head) < len(INDEX_MAGIC) + 4:
                return None
            (length,) = struct.unpack("<I", head[len(INDEX_MAGIC) :])
            return _split_index_file(head + f.read(length))[0]
    except (OSError, ValueError, struct.error):
        return None


def read_index_file(path: Path) -> tuple[dict, faiss.Index] | None:
    """Header and index of a file, or None if it is missing, truncated or corrupt."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning("cannot read index %s (%s); rebuilding it", path, error)
        return None
    try:
        header, offset = _split_index_file(data)
        body = np.frombuffer(data, dtype=np.uint8, offset=offset)
        if zlib.crc32(body) != header.get("crc32"):
            raise ValueError("checksum mismatch")
        return header, faiss.deserialize_index(body)
    except (ValueError, RuntimeError, struct.error, UnicodeDecodeError) as error:
        log.warning("index %s is unreadable (%s); rebuilding it", path, error)
        return None


def index_ids(index: faiss.Index) -> np.ndarray:
    """The example ids held by an index (flat id map or IVF lists), sorted."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return np.sort(faiss.vector_to_array(faiss.downcast_index(index).id_map))
    parts = [
        faiss.rev_swig_ptr(ivf.invlists.get_ids(i), size).copy()
        for i in range(ivf.nlist)
        if (size := ivf.invlists.list_size(i))
    ]
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def read_store_identity(root: Path) -> tuple[str, int] | None:
    """The ``(model_id, dim)`` recorded in the store in ``root``, read only; None when there is
    no store yet or it records none."""
    path = Path(root) / DB_NAME
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:
        return None  # not a store (yet): opening it reports what is wrong
    finally:
        db.close()
    if "model_id" not in meta or not str(meta.get("dim", "")).isdigit():
        return None
    return meta["model_id"], int(meta["dim"])


def read_store_summary(root: Path) -> dict | None:
    """The model and sizes of the store in ``root``, read only (never creates or migrates
    anything; for ``rapbot doctor``); None when there is no store yet."""
    path = Path(root) / DB_NAME
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        chats, concepts = db.execute(
            "SELECT COUNT(DISTINCT scope), COUNT(*) FROM concepts"
        ).fetchone()
    finally:
        db.close()
    return {"model_id": meta.get("model_id", "?"), "chats": chats, "concepts": concepts}


def scope_version(db: sqlite3.Connection, scope: str) -> int:
    """The scope's version in a ``scopes`` table: bumped with every change to the scope."""
    row = db.execute("SELECT version FROM scopes WHERE scope = ?", (scope,)).fetchone()
    return int(row[0]) if row else 0


def bump_scope_version(db: sqlite3.Connection, scope: str) -> tuple[int, int]:
    """Bump the scope's version inside the caller's transaction; returns (old, new)."""
    old = scope_version(db, scope)
    db.execute(
        "INSERT INTO scopes (scope, version) VALUES (?, ?)"
        " ON CONFLICT (scope) DO UPDATE SET version = excluded.version",
        (scope, old + 1),
    )
    return old, old + 1


@dataclass
class _ScopeIndex:
    index: faiss.Index  # ids are example ids
    version: int  # the scope version this index reflects
    trained_size: int = 0  # IVF: how many vectors it was trained on
    dirty: bool = False  # changed since its file was written

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search_work(self, nq: int) -> int:
        if self.kind == "flat":
            return nq * self.size
        nlist, nprobe = self.index.nlist, self.index.nprobe
        return nq * (nlist + self.size * nprobe // max(nlist, 1))


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads in this thread only (the setting is per thread)."""
    previous = faiss.omp_get_max_threads()
    if previous == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def build_index(
    dim: int, ids: np.ndarray, vectors: np.ndarray, ivf_threshold: int, nprobe: int
) -> tuple[faiss.Index, int]:
    """A scope's inner-product index over ``vectors`` (with ``ids``), of the kind that suits its
    size, and how many vectors trained it (0 for flat): exact (``IndexIDMap2`` over
    ``IndexFlatIP``) below ``ivf_threshold`` vectors, else an ``IndexIVFFlat`` with ~4 sqrt(n)
    lists trained on a seeded sample and ``nprobe`` lists probed. Both give true inner products
    (cosine for unit vectors) for the vectors they find. Shared by the concept and photo stores.
    """
    n = len(ids)
    if n < ivf_threshold:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if n:
            index.add_with_ids(vectors, ids)
        return index, 0
    # ~4 sqrt(n) lists, at least 40 training points each (FAISS warns below 39).
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 40))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    sample = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
    index.train(vectors[np.sort(sample)])
    index.add_with_ids(vectors, ids)
    index.nprobe = min(nprobe, nlist)
    return index, n


def needs_rebuild(entry: _ScopeIndex, ivf_threshold: int) -> bool:
    """Whether a scope's index should be rebuilt by :func:`build_index`: a flat index that
    reached the threshold, an IVF index that shrank below half of it or doubled since training."""
    if entry.kind == "flat":
        return entry.size >= ivf_threshold
    return entry.size < ivf_threshold // 2 or entry.size > 2 * entry.trained_size


# ----------------------------------------------------------------------------- the store


class FaissConceptStore:
    """A :class:`~engine.store.base.ConceptStore` in one folder; thread-safe; see module doc."""

    def __init__(
        self,
        root: Path,
        model_id: str,
        dim: int,
        *,
        ivf_threshold: int = 10_000,
        nprobe: int = 32,
        eager_save_max: int = 20_000,
        max_cached_scopes: int | None = None,
    ) -> None:
        self.model_id, self.dim = check_model(model_id, dim)
        self.root = Path(root)
        self._ivf_threshold = max(2, int(ivf_threshold))
        self._nprobe = max(1, int(nprobe))
        self._eager_save_max = int(eager_save_max)
        self._max_cached = max_cached_scopes
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, _ScopeIndex] = OrderedDict()
        self._closed = False
        self._deferred = 0  # open deferred_saves() blocks
        self._atomic = False  # inside atomic(): one SQLite transaction for every write
        try:
            (self.root / INDEX_DIR).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.root / DB_NAME, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"Cannot open the memory store in {self.root}: {error}") from error
        try:
            with self._sqlite_errors():  # e.g. "file is not a database"
                # 8 KiB pages hold a 512-d embedding row without overflow pages (new files).
                self._db.execute("PRAGMA page_size=8192")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives kills
            self.store_id = self._init_meta()
        except BaseException:
            self._db.close()
            raise
        self._remove_stale_temp_files()

    def _init_meta(self) -> str:
        with self._write() as db:
            for statement in _DDL:
                db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {
                    "schema_version": str(SCHEMA_VERSION),
                    "model_id": self.model_id,
                    "dim": str(self.dim),
                    "store_id": uuid.uuid4().hex,
                }
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            if meta.get("schema_version") == "1":
                _migrate_1_to_2(db)
                meta["schema_version"] = "2"
                log.info("memory store %s migrated to schema 2 (who added each photo)", self.root)
            if meta.get("schema_version") == str(SCHEMA_VERSION):
                for statement in _LATE_DDL:
                    db.execute(statement)
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StoreError(
                f"The memory store in {self.root} has schema version {meta.get('schema_version')};"
                f" this rapbot reads version {SCHEMA_VERSION}. Upgrade rapbot or use another"
                " data folder."
            )
        if meta.get("model_id") != self.model_id or meta.get("dim") != str(self.dim):
            raise StoreError(
                f"The memory store in {self.root} was created with the embedding model"
                f" {meta.get('model_id')} (dim {meta.get('dim')}), but this engine uses"
                f" {self.model_id} (dim {self.dim}). Its memories cannot be searched with"
                " another model: use the same model profile or another data folder."
            )
        return meta["store_id"]

    def _remove_stale_temp_files(self) -> None:
        # A process killed while writing leaves a temp file; a live writer's is recent.
        cutoff = time.time() - _STALE_TMP_SECONDS
        for tmp in (self.root / INDEX_DIR).glob("*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"FaissConceptStore({str(self.root)!r}, {self.model_id!r}, {self.dim})"

    def __enter__(self) -> FaissConceptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- SQLite helpers

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("The memory store is closed.")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes SQLite's write lock up front."""
        with self._lock, self._sqlite_errors():
            self._check_open()
            if self._atomic:  # part of atomic()'s transaction, which commits or rolls back
                yield self._db
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: its statements see one snapshot even while others write."""
        with self._lock, self._sqlite_errors():
            self._check_open()
            if self._atomic:
                yield self._db
                return
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Every write inside is one SQLite transaction: all of them are committed, or (on
        any exception) none, and the store is as it was (imports: merge and replace). Other
        threads of this store wait; other processes' writes wait on SQLite's lock. Index files
        are written once, after the commit; on a rollback the cached indexes are dropped and
        rebuilt from SQLite when next used."""
        with self._lock:
            self._check_open()
            if self._atomic:
                raise RuntimeError("atomic() blocks do not nest")
            with self._sqlite_errors():
                self._db.execute("BEGIN IMMEDIATE")
            self._atomic = True
            self._deferred += 1
            try:
                yield
                self._atomic = False
                with self._sqlite_errors():
                    self._db.execute("COMMIT")
            except BaseException:
                self._atomic = False
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._cache.clear()  # they hold rolled-back changes; never saved (deferred)
                raise
            finally:
                self._deferred -= 1
            if not self._deferred:
                self.flush()

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(f"The memory store failed: {error}") from error

    def _get(self, db: sqlite3.Connection, scope: str, concept_id: str) -> Concept | None:
        row = db.execute(
            _CONCEPT_SQL + " WHERE c.scope = ? AND c.id = ?", (scope, concept_id)
        ).fetchone()
        return _concept(row) if row else None

    def _require(self, db: sqlite3.Connection, scope: str, concept_id: str) -> Concept:
        concept = self._get(db, scope, check_text(concept_id, "concept id"))
        if concept is None:
            raise UnknownConceptError(f"There is no concept {concept_id!r} in this chat.")
        return concept

    def _source_owner(self, db: sqlite3.Connection, scope: str, source: str | None) -> str | None:
        if source is None:
            return None
        row = db.execute(
            "SELECT concept_id FROM examples WHERE scope = ? AND source = ?", (scope, source)
        ).fetchone()
        return row[0] if row else None

    def _insert_example(
        self,
        db: sqlite3.Connection,
        scope: str,
        concept_id: str,
        embedding: np.ndarray,
        crop: bytes,
        box: Box,
        source: str | None,
        now: float,
        added_by: str,
    ) -> int:
        cursor = db.execute(
            "INSERT INTO examples (concept_id, scope, x1, y1, x2, y2, source, created_at,"
            " added_by, embedding, crop) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (concept_id, scope, *box.as_list(), source, now, added_by, embedding.tobytes(), crop),
        )
        return int(cursor.lastrowid)

    def _embeddings(
        self, db: sqlite3.Connection, scope: str, ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of a scope's examples: all of them, or those with the given ids."""
        if ids is None:
            rows = db.execute(
                "SELECT id, embedding FROM examples WHERE scope = ? ORDER BY id", (scope,)
            ).fetchall()
        else:
            rows = []
            for start in range(0, len(ids), _SQL_CHUNK):
                chunk = [int(i) for i in ids[start : start + _SQL_CHUNK]]
                rows += db.execute(
                    "SELECT id, embedding FROM examples WHERE scope = ? AND id IN"
                    f" ({','.join('?' * len(chunk))})",
                    (scope, *chunk),
                ).fetchall()
        found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return found, vectors.reshape(len(rows), self.dim)

    # ------------------------------------------------------------------------- index cache

    def _build(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[faiss.Index, int]:
        """A new index of the kind that suits the size, and how many vectors trained it."""
        return build_index(self.dim, ids, vectors, self._ivf_threshold, self._nprobe)

    def _needs_rebuild(self, entry: _ScopeIndex) -> bool:
        return needs_rebuild(entry, self._ivf_threshold)

    def _rebuild(self, scope: str) -> _ScopeIndex:
        with self._read() as db:
            version = scope_version(db, scope)
            ids, vectors = self._embeddings(db, scope)
        index, trained = self._build(ids, vectors)
        return _ScopeIndex(index, version, trained, dirty=True)

    def _reconcile(self, scope: str, entry: _ScopeIndex) -> _ScopeIndex:
        """Bring an index to SQLite's state by example id (see module doc)."""
        with self._read() as db:
            version = scope_version(db, scope)
            rows = db.execute("SELECT id FROM examples WHERE scope = ? ORDER BY id", (scope,))
            truth = np.fromiter((r[0] for r in rows), dtype=np.int64)
            held = index_ids(entry.index)
            missing = np.setdiff1d(truth, held, assume_unique=True)
            ids, vectors = self._embeddings(db, scope, missing) if len(missing) else (missing, None)
        entry.remove(np.setdiff1d(held, truth, assume_unique=True))
        entry.add(ids, vectors)
        entry.version, entry.dirty = version, True
        return self._rebuild(scope) if self._needs_rebuild(entry) else entry

    def _load_file(self, scope: str) -> _ScopeIndex | None:
        loaded = read_index_file(index_path(self.root, scope))
        if loaded is None:
            return None
        header, index = loaded
        found = (header.get("store_id"), header.get("scope"), header.get("dim"), index.d)
        if (
            found != (self.store_id, scope, self.dim, self.dim)
            or header.get("count") != index.ntotal
            or not isinstance(header.get("version"), int)
        ):
            log.warning("index file of scope %r does not belong to this store; rebuilding", scope)
            return None
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(self._nprobe, index.nlist)
        return _ScopeIndex(index, header["version"], int(header.get("trained_size", 0)))

    def _sync(self, scope: str) -> _ScopeIndex:
        """The scope's index at SQLite's current version (cached, loaded or reconciled)."""
        with self._sqlite_errors():
            version = scope_version(self._db, scope)
        entry = self._cache.get(scope)
        if entry is not None and entry.version == version:
            self._cache.move_to_end(scope)
            return entry
        if entry is None:
            if version == 0:  # a scope never written: nothing to load, nothing to cache
                return _ScopeIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim)), 0)
            entry = self._load_file(scope)
            if entry is not None and entry.version == version:
                self._keep(scope, entry)
                return entry
        entry = self._rebuild(scope) if entry is None else self._reconcile(scope, entry)
        self._keep(scope, entry)
        self._persist(scope, entry)
        return entry

    def _after_write(
        self,
        scope: str,
        versions: tuple[int, int],
        added: tuple[np.ndarray, np.ndarray] | None = None,
        removed: np.ndarray | None = None,
    ) -> None:
        """Apply a committed change to the cached index, or reconcile if it was not current."""
        old, new = versions
        entry = self._cache.get(scope)
        if entry is None or entry.version != old:
            self._sync(scope)
            return
        if removed is not None:
            entry.remove(removed)
        if added is not None:
            entry.add(*added)
        entry.version, entry.dirty = new, True
        if self._needs_rebuild(entry):
            entry = self._rebuild(scope)
            self._keep(scope, entry)
        self._persist(scope, entry)

    def _keep(self, scope: str, entry: _ScopeIndex) -> None:
        self._cache[scope] = entry
        self._cache.move_to_end(scope)
        while self._max_cached is not None and len(self._cache) > max(1, self._max_cached):
            old_scope, old = self._cache.popitem(last=False)
            if old.dirty:
                self._save(old_scope, old)

    def _persist(self, scope: str, entry: _ScopeIndex) -> None:
        if entry.dirty and entry.size <= self._eager_save_max and not self._deferred:
            self._save(scope, entry)

    @contextmanager
    def deferred_saves(self) -> Iterator[None]:
        """Within it, index files are written once at the end, not after every change.

        For bulk writes (imports): N adds would otherwise rewrite a scope's file N times.
        """
        with self._lock:
            self._deferred += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferred -= 1
                if not self._deferred and not self._closed:
                    self.flush()

    def _save(self, scope: str, entry: _ScopeIndex) -> None:
        header = {
            "format": 1,
            "store_id": self.store_id,
            "scope": scope,
            "version": entry.version,
            "dim": self.dim,
            "kind": entry.kind,
            "count": entry.size,
            "trained_size": entry.trained_size,
        }
        try:
            write_index_file(index_path(self.root, scope), header, entry.index)
            entry.dirty = False
        except OSError as error:  # SQLite is the truth: a failed save costs a reconcile later
            log.warning("cannot save the index of scope %r: %s", scope, error)

    def flush(self) -> None:
        """Write every index changed since it was last saved."""
        with self._lock:
            self._check_open()
            for scope, entry in self._cache.items():
                if entry.dirty:
                    self._save(scope, entry)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                self._closed = True
                self._cache.clear()
                self._db.close()

    # ------------------------------------------------------------------------- writes

    def add_concept(
        self,
        scope: str,
        *,
        name: str,
        description: str,
        category: str,
        owner: str,
        embedding: np.ndarray,
        crop_jpeg: bytes,
        box: Box,
        source: str | None = None,
    ) -> Concept:
        item = NewConcept(name, embedding, crop_jpeg, box, description, category, owner, source)
        return self.add_concepts_bulk(scope, [item])[0]

    def add_concepts_bulk(self, scope: str, items: Iterable[NewConcept]) -> list[Concept]:
        """Add many concepts (one example each) in one transaction and one index update.

        The same rules as :meth:`add_concept` apply to each item; a name conflict rejects the
        whole batch. Meant for imports and benchmarks.
        """
        scope = check_scope(scope)
        checked = [
            (
                check_name(it.name),
                check_text(it.description, "description"),
                check_text(it.category, "category").strip(),
                check_text(it.owner, "owner"),
                check_embedding(it.embedding, self.dim),
                check_crop(it.crop_jpeg),
                check_box(it.box),
                check_source(it.source),
            )
            for it in items
        ]
        with self._lock:
            result: list[Concept | str] = []
            new_ids: list[int] = []
            new_vectors: list[np.ndarray] = []
            by_source: dict[str, str] = {}
            taken: set[str] = set()
            with self._write() as db:
                now = time.time()
                for name, description, category, owner, vector, crop, box, source in checked:
                    known = by_source.get(source) if source else None
                    known = known or self._source_owner(db, scope, source)
                    if known is not None:  # this task already ran: idempotent
                        result.append(known)
                        continue
                    key = name_key(name)
                    if (
                        key in taken
                        or db.execute(
                            "SELECT 1 FROM concepts WHERE scope = ? AND name_key = ?", (scope, key)
                        ).fetchone()
                    ):
                        raise NameTakenError(f"'{name}' is already remembered in this chat.")
                    taken.add(key)
                    concept_id = uuid.uuid4().hex
                    db.execute(
                        "INSERT INTO concepts (id, scope, name, name_key, description, category,"
                        " owner, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (concept_id, scope, name, key, description, category, owner, now),
                    )
                    example_id = self._insert_example(
                        db, scope, concept_id, vector, crop, box, source, now, owner
                    )
                    new_ids.append(example_id)
                    new_vectors.append(vector)
                    if source:
                        by_source[source] = concept_id
                    result.append(
                        Concept(concept_id, scope, name, description, category, owner, now, 1)
                    )
                # Idempotent hits are read inside the transaction: they cannot vanish meanwhile.
                concepts = [
                    c if isinstance(c, Concept) else self._require(db, scope, c) for c in result
                ]
                versions = bump_scope_version(db, scope) if new_ids else None
            if versions is not None:
                added = (np.asarray(new_ids, dtype=np.int64), np.stack(new_vectors))
                self._after_write(scope, versions, added=added)
        return concepts

    def add_example(
        self,
        scope: str,
        concept_id: str,
        *,
        embedding: np.ndarray,
        crop_jpeg: bytes,
        box: Box,
        source: str | None = None,
        added_by: str | None = None,
    ) -> Concept:
        scope = check_scope(scope)
        vector = check_embedding(embedding, self.dim)
        crop, box, source = check_crop(crop_jpeg), check_box(box), check_source(source)
        added_by = None if added_by is None else check_text(added_by, "user")
        with self._lock:
            with self._write() as db:
                known = self._source_owner(db, scope, source)
                if known is not None:  # this task already ran: idempotent
                    return self._require(db, scope, known)
                concept = self._require(db, scope, concept_id)
                example_id = self._insert_example(
                    db,
                    scope,
                    concept_id,
                    vector,
                    crop,
                    box,
                    source,
                    time.time(),
                    concept.owner if added_by is None else added_by,
                )
                versions = bump_scope_version(db, scope)
                concept = self._require(db, scope, concept_id)
            added = (np.asarray([example_id], dtype=np.int64), vector[None, :])
            self._after_write(scope, versions, added=added)
            return concept

    def rename(self, scope: str, concept_id: str, new_name: str) -> Concept:
        scope, new_name = check_scope(scope), check_name(new_name)
        with self._lock:
            with self._write() as db:
                self._require(db, scope, concept_id)
                clash = db.execute(
                    "SELECT name FROM concepts WHERE scope = ? AND name_key = ? AND id != ?",
                    (scope, name_key(new_name), concept_id),
                ).fetchone()
                if clash:
                    raise InvalidInputError(f"'{clash[0]}' is already remembered in this chat.")
                db.execute(
                    "UPDATE concepts SET name = ?, name_key = ? WHERE scope = ? AND id = ?",
                    (new_name, name_key(new_name), scope, concept_id),
                )
                versions = bump_scope_version(db, scope)
                concept = self._require(db, scope, concept_id)
            self._after_write(scope, versions)
            return concept

    def describe(self, scope: str, concept_id: str, description: str) -> Concept:
        scope, description = check_scope(scope), check_text(description, "description")
        with self._lock:
            with self._write() as db:
                self._require(db, scope, concept_id)
                db.execute(
                    "UPDATE concepts SET description = ? WHERE scope = ? AND id = ?",
                    (description, scope, concept_id),
                )
                versions = bump_scope_version(db, scope)
                concept = self._require(db, scope, concept_id)
            self._after_write(scope, versions)
            return concept

    def _delete_concepts(
        self, db: sqlite3.Connection, scope: str, concept_ids: list[str]
    ) -> np.ndarray:
        """Delete concepts of one scope with their examples; returns the removed example ids."""
        removed: list[int] = []
        for start in range(0, len(concept_ids), _SQL_CHUNK):
            chunk = concept_ids[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            removed += [
                r[0]
                for r in db.execute(
                    f"SELECT id FROM examples WHERE scope = ? AND concept_id IN ({marks})",
                    (scope, *chunk),
                ).fetchall()
            ]
            db.execute(
                f"DELETE FROM examples WHERE scope = ? AND concept_id IN ({marks})", (scope, *chunk)
            )
            db.execute(f"DELETE FROM concepts WHERE scope = ? AND id IN ({marks})", (scope, *chunk))
        return np.asarray(removed, dtype=np.int64)

    def delete(self, scope: str, concept_id: str) -> None:
        scope = check_scope(scope)
        with self._lock:
            with self._write() as db:
                self._require(db, scope, concept_id)
                removed = self._delete_concepts(db, scope, [concept_id])
                versions = bump_scope_version(db, scope)
            self._after_write(scope, versions, removed=removed)

    def delete_user(self, owner: str) -> int:
        owner = check_text(owner, "owner")
        if not owner:
            raise InvalidInputError("The user whose data to delete must be named.")
        with self._lock:
            changes: dict[str, tuple[tuple[int, int], np.ndarray]] = {}
            with self._write() as db:
                by_scope: dict[str, list[str]] = {}
                for concept_id, scope in db.execute(
                    "SELECT id, scope FROM concepts WHERE owner = ?", (owner,)
                ).fetchall():
                    by_scope.setdefault(scope, []).append(concept_id)
                # The photos they added to other people's concepts go too.
                added: dict[str, list[tuple[int, str]]] = {}
                for example_id, scope, concept_id in db.execute(
                    "SELECT id, scope, concept_id FROM examples WHERE added_by = ?", (owner,)
                ).fetchall():
                    added.setdefault(scope, []).append((example_id, concept_id))
                for scope in sorted(set(by_scope) | set(added)):
                    ids = by_scope.get(scope, [])
                    removed = [self._delete_concepts(db, scope, ids)] if ids else []
                    theirs = [(e, c) for e, c in added.get(scope, []) if c not in ids]
                    if theirs:
                        removed.append(self._delete_examples(db, scope, theirs))
                    changes[scope] = (bump_scope_version(db, scope), np.concatenate(removed))
            for scope, (versions, removed) in changes.items():
                self._after_write(scope, versions, removed=removed)
            return sum(len(ids) for ids in by_scope.values())

    def _delete_examples(
        self, db: sqlite3.Connection, scope: str, examples: list[tuple[int, str]]
    ) -> np.ndarray:
        """Delete (example id, concept id) pairs of one scope, and any concept left without a
        photo (it could never be recognised); returns the removed example ids."""
        ids = [e for e, _ in examples]
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start : start + _SQL_CHUNK]
            db.execute(
                f"DELETE FROM examples WHERE scope = ? AND id IN ({','.join('?' * len(chunk))})",
                (scope, *chunk),
            )
        emptied = [
            c
            for c in sorted({c for _, c in examples})
            if db.execute("SELECT 1 FROM examples WHERE concept_id = ? LIMIT 1", (c,)).fetchone()
            is None
        ]
        if emptied:
            self._delete_concepts(db, scope, emptied)
        return np.asarray(ids, dtype=np.int64)

    # ------------------------------------------------------------------------- reads

    def get(self, scope: str, concept_id: str) -> Concept | None:
        scope, concept_id = check_scope(scope), check_text(concept_id, "concept id")
        with self._read() as db:
            return self._get(db, scope, concept_id)

    def get_by_name(self, scope: str, name: str) -> Concept | None:
        scope, key = check_scope(scope), name_key(check_text(name, "name").strip())
        with self._read() as db:
            row = db.execute(
                _CONCEPT_SQL + " WHERE c.scope = ? AND c.name_key = ?", (scope, key)
            ).fetchone()
        return _concept(row) if row else None

    def find_by_source(self, scope: str, source: str) -> Concept | None:
        scope, source = check_scope(scope), check_source(source)
        with self._read() as db:
            known = self._source_owner(db, scope, source)
            return self._get(db, scope, known) if known else None

    def list_concepts(self, scope: str) -> list[Concept]:
        scope = check_scope(scope)
        with self._read() as db:
            rows = db.execute(
                _CONCEPT_SQL + " WHERE c.scope = ? ORDER BY c.name_key", (scope,)
            ).fetchall()
        return [_concept(r) for r in rows]

    def categories(self, scope: str, limit: int | None = None) -> list[str]:
        scope = check_scope(scope)
        with self._read() as db:
            rows = db.execute(
                "SELECT category FROM concepts WHERE scope = ? AND category != ''"
                " GROUP BY category ORDER BY COUNT(*) DESC, category LIMIT ?",
                (scope, -1 if limit is None else check_k(limit)),
            ).fetchall()
        return sorted(r[0] for r in rows)

    def example_crops(self, scope: str, concept_id: str, limit: int | None = None) -> list[bytes]:
        scope = check_scope(scope)
        with self._read() as db:
            self._require(db, scope, concept_id)
            rows = db.execute(
                "SELECT crop FROM examples WHERE scope = ? AND concept_id = ? ORDER BY id LIMIT ?",
                (scope, concept_id, -1 if limit is None else check_k(limit)),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def example_embeddings(self, scope: str, concept_ids: Sequence[str]) -> dict[str, np.ndarray]:
        scope, wanted = check_scope(scope), check_ids(concept_ids)
        rows: list[tuple[str, bytes]] = []
        with self._read() as db:
            for start in range(0, len(wanted), _SQL_CHUNK):
                chunk = wanted[start : start + _SQL_CHUNK]
                rows += db.execute(
                    "SELECT concept_id, embedding FROM examples WHERE scope = ? AND concept_id IN"
                    f" ({','.join('?' * len(chunk))}) ORDER BY id",
                    (scope, *chunk),
                ).fetchall()
        found: dict[str, list[np.ndarray]] = {}
        for concept_id, blob in rows:
            found.setdefault(concept_id, []).append(np.frombuffer(blob, dtype=np.float32))
        return {c: np.stack(found[c]) for c in wanted if c in found}

    def scopes(self) -> list[str]:
        with self._read() as db:
            rows = db.execute("SELECT DISTINCT scope FROM concepts ORDER BY scope").fetchall()
        return [r[0] for r in rows]

    def examples(self, scope: str, batch: int = 256) -> Iterator[StoredExample]:
        """A scope's examples (see the protocol), read in batches so the lock is held briefly."""
        scope = check_scope(scope)
        with self._read() as db:
            concepts = {
                r[0]: r
                for r in db.execute(
                    "SELECT id, name, description, category, owner, created_at FROM concepts"
                    " WHERE scope = ? ORDER BY created_at, id",
                    (scope,),
                ).fetchall()
            }
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT e.id FROM examples e JOIN concepts c ON c.id = e.concept_id"
                    " WHERE e.scope = ? ORDER BY c.created_at, c.id, e.id",
                    (scope,),
                ).fetchall()
            ]
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            with self._read() as db:
                rows = db.execute(
                    "SELECT id, concept_id, x1, y1, x2, y2, source, created_at, embedding, crop,"
                    " added_by"
                    f" FROM examples WHERE scope = ? AND id IN ({','.join('?' * len(chunk))})",
                    (scope, *chunk),
                ).fetchall()
            by_id = {r[0]: r for r in rows}
            for example_id in chunk:
                row = by_id.get(example_id)
                concept = concepts.get(row[1]) if row else None
                if concept is None:  # deleted while iterating
                    continue
                yield StoredExample(
                    scope=scope,
                    concept_id=concept[0],
                    name=concept[1],
                    description=concept[2],
                    category=concept[3],
                    owner=concept[4],
                    concept_created_at=concept[5],
                    example_id=int(row[0]),
                    box=Box(*row[2:6]),
                    crop_jpeg=bytes(row[9]),
                    embedding=np.frombuffer(row[8], dtype=np.float32).copy(),
                    source=row[6],
                    created_at=row[7],
                    added_by=row[10],
                )

    def count(self, scope: str | None = None) -> int:
        """Example vectors in the scope's index (kept equal to SQLite's), or in all of SQLite."""
        with self._lock:
            self._check_open()
            if scope is None:
                with self._sqlite_errors():
                    return int(self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0])
            return self._sync(check_scope(scope)).size

    def search(self, scope: str, queries: np.ndarray, k: int) -> list[list[ExampleHit]]:
        scope, q, k = check_scope(scope), check_queries(queries, self.dim), check_k(k)
        with self._lock:
            self._check_open()
            entry = self._sync(scope)
            if entry.size == 0 or len(q) == 0:
                return [[] for _ in range(len(q))]
            small = entry.search_work(len(q)) <= _SMALL_SEARCH_WORK
            with _omp_threads(1) if small else nullcontext():
                scores, ids = entry.index.search(q, min(k, entry.size))
            wanted = sorted({i for i in ids.ravel().tolist() if i >= 0})
            owners: dict[int, str] = {}
            with self._sqlite_errors():
                for start in range(0, len(wanted), _SQL_CHUNK):
                    chunk = wanted[start : start + _SQL_CHUNK]
                    # The scope filter makes isolation hold even if an index were wrong.
                    owners.update(
                        self._db.execute(
                            "SELECT id, concept_id FROM examples WHERE scope = ? AND id IN"
                            f" ({','.join('?' * len(chunk))})",
                            (scope, *chunk),
                        ).fetchall()
                    )
        return [
            [
                ExampleHit(owners[i], i, float(s))
                for s, i in zip(row_scores.tolist(), row_ids.tolist(), strict=True)
                if i in owners
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def count_concepts(self) -> int:
        """Concepts in every scope (metrics: ``rapbot_store_items{kind="concepts"}``)."""
        with self._lock:
            self._check_open()
            with self._sqlite_errors():
                return int(self._db.execute("SELECT COUNT(*) FROM concepts").fetchone()[0])
