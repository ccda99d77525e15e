"""Training-free composed image search on open_clip (``RAPBOT_SEARCH_ENCODER=clip``; the
trained alternative is :mod:`engine.cir.search`).

A query has up to three kinds of parts, each an L2-normalised vector in CLIP's joint space:

- the reference photo's image embedding ("like this one ...");
- for each remembered concept named in the text, the normalised mean of its stored example
  embeddings: names are *not* read as words ("Mochi" would pull toward the rice cake), the
  concept comes in through its examples;
- the text embedding of the query with every name replaced by its category ("Mochi on the
  sofa" -> "a cat on the sofa"); left out when nothing but names is left.

Two ways to score a photo ``x`` (``RAPBOT_SEARCH_FUSION``):

``product`` (default): late fusion by the product of rectified cosines,
    ``prod_j max(0, cos(x, part_j))`` over every part (the simple form of BASIC, Psomas et al.,
    which on the instance-level i-CIR benchmark reports mAP 17.48 against 8.20 for the sum with
    the same CLIP). It is an AND: a photo ranks high only if it matches the reference, *each*
    named concept and the words. It runs as one top-M search per part (``M`` =
    ``RAPBOT_SEARCH_CANDIDATES``), the union of those candidates reranked from their stored
    vectors; ties (all-zero products) fall back to the sum of the cosines.
``sum``: one search with the normalised weighted sum ``(1 - w) * visual + w * text``
    (``w`` = ``RAPBOT_SEARCH_TEXT_WEIGHT``), the visual side being the normalised sum of the
    reference and the concepts' mean: a cosine to it is a weighted sum of the parts' cosines,
    an OR (a strong look or strong words alone rank high). Kept as the baseline.

There is no spherical interpolation: slerp(v, t, w) is ``(sin((1-w)W) v + sin(wW) t) / sin W``
(``W`` the angle between them), a positive combination of the same two vectors, so for a given
query it ranks photos exactly as the sum at weight ``sin(wW) / (sin((1-w)W) + sin(wW))`` does
(``tests/test_photo_search.py`` checks this); it only moved the weight.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from engine.types import PhotoHit
from engine.validation import names_in_text

if TYPE_CHECKING:
    from engine.types import Concept

TEXT_WEIGHT = 0.5
CANDIDATES = 200  # top-M per part for late fusion
Fusion = Literal["product", "sum"]
FUSIONS: tuple[str, ...] = ("product", "sum")


def normalize(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def replace_names(text: str, concepts: Sequence[Concept], article: str = "a") -> tuple[str, bool]:
    """``text`` with each named concept replaced by "<article> <category>" (or "it" without a
    category), and whether anything but names is left: ("Mochi on the sofa", [Mochi the cat])
    -> ("a cat on the sofa", True); ("Mochi", ...) -> ("a cat", False)."""
    by_name = {c.name.casefold(): c for c in concepts}
    found = names_in_text(text, [c.name for c in concepts])
    out, rest = text, text
    for name in sorted(found, key=len, reverse=True):  # "Mochi Jr" before "Mochi"
        concept = by_name[name.casefold()]
        pattern = re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)", re.IGNORECASE)
        words = f"{article} {concept.category}" if concept.category else "it"
        out = pattern.sub(words, out)
        rest = pattern.sub(" ", rest)
    return " ".join(out.split()), bool(re.search(r"\w", rest))


@dataclass(frozen=True)
class ComposedQuery:
    """The parts of one composed query (unit float32 vectors; see the module doc)."""

    text: str = ""  # what the text side embeds: the query with names replaced ("" = none)
    text_vector: np.ndarray | None = None
    reference: np.ndarray | None = None
    concepts: tuple[np.ndarray, ...] = field(default_factory=tuple)  # one per named concept

    def __post_init__(self) -> None:
        if self.text_vector is None and self.reference is None and not self.concepts:
            raise ValueError("a query needs text, a reference image or a named concept")

    def parts(self) -> np.ndarray:
        """Every part that must match, one unit row each: reference, concepts, text."""
        rows = [self.reference] if self.reference is not None else []
        rows += list(self.concepts)
        if self.text_vector is not None:
            rows.append(self.text_vector)
        return np.stack([normalize(r) for r in rows]).astype(np.float32)

    def summed(self, text_weight: float = TEXT_WEIGHT) -> np.ndarray:
        """The ``sum`` fusion's single query vector (see the module doc)."""
        if not 0.0 <= text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
        visual_parts = [normalize(self.reference)] if self.reference is not None else []
        if self.concepts:
            visual_parts.append(normalize(np.mean([normalize(c) for c in self.concepts], axis=0)))
        visual = normalize(np.sum(visual_parts, axis=0)) if visual_parts else None
        if visual is None:
            return normalize(self.text_vector)
        if self.text_vector is None:
            return visual
        text = normalize(self.text_vector)
        return normalize((1.0 - text_weight) * visual + text_weight * text)


def product_scores(cosines: np.ndarray) -> np.ndarray:
    """Late fusion: ``prod_j max(0, cosines[:, j])`` per candidate row."""
    return np.prod(np.maximum(np.asarray(cosines, dtype=np.float32), 0.0), axis=1)


def rank_product(
    parts: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int
) -> list[tuple[int, float]]:
    """The ``k`` best (id, fused score) of the candidates (``vectors`` are their stored unit
    rows), best first; ties broken by the sum of the cosines, then by id."""
    if len(ids) == 0:
        return []
    cosines = vectors @ parts.T
    fused = product_scores(cosines)
    order = np.lexsort((ids, -cosines.sum(axis=1), -fused))[:k]
    return [(int(ids[i]), float(fused[i])) for i in order]


def search_photos(
    store,
    scope: str,
    query: ComposedQuery,
    k: int,
    fusion: Fusion = "product",
    text_weight: float = TEXT_WEIGHT,
    candidates: int = CANDIDATES,
) -> list[PhotoHit]:
    """The scope's ``k`` best photos for ``query`` from a photo store (FAISS or Qdrant): one
    search for ``sum`` (or a one-part query), top-``candidates`` per part and a rerank for
    ``product``."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion == "sum":
        return store.search(scope, query.summed(text_weight), k)
    return search_parts(store, scope, query.parts(), k, candidates)


def search_parts(
    store, scope: str, parts: np.ndarray, k: int, candidates: int = CANDIDATES
) -> list[PhotoHit]:
    """Late fusion of unit ``parts`` (p, dim): one search for a single part, else the union
    of each part's top ``candidates`` reranked by the product of rectified cosines."""
    if len(parts) == 1:
        return store.search(scope, parts[0], k)
    found = store.candidates(scope, parts, max(int(candidates), k))
    ranked = rank_product(parts, found.ids, found.vectors, k)
    return [PhotoHit(i, s, found.sources[i]) for i, s in ranked]


def concept_vectors(store, scope: str, concept_ids: list[str]) -> list[np.ndarray]:
    """The normalised mean example embedding of each concept (same order; concepts without
    examples left out). Only these concepts' vectors are read, no crops and no other concept."""
    found = store.example_embeddings(scope, concept_ids)
    means = {c: np.sum([normalize(v) for v in rows], axis=0) for c, rows in found.items()}
    return [normalize(means[c]) for c in concept_ids if c in means]
