"""Safe decoding of untrusted image bytes, plus the crops, thumbnails and encodings we need.

Uploads come from strangers in a chat, so :func:`decode_image` assumes the worst: the byte
limit is checked before Pillow sees anything, the pixel limit is checked from the header
before any pixel memory is allocated, only a handful of common formats are parsed, and every
failure becomes an :class:`~engine.errors.ImageError` with one sentence meant for the user.
What comes out is always a fully loaded, upright, 8-bit RGB image.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from engine.errors import ImageError, InvalidInputError
from engine.types import Box

if TYPE_CHECKING:
    from engine.settings import EngineSettings

__all__ = [
    "ImageLimits",
    "bounded_crop_jpeg",
    "crop",
    "decode_image",
    "encode_jpeg",
    "encode_png",
    "load_image_file",
    "save_image",
    "thumbnail",
]

# Formats Pillow may try, in order. MPO (multi-picture JPEG) is not a plugin of its own to
# open with: the JPEG plugin hands back an MPO image when it sees one, so it is only allowed
# as a result.
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ALLOWED_FORMATS = frozenset(_OPEN_FORMATS) | {"MPO"}

# Plugin classes used only to read a refused image's declared size for the error message
# (Image.open itself raises DecompressionBombError before we could ask).
_HEADER_READERS: tuple[type[ImageFile.ImageFile], ...] = (
    JpegImagePlugin.JpegImageFile,
    PngImagePlugin.PngImageFile,
    WebPImagePlugin.WebPImageFile,
    GifImagePlugin.GifImageFile,
    BmpImagePlugin.BmpImageFile,
    TiffImagePlugin.TiffImageFile,
)

# Leading bytes of the allowed formats: a file that starts like one of them but cannot be
# opened is "corrupt", anything else is "not an image".
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG / MPO
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)

_WHITE = (255, 255, 255)
_MIB = 1024 * 1024
_KIB = 1024

_NOT_AN_IMAGE = "This file is not an image I can read (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)."
_CORRUPT = "The image is truncated or corrupt."
_EMPTY = "The file is empty."
_NO_MEMORY = "The image is too large to process."
_ODD_COLOURS = "This image uses a colour format I cannot read."

# Longest side over shortest side. Phone panoramas stay within ~10:1; beyond 20:1 an image
# is a strip that no model can use, and CLIP's resize (shortest side to 224) would blow a
# 100000x1 strip up to 22 million pixels. Crops are widened to stay within it too.
MAX_ASPECT = 20.0
# Shorter side of a crop at most: 4x CLIP's 224 px input and above the generator's 672 (a crop
# is embedded, stored and shown to the generator; none of them needs a 49 MP crop).
CROP_MAX_SIDE = 1024


@dataclass(frozen=True)
class ImageLimits:
    """How much an untrusted image may weigh, in bytes of the file and in decoded pixels."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_aspect: float = MAX_ASPECT  # longest side / shortest side

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or not self.max_aspect >= 1:
            raise ValueError(
                f"image limits must be positive (max_bytes={self.max_bytes}, "
                f"max_pixels={self.max_pixels}, max_aspect={self.max_aspect})"
            )

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> ImageLimits:
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


# --------------------------------------------------------------------------- messages


def _format_bytes(n: int, *, exact: bool = False) -> str:
    """``60.0 MB`` for a size; with ``exact`` a whole number drops its decimal (``20 MB``)."""
    for unit, name in ((_MIB, "MB"), (_KIB, "KB")):
        if n >= unit:
            value = n / unit
            if exact and value == int(value):
                return f"{int(value)} {name}"
            return f"{value:.1f} {name}"
    return f"{n} bytes"


def _format_pixels(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:g} megapixels"
    return f"{n:,} pixels"


def _too_many_bytes(size: int, limits: ImageLimits) -> str:
    return (
        f"The image is too large ({_format_bytes(size)}); "
        f"the limit is {_format_bytes(limits.max_bytes, exact=True)}."
    )


def _too_many_pixels(size: tuple[int, int] | None, pixels: int | None, limits: ImageLimits) -> str:
    if size is not None:
        shown = f"{size[0]}×{size[1]} pixels"
    elif pixels is not None:
        shown = _format_pixels(pixels)
    else:
        shown = "too many pixels"
    return f"The image is too large ({shown}); the limit is {_format_pixels(limits.max_pixels)}."


