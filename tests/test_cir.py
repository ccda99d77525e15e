"""CIR: metrics on hand-made cases, the CIR-LVLM encoder on the tiny LLaVA, contrastive
training (learnability on synthetic shape/colour triplets, checkpoint + resume) and the CLI."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from engine.cir.lvlm import INSTRUCTIONS, TARGET_PROMPT, CirLvlmEncoder, PromptPool
from engine.cir.train import (
    CirTrainConfig,
    ImageCache,
    Triplet,
    batch_indices,
    evaluate,
    load_triplets,
    train,
    train_step,
)
from engine.eval.cir_metrics import (
    average_precision_at_k,
    map_at_k,
    rank_gallery,
    recall_at_k,
    subset_recall_at_k,
)
from engine.generator.tiny import tiny_model_path

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
}
SHAPES = ("square", "circle", "triangle")


@pytest.fixture(autouse=True)
def one_thread():
    """Two torch threads fighting over two busy shared cores make tiny forwards ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return tiny_model_path("tiny-llava", tmp_path_factory.mktemp("tiny-cir"))


def _encoder(path: Path, **kwargs) -> CirLvlmEncoder:
    torch.manual_seed(0)
    return CirLvlmEncoder.from_pretrained(path, **{"pool_size": 4, "prompt_len": 2, **kwargs})


def _draw(shape: str, colour: str):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (32, 32), "white")
    d = ImageDraw.Draw(im)
    if shape == "square":
        d.rectangle([6, 6, 25, 25], fill=COLORS[colour])
    elif shape == "circle":
        d.ellipse([5, 5, 26, 26], fill=COLORS[colour])
    else:
        d.polygon([(16, 4), (28, 27), (4, 27)], fill=COLORS[colour])
    return im


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """12 images (3 shapes x 4 colours) and 60 triplets: 36 colour and 24 shape changes."""
    root = tmp_path_factory.mktemp("shapes")
    for s in SHAPES:
        for c in COLORS:
            _draw(s, c).save(root / f"{s}-{c}.png")
    triplets = []
    for s in SHAPES:
        for c in COLORS:
            for c2 in COLORS:
                if c2 != c:
                    triplets.append(Triplet(f"{s}-{c}", f"{c2} instead of {c}", f"{s}-{c2}"))
            for s2 in SHAPES:
                if s2 != s:
                    triplets.append(Triplet(f"{s}-{c}", f"a {s2} instead of a {s}", f"{s2}-{c}"))
    random.Random(0).shuffle(triplets)
    return root, triplets[20:], triplets[:20]  # folder, 40 train, 20 held out


# ------------------------------------------------------------------------------- metrics


def test_recall_at_k_hand_case() -> None:
    rankings = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    targets = ["a", "a", "a"]
    # target at rank 1, 3, 2: R@1 = 1/3, R@2 = 2/3, R@3 = 3/3
    r = recall_at_k(rankings, targets, ks=(1, 2, 3))
    assert r == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_subset_recall_excludes_reference_and_non_members() -> None:
    ranking = ["x", "ref", "y", "t", "s1", "s2"]
    # subset {ref, t, s1, s2}: restricted ranking without ref = [t, s1, s2] -> t at rank 1
    r = subset_recall_at_k([ranking], ["t"], ["ref"], [["ref", "t", "s1", "s2"]], ks=(1, 2))
    assert r == {1: 1.0, 2: 1.0}
    ranking2 = ["s1", "ref", "t"]
    # restricted = [s1, t]: t at rank 2 -> R_s@1 = 0, R_s@2 = 1
    assert subset_recall_at_k([ranking2], ["t"], ["ref"], [["ref", "s1", "t"]], ks=(1, 2)) == {
        1: 0.0,
        2: 1.0,
    }


def test_average_precision_and_map_hand_case() -> None:
    # positives {a, c}; ranking a(hit) b c(hit) d: P@1 = 1, P@3 = 2/3
    # AP@5 = (1 + 2/3) / min(5, 2) = 5/6;  AP@2 = (1) / min(2, 2) = 1/2;  AP@1 = 1/1 = 1
    ranking = ["a", "b", "c", "d"]
    assert average_precision_at_k(ranking, {"a", "c"}, 5) == pytest.approx(5 / 6)
    assert average_precision_at_k(ranking, {"a", "c"}, 2) == pytest.approx(1 / 2)
    assert average_precision_at_k(ranking, {"a", "c"}, 1) == pytest.approx(1.0)
    # second query: one positive "d" at rank 4: AP@5 = (1/4) / 1 = 0.25, AP@2 = 0
    m = map_at_k([ranking, ranking], [{"a", "c"}, {"d"}], ks=(2, 5))
    assert m == pytest.approx({2: (0.5 + 0) / 2, 5: (5 / 6 + 0.25) / 2})


