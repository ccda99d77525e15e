"""RAP-format training data: records, concept selection with noise, tokenization, collation.

A record (one JSON object; a file holds a JSON list or one object per line)::

    {"id": 156, "image": "refcoco/image/94268.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nDoes <Dior> wear shoes?"},
                       {"from": "gpt", "value": "Yes."}],
     "extra": {"refcoco/crop/94268_0.jpg": {"name": "Dior", "info": "A man in an orange shirt.",
                                            "category": "person"}},
     "type": "basic"}

``image`` is the query photo (a path, a one-item list, or absent for a text-only record);
``extra`` maps a concept's crop to its name and description. The first human turn becomes the
RAP prompt of :func:`engine.generator.prompt.rap_prompt` — query image, numbered concepts, then
the question — in the model's chat template; later turns follow as they are. Only the
assistant's tokens are trained (everything else is labelled ``-100``).

Noise concepts (RAP): the retriever always returns its top K, so some concepts in a real prompt
are not in the photo. Training adds random concepts from other records to the list (shuffled)
so the model learns to use only the relevant ones. Noise fills the list up to
``max_concepts``; a record with more concepts than that keeps those its conversation names.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInputError
from engine.generator.tokens import llava_ids, uses_llava_tokenization

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels the loss skips (transformers' and torch's convention)
_IMAGE_PLACEHOLDER = re.compile(r"<image>\n?")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class RapConcept:
    """One entry of a record's ``extra``: a crop of the concept, its name and description."""

    image: str
    name: str
    info: str = ""
    category: str = ""


@dataclass(frozen=True)
class RapRecord:
    id: str
    image: str | None  # the query photo; None for a text-only record
    conversations: tuple[tuple[str, str], ...]  # (role "user"/"assistant", text)
    concepts: tuple[RapConcept, ...]
    type: str = ""


def parse_record(raw: dict[str, Any], where: str = "") -> RapRecord:
    """One record from its JSON object; a malformed one is an InvalidInputError naming it."""
    rid = str(raw.get("id", where))

    def bad(why: str) -> InvalidInputError:
        return InvalidInputError(f"RAP record {rid}{f' ({where})' if where else ''}: {why}")

    image = raw.get("image")
    if isinstance(image, list):
        if len(image) > 1:  # RAP's prepared format lists the crops after the query
            raise bad("give one query image; concept crops go in 'extra'")
        image = image[0] if image else None
    if image is not None and not isinstance(image, str):
        raise bad("'image' must be a path")
    turns = []
    for turn in raw.get("conversations") or []:
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None or not isinstance(turn.get("value"), str):
            raise bad("each conversation turn needs 'from' (human/gpt) and a text 'value'")
        turns.append((role, turn["value"]))
    if not turns or turns[0][0] != "user" or not any(r == "assistant" for r, _ in turns):
        raise bad("the conversation must start with a human turn and have a gpt answer")
    concepts = []
    for crop, meta in (raw.get("extra") or {}).items():
        if not isinstance(meta, dict) or not str(meta.get("name", "")).strip():
            raise bad(f"concept {crop!r} in 'extra' needs a name")
        concepts.append(
            RapConcept(
                crop,
                str(meta["name"]).strip(),
                str(meta.get("info", "")),
                str(meta.get("category", "")),
            )
        )
    return RapRecord(rid, image, tuple(turns), tuple(concepts), str(raw.get("type", "")))