def _too_thin(size: tuple[int, int], limits: ImageLimits) -> str:
    return (
        f"The image is too long and thin ({size[0]}×{size[1]} pixels); its longer side can be"
        f" at most {limits.max_aspect:g} times its shorter side."
    )


def _show_path(path: str | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """The path as text that stays on one line (messages must be a single line)."""
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)


# --------------------------------------------------------------------------- decoding


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), min_side: int | None = None
) -> Image.Image:
    """Decode untrusted bytes into a loaded, upright, 8-bit RGB image, or raise ImageError.

    Animated images give their first frame; transparency is composited onto white; 16/32-bit
    grey and float images are scaled (not clipped) to 8 bits.

    ``min_side``: the caller needs no more than this many pixels on the shorter side (a
    contact sheet tile, a generator's input), so a larger image comes out scaled down to it.
    A JPEG is then decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode: the full-size
    pixels never exist), which is what keeps a 49 MP crop from an archive cheap.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, not {type(data).__name__}")
    size = memoryview(data).nbytes
    # Both checks come before Pillow parses a single byte.
    if size == 0:
        raise ImageError(_EMPTY)
    if size > limits.max_bytes:
        raise ImageError(_too_many_bytes(size, limits))
    try:
        return _decode(bytes(data), limits, min_side)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own guard (global MAX_IMAGE_PIXELS) fired inside Image.open, before our
        # per-call check could run; report it in our terms. The warning only arrives here
        # when a warnings filter turns it into an exception.
        return _after_pillow_bomb_guard(bytes(data), limits, error, min_side)
    except MemoryError:
        raise ImageError(_NO_MEMORY) from None
    except UnidentifiedImageError:
        raise ImageError(_corrupt_or_unknown(data)) from None
    except Exception:  # anything Pillow or a codec raises: never show a traceback to a user
        raise ImageError(_CORRUPT) from None


def _decode(data: bytes, limits: ImageLimits, min_side: int | None = None) -> Image.Image:
    image = _pillow_open()(io.BytesIO(data), formats=_available_formats())
    return _load_checked(image, limits, min_side)


def _smaller_size(size: tuple[int, int], min_side: int | None) -> tuple[int, int] | None:
    """``size`` scaled so its shorter side is ``min_side``; None when it is not larger."""
    width, height = size
    if min_side is None or min(width, height) <= min_side:
        return None
    scale = min_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _load_checked(
    image: ImageFile.ImageFile, limits: ImageLimits, min_side: int | None = None
) -> Image.Image:
    if image.format not in _ALLOWED_FORMATS:
        raise ImageError(_NOT_AN_IMAGE)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(_CORRUPT)
    # Image.open only parsed the header, so this refuses a bomb before any pixel memory
    # exists; it does not depend on Pillow's global MAX_IMAGE_PIXELS, which other code
    # (ultralytics) sets to None.
    if width * height > limits.max_pixels:
        raise ImageError(_too_many_pixels((width, height), None, limits))
    # Also from the header: a 177-byte 100000x1 PNG decodes in no time, but every model's
    # resize after it would not (see MAX_ASPECT).
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ImageError(_too_thin((width, height), limits))
    animated = bool(getattr(image, "is_animated", False))
    if animated:
        image.seek(0)
    wanted = _smaller_size((width, height), min_side)
    if wanted is not None:
        image.draft(None, wanted)  # JPEG only (others ignore it): at least ``wanted``
    # Truncation raises here unless someone set ImageFile.LOAD_TRUNCATED_IMAGES globally.
    image.load()
    if wanted is not None and image.size != wanted:
        # Draft mode rounds each side up on its own, so the short side may already be
        # ``min_side`` while the long one is not yet: resize to ``wanted`` itself (stored
        # orientation; EXIF rotation comes after and keeps the short side).
        image = image.resize(wanted, Image.Resampling.LANCZOS)
    upright = _upright(image)
    rgb = _to_rgb(upright)
    if rgb is image and animated:
        # Detach from the multi-frame file object (and the upload's bytes it holds).
        rgb = rgb.copy()
    return rgb


def _pillow_open():
    """Pillow's own ``Image.open``.

    Importing ultralytics replaces ``Image.open`` with a wrapper that, on an unidentified
    file, pip-installs a HEIF plugin at run time; a chat upload must never trigger that.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    return original if Image.open.__module__ != "PIL.Image" and original else Image.open