def test_rank_gallery_cosine_and_exclusion() -> None:
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    queries = torch.tensor([[1.0, 0.1], [0.0, 2.0]])
    ranks = rank_gallery(queries, gallery, ["x", "y", "z"], exclude=["x", None])
    # q0 ~ x > z > y, x excluded; q1 ~ y > z > x
    assert ranks == [["z", "y"], ["y", "z", "x"]]


# ------------------------------------------------------------------------------- formats


def test_load_cirr_fashioniq_circo(tmp_path) -> None:
    cirr = {
        "reference": "r",
        "target_hard": "t",
        "caption": "make it red",
        "img_set": {"members": ["r", "t", "u"]},
    }
    fiq = {"candidate": "c", "target": "t2", "captions": ["is red.", "has sleeves"]}
    circo = {
        "reference_img_id": 1,
        "target_img_id": 2,
        "relative_caption": "x",
        "gt_img_ids": [2, 3],
    }
    (tmp_path / "a.json").write_text(json.dumps([cirr, fiq]))
    (tmp_path / "b.jsonl").write_text(json.dumps(circo) + "\n")
    a = load_triplets(tmp_path / "a.json")
    assert a[0] == Triplet("r", "make it red", "t", ("r", "t", "u"), kind="cirr")
    assert a[1] == Triplet("c", "is red and has sleeves", "t2", kind="fashioniq")
    assert load_triplets(tmp_path / "b.jsonl")[0].positives == ("2", "3")
    shoes = {
        "ImageName": "img_womens_clogs_851.jpg",
        "ReferenceImageName": "img_womens_clogs_512.jpg",
        "RelativeCaption": "is more textured ",
    }
    (tmp_path / "shoes.json").write_text(json.dumps([shoes]))
    assert load_triplets(tmp_path / "shoes.json")[0] == Triplet(
        "img_womens_clogs_512", "is more textured", "img_womens_clogs_851", kind="shoes"
    )


def test_batch_order_is_a_function_of_step() -> None:
    assert batch_indices(10, 4, 3, 0) == batch_indices(10, 4, 3, 0)
    epoch = [i for s in range(5) for i in batch_indices(10, 2, s, 0)]
    assert sorted(epoch) == list(range(10))  # one epoch = a permutation


# ------------------------------------------------------------------------------- encoder


def test_encoder_shapes_and_normalisation(tiny_llava, shapes) -> None:
    root, train_set, _ = shapes
    images = ImageCache(root)
    enc = _encoder(tiny_llava)
    refs = [images(t.reference) for t in train_set[:3]]
    q = enc.encode_queries(refs, [t.text for t in train_set[:3]])
    t = enc.encode_targets(refs)
    assert q.embeddings.shape == t.embeddings.shape == (3, 64)
    assert torch.allclose(q.embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t.embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert q.prompt_ids.shape == (3,) and q.key_loss.ndim == 0
    # batched == one by one (left padding, the last token is the summary)
    single = enc.encode_queries(refs[1:2], [train_set[1].text]).embeddings
    assert torch.allclose(single[0], q.embeddings[1], atol=1e-4)


def test_prompt_pool_picks_nearest_key() -> None:
    pool = PromptPool(size=3, length=2, hidden=4)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    feats = torch.tensor([[0.1, 0.2, 3.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    prompts, ids, key_loss = pool.select(feats)
    assert ids.tolist() == [2, 0]
    assert torch.equal(prompts, pool.prompts[[2, 0]])
    key_loss.backward()
    assert pool.keys.grad is not None and pool.keys.grad[1].abs().sum() == 0  # unused key


def test_usage_term_keeps_selection_from_collapsing() -> None:
    """Every query nearest to key 0: by similarity alone (inference) all pick prompt 0; while
    training, the usage term spreads them once prompt 0 has taken more than its share, and
    the counts say how often each prompt was used."""
    pool = PromptPool(size=3, length=1, hidden=2, key_dim=2, usage_weight=0.5)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]]))
    feats = torch.tensor([[1.0, 0.05]]).repeat(4, 1)
    pool.eval()
    assert pool.select(feats)[1].tolist() == [0, 0, 0, 0] and pool.usage.sum() == 0
    pool.train()
    chosen = [pool.select(feats[:1])[1].item() for _ in range(12)]
    # sim: key0 ~1.0, key1 ~0.83, key2 ~0.64; a share of 1 costs 0.5 x (1 - 1/3) = 0.33
    assert chosen[0] == 0 and set(chosen) >= {0, 1}
    assert pool.usage.sum() == 12 and pool.usage.tolist() == [chosen.count(i) for i in range(3)]
    assert pool.usage_share().sum().item() == pytest.approx(1.0)


