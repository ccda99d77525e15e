"""engine.images: untrusted bytes in, a loaded upright RGB image (or one clear sentence) out."""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from engine.errors import ImageError, InvalidInputError
from engine.images import (
    ImageLimits,
    crop,
    decode_image,
    encode_jpeg,
    encode_png,
    load_image_file,
    thumbnail,
)
from engine.settings import EngineSettings
from engine.types import Box
from tests.badfiles import (
    BAD_IMAGE_REASONS,
    BAD_IMAGES,
    BLUE,
    GOOD_IMAGE_SIZES,
    GREEN,
    RED,
    good_images,
    raw_png,
)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def close_to(actual: np.ndarray, expected: tuple[int, ...], tolerance: int = 3) -> bool:
    return bool(np.all(np.abs(actual - np.array(expected)) <= tolerance))


def assert_user_message(error: ImageError) -> str:
    message = str(error)
    assert message, "an ImageError must carry a message for the user"
    assert "\n" not in message and "\r" not in message
    assert message.endswith(".")
    assert "Traceback" not in message
    return message


# --------------------------------------------------------------------------- bad uploads


def test_catalogue_has_the_required_entries() -> None:
    required = {
        "empty",
        "text_named_jpg",
        "truncated_jpeg",
        "png_100000x100000",
        "huge_upload_60mb",
        "html",
        "pdf_header",
        "random_noise_bytes",
        "jpeg_header_only",
    }
    assert required <= set(BAD_IMAGES)
    assert set(BAD_IMAGE_REASONS) == set(BAD_IMAGES)
    assert BAD_IMAGES["empty"]() == b""
    assert len(BAD_IMAGES["huge_upload_60mb"]()) == 60 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_upload_is_refused_with_one_sentence(name: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(BAD_IMAGES[name]())
    message = assert_user_message(caught.value)
    assert BAD_IMAGE_REASONS[name] in message
    assert caught.value.__cause__ is None  # no Pillow exception chained for logs to dump


def test_exact_messages() -> None:
    def message(data: bytes) -> str:
        with pytest.raises(ImageError) as caught:
            decode_image(data)
        return str(caught.value)

    assert message(b"") == "The file is empty."
    assert message(BAD_IMAGES["huge_upload_60mb"]()) == (
        "The image is too large (60.0 MB); the limit is 20 MB."
    )
    assert message(BAD_IMAGES["png_100000x100000"]()) == (
        "The image is too large (100000×100000 pixels); the limit is 50 megapixels."
    )
    assert message(BAD_IMAGES["truncated_jpeg"]()) == "The image is truncated or corrupt."
    assert message(BAD_IMAGES["pdf_header"]()) == (
        "This file is not an image I can read (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)."
    )


def test_byte_limit_is_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open must not be reached")

    monkeypatch.setattr(Image, "open", no_parsing)
    good = good_images()["tiny_1x1"]
    with pytest.raises(ImageError, match=r"too large \(\d+ bytes\); the limit is 10 bytes"):
        decode_image(good, ImageLimits(max_bytes=10))


def test_pixel_limit_refuses_from_the_header_without_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> object:
        loads.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    data = BAD_IMAGES["png_100000x100000"]()
    assert len(data) < 200
    start = time.perf_counter()
    with pytest.raises(ImageError, match="100000×100000 pixels"):
        decode_image(data)
    assert time.perf_counter() - start < 0.5
    assert loads == []


def test_pixel_limit_does_not_rely_on_pillows_global(monkeypatch: pytest.MonkeyPatch) -> None:
    # ultralytics sets Image.MAX_IMAGE_PIXELS = None; our per-call limit must still hold.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="100000×100000 pixels"):
        decode_image(BAD_IMAGES["png_100000x100000"]())
    small = good_images()["rgba_png_transparent"]  # 8x6 = 48 pixels
    with pytest.raises(ImageError, match=r"\(8×6 pixels\); the limit is 40 pixels"):
        decode_image(small, ImageLimits(max_pixels=40))
    assert decode_image(small, ImageLimits(max_pixels=48)).size == (8, 6)


def test_limit_above_pillows_default_with_warnings_as_errors() -> None:
    # 10000x10000 is over Pillow's warning threshold but within a 150 MP limit: the bomb
    # warning (raised as an error here) must not refuse it; its tiny IDAT is then corrupt.
    declared = raw_png(10_000, 10_000, b"\x00" + bytes(30))
    limits = ImageLimits(max_pixels=150_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="truncated or corrupt"):
            decode_image(declared, limits)
        with pytest.raises(ImageError, match="10000×10000 pixels"):
            decode_image(declared, ImageLimits(max_pixels=90_000_000))


def test_truncated_image_is_refused_even_if_it_starts_fine() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we never flip the global
    with pytest.raises(ImageError, match="truncated"):
        decode_image(BAD_IMAGES["truncated_png"]())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_unexpected_pillow_errors_become_image_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_load(self: ImageFile.ImageFile) -> None:
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageError, match="truncated or corrupt") as caught:
        decode_image(good_images()["tiny_1x1"])
    assert "exploded" not in str(caught.value)


