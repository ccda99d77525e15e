"""The chat's concepts as one picture: a grid of their first example crops, names and owners.

Large chats are paged (:data:`PAGE_SIZE` tiles a sheet) so that every tile stays big enough to
recognise on a phone; the page number and count are in the sheet's header.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageOps

from engine.errors import InvalidInputError
from engine.fonts import font_chain
from engine.images import ImageLimits, decode_image, encode_jpeg

PAGE_SIZE = 24  # 6 x 4 tiles
COLUMNS = 6
TILE = 168  # px, the square crop
GAP = 14
CAPTION = 30  # px under each crop for the name
HEADER = 46
BACKGROUND = "#f4f4f2"
EMPTY_TILE = "#d9d9d6"
BADGE = "#2f4858"


@dataclass(frozen=True)
class SheetTile:
    """One concept on the sheet: its name, who taught it and its first example crop (JPEG)."""

    name: str
    owner: str
    crop_jpeg: bytes | None


def page_count(total: int, page_size: int = PAGE_SIZE) -> int:
    return max(1, math.ceil(total / page_size))


def check_page(page: int, total: int, page_size: int = PAGE_SIZE) -> int:
    """``page`` when it exists (1-based), else a one-line :class:`InvalidInputError`."""
    pages = page_count(total, page_size)
    if not 1 <= page <= pages:
        raise InvalidInputError(
            f"There {'is only 1 page' if pages == 1 else f'are {pages} pages'} of concepts: "
            f"use /concepts 1{'' if pages == 1 else f' to /concepts {pages}'}."
        )
    return page


def owner_initials(owner: str) -> str:
    """Short owner tag for a tile: initials of a named user (``web:Ada Lovelace`` -> ``AL``),
    else the last digits of a numeric platform id (``tg:123456`` -> ``#456``)."""
    name = owner.split(":", 1)[-1].strip()
    words = [w for w in re.split(r"[\W_]+", name) if w]
    if not words:
        return "?"
    if any(ch.isalpha() for ch in name):
        letters = [w for w in words if w[0].isalpha()] or words
        if len(letters) == 1:
            return letters[0][:2].upper()
        return (letters[0][0] + letters[-1][0]).upper()
    return "#" + name[-3:]


def _crop_tile(crop_jpeg: bytes | None, limits: ImageLimits) -> Image.Image:
    if crop_jpeg:
        try:
            picture = decode_image(crop_jpeg, limits, min_side=TILE)  # never full size
            return ImageOps.fit(picture, (TILE, TILE), Image.Resampling.LANCZOS)
        except InvalidInputError:  # an unreadable stored crop: the tile still shows its name
            pass
    return Image.new("RGB", (TILE, TILE), EMPTY_TILE)


def render_contact_sheet(
    tiles: Sequence[SheetTile],
    page: int = 1,
    pages: int = 1,
    title: str = "Concepts of this chat",  # short: drawn in full
    limits: ImageLimits = ImageLimits(),
) -> bytes:
    """A JPEG grid of ``tiles`` (at most :data:`PAGE_SIZE`) with a ``title — page p/n`` header."""
    columns = max(1, min(COLUMNS, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / columns))
    heading = font_chain(20, bold=True)
    names = font_chain(15)
    badge_font = font_chain(13, bold=True)
    header = title if pages == 1 else f"{title} — page {page}/{pages}"
    # Wide enough for the header, which is never cut (a page number must stay readable).
    width = max(GAP + columns * (TILE + GAP), heading.width(header) + 2 * GAP)
    height = HEADER + rows * (TILE + CAPTION + GAP)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    heading.draw(draw, (GAP, (HEADER - heading.line_height()) // 2), header, "#222")
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        x = GAP + column * (TILE + GAP)
        y = HEADER + row * (TILE + CAPTION + GAP)
        sheet.paste(_crop_tile(tile.crop_jpeg, limits), (x, y))
        name = names.fit(tile.name, TILE)
        names.draw(draw, (x + (TILE - names.width(name)) // 2, y + TILE + 6), name, "#111")
        initials = owner_initials(tile.owner)
        pad = 4
        badge_w = badge_font.width(initials) + 2 * pad
        badge_h = badge_font.line_height() + 2 * pad
        bx, by = x + TILE - badge_w - 4, y + 4
        draw.rounded_rectangle((bx, by, bx + badge_w, by + badge_h), radius=5, fill=BADGE)
        badge_font.draw(draw, (bx + pad, by + pad), initials, "white")
    return encode_jpeg(sheet, quality=88)
