"""The CIR benchmarks' official protocols (issue 13.3) on small hand-made sets whose values are
worked out by hand in the comments: which gallery is ranked, whose reference is left out, which
metrics each benchmark reports, and FashionIQ's average over its categories."""

from __future__ import annotations

import json

import pytest
import torch

from engine.cir.train import Triplet, evaluate_files, load_triplets
from engine.errors import InvalidInputError
from engine.eval import cir_protocol
from engine.eval.cir_metrics import rank_gallery


def test_reference_is_left_out_for_cirr_only() -> None:
    # The query equals its reference "r" exactly; the target "t" is second best.
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    names = ["r", "t", "x"]
    query = torch.tensor([[1.0, 0.0]])
    triplet = Triplet("r", "text", "t", ("r", "t", "x"))
    for kind, expected_r1 in (("cirr", 100.0), ("fashioniq", 0.0), ("shoes", 0.0)):
        exclude = ["r"] if cir_protocol.excludes_reference(kind) else None
        rankings = rank_gallery(query, gallery, names, exclude=exclude)
        # CIRR: ranking [t, x] -> R@1 = 1; others keep r first: [r, t, x] -> R@1 = 0, R@10 = 1
        scores = cir_protocol.score(kind, rankings, [Triplet("r", "text", "t", kind=kind)])
        key = "R@1" if "R@1" in scores else "R@10"
        assert scores[key] == (expected_r1 if key == "R@1" else 100.0)
    rankings = rank_gallery(query, gallery, names, exclude=["r"])
    scores = cir_protocol.score("cirr", rankings, [triplet])
    assert scores == {
        "R@1": 100.0,
        "R@5": 100.0,
        "R@10": 100.0,
        "R@50": 100.0,
        "Rsubset@1": 100.0,
        "Rsubset@2": 100.0,
        "Rsubset@3": 100.0,
    }


def test_cirr_recall_and_subset_recall_by_hand() -> None:
    # Two queries over the gallery a..f (reference already removed, as CIRR does).
    rankings = [["a", "b", "t1", "c", "d", "e"], ["t2", "a", "b", "c", "d", "e"]]
    triplets = [
        Triplet("r1", "x", "t1", ("r1", "t1", "c", "e")),  # subset ranking [t1, c, e]: rank 1
        Triplet("r2", "x", "t2", ("r2", "a", "t2")),  # subset ranking [t2, a]: rank 1
    ]
    scores = cir_protocol.score("cirr", rankings, triplets)
    # R@1: only q2 (t2 first) = 50; R@5: t1 at rank 3 and t2 at 1 = 100.
    assert scores["R@1"] == 50.0 and scores["R@5"] == 100.0
    assert scores["Rsubset@1"] == 100.0
    triplets[0] = Triplet("r1", "x", "t1", ("r1", "a", "b", "t1"))  # subset [a, b, t1]: rank 3
    scores = cir_protocol.score("cirr", rankings, triplets)
    # Rsubset@1 = 1/2, @2 = 1/2, @3 = 2/2
    assert (scores["Rsubset@1"], scores["Rsubset@2"], scores["Rsubset@3"]) == (50.0, 50.0, 100.0)


def test_circo_map_with_several_ground_truths_by_hand() -> None:
    # Ground truths {g1, g2, g3}; hits at ranks 1, 3 and 7 of the 50 ranked.
    ranking = ["g1", "n1", "g2", "n2", "n3", "n4", "g3"] + [f"m{i}" for i in range(43)]
    triplet = Triplet("r", "x", "g1", positives=("g1", "g2", "g3"), kind="circo")
    scores = cir_protocol.score("circo", [ranking], [triplet])
    # AP@5 = (1/1 + 2/3) / min(5, 3) = 5/9; AP@10 = (1 + 2/3 + 3/7) / 3 = 44/63
    assert scores["mAP@5"] == pytest.approx(100 * 5 / 9)
    assert scores["mAP@10"] == pytest.approx(100 * 44 / 63)
    assert scores["mAP@25"] == scores["mAP@50"] == pytest.approx(100 * 44 / 63)
    assert scores["R@5"] == 100.0  # the first ground truth (target) at rank 1


def test_fashioniq_and_circo_need_the_whole_split() -> None:
    fiq = [Triplet("c", "is red", "t", kind="fashioniq")]
    circo = [Triplet("r", "x", "t", positives=("t",), kind="circo")]
    for triplets in (fiq, circo):
        with pytest.raises(InvalidInputError, match="--gallery"):
            cir_protocol.check_gallery(triplets[0].kind, None, triplets)
    cir_protocol.check_gallery("cirr", None, [Triplet("r", "x", "t")])  # optional for CIRR
    with pytest.raises(InvalidInputError, match="not in the gallery"):
        cir_protocol.check_gallery("fashioniq", ["c", "u"], fiq)
    cir_protocol.check_gallery("fashioniq", ["c", "t", "u"], fiq)


