"""What every photo store (:mod:`engine.store.photos` for FAISS + SQLite, :mod:`engine.store.
qdrant_photos` for Qdrant) hands out, besides :class:`engine.types.PhotoHit`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

REEMBEDDING = "reembedding"  # meta key: a re-embed started (value: the new model's id)
HALF_REEMBEDDED = (
    "The photo index is half re-embedded (an interrupted `rapbot index --rebuild`): run it again"
)
HALF_FOR_USE = f"{HALF_REEMBEDDED} before indexing, searching or importing photos."
HALF_FOR_EXPORT = f"{HALF_REEMBEDDED} before exporting."


@dataclass(frozen=True)
class StoredPhoto:
    """One stored photo, as ``rows`` reads it (backups)."""

    photo_id: int
    source: str
    poster: str
    posted_at: float
    embedding: np.ndarray  # float32, of the model ``recorded_model`` names
    thumbnail: bytes  # the 256-pixel JPEG


@dataclass(frozen=True)
class PhotoCandidates:
    """The union of several queries' top photos with their stored vectors (late fusion)."""

    ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, dim), unit rows as stored
    sources: dict[int, str] = field(default_factory=dict)

    @classmethod
    def empty(cls, dim: int) -> PhotoCandidates:
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), {})
