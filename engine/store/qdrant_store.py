"""The server-mode concept store on Qdrant: many chats (scopes) as tenants of one collection.

Layout. One collection per kind and embedding model, ``<prefix>_concepts__<model slug>``, so a
new CLIP model starts an empty collection beside the old one instead of mixing vector spaces.
Following Qdrant's multitenancy guide, the scope is a keyword payload field indexed with
``is_tenant=True`` (points of one chat are stored together), the global HNSW graph is off
(``m=0``) and per-tenant graphs are built instead (``payload_m``). Every read, search, count,
update and delete carries a ``scope`` must-condition: an id alone is never trusted.

Points. A point is one example photo. Its payload repeats its concept's fields (id, name, case
folded name, description, category, owner, creation time) next to the example's own (box, JPEG
crop as base64, source, time added, an ordering ``seq``); a concept is the group of points with
one ``concept_id``. Renames and descriptions update every point of the concept with one
filtered ``set_payload`` and stamp ``meta_at``; readers take a concept's fields from its point
with the newest ``meta_at``, so a concurrent add-example that copied older fields cannot win.

Idempotency. A write with a ``source`` (a platform message id) uses a point id derived from
(scope, source), and ``add_concept`` also derives the concept id from it: a task that runs
twice, even concurrently, writes the same point again instead of a duplicate.

Names are unique per scope. A process serialises its own writes; across processes a new
concept checks its name again after writing and backs out if an older concept took it. Two
processes creating the same name within clock skew of each other may, rarely, both keep it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import (
    ApiException,
    ResponseHandlingException,
    UnexpectedResponse,
)

from engine.errors import (
    InvalidInputError,
    NameTakenError,
    RapbotError,
    StoreError,
    UnknownConceptError,
)
from engine.store.base import (
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
from engine.weights import first_line

log = logging.getLogger(__name__)

KIND = "concepts"
DISTANCE = models.Distance.DOT  # embeddings are L2-normalised: dot = cosine, as FAISS's IP
_PAGE = 256  # points per scroll page
_FETCH = 64  # crops + vectors per request when exporting
# Namespace of the ids derived from (scope, source): fixed forever, or idempotency breaks.
_SOURCE_NS = uuid.UUID("5a0e3a4c-1f0b-4c59-9d0b-6f3b2b7d1c20")
_ID_MASK = (1 << 63) - 1

# Fields with a payload index. The scope is the tenant key; the rest are the filters we use.
PAYLOAD_INDEXES: dict[str, models.KeywordIndexParams] = {
    "scope": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
    "concept_id": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
    "name_folded": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
    "owner": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
    "source": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
    "added_by": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
}
# What a concept is read from: everything but the crop (large) and the vector.
_LIGHT = [
    "scope",
    "concept_id",
    "name",
    "name_folded",
    "description",
    "category",
    "owner",
    "created_at",
    "meta_at",
    "seq",
]


def model_slug(model_id: str) -> str:
    """A collection-name-safe, collision-free form of a model id (readable part + hash)."""
    readable = re.sub(r"[^a-z0-9]+", "_", model_id.lower()).strip("_")[:60]
    digest = hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:8]
    return f"{readable}_{digest}" if readable else digest


def collection_name(prefix: str, kind: str, model_id: str) -> str:
    """E.g. ``rapbot_concepts__open_clip_vit_b_32_openai_1a2b3c4d``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", prefix or ""):
        raise StoreError(
            f"The Qdrant collection prefix {prefix!r} must be 1 to 64 letters, digits, _ or -."
        )
    return f"{prefix}_{kind}__{model_slug(model_id)}"


def example_id_of(point_id: str | int) -> int:
    """The int id an :class:`ExampleHit` reports for a point (63 bits of its uuid)."""
    if isinstance(point_id, int):
        return point_id & _ID_MASK
    return uuid.UUID(str(point_id)).int & _ID_MASK


def _match(key: str, value: str) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def _where(scope: str, *conditions: models.Condition, **fields: str) -> models.Filter:
    """A filter that always includes the scope (the tenant) as a must-condition."""
    return models.Filter(
        must=[_match("scope", scope), *conditions, *(_match(k, v) for k, v in fields.items())]
    )


def _head(records: list[models.Record]) -> dict[str, Any]:
    """The payload a concept's fields are read from: its most recently edited point."""
    return max(records, key=lambda r: (r.payload["meta_at"], r.payload["seq"])).payload


