"""The bad-input suite: every case gets a clear message and leaves the store unchanged."""

from __future__ import annotations

import pytest

from engine.errors import ImageError, InvalidInputError, PermissionDeniedError, UnknownConceptError
from engine.permissions import Actor
from tests.badfiles import BAD_IMAGES


def snapshot(engine) -> tuple:
    return tuple(engine.list_concepts("chat")), engine.store.count()


@pytest.fixture
def seeded(tiny_engine, dreambooth):
    tiny_engine.remember(
        "chat", (dreambooth / "cat" / "00.jpg").read_bytes(), "Mochi", "my grey cat", "alice"
    )
    return tiny_engine


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_change_nothing(seeded, case) -> None:
    data = BAD_IMAGES[case]()
    before = snapshot(seeded)
    for call in (
        lambda: seeded.remember("chat", data, "Tom", "", "bob"),
        lambda: seeded.remember("chat", data, "Mochi", "", "bob"),  # existing name: add example
        lambda: seeded.recognize("chat", data),
        lambda: seeded.ask("chat", data, "is Mochi here?"),
        lambda: seeded.caption("chat", data),
    ):
        with pytest.raises(ImageError) as info:
            call()
        message = str(info.value)
        assert message and "\n" not in message and "Traceback" not in message
    assert snapshot(seeded) == before


def test_sixty_megabyte_upload_is_refused_by_size(seeded) -> None:
    with pytest.raises(ImageError, match="too large"):
        seeded.recognize("chat", BAD_IMAGES["huge_upload_60mb"]())


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "can't be empty"),
        ("x" * 200, "at most 64"),
        ("<b>Tom</b>", "Names can use"),
        ("Tom_*_", "Names can use"),
        ("[Tom](https://evil)", "Names can use"),
        ("@everyone", "Names can use"),
    ],
)
def test_bad_names_change_nothing(seeded, dreambooth, name, fragment) -> None:
    before = snapshot(seeded)
    with pytest.raises(InvalidInputError, match=fragment.replace("(", r"\(")):
        seeded.remember("chat", (dreambooth / "dog" / "00.jpg").read_bytes(), name, "", "bob")
    with pytest.raises(InvalidInputError):
        seeded.rename("chat", "Mochi", name, Actor("alice"))
    assert snapshot(seeded) == before


def test_unknown_names_and_other_users_concepts(seeded) -> None:
    before = snapshot(seeded)
    with pytest.raises(UnknownConceptError):
        seeded.forget("chat", "Nobody", Actor("alice"))
    with pytest.raises(UnknownConceptError):
        seeded.describe("chat", "Nobody", "x", Actor("alice", is_admin=True))
    with pytest.raises(PermissionDeniedError):
        seeded.forget("chat", "Mochi", Actor("bob"))
    with pytest.raises(InvalidInputError):
        seeded.describe("chat", "Mochi", "y" * 400, Actor("alice"))
    with pytest.raises(InvalidInputError):
        seeded.recognize("", b"")
    assert snapshot(seeded) == before
