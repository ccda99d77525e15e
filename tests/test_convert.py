"""`rapbot models convert`: an original LLaVA-format checkpoint (like RAP-LLaVA-13b and
RAP-Phi3-mini) into transformers' LLaVA, checked against the original forward's logits."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from engine.errors import InvalidInputError, MissingWeightError
from engine.generator.convert import convert_checkpoint, map_key
from engine.generator.hf import Generator
from engine.generator.prompt import PromptConcept, rap_prompt
from tests.llava_reference import (
    IMAGE_TOKEN_INDEX,
    conversation_prompt,
    tokenizer_image_token,
    write_original,
)

PROMPT = rap_prompt(
    "What is Mochi doing?",
    [PromptConcept("Mochi", "my grey cat", Image.new("RGB", (40, 30), (0, 128, 0)))],
    Image.new("RGB", (50, 50), (200, 10, 10)),
)
RAP_TEXT = "<image>\n[1.<image>\n Name: <Mochi>, Info: my grey cat\n]What is Mochi doing?"


def original_ids(ids: list[int], image_token: int) -> list[int]:
    """The original code's input: one IMAGE_TOKEN_INDEX where the processor put a run."""
    out: list[int] = []
    for i, token in enumerate(ids):
        if token != image_token:
            out.append(token)
        elif i == 0 or ids[i - 1] != image_token:
            out.append(IMAGE_TOKEN_INDEX)
    return out


@pytest.mark.parametrize(
    ("kind", "shards", "template_text"),
    [
        # RAP-LLaVA-13b (trained with --version v1 = conv_vicuna_v1): one safetensors file.
        ("llama", 1, conversation_prompt("vicuna_v1", [RAP_TEXT, None])),
        # RAP-Phi3-mini (phi3_instruct): sharded .bin with an index, like the released ones.
        ("phi3", 2, conversation_prompt("phi3_instruct", [RAP_TEXT, None])),
    ],
)
def test_converted_model_gives_the_source_models_logits(
    kind, shards, template_text, tmp_path
) -> None:
    source = write_original(tmp_path / "original", kind, shards=shards)
    out = convert_checkpoint(tmp_path / "original", tmp_path / "converted")
    generator = Generator.load(out, device="cpu")
    assert generator.render(PROMPT) == template_text

    inputs = generator.inputs(PROMPT)
    config = generator.model.config
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(config.image_token_index) == 2 * 16  # 32-px tower, 8-px patches
    with torch.no_grad():
        converted = generator.model(**inputs).logits[0]
    expected = source(original_ids(ids, config.image_token_index), inputs["pixel_values"])
    vocab = expected.shape[-1]
    assert converted.shape[0] == expected.shape[0]
    assert torch.allclose(converted[:, :vocab], expected, atol=1e-5, rtol=0)
    # A token added for <image> must never be the likeliest next token.
    assert (converted.argmax(-1) < vocab).all()

    # Config and processor follow the original's settings.
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.vision_config.num_hidden_layers == 3  # inferred from the weights
    assert generator.processor.image_processor.do_pad  # image_aspect_ratio "pad"
    assert generator.context_tokens == 256  # tokenizer_model_max_length
    end = "</s>" if kind == "llama" else "<|end|>"
    assert generator.tokenizer.convert_tokens_to_ids(end) in generator.stop_token_ids()


