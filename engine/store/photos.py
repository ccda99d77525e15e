"""A chat's photo history for composed image search: SQLite + one in-memory FAISS index per scope.

Layout, in ``<data_dir>/photos`` (separate from the concept store)::

    photos.sqlite3     photos (scope, source, poster, posted_at, embedding, thumbnail),
                       scopes (version, whether indexing is on), meta (model identity)

Like the concept store, SQLite holds the truth and an index is a cache: every change bumps the
scope's version in the same transaction, and a search first compares the cached index's version
with SQLite's, rebuilding (or patching, for this process's own writes) when they differ. Photo ids
are AUTOINCREMENT and never reused. A scope's index is built by the concept store's
:func:`engine.store.faiss_store.build_index`: exact (``IndexIDMap2`` over ``IndexFlatIP``) below
``ivf_threshold`` photos (default 100,000) and an ``IndexIVFFlat`` (``nprobe`` of ~4 sqrt(n) lists
probed) above it, rebuilt when the scope doubles since training or shrinks below half the
threshold; both score by inner product, i.e. cosine for the unit vectors stored here (see
``benchmarks/bench_photo_search.py`` for flat vs IVF at 100k). Indexes are rebuilt from SQLite
when a process starts rather than written to files; for IVF that includes its k-means, ~10 s
for a 100k-photo scope on two busy cores, paid by the scope's first search in a process. Hence
the threshold is higher than the concept store's: a flat search of 100k photos takes ~7 ms,
which no user notices, while a k-means at every worker start for each large chat would be.
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

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import chain
from pathlib import Path

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
    _omp_threads,
    _ScopeIndex,
    build_index,
    bump_scope_version,
    needs_rebuild,
    scope_version,
)
from engine.store.photo_base import PhotoCandidates, StoredPhoto
from engine.types import PhotoHit

__all__ = ["PhotoStore", "StoredPhoto"]

DB_NAME = "photos.sqlite3"
_SQL_CHUNK = 500
REEMBEDDING = "reembedding"  # meta key: a re-embed started (value: the new model's id)
HALF_REEMBEDDED = (
    "The photo index is half re-embedded (an interrupted `rapbot index --rebuild`): run it again"
)
_HALF_FOR_USE = f"{HALF_REEMBEDDED} before indexing, searching or importing photos."
_HALF_FOR_EXPORT = f"{HALF_REEMBEDDED} before exporting."

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
        self._cache: dict[str, _ScopeIndex] = {}
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
            self.mismatch = _HALF_FOR_USE
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

    def _sync(self, scope: str) -> _ScopeIndex:
        """The scope's index at SQLite's version: cached, or rebuilt from SQLite."""
        self._check_vectors()
        with self._errors():
            version = scope_version(self._db, scope)
            entry = self._cache.get(scope)
            if entry is not None and entry.version == version:
                return entry
            rows = self._db.execute(
                "SELECT id, embedding FROM photos WHERE scope = ? ORDER BY id", (scope,)
            ).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        index, trained = build_index(
            self.dim, ids, vectors.reshape(len(rows), self.dim), self._ivf_threshold, self._nprobe
        )
        entry = _ScopeIndex(index, version, trained)
        self._cache[scope] = entry
        return entry

    def _after_write(self, scope, versions, added=None, removed=None) -> None:
        old, new = versions
        entry = self._cache.get(scope)
        if entry is None or entry.version != old:
            self._cache.pop(scope, None)  # rebuilt on next use
            return
        if removed is not None:
            entry.remove(removed)
        if added is not None:
            entry.add(*added)
        entry.version = new
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
            self._cache.pop(scope, None)
            return int(after - before)

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
                db.execute("DELETE FROM photos WHERE scope = ?", (scope,))
                db.executemany(
                    "INSERT OR IGNORE INTO photos (scope, source, poster, posted_at, embedding,"
                    " thumbnail) VALUES (?, ?, ?, ?, ?, ?)",
                    records(),
                )
                held = db.execute(
                    "SELECT COUNT(*) FROM photos WHERE scope = ?", (scope,)
                ).fetchone()[0]
                bump_scope_version(db, scope)
                if indexing is not None:
                    db.execute(
                        "UPDATE scopes SET indexing = ? WHERE scope = ?",
                        (int(bool(indexing)), scope),
                    )
            self._cache.pop(scope, None)
            return int(held)

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
                    changes[scope] = (bump_scope_version(db, scope), removed)
            for scope, (versions, removed) in changes.items():
                self._after_write(scope, versions, removed=removed)
            return sum(len(ids) for ids in by_scope.values())

    def delete_scope(self, scope: str) -> int:
        """Forget every photo of the scope; returns how many."""
        scope = check_scope(scope)
        with self._lock:
            with self._write() as db:
                removed = db.execute("DELETE FROM photos WHERE scope = ?", (scope,)).rowcount
                bump_scope_version(db, scope)
            self._cache.pop(scope, None)
            return int(removed)

    # ------------------------------------------------------------------------- reads

    def count(self, scope: str) -> int:
        scope = check_scope(scope)
        with self._lock:
            with self._errors():
                unusable = self.mismatch is not None or _reembedding(self._db)
            if unusable:  # no usable index, but SQLite knows
                return self.total(scope)
            return self._sync(scope).size

    def index_kind(self, scope: str) -> str:
        """``flat`` or ``ivf``: the kind of the scope's index (benchmarks, tests)."""
        with self._lock:
            return self._sync(check_scope(scope)).kind

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
            self.mismatch = _HALF_FOR_USE  # until the end: also if this is interrupted
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
            db.execute("DELETE FROM meta")  # the marker too: every photo is done
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                {"model_id": self.model_id, "dim": str(self.dim)}.items(),
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
            raise StoreError(_HALF_FOR_EXPORT)
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
        raise StoreError(_HALF_FOR_USE)


def _indexing(db: sqlite3.Connection, scope: str) -> bool:
    """Whether the scope's indexing is on (inside the caller's lock or transaction)."""
    row = db.execute("SELECT indexing FROM scopes WHERE scope = ?", (scope,)).fetchone()
    return bool(row and row[0])
