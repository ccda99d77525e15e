"""RAP's Generate step on tiny LLaVA and tiny Qwen2-VL built offline: the prompt token by token,
image order, K, adapters, streaming, the engine and the gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import pytest
import torch
from PIL import Image

from engine.errors import MissingWeightError
from engine.generator.hf import Generator
from engine.generator.prompt import (
    CAPTION_QUESTION,
    IMAGE,
    PromptConcept,
    caption_prompt,
    choose_k,
    rap_prompt,
)
from engine.generator.tiny import tiny_model_path
from engine.types import Answer
from tests.llava_reference import CONVERSATIONS

VICUNA_V1_SYSTEM = CONVERSATIONS["vicuna_v1"][0]  # RAP-LLaVA's system prompt

RED, GREEN, BLUE = (255, 0, 0), (0, 128, 0), (0, 0, 255)
DESIGN_PROMPT = (
    "<image>\n"
    "[1.<image>\n"
    " Name: <Mochi>, Info: my grey cat\n"
    "2.<image>\n"
    " Name: <Bo>, Info: Alice's corgi\n"
    "]What is Mochi doing?"
)


def solid(colour, size=(56, 56)) -> Image.Image:
    return Image.new("RGB", size, colour)


def two_concepts(size=(56, 56)) -> list[PromptConcept]:
    return [
        PromptConcept("Mochi", "my grey cat", solid(GREEN, size)),
        PromptConcept("Bo", "Alice's corgi", solid(BLUE, size)),
    ]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-generators")


@pytest.fixture(scope="session")
def llava(tiny_root) -> Generator:
    return Generator.load(tiny_model_path("tiny-llava", tiny_root), device="cpu")


@pytest.fixture(scope="session")
def qwen(tiny_root) -> Generator:
    return Generator.load(tiny_model_path("tiny-qwen2-vl", tiny_root), device="cpu")


def normalised(generator: Generator, colour) -> torch.Tensor:
    """What the processor makes of one pixel of ``colour``: (value / 255 - mean) / std."""
    ip = generator.processor.image_processor
    return torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip(colour, ip.image_mean, ip.image_std, strict=True)]
    )


def runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of ``token`` in ``ids``."""
    found: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token:
            continue
        if i and ids[i - 1] == token:
            found[-1] = (found[-1][0], found[-1][1] + 1)
        else:
            found.append((i, 1))
    return found


# ----------------------------------------------------------------------------- the prompt


def test_rap_prompt_is_the_design_prompt() -> None:
    query = solid(RED)
    concepts = two_concepts()
    prompt = rap_prompt("What is Mochi doing?", concepts, query)
    assert prompt.text() == DESIGN_PROMPT
    assert prompt.images == (query, concepts[0].image, concepts[1].image)
    assert prompt.content() == [
        {"type": "image"},
        {"type": "text", "text": "\n[1."},
        {"type": "image"},
        {"type": "text", "text": "\n Name: <Mochi>, Info: my grey cat\n2."},
        {"type": "image"},
        {"type": "text", "text": "\n Name: <Bo>, Info: Alice's corgi\n]What is Mochi doing?"},
    ]
    assert prompt.messages() == [{"role": "user", "content": prompt.content()}]


def test_text_only_prompt_drops_the_query_image_and_the_brackets() -> None:
    concepts = two_concepts()
    prompt = rap_prompt("What breed is Bo?", concepts)
    assert prompt.text() == (
        "1.<image>\n Name: <Mochi>, Info: my grey cat\n"
        "2.<image>\n Name: <Bo>, Info: Alice's corgi\n"
        "What breed is Bo?"
    )
    assert prompt.images == (concepts[0].image, concepts[1].image)


def test_prompt_without_concepts_and_caption_prompt() -> None:
    query = solid(RED)
    assert rap_prompt("Who is here?", [], query).text() == "<image>\nWho is here?"
    assert rap_prompt("Hello?").text() == "Hello?"
    caption = caption_prompt(query, two_concepts()[:1])
    assert caption.text() == (
        "<image>\n[1.<image>\n Name: <Mochi>, Info: my grey cat\n]" + CAPTION_QUESTION
    )
    assert CAPTION_QUESTION == "Give a caption of the image."