def test_non_bytes_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = good_images()["tiny_1x1"]
    assert decode_image(bytearray(data)).size == (1, 1)
    assert decode_image(memoryview(data)).size == (1, 1)


# --------------------------------------------------------------------------- good edge cases


def test_good_catalogue_covers_the_edge_cases() -> None:
    images = good_images()
    assert set(images) == set(GOOD_IMAGE_SIZES)
    modes = {name: Image.open(io.BytesIO(data)).mode for name, data in images.items()}
    assert modes["cmyk_jpeg"] == "CMYK"
    assert modes["gray16_png"].startswith("I")
    assert modes["palette_png_transparent"] == "P"
    assert modes["bilevel_png"] == "1"
    assert modes["rgba_png_transparent"] == "RGBA"
    assert Image.open(io.BytesIO(images["animated_gif"])).n_frames == 2
    assert Image.open(io.BytesIO(images["animated_webp"])).n_frames == 2
    assert Image.open(io.BytesIO(images["exif_rotated_jpeg"])).size == (40, 20)


@pytest.mark.parametrize("name", sorted(GOOD_IMAGE_SIZES))
def test_good_image_decodes_to_loaded_rgb(name: str) -> None:
    image = decode_image(good_images()[name])
    assert image.mode == "RGB"
    assert image.size == GOOD_IMAGE_SIZES[name]
    assert pixels(image).shape == (image.height, image.width, 3)


def test_exif_orientation_is_applied() -> None:
    image = decode_image(good_images()["exif_rotated_jpeg"])
    assert image.size == (20, 40)
    array = pixels(image)
    assert close_to(array[5, 10], RED, tolerance=8)  # the stored left half is now on top
    assert close_to(array[35, 10], BLUE, tolerance=8)


@pytest.mark.parametrize("name", ["animated_gif", "animated_webp", "animated_png", "mpo"])
def test_animated_images_give_their_first_frame(name: str) -> None:
    image = decode_image(good_images()[name])
    assert close_to(pixels(image), RED, tolerance=4)
    assert not getattr(image, "is_animated", False)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    array = pixels(decode_image(good_images()["gray16_png"]))
    assert array[0, :, 0].tolist() == [0, 128, 255, 1]  # 0, 32768, 65535, 257
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    tiff = pixels(decode_image(good_images()["gray16_tiff"]))
    assert tiff[0, :, 0].tolist() == [0, 128, 255]


def test_thirty_two_bit_and_float_grey_are_scaled() -> None:
    assert pixels(decode_image(good_images()["float_tiff"]))[0, :, 0].tolist() == [0, 128, 255]
    stretched = pixels(decode_image(good_images()["int32_tiff"]))[0, :, 0].tolist()
    assert stretched[0] == 0 and stretched[2] == 255 and 0 < stretched[1] < 10


