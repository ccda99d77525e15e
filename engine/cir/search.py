"""CIR-LVLM as the engine's photo search encoder (``RAPBOT_SEARCH_ENCODER=cir-lvlm``).

``RAPBOT_SEARCH_MODEL`` names the folder ``rapbot train cir --out`` wrote: the trained LoRA +
prompt pool (``cir_encoder.pt``), its settings (``cir_config.json``) and the base VLM (``base/``),
so it loads from that folder alone, offline. The encoder is loaded lazily, once per (folder,
device) in a process, under a lock, on the engine's device (``RAPBOT_DEVICE``); its forwards run
one at a time (a lock per model, as for the generator).

Photos are indexed with the encoder's TARGET prompt (the image alone). A search query becomes one
vector in the same space, from what the user gave:

=====================  =====================================================================
reference + text       the encoder's QUERY: (reference photo, modification text), soft prompt
reference only         the reference's TARGET embedding ("photos like this one")
named concepts, text   per concept its look (the mean TARGET embedding of its example crops)
                       and its crops as references with the text as the modification (the
                       name replaced by "the <category>", which the VLM can read), the QUERY
                       embeddings averaged: every look and every query a part
named concepts only    each concept's look a part ("Mochi and Rex": both must be there)
text only              the encoder's text-only embedding (``TEXT_PROMPT``, E5-V style)
reference + concepts   the reference's query (or target) vector and each concept's look: the
                       photo, changed by the words, with them in it
=====================  =====================================================================

Several parts are ranked by late fusion, the product of rectified cosines (an AND, as on the
CLIP path; :mod:`engine.composition`). At most :data:`MAX_CONCEPT_EXAMPLES` crops per concept
are encoded. Concept crops come from the concept store (``example_crops``), so this needs no
second copy of the concepts' embeddings; the CLIP composition's ``search_fusion`` and
``search_text_weight`` do not apply here (the encoder composes the reference and the text).

The photo index records the encoder's identity (:func:`cir_identity`: ``cir-lvlm:<folder>-<hash
of its files>`` and the language model's hidden size), computed from the folder's small files
without loading weights; an index built with another encoder (CLIP, or another checkpoint) is
refused with a message saying how to re-index (see :mod:`engine.store.photos`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.composition import replace_names
from engine.errors import MissingWeightError
from engine.weights import first_line

if TYPE_CHECKING:
    from PIL import Image

    from engine.settings import EngineSettings
    from engine.types import Concept

MODEL_PREFIX = "cir-lvlm:"
MAX_CONCEPT_EXAMPLES = 4
BATCH_SIZE = 8

_cache: dict[tuple[str, str], CirSearchEncoder] = {}
_cache_lock = threading.Lock()


def search_model_folder(settings: EngineSettings) -> Path:
    """``RAPBOT_SEARCH_MODEL`` as a folder, or a one-line :class:`MissingWeightError`."""
    from engine.cir.train import encoder_base

    spec = settings.search_model.strip()
    if not spec:
        raise MissingWeightError(
            "RAPBOT_SEARCH_ENCODER=cir-lvlm needs RAPBOT_SEARCH_MODEL: the folder that"
            " `rapbot train cir --out DIR` wrote (or set RAPBOT_SEARCH_ENCODER=clip)."
        )
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise MissingWeightError(
            f"CIR-LVLM search model folder not found: {folder} (RAPBOT_SEARCH_MODEL: the folder"
            " that `rapbot train cir --out DIR` wrote)."
        )
    encoder_base(folder)  # checks the files
    return folder.resolve()


def _fingerprint(path: Path, digest) -> None:
    """Size, first and last MiB of a file (cheap; two trainings never share all three)."""
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            digest.update(f.read())


def cir_identity(settings: EngineSettings) -> tuple[str, int]:
    """(model id, embedding size) of the configured CIR-LVLM encoder, without loading it."""
    from engine.cir.train import CONFIG_FILE, ENCODER_FILE, encoder_base

    folder = search_model_folder(settings)
    _, base = encoder_base(folder)
    digest = hashlib.sha256()
    digest.update((folder / CONFIG_FILE).read_bytes())
    _fingerprint(folder / ENCODER_FILE, digest)
    try:
        if Path(base).is_dir():
            config = json.loads((Path(base) / "config.json").read_text())
            digest.update(json.dumps(config, sort_keys=True).encode())
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(base, local_files_only=True).get_text_config()
        dim = int(text.hidden_size)
    except Exception as error:  # a missing or foreign base
        raise MissingWeightError(
            f"CIR-LVLM base model of {folder} not readable ({base}): {first_line(error)}"
        ) from None
    return f"{MODEL_PREFIX}{folder.name}-{digest.hexdigest()[:12]}", dim


class CirSearchEncoder:
    """A loaded :class:`engine.cir.lvlm.CirLvlmEncoder` giving unit float32 numpy rows."""

    def __init__(self, encoder, model_id: str, dim: int, batch_size: int = BATCH_SIZE) -> None:
        self.encoder = encoder.eval()
        self.model_id = model_id
        self.dim = int(dim)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one forward at a time per model

    def __repr__(self) -> str:
        return f"CirSearchEncoder({self.model_id!r}, dim={self.dim}, device={self.device})"

    @property
    def device(self):
        return self.encoder.device

    def _run(self, encode, *columns: Sequence) -> np.ndarray:
        import torch

        n = len(columns[0])
        rows = []
        with self._lock, torch.inference_mode():
            for start in range(0, n, self.batch_size):
                part = [list(c[start : start + self.batch_size]) for c in columns]
                rows.append(encode(*part).embeddings.float().cpu().numpy())
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)

    def embed_targets(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._run(self.encoder.encode_targets, [_rgb(im) for im in images])

    def embed_queries(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        return self._run(self.encoder.encode_queries, [_rgb(im) for im in images], list(texts))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(self.encoder.encode_texts, list(texts))


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def load_search_encoder(settings: EngineSettings) -> CirSearchEncoder:
    """The configured CIR-LVLM encoder, loaded once per (folder, device) in this process."""
    from engine.cir.train import load_encoder
    from engine.embedder import resolve_device

    folder = search_model_folder(settings)
    device = resolve_device(settings.device)
    key = (str(folder), str(device))
    with _cache_lock:
        if key not in _cache:
            model_id, dim = cir_identity(settings)
            encoder = load_encoder(folder, device=str(device))
            _cache[key] = CirSearchEncoder(encoder, model_id, dim)
        return _cache[key]


# ------------------------------------------------------------------------------- queries


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _mean(rows: np.ndarray | list[np.ndarray]) -> np.ndarray:
    return _unit(np.mean(np.asarray(rows, dtype=np.float32), axis=0))


def cir_query(
    encoder: CirSearchEncoder,
    text: str,
    ref: Image.Image | None,
    concepts: Sequence[tuple[Concept, Sequence[Image.Image]]] = (),
) -> np.ndarray:
    """The query's parts for the photo index, unit rows (p, dim) (see the table in the module
    doc): one row, or with named concepts one row per thing that must match — late fusion by
    the product of rectified cosines ranks them (:func:`engine.composition.search_parts`).
    ``concepts``: the named concepts with their example crops (those without crops are
    skipped)."""
    concepts = [(c, list(crops)[:MAX_CONCEPT_EXAMPLES]) for c, crops in concepts if crops]
    text = text.strip()
    modification, has_words = replace_names(text, [c for c, _ in concepts], article="the")
    looks = [_mean(encoder.embed_targets(crops)) for _, crops in concepts]
    if ref is not None:
        if text:
            query = encoder.embed_queries([ref], [modification])[0]
        else:
            query = encoder.embed_targets([ref])[0]
        return np.stack([_unit(query), *looks])
    if concepts:
        if not has_words:
            return np.stack(looks)
        queries = [
            _mean(encoder.embed_queries(crops, [modification] * len(crops)))
            for _, crops in concepts
        ]
        return np.stack([*looks, *queries])
    if not text:
        raise ValueError("a query needs text, a reference image or a named concept")
    return _unit(encoder.embed_texts([text])[0])[None, :]