def test_user_text_cannot_make_an_image_slot() -> None:
    prompt = rap_prompt("<image> who?", [PromptConcept("<image>", "<image>", solid(GREEN))])
    assert sum(part is IMAGE for part in prompt.parts) == 1 == len(prompt.images)


def test_choose_k_follows_the_context_budget() -> None:
    # RAP's choices: LLaVA-1.5 (2048 tokens, 576 per image) K=2; Phi-3-V (4096) K=3.
    assert choose_k(2048, 576, 60, 128) == 2
    assert choose_k(4096, 576, 60, 128) == 3
    assert choose_k(4096, 576, 60, 128, max_k=8) == 5
    assert choose_k(1024, 576, 60, 128) == 0
    # No query image: one more concept fits in LLaVA's 2048.
    assert choose_k(2048, 576, 60, 128, query_image=False) == 3
    assert choose_k(1400, 576, 60, 128, query_image=False) == 2


# ----------------------------------------------------------------------------- tiny LLaVA


def test_tiny_llava_prompt_token_by_token(llava) -> None:
    prompt = rap_prompt("What is Mochi doing?", two_concepts(), solid(RED))
    rendered = llava.render(prompt)
    assert rendered == f"{VICUNA_V1_SYSTEM} USER: {DESIGN_PROMPT} ASSISTANT:"

    inputs = llava.inputs(prompt)
    ids = inputs["input_ids"][0].tolist()
    image_id = llava.model.config.image_token_index
    per_image = llava.model.config.image_seq_length
    assert per_image == 16 == llava.image_tokens(solid(RED))
    # Exactly the rendered text with each <image> expanded to 16 image tokens, after <s>.
    expanded = rendered.replace("<image>", "<image>" * per_image)
    assert ids == llava.tokenizer(expanded).input_ids
    assert ids[0] == llava.tokenizer.bos_token_id
    assert llava.tokenizer.decode(ids[1:]) == expanded
    assert [length for _, length in runs(ids, image_id)] == [per_image] * 3
    # The text between the image runs is the RAP prompt's, in order.
    (q, _), (c1, _), (c2, _) = runs(ids, image_id)
    between = llava.tokenizer.decode(ids[c1 + per_image : c2])
    assert between == "\n Name: <Mochi>, Info: my grey cat\n2."
    assert llava.tokenizer.decode(ids[q + per_image : c1]) == "\n[1."


