"""A chat's photo history for composed image search: SQLite + one in-memory FAISS index per scope.

Layout, in ``<data_dir>/photos`` (separate from the concept store)::

    photos.sqlite3     photos (scope, source, poster, posted_at, embedding, thumbnail),
                       scopes (version, whether indexing is on), meta (model identity),
                       deletions (the deletion log)
    indexes/*.faiss    trained IVF indexes of large chats (a header + the FAISS index)

Like the concept store, SQLite holds the truth and an index is a cache: every change bumps the
scope's version in the same transaction, and a search first compares the cached index's version
with SQLite's. Photo ids are AUTOINCREMENT and never reused and deletions are logged with the
version that made them (``deletions``), so an index behind SQLite (another process wrote) is
caught up by id: rows above its highest id added, logged ids removed; only a re-embed (the
meta's ``generation``) or a log pruned past the index's version rebuilds it. Builds run outside
the store-wide lock (one per scope at a time), and at most ``max_cached_scopes`` chats stay
cached (least recently used evicted). A scope's index is built by the concept store's
:func:`engine.store.faiss_store.build_index`: exact (``IndexIDMap2`` over ``IndexFlatIP``) below
``ivf_threshold`` photos (default 100,000) and an ``IndexIVFFlat`` (``nprobe`` of ~4 sqrt(n)
lists probed) above it, rebuilt when the scope doubles since training or shrinks below half the
threshold; both score by inner product, i.e. cosine for the unit vectors stored here. A trained
IVF index is written to ``indexes/`` (when built, evicted or closed), so a new process loads it
and catches up instead of paying its k-means again (~10 s for 100k photos on two busy cores).
Everything is strictly per scope except :meth:`PhotoStore.delete_user` (and
:meth:`PhotoStore.scopes`, which lists them for backups: :mod:`engine.backup` reads a scope
with :meth:`PhotoStore.rows` and adds it back with :meth:`PhotoStore.add_many`, or with
:meth:`PhotoStore.replace_scope` for a restore that replaces the scope's photos atomically).

The store records the embedding model (id and size) its vectors come from. Opened for another
model with ``strict=False`` (the engine does, since the search encoder is a setting), it still
answers the indexing flags, thumbnails and every deletion (so ``forget_user`` always works), but
refuses to add or search with a message saying how to re-index; :meth:`PhotoStore.reembed`
re-embeds the stored thumbnails with the new model and adopts it. While it runs, and after it
was interrupted, the meta holds a ``reembedding`` marker (the new model's id): the vectors are
then part old, part new, so adds, searches and :meth:`PhotoStore.recorded_model` (exports)
refuse, in every process, until a re-run of :meth:`PhotoStore.reembed` (``rapbot index
--rebuild``) re-embeds everything and clears it. When the configured encoder's
identity cannot even be computed (``RAPBOT_SEARCH_MODEL`` empty or not a trained folder),
:meth:`PhotoStore.unresolved` opens the store with the identity recorded in its own meta: flags,
thumbnails, counts and deletions work, and adds, searches and re-embedding raise the error that
says what is wrong with the encoder.

Indexing is off for a scope until :meth:`PhotoStore.set_indexing` turns it on (an admin's
decision; the engine checks the rights). ``add(..., require_indexing=True)`` (and ``add_many``)
check the flag inside their write transaction, so a photo being embedded while an admin turns
indexing off (and deletes the scope's photos) is not written afterwards.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import faiss
import numpy as np

from engine.errors import InvalidInputError, RapbotError, StoreError
from engine.store.base import (
    check_embedding,
    check_k,
    check_model,
    check_queries,
    check_scope,
    check_text,
)
from engine.store.faiss_store import (
    _SMALL_SEARCH_WORK,
    INDEX_DIR,
    _omp_threads,
    _ScopeIndex,
    build_index,
    bump_scope_version,
    index_path,
    needs_rebuild,
    read_index_file,
    scope_version,
    write_index_file,
)
from engine.store.photo_base import (
    HALF_FOR_EXPORT,
    HALF_FOR_USE,
    REEMBEDDING,
    PhotoCandidates,
    StoredPhoto,
)
from engine.types import PhotoHit

__all__ = ["PhotoStore", "StoredPhoto"]

log = logging.getLogger(__name__)

DB_NAME = "photos.sqlite3"
GENERATION = "generation"  # meta key: bumped by every re-embed (all vectors change)
DELETION_LOG_KEEP = 50_000  # deletion-log rows kept per scope before the oldest are pruned
_SQL_CHUNK = 500


_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS scopes (
        scope TEXT PRIMARY KEY,
        version INTEGER NOT NULL DEFAULT 0,
        indexing INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS photos (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        scope TEXT NOT NULL,
        source TEXT NOT NULL,
        poster TEXT NOT NULL,
        posted_at REAL NOT NULL,
        embedding BLOB NOT NULL,
        thumbnail BLOB NOT NULL,
        UNIQUE (scope, source)
    )""",
    "CREATE INDEX IF NOT EXISTS photos_scope ON photos (scope, id)",
    "CREATE INDEX IF NOT EXISTS photos_poster ON photos (poster)",
    # Deleted photo ids with the scope version that deleted them: other processes catch up
    # by id instead of rebuilding; a cache older than the scope's floor (log pruned) rebuilds.
    """CREATE TABLE IF NOT EXISTS deletions (
        scope TEXT NOT NULL, id INTEGER NOT NULL, version INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS deletions_scope ON deletions (scope, version)",
    "CREATE TABLE IF NOT EXISTS deletion_floor (scope TEXT PRIMARY KEY, version INTEGER NOT NULL)",
)


@dataclass
class _PhotoIndex(_ScopeIndex):
    """A scope's cached index and the state it reflects (see the index cache section)."""

    generation: int = 0  # the meta's re-embed generation
    max_id: int = 0  # the highest photo id it holds (newer ids are caught up)


