"""Text on pictures in any script: a chain of fonts, each character drawn by the first that has it.

No single installed font covers Latin, Cyrillic, Arabic and CJK names, and Pillow draws a
character a font lacks as an empty box ("tofu"). So labels are split into runs by the first
font of :data:`FONT_FILES` that has a glyph for each character (read from the font's own cmap
with fontTools), and the runs are drawn one after another. Fonts that are not installed are
skipped; with none at all, Pillow's built-in font is the last resort. Debian packages:
``fonts-dejavu-core`` (Latin, Greek, Cyrillic, Arabic, Hebrew...) and ``fonts-droid-fallback``
(CJK); ``fonts-noto-core`` / ``fonts-noto-cjk`` are used when present.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import ImageDraw, ImageFont

log = logging.getLogger(__name__)

_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts/opentype", "/usr/local/share/fonts")
# Wide coverage first (Latin and its neighbours), then the CJK fallbacks.
_FONT_NAMES = (
    "dejavu/DejaVuSans.ttf",
    "noto/NotoSans-Regular.ttf",
    "noto/NotoSansArabic-Regular.ttf",
    "noto/NotoSansDevanagari-Regular.ttf",
    "noto/NotoSansThai-Regular.ttf",
    "noto/NotoSansHebrew-Regular.ttf",
    "noto/NotoSansCJK-Regular.ttc",
    "droid/DroidSansFallbackFull.ttf",
    "wqy/wqy-zenhei.ttc",
)
BOLD_FONT = "dejavu/DejaVuSans-Bold.ttf"
# Extra font files (os.pathsep-separated) tried before the system ones.
FONT_PATH_ENV = "RAPBOT_FONTS"


def font_files(bold: bool = False) -> tuple[Path, ...]:
    """The installed fonts of the chain, in the order they are tried."""
    names = ((BOLD_FONT,) if bold else ()) + _FONT_NAMES
    extra = [Path(p) for p in os.environ.get(FONT_PATH_ENV, "").split(os.pathsep) if p]
    found = [p for p in extra if p.is_file()]
    for name in names:
        for folder in _DIRS:
            path = Path(folder) / name
            if path.is_file() and path not in found:
                found.append(path)
                break
    return tuple(found)


@lru_cache(maxsize=16)
def _codepoints(path: Path) -> frozenset[int]:
    """The characters a font file has glyphs for (first face of a collection)."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception as error:  # noqa: BLE001 - a broken font file is skipped, not fatal
        log.warning("font %s unreadable: %s", path, error)
        return frozenset()


@lru_cache(maxsize=64)
def _face(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size=size, index=0)


@dataclass(frozen=True)
class FontChain:
    """Fonts of one size, tried in order for every character."""

    faces: tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, ...]
    coverage: tuple[frozenset[int], ...]

    def font_for(self, char: str) -> int:
        """Index of the first face with a glyph for ``char`` (0 when none has it)."""
        code = ord(char)
        for index, codes in enumerate(self.coverage):
            if code in codes:
                return index
        return 0

    def missing(self, text: str) -> str:
        """The characters of ``text`` that no font of the chain can draw."""
        return "".join(
            ch for ch in text if not ch.isspace() and not any(ord(ch) in c for c in self.coverage)
        )

    def runs(self, text: str) -> list[tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]]:
        """``text`` cut into pieces that one face draws each; spaces and marks join the run
        they are in, so a word is never split between fonts needlessly."""
        pieces: list[tuple[str, int]] = []
        for char in text:
            index = self.font_for(char)
            keeps_run = char.isspace() or (pieces and ord(char) not in self.coverage[index])
            if pieces and (keeps_run or pieces[-1][1] == index):
                pieces[-1] = (pieces[-1][0] + char, pieces[-1][1])
            else:
                pieces.append((char, index))
        return [(piece, self.faces[index]) for piece, index in pieces]

    def line_height(self) -> int:
        heights = []
        for face in self.faces:
            try:
                ascent, descent = face.getmetrics()
            except AttributeError:  # the bitmap default font
                ascent, descent = 11, 2
            heights.append(ascent + descent)
        return max(heights)

    def width(self, text: str) -> int:
        return round(sum(face.getlength(piece) for piece, face in self.runs(text)))

    def fit(self, text: str, max_width: int) -> str:
        """``text``, shortened with an ellipsis until it fits ``max_width`` pixels."""
        if self.width(text) <= max_width:
            return text
        while text and self.width(text + "…") > max_width:
            text = text[:-1]
        return text.rstrip() + "…"

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill) -> None:
        """Draw ``text`` with its top-left corner at ``xy`` (runs share one baseline)."""
        x, y = xy
        ascent = max(_ascent(face) for face in self.faces)
        for piece, face in self.runs(text):
            draw.text((x, y + ascent), piece, font=face, fill=fill, anchor="ls")
            x += face.getlength(piece)


def _ascent(face) -> int:
    try:
        return face.getmetrics()[0]
    except AttributeError:
        return 11


@lru_cache(maxsize=32)
def font_chain(size: int, bold: bool = False) -> FontChain:
    """The installed fonts at ``size`` px; Pillow's built-in font when none is installed."""
    files = font_files(bold)
    faces = tuple(_face(path, size) for path in files)
    coverage = tuple(_codepoints(path) for path in files)
    if not faces:
        log.warning("no TrueType fonts found; labels use Pillow's built-in font (Latin only)")
        try:
            builtin = ImageFont.load_default(size=size)
        except TypeError:  # Pillow without FreeType
            builtin = ImageFont.load_default()
        faces, coverage = (builtin,), (frozenset(range(0x20, 0x7F)),)
    return FontChain(faces, coverage)
