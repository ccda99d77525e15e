"""The RAP prompt: the query image, the retrieved concepts (image, name, info), the question.

As in the RAP reference code (images in this order: query, concept 1, concept 2 ...)::

    <image>
    [1.<image>
     Name: <Mochi>, Info: my grey cat
    2.<image>
     Name: <Bo>, Info: Alice's corgi
    ]What is Mochi doing?

A text-only question drops the query image and the brackets (RAP's text-only QA). A prompt is
kept as an ordered list of text pieces and image slots rather than as a string with
``<image>`` markers, so text from users ("<image>" as a name) can never create an image slot;
:meth:`RapPrompt.text` renders the string, :meth:`RapPrompt.content` the chat-template content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

IMAGE_TOKEN = "<image>"
CAPTION_QUESTION = "Give a caption of the image."
# RAP: K=2 concepts for LLaVA-1.5 at 2048 tokens, K=3 for Phi-3-V at 4096; more concepts than
# this dilute the model's attention without helping, whatever the context allows.
MAX_CONCEPTS = 3
# Text tokens of one concept entry ("1.", "\n Name: <Mochi>, Info: my grey cat\n"), allowed for
# when the real count is not known.
CONCEPT_TEXT_TOKENS = 24


class ImageSlot:
    """Where an image goes in a prompt (one instance, :data:`IMAGE`)."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = ImageSlot()


@dataclass(frozen=True)
class PromptConcept:
    """A retrieved concept as the prompt shows it: its example crop, name and description."""

    name: str
    info: str = ""
    image: Image.Image | None = None


@dataclass(frozen=True)
class RapPrompt:
    """One user turn: text pieces and image slots in order, and the images for the slots."""

    parts: tuple[str | ImageSlot, ...]
    images: tuple[Image.Image, ...] = field(default_factory=tuple)

    def text(self, image_token: str = IMAGE_TOKEN) -> str:
        """The prompt as one string, each image slot written as ``image_token``."""
        return "".join(image_token if part is IMAGE else part for part in self.parts)

    def content(self) -> list[dict]:
        """Chat-template content: ``{"type": "image"}`` / ``{"type": "text", ...}`` in order."""
        items: list[dict] = []
        for part in self.parts:
            if part is IMAGE:
                items.append({"type": "image"})
            elif part:
                items.append({"type": "text", "text": part})
        return items

    def messages(self, system: str | None = None) -> list[dict]:
        """The conversation for ``processor.apply_chat_template``: one user turn."""
        turn = [{"role": "user", "content": self.content()}]
        if system:
            return [{"role": "system", "content": [{"type": "text", "text": system}]}, *turn]
        return turn


def _concept_parts(concepts: Sequence[PromptConcept]) -> list[str | ImageSlot]:
    parts: list[str | ImageSlot] = []
    for number, concept in enumerate(concepts, start=1):
        parts.append(f"{number}.")
        if concept.image is not None:
            parts.append(IMAGE)
        parts.append(f"\n Name: <{concept.name}>, Info: {concept.info}\n")
    return parts


def rap_prompt(
    question: str,
    concepts: Sequence[PromptConcept] = (),
    query_image: Image.Image | None = None,
) -> RapPrompt:
    """The RAP prompt for a question about ``query_image`` (or a text-only question)."""
    crops = [c.image for c in concepts if c.image is not None]
    if query_image is None:  # text-only: the concepts, then the question
        return RapPrompt(_merge_text([*_concept_parts(concepts), question]), tuple(crops))
    if not concepts:  # nobody retrieved: LLaVA's plain visual prompt, not an empty "[]"
        return RapPrompt((IMAGE, "\n" + question), (query_image,))
    parts: list[str | ImageSlot] = [IMAGE, "\n["]
    parts += _concept_parts(concepts)
    parts.append("]" + question)
    return RapPrompt(_merge_text(parts), (query_image, *crops))


def caption_prompt(query_image: Image.Image, concepts: Sequence[PromptConcept] = ()) -> RapPrompt:
    """Personalized captioning: RAP's caption instruction with the retrieved concepts."""
    return rap_prompt(CAPTION_QUESTION, concepts, query_image)


def _merge_text(parts: list[str | ImageSlot]) -> tuple[str | ImageSlot, ...]:
    """Adjacent text pieces joined, so each text run is one content item."""
    merged: list[str | ImageSlot] = []
    for part in parts:
        if part is not IMAGE and merged and merged[-1] is not IMAGE:
            merged[-1] = str(merged[-1]) + str(part)
        else:
            merged.append(part)
    return tuple(merged)


def choose_k(
    context_tokens: int,
    image_tokens: int,
    question_tokens: int,
    answer_tokens: int = 128,
    *,
    query_image: bool = True,
    concept_text_tokens: int = CONCEPT_TEXT_TOKENS,
    max_k: int = MAX_CONCEPTS,
) -> int:
    """How many concepts fit: each costs its image's tokens plus a line of text.

    ``question_tokens`` is everything else in the prompt (chat template, question). With
    LLaVA-1.5's numbers (2048 tokens, 576 per image, ~60 for the rest, 128 for the answer) this
    gives RAP's K=2; Phi-3-V at 4096 has room for 5 and gets RAP's K=3 from ``max_k``.
    """
    free = context_tokens - question_tokens - answer_tokens
    if query_image:
        free -= image_tokens
    per_concept = max(1, image_tokens + concept_text_tokens)
    return max(0, min(max_k, free // per_concept))
