"""Training recipes: the hyper-parameters of RAP's released training runs, by name.

``rapbot train rap --recipe rap-llava`` (or ``rap-phi3``) trains as RAP's own scripts
(github.com/Hoar012/RAP-MLLM ``scripts/train_rap_llava.sh`` / ``train_rap_phi3.sh`` with
``llava/train/rap_train.py``) did:

- LoRA r 128, alpha 256, dropout 0.05 on every linear layer of the language model;
- learning rate 1e-4, cosine decay after 3% warm-up, no weight decay, one epoch, batch 8 per
  device, bf16 with gradient checkpointing;
- the projector trained too (LLaVA re-enables its gradients after LoRA freezes the model) at
  its own learning rate, 2e-5 (``--mm_projector_lr``);
- the conversation template the base was trained with (``--version v1`` = ``vicuna_v1`` for
  LLaVA-1.5-13B, ``phi3_instruct`` for LLaVA-Phi-3-mini) and its context (2048 / 4096 tokens);
- K concepts per prompt: 2 for RAP-LLaVA, 3 for RAP-Phi3. A record whose ``extra`` holds more
  than K concepts is dropped from the data, as ``prepare_dataset`` does (``len(extra) >
  max_num_concept``: skipped), not cut down; no noise is added while training, since RAP's
  data already holds its noise concepts.

Any option given on the command line wins over the recipe's value. Without a recipe the
defaults are for small runs (r 8, lr 2e-4, K 2 with one noise concept added).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from engine.errors import InvalidInputError


@dataclass
class TrainOptions:
    """The hyper-parameters a recipe decides (see :class:`engine.train.rap_train.TrainConfig`)."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lr: float = 2e-4
    projector_lr: float | None = None  # None: the projector (if trained) at ``lr``
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    max_concepts: int = 2
    noise_concepts: int = 1
    drop_over_max_concepts: bool = False  # False: keep the K concepts the conversation names
    max_length: int | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    train_projector: bool = False
    template: str | None = None  # None: the base model's own chat template


_UPSTREAM = dict(
    lora_r=128,
    lora_alpha=256,
    lora_dropout=0.05,
    lr=1e-4,
    projector_lr=2e-5,
    weight_decay=0.0,
    warmup_ratio=0.03,
    epochs=1,
    batch_size=8,
    grad_accum=1,
    noise_concepts=0,
    drop_over_max_concepts=True,
    bf16=True,
    gradient_checkpointing=True,
    train_projector=True,
)

RECIPES: dict[str, TrainOptions] = {
    # liuhaotian/llava-v1.5-13b, --version v1, --model_max_length 2048
    "rap-llava": TrainOptions(**_UPSTREAM, max_concepts=2, max_length=2048, template="vicuna_v1"),
    # MBZUAI/LLaVA-Phi-3-mini-4k-instruct, --version phi3_instruct, --model_max_length 4096
    "rap-phi3": TrainOptions(**_UPSTREAM, max_concepts=3, max_length=4096, template="phi3"),
}


def resolve_options(recipe: str | None, given: dict[str, Any]) -> TrainOptions:
    """The options of a run: the recipe's (or the small-run defaults), overridden by every
    value in ``given`` that is not None (what the user typed)."""
    if recipe is not None and recipe not in RECIPES:
        raise InvalidInputError(f"Unknown recipe '{recipe}' (known: {', '.join(RECIPES)}).")
    base = RECIPES[recipe] if recipe else TrainOptions()
    names = {f.name for f in fields(TrainOptions)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise InvalidInputError(f"Not a training option: {', '.join(unknown)}")
    values = {name: getattr(base, name) for name in names}
    values.update({k: v for k, v in given.items() if v is not None})
    return TrainOptions(**values)