def test_sixteen_bit_rgb() -> None:
    array = pixels(decode_image(good_images()["rgb16_png"]))
    assert array[0, 0].tolist() == [255, 0, 128]
    assert array[0, 1].tolist() == [0, 255, 0]


def test_transparency_becomes_white() -> None:
    rgba = pixels(decode_image(good_images()["rgba_png_transparent"]))
    assert (rgba[:, :4] == 255).all()  # transparent black -> white
    assert (rgba[:, 4:] == BLUE).all()
    palette = pixels(decode_image(good_images()["palette_png_transparent"]))
    assert (palette[:, :4] == 255).all()
    assert (palette[:, 4:] == RED).all()
    grey_alpha = pixels(decode_image(good_images()["la_png"]))
    assert (grey_alpha[:2] == 100).all() and (grey_alpha[2:] == 255).all()


def test_cmyk_and_bilevel_colours() -> None:
    assert close_to(pixels(decode_image(good_images()["cmyk_jpeg"])), RED, tolerance=6)
    bilevel = pixels(decode_image(good_images()["bilevel_png"]))
    assert (bilevel[:3] == 255).all() and (bilevel[3:] == 0).all()


def test_limits_from_settings() -> None:
    settings = EngineSettings(max_image_bytes=1234, max_image_pixels=5678)
    assert ImageLimits.from_settings(settings) == ImageLimits(max_bytes=1234, max_pixels=5678)
    assert ImageLimits() == ImageLimits.from_settings(EngineSettings())
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0)


# --------------------------------------------------------------------------- files


def test_load_image_file(tmp_path: Path) -> None:
    path = tmp_path / "cat.webp"
    path.write_bytes(good_images()["animated_webp"])
    assert load_image_file(path).size == (12, 10)
    assert load_image_file(str(path)).mode == "RGB"