def test_prompt_selection_pools_image_and_text_separately(tiny_llava, shapes) -> None:
    """The selection feature is [mean image-token feature ; mean text-token embedding]: a new
    reference photo moves only the first half, new words only the second."""
    root, train_set, _ = shapes
    images = ImageCache(root)
    enc = _encoder(tiny_llava)
    hidden = enc.pool.prompts.shape[-1]
    assert enc.pool.keys.shape[-1] == 2 * hidden

    def feature(name: str, text: str) -> torch.Tensor:
        batch = enc._batch(enc.query_texts([text]), [images(name)])
        embeds = enc._merged_embeds(batch)
        return enc.selection_features(embeds, batch["input_ids"], batch["attention_mask"])[0]

    a, b = train_set[0].reference, train_set[0].target
    base = feature(a, "red instead of blue")
    other_image = feature(b, "red instead of blue")
    other_text = feature(a, "a circle instead of a square")
    assert torch.allclose(base[hidden:], other_image[hidden:], atol=1e-6)
    assert not torch.allclose(base[:hidden], other_image[:hidden], atol=1e-4)
    assert torch.allclose(base[:hidden], other_text[:hidden], atol=1e-6)
    assert not torch.allclose(base[hidden:], other_text[hidden:], atol=1e-4)


def test_only_lora_and_prompt_pool_train(tiny_llava) -> None:
    enc = _encoder(tiny_llava)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert {"pool.prompts", "pool.keys"} <= set(trainable)
    lora = [n for n in trainable if not n.startswith("pool.")]
    assert lora and all("lora_" in n for n in lora)
    assert all("language_model" in n for n in lora)  # not the vision tower or projector


