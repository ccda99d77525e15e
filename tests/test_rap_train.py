"""`rapbot train rap`: RAP records → prompt, noise concepts, label masks; LoRA lowers the loss on
tiny LLaVA; a resumed run continues exactly where the checkpoint left off."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from engine.errors import InvalidInputError
from engine.generator.hf import Generator
from engine.generator.tiny import tiny_model_path
from engine.train.rap_data import (
    IGNORE_INDEX,
    RapCollator,
    RapConcept,
    RapDataset,
    choose_concepts,
    drop_over_max_concepts,
    load_records,
    parse_record,
)
from engine.train.rap_train import TrainConfig, find_checkpoint, lora_targets, train
from engine.train.recipes import resolve_options
from rapbot.cli import main
from tests.llava_reference import CONVERSATIONS

VICUNA_V1_SYSTEM = CONVERSATIONS["vicuna_v1"][0]  # RAP-LLaVA's system prompt

PETS = {  # name: (colour, info, a caption of its photo)
    "Mochi": ("grey", "my grey cat", "Mochi is asleep on the sofa."),
    "Bo": ("orange", "Alice's corgi", "Bo runs on the beach."),
    "Kiwi": ("green", "a green parrot", "Kiwi sits on a branch."),
    "Rex": ("brown", "the neighbour's dog", "Rex plays in the park."),
}


def write_rap_data(root: Path) -> Path:
    """A small RAP-format data set: a crop per pet, a photo per pet with a caption record and a
    text-only record, and one two-turn record."""
    (root / "crops").mkdir(parents=True)
    (root / "photos").mkdir()
    records = []
    for i, (name, (colour, info, caption)) in enumerate(PETS.items()):
        crop = Image.new("RGB", (40, 40), "white")
        ImageDraw.Draw(crop).ellipse((6, 6, 34, 34), fill=colour)
        crop.save(root / "crops" / f"{name}.png")
        photo = Image.new("RGB", (64, 48), "lightblue")
        ImageDraw.Draw(photo).ellipse((12, 6, 52, 42), fill=colour)
        photo.save(root / "photos" / f"{i}.png")
        extra = {f"crops/{name}.png": {"name": name, "info": info, "category": "pet"}}
        records.append(
            {
                "id": f"c{i}",
                "image": f"photos/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nGive a caption of the image."},
                    {"from": "gpt", "value": caption},
                ],
                "extra": extra,
                "type": "caption",
            }
        )
        records.append(
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": f"Who is <{name}>?"},
                    {"from": "gpt", "value": f"{name} is {info}."},
                ],
                "extra": extra,
                "type": "text_only",
            }
        )
    records.append(
        {
            "id": "multi",
            "image": ["photos/0.png"],
            "conversations": [
                {"from": "human", "value": "Is <Mochi> here?\n<image>"},
                {"from": "gpt", "value": "Yes."},
                {"from": "human", "value": "What is Mochi doing?"},
                {"from": "gpt", "value": "Sleeping."},
            ],
            "extra": {"crops/Mochi.png": {"name": "Mochi", "info": "my grey cat"}},
            "type": "qa",
        }
    )
    path = root / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return tiny_model_path("tiny-llava", tmp_path_factory.mktemp("tiny-gen"))


@pytest.fixture(scope="module")
def llava_processor(tiny_llava):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava)


@pytest.fixture(scope="module")
def rap_data(tmp_path_factory) -> Path:
    return write_rap_data(tmp_path_factory.mktemp("rap-data"))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU, two threads fighting over two busy cores make
    these tiny forwards ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------- records


def test_parse_record_forms_and_errors() -> None:
    record = parse_record(
        {
            "id": 7,
            "image": ["a.jpg"],
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "extra": {"c.jpg": {"name": " Dior ", "info": "a man", "category": "person"}},
            "type": "basic",
        }
    )
    assert (record.id, record.image, record.type) == ("7", "a.jpg", "basic")
    assert record.conversations == (("user", "q"), ("assistant", "a"))
    assert record.concepts == (RapConcept("c.jpg", "Dior", "a man", "person"),)
    text_only = parse_record(
        {"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    )
    assert text_only.image is None and text_only.concepts == ()
    for bad in (
        {"id": 2, "conversations": [{"from": "gpt", "value": "a"}]},  # no human turn first
        {"id": 3, "conversations": [{"from": "human", "value": "q"}]},  # no answer
        {"id": 4, "image": ["a", "b"], "conversations": []},
        {
            "id": 5,
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "extra": {"c.jpg": {"info": "no name"}},
        },
    ):
        with pytest.raises(InvalidInputError, match=f"RAP record {bad['id']}"):
            parse_record(bad)


def test_load_records_json_and_jsonl(rap_data, tmp_path) -> None:
    records = load_records(rap_data)
    assert len(records) == 9 and records[0].image == "photos/0.png"
    lines = tmp_path / "train.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in json.loads(rap_data.read_text())) + "\n")
    assert load_records(lines) == records
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(InvalidInputError, match="not JSON"):
        load_records(tmp_path / "bad.json")


# ----------------------------------------------------------------------- concept choice


def _record(names: list[str], question: str = "Give a caption of the image.") -> object:
    return parse_record(
        {
            "id": "r",
            "image": "p.jpg",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": "An answer."},
            ],
            "extra": {f"{n}.jpg": {"name": n, "info": ""} for n in names},
        }
    )


POOL = [RapConcept(f"{n}.jpg", n) for n in ("Mochi", "Bo", "Kiwi", "Rex", "Tom", "Ann")]


def test_noise_concepts_fill_up_to_max_and_are_shuffled() -> None:
    record = _record(["Mochi"])
    firsts = set()
    for seed in range(20):
        chosen = choose_concepts(record, POOL, 2, 1, random.Random(seed))
        names = [c.name for c in chosen]
        assert len(names) == 2 and "Mochi" in names  # own concept + 1 noise concept
        assert len(set(names)) == 2  # noise never repeats the record's own name
        firsts.add(names[0])
    assert "Mochi" in firsts and len(firsts) > 1  # shuffled: Mochi is not always first
    # Noise is bounded by the room left under max_concepts, and by --noise-concepts.
    assert len(choose_concepts(record, POOL, 4, 1, random.Random(0))) == 2
    assert len(choose_concepts(record, POOL, 4, 5, random.Random(0))) == 4
    assert [c.name for c in choose_concepts(record, POOL, 2, 0, random.Random(0))] == ["Mochi"]
    # Same generator state, same choice: what makes a resumed epoch reproducible.
    assert choose_concepts(record, POOL, 3, 2, random.Random(5)) == choose_concepts(
        record, POOL, 3, 2, random.Random(5)
    )


def test_max_concepts_keeps_the_concepts_the_conversation_names() -> None:
    record = _record(["Mochi", "Bo", "Kiwi"], question="Where is Kiwi?")
    for seed in range(5):
        chosen = choose_concepts(record, POOL, 2, 1, random.Random(seed))
        names = {c.name for c in chosen}
        assert len(names) == 2 and "Kiwi" in names  # named in the question: always kept
        assert names <= {"Mochi", "Bo", "Kiwi"}  # full already: no room for noise


# ------------------------------------------------------------------- prompt and labels


def test_prompt_from_extra_and_labels_only_on_answers(rap_data, llava_processor) -> None:
    records = load_records(rap_data)
    dataset = RapDataset(records, llava_processor, rap_data.parent, noise_concepts=0)
    tok = llava_processor.tokenizer
    item = dataset[0]  # caption record of Mochi, no noise
    ids, labels = item["input_ids"], item["labels"]
    image_id = tok.convert_tokens_to_ids("<image>")
    # Query image + one concept crop: two images, 16 image tokens each in the tiny LLaVA.
    assert item["pixel_values"].shape[0] == 2 and int((ids == image_id).sum()) == 32
    text = tok.decode(ids).replace("<image>" * 16, "<image>")
    assert text == (
        f"<s>{VICUNA_V1_SYSTEM} USER: <image>\n[1.<image>\n Name: <Mochi>, Info: my grey cat\n]"
        "Give a caption of the image. ASSISTANT: Mochi is asleep on the sofa.</s>"
    )
    # Only the answer (and the </s> that ends it) is trained.
    assert tok.decode(labels[labels != IGNORE_INDEX]) == " Mochi is asleep on the sofa.</s>"
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
    assert labels[: int((labels != IGNORE_INDEX).nonzero()[0])].eq(IGNORE_INDEX).all()

    # Text-only record: no query image and no brackets, the concept crop only.
    item = dataset[1]
    assert item["pixel_values"].shape[0] == 1
    text = tok.decode(item["input_ids"]).replace("<image>" * 16, "<image>")
    assert "USER: 1.<image>\n Name: <Mochi>, Info: my grey cat\nWho is <Mochi>? ASSISTANT:" in text
    assert "[" not in text

    # Two turns: both answers trained, the second question not; the <image> placeholder is
    # moved to the front (RAP's prompt), wherever the record put it.
    item = dataset[8]
    labels = item["labels"]
    text = tok.decode(item["input_ids"]).replace("<image>" * 16, "<image>")
    assert "USER: <image>\n[1.<image>\n Name: <Mochi>, Info: my grey cat\n]Is <Mochi> here?" in text
    assert text.endswith("ASSISTANT: Yes.</s>USER: What is Mochi doing? ASSISTANT: Sleeping.</s>")
    assert tok.decode(labels[labels != IGNORE_INDEX]) == " Yes.</s> Sleeping.</s>"


def test_noise_in_the_dataset_and_per_epoch(rap_data, llava_processor) -> None:
    dataset = RapDataset(load_records(rap_data), llava_processor, rap_data.parent, seed=3)
    names = [c.name for c in dataset.concepts_for(0)]
    assert len(names) == 2 and "Mochi" in names  # max 2, noise 1 (the defaults)
    assert [c.name for c in dataset.concepts_for(0)] == names  # fixed within an epoch
    per_epoch = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        per_epoch.add(tuple(c.name for c in dataset.concepts_for(0)))
    assert len(per_epoch) > 1  # new noise each epoch
    item = dataset[0]
    assert item["pixel_values"].shape[0] == 3  # query + own crop + noise crop


def test_collator_pads_and_concatenates_images(rap_data, llava_processor) -> None:
    dataset = RapDataset(load_records(rap_data), llava_processor, rap_data.parent)
    items = [dataset[0], dataset[1]]
    pad = llava_processor.tokenizer.pad_token_id
    batch = RapCollator(pad)(items)
    longest = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest)
    short = min(range(2), key=lambda i: len(items[i]["input_ids"]))
    n = len(items[short]["input_ids"])
    assert (batch["input_ids"][short, n:] == pad).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all() and batch["attention_mask"][
        short, :n
    ].all()
    assert batch["pixel_values"].shape[0] == sum(i["pixel_values"].shape[0] for i in items)


def test_max_length_cuts_the_answer_never_the_prompt(rap_data, llava_processor) -> None:
    records = load_records(rap_data)
    full = RapDataset(records, llava_processor, rap_data.parent, noise_concepts=0)[0]
    length = len(full["input_ids"])
    cut = RapDataset(
        records, llava_processor, rap_data.parent, noise_concepts=0, max_length=length - 2
    )[0]
    assert len(cut["input_ids"]) == len(cut["labels"]) == length - 2
    with pytest.raises(InvalidInputError, match="prompt alone is longer"):
        RapDataset(records, llava_processor, rap_data.parent, max_length=20)[0]


def test_lora_targets_are_language_model_projections(tiny_llava) -> None:
    generator = Generator.load(tiny_llava, device="cpu")
    targets = lora_targets(generator.model)
    assert targets and all(".language_model." in t for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


def test_qwen2_vl_prompt_labels_and_two_training_steps(rap_data, tmp_path_factory) -> None:
    """The chat-template path of another family: images inside one ChatML user turn, per-token
    mm_token_type_ids padded, image_grid_thw concatenated; LoRA trains on it."""
    base = tiny_model_path("tiny-qwen2-vl", tmp_path_factory.mktemp("tiny-qwen"))
    generator = Generator.load(base, device="cpu")
    dataset = RapDataset(
        load_records(rap_data), generator.processor, rap_data.parent, noise_concepts=0
    )
    tok = generator.tokenizer
    item = dataset[0]
    labels = item["labels"]
    text = tok.decode(item["input_ids"])
    pad = "<|image_pad|>"
    while pad * 2 in text:
        text = text.replace(pad * 2, pad)
    vision = f"<|vision_start|>{pad}<|vision_end|>"
    assert (
        f"<|im_start|>user\n{vision}\n[1.{vision}\n Name: <Mochi>, Info: my grey cat\n]"
        "Give a caption of the image.<|im_end|>\n<|im_start|>assistant\n"
        "Mochi is asleep on the sofa.<|im_end|>\n"
    ) in text
    assert tok.decode(labels[labels != IGNORE_INDEX]) == "Mochi is asleep on the sofa.<|im_end|>\n"
    batch = RapCollator(tok.pad_token_id)([item, dataset[1]])
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert batch["image_grid_thw"].shape == (3, 3)  # query + crop, then the text-only crop
    out = tmp_path_factory.mktemp("qwen-run")
    config = _config(rap_data, base, out, max_steps=2, train_projector=True)
    assert train(config).step == 2 and (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------ training


def _loss(generator: Generator, rap_data: Path) -> float:
    """Mean loss over the whole data set, no noise, no dropout."""
    dataset = RapDataset(
        load_records(rap_data), generator.processor, rap_data.parent, noise_concepts=0
    )
    batch = RapCollator(generator.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    generator.model.eval()
    with torch.no_grad():
        return float(generator.model(**batch).loss)


def _config(rap_data: Path, base: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=rap_data,
        images=rap_data.parent,
        base=str(base),
        out=out,
        lr=1e-2,
        warmup_ratio=0.0,
        batch_size=2,
        progress=False,
        cpu=True,
    )
    return TrainConfig(**{**settings, **overrides})


def test_training_lowers_the_loss_and_saves_a_loadable_adapter(
    rap_data, tiny_llava, tmp_path
) -> None:
    before = _loss(Generator.load(tiny_llava, device="cpu"), rap_data)
    out = tmp_path / "run"
    result = train(_config(rap_data, tiny_llava, out, max_steps=20, save_every=10))
    assert result.step == 20 and len(result.losses) == 20
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 21))
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-10", "checkpoint-20"]

    tuned = Generator.load(tiny_llava, device="cpu", adapter=out)  # the other team's loader
    after = _loss(tuned, rap_data)
    # A random tiny LLaVA starts at ~ln(vocab) ≈ 6.2; 20 LoRA steps reliably take ~0.4 off.
    assert after < before - 0.25, (before, after)


def test_resume_continues_exactly_from_the_checkpoint(rap_data, tiny_llava, tmp_path) -> None:
    # 9 records, batch 2 → 5 batches an epoch: step 3 is mid-epoch, step 6 is in epoch 2.
    straight = train(_config(rap_data, tiny_llava, tmp_path / "a", max_steps=6, save_every=3))
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    assert find_checkpoint(resumed_dir, "latest") == resumed_dir / "checkpoint-3"
    resumed = train(
        _config(rap_data, tiny_llava, resumed_dir, max_steps=6, save_every=3, resume="latest")
    )
    assert resumed.resumed_from == resumed_dir / "checkpoint-3"
    assert resumed.step == 6 and len(resumed.losses) == 3
    # Same data order, noise, dropout and weights: the same losses as the uninterrupted run.
    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-5)
    state = json.loads((resumed_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (6, 1, 1)


def test_cli_train_rap_smoke(rap_data, tiny_llava, tmp_path, capsys) -> None:
    out = tmp_path / "cli-run"
    args = ["--json", "train", "rap", "--data", rap_data, "--base", tiny_llava, "--out", out]
    args += ["--max-steps", "2", "--batch-size", "2", "--no-progress", "--cpu", "--save-every", "1"]
    # Gradient checkpointing and a trainable projector; --bf16 without a GPU falls back to fp32.
    args += ["--gradient-checkpointing", "--train-projector", "--bf16"]
    assert main([str(a) for a in args]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["step"] == 2 and payload["adapter"] == str(out) and payload["loss"] > 0
    saved = safe_open(str(out / "adapter_model.safetensors"), "pt").keys()
    assert any("multi_modal_projector" in k for k in saved)  # the projector is in the adapter
    assert any("lora_A" in k for k in saved) and not any("vision_tower" in k for k in saved)
    # --resume picks up the newest checkpoint; with --max-steps 3 it runs one more step.
    args[args.index("2")] = "3"
    assert main([str(a) for a in [*args, "--resume"]]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # A usage error (missing --base) exits 2; a bad data file is a one-line error, exit 1.
    with pytest.raises(SystemExit) as exit_:
        main(["train", "rap", "--data", str(rap_data), "--out", str(out)])
    assert exit_.value.code == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert (
        main(["train", "rap", "--data", str(bad), "--base", str(tiny_llava), "--out", str(out)])
        == 1
    )
    assert "holds no training records" in capsys.readouterr().err


# ------------------------------------------------------------------------------ recipes


def test_recipes_are_raps_training_scripts() -> None:
    """scripts/train_rap_llava.sh and train_rap_phi3.sh of RAP's repository, value by value;
    anything typed wins; no recipe keeps the small-run defaults."""
    llava = resolve_options("rap-llava", {})
    assert (llava.lora_r, llava.lora_alpha, llava.lora_dropout) == (128, 256, 0.05)
    assert (llava.lr, llava.projector_lr, llava.train_projector) == (1e-4, 2e-5, True)
    assert (llava.warmup_ratio, llava.weight_decay, llava.epochs) == (0.03, 0.0, 1)
    assert (llava.batch_size, llava.grad_accum) == (8, 1)
    assert (llava.bf16, llava.gradient_checkpointing) == (True, True)
    assert (llava.max_concepts, llava.max_length, llava.template) == (2, 2048, "vicuna_v1")
    assert (llava.noise_concepts, llava.drop_over_max_concepts) == (0, True)
    phi3 = resolve_options("rap-phi3", {})
    assert (phi3.max_concepts, phi3.max_length, phi3.template) == (3, 4096, "phi3")
    assert (phi3.lora_r, phi3.lora_alpha, phi3.lr, phi3.projector_lr) == (128, 256, 1e-4, 2e-5)
    typed = resolve_options("rap-llava", {"lora_r": 16, "lr": None, "bf16": None})
    assert (typed.lora_r, typed.lr, typed.bf16) == (16, 1e-4, True)
    small = resolve_options(None, {})
    assert (small.lora_r, small.lora_alpha, small.lr, small.projector_lr) == (8, 16, 2e-4, None)
    assert (small.max_concepts, small.noise_concepts, small.drop_over_max_concepts) == (2, 1, False)
    with pytest.raises(InvalidInputError, match="Unknown recipe"):
        resolve_options("rap-13b", {})


def test_recipe_drops_records_with_more_concepts_than_k() -> None:
    """RAP's prepare_dataset skips a record whose extra has more than K concepts; the small-run
    default keeps such a record with the K concepts its conversation names."""

    def record(rid: str, names: list[str]):
        return parse_record(
            {
                "id": rid,
                "conversations": [
                    {"from": "human", "value": f"Who is <{names[-1]}>?"},
                    {"from": "gpt", "value": "A pet."},
                ],
                "extra": {f"{n}.png": {"name": n} for n in names},
            }
        )

    records = [record("one", ["A"]), record("two", ["A", "B"]), record("three", ["A", "B", "C"])]
    assert [r.id for r in drop_over_max_concepts(records, 2)] == ["one", "two"]
    assert [r.id for r in drop_over_max_concepts(records, 3)] == ["one", "two", "three"]
    assert [r.id for r in drop_over_max_concepts(records, 1)] == ["one"]
    with pytest.raises(InvalidInputError, match="more than 0"):
        drop_over_max_concepts(records, 0)
    # Without the rule: "three" stays, showing C (the name asked about) and one other.
    kept = choose_concepts(records[2], [], 2, 0, random.Random(0))
    assert len(kept) == 2 and "C" in {c.name for c in kept}


def test_cli_train_rap_recipe(rap_data, tiny_llava, tmp_path, capsys) -> None:
    """`--recipe rap-llava` on the tiny LLaVA: the run records the recipe's hyper-parameters,
    the optimizer has the projector at 2e-5 beside LoRA at 1e-4, and typed options win."""
    out = tmp_path / "recipe"
    args = ["--json", "train", "rap", "--recipe", "rap-llava", "--data", rap_data]
    args += ["--base", tiny_llava, "--out", out, "--max-steps", "1", "--batch-size", "2"]
    args += ["--no-progress", "--cpu", "--lora-r", "16"]
    assert main([str(a) for a in args]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    config = json.loads((out / "rap_train.json").read_text())["config"]
    assert (config["lora_r"], config["lora_alpha"], config["lr"]) == (16, 256, 1e-4)
    assert (config["projector_lr"], config["max_concepts"], config["noise_concepts"]) == (
        2e-5,
        2,
        0,
    )
    assert config["drop_over_max_concepts"] and config["train_projector"]
    optimizer = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=False)
    assert [g["initial_lr"] for g in optimizer["param_groups"]] == [1e-4, 2e-5]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (16, 256)
