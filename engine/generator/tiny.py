"""Tiny random multimodal LLMs, built offline and deterministically, saved like real checkpoints.

``tiny-llava`` is a ``LlavaForConditionalGeneration`` (a miniature CLIP vision tower, the
2-layer GELU projector and a miniature Llama) with the ``vicuna_v1`` chat template RAP-LLaVA was
trained with;
``tiny-qwen2-vl`` is a ``Qwen2VLForConditionalGeneration`` with Qwen2-VL's ChatML template. Both
get a byte-level BPE tokenizer trained here with ``tokenizers`` on a small built-in corpus, the
special tokens their processors need, and the matching processor, and are written to a folder
that :class:`engine.generator.hf.Generator` loads through the same ``from_pretrained`` path as a
real model. Answers are meaningless; the point is to run every line of the real code offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.embedder import seeded
from engine.generator.templates import CHATML_VISION_TEMPLATE, VICUNA_V1_TEMPLATE

# Bump when a builder changes, so cached folders from an older build are not reused.
TINY_VERSION = 2  # 2: vicuna_v1 template (RAP-LLaVA's training template)
TINY_MODELS = ("tiny-llava", "tiny-qwen2-vl")

# Enough English, chat and RAP-prompt text that common words become single tokens.
_CORPUS = """\
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is Mochi doing? ASSISTANT: Mochi is asleep on the laptop.</s>
[1.<image>
 Name: <Mochi>, Info: my grey cat
2.<image>
 Name: <Bo>, Info: Alice's corgi
]Give a caption of the image.
Who is in this photo? Is Mochi here? What breed is Bo? Where is the dog?
Mochi is curled up on Alice's laptop next to a cup of coffee.
Bo the corgi runs on the beach with a red ball in his mouth.
The person on the left is smiling; the cat on the right is sleeping on the sofa.
A photo of a dog, a cat, a person, a car, a cup, a bird and a teddy bear in the garden.
You are a helpful assistant. I don't know anyone in this picture.
Yes, Mochi is here. No, I can't see Bo. They are playing together in the park.
The weather is sunny and the sky is blue. She is wearing a yellow hat and a green shirt.
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>
<|im_start|>assistant
"""


def train_bpe_tokenizer(special_tokens: list[str], vocab_size: int):
    """A byte-level BPE (any text round-trips) trained on the corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return tokenizer


def _llava_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = train_bpe_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], vocab_size=512)
    # Like Llama's tokenizer: every encoding starts with <s>.
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=2048,
    )


def _qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    raw = train_bpe_tokenizer(specials, vocab_size=512)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        model_max_length=4096,
    )


def build_tiny_llava(dest: Path, seed: int = 0) -> None:
    """LLaVA-1.5 in miniature: 32-px images, 8-px patches -> 16 image tokens per image."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids("<s>"),
        eos_token_id=ids("</s>"),
        pad_token_id=ids("<pad>"),
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with seeded(seed):
        model = LlavaForConditionalGeneration(config).eval()
    # LLaVA-1.5's image_aspect_ratio "pad": pad to a square with the mean colour, then resize.
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
        chat_template=VICUNA_V1_TEMPLATE,
    )
    _save(model, processor, dest)


def build_tiny_qwen2_vl(dest: Path, seed: int = 0) -> None:
    """Qwen2-VL in miniature: 14-px patches merged 2x2; a 56x56 image is 4 image tokens."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head_dim 16: the three M-RoPE sections (time, height, width) cover 16/2 = 8.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with seeded(seed):
        model = Qwen2VLForConditionalGeneration(config).eval()
    # Small pixel budget: every image becomes 56x56..112x112 pixels, 4..16 tokens.
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),  # required by the processor; never used here
        chat_template=CHATML_VISION_TEMPLATE,
    )
    _save(model, processor, dest)


def _save(model, processor, dest: Path) -> None:
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.save_pretrained(dest)
    processor.save_pretrained(dest)


_BUILDERS = {"tiny-llava": build_tiny_llava, "tiny-qwen2-vl": build_tiny_qwen2_vl}


def tiny_model_path(name: str, root: Path, seed: int = 0) -> Path:
    """The folder of tiny model ``name`` under ``root``, built on first use (atomically)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(TINY_MODELS)})")
    dest = Path(root).expanduser() / f"{name}-v{TINY_VERSION}-seed{seed}"
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the destination and rename: a half-written folder is never seen as built,
    # and concurrent builders (test workers, two processes) each finish their own copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        _BUILDERS[name](tmp, seed)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process got there first: theirs is identical
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
