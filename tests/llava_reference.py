"""A tiny checkpoint in the original LLaVA repository's format, and that repository's forward.

``OriginalLlava`` has the module layout of LLaVA's ``LlavaLlamaForCausalLM`` /
``LlavaPhi3ForCausalLM`` (a causal LM whose ``model`` also holds ``vision_tower.vision_tower``
(a CLIPVisionModel) and ``mm_projector`` (Linear, GELU, Linear)), so its state dict has exactly
the original weight names. Its forward follows ``prepare_inputs_labels_for_multimodal``: image
features (hidden state ``mm_vision_select_layer``, class token dropped, projected) are spliced
in where ``input_ids`` holds ``IMAGE_TOKEN_INDEX`` (-200). It shares no code with transformers'
LLaVA, so equal logits mean the conversion is right.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

IMAGE_TOKEN_INDEX = -200
SELECT_LAYER = -2

# The LLaVA repository's conversation templates as RAP's code defines them (llava/
# conversation.py): (system, roles, separator style, sep, sep2). RAP-LLaVA trained with
# ``--version v1`` = conv_vicuna_v1; RAP-Phi3 with ``--version phi3_instruct``.
CONVERSATIONS = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ("USER", "ASSISTANT"),
        "TWO",
        " ",
        "</s>",
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        ("USER", "ASSISTANT"),
        "TWO",
        " ",
        "</s>",
    ),
    "phi3_instruct": (
        "<|system|>\nYou are a helpful AI assistant.",
        ("\n<|user|>\n", "\n<|assistant|>\n"),
        "MPT",
        "<|end|>",
        None,
    ),
}


def conversation_prompt(name: str, turns: list[str | None]) -> str:
    """``Conversation.get_prompt()`` for alternating user/assistant turns (None: the turn the
    model is to write), for the two separator styles the RAP checkpoints use."""
    system, roles, style, sep, sep2 = CONVERSATIONS[name]
    text = system + sep
    for i, message in enumerate(turns):
        role = roles[i % 2]
        if style == "TWO":
            text += f"{role}: {message}{(sep, sep2)[i % 2]}" if message else f"{role}:"
        else:  # MPT
            text += f"{role}{message}{sep}" if message else role
    return text


def tokenizer_image_token(prompt: str, tokenizer, image_index: int = IMAGE_TOKEN_INDEX) -> list:
    """The LLaVA repository's rule: the prompt split at each "<image>", every piece tokenized
    on its own (special tokens on), the pieces joined by one image index; when the first piece
    starts with BOS, that BOS is kept once and every later piece loses its first token."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split("<image>")]
    out: list[int] = []
    strip = 1 if pieces and pieces[0] and pieces[0][0] == tokenizer.bos_token_id else 0
    if strip:
        out.append(pieces[0][0])
    for number, piece in enumerate(pieces):
        if number:
            out.append(image_index)
        out.extend(piece[strip:])
    return out