def test_training_beats_untrained_on_held_out_triplets(tiny_llava, shapes) -> None:
    """Learnability: 120 InfoNCE steps (batch 16) on 40 shape/colour triplets; Recall@1 over
    the 11 non-reference gallery images on 20 held-out triplets goes from ~chance (20%) to far
    above it (~70% when this was written)."""
    root, train_set, held_out = shapes
    images = ImageCache(root)
    enc = _encoder(tiny_llava)
    before = evaluate(enc, held_out, images)["R@1"]
    config = CirTrainConfig(
        data=None, images=root, base="", out=Path("."), lr=2e-3, temperature=0.1
    )
    params = [p for p in enc.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    losses = []
    for step in range(120):
        batch = [train_set[i] for i in batch_indices(len(train_set), 16, step, 0)]
        losses.append(train_step(enc, optimizer, batch, images, config))
    after = evaluate(enc, held_out, images)["R@1"]
    assert sum(losses[-10:]) < sum(losses[:10]) / 2
    assert after >= before + 25, (before, after)


# ------------------------------------------------------------------------------- train/eval


def _write_cirr(root: Path, triplets: list[Triplet]) -> Path:
    records = [
        {"reference": t.reference, "target_hard": t.target, "caption": t.text} for t in triplets
    ]
    path = root / "cirr.json"
    path.write_text(json.dumps(records))
    return path


def test_train_checkpoint_resume_and_cli(tiny_llava, shapes, tmp_path, capsys, monkeypatch) -> None:
    import rapbot.cli.common
    from rapbot.cli import main

    root, train_set, held_out = shapes
    data = _write_cirr(tmp_path, train_set[:8])
    common = dict(data=data, images=root, base=str(tiny_llava), batch_size=4, lr=1e-3)
    common.update(pool_size=4, prompt_len=2, save_every=2, progress=False)
    straight = train(CirTrainConfig(out=tmp_path / "a", steps=4, **common))
    train(CirTrainConfig(out=tmp_path / "b", steps=2, **common))
    resumed = train(CirTrainConfig(out=tmp_path / "b", steps=4, resume="latest", **common))
    assert resumed.step == 4 and len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-4)
    assert resumed.prompt_usage == straight.prompt_usage and sum(straight.prompt_usage) == 16
    assert (tmp_path / "b" / "checkpoint-4" / "trainable.pt").is_file()

    out = tmp_path / "cli"
    code = main(
        [
            "--json",
            "train",
            "cir",
            "--data",
            str(data),
            "--images",
            str(root),
            "--base",
            str(tiny_llava),
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--pool-size",
            "4",
            "--prompt-len",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["step"] == 1 and sum(trained["prompt_usage"]) == 4  # one batch of 4 queries
    test_set = _write_cirr(tmp_path, held_out[:6])
    args = ["eval", "cir", str(test_set), "--images", str(root), "--encoder", str(out)]
    monkeypatch.setattr(rapbot.cli.common, "stderr_is_terminal", lambda: True)
    assert main([*args, "--gallery", str(root)]) == 0  # on a terminal: a bar on stderr
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().err)
    assert test_set.name in shown and "18/18" in shown  # 6 queries + 12 gallery images
    assert main(["--json", *args, "--gallery", str(root)]) == 0  # the whole folder ranked
    captured = capsys.readouterr()
    assert test_set.name not in captured.err  # --json: not our bar (transformers' may load)
    scores = json.loads(captured.out)[test_set.name]
    assert set(scores) == {"R@1", "R@5", "R@10", "R@50"}  # CIRR without img_set: no subsets
    assert 0 <= scores["R@1"] <= scores["R@5"] <= 100


# ------------------------------------------------------------------------------- engine search
# RAPBOT_SEARCH_ENCODER=cir-lvlm: the engine indexes and searches a chat's photos with a
# `rapbot train cir` folder (tiny LLaVA, 2 steps: the point is every line, not quality).

OTHERS = ["dog2", "dog3", "dog5", "dog6", "cat", "cat2", "backpack", "teapot"]


@pytest.fixture(scope="module")
def cir_folder(shapes, tmp_path_factory) -> Path:
    """A trained encoder folder that must load alone: its base VLM is deleted after training."""
    import shutil

    root, train_set, _ = shapes
    work = tmp_path_factory.mktemp("cir-search")
    base = tiny_model_path("tiny-llava", work / "base-elsewhere")
    data = _write_cirr(work, train_set[:8])
    config = CirTrainConfig(
        data=data,
        images=root,
        base=str(base),
        out=work / "encoder",
        steps=2,
        batch_size=4,
        pool_size=4,
        prompt_len=2,
        save_every=2,
        progress=False,
    )
    train(config)
    shutil.rmtree(work / "base-elsewhere")  # the folder alone must do
    return config.out


def _cir_engine(tiny_models, root: Path, **settings):
    from engine.engine import Engine
    from engine.store import open_store

    base_settings, models = tiny_models
    update = {"data_dir": root, "search_encoder": "cir-lvlm", **settings}
    store = open_store(root / "store", models.embedder.model_id, models.embedder.dim)
    return Engine(base_settings.model_copy(update=update), models, store)


def _index_all(engine, scope, paths, user="alice"):
    from engine.permissions import Actor

    engine.set_indexing(scope, True, Actor("admin", is_admin=True))
    return [engine.index_photo(scope, p.read_bytes(), user, str(p)) for p in paths]


def _subjects(dreambooth):
    rex = [dreambooth / "dog" / "00.jpg", dreambooth / "dog" / "01.jpg"]
    return rex, [dreambooth / s / "00.jpg" for s in OTHERS]


def test_trained_folder_is_self_contained(cir_folder, monkeypatch) -> None:
    from engine.cir.train import load_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    meta = json.loads((cir_folder / "cir_config.json").read_text())
    assert meta["base"] == "base" and (cir_folder / "base" / "config.json").is_file()
    assert not Path(meta["base_source"]).exists()  # deleted: loading cannot be using it
    assert meta["instructions"] == INSTRUCTIONS  # the wording it was trained with
    enc = load_encoder(cir_folder)
    assert enc.encode_texts(["a red square"]).embeddings.shape == (1, 64)


class _Recorder:
    """Every (texts, input_ids, attention_mask) the encoder's processor was given."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        real = CirLvlmEncoder._batch

        def batch(encoder, texts, images):
            out = real(encoder, texts, images)
            self.calls.append((list(texts), out["input_ids"], out["attention_mask"]))
            return out

        monkeypatch.setattr(CirLvlmEncoder, "_batch", batch)

    def targets(self) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
        """The calls without a modification text (the QUERY prompt's words are not there)."""
        return [c for c in self.calls if all("Modify this image" not in t for t in c[0])]


def test_targets_carry_the_target_instruction_in_training_and_indexing(
    tiny_models, cir_folder, shapes, dreambooth, tmp_path, monkeypatch
) -> None:
    """Targets are encoded with TARGET_PROMPT (the paper's target-side task prompt): the text
    the processor gets and the token ids that reach the model end in the instruction, and a
    training step, evaluation and the engine's photo indexing render the very same text."""
    from engine.cir.train import embed

    root, train_set, _ = shapes
    images = ImageCache(root)
    recorder = _Recorder(monkeypatch)
    enc = _encoder(cir_folder / "base")
    config = CirTrainConfig(data=None, images=root, base="", out=Path("."))
    optimizer = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-3)
    train_step(enc, optimizer, train_set[:3], images, config)
    training = recorder.targets()
    assert len(training) == 1 and len(recorder.calls) == 2  # the queries, then the targets
    recorder.calls.clear()
    embed(enc, train_set[:2], images, gallery=[train_set[0].target])
    evaluation = recorder.targets()
    recorder.calls.clear()
    engine = _cir_engine(tiny_models, tmp_path, search_model=str(cir_folder))
    try:
        _index_all(engine, "chat", [dreambooth / "dog" / "00.jpg"])
    finally:
        engine.close()
    indexing = recorder.targets()
    assert len(indexing) == 1 and len(recorder.calls) == 1

    rendered = TARGET_PROMPT.format(image=enc.image_text)
    assert rendered.endswith("Describe this image in one word:")
    for texts, _, _ in training + evaluation + indexing:
        assert texts == [rendered] * len(texts)
    instruction = rendered.replace(enc.image_text, "").strip()
    tokenizer = enc.processor.tokenizer
    tail = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    for _, ids, mask in training + indexing:
        for row, real in zip(ids, mask, strict=True):
            assert row[real.bool()][-len(tail) :].tolist() == tail  # the summary token is last


def test_encoder_trained_with_other_wording_is_refused(cir_folder, tmp_path) -> None:
    """A checkpoint records its instructions; one trained under other wording is refused with
    one line before any weight is loaded, instead of indexing with text it never saw."""
    from engine.cir.train import encoder_base
    from engine.errors import MissingWeightError

    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "cir_encoder.pt").write_bytes(b"")
    meta = json.loads((cir_folder / "cir_config.json").read_text())
    meta["instructions"] = {**INSTRUCTIONS, "target": "{image} What is this?"}
    (folder / "cir_config.json").write_text(json.dumps(meta))
    with pytest.raises(MissingWeightError, match="other target instructions"):
        encoder_base(folder)
    del meta["instructions"]  # written before the wording was recorded: today's wording
    (folder / "cir_config.json").write_text(json.dumps(meta))
    assert "instructions" not in encoder_base(folder)[0]


