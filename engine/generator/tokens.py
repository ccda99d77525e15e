"""Token ids around images as the LLaVA repository makes them (``tokenizer_image_token``).

RAP's checkpoints were trained and evaluated with LLaVA's code, which never tokenizes a whole
prompt: it splits the text at each ``<image>``, tokenizes every piece on its own and joins the
pieces with one image index. A piece that starts the text gets the tokenizer's BOS; when it
does, the BOS each later piece also got is dropped. A SentencePiece (Llama) tokenizer treats the
start of every piece as the start of a text, so the piece after an image begins with its
prefix-space token ("▁"); a processor tokenizing the whole prompt does not produce it. The
model saw that token after every image in training, so prompts must have it too.

transformers' LLaVA wants each image as a run of image tokens (one per image feature), not one
index: :func:`tokenize_around_images` writes the runs, with the lengths the processor uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageTokens:
    """Ids of a prompt, and for each id the characters of the prompt it came from (``None`` for
    image tokens and the BOS; only when offsets were asked for)."""

    ids: list[int]
    offsets: list[tuple[int, int] | None] | None = None


def tokenize_around_images(
    tokenizer,
    text: str,
    image_token: str,
    image_token_id: int,
    image_lengths: Sequence[int],
    *,
    offsets: bool = False,
) -> ImageTokens:
    """``text`` tokenized piece by piece between ``image_token`` markers (LLaVA's rule), each
    marker becoming ``image_lengths[i]`` copies of ``image_token_id``. ``offsets`` needs a fast
    tokenizer (character offsets of every text token in ``text``)."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(image_lengths):
        raise ValueError(f"{len(pieces) - 1} image markers for {len(image_lengths)} images")
    encoded = [tokenizer(piece, return_offsets_mapping=offsets) for piece in pieces]
    first = encoded[0]["input_ids"]
    bos = tokenizer.bos_token_id
    drop = 1 if first and bos is not None and first[0] == bos else 0
    ids: list[int] = []
    spans: list[tuple[int, int] | None] = []
    if drop:
        ids.append(bos)
        spans.append(None)
    start = 0
    for number, (piece, tokens) in enumerate(zip(pieces, encoded, strict=True)):
        if number:
            ids.extend([image_token_id] * image_lengths[number - 1])
            spans.extend([None] * image_lengths[number - 1])
        ids.extend(tokens["input_ids"][drop:])
        if offsets:
            spans.extend((start + a, start + b) for a, b in tokens["offset_mapping"][drop:])
        start += len(piece) + len(image_token)
    return ImageTokens(ids, spans if offsets else None)


def uses_llava_tokenization(processor) -> bool:
    """Whether a model was trained with the LLaVA repository's tokenization: the LLaVA-1.5
    family in transformers (converted RAP checkpoints, llava-hf LLaVA-1.5, the tiny LLaVA),
    recognised by its processor."""
    return type(processor).__name__ == "LlavaProcessor"


def llava_ids(batch, processor, text: str, images: int) -> list[tuple[int, int] | None]:
    """Replace the processor's ``input_ids`` / ``attention_mask`` in ``batch`` with LLaVA's
    piece-by-piece tokenization of ``text``, keeping the processor's image-token runs (one
    length for every image: LLaVA-1.5 resizes all images to one size). Returns the character
    offsets of the new ids (fast tokenizers; ``None`` per image token and BOS)."""
    import torch

    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    runs = int((batch["input_ids"][0] == image_id).sum())
    if runs % images:
        raise ValueError(f"{runs} image tokens for {images} images: not a LLaVA-1.5 processor")
    tokens = tokenize_around_images(
        processor.tokenizer,
        text,
        processor.image_token,
        image_id,
        [runs // images] * images,
        offsets=getattr(processor.tokenizer, "is_fast", False),
    )
    batch["input_ids"] = torch.tensor([tokens.ids], dtype=torch.long)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return tokens.offsets or []