def test_load_image_file_problems_name_the_path(tmp_path: Path) -> None:
    def message(path: Path, limits: ImageLimits = ImageLimits()) -> str:
        with pytest.raises(ImageError) as caught:
            load_image_file(path, limits)
        text = assert_user_message(caught.value)
        assert str(path) in text
        return text

    assert "does not exist" in message(tmp_path / "missing.jpg")
    assert "folder" in message(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(BAD_IMAGES["truncated_jpeg"]())
    assert "truncated" in message(broken)
    big = tmp_path / "big.jpg"
    big.write_bytes(good_images()["progressive_jpeg"])
    assert "the limit is 100 bytes" in message(big, ImageLimits(max_bytes=100))
    fifo = tmp_path / "pipe.jpg"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        assert "not a regular file" in message(fifo)
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = tmp_path / "locked.jpg"
        locked.write_bytes(good_images()["tiny_1x1"])
        locked.chmod(0)
        try:
            assert "cannot be read" in message(locked)
        finally:
            locked.chmod(0o600)


def test_load_image_file_checks_size_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "huge.jpg"
    with path.open("wb") as file:  # sparse: 60 MB on paper, nothing on disk
        file.truncate(60 * 1024 * 1024)

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file must not be opened")

    monkeypatch.setattr("builtins.open", no_reading)
    with pytest.raises(ImageError, match=r"\(60\.0 MB\); the limit is 20 MB"):
        load_image_file(path)


# --------------------------------------------------------------------------- crops and output


def gradient(width: int = 100, height: int = 50) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    array = np.stack([np.tile(x, (height, 1))] * 3, axis=-1)
    return Image.fromarray(array)


def test_crop_and_padding() -> None:
    image = gradient()
    assert crop(image, Box(10, 10, 30, 20)).size == (20, 10)
    assert crop(image, Box(10, 10, 30, 20), pad=0.5).size == (40, 20)  # 10 + 5 on each side
    # Padding (and the box itself) is clipped to the image.
    assert crop(image, Box(0, 0, 20, 10), pad=0.5).size == (30, 15)
    assert crop(image, Box(90, 40, 120, 70), pad=0.1).size == (13, 13)
    assert crop(image, Box(-50, -50, 500, 500)).size == (100, 50)
    cut = pixels(crop(image, Box(50, 0, 51, 1)))
    assert cut[0, 0].tolist() == pixels(image)[0, 50].tolist()


@pytest.mark.parametrize(
    "box", [Box(10, 10, 10, 20), Box(30, 10, 20, 20), Box(200, 10, 300, 20), Box(-9, 0, 0, 9)]
)
def test_crop_refuses_empty_or_outside_boxes(box: Box) -> None:
    with pytest.raises(InvalidInputError) as caught:
        crop(gradient(), box, pad=0.2)
    assert "box" in str(caught.value) and "\n" not in str(caught.value)


def test_crop_refuses_bad_padding() -> None:
    with pytest.raises(InvalidInputError):
        crop(gradient(), Box(0, 0, 10, 10), pad=-0.1)
    with pytest.raises(InvalidInputError):
        crop(gradient(), Box(0, 0, 10, 10), pad=float("nan"))


def test_thumbnail_keeps_aspect_and_never_enlarges() -> None:
    image = gradient(1000, 500)
    small = thumbnail(image, 256)
    assert small.size == (256, 128)
    assert image.size == (1000, 500)  # the original is untouched
    assert thumbnail(gradient(300, 900), 100).size == (33, 100)
    tiny = gradient(20, 10)
    copy = thumbnail(tiny, 256)
    assert copy.size == (20, 10) and copy is not tiny
    assert thumbnail(gradient(5000, 1), 64).size == (64, 1)
    with pytest.raises(InvalidInputError):
        thumbnail(tiny, 0)


def test_encode_jpeg_round_trips() -> None:
    image = Image.new("RGB", (32, 24), GREEN)
    data = encode_jpeg(image, quality=95)
    assert data[:3] == b"\xff\xd8\xff"
    back = decode_image(data)
    assert back.size == (32, 24) and back.mode == "RGB"
    assert close_to(pixels(back), GREEN, tolerance=4)
    with pytest.raises(InvalidInputError):
        encode_jpeg(image, quality=0)


def test_encode_jpeg_flattens_transparency_and_drops_exif() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert close_to(pixels(decode_image(encode_jpeg(rgba))), (255, 255, 255), tolerance=2)
    rotated = Image.open(io.BytesIO(good_images()["exif_rotated_jpeg"]))
    assert rotated.getexif().get(0x0112) == 6
    again = Image.open(io.BytesIO(encode_jpeg(rotated)))
    assert again.getexif().get(0x0112) is None


def test_encode_png_round_trips_losslessly() -> None:
    image = gradient(40, 30)
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(pixels(decode_image(data)), pixels(image))
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert pixels(decode_image(encode_png(cmyk)))[0, 0].tolist() == list(RED)


# --------------------------------------------------------------------------- real photos


def _assert_decodes(path: Path) -> None:
    image = decode_image(path.read_bytes())
    assert image.mode == "RGB", path
    assert min(image.size) > 0, path


def test_one_real_photo_per_subject_decodes(dreambooth: Path) -> None:
    subjects = sorted(folder for folder in dreambooth.iterdir() if folder.is_dir())
    firsts = [min(photos) for folder in subjects if (photos := list(folder.glob("*.jpg")))]
    assert firsts, f"no .jpg under {dreambooth}"
    for path in firsts:
        _assert_decodes(path)


@pytest.mark.slow  # ~160 full-size JPEG decodes, about 5 s
def test_every_real_photo_decodes(dreambooth: Path) -> None:
    photos = sorted(dreambooth.rglob("*.jpg"))
    assert photos, f"no .jpg under {dreambooth}"
    for path in photos:
        _assert_decodes(path)


def test_ultralytics_open_patch_never_installs_plugins(monkeypatch) -> None:
    """ultralytics wraps Image.open to pip-install a HEIF plugin on unknown files: bypassed."""
    import ultralytics.utils.checks as checks
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)

    calls: list[object] = []
    monkeypatch.setattr(checks, "check_requirements", lambda *a, **k: calls.append(a))
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"just some text, not a photo")
    assert calls == []
