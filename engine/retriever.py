"""RAP's Retrieve step: which remembered concepts are in a photo (or named in a question).

Each region (a detection, or the whole photo when the detector finds nothing) is embedded,
the scope's examples are searched top-K per region, scores are pooled per concept (best
example wins), and regions and concepts are matched one-to-one, best pair first. Unlike the RAP
reference code, which always fills its top-K, a pair below the similarity threshold is no
match: that is how the bot can say "I don't know anyone here".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from engine.images import crop
from engine.store.base import ConceptStore
from engine.timing import StageTimer
from engine.types import Box, Concept, Detection, ExampleHit
from engine.validation import names_in_text

# Context around a box helps CLIP, and the same padding is used when remembering and when
# recognising so that the same photo yields the same crop pixels.
CROP_PAD = 0.05
# Detections of different classes on the same object (cat / teddy bear) are one region.
DUPLICATE_IOU = 0.8


@dataclass(frozen=True)
class Region:
    """A part of the photo that may show a concept."""

    box: Box
    label: str
    score: float


@dataclass(frozen=True)
class RegionMatch:
    region: int  # index into the regions list
    concept_id: str
    score: float


def regions_from_detections(
    detections: Sequence[Detection], width: int, height: int
) -> list[Region]:
    """Detections without near-duplicates, or the whole photo when there are none."""
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: d.score, reverse=True):
        box = det.box.clipped(width, height)
        if box.width < 2 or box.height < 2:
            continue
        if any(box.iou(k.box) >= DUPLICATE_IOU for k in kept):
            continue
        kept.append(Detection(box, det.label, det.score))
    if not kept:
        return [Region(Box.whole(width, height), "", 1.0)]
    return [Region(d.box, d.label, d.score) for d in kept]


def match_regions(
    hits_per_region: Sequence[Sequence[ExampleHit]], threshold: float
) -> list[RegionMatch]:
    """One-to-one region↔concept matches at or above ``threshold``, best score first."""
    best: dict[tuple[int, str], float] = {}
    for region, hits in enumerate(hits_per_region):
        for hit in hits:
            key = (region, hit.concept_id)
            if hit.score >= threshold and hit.score > best.get(key, float("-inf")):
                best[key] = hit.score
    matches: list[RegionMatch] = []
    used_regions: set[int] = set()
    used_concepts: set[str] = set()
    for (region, concept_id), score in sorted(best.items(), key=lambda kv: kv[1], reverse=True):
        if region in used_regions or concept_id in used_concepts:
            continue
        used_regions.add(region)
        used_concepts.add(concept_id)
        matches.append(RegionMatch(region, concept_id, score))
    return matches


class Retriever:
    """Finds a scope's concepts in regions of a photo with the embedder and the store."""

    def __init__(self, store: ConceptStore, embedder, threshold: float, top_k: int) -> None:
        self.store = store
        self.embedder = embedder
        self.threshold = threshold
        self.top_k = top_k

    def crops(self, image: Image.Image, regions: Sequence[Region]) -> list[Image.Image]:
        return [crop(image, region.box, pad=CROP_PAD) for region in regions]

    def retrieve(
        self,
        scope: str,
        image: Image.Image,
        regions: Sequence[Region],
        timer: StageTimer | None = None,
    ) -> list[RegionMatch]:
        if not regions or self.store.count(scope) == 0:
            return []
        timer = timer or StageTimer()
        with timer.stage("embed"):
            vectors = self.embedder.embed_images(self.crops(image, regions))
        with timer.stage("search"):
            hits = self.store.search(scope, vectors, self.top_k)
            return match_regions(hits, self.threshold)

    def named_in(self, scope: str, text: str) -> list[Concept]:
        """The scope's concepts whose names the text mentions, in the order mentioned."""
        return named_concepts(self.store, scope, text)


def named_concepts(store: ConceptStore, scope: str, text: str) -> list[Concept]:
    """The scope's concepts whose names ``text`` mentions (whole words, any case), in the order
    mentioned. Needs only the store, no model: recognition's questions and both photo search
    encoders use it."""
    concepts = store.list_concepts(scope)
    by_name = {c.name.casefold(): c for c in concepts}
    return [by_name[n.casefold()] for n in names_in_text(text, [c.name for c in concepts])]