def _concept(records: list[models.Record]) -> Concept:
    p = _head(records)
    return Concept(
        p["concept_id"],
        p["scope"],
        p["name"],
        p["description"],
        p["category"],
        p["owner"],
        p["created_at"],
        examples=len(records),
    )


def _group(records: Iterable[models.Record]) -> dict[str, list[models.Record]]:
    groups: dict[str, list[models.Record]] = {}
    for record in records:
        groups.setdefault(record.payload["concept_id"], []).append(record)
    return groups


def _is_local(client: QdrantClient) -> bool:
    from qdrant_client.local.qdrant_local import QdrantLocal

    return isinstance(getattr(client, "_client", None), QdrantLocal)


class QdrantConceptStore:
    """A :class:`~engine.store.base.ConceptStore` in a Qdrant collection; see the module doc.

    ``client`` is a connected ``QdrantClient`` (a server URL, or ``":memory:"`` in tests);
    ``where`` names it in error messages. ``owns_client``: close the client on :meth:`close`.
    """

    def __init__(
        self,
        client: QdrantClient,
        model_id: str,
        dim: int,
        *,
        prefix: str = "rapbot",
        where: str = "",
        owns_client: bool = True,
        shards: int | None = None,
        replication_factor: int | None = None,
    ) -> None:
        self.model_id, self.dim = check_model(model_id, dim)
        # Used only when this store creates the collection (a Qdrant cluster); None = server's.
        self._shards, self._replication_factor = shards, replication_factor
        self.client = client
        self.collection = collection_name(prefix, KIND, self.model_id)
        self.where = where or "(in-process Qdrant)"
        self._owns_client = owns_client
        self._closed = False
        self._lock = threading.RLock()  # writes: check-then-write must not interleave
        # The in-process Qdrant is not thread-safe; a server is, so reads need no lock there.
        self._local = _is_local(client)
        self._last_seq = 0
        self._undo: list[tuple[str, Any]] | None = None  # inside atomic(): how to undo
        try:
            self._ensure_collection()
        except StoreError:
            if owns_client:
                client.close()
            raise

    @property
    def lock(self) -> threading.RLock:
        """The lock this store's client calls take (the photo store on the same client shares
        it: the in-process Qdrant is not thread-safe)."""
        return self._lock

    def __repr__(self) -> str:
        return f"QdrantConceptStore({self.where!r}, {self.collection!r}, dim={self.dim})"

    def __enter__(self) -> QdrantConceptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- plumbing

    def _ensure_collection(self) -> None:
        """Create the collection and its indexes if missing; refuse one of another shape."""
        with self._calls():
            if not self.client.collection_exists(self.collection):
                try:
                    self.client.create_collection(
                        self.collection,
                        vectors_config=models.VectorParams(size=self.dim, distance=DISTANCE),
                        # Tenants get their own HNSW graphs; no global graph (always filtered).
                        hnsw_config=models.HnswConfigDiff(payload_m=16, m=0),
                        on_disk_payload=True,  # crops are the bulk of the payload
                        shard_number=self._shards,
                        replication_factor=self._replication_factor,
                    )
                except UnexpectedResponse as error:
                    if error.status_code != 409:  # 409: another worker created it just now
                        raise
            info = self.client.get_collection(self.collection)
            vectors = info.config.params.vectors
            if not isinstance(vectors, models.VectorParams):
                found = f"named vectors {sorted(vectors or {})}"
            elif vectors.size != self.dim or vectors.distance != DISTANCE:
                found = f"vectors of size {vectors.size} ({vectors.distance.value})"
            else:
                found = ""
            if found:
                raise StoreError(
                    f"The Qdrant collection '{self.collection}' at {self.where} holds {found},"
                    f" but the embedding model {self.model_id} makes vectors of size {self.dim}"
                    f" ({DISTANCE.value}). Delete that collection if its memories are not"
                    " needed, or set RAPBOT_QDRANT_PREFIX to keep them and start a new one."
                )
            have = set(info.payload_schema or {})
            with warnings.catch_warnings():  # the in-process Qdrant warns that indexes are no-ops
                warnings.simplefilter("ignore", UserWarning)
                for field, schema in PAYLOAD_INDEXES.items():
                    if field not in have:
                        self.client.create_payload_index(
                            self.collection, field_name=field, field_schema=schema, wait=True
                        )
            self._fill_added_by()

    def _fill_added_by(self) -> None:
        """Migration: points written before ``added_by`` existed were added, as far as anyone
        knows, by their concept's owner; say so, so that forget-user finds every photo by one
        filter. Touches only such points (none after the first run)."""
        missing = models.Filter(
            must=[models.IsEmptyCondition(is_empty=models.PayloadField(key="added_by"))]
        )
        while True:
            page, _ = self.client.scroll(
                self.collection, scroll_filter=missing, limit=_PAGE, with_payload=["owner"]
            )
            if not page:
                return
            by_owner: dict[str, list] = {}
            for record in page:
                by_owner.setdefault(record.payload.get("owner", ""), []).append(record.id)
            for owner, ids in by_owner.items():
                self.client.set_payload(
                    self.collection, payload={"added_by": owner}, points=ids, wait=True
                )

    @contextmanager
    def _calls(self) -> Iterator[None]:
        """Client failures become one-line StoreErrors (shown to people, never tracebacks)."""
        if self._closed:
            raise StoreError("The memory store is closed.")
        try:
            yield
        except RapbotError:
            raise
        except (ResponseHandlingException, OSError) as error:  # refused, DNS, timeout, TLS
            raise StoreError(
                f"The concept database at {self.where} is not reachable: {first_line(error)}"
            ) from None
        except ApiException as error:
            raise StoreError(
                f"The concept database at {self.where} failed: {first_line(error)}"
            ) from None

    def _reading(self) -> AbstractContextManager[Any]:
        return self._lock if self._local else nullcontext()

    def _scroll(
        self, flt: models.Filter, payload: list[str] | bool = _LIGHT, vectors: bool = False
    ) -> list[models.Record]:
        records: list[models.Record] = []
        offset = None
        while True:
            page, offset = self.client.scroll(
                self.collection,
                scroll_filter=flt,
                limit=_PAGE,
                offset=offset,
                with_payload=payload,
                with_vectors=vectors,
            )
            records += page
            if offset is None:
                return records

    def _records(self, scope: str, concept_id: str) -> list[models.Record]:
        concept_id = check_text(concept_id, "concept id")
        return self._scroll(_where(scope, concept_id=concept_id))

    def _require(self, scope: str, concept_id: str) -> list[models.Record]:
        records = self._records(scope, concept_id)
        if not records:
            raise UnknownConceptError(f"There is no concept {concept_id!r} in this chat.")
        return records

    def _named(self, scope: str, key: str) -> dict[str, list[models.Record]]:
        """Concepts whose points carry this folded name (candidates; heads decide)."""
        return _group(self._scroll(_where(scope, name_folded=key)))

    def _by_name(self, scope: str, key: str) -> Concept | None:
        found = []
        for concept_id in self._named(scope, key):
            records = self._records(scope, concept_id)
            if records and _head(records)["name_folded"] == key:
                found.append(_concept(records))
        return min(found, key=lambda c: (c.created_at, c.id)) if found else None

    def _source_concept(self, scope: str, source: str | None) -> str | None:
        if source is None:
            return None
        page, _ = self.client.scroll(
            self.collection,
            scroll_filter=_where(scope, source=source),
            limit=1,
            with_payload=["concept_id"],
        )
        return page[0].payload["concept_id"] if page else None

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    def _insert(
        self,
        fields: dict[str, Any],
        vector: np.ndarray,
        crop: bytes,
        box: Box,
        source: str | None,
        added_by: str,
    ) -> int:
        """Write one example point of the concept described by ``fields``; returns its id."""
        scope = fields["scope"]
        point_id = uuid.uuid5(_SOURCE_NS, f"example\0{scope}\0{source}") if source else uuid.uuid4()
        payload = {
            **fields,
            "example_id": example_id_of(str(point_id)),
            "box": box.as_list(),
            "crop": base64.b64encode(crop).decode("ascii"),
            "source": source,
            "added_by": added_by,
            "added_at": time.time(),
            "seq": self._next_seq(),
        }
        self.client.upsert(
            self.collection,
            points=[models.PointStruct(id=str(point_id), vector=vector.tolist(), payload=payload)],
            wait=True,  # later reads (and other workers) must see it
        )
        if self._undo is not None:
            self._undo.append(("inserted", str(point_id)))
        return payload["example_id"]

    def _delete_points(self, flt: models.Filter) -> None:
        """Delete the points ``flt`` selects; inside :meth:`atomic`, keep them to restore."""
        if self._undo is not None:
            self._undo.append(("deleted", self._scroll(flt, payload=True, vectors=True)))
        self.client.delete(
            self.collection, points_selector=models.FilterSelector(filter=flt), wait=True
        )

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Every write inside is undone if the block raises: points it added are deleted and
        points it deleted are written back, so the store is as it was (imports: merge and
        replace). Qdrant has no transactions: this is a compensation log, kept in memory, so
        a process killed inside the block leaves what was written so far. Other writers of
        this process wait; other processes may see the intermediate state."""
        with self._lock:
            if self._undo is not None:
                raise RuntimeError("atomic() blocks do not nest")
            self._undo = []
            try:
                yield
            except BaseException:
                undo, self._undo = self._undo, None
                with self._calls():
                    self._roll_back(undo)
                raise
            finally:
                self._undo = None

    def _roll_back(self, undo: list[tuple[str, Any]]) -> None:
        for kind, what in reversed(undo):
            if kind == "inserted":
                self.client.delete(
                    self.collection, points_selector=models.PointIdsList(points=[what]), wait=True
                )
            elif what:
                self.client.upsert(
                    self.collection,
                    points=[
                        models.PointStruct(id=r.id, vector=r.vector, payload=r.payload)
                        for r in what
                    ],
                    wait=True,
                )

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
        scope, name = check_scope(scope), check_name(name)
        description = check_text(description, "description")
        category = check_text(category, "category").strip()
        owner = check_text(owner, "owner")
        vector = check_embedding(embedding, self.dim)
        crop, box, source = check_crop(crop_jpeg), check_box(box), check_source(source)
        key = name_key(name)
        with self._lock, self._calls():
            known = self._source_concept(scope, source)
            if known is not None:  # this task already ran: idempotent
                return _concept(self._require(scope, known))
            if self._by_name(scope, key) is not None:
                raise NameTakenError(f"'{name}' is already remembered in this chat.")
            concept_id = (
                uuid.uuid5(_SOURCE_NS, f"concept\0{scope}\0{source}").hex
                if source
                else uuid.uuid4().hex
            )
            now = time.time()
            fields = {
                "scope": scope,
                "concept_id": concept_id,
                "name": name,
                "name_folded": key,
                "description": description,
                "category": category,
                "owner": owner,
                "created_at": now,
                "meta_at": now,
            }
            self._insert(fields, vector, crop, box, source, owner)
            # Another process may have taken the name meanwhile: the older concept keeps it.
            first = self._by_name(scope, key)
            if first is not None and first.id != concept_id:
                self._delete_points(_where(scope, concept_id=concept_id))
                raise NameTakenError(f"'{first.name}' is already remembered in this chat.")
            return Concept(concept_id, scope, name, description, category, owner, now, 1)

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
        with self._lock, self._calls():
            known = self._source_concept(scope, source)
            if known is not None:  # this task already ran: idempotent
                return _concept(self._require(scope, known))
            records = self._require(scope, concept_id)
            head = _head(records)
            fields = {k: head[k] for k in _LIGHT if k != "seq"}
            self._insert(fields, vector, crop, box, source, added_by or head["owner"])
            return _concept(self._require(scope, concept_id))

    def _set_fields(self, scope: str, concept_id: str, fields: dict[str, Any]) -> Concept:
        self.client.set_payload(
            self.collection,
            payload={**fields, "meta_at": time.time()},
            points=_where(scope, concept_id=concept_id),
            wait=True,
        )
        return _concept(self._require(scope, concept_id))

    def rename(self, scope: str, concept_id: str, new_name: str) -> Concept:
        scope, new_name = check_scope(scope), check_name(new_name)
        key = name_key(new_name)
        with self._lock, self._calls():
            self._require(scope, concept_id)
            clash = self._by_name(scope, key)
            if clash is not None and clash.id != concept_id:
                raise InvalidInputError(f"'{clash.name}' is already remembered in this chat.")
            return self._set_fields(scope, concept_id, {"name": new_name, "name_folded": key})

    def describe(self, scope: str, concept_id: str, description: str) -> Concept:
        scope, description = check_scope(scope), check_text(description, "description")
        with self._lock, self._calls():
            self._require(scope, concept_id)
            return self._set_fields(scope, concept_id, {"description": description})

    def delete(self, scope: str, concept_id: str) -> None:
        scope = check_scope(scope)
        with self._lock, self._calls():
            self._require(scope, concept_id)
            self._delete_points(_where(scope, concept_id=concept_id))

    def delete_user(self, owner: str) -> int:
        """The one operation across scopes (by design); each delete is still scope-filtered."""
        owner = check_text(owner, "owner")
        if not owner:
            raise InvalidInputError("The user whose data to delete must be named.")
        with self._lock, self._calls():
            owned = self._scroll(
                models.Filter(must=[_match("owner", owner)]), payload=["scope", "concept_id"]
            )
            by_scope: dict[str, set[str]] = {}
            for record in owned:
                by_scope.setdefault(record.payload["scope"], set()).add(
                    record.payload["concept_id"]
                )
            # The photos they added to other people's concepts go too.
            added = self._scroll(
                models.Filter(must=[_match("added_by", owner)]), payload=["scope", "concept_id"]
            )
            touched: dict[str, set[str]] = {}
            for record in added:
                touched.setdefault(record.payload["scope"], set()).add(record.payload["concept_id"])
            for scope in sorted(set(by_scope) | set(touched)):
                either = models.Filter(should=[_match("owner", owner), _match("added_by", owner)])
                self._delete_points(_where(scope, either))
            # A concept is its points: one left without any is gone with them.
            return sum(len(ids) for ids in by_scope.values())

    # ------------------------------------------------------------------------- reads

    def get(self, scope: str, concept_id: str) -> Concept | None:
        scope, concept_id = check_scope(scope), check_text(concept_id, "concept id")
        with self._reading(), self._calls():
            records = self._records(scope, concept_id)
        return _concept(records) if records else None

    def get_by_name(self, scope: str, name: str) -> Concept | None:
        scope, key = check_scope(scope), name_key(check_text(name, "name").strip())
        with self._reading(), self._calls():
            return self._by_name(scope, key)

    def find_by_source(self, scope: str, source: str) -> Concept | None:
        scope, source = check_scope(scope), check_source(source)
        with self._reading(), self._calls():
            known = self._source_concept(scope, source)
            records = self._records(scope, known) if known else []
        return _concept(records) if records else None

    def list_concepts(self, scope: str) -> list[Concept]:
        scope = check_scope(scope)
        with self._reading(), self._calls():
            groups = _group(self._scroll(_where(scope)))
        concepts = [_concept(records) for records in groups.values()]
        return sorted(concepts, key=lambda c: (name_key(c.name), c.id))

    def categories(self, scope: str, limit: int | None = None) -> list[str]:
        scope = check_scope(scope)
        limit = None if limit is None else check_k(limit)
        with self._reading(), self._calls():
            groups = _group(self._scroll(_where(scope)))
        concepts = Counter(_head(r)["category"] for r in groups.values())
        concepts.pop("", None)
        ranked = sorted(concepts, key=lambda c: (-concepts[c], c))
        return sorted(ranked[:limit])

    def example_crops(self, scope: str, concept_id: str, limit: int | None = None) -> list[bytes]:
        scope = check_scope(scope)
        limit = None if limit is None else check_k(limit)
        with self._reading(), self._calls():
            # The order first (no crops), then only the wanted crops: one of 3,000 examples
            # must not read 3,000 crops.
            records = self._scroll(
                _where(scope, concept_id=check_text(concept_id, "concept id")), payload=["seq"]
            )
            if not records:
                raise UnknownConceptError(f"There is no concept {concept_id!r} in this chat.")
            records.sort(key=lambda r: r.payload["seq"])
            wanted = [r.id for r in records[:limit]]
            full = self._scroll(
                _where(scope, models.HasIdCondition(has_id=wanted)), payload=["crop"]
            )
        crops = {str(r.id): r.payload["crop"] for r in full}
        return [base64.b64decode(crops[str(i)]) for i in wanted if str(i) in crops]

    def example_embeddings(self, scope: str, concept_ids: Sequence[str]) -> dict[str, np.ndarray]:
        scope, wanted = check_scope(scope), check_ids(concept_ids)
        if not wanted:
            return {}
        among = models.FieldCondition(key="concept_id", match=models.MatchAny(any=wanted))
        with self._reading(), self._calls():
            records = self._scroll(
                _where(scope, among), payload=["concept_id", "seq"], vectors=True
            )
        groups = _group(sorted(records, key=lambda r: r.payload["seq"]))
        return {
            c: np.asarray([r.vector for r in groups[c]], dtype=np.float32)
            for c in wanted
            if c in groups
        }

    def count(self, scope: str | None = None) -> int:
        """Example vectors in the scope, or in the whole collection."""
        flt = None if scope is None else _where(check_scope(scope))
        with self._reading(), self._calls():
            return self.client.count(self.collection, count_filter=flt, exact=True).count

    def search(self, scope: str, queries: np.ndarray, k: int) -> list[list[ExampleHit]]:
        scope, q, k = check_scope(scope), check_queries(queries, self.dim), check_k(k)
        if len(q) == 0:
            return []
        flt = _where(scope)
        requests = [
            models.QueryRequest(
                query=row.tolist(), filter=flt, limit=k, with_payload=["scope", "concept_id"]
            )
            for row in q
        ]
        with self._reading(), self._calls():
            responses = self.client.query_batch_points(self.collection, requests=requests)
        return [
            [
                ExampleHit(p.payload["concept_id"], example_id_of(p.id), float(p.score))
                for p in response.points
                if p.payload.get("scope") == scope  # belt and braces: the filter already did
            ]
            for response in responses
        ]

    def scopes(self) -> list[str]:
        """Scopes with concepts, via a facet on the tenant key (exact counts)."""
        limit = 1024
        with self._reading(), self._calls():
            while True:
                hits = self.client.facet(self.collection, "scope", limit=limit, exact=True).hits
                if len(hits) < limit:
                    return sorted(str(h.value) for h in hits)
                limit *= 4

    def examples(self, scope: str, batch: int = _FETCH) -> Iterator[StoredExample]:
        scope = check_scope(scope)
        light = [*_LIGHT, "example_id", "box", "source", "added_at", "added_by"]
        with self._reading(), self._calls():
            groups = _group(self._scroll(_where(scope), payload=light))
        heads = {cid: _head(records) for cid, records in groups.items()}
        order = [
            record
            for cid in sorted(heads, key=lambda c: (heads[c]["created_at"], c))
            for record in sorted(groups[cid], key=lambda r: r.payload["seq"])
        ]
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            with self._reading(), self._calls():
                full = self._scroll(
                    _where(scope, models.HasIdCondition(has_id=[r.id for r in chunk])),
                    payload=["crop"],
                    vectors=True,
                )
            by_id = {str(r.id): r for r in full}
            for record in chunk:
                got = by_id.get(str(record.id))
                if got is None:  # deleted while iterating
                    continue
                p = record.payload
                head = heads[p["concept_id"]]
                yield StoredExample(
                    scope=scope,
                    concept_id=p["concept_id"],
                    name=head["name"],
                    description=head["description"],
                    category=head["category"],
                    owner=head["owner"],
                    concept_created_at=head["created_at"],
                    example_id=int(p["example_id"]),
                    box=Box(*p["box"]),
                    crop_jpeg=base64.b64decode(got.payload["crop"]),
                    embedding=np.asarray(got.vector, dtype=np.float32),
                    source=p.get("source"),
                    created_at=p["added_at"],
                    added_by=p.get("added_by") or head["owner"],
                )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._owns_client:
                try:
                    self.client.close()
                except Exception as error:  # closing must not mask the caller's own error
                    log.debug("closing the Qdrant client failed: %s", error)

    def count_concepts(self) -> int:
        """Concepts in every scope (metrics), via a facet on the concept id (exact counts)."""
        limit = 1024
        with self._reading(), self._calls():
            while True:
                hits = self.client.facet(self.collection, "concept_id", limit=limit, exact=True)
                if len(hits.hits) < limit:
                    return len(hits.hits)
                limit *= 4


def connect(
    url: str,
    *,
    api_key: str = "",
    https: bool | None = None,
    timeout: float = 10.0,
    path: str | None = None,
) -> tuple[QdrantClient, str]:
    """A client for ``url`` (``http(s)://host:port``), ``":memory:"``, or an on-disk ``path``.

    Returns the client and how to name it in messages (the URL without credentials).
    """
    try:
        if url == ":memory:":
            return QdrantClient(":memory:"), ":memory:"
        if not url:
            if not path:
                raise StoreError(
                    "Set RAPBOT_QDRANT_URL to the Qdrant server, e.g. http://qdrant:6333"
                )
            return QdrantClient(path=path), str(path)
        if not re.match(r"^https?://", url):
            raise StoreError(
                f"RAPBOT_QDRANT_URL must start with http:// or https:// (got {url!r})."
            )
        client = QdrantClient(
            url=url,
            api_key=api_key or None,
            https=https,
            timeout=max(1, round(timeout)),
            check_compatibility=False,  # our first request reports an unreachable server
        )
        return client, re.sub(r"//[^/@]*@", "//", url)  # no user:password@ in messages
    except StoreError:
        raise
    except (RuntimeError, ValueError, OSError) as error:  # e.g. a locked local folder
        raise StoreError(
            f"Cannot open the concept database at {url or path}: {first_line(error)}"
        ) from None