def _rows_to_arrays(rows: list[tuple], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of ``(id, embedding blob)`` rows."""
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
    return ids, vectors.reshape(len(rows), dim)


def _log_deletions(db: sqlite3.Connection, scope: str, ids: list[int], version: int) -> None:
    """Record deleted ids (inside the deleting transaction); prune a scope's oldest rows
    beyond :data:`DELETION_LOG_KEEP`, raising its floor past them."""
    if not ids:
        return
    db.executemany(
        "INSERT INTO deletions (scope, id, version) VALUES (?, ?, ?)",
        [(scope, int(i), version) for i in ids],
    )
    held = db.execute("SELECT COUNT(*) FROM deletions WHERE scope = ?", (scope,)).fetchone()[0]
    if held > DELETION_LOG_KEEP:
        cutoff = db.execute(
            "SELECT version FROM deletions WHERE scope = ? ORDER BY version DESC LIMIT 1 OFFSET ?",
            (scope, DELETION_LOG_KEEP // 2),
        ).fetchone()[0]
        db.execute("DELETE FROM deletions WHERE scope = ? AND version <= ?", (scope, cutoff))
        db.execute(
            "INSERT INTO deletion_floor (scope, version) VALUES (?, ?) ON CONFLICT (scope)"
            " DO UPDATE SET version = excluded.version",
            (scope, cutoff),
        )


class PhotoStore:
    """Per-scope photo embeddings and thumbnails; thread-safe; see the module doc."""

    def __init__(
        self,
        root: Path,
        model_id: str,
        dim: int,
        *,
        ivf_threshold: int = 100_000,
        nprobe: int = 32,
        strict: bool = True,
        unavailable: RapbotError | None = None,
        max_cached_scopes: int = 32,
    ) -> None:
        # ``unavailable``: see :meth:`unresolved` (model_id and dim then come from the meta).
        self._unavailable = unavailable
        if unavailable is None:
            self.model_id, self.dim = check_model(model_id, dim)
        else:
            self.model_id, self.dim = "", 0
        self.root = Path(root)
        self._ivf_threshold = max(2, int(ivf_threshold))
        self._nprobe = max(1, int(nprobe))
        self._strict = strict
        self.mismatch: str | None = None  # why vectors cannot be used (another model's index)
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, _PhotoIndex] = OrderedDict()  # LRU, max_cached_scopes
        self._max_cached = max(1, int(max_cached_scopes))
        self._building: dict[str, threading.Lock] = {}
        self._closed = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.root / DB_NAME, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"Cannot open the photo index in {self.root}: {error}") from error
        try:
            with self._errors():
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._init_meta()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def unresolved(cls, root: Path, error: RapbotError, **options) -> PhotoStore:
        """The store opened with the model identity recorded in its own meta, for when the
        configured encoder's identity cannot be computed (``error`` says why: a missing or
        unreadable CIR-LVLM folder). Indexing flags, thumbnails, counts and deletions work —
        ``forget_user`` and ``/index off`` must never depend on the encoder — while adds,
        searches and :meth:`reembed` raise ``error`` (a copy of it). A new store's meta is left
        empty, for the first store opened with a real identity to record."""
        return cls(root, "", 0, **options, strict=False, unavailable=error)

    def _init_meta(self) -> None:
        with self._write() as db:
            for statement in _DDL:
                db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta and self._unavailable is None:
                meta = {"model_id": self.model_id, "dim": str(self.dim)}
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        if self._unavailable is not None:
            self.model_id = meta.get("model_id", "")
            dim = meta.get("dim", "")
            self.dim = int(dim) if dim.isdigit() else 0
            self.mismatch = str(self._unavailable)
            return
        if meta.get(REEMBEDDING) is not None:
            # Part old, part new vectors: nothing may use them until a re-run of reembed()
            # (not an error to open, even strict: reembed() is what repairs it).
            self.mismatch = HALF_FOR_USE
            return
        if meta.get("model_id") != self.model_id or meta.get("dim") != str(self.dim):
            self.mismatch = (
                f"The photo index in {self.root} was made with {meta.get('model_id')} (dim"
                f" {meta.get('dim')}), not {self.model_id} (dim {self.dim}): switch the search"
                " encoder / model profile back, use another data folder, or re-index the photos"
                " with the new model: `rapbot index --rebuild`."
            )
            if self._strict:
                raise StoreError(self.mismatch)

    def _check_vectors(self) -> None:
        """Adds and searches need this store's vectors to come from the configured model (and
        no re-embed half done, or under way in another process)."""
        self._check_resolved()
        if self.mismatch is not None:
            raise StoreError(self.mismatch)
        with self._lock, self._errors():
            _check_not_reembedding(self._db)

    def _check_resolved(self) -> None:
        """Anything that needs the configured encoder's identity (see :meth:`unresolved`)."""
        if self._unavailable is not None:
            error = self._unavailable
            raise type(error)(*error.args)  # a fresh copy: no tracebacks piling up on one

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                for scope, entry in self._cache.items():
                    if entry.dirty:
                        self._save(scope, entry)  # trained IVF indexes only
                self._cache.clear()
                self._db.close()

    # ------------------------------------------------------------------------- SQLite helpers

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(f"The photo index failed: {error}") from error

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            if self._closed:
                raise StoreError("The photo index is closed.")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------------- index cache
    # A scope's index reflects (version, generation, max_id). Another process's change is
    # caught up by id: photos above max_id are added, ids in the deletion log after the
    # index's version removed; a re-embed (a new generation) or a log pruned past the
    # index's version rebuilds. Builds run outside the store-wide lock (one per scope at a
    # time); searches then patch and use the index under it.

    def _state(self, scope: str) -> tuple[int, int]:
        """(version, generation) of the scope in SQLite (inside the lock)."""
        with self._errors():
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (GENERATION,)).fetchone()
            return scope_version(self._db, scope), int(row[0]) if row else 0

    def _catch_up(self, scope: str, entry: _PhotoIndex) -> bool:
        """Bring ``entry`` to SQLite's state by id and the deletion log (inside the lock);
        False when only a rebuild can (another generation, a pruned log, a kind change)."""
        version, generation = self._state(scope)
        if entry.generation != generation:
            return False
        if entry.version == version:
            return True
        with self._errors():
            floor = self._db.execute(
                "SELECT version FROM deletion_floor WHERE scope = ?", (scope,)
            ).fetchone()
            if floor and entry.version < floor[0]:
                return False
            deleted = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM deletions WHERE scope = ? AND version > ?",
                    (scope, entry.version),
                )
            ]
            rows = self._db.execute(
                "SELECT id, embedding FROM photos WHERE scope = ? AND id > ? ORDER BY id",
                (scope, entry.max_id),
            ).fetchall()
        entry.remove(np.asarray(deleted, dtype=np.int64))
        if rows:
            ids, vectors = _rows_to_arrays(rows, self.dim)
            entry.add(ids, vectors)
            entry.max_id = int(ids[-1])
        entry.version, entry.dirty = version, True
        return not needs_rebuild(entry, self._ivf_threshold)

    def _sync(self, scope: str) -> _PhotoIndex:
        """The scope's index at SQLite's state (inside the lock): the cached one caught up,
        or built (outside the lock when :meth:`_prepare` ran first, as searches do)."""
        self._check_vectors()
        entry = self._cache.get(scope)
        if entry is not None and self._catch_up(scope, entry):
            self._cache.move_to_end(scope)
            return entry
        self._cache.pop(scope, None)
        entry = self._load_or_build(scope, *self._read_scope(scope))
        if not self._catch_up(scope, entry):  # only if it changed while building
            entry = self._load_or_build(scope, *self._read_scope(scope), use_file=False)
        self._keep(scope, entry)
        return entry

    def _prepare(self, scope: str) -> None:
        """Have the scope's index cached, building or loading it outside the store-wide lock
        (other chats' searches and writes go on meanwhile). Call without the lock held."""
        self._check_vectors()
        with self._lock:
            entry = self._cache.get(scope)
            if entry is not None and self._catch_up(scope, entry):
                return
        with self._build_lock(scope):
            with self._lock:
                entry = self._cache.get(scope)
                if entry is not None and self._catch_up(scope, entry):
                    return  # another thread built it meanwhile
                state = self._read_scope(scope)
            entry = self._load_or_build(scope, *state)
            with self._lock:
                self._keep(scope, entry)

    @contextmanager
    def _build_lock(self, scope: str) -> Iterator[None]:
        with self._lock:
            lock = self._building.setdefault(scope, threading.Lock())
        with lock:
            yield

    def _read_scope(self, scope: str) -> tuple[tuple[int, int], list[tuple]]:
        """The scope's (version, generation) and every (id, embedding) row, read together."""
        with self._lock, self._errors():
            self._db.execute("BEGIN")  # one snapshot: the rows are those of that version
            try:
                state = self._state(scope)
                rows = self._db.execute(
                    "SELECT id, embedding FROM photos WHERE scope = ? ORDER BY id", (scope,)
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        return state, rows

    def _load_or_build(
        self, scope: str, state: tuple[int, int], rows: list[tuple], use_file: bool = True
    ) -> _PhotoIndex:
        """The scope's index: a trained IVF index from its file when it is this store's (then
        caught up by the caller), else built from ``rows``. Needs no store lock."""
        version, generation = state
        if use_file and len(rows) >= self._ivf_threshold:
            loaded = self._load_file(scope, generation)
            if loaded is not None:
                return loaded
        ids, vectors = _rows_to_arrays(rows, self.dim)
        index, trained = build_index(self.dim, ids, vectors, self._ivf_threshold, self._nprobe)
        entry = _PhotoIndex(index, version, trained, dirty=True, generation=generation)
        entry.max_id = int(ids[-1]) if len(ids) else 0
        if entry.kind == "ivf":  # a k-means worth keeping: saved once trained
            self._save(scope, entry)
        return entry

    def _load_file(self, scope: str, generation: int) -> _PhotoIndex | None:
        loaded = read_index_file(index_path(self.root, scope))
        if loaded is None:
            return None
        header, index = loaded
        expected = (self.model_id, self.dim, scope, generation, index.ntotal, index.d)
        found = tuple(header.get(k) for k in ("model_id", "dim", "scope", "generation", "count"))
        if found + (self.dim,) != expected or not isinstance(header.get("max_id"), int):
            return None
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(self._nprobe, index.nlist)
        entry = _PhotoIndex(index, int(header["version"]), int(header.get("trained_size", 0)))
        entry.generation, entry.max_id = generation, int(header["max_id"])
        return entry

    def _save(self, scope: str, entry: _PhotoIndex) -> None:
        """Write a trained (IVF) index to ``indexes/`` so the next process skips its k-means."""
        if entry.kind != "ivf":
            return
        header = {
            "format": 1,
            "model_id": self.model_id,
            "dim": self.dim,
            "scope": scope,
            "version": entry.version,
            "generation": entry.generation,
            "max_id": entry.max_id,
            "count": entry.size,
            "trained_size": entry.trained_size,
        }
        try:
            (self.root / INDEX_DIR).mkdir(exist_ok=True)
            write_index_file(index_path(self.root, scope), header, entry.index)
            entry.dirty = False
        except OSError as error:  # SQLite is the truth: a failed save costs a k-means later
            log.warning("cannot save the photo index of scope %r: %s", scope, error)

    def _keep(self, scope: str, entry: _PhotoIndex) -> None:
        """Cache the index, evicting the least recently used chats beyond the limit."""
        self._cache[scope] = entry
        self._cache.move_to_end(scope)
        while len(self._cache) > self._max_cached:
            old_scope, old = self._cache.popitem(last=False)
            if old.dirty:
                self._save(old_scope, old)

    def _after_write(self, scope, versions, added=None, removed=None) -> None:
        """Apply this process's committed change to the cached index (inside the lock); one
        that is behind is caught up on its next use."""
        old, new = versions
        entry = self._cache.get(scope)
        if entry is None or entry.version != old:
            return
        if removed is not None:
            entry.remove(removed)
        if added is not None:
            entry.add(*added)
            entry.max_id = max(entry.max_id, int(added[0].max()))
        entry.version, entry.dirty = new, True
        if needs_rebuild(entry, self._ivf_threshold):  # flat <-> IVF, or IVF retrained
            self._cache.pop(scope, None)  # rebuilt on next use

    # ------------------------------------------------------------------------- indexing flag

    def indexing(self, scope: str) -> bool:
        scope = check_scope(scope)
        with self._lock, self._errors():
            return _indexing(self._db, scope)

    def set_indexing(self, scope: str, enabled: bool) -> None:
        scope = check_scope(scope)
        with self._write() as db:
            db.execute(
                "INSERT INTO scopes (scope, indexing) VALUES (?, ?)"
                " ON CONFLICT (scope) DO UPDATE SET indexing = excluded.indexing",
                (scope, int(bool(enabled))),
            )

    # ------------------------------------------------------------------------- writes

    def add(
        self,
        scope: str,
        embedding: np.ndarray,
        thumbnail_jpeg: bytes,
        poster: str,
        posted_at: float | None,
        source: str,
        *,
        require_indexing: bool = False,
    ) -> int | None:
        """Store one photo; returns its id. Idempotent by ``source`` within the scope.
        ``require_indexing``: store it only if the scope's indexing is on when the photo is
        written (checked in the write transaction), else store nothing and return None."""
        scope, poster = check_scope(scope), check_text(poster, "poster")
        source = check_text(source, "source").strip()
        if not source:
            raise InvalidInputError("A photo needs a source reference.")
        vector = check_embedding(embedding, self.dim)
        when = time.time() if posted_at is None else float(posted_at)
        self._check_vectors()
        with self._lock:
            with self._write() as db:
                _check_not_reembedding(db)  # a re-embed another process started since
                if require_indexing and not _indexing(db, scope):
                    return None
                row = db.execute(
                    "SELECT id FROM photos WHERE scope = ? AND source = ?", (scope, source)
                ).fetchone()
                if row:
                    return int(row[0])
                photo_id = int(
                    db.execute(
                        "INSERT INTO photos (scope, source, poster, posted_at, embedding,"
                        " thumbnail) VALUES (?, ?, ?, ?, ?, ?)",
                        (scope, source, poster, when, vector.tobytes(), bytes(thumbnail_jpeg)),
                    ).lastrowid
                )
                versions = bump_scope_version(db, scope)
            added = (np.asarray([photo_id], dtype=np.int64), vector.reshape(1, self.dim))
            self._after_write(scope, versions, added=added)
            return photo_id

    def add_many(
        self,
        scope: str,
        rows: list[tuple[np.ndarray, bytes, str, float, str]],
        *,
        require_indexing: bool = False,
    ) -> int:
        """Bulk :meth:`add` in one transaction (benchmarks, imports); returns how many were new
        (0, storing nothing, when ``require_indexing`` and the scope's indexing is off)."""
        scope = check_scope(scope)
        self._check_vectors()
        with self._lock:
            with self._write() as db:
                _check_not_reembedding(db)
                if require_indexing and not _indexing(db, scope):
                    return 0
                before = db.execute(
                    "SELECT COUNT(*) FROM photos WHERE scope = ?", (scope,)
                ).fetchone()[0]
                db.executemany(
                    "INSERT OR IGNORE INTO photos (scope, source, poster, posted_at, embedding,"
                    " thumbnail) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (scope, s, p, t, check_embedding(e, self.dim).tobytes(), bytes(j))
                        for e, j, p, t, s in rows
                    ],
                )
                after = db.execute(
                    "SELECT COUNT(*) FROM photos WHERE scope = ?", (scope,)
                ).fetchone()[0]
                bump_scope_version(db, scope)
            return int(after - before)  # the cached index catches up by id

    def replace_scope(
        self,
        scope: str,
        rows: Iterable[tuple[np.ndarray, bytes, str, float, str]],
        indexing: bool | None = None,
    ) -> int:
        """Make the scope's photos exactly ``rows`` (as for :meth:`add_many`; read lazily, so a
        generator keeps memory small) and, unless ``indexing`` is None, set its flag: in one
        transaction, so a failure (a bad row, a full disk) leaves the scope's old photos as
        they were. Returns how many photos the scope now holds. A restore's photo part."""
        scope = check_scope(scope)
        rows = iter(rows)
        first = next(rows, None)
        if first is not None:  # with no photos to write, only the deletion: always allowed
            self._check_vectors()

        def records() -> Iterator[tuple]:
            for e, j, p, t, s in chain([first] if first is not None else [], rows):
                yield (scope, s, p, t, check_embedding(e, self.dim).tobytes(), bytes(j))

        with self._lock:
            with self._write() as db:
                if first is not None:
                    _check_not_reembedding(db)
                old = [r[0] for r in db.execute("SELECT id FROM photos WHERE scope = ?", (scope,))]
                db.execute("DELETE FROM photos WHERE scope = ?", (scope,))
                db.executemany(
                    "INSERT OR IGNORE INTO photos (scope, source, poster, posted_at, embedding,"
                    " thumbnail) VALUES (?, ?, ?, ?, ?, ?)",
                    records(),
                )
                held = db.execute(
                    "SELECT COUNT(*) FROM photos WHERE scope = ?", (scope,)
                ).fetchone()[0]
                _log_deletions(db, scope, old, bump_scope_version(db, scope)[1])
                if indexing is not None:
                    db.execute(
                        "UPDATE scopes SET indexing = ? WHERE scope = ?",
                        (int(bool(indexing)), scope),
                    )
            return int(held)  # the cached index catches up: old ids logged, new ones above

    def delete_user(self, poster: str) -> int:
        """Forget every photo the user posted, in every scope; returns how many."""
        poster = check_text(poster, "poster")
        if not poster:
            raise InvalidInputError("The user whose photos to delete must be named.")
        with self._lock:
            changes = {}
            with self._write() as db:
                by_scope: dict[str, list[int]] = {}
                for photo_id, scope in db.execute(
                    "SELECT id, scope FROM photos WHERE poster = ?", (poster,)
                ).fetchall():
                    by_scope.setdefault(scope, []).append(photo_id)
                db.execute("DELETE FROM photos WHERE poster = ?", (poster,))
                for scope, ids in by_scope.items():
                    removed = np.asarray(ids, dtype=np.int64)
                    versions = bump_scope_version(db, scope)
                    _log_deletions(db, scope, ids, versions[1])
                    changes[scope] = (versions, removed)
            for scope, (versions, removed) in changes.items():
                self._after_write(scope, versions, removed=removed)
            return sum(len(ids) for ids in by_scope.values())

    def delete_photos(self, scope: str, photo_ids: list[int]) -> int:
        """Forget these photos of the scope (unreadable ones, before a re-index); how many."""
        scope = check_scope(scope)
        ids = [int(i) for i in photo_ids]
        if not ids:
            return 0
        with self._lock:
            with self._write() as db:
                marks = ",".join("?" * len(ids))
                found = [
                    r[0]
                    for r in db.execute(
                        f"SELECT id FROM photos WHERE scope = ? AND id IN ({marks})", (scope, *ids)
                    )
                ]
                db.execute(f"DELETE FROM photos WHERE scope = ? AND id IN ({marks})", (scope, *ids))
                versions = bump_scope_version(db, scope)
                _log_deletions(db, scope, found, versions[1])
            self._after_write(scope, versions, removed=np.asarray(found, dtype=np.int64))
            return len(found)

    def delete_scope(self, scope: str) -> int:
        """Forget every photo of the scope; returns how many."""
        scope = check_scope(scope)
        with self._lock:
            with self._write() as db:
                ids = [r[0] for r in db.execute("SELECT id FROM photos WHERE scope = ?", (scope,))]
                db.execute("DELETE FROM photos WHERE scope = ?", (scope,))
                versions = bump_scope_version(db, scope)
                _log_deletions(db, scope, ids, versions[1])
            self._after_write(scope, versions, removed=np.asarray(ids, dtype=np.int64))
            return len(ids)

    # ------------------------------------------------------------------------- reads

    def count(self, scope: str) -> int:
        scope = check_scope(scope)
        with self._lock:
            with self._errors():
                unusable = self.mismatch is not None or _reembedding(self._db)
            if unusable:  # no usable index, but SQLite knows
                return self.total(scope)
        self._prepare(scope)
        with self._lock:
            return self._sync(scope).size

    def index_kind(self, scope: str) -> str:
        """``flat`` or ``ivf``: the kind of the scope's index (benchmarks, tests)."""
        scope = check_scope(scope)
        self._prepare(scope)
        with self._lock:
            return self._sync(scope).kind

    def reembed(self, embed: Callable[[list[bytes]], np.ndarray], batch_size: int = 32) -> int:
        """Re-embed every stored photo's thumbnail with ``embed`` (JPEG bytes -> unit rows of
        this store's size) and adopt this store's model; returns how many photos. For switching
        the embedding model (the search encoder): the thumbnails are all that is kept, so the
        new vectors come from 256-pixel images. Meanwhile a ``reembedding`` marker in the
        meta makes adds, searches and exports refuse (the vectors are part old, part new); an
        interruption leaves it there, and running this again re-embeds every photo and clears
        it with the final meta update."""
        self._check_resolved()
        with self._write() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (REEMBEDDING, self.model_id),
            )
        with self._lock:
            self.mismatch = HALF_FOR_USE  # until the end: also if this is interrupted
            self._cache.clear()
        with self._lock, self._errors():
            # Read after the marker is written: an add that commits later sees the marker.
            ids = [r[0] for r in self._db.execute("SELECT id FROM photos ORDER BY id")]
        done = 0
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            with self._lock, self._errors():
                rows = self._db.execute(
                    f"SELECT id, thumbnail FROM photos WHERE id IN ({','.join('?' * len(chunk))})"
                    " ORDER BY id",
                    chunk,
                ).fetchall()
            if not rows:
                continue
            vectors = np.asarray(embed([bytes(r[1]) for r in rows]), dtype=np.float32)
            if vectors.shape != (len(rows), self.dim):
                raise StoreError(
                    f"re-embedding gave vectors of shape {vectors.shape}, not"
                    f" ({len(rows)}, {self.dim})"
                )
            with self._write() as db:
                db.executemany(
                    "UPDATE photos SET embedding = ? WHERE id = ?",
                    [
                        (check_embedding(v, self.dim).tobytes(), int(r[0]))
                        for v, r in zip(vectors, rows, strict=True)
                    ],
                )
            done += len(rows)
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (GENERATION,)).fetchone()
            generation = str(int(row[0]) + 1 if row else 1)  # every cached index is stale
            db.execute("DELETE FROM meta")  # the marker too: every photo is done
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                {"model_id": self.model_id, "dim": str(self.dim), GENERATION: generation}.items(),
            )
            for (scope,) in db.execute("SELECT DISTINCT scope FROM photos").fetchall():
                bump_scope_version(db, scope)
        with self._lock:
            self._cache.clear()
            self.mismatch = None
        return done

    def thumbnail(self, scope: str, photo_id: int) -> bytes | None:
        scope = check_scope(scope)
        with self._lock, self._errors():
            row = self._db.execute(
                "SELECT thumbnail FROM photos WHERE +scope = ? AND id = ?", (scope, int(photo_id))
            ).fetchone()
        return bytes(row[0]) if row else None

    def search(self, scope: str, vector: np.ndarray, k: int) -> list[PhotoHit]:
        """The scope's ``k`` photos most similar (inner product) to ``vector``, best first."""
        scope, k = check_scope(scope), check_k(k)
        self._check_vectors()
        query = check_embedding(vector, self.dim).reshape(1, self.dim)
        self._prepare(scope)
        with self._lock:
            scores, ids = self._top(scope, query, k)
            sources = dict(self._fetch(scope, [int(i) for i in ids[0] if i >= 0]))
        return [
            PhotoHit(int(i), float(s), sources[int(i)])
            for s, i in zip(scores[0].tolist(), ids[0].tolist(), strict=True)
            if int(i) in sources
        ]

    def candidates(self, scope: str, queries: np.ndarray, m: int) -> PhotoCandidates:
        """The union of each query row's top ``m`` photos, with their stored vectors and
        sources (late fusion reranks them: :func:`engine.composition.search_photos`)."""
        scope, m = check_scope(scope), max(1, int(m))
        self._check_vectors()
        queries = check_queries(queries, self.dim)
        self._prepare(scope)
        with self._lock:
            _, ids = self._top(scope, queries, m)
            rows = self._fetch(scope, np.unique(ids[ids >= 0]).tolist(), vectors=True)
        if not rows:
            return PhotoCandidates.empty(self.dim)
        return PhotoCandidates(
            np.asarray([r[0] for r in rows], dtype=np.int64),
            np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), self.dim),
            {int(r[0]): r[1] for r in rows},
        )

    def _top(self, scope: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's (scores, ids) of each query row's top ``k`` (inside the lock)."""
        entry = self._sync(scope)
        if entry.size == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        small = entry.search_work(len(queries)) <= _SMALL_SEARCH_WORK
        with _omp_threads(1) if small else nullcontext():
            return entry.index.search(queries, min(k, entry.size))

    def _fetch(self, scope: str, ids: list[int], vectors: bool = False) -> list[tuple]:
        """(id, source[, embedding]) of the scope's photos among ``ids`` (inside the lock)."""
        columns = "id, source, embedding" if vectors else "id, source"
        rows: list[tuple] = []
        with self._errors():
            for start in range(0, len(ids), _SQL_CHUNK):
                chunk = ids[start : start + _SQL_CHUNK]
                # The scope filter keeps isolation even if an index were wrong. Its "+" makes
                # SQLite look rows up by id: otherwise it walks the scope's (scope, source)
                # index, every photo of the scope (5 ms at 100k).
                rows += self._db.execute(
                    f"SELECT {columns} FROM photos WHERE +scope = ? AND id IN"
                    f" ({','.join('?' * len(chunk))}) ORDER BY id",
                    (scope, *chunk),
                ).fetchall()
        return rows

    def scopes(self) -> list[str]:
        """The scopes that have photos or have indexing on, sorted (what a backup holds)."""
        with self._lock, self._errors():
            return [
                row[0]
                for row in self._db.execute(
                    "SELECT DISTINCT scope FROM photos"
                    " UNION SELECT scope FROM scopes WHERE indexing = 1 ORDER BY 1"
                )
            ]

    def recorded_model(self) -> tuple[str, int]:
        """The model (id, size) the stored vectors come from, as the meta records it: this
        store's own, or another encoder's while :attr:`mismatch` says so; ``("", 0)`` for a
        store no real identity has opened yet (it holds no photos). Raises StoreError while a
        re-embed is half done: no single model made the vectors then."""
        with self._lock, self._errors():
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get(REEMBEDDING) is not None:
            raise StoreError(HALF_FOR_EXPORT)
        dim = meta.get("dim", "")
        return meta.get("model_id", ""), int(dim) if dim.isdigit() else 0

    def rows(self, scope: str, batch_size: int = 256) -> Iterator[StoredPhoto]:
        """The scope's photos in id order, read ``batch_size`` at a time (the lock is not held
        between batches). Needs no model: it works for any store, mismatched or unresolved."""
        scope, size = check_scope(scope), max(1, int(batch_size))
        after = -1
        while True:
            with self._lock, self._errors():
                batch = self._db.execute(
                    "SELECT id, source, poster, posted_at, embedding, thumbnail FROM photos"
                    " WHERE scope = ? AND id > ? ORDER BY id LIMIT ?",
                    (scope, after, size),
                ).fetchall()
            for photo_id, source, poster, posted_at, embedding, thumb in batch:
                yield StoredPhoto(
                    int(photo_id),
                    source,
                    poster,
                    float(posted_at),
                    np.frombuffer(bytes(embedding), dtype="<f4"),
                    bytes(thumb),
                )
            if len(batch) < size:
                return
            after = batch[-1][0]

    def total(self, scope: str | None = None) -> int:
        """Photos indexed in every scope (metrics: ``rapbot_store_items{kind="photos"}``), or
        in ``scope``; from SQLite alone, so it works for any store (mismatched, unresolved)."""
        with self._lock, self._errors():
            if scope is None:
                return int(self._db.execute("SELECT COUNT(*) FROM photos").fetchone()[0])
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM photos WHERE scope = ?", (check_scope(scope),)
                ).fetchone()[0]
            )


def _reembedding(db: sqlite3.Connection) -> bool:
    """Whether the meta holds a re-embed marker (inside the caller's lock or transaction)."""
    return db.execute("SELECT 1 FROM meta WHERE key = ?", (REEMBEDDING,)).fetchone() is not None


def _check_not_reembedding(db: sqlite3.Connection) -> None:
    """Refuse while a re-embed is under way or was interrupted: one this process saw at open is
    in :attr:`PhotoStore.mismatch`, this catches another process's ``rapbot index --rebuild``
    started since."""
    if _reembedding(db):
        raise StoreError(HALF_FOR_USE)


def _indexing(db: sqlite3.Connection, scope: str) -> bool:
    """Whether the scope's indexing is on (inside the caller's lock or transaction)."""
    row = db.execute("SELECT indexing FROM scopes WHERE scope = ?", (scope,)).fetchone()
    return bool(row and row[0])
