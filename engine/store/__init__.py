"""Concept stores: a protocol and its implementations (FAISS for local mode)."""

from __future__ import annotations

from pathlib import Path

from engine.store.base import ConceptStore, NewConcept
from engine.store.faiss_store import FaissConceptStore

__all__ = ["ConceptStore", "FaissConceptStore", "NewConcept", "open_store"]


def open_store(data_dir: str | Path, model_id: str, dim: int) -> ConceptStore:
    """The local-mode store in ``data_dir`` (created if missing) for one embedding model.

    Raises :class:`engine.errors.StoreError` if the folder was created for another model or dim.
    """
    return FaissConceptStore(Path(data_dir), model_id, dim)
