"""Pictures people look at: the /concepts contact sheet, labels in any script, unknown boxes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.contact_sheet import (
    GAP,
    HEADER,
    PAGE_SIZE,
    TILE,
    SheetTile,
    check_page,
    owner_initials,
    page_count,
    render_contact_sheet,
)
from engine.engine import Engine
from engine.errors import InvalidInputError
from engine.fonts import font_chain
from engine.render import UNKNOWN_COLOUR, annotate
from engine.types import Box, Recognition, UnknownObject


def _jpeg(colour: str, size: tuple[int, int] = (120, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)


def test_installed_fonts_draw_cjk_cyrillic_and_arabic_names():
    # .ci/run installs fonts-noto-cjk; without a CJK font names would be drawn as boxes.
    missing = font_chain(16).missing("Mochi 小猫 ミミ 고양이 Кот قطة Γάτα")
    assert missing == "", f"no installed font draws {missing!r}: apt-get install fonts-noto-cjk"


def test_cjk_labels_are_glyphs_not_boxes():
    photo = Image.new("RGB", (400, 300), "white")

    def label(name: str) -> np.ndarray:
        rec = Recognition("c1", name, "", "pet", 0.91, Box(40, 120, 300, 280))
        return np.asarray(annotate(photo, [rec]))[60:120, 40:300].astype(int)

    # Missing glyphs all render as the same empty box, so different names would look alike.
    cat, dog = label("小猫"), label("大狗")
    assert np.abs(cat - dog).sum() > 0
    # ... and a drawn name is not one box per character: at least as much ink as the Latin one.
    assert (label("小猫") < 128).sum() > 0


def test_unknown_detections_are_readable_boxes_with_their_class():
    photo = Image.new("RGB", (400, 300), "black")
    box = Box(100, 120, 300, 280)
    out = np.asarray(annotate(photo, [], [UnknownObject("dog", box, "in the middle")]))
    grey = tuple(int(UNKNOWN_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    # A white halo outside a dark grey line at least 2 px wide: visible on dark photos too.
    assert tuple(out[200, box.x1]) == (255, 255, 255)
    assert tuple(out[200, box.x1 + 1]) == grey and tuple(out[200, box.x1 + 2]) == grey
    # The detector's class is written above the box ("dog?").
    above = out[box.y1 - 25 : box.y1, box.x1 : box.x1 + 60]
    assert (above == grey).all(axis=2).sum() > 50
    assert (above.min(axis=2) > 200).sum() > 10  # white text on the grey tag


def test_owner_initials():
    assert owner_initials("web:Ada Lovelace") == "AL"
    assert owner_initials("web:mochi_fan") == "MF"
    assert owner_initials("local") == "LO"
    assert owner_initials("tg:123456") == "#456"
    assert owner_initials("dc:") == "?"


def test_pages_of_24_and_clear_errors_for_missing_pages():
    assert PAGE_SIZE == 24
    assert [page_count(n) for n in (0, 1, 24, 25, 120)] == [1, 1, 1, 2, 5]
    assert check_page(2, 25) == 2
    with pytest.raises(InvalidInputError, match=r"are 2 pages.*/concepts 1 to /concepts 2"):
        check_page(3, 25)
    with pytest.raises(InvalidInputError, match="only 1 page"):
        check_page(0, 3)


def test_sheet_shows_each_crop_name_and_page():
    tiles = [SheetTile(f"Pet {i}", "web:ada", _jpeg(c)) for i, c in enumerate(["red", "blue"])]
    tiles.append(SheetTile("ミミ", "tg:42", None))  # no crop: a plain tile, still named
    sheet = _pixels(render_contact_sheet(tiles, page=2, pages=5))
    assert sheet.shape == (HEADER + TILE + 30 + GAP, GAP + 3 * (TILE + GAP), 3)
    red = sheet[HEADER + TILE // 2, GAP + 10]
    blue = sheet[HEADER + TILE // 2, 2 * GAP + TILE + 10]
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]
    # The header and each name are drawn (dark ink in their bands).
    assert (sheet[:HEADER, :400] < 100).all(axis=2).sum() > 100
    for column in range(3):
        x = GAP + column * (TILE + GAP)
        caption = sheet[HEADER + TILE + 2 : HEADER + TILE + 30, x : x + TILE]
        assert (caption < 100).all(axis=2).sum() > 20


def test_sheet_header_names_the_page_only_when_paged():
    tiles = [SheetTile("Mochi", "local", _jpeg("red"))] * 6
    one = _pixels(render_contact_sheet(tiles, 1, 1))[:HEADER]
    paged = _pixels(render_contact_sheet(tiles, 1, 3))[:HEADER]
    assert np.abs(one - paged).sum() > 0
    # One tile: the sheet widens so that "page 1/3" is never cut off.
    narrow = _pixels(render_contact_sheet(tiles[:1], 1, 3))
    assert narrow.shape[1] > GAP + TILE + GAP
    assert (narrow[:HEADER, -GAP - 30 : -GAP] < 100).all(axis=2).sum() > 10


def test_engine_sheet_runs_on_the_store_alone(tiny_engine, dreambooth):
    for name, subject in [("Mochi", "cat"), ("Rex", "dog"), ("小猫", "cat2")]:
        tiny_engine.remember(
            "web:me", (dreambooth / subject / "00.jpg").read_bytes(), name, user="web:Ada"
        )
    tiny_engine.remember("web:other", (dreambooth / "dog2" / "00.jpg").read_bytes(), "Other")
    store_only = Engine(tiny_engine.settings, None, tiny_engine.store)
    sheet = store_only.concept_sheet("web:me")
    assert store_only._models is None  # listing needs no models
    assert [c.name for c in sheet.concepts] == ["Mochi", "Rex", "小猫"]
    assert (sheet.page, sheet.pages, sheet.total) == (1, 1, 3)
    pixels = _pixels(sheet.image)
    assert pixels.shape[1] == GAP + 3 * (TILE + GAP)
    # Each tile shows its concept's stored crop, not a blank.
    for column in range(3):
        x = GAP + column * (TILE + GAP)
        assert pixels[HEADER : HEADER + TILE, x : x + TILE].std() > 10
    crops = store_only.example_crops("web:me", "mochi")
    assert len(crops) == 1 and Image.open(io.BytesIO(crops[0])).format == "JPEG"
    with pytest.raises(InvalidInputError, match="only 1 page"):
        store_only.concept_sheet("web:me", 2)
    empty = store_only.concept_sheet("web:nobody")
    assert (empty.image, empty.total, empty.pages) == (None, 0, 1)


def test_concepts_command_answers_with_the_sheet_and_pages(tiny_engine, dreambooth):
    import asyncio

    from bots.core.gateway import LocalGateway
    from bots.core.request import ChatRequest, CollectingPort, Sender
    from bots.core.serve import CommandCore

    cat = (dreambooth / "cat" / "00.jpg").read_bytes()
    core = CommandCore(LocalGateway(tiny_engine))

    async def say(text: str, image: bytes | None = None):
        photos = (image,) if image is not None else ()
        request = ChatRequest("web:me", Sender("web:me"), text, photos, is_admin=True)
        return await core.serve(request, CollectingPort())

    async def run():
        empty = await say("/concepts")
        assert empty.image is None and "don't remember anyone" in empty.text
        await say("/remember Mochi | my grey cat", cat)
        reply = await say("/concepts")
        assert not reply.error and reply.image_name == "concepts.jpg"
        assert Image.open(io.BytesIO(reply.image)).size[0] > TILE
        assert reply.text.startswith("I remember 1 in this chat:") and "Mochi" in reply.text
        missing = await say("/concepts 2")
        assert missing.error and "only 1 page" in missing.text
        bad = await say("/concepts two")
        assert bad.error and bad.text.startswith("Usage: /concepts [PAGE]")

    asyncio.run(run())


def test_sheet_and_crops_cross_the_wire_unchanged():
    from engine.operations import OPERATIONS
    from engine.types import Concept, ConceptSheet
    from workers import wire

    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        blobs[f"k{len(blobs)}"] = data
        return f"k{len(blobs) - 1}"

    concept = Concept("c1", "tg:1", "ミミ", "cat", "pet", "tg:5", 1.0, 2)
    sheet = ConceptSheet([concept], 2, 3, 49, b"jpeg")
    for name, value in (("concept_sheet", sheet), ("example_crops", [b"\xff\xd8a", b"b"])):
        declared = OPERATIONS[name]
        sent = wire.result_to_json(declared, value, put)
        assert wire.result_from_json(declared, sent, blobs.pop) == value
    assert blobs == {}  # every picture went by reference and was taken back
