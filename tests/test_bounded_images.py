"""Issue 11, parts 6 and 8: every image is decoded by engine.images, with bounded work.

Strips of extreme aspect are refused from their header, crops are kept within the aspect
limit, and a crafted crop (stored from an archive) never reaches the generator unchecked.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import ImageError
from engine.images import MAX_ASPECT, crop, decode_image, encode_jpeg, save_image
from engine.store.faiss_store import FaissConceptStore
from engine.types import Box
from tests.badfiles import png_chunk, raw_png

REPO = Path(__file__).resolve().parent.parent


def _strip_png(width: int, height: int) -> bytes:
    """A grey strip, compressed to a few hundred bytes however long it is."""
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(100_000, 1), (60_000, 1), (1, 49_000_000), (2001, 100)])
def test_extreme_aspect_ratios_are_refused_from_the_header(size: tuple[int, int]) -> None:
    data = _strip_png(*size)
    with pytest.raises(ImageError, match="too long and thin"):
        decode_image(data)


def test_panoramas_within_the_limit_decode() -> None:
    assert decode_image(_strip_png(2000, 100)).size == (2000, 100)
    assert decode_image(_strip_png(100, 2000)).size == (100, 2000)


@pytest.mark.parametrize(
    "box", [Box(0, 0, 4000, 1), Box(10, 10, 11, 3000), Box(0, 2999, 4000, 3000), Box(5, 5, 6, 6)]
)
def test_crops_stay_within_the_aspect_limit(box: Box) -> None:
    image = Image.new("RGB", (4000, 3000))
    width, height = crop(image, box).size
    assert max(width, height) <= MAX_ASPECT * min(width, height)
    # The crop still holds the box: it was widened, never cut.
    assert width >= min(box.width, 4000) and height >= min(box.height, 3000)


def _png_declaring(width: int, height: int) -> bytes:
    """A 65535² header with almost no data: the crafted crop of the issue (under 1 KB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def _cat(store, name: str, crop: bytes, box: Box, embedding: list[int]):
    """A cat concept of chat tg:1 with this one crop."""
    vector = np.array(embedding, np.float32)
    return store.add_concept(
        "tg:1",
        name=name,
        description="",
        category="cat",
        owner="u1",
        embedding=vector,
        crop_jpeg=crop,
        box=box,
    )


def test_crafted_crop_does_not_reach_the_generator(tmp_path: Path) -> None:
    """A stored crop declaring 65535×65535 pixels: the concept is shown without its image
    (before: Image.open raised DecompressionBombError, an internal error on /ask)."""
    from engine.generator.rap import example_image

    with FaissConceptStore(tmp_path, "m", 4) as store:
        bomb = _png_declaring(65535, 65535)
        assert len(bomb) < 1000
        mochi = _cat(store, "Mochi", bomb, Box(0, 0, 10, 10), [1, 0, 0, 0])
        assert example_image(store, "tg:1", mochi.id) is None
        good = encode_jpeg(Image.new("RGB", (30, 20), (200, 10, 10)))
        store.add_example(
            "tg:1",
            mochi.id,
            embedding=np.array([0, 1, 0, 0], np.float32),
            crop_jpeg=good,
            box=Box(0, 0, 30, 20),
        )
        other = _cat(store, "Bean", good, Box(0, 0, 30, 20), [0, 0, 1, 0])
        assert example_image(store, "tg:1", other.id).size == (30, 20)
        # Only the first crop is read (part 10): the good second one is not used instead.
        assert store.example_crops("tg:1", mochi.id, limit=1) == [bomb]
        assert store.example_crops("tg:1", mochi.id) == [bomb, good]


def test_no_module_opens_images_around_engine_images() -> None:
    """Every image opened anywhere goes through engine.images (decode_image, load_image_file,
    save_image), so its limits apply to crops, thumbnails, data sets and CLI output too."""
    pattern = re.compile(r"Image\.open\(|exif_transpose\(|PIL\.Image\.open")
    offenders = []
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO)
        if relative.parts[0] in {"tests", ".venv", "build"} or relative == Path("engine/images.py"):
            continue
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []


def test_save_image_writes_any_format_and_refuses_with_one_line(tmp_path: Path) -> None:
    jpeg = encode_jpeg(Image.new("RGB", (8, 6), (0, 0, 255)))
    save_image(jpeg, tmp_path / "out.png")
    assert decode_image((tmp_path / "out.png").read_bytes()).size == (8, 6)
    with pytest.raises(ImageError, match="Can't write"):
        save_image(jpeg, tmp_path / "missing" / "out.png")
    with pytest.raises(ImageError):
        save_image(raw_png(1, 1, b"\x00\x00\x00"), tmp_path / "out.unknownext")


