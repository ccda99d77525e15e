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


def tiny_original(kind: str, seed: int = 0):
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
    tokens = len(original_tokenizer(kind))
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


def original_tokenizer(kind: str):
    """The checkpoint's own tokenizer: no <image> token (the original code never tokenizes it)."""
    from transformers import PreTrainedTokenizerFast

    from engine.generator.tiny import train_bpe_tokenizer

    specials = ["<unk>", "<s>", "</s>"]
    if kind == "phi3":
        specials += ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    raw = train_bpe_tokenizer(specials, vocab_size=290)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_original(folder: Path, kind: str, shards: int = 1, seed: int = 0) -> OriginalLlava:
    """Write an original-format checkpoint (config, weights, tokenizer) into ``folder``."""
    from safetensors.torch import save_file

    model, config = tiny_original(kind, seed)
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
    original_tokenizer(kind).save_pretrained(folder)
    return model