def _available_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (Image.open raises KeyError on others,
    e.g. WEBP when Pillow was built without libwebp)."""
    Image.init()  # cheap after the first call
    return tuple(name for name in _OPEN_FORMATS if name in Image.OPEN)


def _after_pillow_bomb_guard(
    data: bytes, limits: ImageLimits, error: Exception, min_side: int | None = None
) -> Image.Image:
    declared = _declared_size(data)
    if declared is None:
        match = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(match.group(1)) if match else None
        raise ImageError(_too_many_pixels(None, pixels, limits)) from None
    if declared[0] * declared[1] > limits.max_pixels:
        raise ImageError(_too_many_pixels(declared, None, limits)) from None
    # Only a warning turned into an error can get here: the image is within *our* limit
    # but above Pillow's default. Open it through the plugin directly, which has no guard.
    try:
        return _decode_with_readers(data, limits, min_side)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(_NO_MEMORY) from None
    except Exception:
        raise ImageError(_CORRUPT) from None


def _open_with_readers(data: bytes) -> ImageFile.ImageFile | None:
    for reader in _HEADER_READERS:
        try:
            return reader(io.BytesIO(data))
        except Exception:
            continue
    return None


def _declared_size(data: bytes) -> tuple[int, int] | None:
    image = _open_with_readers(data)
    return None if image is None else image.size


def _decode_with_readers(
    data: bytes, limits: ImageLimits, min_side: int | None = None
) -> Image.Image:
    image = _open_with_readers(data)
    if image is None:
        raise ImageError(_corrupt_or_unknown(data))
    return _load_checked(image, limits, min_side)


def _corrupt_or_unknown(data: bytes | bytearray | memoryview) -> str:
    head = bytes(data[:16])
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return _CORRUPT
    return _NOT_AN_IMAGE


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF/XMP orientation; a photo with unreadable EXIF is kept as it is."""
    try:
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    except Exception:  # junk metadata must not cost the user their photo
        pass
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        return _on_white(image)
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # e.g. LAB or HSV TIFFs Pillow cannot convert
        raise ImageError(_ODD_COLOURS) from None


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale one-channel integer/float pixels to 0..255 without clipping.

    16-bit data keeps its meaning (65535 -> 255). 32-bit integers already within 0..255 or
    0..65535 are read as 8- or 16-bit; floats within 0..1 as fractions; anything else is
    stretched from its minimum to its maximum.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:  # I;16 and its variants
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if values.dtype.kind == "f":
        data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(data.min()), float(data.max())
        if low >= 0.0 and high <= 1.0:
            return np.rint(data * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.rint(data).astype(np.uint8)
        return _stretch(data, low, high)
    data = values.astype(np.int64)
    low, high = int(data.min()), int(data.max())
    if low >= 0 and high <= 255:
        return data.astype(np.uint8)
    if low >= 0 and high <= 65535:
        return ((data + 128) // 257).astype(np.uint8)
    return _stretch(data.astype(np.float64), float(low), float(high))


def _stretch(data: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.rint((data - low) * (255.0 / (high - low))).astype(np.uint8)


# --------------------------------------------------------------------------- files


def load_image_file(
    path: str | os.PathLike[str], limits: ImageLimits = ImageLimits()
) -> Image.Image:
    """Read and decode an image file; every problem is an ImageError that names the path."""
    data = read_image_file(path, limits)
    try:
        return decode_image(data, limits)
    except ImageError as error:
        raise ImageError(f"{_show_path(path)}: {error}") from None


def read_image_file(path: str | os.PathLike[str], limits: ImageLimits = ImageLimits()) -> bytes:
    """The bytes of an image file (not decoded), refusing folders, FIFOs and oversized files."""
    shown = _show_path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"The file {shown} does not exist.") from None
    except OSError as error:
        raise ImageError(f"The file {shown} cannot be read ({_reason(error)}).") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"The path {shown} is a folder, not an image file.")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        raise ImageError(f"The path {shown} is not a regular file.")
    # Refuse by size before reading anything.
    if info.st_size > limits.max_bytes:
        raise ImageError(f"{shown}: {_too_many_bytes(info.st_size, limits)}")
    try:
        with open(path, "rb") as file:
            data = file.read(limits.max_bytes + 1)  # +1: the file may have grown since stat
    except OSError as error:
        raise ImageError(f"The file {shown} cannot be read ({_reason(error)}).") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"{shown}: {_too_many_bytes(len(data), limits)}")
    return data


def _reason(error: OSError) -> str:
    return (error.strerror or type(error).__name__).lower()


# --------------------------------------------------------------------------- crops and output


