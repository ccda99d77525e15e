"""The concept store protocol and the input checks every implementation shares.

A store keeps, per scope (chat), the concepts (name, description, category, owner) and their
example photos: a JPEG crop, the box it was cut from and its L2-normalised embedding. Nothing
may cross scopes: every method but :meth:`ConceptStore.delete_user` reads and writes exactly one
scope. Implementations: :class:`engine.store.faiss_store.FaissConceptStore` (local mode) and
:class:`engine.store.qdrant_store.QdrantConceptStore` (server mode).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engine.errors import InvalidInputError
from engine.types import Box, Concept, ExampleHit
from engine.validation import clean_box


@runtime_checkable
class ConceptStore(Protocol):
    """Per-scope concepts and their example vectors; see the module docstring."""

    model_id: str  # embedding model identity, e.g. "open_clip:ViT-B-32:openai"
    dim: int

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
    ) -> Concept: ...

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
        """Add a photo to a concept; ``added_by``: who added it (None: the concept's owner),
        so that :meth:`delete_user` removes it with the rest of that user's data."""
        ...

    def get(self, scope: str, concept_id: str) -> Concept | None: ...

    def get_by_name(self, scope: str, name: str) -> Concept | None: ...

    def find_by_source(self, scope: str, source: str) -> Concept | None: ...

    def list_concepts(self, scope: str) -> list[Concept]: ...

    def categories(self, scope: str, limit: int | None = None) -> list[str]:
        """The scope's distinct non-empty categories, sorted; ``limit``: only the ``limit``
        categories that most concepts have (ties by name), still sorted."""
        ...

    def rename(self, scope: str, concept_id: str, new_name: str) -> Concept: ...

    def describe(self, scope: str, concept_id: str, description: str) -> Concept: ...

    def delete(self, scope: str, concept_id: str) -> None: ...

    def delete_user(self, owner: str) -> int:
        """Remove, in every scope, the concepts ``owner`` remembered and the photos they
        added to other people's concepts; returns how many concepts went."""
        ...

    def search(self, scope: str, queries: np.ndarray, k: int) -> list[list[ExampleHit]]: ...

    def example_crops(self, scope: str, concept_id: str, limit: int | None = None) -> list[bytes]:
        """The concept's crops (JPEG), oldest first; ``limit``: only that many are read."""
        ...

    def example_embeddings(self, scope: str, concept_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The listed concepts' example embeddings, ``(n, dim)`` float32 rows in the order they
        were added; ids not in the scope are left out. Reads vectors only, never crops: photo
        search needs a few concepts' vectors, not the whole chat (:meth:`examples`)."""
        ...

    def count(self, scope: str | None = None) -> int: ...

    def scopes(self) -> list[str]:
        """Every scope that holds at least one concept, sorted (exports and backups)."""
        ...

    def examples(self, scope: str) -> Iterator[StoredExample]:
        """Every example of a scope with its concept's fields, crop and embedding (exports).

        Grouped by concept (oldest concept first); a concept's examples in the order they were
        added. Read in batches: changes made while iterating may or may not be seen.
        """
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StoredExample:
    """One stored example photo with everything needed to move it to another store."""

    scope: str
    concept_id: str
    name: str
    description: str
    category: str
    owner: str
    concept_created_at: float
    example_id: int
    box: Box
    crop_jpeg: bytes
    embedding: np.ndarray  # (dim,) float32
    source: str | None
    created_at: float  # when this example was added
    added_by: str = ""  # who added it ("" from stores that did not record it: the owner)


@dataclass(frozen=True)
class NewConcept:
    """One concept for a bulk load (``add_concepts_bulk``): the arguments of ``add_concept``."""

    name: str
    embedding: np.ndarray
    crop_jpeg: bytes = b""
    box: Box = Box(0, 0, 0, 0)
    description: str = ""
    category: str = ""
    owner: str = ""
    source: str | None = None  # the first photo is the owner's


# ----------------------------------------------------------------------------- shared checks


def name_key(name: str) -> str:
    """The key names are compared by: case-insensitive for every script (casefold)."""
    return name.casefold()


def check_scope(scope: str) -> str:
    if not isinstance(scope, str) or not scope:
        raise InvalidInputError("The chat (scope) must be a non-empty string.")
    return scope


def check_text(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"The {what} must be text.")
    return value


def check_name(name: str) -> str:
    name = check_text(name, "name").strip()
    if not name:
        raise InvalidInputError("A name cannot be empty.")
    return name


def check_source(source: str | None) -> str | None:
    if source is not None and (not isinstance(source, str) or not source):
        raise InvalidInputError("A source key must be a non-empty string or None.")
    return source


def check_box(box: Box) -> Box:
    """A stored box: an engine.types.Box whose coordinates the database can hold."""
    if not isinstance(box, Box):
        raise InvalidInputError("The box must be an engine.types.Box.")
    return clean_box(box.as_list())


def check_crop(crop_jpeg: bytes) -> bytes:
    if not isinstance(crop_jpeg, (bytes, bytearray, memoryview)):
        raise InvalidInputError("The crop must be JPEG bytes.")
    return bytes(crop_jpeg)


def check_embedding(embedding: np.ndarray, dim: int) -> np.ndarray:
    """A stored vector: exactly shape ``(dim,)``, float32 and finite."""
    if not isinstance(embedding, np.ndarray) or embedding.shape != (dim,):
        shape = getattr(embedding, "shape", type(embedding).__name__)
        raise InvalidInputError(f"An embedding must have shape ({dim},), got {shape}.")
    if embedding.dtype != np.float32:
        raise InvalidInputError(f"An embedding must be float32, got {embedding.dtype}.")
    if not np.isfinite(embedding).all():
        raise InvalidInputError("An embedding must be finite (no NaN or infinity).")
    return np.ascontiguousarray(embedding)


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Query rows as a C-contiguous float32 ``(n, dim)`` array; one ``(dim,)`` vector is one row.

    Unlike stored embeddings any float dtype is accepted: queries are not kept.
    """
    if not isinstance(queries, np.ndarray) or not np.issubdtype(queries.dtype, np.floating):
        raise InvalidInputError("Search queries must be a float NumPy array.")
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InvalidInputError(f"Search queries must have shape (n, {dim}), got {queries.shape}.")
    if not np.isfinite(queries).all():
        raise InvalidInputError("Search queries must be finite (no NaN or infinity).")
    return np.ascontiguousarray(queries, dtype=np.float32)


def check_ids(concept_ids: Sequence[str]) -> list[str]:
    """Concept ids to look up: a list of strings, de-duplicated (first wins)."""
    if isinstance(concept_ids, str) or not all(isinstance(c, str) for c in concept_ids):
        raise InvalidInputError("Concept ids must be a list of strings.")
    return list(dict.fromkeys(concept_ids))


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}.")
    return int(k)


def check_model(model_id: str, dim: int) -> tuple[str, int]:
    if not isinstance(model_id, str) or not model_id:
        raise InvalidInputError("The embedding model id must be a non-empty string.")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidInputError(f"The embedding dimension must be a positive integer, got {dim!r}.")
    return model_id, int(dim)