def test_engine_cir_search_reference_text_and_concepts(
    tiny_models, cir_folder, dreambooth, tmp_path
) -> None:
    from PIL import Image

    from engine.types import Box

    engine = _cir_engine(tiny_models, tmp_path, search_model=str(cir_folder))
    try:
        assert engine.photos.model_id.startswith("cir-lvlm:") and engine.photos.dim == 64
        rex, others = _subjects(dreambooth)
        paths = rex + others
        ids = _index_all(engine, "chat", paths)
        assert len(set(ids)) == len(paths)
        sources = {str(p) for p in paths}
        rex_s = {str(p) for p in rex}
        ref = others[2].read_bytes()

        def check(hits, n):
            assert len(hits) == n and all(h.source in sources for h in hits)
            assert all(h.photo_id in ids and isinstance(h.score, float) for h in hits)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            return hits

        composed = check(engine.search("chat", "but at the beach", ref, k=5), 5)
        text_only = check(engine.search("chat", "a dog on the sofa", k=5), 5)
        assert [h.score for h in composed] != [h.score for h in text_only]
        same = check(engine.search("chat", "", ref, k=1), 1)[0]  # target vs target
        assert same.source == str(others[2]) and same.score == pytest.approx(1.0, abs=1e-4)
        # The encoder's query differs from the reference's own target embedding.
        assert composed[0].score < 1.0 - 1e-3

        for path in rex:  # remembered from the whole photo: the crops are the indexed photos
            width, height = Image.open(path).size
            engine.remember(
                "chat", path.read_bytes(), "Rex", user="alice", box=Box(0, 0, width, height)
            )
        named = check(engine.search("chat", "Rex", k=len(paths)), len(paths))
        assert {h.source for h in named[:2]} == {str(p) for p in rex}
        assert named[0].score > 0.99  # the mean of two near-identical targets
        # As on the CLIP path: the concept-aware query ranks Rex's photos first, and the same
        # words without the name do not. Its parts are Rex's look (the mean TARGET embedding
        # of his crops: here the indexed photos) and the encoder's QUERY embeddings of the
        # crops with "the dog on the sofa"; late fusion needs both to match, so the look
        # carries the name even where the 2-step tiny encoder's query alone is a coin toss.
        on_sofa = check(engine.search("chat", "Rex on the sofa", k=len(paths)), len(paths))
        assert {h.source for h in on_sofa[:2]} == {str(p) for p in rex}
        plain = check(engine.search("chat", "a dog on the sofa", k=len(paths)), len(paths))
        assert {h.source for h in plain[:2]} != {str(p) for p in rex}
        assert min(h.score for h in on_sofa[:2]) > max(h.score for h in plain if h.source in rex_s)
        check(engine.search("chat", "with Rex", ref, k=3), 3)
        # In another chat "Rex" is only a word: the text-only embedding.
        _index_all(engine, "other", paths)
        elsewhere = engine.search("other", "Rex", k=len(paths))
        assert [h.score for h in elsewhere] != [h.score for h in named]
    finally:
        engine.close()


