"""Recognition-only sentences, positions, crop selection and region matching."""

from __future__ import annotations

from engine.answers import (
    ask_sentence,
    caption_sentence,
    description_for,
    rough_position,
    who_sentence,
)
from engine.retriever import match_regions, regions_from_detections
from engine.selection import select_region
from engine.types import Box, Concept, Detection, ExampleHit, Recognition, UnknownObject

W, H = 900, 600


def rec(name: str, box: Box, desc: str = "", cid: str | None = None) -> Recognition:
    return Recognition(cid or name.lower(), name, desc, "cat", 0.9, box, rough_position(box, W, H))


def test_rough_positions() -> None:
    assert rough_position(Box(0, 200, 200, 400), W, H) == "on the left"
    assert rough_position(Box(700, 200, 900, 400), W, H) == "on the right"
    assert rough_position(Box(350, 0, 550, 150), W, H) == "at the top"
    assert rough_position(Box(0, 450, 200, 600), W, H) == "at the bottom left"
    assert rough_position(Box(350, 200, 550, 400), W, H) == "in the middle"
    assert rough_position(Box(0, 0, W, H), W, H) == "in the photo"


def test_description_seen_from_the_asker() -> None:
    assert description_for("my grey cat", "alice", "alice") == "your grey cat"
    assert description_for("My grey cat", "alice", "alice") == "Your grey cat"
    assert description_for("my grey cat", "alice", "bob") == "grey cat"
    assert description_for("Alice's corgi", "alice", "bob") == "Alice's corgi"


def test_who_sentence_names_known_and_mentions_unknown() -> None:
    mochi = rec("Mochi", Box(0, 200, 250, 450), "my grey cat")
    person = UnknownObject("person", Box(700, 100, 900, 600), "on the right")
    text = who_sentence([mochi], [person], {"mochi": "alice"}, "alice")
    assert (
        text == "Mochi (your grey cat) is on the left; I don't recognize the person on the right."
    )


def test_who_sentence_orders_left_to_right_and_handles_nobody() -> None:
    bo = rec("Bo", Box(700, 200, 900, 400))
    mochi = rec("Mochi", Box(0, 200, 200, 400))
    assert who_sentence([bo, mochi], [], {}, None) == "Mochi is on the left and Bo is on the right."
    assert "don't recognize anyone" in who_sentence([], [], {}, None)
    dog = UnknownObject("dog", Box(0, 0, 10, 10), "at the top left")
    assert who_sentence([], [dog], {}, None).endswith("(I see a dog at the top left).")


def test_ask_sentence_answers_about_named_concepts() -> None:
    mochi_c = Concept("mochi", "s", "Mochi", "my grey cat", "cat", "alice", 0.0, 2)
    bo_c = Concept("bo", "s", "Bo", "", "dog", "alice", 0.0, 1)
    mochi = rec("Mochi", Box(0, 200, 200, 400), "my grey cat")
    text = ask_sentence([mochi_c, bo_c], [mochi], [], {"mochi": "alice"}, "bob", has_image=True)
    assert text == "Yes, Mochi (grey cat) is on the left. I don't see Bo in this photo."
    text_only = ask_sentence([mochi_c], [], [], {}, "alice", has_image=False)
    assert text_only == "Mochi is your grey cat (2 photos remembered)."


def test_caption_sentence() -> None:
    mochi = rec("Mochi", Box(0, 200, 200, 400))
    dog = UnknownObject("dog", Box(700, 200, 900, 400), "on the right")
    assert (
        caption_sentence([mochi], [dog], {}, None)
        == "A photo of Mochi on the left and a dog on the right."
    )
    assert caption_sentence([], [], {}, None) == "A photo."


def test_select_region_order_of_preference() -> None:
    cat = Detection(Box(10, 10, 200, 200), "cat", 0.5)
    person = Detection(Box(100, 50, 800, 580), "person", 0.9)
    user = Box(5, 5, 100, 100)
    assert select_region([cat, person], W, H, "cat", user).reason == "user box"
    chosen = select_region([cat, person], W, H, category="cat")
    assert (chosen.box, chosen.reason) == (cat.box, "category")
    salient = select_region([cat, person], W, H, category="")
    assert (salient.box, salient.reason) == (person.box, "salient")
    whole = select_region([], W, H)
    assert (whole.box, whole.reason) == (Box(0, 0, W, H), "whole photo")


def test_regions_drop_duplicates_and_fall_back_to_whole_photo() -> None:
    a = Detection(Box(0, 0, 100, 100), "cat", 0.9)
    a_again = Detection(Box(1, 1, 100, 100), "teddy bear", 0.4)
    b = Detection(Box(300, 300, 400, 400), "dog", 0.8)
    regions = regions_from_detections([a_again, b, a], W, H)
    assert [r.label for r in regions] == ["cat", "dog"]
    assert [r.box for r in regions_from_detections([], W, H)] == [Box(0, 0, W, H)]


def test_match_regions_one_to_one_above_threshold() -> None:
    hits = [
        [ExampleHit("mochi", 1, 0.95), ExampleHit("bo", 2, 0.90)],
        [ExampleHit("mochi", 3, 0.93), ExampleHit("bo", 4, 0.85)],
        [ExampleHit("mochi", 5, 0.50)],
    ]
    matches = match_regions(hits, threshold=0.8)
    assert [(m.region, m.concept_id) for m in matches] == [(0, "mochi"), (1, "bo")]
    assert match_regions(hits, threshold=0.99) == []