def crop(
    image: Image.Image, box: Box, pad: float = 0.0, max_side: int | None = CROP_MAX_SIDE
) -> Image.Image:
    """The part of ``image`` inside ``box``, widened by ``pad`` x its size on each side.

    The result is clipped to the image; an empty box or one outside the image is an
    InvalidInputError, since it can come from a user's command. A region whose shorter side
    is above ``max_side`` comes out scaled down to it, straight from the image (no full-size
    copy: the whole of a 49 MP photo cost 186 MB per crop).
    """
    if not math.isfinite(pad) or pad < 0:
        raise InvalidInputError(f"The crop padding must be a non-negative number, not {pad}.")
    if box.width <= 0 or box.height <= 0:
        raise InvalidInputError(f"The box ({box.x1}, {box.y1}, {box.x2}, {box.y2}) is empty.")
    width, height = image.size
    inside = box.clipped(width, height)
    if inside.width <= 0 or inside.height <= 0:
        raise InvalidInputError(
            f"The box ({box.x1}, {box.y1}, {box.x2}, {box.y2}) lies outside the "
            f"{width}×{height} image."
        )
    pad_x = int(round(box.width * pad))
    pad_y = int(round(box.height * pad))
    padded = Box(box.x1 - pad_x, box.y1 - pad_y, box.x2 + pad_x, box.y2 + pad_y)
    region = _within_aspect(padded.clipped(width, height), width, height, MAX_ASPECT)
    corners = (region.x1, region.y1, region.x2, region.y2)
    wanted = _smaller_size((region.width, region.height), max_side)
    if wanted is None:
        return image.crop(corners)
    return image.resize(wanted, Image.Resampling.BICUBIC, box=corners, reducing_gap=2.0)


def bounded_crop_jpeg(
    data: bytes, limits: ImageLimits = ImageLimits(), max_side: int = CROP_MAX_SIDE
) -> bytes:
    """A stored crop as :func:`crop` makes them: the JPEG unchanged when its shorter side is
    at most ``max_side`` (read from the header), else decoded at a reduced scale and encoded
    again. Imports use it, so an archive's 49 MP crop is not decoded by every /ask and
    contact sheet that shows it."""
    size = _declared_size(data)
    if size is not None and min(size) <= max_side:
        return data
    return encode_jpeg(decode_image(data, limits, min_side=max_side))


def _within_aspect(region: Box, width: int, height: int, max_aspect: float) -> Box:
    """``region`` grown on its short side (centred, kept inside the image) until its aspect
    is at most ``max_aspect``, so a 4000×1 box does not become a 896000×224 CLIP input. For an
    image within the aspect limit this always fits; otherwise it is clipped to the image."""
    if region.width > max_aspect * region.height:
        need = min(height, math.ceil(region.width / max_aspect))
        top = min(max(0, region.y1 - (need - region.height) // 2), height - need)
        return Box(region.x1, top, region.x2, top + need)
    if region.height > max_aspect * region.width:
        need = min(width, math.ceil(region.height / max_aspect))
        left = min(max(0, region.x1 - (need - region.width) // 2), width - need)
        return Box(left, region.y1, left + need, region.y2)
    return region


def thumbnail(image: Image.Image, max_side: int = 256) -> Image.Image:
    """A copy no larger than ``max_side`` on its longer side, aspect kept; never enlarged."""
    if max_side < 1:
        raise InvalidInputError(f"The thumbnail size must be at least 1 pixel, not {max_side}.")
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image.copy()
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # resize (not copy + Image.thumbnail) so the full-size image is never duplicated.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of ``image`` (grey stays grey, any other mode is made RGB first).

    Metadata such as EXIF and GPS is not copied, so nothing private leaks into crops.
    """
    if not 1 <= quality <= 100:
        raise InvalidInputError(f"The JPEG quality must be between 1 and 100, not {quality}.")
    if image.mode not in ("RGB", "L"):
        image = _to_rgb(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def save_image(
    data: bytes, path: str | os.PathLike[str], limits: ImageLimits = ImageLimits()
) -> None:
    """Write image bytes (e.g. an annotated JPEG) to ``path`` in the format its extension
    names, decoded through :func:`decode_image` like any other image."""
    image = decode_image(data, limits)
    try:
        image.save(path)
    except (ValueError, OSError) as error:  # unknown extension, missing folder, full disk
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise ImageError(f"Can't write {_show_path(path)}: {reason}") from None


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of ``image``; modes PNG cannot store are made RGB first."""
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = _to_rgb(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
