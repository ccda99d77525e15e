"""CIR-LVLM (arXiv 2412.11087): a vision-language model as a user-intent-aware CIR encoder.

A QUERY (reference image + modification text) and a TARGET (an image) each go through the same
VLM with their own task prompt, both ending in a one-word summarizing instruction ("... in one
word:"); the embedding is the final hidden state of the last token, L2-normalised. Queries also
get an instance-specific soft prompt: a learnable pool of ``pool_size`` prompts of
``prompt_len`` tokens, each with a key. The paper selects the prompt "according to both visual
features and text embeddings": the query's image-token features and its text-token embeddings
are each mean-pooled (frozen), L2-normalised and joined (concatenated, 2H) into the selection
feature; the prompt whose key is most cosine-similar wins and its tokens are prepended to the
query's input embeddings. ``key_loss`` (1 - cos of the feature and the chosen key) pulls the
keys towards the queries that use them, as in prompt-pool methods (L2P). The pool counts how
often each prompt is chosen (:meth:`PromptPool.usage_share`, logged by training); while
training, selection subtracts ``usage_weight`` x (a prompt's share of past choices - 1/size)
from each similarity, so selection cannot collapse onto one prompt (L2P's frequency penalty,
in additive form); inference selects by similarity alone. Targets get their own task prompt
(``TARGET_PROMPT``: the target-side instruction) and no soft prompt: the pool's keys need the
query's words, and a target's embedding must not depend on any query (photos are indexed
once). The three instructions are declared here once (:data:`INSTRUCTIONS`); training, evaluation
and photo indexing all render them through this class, and ``rapbot train cir`` records them
in its ``cir_config.json`` so that a checkpoint trained under other wording is refused rather
than indexed with text it never saw (:func:`engine.cir.train.load_encoder`). The language
model's linear projections get LoRA through peft; the vision tower and projector stay frozen.

Text-only queries (photo search without a reference photo, :mod:`engine.cir.search`) go through
``TEXT_PROMPT``, the target prompt with the words where the image would be, without a soft prompt:
E5-V's observation (arXiv 2407.12580) that a one-word summary puts a sentence and an image in the
same space, even for a model trained only on one of the two prompts.

The language model is called directly on the merged input embeddings with 1-D positions
(``cumsum`` of the attention mask), so any ``AutoModelForImageTextToText`` whose inner model has
``get_image_features`` and ``language_model`` works (LLaVA, Qwen2-VL; for Qwen2-VL this drops
M-RoPE's 2-D image positions, a simplification).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

QUERY_PROMPT = "{image} Modify this image: {text}. Describe the target image in one word:"
TARGET_PROMPT = "{image} Describe this image in one word:"
TEXT_PROMPT = "{text}. Describe this image in one word:"
# What a checkpoint records and is checked against (the one declaration of the wording).
INSTRUCTIONS = {"query": QUERY_PROMPT, "target": TARGET_PROMPT, "text": TEXT_PROMPT}


@dataclass
class Encoded:
    """Embeddings (B, H), L2-normalised; for queries also the key-matching loss and choices."""

    embeddings: torch.Tensor
    key_loss: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None


class PromptPool(nn.Module):
    """``size`` soft prompts of ``length`` tokens with one key each (keys live in the space of
    the selection features, ``key_dim``); nearest key (cosine) wins, with a usage penalty
    while training (see the module doc)."""

    def __init__(
        self,
        size: int,
        length: int,
        hidden: int,
        key_dim: int | None = None,
        init_std: float = 0.02,
        usage_weight: float = 0.1,
    ) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(size, length, hidden) * init_std)
        self.keys = nn.Parameter(torch.randn(size, key_dim or hidden))
        self.usage_weight = float(usage_weight)
        self.register_buffer("usage", torch.zeros(size, dtype=torch.long), persistent=False)

    def usage_share(self) -> torch.Tensor:
        """Each prompt's share of the selections counted so far (uniform before any)."""
        total = int(self.usage.sum())
        if total == 0:
            return torch.full_like(self.usage, 1.0 / len(self.usage), dtype=torch.float32)
        return self.usage.float() / total

    def select(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompts (B, L, H), chosen ids (B,), key loss) for selection features (B, K)."""
        sim = F.normalize(features, dim=-1) @ F.normalize(self.keys, dim=-1).T  # (B, P)
        score = sim.detach()
        if self.training and self.usage_weight:
            share = self.usage_share().to(sim.device)
            score = score - self.usage_weight * (share - 1.0 / len(share))
        ids = score.argmax(dim=-1)
        if self.training:
            self.usage += torch.bincount(ids, minlength=len(self.usage)).to(self.usage.device)
        key_loss = (1.0 - sim.gather(1, ids[:, None])).mean()
        return self.prompts[ids], ids, key_loss


def _clause(text: str) -> str:
    """Words as a clause of the instruction (its own full stop follows)."""
    return text.strip().rstrip(".")


def _masked_mean(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(embeds.dtype)
    return (embeds * m).sum(1) / m.sum(1).clamp(min=1)


def lora_target_names(model) -> list[str]:
    """The language model's linear projections (not the vision side, projector or head)."""
    from engine.train.rap_train import lora_targets

    return lora_targets(model)


