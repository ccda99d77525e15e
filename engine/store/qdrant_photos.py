"""A chat's photo history in Qdrant (``RAPBOT_STORE=qdrant``): every worker that reaches the
server sees the same photos, so two GPU workers on two hosts give the same ``/search`` results.

Layout, next to the concept collections (same prefix, same client):

``<prefix>_photos__<encoder slug>``
    one collection per search encoder (CLIP or a CIR-LVLM checkpoint): a new encoder starts an
    empty collection instead of mixing vector spaces. A point is a photo: its vector, and a
    payload with the scope (the tenant key, indexed with ``is_tenant``; per-tenant HNSW graphs,
    as for concepts), source, poster, time posted and the 256-pixel JPEG thumbnail (base64), so
    any worker can show and re-embed it. The point id is derived from (scope, source): indexing
    the same message twice, even on two workers at once, writes one photo.
``<prefix>_photo_scopes``
    no vectors: a point per scope holding its indexing flag, which survives an encoder switch,
    one per photo collection recording its encoder (id and size), and the re-embedding marker.

Like :class:`engine.store.photos.PhotoStore` (the FAISS + SQLite store of local mode, which
this mirrors method for method; ``tests/test_photo_store_contract.py`` runs one suite over
both): opened for an encoder whose collection is empty while another photo collection holds
photos, :attr:`mismatch` says to re-index and adds and searches refuse; flags, thumbnails,
counts and deletions keep working. :meth:`reembed` re-embeds the other collections' thumbnails
into this one and then drops them. Deletions (``forget_user``, ``/index off``) reach every
photo collection of the prefix, so no encoder switch can keep a photo someone asked to delete.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ApiException, ResponseHandlingException

from engine.errors import InvalidInputError, RapbotError, StoreError
from engine.store.base import (
    check_embedding,
    check_k,
    check_model,
    check_queries,
    check_scope,
    check_text,
)
from engine.store.photo_base import (
    HALF_FOR_EXPORT,
    HALF_FOR_USE,
    REEMBEDDING,
    PhotoCandidates,
    StoredPhoto,
)
from engine.store.qdrant_store import DISTANCE, collection_name
from engine.types import PhotoHit
from engine.weights import first_line

KIND = "photos"
_NS = uuid.UUID("0d7f3c52-9a61-4b7e-8a43-2f6c1e9b5a10")  # fixed forever: ids derive from it
_ID_MASK = (1 << 63) - 1
_PAGE = 256
_LIGHT = ["scope", "source", "poster", "posted_at"]


def photo_id_of(scope: str, source: str) -> int:
    """The photo's id (a Qdrant point id): 63 bits of a uuid5 of (scope, source)."""
    return uuid.uuid5(_NS, f"{scope}\x00{source}").int & _ID_MASK


def _key_id(key: str) -> int:
    return uuid.uuid5(_NS, f"key\x00{key}").int & _ID_MASK


def _scope_filter(scope: str, **fields: str) -> models.Filter:
    must = [models.FieldCondition(key="scope", match=models.MatchValue(value=scope))]
    must += [
        models.FieldCondition(key=k, match=models.MatchValue(value=v)) for k, v in fields.items()
    ]
    return models.Filter(must=must)


def _poster_filter(poster: str) -> models.Filter:
    return models.Filter(
        must=[models.FieldCondition(key="poster", match=models.MatchValue(value=poster))]
    )