def test_cir_query_table(tiny_models, cir_folder, dreambooth) -> None:
    """The query for each kind of input is the one the module doc promises."""
    import numpy as np
    from PIL import Image

    from engine.cir.search import cir_query, load_search_encoder
    from engine.composition import replace_names
    from engine.types import Concept

    settings = tiny_models[0].model_copy(
        update={"search_encoder": "cir-lvlm", "search_model": str(cir_folder)}
    )
    enc = load_search_encoder(settings)
    assert load_search_encoder(settings) is enc  # loaded once
    rex = Concept("c1", "s", "Rex", "", "dog", "alice", 0.0)
    assert replace_names("rex on the sofa", [rex], "the") == ("the dog on the sofa", True)
    assert replace_names("Rex!", [rex], "the") == ("the dog!", False)
    photo = Image.open(dreambooth / "cat" / "00.jpg").convert("RGB")
    crops = [Image.open(dreambooth / "dog" / f"0{i}.jpg").convert("RGB") for i in range(2)]

    def unit(v):
        return v / np.linalg.norm(v)

    q = enc.embed_queries([photo], ["at night"])[0]

    def parts(*rows):
        return np.stack(rows)

    assert np.allclose(cir_query(enc, "at night", photo), parts(unit(q)), atol=1e-5)
    target = enc.embed_targets([photo])[0]
    assert np.allclose(cir_query(enc, "", photo), parts(target), atol=1e-5)
    text = enc.embed_texts(["a cat"])[0]
    assert np.allclose(cir_query(enc, "a cat", None), parts(text), atol=1e-5)
    looks = unit(enc.embed_targets(crops).mean(0))
    assert np.allclose(cir_query(enc, "Rex", None, [(rex, crops)]), parts(looks), atol=1e-5)
    on_sofa = unit(enc.embed_queries(crops, ["the dog on the sofa"] * 2).mean(0))
    found = cir_query(enc, "Rex on the sofa", None, [(rex, crops)])
    assert np.allclose(found, parts(looks, on_sofa), atol=1e-5)
    with_dog = unit(enc.embed_queries([photo], ["with the dog"])[0])
    found = cir_query(enc, "with Rex", photo, [(rex, crops)])
    assert np.allclose(found, parts(with_dog, looks), atol=1e-5)


def test_switching_encoders_never_mixes_indexes(
    tiny_models, cir_folder, dreambooth, tmp_path
) -> None:
    from engine.errors import StoreError

    rex, others = _subjects(dreambooth)
    clip = _cir_engine(tiny_models, tmp_path, search_encoder="clip")
    _index_all(clip, "chat", rex + others[:2], user="alice")
    _index_all(clip, "chat", others[2:4], user="bob")
    clip_id = clip.photos.model_id
    assert not clip_id.startswith("cir-lvlm:")
    clip.close()

    cir = _cir_engine(tiny_models, tmp_path, search_model=str(cir_folder))
    try:
        assert cir.photos.model_id != clip_id
        with pytest.raises(StoreError, match="re-index"):
            cir.search("chat", "a dog")
        with pytest.raises(StoreError, match="re-index"):
            cir.index_photo("chat", rex[0].read_bytes(), "alice", "new")
        # Flags and deletions still work on the other encoder's index (forget_user must).
        assert cir.indexing("chat") and cir.photos.count("chat") == 6
        cir.forget_user("alice")
        assert cir.photos.count("chat") == 2
        assert cir.reindex_photos() == 2  # the thumbnails, with the CIR-LVLM encoder
        hits = cir.search("chat", "", others[2].read_bytes(), k=2)
        assert {h.source for h in hits} == {str(p) for p in others[2:4]}
        assert hits[0].source == str(others[2])  # from its thumbnail: close, not identical
        # Now the index matches the encoder: a rebuild would only degrade it again.
        assert cir.photos.mismatch is None and cir.reindex_photos() == 0
        assert cir.reindex_photos(force=True) == 2
        assert cir.search("chat", "", others[2].read_bytes(), k=1)[0].source == str(others[2])
    finally:
        cir.close()
    back = _cir_engine(tiny_models, tmp_path, search_encoder="clip")
    try:
        with pytest.raises(StoreError, match="re-index"):
            back.search("chat", "a dog")
    finally:
        back.close()