class OriginalLlava(nn.Module):
    def __init__(self, text_config, vision_config) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, CLIPVisionModel

        self.lm = AutoModelForCausalLM.from_config(text_config)
        self.vision = CLIPVisionModel(vision_config)
        hidden = text_config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(vision_config.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the LLaVA repository's names."""
        weights = dict(self.lm.state_dict())  # model.embed_tokens, model.layers..., lm_head
        for key, value in self.vision.state_dict().items():
            # transformers 4.x (what LLaVA ran on) named CLIPVisionModel's weights vision_model.*
            key = key if key.startswith("vision_model.") else "vision_model." + key
            weights["model.vision_tower.vision_tower." + key] = value
        for key, value in self.projector.state_dict().items():
            weights["model.mm_projector." + key] = value
        return {k: v.detach().clone().contiguous() for k, v in weights.items()}

    @torch.no_grad()
    def forward(self, input_ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values, output_hidden_states=True).hidden_states[SELECT_LAYER]
        features = self.projector(hidden[:, 1:])  # "patch": the class token is dropped
        embed = self.lm.get_input_embeddings()
        pieces, text, image = [], [], 0
        for token in [*input_ids, None]:
            if token is None or token == IMAGE_TOKEN_INDEX:
                if text:
                    pieces.append(embed(torch.tensor(text)))
                    text = []
                if token is not None:
                    pieces.append(features[image])
                    image += 1
            else:
                text.append(token)
        return self.lm(inputs_embeds=torch.cat(pieces)[None]).logits[0]


def tiny_original(kind: str, seed: int = 0, sentencepiece: Path | None = None):
    """A random OriginalLlava and its original config.json dict; ``kind``: llama or phi3."""
    from transformers import CLIPVisionConfig, LlamaConfig, Phi3Config

    # 64-wide, one head: the head size of OpenAI's CLIP towers, so that the converter can infer
    # this tower's config from its weights as it must for the real checkpoints.
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=1,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    # LLaVA-1.5's vocabulary is exactly its tokenizer's (no spare row for <image>: the
    # converter must add one); Phi-3's has spare rows.
    tokens = len(original_tokenizer(kind, sentencepiece))
    common = dict(
        vocab_size=tokens if kind == "llama" else tokens + 8,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    text = LlamaConfig(**common) if kind == "llama" else Phi3Config(**common)
    torch.manual_seed(seed)
    model = OriginalLlava(text, vision).eval()
    llava_fields = {
        "architectures": ["LlavaLlamaForCausalLM" if kind == "llama" else "LlavaPhi3ForCausalLM"],
        "model_type": "llava_llama" if kind == "llama" else "llava_phi3",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": SELECT_LAYER,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 256,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    text_fields = {k: v for k, v in text.to_dict().items() if k not in ("model_type",)}
    return model, {**text_fields, **llava_fields}


_SP_WORDS = [
    "a",
    "chat",
    "between",
    "curious",
    "user",
    "human",
    "and",
    "an",
    "artificial",
    "intelligence",
    "assistant",
    "the",
    "gives",
    "helpful",
    "detailed",
    "polite",
    "answers",
    "to",
    "questions",
    "name",
    "info",
    "what",
    "is",
    "doing",
    "where",
    "who",
    "here",
    "my",
    "grey",
    "cat",
    "brown",
    "dog",
    "sofa",
    "photo",
    "image",
    "caption",
    "give",
    "of",
    "in",
    "on",
    "with",
    "Mochi",
    "Bo",
    "Rex",
    "corgi",
    "USER",
    "ASSISTANT",
    "system",
    "end",
    "yes",
    "no",
    "left",
    "right",
    "middle",
]


def sentencepiece_folder(folder: Path, kind: str = "llama") -> Path:
    """A real SentencePiece model (BPE with byte fallback, like Llama's) trained here on a few
    hundred lines, saved as a Llama tokenizer folder (``tokenizer.model`` and its config, the
    way LLaVA-1.5 checkpoints ship it: ``legacy: false``, BOS added)."""
    import random

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(_SP_WORDS) for _ in range(12)) + " Name: <Mochi>, Info: [1.]\n2."
        for _ in range(300)
    ]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines))
    specials = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] if kind == "phi3" else []
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=specials,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": 256,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def original_tokenizer(kind: str, sentencepiece: Path | None = None):
    """The checkpoint's own tokenizer: no <image> token (the original code never tokenizes it);
    the SentencePiece one in the folder ``sentencepiece`` when given."""
    from transformers import PreTrainedTokenizerFast

    if sentencepiece is not None:
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(str(sentencepiece))

    from engine.generator.tiny import train_bpe_tokenizer

    specials = ["<unk>", "<s>", "</s>"]
    if kind == "phi3":
        specials += ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    raw = train_bpe_tokenizer(specials, vocab_size=290)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_original(
    folder: Path,
    kind: str,
    shards: int = 1,
    seed: int = 0,
    sentencepiece: bool = False,
    auto_map: bool = False,
) -> OriginalLlava:
    """Write an original-format checkpoint (config, weights, tokenizer) into ``folder``: with a
    SentencePiece ``tokenizer.model`` as LLaVA-1.5 ships, and with LLaVA-Phi-3's ``auto_map``
    (custom code that must never run) when asked."""
    from safetensors.torch import save_file

    spm_folder = sentencepiece_folder(folder, kind) if sentencepiece else None
    model, config = tiny_original(kind, seed, spm_folder)
    if auto_map:
        config["auto_map"] = {
            "AutoConfig": "configuration_llava_phi3.LlavaPhi3Config",
            "AutoModelForCausalLM": "modeling_llava_phi3.LlavaPhi3ForCausalLM",
        }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = model.original_state_dict()
    keys = sorted(weights)
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:  # sharded .bin with an index, like the released LLaVA-1.5 checkpoints
        weight_map = {}
        for number in range(shards):
            part = keys[number::shards]
            name = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: weights[k] for k in part}, folder / name)
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    if spm_folder is None:
        original_tokenizer(kind).save_pretrained(folder)
    return model
