"""RAP's Generate step over the engine's retrieval results.

The engine recognizes concepts in the photo and finds the ones named in the question; this
module orders them (named first, as the RAP reference code does, then recognized by score),
fetches each one's example crop from the store, keeps as many as the model's context allows
(K) and builds the RAP prompt. The concepts that went into the prompt are the ones the answer
reports, with their scores and boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image

from engine.errors import ImageError
from engine.generator.prompt import (
    CAPTION_QUESTION,
    PromptConcept,
    RapPrompt,
    caption_prompt,
    rap_prompt,
)
from engine.images import decode_image
from engine.store.base import ConceptStore
from engine.types import Concept, Recognition

log = logging.getLogger(__name__)

NAMED_SCORE = 1.0  # a concept named in the question is certain to be relevant
# A concept's crop is shown to the generator with at most this shorter side: twice LLaVA-1.5's
# 336 px input, so its processor still resizes from more than it keeps; smaller crops (what
# /remember stores from ordinary photos) are shown as they are.
EXAMPLE_MIN_SIDE = 672


def candidates(named: Sequence[Concept], known: Sequence[Recognition]) -> list[Recognition]:
    """Named concepts first (with their box when also seen), then the rest of the recognized
    ones by score, each concept once."""
    seen = {r.concept_id: r for r in known}
    ordered: list[Recognition] = []
    for concept in named:
        ordered.append(
            seen.get(concept.id)
            or Recognition(
                concept.id, concept.name, concept.description, concept.category, NAMED_SCORE, None
            )
        )
    used = {r.concept_id for r in ordered}
    ordered += sorted(
        (r for r in known if r.concept_id not in used), key=lambda r: r.score, reverse=True
    )
    return ordered


def example_image(store: ConceptStore, scope: str, concept_id: str) -> Image.Image | None:
    """The concept's first example crop (RAP shows one image per concept), or None."""
    for jpeg in store.example_crops(scope, concept_id, limit=1):
        try:  # crops can come from an archive: decoded with the limits of any upload, and
            # no larger than a generator needs (a 49 MP crop cost +1 GB per /ask)
            return decode_image(jpeg, min_side=EXAMPLE_MIN_SIDE)
        except ImageError as error:  # unreadable = the concept is shown without its image
            log.warning("unreadable crop for concept %s in %s: %s", concept_id, scope, error)
    return None


def build_prompt(
    generator,
    store: ConceptStore,
    scope: str,
    question: str | None,
    picture: Image.Image | None,
    ranked: Sequence[Recognition],
) -> tuple[RapPrompt, list[Recognition]]:
    """The RAP prompt for a question (or, with ``question=None``, a caption) and the concepts
    it shows, at most K of them."""
    concepts = [
        PromptConcept(
            generator.clean(r.name),
            generator.clean(r.description),
            example_image(store, scope, r.concept_id),
        )
        for r in ranked
    ]
    text = generator.clean(question) if question is not None else None
    shown = generator.select_concepts(text or CAPTION_QUESTION, concepts, picture)
    used = list(ranked[: len(shown)])
    if text is None:
        if picture is None:
            raise ValueError("a caption needs a photo")
        return caption_prompt(picture, shown), used
    return rap_prompt(text, shown, picture), used