class CirLvlmEncoder(nn.Module):
    def __init__(
        self,
        model,
        processor,
        pool_size: int = 8,
        prompt_len: int = 4,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        use_lora: bool = True,
    ) -> None:
        super().__init__()
        self.processor = processor
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # the last token is always at position -1
        image_token = getattr(processor, "image_token", None) or "<image>"
        vision_start = getattr(tokenizer, "vision_bos_token", None)
        vision_end = getattr(tokenizer, "vision_eos_token", None)
        if vision_start and vision_end:  # Qwen2-VL wraps its image tokens
            image_token = f"{vision_start}{image_token}{vision_end}"
        self.image_text = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        model.requires_grad_(False)
        if use_lora:
            from peft import LoraConfig, get_peft_model

            targets = lora_target_names(model)
            import re

            config = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules="^(" + "|".join(re.escape(n) for n in targets) + ")$",
            )
            model = get_peft_model(model, config)
        self.model = model
        inner = model.get_base_model() if use_lora else model
        self.vlm = inner.model  # LlavaModel / Qwen2VLModel: get_image_features, language_model
        hidden = inner.config.get_text_config().hidden_size
        # Keys match [pooled image features ; pooled text embeddings].
        self.pool = PromptPool(pool_size, prompt_len, hidden, key_dim=2 * hidden)

    @classmethod
    def from_pretrained(
        cls, base: str | Path, device: str = "cpu", local_files_only: bool = False, **kwargs
    ) -> CirLvlmEncoder:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local = {"local_files_only": True} if local_files_only else {}
        processor = AutoProcessor.from_pretrained(base, **local)
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32, **local)
        return cls(model, processor, **kwargs).to(device)

    @property
    def device(self) -> torch.device:
        return self.pool.prompts.device

    # -- inputs -------------------------------------------------------------------------------

    def _batch(self, texts: list[str], images: Sequence) -> dict:
        batch = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _merged_embeds(self, batch: dict) -> torch.Tensor:
        input_ids = batch["input_ids"]
        embeds = self.vlm.get_input_embeddings()(input_ids)
        image_kwargs = {
            k: v
            for k, v in batch.items()
            if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
        }
        out = self.vlm.get_image_features(**image_kwargs)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), dim=0)
        feats = feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        mask = (input_ids == self.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, feats)

    def _last_token(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.vlm.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions
        )
        return F.normalize(out.last_hidden_state[:, -1].float(), dim=-1)

    def selection_features(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The pool's query (B, 2H): the mean of the image tokens' features and the mean of
        the text tokens' embeddings, each L2-normalised, joined (frozen: no gradient)."""
        real = attention_mask.bool()
        image = (input_ids == self.image_token_id) & real
        text = real & ~image
        return torch.cat(
            [
                F.normalize(_masked_mean(embeds, image), dim=-1),
                F.normalize(_masked_mean(embeds, text), dim=-1),
            ],
            dim=-1,
        ).detach()

    # -- encoding -----------------------------------------------------------------------------

    # -- instructions (rendered from the module's constants only) ----------------------------

    def query_texts(self, texts: Sequence[str]) -> list[str]:
        return [QUERY_PROMPT.format(image=self.image_text, text=_clause(t)) for t in texts]

    def target_texts(self, count: int) -> list[str]:
        return [TARGET_PROMPT.format(image=self.image_text)] * count

    def text_texts(self, texts: Sequence[str]) -> list[str]:
        return [TEXT_PROMPT.format(text=_clause(t)) for t in texts]

    def encode_queries(self, images: Sequence, texts: Sequence[str]) -> Encoded:
        if len(images) != len(texts):
            raise ValueError("encode_queries needs one modification text per reference image")
        batch = self._batch(self.query_texts(texts), images)
        embeds = self._merged_embeds(batch)
        soft, ids, key_loss = self.pool.select(
            self.selection_features(embeds, batch["input_ids"], batch["attention_mask"])
        )
        embeds = torch.cat([soft.to(embeds.dtype), embeds], dim=1)
        ones = batch["attention_mask"].new_ones(soft.shape[:2])
        mask = torch.cat([ones, batch["attention_mask"]], dim=1)
        return Encoded(self._last_token(embeds, mask), key_loss, ids)

    def encode_targets(self, images: Sequence) -> Encoded:
        batch = self._batch(self.target_texts(len(images)), images)
        embeds = self._merged_embeds(batch)
        return Encoded(self._last_token(embeds, batch["attention_mask"]))

    def encode_texts(self, texts: Sequence[str]) -> Encoded:
        """Text-only queries through ``TEXT_PROMPT`` (no image, no soft prompt; see the module
        doc): for searching a target gallery by words alone."""
        batch = self.processor.tokenizer(self.text_texts(texts), return_tensors="pt", padding=True)
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        return Encoded(self._last_token(self.vlm.get_input_embeddings()(ids), mask))

    # -- weights ------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """LoRA weights and the prompt pool: all that training changes."""
        return {n: p.detach().cpu() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = {n for n, p in self.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:3]}...")
        self.load_state_dict(state, strict=False)