def test_missing_search_model_is_one_clear_line(tiny_models, tmp_path) -> None:
    from engine.errors import MissingWeightError

    for folder, words in (("", "RAPBOT_SEARCH_MODEL"), (str(tmp_path / "nope"), "not found")):
        engine = _cir_engine(tiny_models, tmp_path, search_model=folder)
        try:
            with pytest.raises(MissingWeightError, match=words) as error:
                engine.search("chat", "a dog")
            assert "\n" not in str(error.value)
        finally:
            engine.close()
    (tmp_path / "empty").mkdir()
    engine = _cir_engine(tiny_models, tmp_path, search_model=str(tmp_path / "empty"))
    try:
        assert not engine.indexing("chat")  # flags need no encoder (see the test below)
        with pytest.raises(MissingWeightError, match="cir_config.json is missing"):
            engine.search("chat", "a dog")
    finally:
        engine.close()


def test_flags_and_deletions_work_without_the_encoder(
    tiny_models, cir_folder, dreambooth, tmp_path
) -> None:
    """/forget_me and /index off must not depend on the search encoder: with
    RAPBOT_SEARCH_MODEL empty, missing or not a trained folder, the photo index is opened with
    the identity it recorded, its flags and deletions work, and adds, searches and re-indexing
    are refused with the encoder's one-line error (the recorded identity untouched)."""
    import numpy as np

    from engine.errors import MissingWeightError
    from engine.permissions import Actor

    rex, others = _subjects(dreambooth)
    good = _cir_engine(tiny_models, tmp_path, search_model=str(cir_folder))
    try:
        _index_all(good, "A", rex, user="alice")
        _index_all(good, "A", others[:1], user="bob")
        _index_all(good, "B", others[1:4], user="alice")
        _index_all(good, "C", others[4:5], user="carol")
        recorded = (good.photos.model_id, good.photos.dim)
    finally:
        good.close()
    (tmp_path / "empty").mkdir()
    admin = Actor("admin", is_admin=True)
    broken = ("", str(tmp_path / "nope"), str(tmp_path / "empty"))
    for step, folder in enumerate(broken):
        engine = _cir_engine(tiny_models, tmp_path, search_model=folder)
        try:
            assert engine.indexing("A") and engine.indexing("B")
            assert (engine.photos.model_id, engine.photos.dim) == recorded
            vector = np.eye(recorded[1], dtype=np.float32)[0]
            with pytest.raises(MissingWeightError) as error:
                engine.photos.add("A", vector, b"jpg", "bob", None, "x")
            assert "\n" not in str(error.value)
            with pytest.raises(MissingWeightError):
                engine.photos.search("A", vector, 1)
            with pytest.raises(MissingWeightError):
                engine.reindex_photos(force=True)
            with pytest.raises(MissingWeightError):
                engine.index_photo("A", rex[0].read_bytes(), "bob", "new")
            if step == 0:  # /forget_me: alice's photos go in every chat, bob's stay
                engine.forget_user("alice")
                assert [engine.photos.count(s) for s in "ABC"] == [1, 0, 1]
            elif step == 1:  # /index off with deletion
                assert engine.set_indexing("C", False, admin, delete=True) == 1
                assert not engine.indexing("C") and engine.photos.count("C") == 0
            else:
                assert engine.photos.delete_user("bob") == 1 and engine.photos.count("A") == 0
        finally:
            engine.close()
    good = _cir_engine(tiny_models, tmp_path, search_model=str(cir_folder))
    try:  # the working encoder finds its index as it left it, less what was deleted
        assert (good.photos.model_id, good.photos.dim) == recorded
        assert good.photos.mismatch is None and good.photos.total() == 0
        assert good.indexing("A") and not good.indexing("C")
    finally:
        good.close()
    # A data folder that has no photo index yet: flags work, and no identity is recorded.
    fresh = _cir_engine(tiny_models, tmp_path / "fresh", search_model="")
    try:
        fresh.set_indexing("A", True, admin)
        assert fresh.indexing("A") and fresh.forget_user("alice") == 0
    finally:
        fresh.close()
    clip = _cir_engine(tiny_models, tmp_path / "fresh", search_encoder="clip")
    try:
        assert clip.photos.mismatch is None and clip.indexing("A")
    finally:
        clip.close()