class QdrantPhotoStore:
    """Per-scope photo vectors and thumbnails in Qdrant; thread-safe; see the module doc.

    ``client`` is usually the concept store's (``owns_client=False``); ``lock`` its lock, since
    the in-process Qdrant of local and test modes is not thread-safe."""

    def __init__(
        self,
        client: QdrantClient,
        model_id: str,
        dim: int,
        *,
        prefix: str = "rapbot",
        where: str = "",
        owns_client: bool = False,
        lock: threading.RLock | None = None,
        strict: bool = True,
        unavailable: RapbotError | None = None,
        shards: int | None = None,
        replication_factor: int | None = None,
    ) -> None:
        self._unavailable = unavailable
        # Used only when this store creates the collection (a Qdrant cluster); None = server's.
        self._shards, self._replication_factor = shards, replication_factor
        if unavailable is None:
            self.model_id, self.dim = check_model(model_id, dim)
        else:
            self.model_id, self.dim = "", 0
        self.client = client
        self.prefix = prefix
        self.where = where or "(in-process Qdrant)"
        self._owns_client = owns_client
        self._lock = lock or threading.RLock()
        self._closed = False
        self.mismatch: str | None = None
        self._family = f"{collection_name(prefix, KIND, 'x').rsplit('__', 1)[0]}__"
        self.flags = f"{prefix}_photo_scopes"
        self.collection = collection_name(prefix, KIND, self.model_id) if self.model_id else ""
        with self._calls():
            self._ensure_flags()
            if unavailable is not None:
                self.mismatch = str(unavailable)
                self._adopt_recorded()
                return
            self._ensure_collection()
            self._check_model(strict)

    @classmethod
    def unresolved(cls, client: QdrantClient, error: RapbotError, **options) -> QdrantPhotoStore:
        """Opened without the configured encoder's identity (see
        :meth:`engine.store.photos.PhotoStore.unresolved`): flags, thumbnails, counts and
        deletions work; adds, searches and re-embedding raise ``error``."""
        return cls(client, "", 0, **options, strict=False, unavailable=error)

    # ------------------------------------------------------------------------- plumbing

    @contextmanager
    def _calls(self) -> Iterator[None]:
        if self._closed:
            raise StoreError("The photo index is closed.")
        try:
            with self._lock:
                yield
        except RapbotError:
            raise
        except (ResponseHandlingException, OSError) as error:
            raise StoreError(
                f"The photo index at {self.where} is not reachable: {first_line(error)}"
            ) from None
        except (ApiException, ValueError) as error:
            raise StoreError(
                f"The photo index at {self.where} failed: {first_line(error)}"
            ) from None

    def _ensure_flags(self) -> None:
        if not self.client.collection_exists(self.flags):
            self.client.create_collection(self.flags, vectors_config={})

    def _ensure_collection(self) -> None:
        if self.client.collection_exists(self.collection):
            size = self.client.get_collection(self.collection).config.params.vectors.size
            if size != self.dim:
                raise StoreError(
                    f"The Qdrant collection '{self.collection}' at {self.where} holds vectors of"
                    f" size {size}, not {self.dim}: delete it or set RAPBOT_QDRANT_PREFIX."
                )
            return
        self.client.create_collection(
            self.collection,
            vectors_config=models.VectorParams(size=self.dim, distance=DISTANCE),
            hnsw_config=models.HnswConfigDiff(payload_m=16, m=0),
            on_disk_payload=True,  # thumbnails are the bulk
            shard_number=self._shards,
            replication_factor=self._replication_factor,
        )
        with warnings.catch_warnings():  # the in-process Qdrant warns that indexes are no-ops
            warnings.simplefilter("ignore", UserWarning)
            for field, tenant in (("scope", True), ("poster", False), ("source", False)):
                self.client.create_payload_index(
                    self.collection,
                    field_name=field,
                    field_schema=models.KeywordIndexParams(
                        type=models.KeywordIndexType.KEYWORD, is_tenant=tenant
                    ),
                    wait=True,
                )
        self._set_key(
            f"model\x00{self.collection}", kind="model", model_id=self.model_id, dim=self.dim
        )

    def _key(self, key: str) -> dict[str, Any] | None:
        records = self.client.retrieve(self.flags, [_key_id(key)], with_payload=True)
        return records[0].payload if records else None

    def _set_key(self, key: str, **payload: Any) -> None:
        self.client.upsert(
            self.flags,
            points=[models.PointStruct(id=_key_id(key), vector={}, payload=payload)],
            wait=True,
        )

    def _photo_collections(self) -> list[str]:
        names = [c.name for c in self.client.get_collections().collections]
        return sorted(n for n in names if n.startswith(self._family))

    def _count_in(self, collection: str, flt: models.Filter | None = None) -> int:
        return self.client.count(collection, count_filter=flt, exact=True).count

    def _others_with_photos(self) -> list[str]:
        return [
            c for c in self._photo_collections() if c != self.collection and self._count_in(c) > 0
        ]

    def _check_model(self, strict: bool) -> None:
        if self._key(REEMBEDDING) is not None:
            self.mismatch = HALF_FOR_USE
            return
        if self._count_in(self.collection) > 0:
            return
        others = self._others_with_photos()
        if others:
            recorded = self._key(f"model\x00{others[0]}") or {}
            self.mismatch = (
                f"The photo index at {self.where} was made with {recorded.get('model_id')} (dim"
                f" {recorded.get('dim')}), not {self.model_id} (dim {self.dim}): switch the"
                " search encoder / model profile back, or re-index the photos with the new"
                " model: `rapbot index --rebuild`."
            )
            if strict:
                raise StoreError(self.mismatch)

    def _adopt_recorded(self) -> None:
        """Unresolved: read flags and photos from the collection that holds them."""
        held = self._held_collection()
        recorded = self._key(f"model\x00{held}") if held else None
        if recorded:
            self.model_id, self.dim = recorded["model_id"], int(recorded["dim"])
            self.collection = held

    def _held_collection(self) -> str:
        """The collection holding this index's photos: its own, or while :attr:`mismatch`
        says so, another encoder's (exports and counts of a mismatched store read it)."""
        own = self.collection
        if own and self.client.collection_exists(own) and self._count_in(own) > 0:
            return own
        others = self._others_with_photos()
        return others[0] if others else own

    def _check_vectors(self) -> None:
        if self._unavailable is not None:
            error = self._unavailable
            raise type(error)(*error.args)
        if self.mismatch is not None:
            raise StoreError(self.mismatch)
        with self._calls():
            if self._key(REEMBEDDING) is not None:
                raise StoreError(HALF_FOR_USE)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._owns_client:
                    self.client.close()

    # ------------------------------------------------------------------------- indexing flag

    def indexing(self, scope: str) -> bool:
        scope = check_scope(scope)
        with self._calls():
            flag = self._key(f"scope\x00{scope}")
        return bool(flag and flag.get("indexing"))

    def set_indexing(self, scope: str, enabled: bool) -> None:
        scope = check_scope(scope)
        with self._calls():
            self._set_key(f"scope\x00{scope}", kind="scope", scope=scope, indexing=bool(enabled))

    # ------------------------------------------------------------------------- writes

    def _point(self, scope, vector, thumbnail, poster, posted_at, source) -> models.PointStruct:
        poster = check_text(poster, "poster")
        source = check_text(source, "source").strip()
        if not source:
            raise InvalidInputError("A photo needs a source reference.")
        vector = check_embedding(vector, self.dim)
        when = time.time() if posted_at is None else float(posted_at)
        payload = {
            "scope": scope,
            "source": source,
            "poster": poster,
            "posted_at": when,
            "thumbnail": base64.b64encode(bytes(thumbnail)).decode("ascii"),
        }
        return models.PointStruct(
            id=photo_id_of(scope, source), vector=vector.tolist(), payload=payload
        )

    def _upsert_new(self, scope: str, points: list[models.PointStruct], require: bool) -> int:
        """Write the points not stored yet; with ``require``, only while indexing is on, checked
        again after writing (another worker's ``/index off`` in between takes them out)."""
        if require and not self.indexing(scope):
            return 0
        with self._calls():
            have = {
                r.id
                for r in self.client.retrieve(
                    self.collection, [p.id for p in points], with_payload=False
                )
            }
            new = list({p.id: p for p in points if p.id not in have}.values())
            if new:
                self.client.upsert(self.collection, points=new, wait=True)
        if require and new and not self.indexing(scope):
            with self._calls():
                self.client.delete(
                    self.collection,
                    points_selector=models.PointIdsList(points=[p.id for p in new]),
                    wait=True,
                )
            return 0
        return len(new)

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
        """Store one photo; returns its id (idempotent by ``source`` within the scope), or None
        when ``require_indexing`` and the scope's indexing is off."""
        scope = check_scope(scope)
        point = self._point(scope, embedding, thumbnail_jpeg, poster, posted_at, source)
        self._check_vectors()
        if require_indexing and not self.indexing(scope):
            return None
        written = self._upsert_new(scope, [point], require_indexing)
        if require_indexing and not written and not self._exists(scope, point.id):
            return None
        return int(point.id)

    def _exists(self, scope: str, photo_id: int) -> bool:
        with self._calls():
            found = self.client.retrieve(self.collection, [int(photo_id)], with_payload=["scope"])
        return bool(found and found[0].payload.get("scope") == scope)

    def add_many(self, scope, rows, *, require_indexing: bool = False) -> int:
        """Bulk :meth:`add`; returns how many were new."""
        scope = check_scope(scope)
        self._check_vectors()
        added = 0
        rows = iter(rows)
        while chunk := list(islice(rows, _PAGE)):
            points = [self._point(scope, e, j, p, t, s) for e, j, p, t, s in chunk]
            added += self._upsert_new(scope, points, require_indexing)
        return added

    def replace_scope(self, scope: str, rows: Iterable, indexing: bool | None = None) -> int:
        """Make the scope's photos exactly ``rows`` and, unless None, set its flag. Every row is
        checked before anything is deleted (Qdrant has no transactions: a bad row leaves the
        old photos; a server failing midway can leave a partial scope)."""
        scope = check_scope(scope)
        points = [self._point(scope, e, j, p, t, s) for e, j, p, t, s in rows]
        if points:
            self._check_vectors()
        with self._calls():
            self._delete_where(_scope_filter(scope))
            for start in range(0, len(points), _PAGE):
                self.client.upsert(self.collection, points=points[start : start + _PAGE], wait=True)
        if indexing is not None:
            self.set_indexing(scope, indexing)
        return self.total(scope)

    def _delete_where(self, flt: models.Filter) -> int:
        """Delete the matching photos from every photo collection; returns how many."""
        removed = 0
        for collection in self._photo_collections():
            n = self._count_in(collection, flt)
            if n:
                self.client.delete(
                    collection, points_selector=models.FilterSelector(filter=flt), wait=True
                )
                removed += n
        return removed

    def delete_user(self, poster: str) -> int:
        poster = check_text(poster, "poster")
        if not poster:
            raise InvalidInputError("The user whose photos to delete must be named.")
        with self._calls():
            return self._delete_where(_poster_filter(poster))

    def delete_photos(self, scope: str, photo_ids: list[int]) -> int:
        """Forget these photos of the scope (unreadable ones, before a re-index); how many."""
        scope = check_scope(scope)
        if not photo_ids:
            return 0
        flt = _scope_filter(scope)
        flt.must.append(models.HasIdCondition(has_id=[int(i) for i in photo_ids]))
        with self._calls():
            return self._delete_where(flt)

    def delete_scope(self, scope: str) -> int:
        scope = check_scope(scope)
        with self._calls():
            return self._delete_where(_scope_filter(scope))

    # ------------------------------------------------------------------------- reads

    def count(self, scope: str) -> int:
        return self.total(check_scope(scope))

    def total(self, scope: str | None = None) -> int:
        flt = None if scope is None else _scope_filter(check_scope(scope))
        with self._calls():
            held = self._held_collection()
            if not held or not self.client.collection_exists(held):
                return 0
            return self._count_in(held, flt)

    def index_kind(self, scope: str) -> str:
        return "hnsw"

    def thumbnail(self, scope: str, photo_id: int) -> bytes | None:
        scope = check_scope(scope)
        with self._calls():
            held = self._held_collection()
            if not held:
                return None
            found = self.client.retrieve(held, [int(photo_id)], with_payload=["scope", "thumbnail"])
        if not found or found[0].payload.get("scope") != scope:
            return None
        return base64.b64decode(found[0].payload["thumbnail"])

    def _query(self, scope: str, queries: np.ndarray, k: int, vectors: bool):
        flt = _scope_filter(scope)
        requests = [
            models.QueryRequest(
                query=row.tolist(),
                filter=flt,
                limit=k,
                with_payload=["scope", "source"],
                with_vector=vectors,
            )
            for row in queries
        ]
        with self._calls():
            responses = self.client.query_batch_points(self.collection, requests=requests)
        return [[p for p in r.points if p.payload.get("scope") == scope] for r in responses]

    def search(self, scope: str, vector: np.ndarray, k: int) -> list[PhotoHit]:
        """The scope's ``k`` photos most similar (dot product = cosine) to ``vector``."""
        scope, k = check_scope(scope), check_k(k)
        self._check_vectors()
        query = check_embedding(vector, self.dim).reshape(1, self.dim)
        points = self._query(scope, query, k, vectors=False)[0]
        return [PhotoHit(int(p.id), float(p.score), p.payload["source"]) for p in points]

    def candidates(self, scope: str, queries: np.ndarray, m: int) -> PhotoCandidates:
        """The union of each query row's top ``m`` photos, with stored vectors and sources."""
        scope, m = check_scope(scope), max(1, int(m))
        self._check_vectors()
        queries = check_queries(queries, self.dim)
        found: dict[int, models.ScoredPoint] = {}
        for points in self._query(scope, queries, m, vectors=True):
            for p in points:
                found.setdefault(int(p.id), p)
        if not found:
            return PhotoCandidates.empty(self.dim)
        ids = sorted(found)
        return PhotoCandidates(
            np.asarray(ids, dtype=np.int64),
            np.asarray([found[i].vector for i in ids], dtype=np.float32),
            {i: found[i].payload["source"] for i in ids},
        )

    def scopes(self) -> list[str]:
        """Scopes that have photos or have indexing on, sorted (what a backup holds)."""
        with self._calls():
            held = self._held_collection()
            with_photos: set[str] = set()
            if held and self.client.collection_exists(held):
                limit = 1024
                while True:
                    hits = self.client.facet(held, "scope", limit=limit, exact=True).hits
                    if len(hits) < limit:
                        break
                    limit *= 4
                with_photos = {str(h.value) for h in hits}
            flags = self._scroll(
                self.flags,
                models.Filter(
                    must=[
                        models.FieldCondition(key="kind", match=models.MatchValue(value="scope")),
                        models.FieldCondition(key="indexing", match=models.MatchValue(value=True)),
                    ]
                ),
                payload=["scope"],
            )
        return sorted(with_photos | {r.payload["scope"] for r in flags})

    def _scroll(self, collection, flt, payload, vectors: bool = False) -> list[models.Record]:
        records: list[models.Record] = []
        offset = None
        while True:
            page, offset = self.client.scroll(
                collection,
                scroll_filter=flt,
                limit=_PAGE,
                offset=offset,
                with_payload=payload,
                with_vectors=vectors,
            )
            records += page
            if offset is None:
                return records

    def recorded_model(self) -> tuple[str, int]:
        """The encoder (id, size) the stored vectors come from; ``("", 0)`` when none holds
        photos; StoreError while a re-embed is half done."""
        with self._calls():
            if self._key(REEMBEDDING) is not None:
                raise StoreError(HALF_FOR_EXPORT)
            held = self._held_collection()
            recorded = self._key(f"model\x00{held}") if held else None
        if not recorded:
            return "", 0
        return recorded["model_id"], int(recorded["dim"])

    def rows(self, scope: str, batch_size: int = _PAGE) -> Iterator[StoredPhoto]:
        """The scope's photos (id order), read a page at a time; needs no model."""
        scope = check_scope(scope)
        with self._calls():
            held = self._held_collection()
        if not held:
            return
        offset = None
        while True:
            with self._calls():
                page, offset = self.client.scroll(
                    held,
                    scroll_filter=_scope_filter(scope),
                    limit=max(1, int(batch_size)),
                    offset=offset,
                    with_payload=True,
                    with_vectors=True,
                )
            for r in page:
                p = r.payload
                yield StoredPhoto(
                    int(r.id),
                    p["source"],
                    p["poster"],
                    float(p["posted_at"]),
                    np.asarray(r.vector, dtype=np.float32),
                    base64.b64decode(p["thumbnail"]),
                )
            if offset is None:
                return

    def reembed(self, embed: Callable[[list[bytes]], np.ndarray], batch_size: int = 32) -> int:
        """Re-embed the thumbnails of every photo collection of the prefix (another encoder's,
        and this one's) into this encoder's collection, then drop the others; returns how many
        photos. A marker makes adds and searches refuse meanwhile, and after an interruption
        until a re-run finishes."""
        if self._unavailable is not None:
            error = self._unavailable
            raise type(error)(*error.args)
        with self._calls():
            self._set_key(REEMBEDDING, model_id=self.model_id)
            self.mismatch = HALF_FOR_USE
            sources = self._photo_collections()
        for collection in sources:
            offset = None
            while True:
                with self._calls():
                    page, offset = self.client.scroll(
                        collection, limit=batch_size, offset=offset, with_payload=True
                    )
                if page:
                    thumbs = [base64.b64decode(r.payload["thumbnail"]) for r in page]
                    vectors = np.asarray(embed(thumbs), dtype=np.float32)
                    if vectors.shape != (len(page), self.dim):
                        raise StoreError(
                            f"re-embedding gave vectors of shape {vectors.shape}, not"
                            f" ({len(page)}, {self.dim})"
                        )
                    points = [
                        models.PointStruct(
                            id=r.id, vector=check_embedding(v, self.dim).tolist(), payload=r.payload
                        )
                        for r, v in zip(page, vectors, strict=True)
                    ]
                    with self._calls():
                        self.client.upsert(self.collection, points=points, wait=True)
                if offset is None:
                    break
        with self._calls():
            for collection in sources:
                if collection != self.collection:
                    self.client.delete_collection(collection)
                    self.client.delete(
                        self.flags,
                        points_selector=models.PointIdsList(
                            points=[_key_id(f"model\x00{collection}")]
                        ),
                        wait=True,
                    )
            self.client.delete(
                self.flags,
                points_selector=models.PointIdsList(points=[_key_id(REEMBEDDING)]),
                wait=True,
            )
            self.mismatch = None
            return self._count_in(self.collection)
