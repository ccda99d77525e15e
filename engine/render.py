"""Annotated images: the photo with a named box around every recognized concept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from PIL import Image, ImageDraw

from engine.fonts import FontChain, font_chain
from engine.images import encode_jpeg
from engine.types import Box, Recognition, UnknownObject

# Distinct, readable colours for concept boxes; unknown objects are drawn in dark grey.
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
UNKNOWN_COLOUR = "#505050"
UNKNOWN_HALO = "#ffffff"
# Longest side of an annotated reply: Telegram's largest photo size; Discord previews less.
REPLY_MAX_SIDE = 2560


def _label(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour: str, fonts: FontChain
) -> None:
    height = fonts.line_height()
    pad = max(2, height // 6)
    max_width = max(1, draw.im.size[0] - xy[0] - 2 * pad)
    text = fonts.fit(text, max_width)
    # Keep the label inside the photo: above the box when there is room, else inside it.
    y = xy[1] - height - 2 * pad if xy[1] - height - 2 * pad >= 0 else xy[1]
    x = xy[0]
    draw.rectangle((x, y, x + fonts.width(text) + 2 * pad, y + height + 2 * pad), fill=colour)
    fonts.draw(draw, (x + pad, y + pad), text, fill="white")


def _unknown_box(draw: ImageDraw.ImageDraw, box: Box, width: int) -> None:
    """A dark box with a white halo: visible on light and dark photos alike, and quieter than
    the coloured boxes of recognized concepts."""
    draw.rectangle(box.as_list(), outline=UNKNOWN_HALO, width=width + 2)
    inner = [box.x1 + 1, box.y1 + 1, box.x2 - 1, box.y2 - 1]
    if inner[2] > inner[0] and inner[3] > inner[1]:
        draw.rectangle(inner, outline=UNKNOWN_COLOUR, width=width)


def _scaled(box: Box, scale: float) -> Box:
    return Box(*(round(v * scale) for v in box.as_list()))


def annotate(
    image: Image.Image,
    known: Sequence[Recognition],
    unknown: Sequence[UnknownObject] = (),
    max_side: int = REPLY_MAX_SIDE,
) -> Image.Image:
    """A copy of ``image`` with a named box per recognition and a labelled grey box ("dog?")
    for every detection that matched nobody, at most ``max_side`` pixels on its longer side
    (a 49 MP upload must not cost a 49 MP copy and JPEG; chats show less anyway)."""
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        out = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0).convert("RGB")
        known = [replace(r, box=None if r.box is None else _scaled(r.box, scale)) for r in known]
        unknown = [replace(u, box=_scaled(u.box, scale)) for u in unknown]
    else:
        out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    short_side = min(out.size)
    width = max(2, short_side // 150)
    fonts = font_chain(max(12, short_side // 28))
    small = font_chain(max(11, short_side // 36))
    for item in unknown:
        _unknown_box(draw, item.box, width)
        _label(draw, (item.box.x1, item.box.y1), f"{item.label}?", UNKNOWN_COLOUR, small)
    for index, rec in enumerate(known):
        if rec.box is None:
            continue
        colour = PALETTE[index % len(PALETTE)]
        draw.rectangle(rec.box.as_list(), outline=colour, width=width)
        _label(draw, (rec.box.x1, rec.box.y1), f"{rec.name} {rec.score:.2f}", colour, fonts)
    return out


def annotate_jpeg(
    image: Image.Image, known: Sequence[Recognition], unknown: Sequence[UnknownObject] = ()
) -> bytes:
    return encode_jpeg(annotate(image, known, unknown), quality=90)