def test_worker_loads_the_search_encoder_before_it_is_ready(
    tiny_models, cir_folder, tmp_path, monkeypatch
) -> None:
    """A gpu worker's engine loads the CIR-LVLM encoder in load_engine (before the worker says
    it is ready), not in its first task, under the task time limits."""
    import engine.cir.search
    import engine.models
    from engine.cir.search import CirSearchEncoder
    from workers import runtime

    loads = []
    load = engine.cir.search.load_search_encoder

    def counted(settings):
        loads.append(settings.search_model)
        return load(settings)

    monkeypatch.setattr(engine.cir.search, "load_search_encoder", counted)
    monkeypatch.setattr(engine.models, "load_models", lambda settings: tiny_models[1])
    monkeypatch.chdir(tmp_path)  # no .env
    for key, value in {
        "PROFILE": "tiny",
        "DATA_DIR": str(tmp_path / "data"),
        "SEARCH_ENCODER": "cir-lvlm",
        "SEARCH_MODEL": str(cir_folder),
    }.items():
        monkeypatch.setenv(f"RAPBOT_{key}", value)
    runtime.reset()
    try:
        loaded = runtime.load_engine(with_models=True)
        assert loads == [str(cir_folder)]
        assert isinstance(loaded._cir, CirSearchEncoder)  # no task has run
        assert runtime.engine() is loaded and loaded.search_encoder is loaded._cir
        assert loads == [str(cir_folder)]
        loaded.close()
        runtime.reset()
        store_only = runtime.load_engine(with_models=False)  # the cpu queue loads no model
        assert store_only._cir is None and loads == [str(cir_folder)]
        store_only.close()
    finally:
        runtime.reset()


def test_concurrent_cir_searches_agree(tiny_models, cir_folder, dreambooth, tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    engine = _cir_engine(tiny_models, tmp_path, search_model=str(cir_folder))
    try:
        rex, others = _subjects(dreambooth)
        _index_all(engine, "chat", rex + others)
        ref = others[0].read_bytes()
        queries = [("a dog", None), ("at the beach", ref), ("", ref)] * 3
        alone = [engine.search("chat", t, r, k=3) for t, r in queries]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda q: engine.search("chat", q[0], q[1], k=3), queries))
        assert [[h.photo_id for h in hits] for hits in together] == [
            [h.photo_id for h in hits] for hits in alone
        ]
    finally:
        engine.close()


def test_both_search_encoders_find_names_with_one_function(
    tiny_models, cir_folder, dreambooth, tmp_path, monkeypatch
) -> None:
    """The CLIP composition, the CIR-LVLM query and the retriever's questions find a scope's
    concept names in a text with the same function (engine.retriever.named_concepts)."""
    from PIL import Image

    import engine.engine as engine_module
    from engine.retriever import named_concepts
    from engine.types import Box

    calls = []

    def recorded(store, scope, text):
        found = named_concepts(store, scope, text)
        calls.append((scope, text, [c.name for c in found]))
        return found

    monkeypatch.setattr(engine_module, "named_concepts", recorded)
    rex, others = _subjects(dreambooth)
    for encoder in ("clip", "cir-lvlm"):
        engine = _cir_engine(
            tiny_models, tmp_path / encoder, search_encoder=encoder, search_model=str(cir_folder)
        )
        try:
            for name, path in (("Rex", rex[0]), ("Rex Jr", others[0])):
                width, height = Image.open(path).size
                engine.remember(
                    "chat", path.read_bytes(), name, user="alice", box=Box(0, 0, width, height)
                )
            assert engine.search("chat", "REX JR and rex on the sofa") == []  # nothing indexed
            named = engine.retriever.named_in("chat", "REX JR and rex on the sofa")
            assert [c.name for c in named] == ["Rex Jr", "Rex"]
            assert named == named_concepts(engine.store, "chat", "REX JR and rex on the sofa")
            assert named_concepts(engine.store, "other", "Rex") == []  # a scope's names only
        finally:
            engine.close()
    assert calls == [("chat", "REX JR and rex on the sofa", ["Rex Jr", "Rex"])] * 2
