"""The engine end to end on tiny models and real photos: remember, recognize, ask, manage."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from engine.errors import InvalidInputError, PermissionDeniedError, UnknownConceptError
from engine.permissions import Actor
from engine.types import Box
from tests.conftest import group_photo


def photo(dreambooth, subject: str, index: int = 0) -> bytes:
    return (dreambooth / subject / f"{index:02d}.jpg").read_bytes()


def names(answer) -> list[str]:
    return [c.name for c in answer.concepts]


def test_remember_then_recognize_the_same_photo(tiny_engine, dreambooth) -> None:
    result = tiny_engine.remember("chat", photo(dreambooth, "cat"), "Mochi", "my grey cat", "alice")
    assert result.created and result.concept.examples == 1
    assert result.concept.category == "cat"
    answer = tiny_engine.recognize("chat", photo(dreambooth, "cat"), user="alice")
    assert names(answer) == ["Mochi"]
    assert answer.concepts[0].score > 0.99
    assert answer.concepts[0].box == result.box
    assert "Mochi (your grey cat)" in answer.text
    annotated = Image.open(io.BytesIO(answer.image))
    assert annotated.size == Image.open(io.BytesIO(photo(dreambooth, "cat"))).size


def test_a_different_subject_is_nobody_i_know(tiny_engine, dreambooth) -> None:
    tiny_engine.remember("chat", photo(dreambooth, "cat"), "Mochi", "my grey cat", "alice")
    for subject in ["dog", "backpack", "teapot"]:
        answer = tiny_engine.recognize("chat", photo(dreambooth, subject))
        assert names(answer) == [], subject
        assert "Mochi" not in answer.text


def test_several_example_photos_per_concept(tiny_engine, dreambooth) -> None:
    first = tiny_engine.remember("chat", photo(dreambooth, "dog", 0), "Rex", "my dog", "alice")
    second = tiny_engine.remember("chat", photo(dreambooth, "dog", 1), "rex", "", "bob")
    assert not second.created
    assert second.concept.id == first.concept.id
    assert second.concept.examples == 2
    assert second.concept.owner == "alice"  # adding a photo does not change the owner
    for index in (0, 1):
        assert names(tiny_engine.recognize("chat", photo(dreambooth, "dog", index))) == ["Rex"]
    assert [c.examples for c in tiny_engine.list_concepts("chat")] == [2]


def test_remember_is_idempotent_per_source(tiny_engine, dreambooth) -> None:
    for _ in range(3):
        tiny_engine.remember("chat", photo(dreambooth, "cat"), "Mochi", "", "alice", source="msg-7")
    assert [c.examples for c in tiny_engine.list_concepts("chat")] == [1]


def test_user_box_is_used_as_is(tiny_engine, dreambooth) -> None:
    result = tiny_engine.remember(
        "chat", photo(dreambooth, "cat"), "Mochi", "", "alice", box=Box(10, 20, 210, 220)
    )
    assert result.box == Box(10, 20, 210, 220)
    with pytest.raises(InvalidInputError, match="outside the photo"):
        tiny_engine.remember(
            "chat", photo(dreambooth, "cat"), "Tom", "", "alice", box=Box(90000, 0, 90010, 10)
        )
    assert [c.name for c in tiny_engine.list_concepts("chat")] == ["Mochi"]


def test_scopes_never_see_each_other(tiny_engine, dreambooth) -> None:
    tiny_engine.remember("tg:1", photo(dreambooth, "cat"), "Mochi", "my grey cat", "alice")
    assert names(tiny_engine.recognize("tg:1", photo(dreambooth, "cat"))) == ["Mochi"]
    assert names(tiny_engine.recognize("tg:2", photo(dreambooth, "cat"))) == []
    assert tiny_engine.list_concepts("tg:2") == []
    with pytest.raises(UnknownConceptError):
        tiny_engine.forget("tg:2", "Mochi", Actor("alice", is_admin=True))
    # The same name may mean something else in another chat.
    tiny_engine.remember("tg:2", photo(dreambooth, "dog"), "Mochi", "a dog", "carol")
    assert names(tiny_engine.recognize("tg:2", photo(dreambooth, "cat"))) == []
    assert tiny_engine.list_concepts("tg:1")[0].description == "my grey cat"


def test_owner_or_admin_may_edit_others_may_not(tiny_engine, dreambooth) -> None:
    tiny_engine.remember("chat", photo(dreambooth, "cat"), "Mochi", "my grey cat", "alice")
    bob, admin, alice = Actor("bob"), Actor("bob", is_admin=True), Actor("alice")
    for action in (
        lambda a: tiny_engine.forget("chat", "Mochi", a),
        lambda a: tiny_engine.rename("chat", "Mochi", "Tom", a),
        lambda a: tiny_engine.describe("chat", "Mochi", "not a cat", a),
    ):
        with pytest.raises(PermissionDeniedError, match="Only the person who remembered Mochi"):
            action(bob)
    assert tiny_engine.concept("chat", "mochi").description == "my grey cat"
    assert tiny_engine.rename("chat", "Mochi", "Mochi Senior", admin).name == "Mochi Senior"
    assert (
        tiny_engine.describe("chat", "mochi senior", "the old one", alice).description
        == "the old one"
    )
    tiny_engine.forget("chat", "Mochi Senior", alice)
    assert tiny_engine.list_concepts("chat") == []
    assert names(tiny_engine.recognize("chat", photo(dreambooth, "cat"))) == []


def test_rename_to_a_taken_name_and_unknown_names(tiny_engine, dreambooth) -> None:
    tiny_engine.remember("chat", photo(dreambooth, "cat"), "Mochi", "", "alice")
    tiny_engine.remember("chat", photo(dreambooth, "dog"), "Rex", "", "alice")
    with pytest.raises(InvalidInputError):
        tiny_engine.rename("chat", "Rex", "mochi", Actor("alice"))
    with pytest.raises(UnknownConceptError, match="Did you mean Mochi"):
        tiny_engine.forget("chat", "Mochy", Actor("alice"))


def test_forget_user_everywhere(tiny_engine, dreambooth) -> None:
    tiny_engine.remember("a", photo(dreambooth, "cat"), "Mochi", "", "alice")
    tiny_engine.remember("b", photo(dreambooth, "dog"), "Rex", "", "alice")
    tiny_engine.remember("b", photo(dreambooth, "teapot"), "Pot", "", "bob")
    assert tiny_engine.forget_user("alice") == 2
    assert tiny_engine.list_concepts("a") == []
    assert [c.name for c in tiny_engine.list_concepts("b")] == ["Pot"]


def test_ask_about_a_photo_and_about_a_name(tiny_engine, dreambooth) -> None:
    tiny_engine.remember("chat", photo(dreambooth, "cat"), "Mochi", "my grey cat", "alice")
    tiny_engine.remember("chat", photo(dreambooth, "dog"), "Rex", "", "alice")
    answer = tiny_engine.ask("chat", photo(dreambooth, "cat"), "is Mochi here? and Rex?", "bob")
    assert answer.text.startswith("Yes, Mochi (grey cat) is")
    assert "I don't see Rex in this photo." in answer.text
    text_only = tiny_engine.ask("chat", None, "what is mochi?", "alice")
    assert text_only.text == "Mochi is your grey cat (1 photo remembered)."
    assert names(text_only) == ["Mochi"]
    with pytest.raises(InvalidInputError):
        tiny_engine.ask("chat", None, "   ", "alice")


def test_crop_follows_the_description_with_the_real_detector(coco_engine, dreambooth) -> None:
    group = group_photo([dreambooth / "cat" / "00.jpg", dreambooth / "dog" / "00.jpg"])
    width = Image.open(io.BytesIO(group)).width
    cat = coco_engine.remember("chat", group, "Mochi", "my grey cat", "alice")
    dog = coco_engine.remember("chat", group, "Rex", "Alice's dog", "alice")
    assert cat.concept.category == "cat" and dog.concept.category == "dog"
    assert cat.box.center[0] < width / 2 < dog.box.center[0]
    answer = coco_engine.recognize("chat", group, user="alice")
    assert names(answer) == ["Mochi", "Rex"] or names(answer) == ["Rex", "Mochi"]
    assert answer.text.startswith("Mochi (your grey cat) is on the left and Rex (Alice's dog) is")
    boxes = {c.name: c.box for c in answer.concepts}
    assert boxes == {"Mochi": cat.box, "Rex": dog.box}


def test_most_salient_detection_without_a_category(coco_engine, dreambooth) -> None:
    result = coco_engine.remember("chat", photo(dreambooth, "dog"), "Rex", "", "alice")
    assert result.concept.category == "dog"  # taken from the chosen detection
    whole = Image.open(io.BytesIO(photo(dreambooth, "dog")))
    assert result.box.area < whole.width * whole.height
