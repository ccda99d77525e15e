"""Training-free composed image search queries on open_clip (the default of issue 6,
``RAPBOT_SEARCH_ENCODER=clip``; the trained alternative is :mod:`engine.cir.search`).

A query is composed from up to three L2-normalised parts in CLIP's joint space:

- ``ref``: the reference photo's image embedding ("like this ...");
- ``concepts``: for each remembered concept named in the text, the normalised mean of its stored
  example embeddings; several named concepts are averaged ("Mochi on the sofa");
- ``text``: the text embedding of the whole query text.

The visual side is the normalised sum of ``ref`` and ``concepts`` (whichever are present); the
query is the normalised weighted sum ``(1 - w) * visual + w * text`` with ``w = TEXT_WEIGHT``
(0.5, the usual choice for summed CLIP features; Pic2Word/SEARLE report sums of normalised
features as a strong zero-shot baseline) — or, with ``slerp=True``, the spherical interpolation
between the two at ``w``. Text alone or visual alone is used as is. With a ``TEXT_WEIGHT`` of 0.5
the named concept's look dominates photos that merely match the words.

The engine takes ``w`` from ``RAPBOT_SEARCH_TEXT_WEIGHT`` and the sum/slerp choice from
``RAPBOT_SEARCH_SLERP``; ``benchmarks/tune_composition.py`` sweeps both on CIRR/FashionIQ-format
triplets. 0.5 stays the default until a sweep with real weights says otherwise.
"""

from __future__ import annotations

import numpy as np

TEXT_WEIGHT = 0.5


def normalize(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation between unit vectors ``a`` (t=0) and ``b`` (t=1)."""
    a, b = normalize(a), normalize(b)
    omega = float(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0)))
    if omega < 1e-6:
        return normalize((1 - t) * a + t * b)
    sin = np.sin(omega)
    return normalize((np.sin((1 - t) * omega) / sin) * a + (np.sin(t * omega) / sin) * b)


def compose_query(
    text: np.ndarray | None,
    ref: np.ndarray | None = None,
    concepts: list[np.ndarray] | tuple[np.ndarray, ...] = (),
    text_weight: float = TEXT_WEIGHT,
    use_slerp: bool = False,
) -> np.ndarray:
    """One unit-length float32 query vector from the parts (see the module doc)."""
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
    visual_parts = [normalize(v) for v in ([ref] if ref is not None else [])]
    if concepts:
        visual_parts.append(normalize(np.mean([normalize(c) for c in concepts], axis=0)))
    visual = normalize(np.sum(visual_parts, axis=0)) if visual_parts else None
    if visual is None and text is None:
        raise ValueError("a query needs text, a reference image or a named concept")
    if visual is None:
        return normalize(text)
    if text is None:
        return visual
    if use_slerp:
        return slerp(visual, text, text_weight)
    return normalize((1.0 - text_weight) * visual + text_weight * normalize(text))


def concept_vectors(store, scope: str, concept_ids: list[str]) -> list[np.ndarray]:
    """The normalised mean example embedding of each concept (same order), from ``examples``."""
    sums: dict[str, np.ndarray] = {}
    for example in store.examples(scope):
        if example.concept_id in concept_ids:
            vector = normalize(example.embedding)
            sums[example.concept_id] = sums.get(example.concept_id, 0) + vector
    return [normalize(sums[c]) for c in concept_ids if c in sums]