def _photo_jpeg(size: tuple[int, int], orientation: int = 1) -> bytes:
    """A JPEG with detail (a gradient), optionally with an EXIF orientation."""
    image = Image.radial_gradient("L").resize(size).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_min_side_decodes_a_large_jpeg_at_a_reduced_scale(monkeypatch) -> None:
    """Issue 11, the worst request: a 49 MP crop (allowed: under 50 MP and 20 MB) decoded in
    full for every /ask and contact sheet tile cost +1 GB. Callers that need a small picture
    say so, and a JPEG never exists at full size (draft mode), EXIF rotation still applied."""
    from PIL import JpegImagePlugin

    loaded: list[tuple[int, int]] = []
    load = JpegImagePlugin.JpegImageFile.load

    def watched(self):
        loaded.append(self.size)
        return load(self)

    data = _photo_jpeg((4000, 3000), orientation=6)  # stored landscape, shown portrait
    full = decode_image(data)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", watched)
    small = decode_image(data, min_side=300)
    assert full.size == (3000, 4000) and small.size == (300, 400)
    assert max(loaded) <= (1000, 750)  # decoded at 1/4 scale or less, never 4000x3000
    expected = np.asarray(full.resize(small.size, Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(expected - np.asarray(small, dtype=int)).mean() < 2
    # Other formats are scaled after decoding; images already small enough are left as they are.
    png = io.BytesIO()
    Image.new("RGB", (900, 600)).save(png, format="PNG")
    assert decode_image(png.getvalue(), min_side=300).size == (450, 300)
    assert decode_image(data, min_side=5000).size == (3000, 4000)


@pytest.mark.parametrize(
    "size, min_side, expected",
    [((2001, 1344), 672, (1000, 672)), ((3001, 2048), 1024, (1500, 1024)), ((100, 8), 1, (12, 1))],
)
def test_min_side_when_draft_mode_rounds_the_long_side_up(size, min_side, expected) -> None:
    """The shorter side an exact 2, 4 or 8 times ``min_side`` and a long side that does not
    divide: draft mode already gives the short side but rounds the long one up (before: the
    resize got no size and a valid photo was refused as corrupt)."""
    assert decode_image(_photo_jpeg(size), min_side=min_side).size == expected


def test_the_generator_and_the_contact_sheet_get_small_crops(tmp_path: Path) -> None:
    from engine.contact_sheet import TILE, SheetTile, render_contact_sheet
    from engine.generator.rap import EXAMPLE_MIN_SIDE, example_image

    big = _photo_jpeg((3000, 2000))
    with FaissConceptStore(tmp_path, "m", 4) as store:
        mochi = _cat(store, "Mochi", big, Box(0, 0, 3000, 2000), [1, 0, 0, 0])
        shown = example_image(store, "tg:1", mochi.id)
    assert min(shown.size) == EXAMPLE_MIN_SIDE and shown.size[0] > shown.size[1]
    sheet = Image.open(io.BytesIO(render_contact_sheet([SheetTile("Mochi", "u1", big)])))
    assert min(sheet.size) > TILE  # drawn (from a crop decoded at tile size)


def test_annotated_reply_is_bounded_and_boxes_follow() -> None:
    """A 49 MP upload's /who reply was a 49 MP copy and JPEG (+190 MB): the annotated photo is
    at most REPLY_MAX_SIDE wide or high, its boxes scaled with it."""
    from engine.render import PALETTE, REPLY_MAX_SIDE, annotate
    from engine.types import Recognition

    photo = Image.new("RGB", (REPLY_MAX_SIDE * 2, 1000), "black")
    box = Box(2000, 400, 3000, 900)
    out = annotate(photo, [Recognition("c1", "Mochi", "", "cat", 0.9, box)])
    assert out.size == (REPLY_MAX_SIDE, 500)
    colour = tuple(int(PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    pixels = np.asarray(out)
    assert tuple(pixels[350, 1000]) == colour and tuple(pixels[350, 1500]) == colour  # x1, x2
    assert tuple(pixels[350, 1250]) == (0, 0, 0)  # inside the box: the photo
    small = Image.new("RGB", (400, 300))
    assert annotate(small, []).size == (400, 300)


def test_a_large_region_is_cropped_at_most_crop_max_side() -> None:
    """The whole of a 49 MP photo (the fallback crop when nothing is detected) was copied at
    full size for CLIP, which keeps 224 px of it: a crop's shorter side is bounded, and the
    pixels are the region's."""
    from engine.images import CROP_MAX_SIDE

    image = Image.radial_gradient("L").resize((6000, 4000)).convert("RGB")
    whole = crop(image, Box(0, 0, 6000, 4000))
    assert whole.size == (CROP_MAX_SIDE * 3 // 2, CROP_MAX_SIDE)
    part = crop(image, Box(1000, 1000, 4000, 2500))
    expected = image.crop((1000, 1000, 4000, 2500)).resize(part.size, Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(part, int) - np.asarray(expected, int)).mean() < 2
    assert crop(image, Box(10, 10, 500, 400)).size == (490, 390)  # small regions: as they are


def test_the_detector_never_copies_a_huge_photo_to_numpy(tiny_models) -> None:
    """YOLO-World's letterbox made a full-size NumPy copy of a 49 MP upload (280 MB at its
    peak) to keep 640 px of it; a photo far larger than the input is shrunk in Pillow first,
    and its detections still come back in the photo's own pixels."""
    import tracemalloc

    detector = tiny_models[1].detector
    big = Image.radial_gradient("L").resize((6000, 4500)).convert("RGB")
    tracemalloc.start()
    try:
        found = detector.detect([big], ["cat", "dog"])[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024**2, f"{peak / 1024**2:.0f} MB of NumPy/Python memory"
    assert all(0 <= d.box.x1 < d.box.x2 <= 6000 and 0 <= d.box.y1 < d.box.y2 <= 4500 for d in found)
