"""The real COCO detector (YOLOv8n int8 TFLite in ../shared/models) and the null detector."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from PIL import Image

from engine.detector import GENERAL_VOCABULARY, NullDetector, YoloDetector, clean_vocabulary
from engine.models import build_detector
from engine.profiles import resolve_profile
from engine.settings import EngineSettings


@pytest.fixture(scope="module")
def coco(coco_models) -> YoloDetector:
    """The real COCO detector as ``load_models`` builds it for ``RAPBOT_DETECTOR=<.tflite>``."""
    settings, models = coco_models
    assert isinstance(models.detector, YoloDetector)
    assert models.detector.name == settings.detector
    return models.detector


def _photo(dreambooth: Path, subject: str) -> Image.Image:
    with Image.open(dreambooth / subject / "00.jpg") as im:
        return im.convert("RGB")


def test_coco_finds_the_cat_and_the_dog(
    coco: YoloDetector, dreambooth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the detector tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    images = [_photo(dreambooth, "cat"), _photo(dreambooth, "dog")]
    cat, dog = coco.detect(images, ["Mochi"])  # a plain YOLO ignores the vocabulary
    assert cat and cat[0].label == "cat" and cat[0].score > 0.6
    assert dog and dog[0].label == "dog" and dog[0].score > 0.5
    for image, found in zip(images, (cat, dog), strict=True):
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
        assert len(found) <= coco.max_detections
        for d in found:
            assert d.score >= coco.confidence
            assert (
                0 <= d.box.x1 < d.box.x2 <= image.width and 0 <= d.box.y1 < d.box.y2 <= image.height
            )
    # The cat fills most of its photo: the box must be in the photo's pixels, not the 640 input.
    assert cat[0].box.width > 0.8 * images[0].width


def test_coco_handles_odd_inputs(coco: YoloDetector) -> None:
    assert coco.detect([], []) == []
    found = coco.detect([Image.new("L", (37, 300), 128)], [])
    assert found == [[]]
    assert len(coco.classes) == 80 and coco.classes[15] == "cat"


def test_null_detector_finds_nothing() -> None:
    assert NullDetector().detect([Image.new("RGB", (8, 8))] * 2, ["cat"]) == [[], []]
    settings = EngineSettings(profile="tiny", detector="none")
    profile = resolve_profile(settings)
    assert profile.detector_kind == "none"
    assert isinstance(build_detector(profile, settings, text_encoder=None), NullDetector)


def test_vocabulary_cleaning() -> None:
    assert clean_vocabulary([" cat", "dog", "cat", "", "  "]) == ("cat", "dog")
    assert clean_vocabulary([]) == tuple(GENERAL_VOCABULARY)
    assert len(set(GENERAL_VOCABULARY)) == len(GENERAL_VOCABULARY)
    for word in (
        "cat",
        "dog",
        "person",
        "plush toy",
        "sneaker",
        "teapot",
        "backpack",
        "sunglasses",
    ):
        assert word in GENERAL_VOCABULARY


def test_plain_yolo_leaves_torch_threads_as_they_were(coco_models, dreambooth) -> None:
    """ultralytics' device selection lowers torch's thread count; the detector restores it."""
    import torch

    _, models = coco_models
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Image.open(dreambooth / "cat" / "00.jpg") as photo:
            models.detector.detect([photo.convert("RGB")], [])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
