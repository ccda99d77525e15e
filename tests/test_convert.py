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
from engine.generator.templates import LLAVA_V1_SYSTEM
from tests.llava_reference import IMAGE_TOKEN_INDEX, write_original

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
        # llava_v1 (RAP-LLaVA-13b): single safetensors file.
        ("llama", 1, f"{LLAVA_V1_SYSTEM} USER: {RAP_TEXT} ASSISTANT:"),
        # phi3 (RAP-Phi3-mini): sharded .bin with an index, like the released checkpoints.
        (
            "phi3",
            2,
            "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n"
            f"{RAP_TEXT}<|end|>\n<|assistant|>\n",
        ),
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
