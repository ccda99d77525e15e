"""RAP's Retrieve step: which remembered concepts are in a photo (or named in a question).

Two policies (``RAPBOT_RETRIEVAL_POLICY``; see docs/generation.md):

``threshold`` — recognition. Each region (a detection at the configured confidence, or the
whole photo when the detector finds nothing) is embedded, the scope's examples are searched
top-K per region, scores are pooled per concept (best example wins), and regions and concepts
are matched one-to-one, best pair first; a pair below the similarity threshold is no match.
That is how the bot can say "I don't know anyone here", and what every recognition-only answer
and every annotated photo uses.

``rap`` — the candidates RAP's generator was trained for, as RAP's inference code retrieves
them: the detector looks only for the chat's own categories at confidence 0.1, every crop's
2 nearest examples are pooled, ordered best first across all crops, and the distinct concepts
fill the prompt's K, with no threshold: the model learnt from noise concepts to ignore the
wrong ones. Concepts named in the question come first under both policies.
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
# When a region shows the object of a matched one, it is not an unrecognized thing beside it
# ("Rex is in the middle; I don't recognize the dog in the middle"): boxes overlapping by half
# (IoU), or of the same class with one mostly inside the other (the real COCO detector gives a
# dog's whole body and its front half: IoU 0.61-0.69, containment 0.95-1.0). A dog on a couch
# (IoU ~0.3, different classes) stays two objects.
SAME_OBJECT_IOU = 0.5
SAME_OBJECT_CONTAINED = 0.6

RETRIEVAL_POLICIES = ("rap", "threshold")
RAP_DETECTOR_CONFIDENCE = 0.1  # RAP's detector.py: YOLO-World predict(conf=0.1)
RAP_HITS_PER_CROP = 2  # RAP's retriever.py: image_search(crops, k=2)
# Generators trained with RAP's noise concepts: they get the rap policy by default.
RAP_TRAINED_GENERATORS = ("rap-llava", "rap-phi3", "tiny-llava")


def retrieval_policy(setting: str, generator: str, adapter: str = "") -> str:
    """The policy in force: ``threshold`` without a generator (recognition-only answers);
    else the setting, or by default ``rap`` for a RAP-trained generator (a released RAP
    checkpoint, its tiny stand-in, or any base with a LoRA adapter from ``rapbot train rap``)
    and ``threshold`` for other models, which never learnt to ignore wrong candidates."""
    if generator.strip().lower() in ("", "none", "off"):
        return "threshold"
    if setting:
        if setting not in RETRIEVAL_POLICIES:
            raise ValueError(f"unknown retrieval policy {setting!r}")
        return setting
    return "rap" if generator.strip() in RAP_TRAINED_GENERATORS or adapter.strip() else "threshold"


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
    detections: Sequence[Detection], width: int, height: int, *, merge_duplicates: bool = True
) -> list[Region]:
    """Detections without near-duplicates (all of them, ``merge_duplicates=False``, as RAP's
    retrieval crops every box), or the whole photo when there are none."""
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: d.score, reverse=True):
        box = det.box.clipped(width, height)
        if box.width < 2 or box.height < 2:
            continue
        if merge_duplicates and any(box.iou(k.box) >= DUPLICATE_IOU for k in kept):
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


def rank_candidates(
    hits_per_region: Sequence[Sequence[ExampleHit]], per_region: int = RAP_HITS_PER_CROP
) -> list[RegionMatch]:
    """RAP's candidate order: each region's ``per_region`` best hits pooled, best score first
    across all regions, each concept once (at its best region), no threshold."""
    pooled = [
        RegionMatch(region, hit.concept_id, hit.score)
        for region, hits in enumerate(hits_per_region)
        for hit in sorted(hits, key=lambda h: h.score, reverse=True)[:per_region]
    ]
    ranked: list[RegionMatch] = []
    seen: set[str] = set()
    for match in sorted(pooled, key=lambda m: m.score, reverse=True):  # stable: region order
        if match.concept_id not in seen:
            seen.add(match.concept_id)
            ranked.append(match)
    return ranked


def same_object(region: Region, matched: Sequence[Region]) -> bool:
    """Whether ``region`` shows an object already matched (see :data:`SAME_OBJECT_IOU`)."""
    return any(
        region.box.iou(other.box) >= SAME_OBJECT_IOU
        or (region.label == other.label and region.box.overlap(other.box) >= SAME_OBJECT_CONTAINED)
        for other in matched
    )


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

    def retrieve_both(
        self,
        scope: str,
        image: Image.Image,
        regions: Sequence[Region],
        timer: StageTimer | None = None,
    ) -> tuple[list[RegionMatch], list[RegionMatch]]:
        """One embedding and one search, read both ways: RAP's ranked candidates
        (:func:`rank_candidates`) and the threshold's one-to-one matches."""
        if not regions or self.store.count(scope) == 0:
            return [], []
        timer = timer or StageTimer()
        with timer.stage("embed"):
            vectors = self.embedder.embed_images(self.crops(image, regions))
        with timer.stage("search"):
            hits = self.store.search(scope, vectors, max(self.top_k, RAP_HITS_PER_CROP))
        return rank_candidates(hits), match_regions(hits, self.threshold)

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