def load_records(path: str | Path) -> list[RapRecord]:
    """Records from a JSON list or a JSON-lines file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidInputError(f"Can't read training data {path}: {error.strerror}") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            raws = json.loads(text)
        else:
            raws = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{path} is not JSON or JSON lines: {error}") from None
    records = [parse_record(raw, f"{path.name} #{i}") for i, raw in enumerate(raws)]
    if not records:
        raise InvalidInputError(f"{path} holds no training records")
    return records


# --------------------------------------------------------------------------- concept choice


def _named_in(concept: RapConcept, record: RapRecord) -> bool:
    text = " ".join(value for _, value in record.conversations)
    return re.search(r"(?<!\w)" + re.escape(concept.name) + r"(?!\w)", text, re.I) is not None


def choose_concepts(
    record: RapRecord,
    pool: Sequence[RapConcept],
    max_concepts: int,
    noise_concepts: int,
    rng: random.Random,
) -> list[RapConcept]:
    """The concepts shown in this record's prompt: its own (at most ``max_concepts``, those the
    conversation names first) plus up to ``noise_concepts`` others from ``pool`` while there is
    room, in random order. Noise never shares a name with the record's own concepts."""
    own = sorted(record.concepts, key=lambda c: not _named_in(c, record))[:max_concepts]
    room = max(0, min(noise_concepts, max_concepts - len(own)))
    taken = {c.name.casefold() for c in record.concepts}
    candidates = [c for c in pool if c.name.casefold() not in taken]
    noise: list[RapConcept] = []
    for concept in rng.sample(candidates, min(len(candidates), room * 4 + 4)):
        if len(noise) == room:
            break
        if concept.name.casefold() not in taken:  # the pool may hold one name several times
            taken.add(concept.name.casefold())
            noise.append(concept)
    chosen = own + noise
    rng.shuffle(chosen)
    return chosen


def drop_over_max_concepts(records: Sequence[RapRecord], max_concepts: int) -> list[RapRecord]:
    """RAP's rule for its released runs (``prepare_dataset``): a record with more concepts in
    ``extra`` than the prompt's K is left out of training, not cut down to K."""
    kept = [r for r in records if len(r.concepts) <= max_concepts]
    if len(kept) < len(records):
        log.info(
            "dropped %d of %d records with more than %d concepts",
            len(records) - len(kept),
            len(records),
            max_concepts,
        )
    if not kept:
        raise InvalidInputError(f"Every training record has more than {max_concepts} concepts.")
    return kept


def concept_pool(records: Iterable[RapRecord]) -> list[RapConcept]:
    """Every distinct concept crop in the data: where noise concepts come from."""
    seen: dict[str, RapConcept] = {}
    for record in records:
        for concept in record.concepts:
            seen.setdefault(concept.image, concept)
    return list(seen.values())


# ------------------------------------------------------------------------------ tokenizing


def build_messages(
    record: RapRecord, concepts: Sequence[RapConcept], load_image
) -> tuple[list[dict], list]:
    """Chat messages (the RAP prompt as the first user turn) and the images in prompt order."""
    from engine.generator.prompt import PromptConcept, rap_prompt

    turns = [(role, _IMAGE_PLACEHOLDER.sub("", text)) for role, text in record.conversations]
    query = load_image(record.image) if record.image else None
    shown = [PromptConcept(c.name, c.info, load_image(c.image)) for c in concepts]
    prompt = rap_prompt(turns[0][1].strip(), shown, query)
    messages = prompt.messages()
    for role, text in turns[1:]:
        messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    return messages, list(prompt.images)


