"""A catalogue of bad and awkward uploads, generated in code (no binary files in the repository).

``BAD_IMAGES`` maps a name to a function that builds bytes every decoder must refuse with an
``ImageError``; ``good_images()`` gives edge-case images that must decode, and
``GOOD_IMAGE_SIZES`` their decoded (upright) sizes. Engine, CLI and bot tests share them::

    from tests.badfiles import BAD_IMAGES, GOOD_IMAGE_SIZES, good_images
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

# Colours used by the good images, so tests can check what was decoded.
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)

MIB = 1024 * 1024


# --------------------------------------------------------------------------- building blocks


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(
    width: int, height: int, rows: bytes, *, bit_depth: int = 8, colour_type: int = 2
) -> bytes:
    """A PNG built by hand: ``rows`` are the filtered scanlines (each starting with its filter)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def sample_jpeg() -> bytes:
    """A real 64x48 baseline JPEG with detail (so its scan data is most of the file)."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), "JPEG", quality=90)


def _jpeg_through_scan_header(jpeg: bytes) -> bytes:
    """Every marker segment of ``jpeg`` up to and including SOS, but no scan data."""
    start = jpeg.index(b"\xff\xda")
    (length,) = struct.unpack(">H", jpeg[start + 2 : start + 4])
    return jpeg[: start + 2 + length]


def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with the size in its SOF0 header replaced (the scan data stays tiny)."""
    start = jpeg.index(b"\xff\xc0")
    # SOF0: marker(2) length(2) precision(1) height(2) width(2) ...
    return jpeg[: start + 5] + struct.pack(">HH", height, width) + jpeg[start + 9 :]


# --------------------------------------------------------------------------- bad uploads


def _empty() -> bytes:
    return b""


def _text_named_jpg() -> bytes:
    return b"Shopping list:\n- milk\n- eggs\n- cat food for Mochi\n" * 20


def _truncated_jpeg() -> bytes:
    jpeg = sample_jpeg()
    return jpeg[: len(jpeg) // 2]


def _jpeg_header_only() -> bytes:
    return _jpeg_through_scan_header(sample_jpeg())


def _png_100000x100000() -> bytes:
    # A valid header and one tiny compressed row: 10 gigapixels declared in ~100 bytes.
    return raw_png(100_000, 100_000, b"\x00" + bytes(300))


def _jpeg_65500x65500() -> bytes:
    return _jpeg_with_size(sample_jpeg(), 65_500, 65_500)


def _gif_65535x65535() -> bytes:
    screen = struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0)
    data = b"\x02" + b"\x02\x4c\x01" + b"\x00"  # LZW min code size, one small block, end
    return b"GIF89a" + screen + descriptor + data + b";"


def _huge_upload_60mb() -> bytes:
    # A JPEG start followed by zeros: bytes(n) is calloc'ed, so this is cheap to build.
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return head + bytes(60 * MIB - len(head))


def _html() -> bytes:
    return (
        b"<!DOCTYPE html>\n<html><head><title>cat.jpg</title></head>"
        b"<body><img src='cat.jpg'></body></html>\n"
    )


def _pdf_header() -> bytes:
    return b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"


def _svg() -> bytes:
    return (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="100000" '
        b'height="100000"><rect width="100%" height="100%" fill="red"/></svg>\n'
    )


def _ico() -> bytes:
    # ICO is not an allowed format; this one also claims a 0x0 (= 256x256) icon.
    return _save(Image.new("RGB", (16, 16), RED), "ICO", sizes=[(16, 16)])


def _random_noise_bytes() -> bytes:
    return random.Random(1234).randbytes(4096)


def _truncated_png() -> bytes:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    png = _save(Image.fromarray(pixels), "PNG")
    return png[: len(png) * 2 // 3]


def _png_bad_crc() -> bytes:
    png = bytearray(_save(Image.new("RGB", (8, 8), RED), "PNG"))
    png[29] ^= 0xFF  # the IHDR CRC
    return bytes(png)


def _gif_header_only() -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0)


BAD_IMAGES: dict[str, Callable[[], bytes]] = {
    "empty": _empty,
    "text_named_jpg": _text_named_jpg,
    "truncated_jpeg": _truncated_jpeg,
    "jpeg_header_only": _jpeg_header_only,
    "png_100000x100000": _png_100000x100000,
    "jpeg_65500x65500": _jpeg_65500x65500,
    "gif_65535x65535": _gif_65535x65535,
    "huge_upload_60mb": _huge_upload_60mb,
    "html": _html,
    "pdf_header": _pdf_header,
    "svg": _svg,
    "ico": _ico,
    "random_noise_bytes": _random_noise_bytes,
    "truncated_png": _truncated_png,
    "png_bad_crc": _png_bad_crc,
    "gif_header_only": _gif_header_only,
}

# Which kind of refusal each bad upload should get (a word its message must contain).
BAD_IMAGE_REASONS: dict[str, str] = {
    "empty": "empty",
    "text_named_jpg": "not an image",
    "truncated_jpeg": "truncated",
    "jpeg_header_only": "truncated",
    "png_100000x100000": "100000×100000 pixels",
    "jpeg_65500x65500": "65500×65500 pixels",
    "gif_65535x65535": "65535×65535 pixels",
    "huge_upload_60mb": "60.0 MB",
    "html": "not an image",
    "pdf_header": "not an image",
    "svg": "not an image",
    "ico": "not an image",
    "random_noise_bytes": "not an image",
    "truncated_png": "truncated",
    "png_bad_crc": "corrupt",
    "gif_header_only": "corrupt",
}


