"""Annotated images: the photo with a named box around every recognized concept."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from engine.images import encode_jpeg
from engine.types import Recognition, UnknownObject

# Distinct, readable colours for concept boxes; unknown objects are drawn in grey.
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
UNKNOWN_COLOUR = "#9e9e9e"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour: str, font) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    pad = max(2, (bottom - top) // 5)
    # Keep the label inside the photo: above the box when there is room, else inside it.
    y = xy[1] - (bottom - top) - 2 * pad if xy[1] - (bottom - top) - 2 * pad >= 0 else xy[1]
    x = xy[0]
    left, top, right, bottom = draw.textbbox((x + pad, y + pad), text, font=font)
    draw.rectangle((x, y, right + pad, bottom + pad), fill=colour)
    draw.text((x + pad, y + pad), text, fill="white", font=font)


def annotate(
    image: Image.Image,
    known: Sequence[Recognition],
    unknown: Sequence[UnknownObject] = (),
) -> Image.Image:
    """A copy of ``image`` with a named box per recognition and grey boxes for the rest."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    short_side = min(out.size)
    width = max(2, short_side // 150)
    font = _font(max(12, short_side // 28))
    for item in unknown:
        draw.rectangle(item.box.as_list(), outline=UNKNOWN_COLOUR, width=max(1, width // 2))
    for index, rec in enumerate(known):
        if rec.box is None:
            continue
        colour = PALETTE[index % len(PALETTE)]
        draw.rectangle(rec.box.as_list(), outline=colour, width=width)
        _label(draw, (rec.box.x1, rec.box.y1), f"{rec.name} {rec.score:.2f}", colour, font)
    return out


def annotate_jpeg(
    image: Image.Image, known: Sequence[Recognition], unknown: Sequence[UnknownObject] = ()
) -> bytes:
    return encode_jpeg(annotate(image, known, unknown), quality=90)