def tokenize_conversation(processor, messages: list[dict], images: list) -> dict[str, Any]:
    """``processor`` inputs for the whole conversation, with labels on the assistant turns.

    Assistant spans are found as characters — the chat template rendered up to the answer (with
    the generation prompt) and up to its end — and mapped to tokens through the tokenizer's
    offsets, so a template needs no special markers. All images sit in the first user turn, so
    the processor's image-token expansion only shifts positions before the first answer.
    """
    template = getattr(processor, "chat_template", None)
    if not template:
        raise InvalidInputError(
            "The base model's processor has no chat template; RAP training needs one."
        )
    render = processor.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(render(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(render(messages[: i + 1], tokenize=False))
            if full[:end] != render(messages[: i + 1], tokenize=False):
                raise InvalidInputError("The chat template does not render turns as prefixes.")
            spans.append((start, end))
    batch = processor(text=[full], images=images or None, return_tensors="pt")
    if images and uses_llava_tokenization(processor):  # LLaVA's piece-by-piece ids
        offsets = llava_ids(batch, processor, full, len(images))
        ids = batch["input_ids"][0]
        labels = [
            int(token) if span and any(a <= span[0] < b for a, b in spans) else IGNORE_INDEX
            for token, span in zip(ids, offsets, strict=True)
        ]
    else:
        ids = batch["input_ids"][0]
        labels = _labels_after_images(processor, full, spans, ids)
    # Per-token tensors (ids, mask, Qwen's mm_token_type_ids) lose the batch axis and become
    # 1-D; image tensors stay as they are.
    out = {
        key: value[0] if value.dim() == 2 and value.shape == (1, len(ids)) else value
        for key, value in batch.items()
    }
    import torch

    out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


def _labels_after_images(processor, full: str, spans, ids) -> list[int]:
    """Labels for the processor's own ids: the text's tokens found through their offsets,
    shifted by the tokens the images added before the first answer."""
    text_only = processor.tokenizer(full, return_offsets_mapping=True)
    shift = len(ids) - len(text_only["input_ids"])  # tokens the images added
    labels = [IGNORE_INDEX] * len(ids)
    for position, (begin, _) in enumerate(text_only["offset_mapping"]):
        if any(start <= begin < end for start, end in spans):
            token = text_only["input_ids"][position]
            if int(ids[position + shift]) != token:
                raise InvalidInputError("Tokens of the answer moved: images after an answer?")
            labels[position + shift] = token
    return labels


# ------------------------------------------------------------------------------ the dataset


class RapDataset:
    """A map-style dataset (``torch.utils.data.Dataset`` protocol) of tokenized RAP records.

    Noise concepts are drawn from a generator seeded by (seed, epoch, index): the same sample
    each time for a given epoch — so a resumed run sees what the interrupted one would have —
    and different noise in each epoch (call :meth:`set_epoch`).
    """

    def __init__(
        self,
        records: Sequence[RapRecord],
        processor,
        image_root: str | Path,
        *,
        max_concepts: int = 2,
        noise_concepts: int = 1,
        max_length: int | None = None,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.processor = processor
        self.image_root = Path(image_root).expanduser()
        self.max_concepts = max_concepts
        self.noise_concepts = noise_concepts
        self.max_length = max_length
        self.seed = seed
        self.epoch = 0
        self.pool = concept_pool(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_image(self, path: str):
        from engine.images import load_image_file

        full = Path(path).expanduser()
        full = full if full.is_absolute() else self.image_root / full
        return load_image_file(full)  # data sets come from outside: the upload limits apply

    def concepts_for(self, index: int) -> list[RapConcept]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        record = self.records[index]
        return choose_concepts(record, self.pool, self.max_concepts, self.noise_concepts, rng)

    def messages_for(self, index: int) -> tuple[list[dict], list]:
        return build_messages(self.records[index], self.concepts_for(index), self.load_image)

    def __getitem__(self, index: int) -> dict[str, Any]:
        messages, images = self.messages_for(index)
        item = tokenize_conversation(self.processor, messages, images)
        if self.max_length and len(item["input_ids"]) > self.max_length:
            # Cutting into image tokens would break the model's image/token count check, and
            # the answer comes last: cut only the answer's tail, never the prompt.
            first_label = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
            if first_label >= self.max_length:
                raise InvalidInputError(
                    f"RAP record {self.records[index].id}: the prompt alone is longer than "
                    f"--max-length {self.max_length}; lower --max-concepts or raise the limit."
                )
            length = len(item["input_ids"])
            for key, value in item.items():
                if value.dim() == 1 and len(value) == length:
                    item[key] = value[: self.max_length]
        return item


class RapCollator:
    """Right-pads the per-token tensors (1-D: ids with the pad id, labels with -100, masks and
    the rest with 0) and concatenates the image tensors (``pixel_values``, ``image_grid_thw``
    ...) of the batch along their first axis, which is how LLaVA and Qwen2-VL take several
    images per sequence."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        batch: dict[str, Any] = {}
        for key in sorted({k for item in items for k in item}):
            parts = [item[key] for item in items if key in item]
            if parts[0].dim() == 1:
                pad = self.pad_values.get(key, 0)
                batch[key] = pad_sequence(parts, batch_first=True, padding_value=pad)
            else:
                batch[key] = torch.cat(parts, dim=0)
        return batch