# --------------------------------------------------------------------------- good edge cases


def _cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def _gray16_png() -> bytes:
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16).repeat(2, axis=0)
    return _save(Image.fromarray(values), "PNG")


def _rgb16_png() -> bytes:
    # Pillow cannot write 16-bit RGB, so build it: one row, two pixels, big-endian samples.
    row = b"\x00" + struct.pack(">6H", 65535, 0, 32768, 0, 65535, 0)
    return raw_png(2, 1, row, bit_depth=16, colour_type=2)


def _rgba_png_transparent() -> bytes:
    image = Image.new("RGBA", (8, 6), (0, 0, 0, 0))  # left half: transparent black
    image.paste((0, 0, 255, 255), (4, 0, 8, 6))  # right half: opaque blue
    return _save(image, "PNG")


def _palette_png_transparent() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (4, 0, 8, 8))  # right half: index 1 = red; left half index 0 transparent
    return _save(image, "PNG", transparency=0)


def _la_png() -> bytes:
    image = Image.new("LA", (5, 5), (0, 0))
    image.paste((100, 255), (0, 0, 5, 2))
    return _save(image, "PNG")


def _bilevel_png() -> bytes:
    image = Image.new("1", (9, 7), 0)
    image.paste(1, (0, 0, 9, 3))
    return _save(image, "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (10, 8), RED), Image.new("RGB", (10, 8), GREEN)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _animated_webp() -> bytes:
    frames = [Image.new("RGB", (12, 10), RED), Image.new("RGB", (12, 10), GREEN)]
    return _save(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True
    )


def _animated_png() -> bytes:
    frames = [Image.new("RGBA", (6, 4), RED + (255,)), Image.new("RGBA", (6, 4), GREEN + (255,))]
    return _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)


def _exif_rotated_jpeg() -> bytes:
    # Stored 40x20, left half red and right half blue, with orientation 6 ("rotate 90° CW to
    # view"): upright it is 20x40 with red on top.
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(image, "JPEG", quality=95, exif=exif.tobytes())


def _grayscale_jpeg() -> bytes:
    return _save(Image.new("L", (30, 20), 128), "JPEG", quality=95)


def _progressive_jpeg() -> bytes:
    return _save(Image.new("RGB", (33, 17), BLUE), "JPEG", quality=95, progressive=True)


def _tiny_1x1() -> bytes:
    return _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")


def _gray16_tiff() -> bytes:
    return _save(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)), "TIFF")


def _int32_tiff() -> bytes:
    return _save(Image.fromarray(np.array([[-1000, 0, 100000]], dtype=np.int32)), "TIFF")


def _float_tiff() -> bytes:
    return _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), "TIFF")


def _bmp() -> bytes:
    return _save(Image.new("RGB", (7, 5), GREEN), "BMP")


def _webp_still() -> bytes:
    return _save(Image.new("RGB", (9, 9), BLUE), "WEBP", lossless=True)


def _mpo() -> bytes:
    frames = [Image.new("RGB", (16, 12), RED), Image.new("RGB", (16, 12), GREEN)]
    return _save(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)


_GOOD: dict[str, tuple[Callable[[], bytes], tuple[int, int]]] = {
    "cmyk_jpeg": (_cmyk_jpeg, (24, 16)),
    "gray16_png": (_gray16_png, (4, 2)),
    "rgb16_png": (_rgb16_png, (2, 1)),
    "rgba_png_transparent": (_rgba_png_transparent, (8, 6)),
    "palette_png_transparent": (_palette_png_transparent, (8, 8)),
    "la_png": (_la_png, (5, 5)),
    "bilevel_png": (_bilevel_png, (9, 7)),
    "animated_gif": (_animated_gif, (10, 8)),
    "animated_webp": (_animated_webp, (12, 10)),
    "animated_png": (_animated_png, (6, 4)),
    "exif_rotated_jpeg": (_exif_rotated_jpeg, (20, 40)),
    "grayscale_jpeg": (_grayscale_jpeg, (30, 20)),
    "progressive_jpeg": (_progressive_jpeg, (33, 17)),
    "tiny_1x1": (_tiny_1x1, (1, 1)),
    "gray16_tiff": (_gray16_tiff, (3, 1)),
    "int32_tiff": (_int32_tiff, (3, 1)),
    "float_tiff": (_float_tiff, (3, 1)),
    "bmp": (_bmp, (7, 5)),
    "webp_still": (_webp_still, (9, 9)),
    "mpo": (_mpo, (16, 12)),
}

# Decoded (upright) size of every good image: the EXIF-rotated one is swapped.
GOOD_IMAGE_SIZES: dict[str, tuple[int, int]] = {name: size for name, (_, size) in _GOOD.items()}


@functools.lru_cache(maxsize=1)
def _good_bytes() -> tuple[tuple[str, bytes], ...]:
    return tuple((name, build()) for name, (build, _) in _GOOD.items())


def good_images() -> dict[str, bytes]:
    """Edge-case images that must decode (built once, a fresh dict each call)."""
    return dict(_good_bytes())
