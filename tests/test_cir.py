"""CIR: metrics on hand-made cases, the CIR-LVLM encoder on the tiny LLaVA, contrastive
training (learnability on synthetic shape/colour triplets, checkpoint + resume) and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from engine.cir.lvlm import CirLvlmEncoder, PromptPool
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
    assert a[0] == Triplet("r", "make it red", "t", ("r", "t", "u"))
    assert a[1] == Triplet("c", "is red and has sleeves", "t2")
    assert load_triplets(tmp_path / "b.jsonl")[0].positives == ("2", "3")


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


def test_train_checkpoint_resume_and_cli(tiny_llava, shapes, tmp_path, capsys) -> None:
    from bots.cli import main

    root, train_set, held_out = shapes
    data = _write_cirr(tmp_path, train_set[:8])
    common = dict(data=data, images=root, base=str(tiny_llava), batch_size=4, lr=1e-3)
    common.update(pool_size=4, prompt_len=2, save_every=2, progress=False)
    straight = train(CirTrainConfig(out=tmp_path / "a", steps=4, **common))
    train(CirTrainConfig(out=tmp_path / "b", steps=2, **common))
    resumed = train(CirTrainConfig(out=tmp_path / "b", steps=4, resume="latest", **common))
    assert resumed.step == 4 and len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-4)
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
    assert json.loads(capsys.readouterr().out)["step"] == 1
    test_set = _write_cirr(tmp_path, held_out[:6])
    code = main(
        ["--json", "eval", "cir", str(test_set), "--images", str(root), "--encoder", str(out)]
    )
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"R@1", "R@5", "R@10", "R@50", "mAP@5"} <= set(scores)
    assert 0 <= scores["R@1"] <= scores["R@5"] <= 100