def test_original_weight_names_map_to_transformers_names() -> None:
    assert map_key("model.layers.3.self_attn.q_proj.weight") == (
        "model.language_model.layers.3.self_attn.q_proj.weight"
    )
    assert map_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert map_key("lm_head.weight") == "lm_head.weight"
    assert map_key("model.mm_projector.0.bias") == "model.multi_modal_projector.linear_1.bias"
    assert map_key("model.mm_projector.2.weight") == "model.multi_modal_projector.linear_2.weight"
    assert map_key(
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    ) == ("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    assert map_key("model.vision_tower.vision_tower.vision_model.embeddings.position_ids") is None
    with pytest.raises(InvalidInputError):
        map_key("model.image_newline")  # LLaVA-NeXT


def test_convert_refuses_what_it_cannot_convert(tmp_path) -> None:
    with pytest.raises(MissingWeightError):
        convert_checkpoint(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InvalidInputError, match="not an original LLaVA"):
        convert_checkpoint(tmp_path / "plain", tmp_path / "out")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {}})
    )
    with pytest.raises(InvalidInputError, match="already"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")


def test_cli_models_convert(tmp_path, capsys) -> None:
    from rapbot.cli import main

    write_original(tmp_path / "src", "phi3")
    code = main(["models", "convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"converted": str(tmp_path / "dst")}
    assert (tmp_path / "dst" / "chat_template.jinja").read_text().startswith("{%- macro")
    assert main(["models", "convert", str(tmp_path / "none"), str(tmp_path / "x")]) == 1
    assert "No config.json" in capsys.readouterr().err


def test_conversation_templates_are_upstreams_strings() -> None:
    """The reference strings themselves, spelled out: RAP-LLaVA's system prompt speaks of a
    "user" (conv_vicuna_v1), not a "human" (conv_llava_v1)."""
    assert conversation_prompt("vicuna_v1", ["Hi", None]) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:"
    )
    assert conversation_prompt("phi3_instruct", ["Hi", None]) == (
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    )


def test_convert_never_runs_or_copies_custom_code(tmp_path, monkeypatch, capfd) -> None:
    """LLaVA-Phi-3-style configs carry ``auto_map``: converting must not ask to run that code
    (stdin is closed, as under a service) nor carry ``auto_map`` into the converted config."""
    import io
    import sys

    source = write_original(tmp_path / "src", "phi3", auto_map=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    out = convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert "custom code" not in "".join(capfd.readouterr())
    written = json.loads((out / "config.json").read_text())
    assert "auto_map" not in json.dumps(written)
    generator = Generator.load(out, device="cpu")
    inputs = generator.inputs(PROMPT)
    ids = inputs["input_ids"][0].tolist()
    expected = source(
        original_ids(ids, generator.model.config.image_token_index), inputs["pixel_values"]
    )
    converted = generator.model(**inputs).logits[0, :, : expected.shape[-1]]
    assert torch.allclose(converted, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_sentencepiece_checkpoint_tokenizes_as_upstream(kind, tmp_path) -> None:
    """A checkpoint with a SentencePiece tokenizer.model (as LLaVA-1.5 ships): the converted
    model's prompt ids are LLaVA's tokenizer_image_token of the upstream prompt, including the
    prefix-space token SentencePiece puts after every image, and its logits the source's."""
    source = write_original(tmp_path / "src", kind, sentencepiece=True)
    out = convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    generator = Generator.load(out, device="cpu")
    conversation = "vicuna_v1" if kind == "llama" else "phi3_instruct"
    upstream_prompt = conversation_prompt(conversation, [RAP_TEXT, None])
    assert generator.render(PROMPT) == upstream_prompt
    inputs = generator.inputs(PROMPT)
    ids = inputs["input_ids"][0].tolist()
    image_id = generator.model.config.image_token_index
    from tests.llava_reference import original_tokenizer

    original = original_tokenizer(kind, tmp_path / "src")
    expected_ids = tokenizer_image_token(upstream_prompt, original)
    assert original_ids(ids, image_id) == expected_ids
    # The rule matters: tokenizing the whole prompt loses the token after each image.
    whole = generator.tokenizer(upstream_prompt).input_ids
    assert original_ids(whole, generator.tokenizer.convert_tokens_to_ids("<image>")) != (
        expected_ids
    )
    with torch.no_grad():
        converted = generator.model(**inputs).logits[0]
    expected = source(expected_ids, inputs["pixel_values"])
    assert torch.allclose(converted[:, : expected.shape[-1]], expected, atol=1e-5, rtol=0)


def test_vision_tower_folder_supplies_a_checkpoint_without_one(tmp_path) -> None:
    """``--vision-tower DIR``: a checkpoint saved without its CLIP tower (as LLaVA's trainer
    can) takes the tower's config, weights and normalisation from a local CLIP folder."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPImageProcessor

    source = write_original(tmp_path / "src", "llama")
    weights = load_file(str(tmp_path / "src" / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("model.vision_tower.")},
        str(tmp_path / "src" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    source.vision.save_pretrained(tmp_path / "clip")  # the tower the checkpoint left out
    stats = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32, **stats).save_pretrained(
        tmp_path / "clip"
    )
    with pytest.raises(MissingWeightError, match="--vision-tower"):
        convert_checkpoint(tmp_path / "src", tmp_path / "nope")
    out = convert_checkpoint(tmp_path / "src", tmp_path / "dst", vision_tower=tmp_path / "clip")
    generator = Generator.load(out, device="cpu")
    assert list(generator.processor.image_processor.image_mean) == stats["image_mean"]
    inputs = generator.inputs(PROMPT)
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        converted = generator.model(**inputs).logits[0]
    expected = source(
        original_ids(ids, generator.model.config.image_token_index), inputs["pixel_values"]
    )
    assert torch.allclose(converted[:, : expected.shape[-1]], expected, atol=1e-5, rtol=0)