def test_gallery_from_split_files_folders_and_lists(tmp_path) -> None:
    cirr = tmp_path / "split.rc2.val.json"
    cirr.write_text(json.dumps({"dev-1-0-img0": "./dev/dev-1-0-img0.png", "dev-2": "./dev/b.png"}))
    fiq = tmp_path / "split.dress.val.json"
    fiq.write_text(json.dumps(["B001", "B002", "B001"]))
    shoes = tmp_path / "eval_im_names.txt"
    shoes.write_text("img_womens_clogs_851.jpg\nimg_womens_clogs_512.jpg\n\n")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.png", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert cir_protocol.read_gallery(str(cirr)) == ["dev-1-0-img0", "dev-2"]
    assert cir_protocol.read_gallery(str(fiq)) == ["B001", "B002"]
    assert cir_protocol.read_gallery(str(shoes)) == ["img_womens_clogs_851", "img_womens_clogs_512"]
    assert cir_protocol.read_gallery(str(folder)) == ["a", "b"]
    assert cir_protocol.read_gallery("x, y,z") == ["x", "y", "z"]
    with pytest.raises(InvalidInputError):
        cir_protocol.read_gallery(str(tmp_path / "missing.json"))


class _LookupEncoder:
    """A stand-in with the encoder's interface: an image's embedding is a fixed vector per
    image name (read from the image's one pixel), a query's that of a chosen image."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def eval(self):
        return self

    def encode_targets(self, images):
        return _Out(torch.stack([_vector(im) for im in images]))

    def encode_queries(self, images, texts):
        return _Out(torch.stack([_vector(self.answers[t]) for t in texts]))


class _Out:
    def __init__(self, embeddings):
        self.embeddings = embeddings


_COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (90, 90, 90)}


def _vector(image):
    if isinstance(image, str):
        r, g, b = _COLOURS[image]
    else:
        r, g, b = image.getpixel((0, 0))
    return torch.tensor([r, g, b, 40.0]) / 255


def test_fashioniq_categories_and_their_average(tmp_path) -> None:
    from PIL import Image

    for name, colour in _COLOURS.items():
        Image.new("RGB", (4, 4), colour).save(tmp_path / f"{name}.png")
    # dress: the query looks like "green", the target -> R@10 = 100 (gallery of 4 < 10).
    # shirt: the target "blue" is in the gallery, R@10 = 100 too; toptee: target not in the
    # gallery given -> refused; with the full gallery, R@10 = 100.
    for category, target in (("dress", "green"), ("shirt", "blue")):
        record = {"candidate": "red", "target": target, "captions": [f"is {target}", ""]}
        (tmp_path / f"cap.{category}.val.json").write_text(json.dumps([record]))
    encoder = _LookupEncoder({"is green": "green", "is blue": "grey"})
    sets = [tmp_path / "cap.dress.val.json", tmp_path / "cap.shirt.val.json"]
    results = evaluate_files(encoder, sets, [str(tmp_path)])
    assert set(results) == {"dress", "shirt", "average"}
    assert results["dress"] == {"R@10": 100.0, "R@50": 100.0}
    assert results["average"] == {"R@10": 100.0, "R@50": 100.0}
    with pytest.raises(InvalidInputError, match="--gallery"):
        evaluate_files(encoder, sets)
    # A one-image-too-small gallery: shirt's target missing.
    with pytest.raises(InvalidInputError, match="not in the gallery"):
        evaluate_files(encoder, sets, ["red,green,grey", "red,green,grey"])
    assert load_triplets(sets[0])[0].text == "is green"


def test_fashioniq_average_by_hand() -> None:
    far = [f"n{i}" for i in range(20)]
    # dress: targets at ranks 1 and 21 -> R@10 = 1/2, R@50 = 2/2; shirt: rank 11 -> 0 and 1.
    dress = cir_protocol.score(
        "fashioniq",
        [["t", *far], [*far, "t"]],
        [Triplet("c", "x", "t", kind="fashioniq")] * 2,
    )
    shirt = cir_protocol.score(
        "fashioniq", [[*far[:10], "t", *far[10:]]], [Triplet("c", "x", "t", kind="fashioniq")]
    )
    assert dress == {"R@10": 50.0, "R@50": 100.0} and shirt == {"R@10": 0.0, "R@50": 100.0}
    assert cir_protocol.average_categories({"dress": dress, "shirt": shirt}) == {
        "R@10": 25.0,
        "R@50": 100.0,
    }
    assert cir_protocol.fashioniq_category("captions/cap.toptee.val.json") == "toptee"