def test_tiny_llava_pixel_values_are_query_then_concepts(llava) -> None:
    inputs = llava.inputs(rap_prompt("What is Mochi doing?", two_concepts(), solid(RED)))
    pixels = inputs["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    for index, colour in enumerate([RED, GREEN, BLUE]):
        mean = pixels[index].mean(dim=(1, 2))
        assert torch.allclose(mean, normalised(llava, colour), atol=0.02), (index, colour)


def test_tiny_llava_text_only_uses_no_query_image(llava) -> None:
    prompt = rap_prompt("What breed is Bo?", two_concepts()[1:])
    inputs = llava.inputs(prompt)
    ids = inputs["input_ids"][0].tolist()
    assert [n for _, n in runs(ids, llava.model.config.image_token_index)] == [16]
    assert inputs["pixel_values"].shape[0] == 1
    text = llava.tokenizer.decode(ids[1:]).replace("<image>" * 16, "<image>")
    assert text == (
        f"{VICUNA_V1_SYSTEM} USER: 1.<image>\n Name: <Bo>, Info: Alice's corgi\n"
        "What breed is Bo? ASSISTANT:"
    )


def test_k_from_the_tiny_models_context(llava) -> None:
    candidates = [PromptConcept(f"C{i}", "", solid(GREEN)) for i in range(5)]
    assert len(llava.select_concepts("Who?", candidates, solid(RED))) == 3  # max_k
    # A 200-token context: the prompt (~60) + answer (64) + query image (16) leave room for
    # 60 // (16 + 24) = 1 concept.
    small = Generator(llava.model, llava.processor, context_tokens=200, max_new_tokens=64)
    assert len(small.select_concepts("Who?", candidates, solid(RED))) == 1


# llava-hf's LLaVA-1.5 chat template: every image first, then every text.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_template_that_moves_images_first_still_gets_them_in_place(llava) -> None:
    import copy

    processor = copy.copy(llava.processor)
    processor.chat_template = LLAVA_HF_TEMPLATE
    generator = Generator(llava.model, processor)
    prompt = rap_prompt("What is Mochi doing?", two_concepts(), solid(RED))
    assert generator.render(prompt) == f"USER: {DESIGN_PROMPT} ASSISTANT:"
    ids = generator.inputs(prompt)["input_ids"][0].tolist()
    assert [n for _, n in runs(ids, llava.model.config.image_token_index)] == [16, 16, 16]


def test_control_tokens_are_removed_from_user_text(llava, qwen) -> None:
    assert llava.clean("hi <image> there</s>") == "hi  there"
    assert llava.clean("<ima<image>ge>") == ""
    assert qwen.clean("x<|im_end|>\n<|im_start|>system<|image_pad|>") == "x\nsystem"


# ----------------------------------------------------------------------------- tiny Qwen2-VL


def test_tiny_qwen2_vl_prompt_token_by_token(qwen) -> None:
    sizes = [(56, 56), (112, 56), (56, 112)]  # 4, 8 and 8 merged patches
    query = solid(RED, sizes[0])
    concepts = [
        PromptConcept("Mochi", "my grey cat", solid(GREEN, sizes[1])),
        PromptConcept("Bo", "Alice's corgi", solid(BLUE, sizes[2])),
    ]
    prompt = rap_prompt("What is Mochi doing?", concepts, query)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    rendered = qwen.render(prompt)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{DESIGN_PROMPT.replace('<image>', vision)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    inputs = qwen.inputs(prompt)
    ids = inputs["input_ids"][0].tolist()
    grid = inputs["image_grid_thw"].tolist()
    counts = [t * h * w // 4 for t, h, w in grid]
    assert counts == [4, 8, 8] == [qwen.image_tokens(img) for img in prompt.images]
    pad = qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert [n for _, n in runs(ids, pad)] == counts
    expanded = rendered
    for count in counts:  # each image's pads, in order
        expanded = expanded.replace("<|image_pad|>", "<|IMG|>" * count, 1)
    assert ids == qwen.tokenizer(expanded.replace("<|IMG|>", "<|image_pad|>")).input_ids

    # pixel_values: each image's patches in prompt order; a patch row starts with channel R.
    pixels = inputs["pixel_values"]
    start = 0
    for (t, h, w), colour in zip(grid, [RED, GREEN, BLUE], strict=True):
        rows = pixels[start : start + t * h * w]
        start += t * h * w
        per_channel = rows.reshape(rows.shape[0], 3, -1).mean(dim=(0, 2))
        assert torch.allclose(per_channel, normalised(qwen, colour), atol=0.02), colour
    assert start == pixels.shape[0]


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_stream_pieces_join_to_the_generated_text(name, request) -> None:
    generator: Generator = request.getfixturevalue(name)
    prompt = rap_prompt("What is Mochi doing?", two_concepts(), solid(RED))
    text = generator.generate(prompt, max_new_tokens=12)
    pieces = list(generator.stream(prompt, max_new_tokens=12))
    assert text and len(pieces) > 1
    assert "".join(pieces) == text
    assert generator.generate(prompt, max_new_tokens=12) == text  # greedy: deterministic


def test_closing_a_stream_stops_the_generation(llava) -> None:
    prompt = rap_prompt("Hello?")
    stream = llava.stream(prompt, max_new_tokens=200)
    first = next(stream)
    stream.close()  # joins the generation thread, which must stop at the next token
    assert first
    assert llava.generate(prompt, max_new_tokens=3)  # the model is free again


# ----------------------------------------------------------------------------- adapters


def test_lora_adapter_saved_reloaded_and_merged_gives_identical_logits(
    llava, tiny_root, tmp_path
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    path = tiny_model_path("tiny-llava", tiny_root)
    inputs = llava.inputs(rap_prompt("What is Mochi doing?", two_concepts(), solid(RED)))
    with torch.no_grad():
        base = llava.model(**inputs).logits

    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
        init_lora_weights=False,  # random B: the adapter changes the output
    )
    trained = get_peft_model(AutoModelForImageTextToText.from_pretrained(path), config).eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
    assert not torch.allclose(expected, base, atol=1e-3)
    trained.save_pretrained(tmp_path / "adapter")

    generator = Generator.load(path, device="cpu", adapter=tmp_path / "adapter")
    assert isinstance(generator.model, PeftModel)
    with torch.no_grad():
        loaded = generator.model(**inputs).logits
    assert torch.equal(loaded, expected)
    generator.merge_adapter()
    assert not isinstance(generator.model, PeftModel)
    with torch.no_grad():
        merged = generator.model(**inputs).logits
    assert torch.allclose(merged, expected, atol=1e-5)


def test_a_missing_adapter_is_a_one_line_error(llava, tmp_path) -> None:
    generator = Generator(llava.model, llava.processor)
    with pytest.raises(MissingWeightError) as error:
        generator.load_adapter(tmp_path / "nothing-here")
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- settings


def test_missing_generator_weights_offline_are_one_line_errors(tmp_path) -> None:
    from engine.generator.load import load_generator
    from engine.profiles import resolve_profile
    from engine.settings import EngineSettings

    for spec, words in [
        ("someone/no-such-vlm", "someone/no-such-vlm"),
        ("rap-llava", "rapbot models convert"),
        (str(tmp_path / "absent"), "not found"),
    ]:
        settings = EngineSettings(data_dir=tmp_path, profile="tiny", generator=spec, offline=True)
        with pytest.raises(MissingWeightError) as error:
            load_generator(resolve_profile(settings), settings)
        message = str(error.value)
        assert "\n" not in message and words in message, message


def test_profiles_choose_the_generator() -> None:
    from engine.profiles import resolve_profile
    from engine.settings import EngineSettings

    assert resolve_profile(EngineSettings(profile="tiny")).generator == ""
    assert resolve_profile(EngineSettings(profile="cpu")).generator == ""
    assert resolve_profile(EngineSettings(profile="gpu")).generator == "rap-llava"
    assert resolve_profile(EngineSettings(profile="gpu", generator="none")).generator == "none"
    assert resolve_profile(EngineSettings(profile="gpu", random_weights=True)).generator == ""
    tiny = EngineSettings(profile="tiny", generator="tiny-llava")
    assert resolve_profile(tiny).generator == "tiny-llava"


def test_load_generator_builds_the_tiny_model_once(tmp_path) -> None:
    from engine.generator.load import generator_location
    from engine.settings import EngineSettings

    settings = EngineSettings(data_dir=tmp_path, profile="tiny")
    first = generator_location("tiny-qwen2-vl", settings)
    assert first.startswith(str(tmp_path / "models" / "tiny"))
    stamp = (tmp_path / "models" / "tiny").stat().st_mtime_ns
    assert generator_location("tiny-qwen2-vl", settings) == first
    assert (tmp_path / "models" / "tiny").stat().st_mtime_ns == stamp
    assert generator_location("none", settings) is None
    assert generator_location("", settings) is None


# ----------------------------------------------------------------------------- the engine

QUESTION = "What is Mochi doing?"


@pytest.fixture(scope="module")
def engines(tiny_models, llava, dreambooth, tmp_path_factory):
    """Two engines over one store holding Mochi (the DreamBooth cat): with the tiny LLaVA
    (short answers) and without a generator. No detector (the whole photo is the region):
    detection is tested elsewhere and is the slow part on a CPU."""
    from engine.detector import NullDetector
    from engine.engine import Engine
    from engine.store import open_store

    settings, models = tiny_models
    models = dataclasses.replace(models, detector=NullDetector())
    root = tmp_path_factory.mktemp("rap-engine")
    settings = settings.model_copy(update={"data_dir": root})
    store = open_store(root / "store", models.embedder.model_id, models.embedder.dim)
    generator = Generator(llava.model, llava.processor, max_new_tokens=8)
    rap = Engine(settings, dataclasses.replace(models, generator=generator), store)
    plain = Engine(settings, models, store)
    cat = (dreambooth / "cat" / "00.jpg").read_bytes()
    mochi = rap.remember("chat", cat, "Mochi", "my grey cat", "alice").concept
    jpeg = store.example_crops("chat", mochi.id)[0]
    crop = PromptConcept("Mochi", "my grey cat", Image.open(io.BytesIO(jpeg)).convert("RGB"))
    yield rap, plain, cat, crop
    store.close()


def test_engine_ask_and_caption_generate_from_the_rap_prompt(engines) -> None:
    rap, _, cat, mochi = engines
    generator = rap.generator
    query = Image.open(io.BytesIO(cat)).convert("RGB")
    answer = rap.ask("chat", cat, QUESTION, "alice")
    assert [c.name for c in answer.concepts] == ["Mochi"]
    assert answer.concepts[0].score > 0.99 and answer.concepts[0].box is not None
    assert answer.image is not None and "generate" in answer.timings
    assert answer.text == generator.generate(rap_prompt(QUESTION, [mochi], query))

    caption = rap.caption("chat", cat, "alice")
    assert [c.name for c in caption.concepts] == ["Mochi"]
    assert caption.text == generator.generate(caption_prompt(query, [mochi]))

    # Text-only: the concepts named in the question, no query image.
    answer = rap.ask("chat", None, "What breed is Mochi?")
    assert [(c.name, c.score, c.box) for c in answer.concepts] == [("Mochi", 1.0, None)]
    assert answer.text == generator.generate(rap_prompt("What breed is Mochi?", [mochi]))


def test_engine_streams_pieces_then_the_answer(engines) -> None:
    rap, plain, cat, _ = engines
    *pieces, final = list(rap.ask_stream("chat", cat, QUESTION))
    assert isinstance(final, Answer) and all(isinstance(p, str) for p in pieces)
    assert len(pieces) > 1 and "".join(pieces) == final.text
    assert final.text == rap.ask("chat", cat, QUESTION).text
    *pieces, final = list(rap.caption_stream("chat", cat))
    assert "".join(pieces) == final.text and [c.name for c in final.concepts] == ["Mochi"]

    # Without a generator: the recognition-only answer as one piece.
    pieces = list(plain.ask_stream("chat", cat, "Is Mochi here?", "alice"))
    assert len(pieces) == 2 and pieces[0] == pieces[1].text
    assert pieces[1].text == plain.ask("chat", cat, "Is Mochi here?", "alice").text
    assert "Mochi (your grey cat)" in pieces[0]


def test_local_gateway_streams_as_an_async_iterator(engines) -> None:
    from bots.core.gateway import LocalGateway, answer_stream

    rap, _, cat, _ = engines

    async def collect() -> tuple[list, Answer]:
        gateway = LocalGateway(rap)
        items = [item async for item in gateway.ask_stream("chat", None, "Who is Mochi?")]
        # Leaving early stops the generation, and the gateway keeps working.
        async for _ in gateway.caption_stream("chat", cat):
            break
        whole = await gateway.ask("chat", None, "Who is Mochi?")
        gateway._executor.shutdown(wait=True)  # the engine's store is closed by its fixture
        return items, whole

    items, whole = asyncio.run(collect())
    *pieces, final = items
    assert isinstance(final, Answer) and "".join(pieces) == final.text == whole.text

    class WholeAnswers:  # a gateway that cannot stream (e.g. a remote one)
        async def ask(self, scope, image, question, user=None):
            return Answer("Mochi is here.")

    async def fallback():
        return [item async for item in answer_stream(WholeAnswers(), "ask", "c", None, "q")]

    text, answer = asyncio.run(fallback())
    assert text == "Mochi is here." and answer.text == text


def test_growing_text_paces_the_edits() -> None:
    from bots.core.gateway import growing_text

    times = iter([0.0, 0.2, 0.5, 1.1, 1.3, 2.5])

    async def pieces():
        for piece in ["Mochi", " is", " asleep", " on", " the", " sofa."]:
            yield piece
        yield Answer("Mochi is asleep on the sofa.")

    async def collect():
        return [item async for item in growing_text(pieces(), 1.0, lambda: next(times))]

    shown = asyncio.run(collect())
    assert [text for text, _ in shown] == [
        "Mochi",  # t=0
        "Mochi is asleep on",  # t=1.1
        "Mochi is asleep on the sofa.",  # t=2.5
        "Mochi is asleep on the sofa.",  # the end, with the Answer
    ]
    assert [final is None for _, final in shown] == [True, True, True, False]
