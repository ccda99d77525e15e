"""Concept stores: a protocol and its implementations (FAISS for local mode, Qdrant for servers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import StoreError
from engine.store.base import ConceptStore, NewConcept, StoredExample

if TYPE_CHECKING:
    from engine.settings import EngineSettings
    from engine.store.faiss_store import FaissConceptStore

__all__ = [
    "ConceptStore",
    "FaissConceptStore",
    "NewConcept",
    "StoredExample",
    "open_concept_store",
    "open_store",
]


def __getattr__(name: str):
    # FAISS is imported when first used, not with the package: the slim bot image (Celery
    # gateway, no faiss) imports engine.engine through the CLI without ever opening a store.
    if name == "FaissConceptStore":
        from engine.store.faiss_store import FaissConceptStore

        return FaissConceptStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(data_dir: str | Path, model_id: str, dim: int) -> ConceptStore:
    """The local-mode store in ``data_dir`` (created if missing) for one embedding model.

    Raises :class:`engine.errors.StoreError` if the folder was created for another model or dim.
    """
    from engine.store.faiss_store import FaissConceptStore

    return FaissConceptStore(Path(data_dir), model_id, dim)


def recorded_identity(settings: EngineSettings) -> tuple[str, int] | None:
    """``(model_id, dim)`` the configured FAISS store was made with, read without opening it
    for writing; None for a new store or a Qdrant one (its collections are per model)."""
    if settings.store != "faiss":
        return None
    from engine.store.faiss_store import read_store_identity

    return read_store_identity(Path(settings.data_dir).expanduser() / "store")


def open_concept_store(settings: EngineSettings, model_id: str, dim: int) -> ConceptStore:
    """The configured store (``settings.store``) for one embedding model.

    ``faiss``: the folder ``<data_dir>/store``. ``qdrant``: the server at ``qdrant_url`` (or an
    on-disk Qdrant in ``<data_dir>/qdrant`` when no URL is set). An unreachable server, a
    collection of another vector size or a folder of another model is a one-line StoreError.
    """
    data_dir = Path(settings.data_dir).expanduser()
    if settings.store == "faiss":
        return open_store(data_dir / "store", model_id, dim)
    try:
        from engine.store.qdrant_store import QdrantConceptStore, connect
    except ImportError as error:  # qdrant-client is an optional dependency
        raise StoreError(
            f"RAPBOT_STORE=qdrant needs the qdrant-client package ({error}):"
            " pip install 'qdrant-client>=1.12'"
        ) from None

    path = data_dir / "qdrant"
    if not settings.qdrant_url:
        path.mkdir(parents=True, exist_ok=True)
    client, where = connect(
        settings.qdrant_url,
        api_key=settings.qdrant_api_key.get_secret_value(),
        https=settings.qdrant_https,
        timeout=settings.qdrant_timeout,
        path=str(path),
    )
    return QdrantConceptStore(
        client,
        model_id,
        dim,
        prefix=settings.qdrant_prefix,
        where=where,
        shards=settings.qdrant_shards or None,
        replication_factor=settings.qdrant_replication_factor or None,
    )
